"""Generation cost against context length, for a plain transformer, a plain Mamba and the hybrid of equal size.

    python benchmarks/generation.py            # d_model=256, 8 layers, contexts 128 ... 8192: table, md and png
    python benchmarks/generation.py --smoke    # tiny sizes, seconds: checks that the script still runs

For each context length L: prefill a random prompt of L tokens (one parallel pass), then time --new-tokens single
steps of generation (the median step is the time per token) and count the bytes the layers' states hold for one
sequence: the attention key/value caches (sized for L + new tokens) and the Mamba conv and SSM states. The plain
Mamba and the hybrid are also timed with scan="parallel", whose Mamba layers step in small torch operations
instead of the fused library's one call (the same weights, in the same process, context by context).
"""

import argparse
import statistics
import time

import torch

from _common import machine, pyplot, save_figure, write_table
from JAMBA import Jamba, layer_schedule


def variants(n_layers):
    """Same d_model and number of layers; the hybrid is Jamba's 1:7 (one attention layer per 8)."""
    n_attention = max(1, n_layers // 8)
    return {"transformer": (0, n_layers), "mamba": (n_layers, 0),
            "hybrid": (n_layers - n_attention, n_attention)}


UNFUSED = {"mamba, torch step": "mamba", "hybrid, torch step": "hybrid"}     # scan="parallel" steps in torch ops


@torch.no_grad()
def measure(model, context, new_tokens):
    """(median seconds per generated token, state bytes per sequence) after prefilling `context` tokens."""
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    logits, states = model.prefill(prompt)
    token = logits[:, -1].argmax(-1)
    state_bytes = sum(t.numel() * t.element_size() for state in states for t in state if torch.is_tensor(t))
    times = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        logits, states = model.step(token, states)
        token = logits.argmax(-1)
        times.append(time.perf_counter() - start)
    return statistics.median(times), state_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--new-tokens", type=int, default=32, help="steps timed per context (the median is reported)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no files written")
    args = p.parse_args()
    d_model, n_layers = (16, 8) if args.smoke else (256, 8)
    contexts, new_tokens = ([8, 16] if args.smoke else args.contexts), (2 if args.smoke else args.new_tokens)
    print(f"generation, d_model={d_model}, {n_layers} layers, batch 1, float32; {machine()}")
    results = {}
    plans = {**variants(n_layers), **{name: variants(n_layers)[of] for name, of in UNFUSED.items()}}
    for context in contexts:
        for name, (n_mamba, n_attention) in plans.items():
            torch.manual_seed(0)   # the same weights at every context length, fused or not
            model = Jamba(vocab_size=256, d_model=d_model, num_mamba_layers=n_mamba,
                          num_transformer_layers=n_attention, nhead=4, dim_feedforward=2 * d_model,
                          max_seq_length=context + new_tokens, scan="parallel" if name in UNFUSED else "auto").eval()
            seconds, state_bytes = measure(model, context, new_tokens)
            results[name, context] = (seconds, state_bytes)
            print(f"{name:18s} {model.layer_pattern} L={context:5d}: {1e3 * seconds:7.2f} ms/token, "
                  f"state {state_bytes / 2 ** 20:8.2f} MiB", flush=True)
    if args.smoke:
        return
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
    for name, style in zip(plans, ("o-", "s-", "^-", "s:", "^:")):
        ax_time.semilogx(contexts, [1e3 * results[name, c][0] for c in contexts], style, label=name)
        if name in names:
            ax_mem.loglog(contexts, [results[name, c][1] / 2 ** 20 for c in contexts], style, label=name)
    ax_time.set(xlabel="context length (tokens already seen)", ylabel="ms per generated token", ylim=(0, None),
                title="time per token")
    ax_mem.set(xlabel="context length (tokens already seen)", ylabel="MiB per sequence", title="state / cache held")
    save_figure(fig, (ax_time, ax_mem), "generation", f"Generation, d_model={d_model}, {n_layers} layers")


if __name__ == "__main__":
    main()
