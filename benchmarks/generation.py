"""Generation cost against context length, for a plain transformer, a plain Mamba and the hybrid of equal size.

    python benchmarks/generation.py            # d_model=256, 8 layers, contexts 128 ... 8192: table, md and png
    python benchmarks/generation.py --smoke    # tiny sizes, seconds: checks that the script still runs

For each context length L: prefill a random prompt of L tokens (one parallel pass), then time --new-tokens single
steps of generation (the median step is the time per token) and count the bytes the layers' states hold for one
sequence: the attention key/value caches (sized for L + new tokens) and the Mamba conv and SSM states. Each model
is also timed with scan="parallel", whose step is torch's, in small operations, instead of the fused library's one
call for the whole model (the same weights, in the same process, context by context).
Then a prompt of 4 x max_seq_length tokens is read both ways generate has done it: max_seq_length in parallel and
the rest token by token (before), and in parallel pieces of max_seq_length (now).

    python benchmarks/generation.py --against ../old/JAMBA.py   # + that JAMBA.py's models, in turns with ours

--against times another version of JAMBA.py (a git worktree of an earlier commit, say) in the same process, its
models of the same sizes stepping in turns with these, so that a change's cost per token is measured side by side.
"""

import argparse
import importlib.util
import statistics
import time

import torch
from _common import machine, median_ms, pyplot, save_figure, write_table

from JAMBA import Jamba, layer_schedule


def variants(n_layers):
    """Same d_model and number of layers; the hybrid is Jamba's 1:7 (one attention layer per 8)."""
    n_attention = max(1, n_layers // 8)
    return {"transformer": (0, n_layers), "mamba": (n_layers, 0),
            "hybrid": (n_layers - n_attention, n_attention)}


# scan="parallel": the step in torch operations
UNFUSED = {"transformer, torch step": "transformer", "mamba, torch step": "mamba", "hybrid, torch step": "hybrid"}


@torch.no_grad()
def measure(models, context, new_tokens):
    """{name: (median seconds per generated token, state bytes per sequence)} after prefilling `context` tokens,
    the models stepping in turns, so that a busy moment of a shared machine hits them alike."""
    prompt = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(0))
    tokens, states, times = {}, {}, {name: [] for name in models}
    for name, model in models.items():
        logits, states[name] = model.prefill(prompt)
        tokens[name] = logits[:, -1].argmax(-1)
    state_bytes = {name: sum(t.numel() * t.element_size() for state in model_states for t in state
                             if torch.is_tensor(t)) for name, model_states in states.items()}
    for _ in range(new_tokens):
        for name, model in models.items():
            start = time.perf_counter()
            logits, states[name] = model.step(tokens[name], states[name])
            tokens[name] = logits.argmax(-1)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), state_bytes[name]) for name in models}


@torch.no_grad()
def read_long_prompt(model, length, repeats):
    """{way: median milliseconds to read a prompt of `length` tokens} for the two ways, timed in turns."""
    prompt = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    window = model.config.max_seq_length

    def token_by_token():
        _, states = model.prefill(prompt[:, :window])
        for t in range(window, length):
            _, states = model.step(prompt[:, t], states)

    def in_pieces():
        states = None
        for start in range(0, length, window):
            _, states = model.prefill(prompt[:, start:start + window], states)
    times = {"token by token": [], "in pieces": []}
    for _ in range(repeats):
        for way, read in (("token by token", token_by_token), ("in pieces", in_pieces)):
            times[way].append(median_ms(read, 1))
    return {way: statistics.median(values) for way, values in times.items()}


def other_jamba(path):
    """The Jamba class of another JAMBA.py, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("JAMBA_against", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Jamba


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--new-tokens", type=int, default=64, help="steps timed per context (the median is reported)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no files written")
    p.add_argument("--against", metavar="JAMBA.py", help="also time this JAMBA.py's transformer and hybrid, in turns")
    args = p.parse_args()
    d_model, n_layers = (16, 8) if args.smoke else (256, 8)
    contexts, new_tokens = ([8, 16] if args.smoke else args.contexts), (2 if args.smoke else args.new_tokens)
    print(f"generation, d_model={d_model}, {n_layers} layers, batch 1, float32; {machine()}")
    results = {}
    plans = {**variants(n_layers), **{name: variants(n_layers)[of] for name, of in UNFUSED.items()}}
    against = {f"{name} (--against)": name for name in ("transformer", "hybrid")} if args.against else {}
    other = other_jamba(args.against) if args.against else None
    plans.update({name: variants(n_layers)[of] for name, of in against.items()})
    for context in contexts:
        models = {}
        for name, (n_mamba, n_attention) in plans.items():
            torch.manual_seed(0)   # the same weights at every context length, fused or not
            models[name] = (other if name in against else Jamba)(
                vocab_size=256, d_model=d_model, num_mamba_layers=n_mamba, num_transformer_layers=n_attention,
                nhead=4, dim_feedforward=2 * d_model, max_seq_length=context + new_tokens,
                scan="parallel" if name in UNFUSED else "auto").eval()
        for name, (seconds, state_bytes) in measure(models, context, new_tokens).items():
            results[name, context] = (seconds, state_bytes)
            print(f"{name:18s} {models[name].layer_pattern} L={context:5d}: {1e3 * seconds:7.2f} ms/token, "
                  f"state {state_bytes / 2 ** 20:8.2f} MiB", flush=True)
    long_rows = []
    window = 16 if args.smoke else 128
    for name, (n_mamba, n_attention) in variants(n_layers).items():
        torch.manual_seed(0)
        model = Jamba(vocab_size=256, d_model=d_model, num_mamba_layers=n_mamba, num_transformer_layers=n_attention,
                      nhead=4, dim_feedforward=2 * d_model, max_seq_length=window).eval()
        seconds = read_long_prompt(model, 4 * window, 1 if args.smoke else 5)
        long_rows.append([name, model.layer_pattern, 4 * window, f"{seconds['token by token']:.0f}",
                          f"{seconds['in pieces']:.0f}", f"{seconds['token by token'] / seconds['in pieces']:.1f}x"])
        print(" | ".join(map(str, long_rows[-1])), flush=True)
    if args.smoke or args.against:      # a comparison is printed, not written over the results
        return
    write_table("generation_long_prompt", f"Reading a prompt of 4 x max_seq_length = {4 * window} tokens, d_model="
                f"{d_model}, {n_layers} layers, batch 1, float32, CPU, median of 5", ["model", "layers", "prompt",
                "max_seq_length in parallel, then token by token (ms)", "in parallel pieces of max_seq_length (ms)",
                "speed-up"], long_rows)
    names = list(variants(n_layers))
    header = (["context"] + [f"{n} ms/token" for n in plans] + [f"{of} speed-up of the fused step"
                                                               for of in UNFUSED.values()]
              + [f"{n} state MiB" for n in names])
    rows = [[c] + [f"{1e3 * results[n, c][0]:.2f}" for n in plans]
            + [f"{results[n, c][0] / results[of, c][0]:.2f}x" for n, of in UNFUSED.items()]
            + [f"{results[n, c][1] / 2 ** 20:.2f}" for n in names] for c in contexts]
    write_table("generation", f"Generation cost per token, d_model={d_model}, {n_layers} layers "
                f"(hybrid {layer_schedule(*variants(n_layers)['hybrid'])}), batch 1, "
                f"float32, CPU, median of {new_tokens} steps", header, rows)
    plt = pyplot()
    if plt is None:
        return
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in zip(plans, ("o-", "s-", "^-", "o:", "s:", "^:")):
        ax_time.semilogx(contexts, [1e3 * results[name, c][0] for c in contexts], style, label=name)
        if name in names:
            ax_mem.loglog(contexts, [results[name, c][1] / 2 ** 20 for c in contexts], style, label=name)
    ax_time.set(xlabel="context length (tokens already seen)", ylabel="ms per generated token", ylim=(0, None),
                title="time per token")
    ax_mem.set(xlabel="context length (tokens already seen)", ylabel="MiB per sequence", title="state / cache held")
    save_figure(fig, (ax_time, ax_mem), "generation", f"Generation, d_model={d_model}, {n_layers} layers")


if __name__ == "__main__":
    main()
