"""Training cost: what one optimiser step costs for the hybrid, the plain transformer and the plain Mamba, where the
hybrid becomes the cheaper one as the context grows, and what mixture-of-experts layers cost.

    python benchmarks/train_speed.py            # three tables, md and png (about 10 minutes on 2 CPU cores)
    python benchmarks/train_speed.py --smoke    # tiny sizes, seconds: checks that the script still runs

A step is forward, backward and AdamW on random tokens, float32, CPU. Variants are timed side by side in one
process, in turns (variant 1, 2, 3, 1, 2, 3, ...), and each figure is the median of --repeats steps after warm-up
steps, so that a busy moment of a shared machine hits every variant alike.
  1. At train_tiny.py's default sizes (d_model 128, 4 layers, d_state 8, expand 1) and three batch x context
     shapes: milliseconds per step, tokens per second, and tokens per second relative to the transformer; the
     hybrid also with the pure-PyTorch parallel scan instead of the fused kernel (scan="parallel"), for comparison.
  2. Against context length, with the same number of tokens in every step (--tokens-per-step): the training
     time per token. Attention costs grow with the context, Mamba's do not; the table names the shortest context
     from which the hybrid trains faster than the transformer.
  3. Mixture of experts: the hybrid with 16 experts, top-2, in every other layer, against dense hybrids whose MLPs
     are as wide as the active experts (2 x dim_feedforward) and as wide as all 16 together.
  4. Where a layer's time goes, at the default sizes: forward and backward of each block alone (the Mamba block
     with either scan), and of each selective scan alone on the Mamba block's shapes.
  5. torch.compile: the hybrid and the transformer at the first shape, compiled (train_tiny.py --compile: the
     forward through torch.compile(model), inductor, the fused scan as a torch op) and eager, in turns in one
     process; the warm-up steps take the compilation. --smoke compiles with the aot_eager backend, in seconds.
"""

import argparse
import statistics
import time

import torch
from _common import active_parameters, machine, pyplot, save_figure, write_table

from JAMBA import (
    MLP,
    AttentionBlock,
    Jamba,
    MambaBlock,
    selective_scan_fused,
    selective_scan_parallel,
)

TINY = {"vocab_size": 101, "d_model": 128, "nhead": 4, "dim_feedforward": 256, "d_state": 8, "expand": 1}   # train_tiny.py's
VARIANTS = {"transformer": {"num_mamba_layers": 0, "num_transformer_layers": 4},
            "hybrid": {"num_mamba_layers": 3, "num_transformer_layers": 1},
            "mamba": {"num_mamba_layers": 4, "num_transformer_layers": 0}}
PARALLEL = {"hybrid, parallel scan": dict(VARIANTS["hybrid"], scan="parallel")}   # table 1 only


def step_timer(config, batch, length, compile_backend=None):
    """A function that runs one training step of a fresh model (its forward compiled with compile_backend if
    given), and the model."""
    torch.manual_seed(0)
    model = Jamba(**config, max_seq_length=length)
    forward = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, config["vocab_size"], (batch, length), generator=generator)
    y = torch.randint(0, config["vocab_size"], (batch, length), generator=generator)

    def step():
        _, loss = forward(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step, model


def block_timers(tiny, batch, length):
    """{name: a function that runs forward and backward of one block, or of the scan alone, at these sizes}."""
    torch.manual_seed(0)
    m, d, n = tiny["d_model"], tiny["expand"] * tiny["d_model"], tiny["d_state"]
    x = torch.randn(batch, length, m, requires_grad=True)
    blocks = {"attention block": AttentionBlock(m, tiny["nhead"], max_seq_length=length),
              "Mamba block": MambaBlock(m, n, expand=tiny["expand"], inner_layernorms=True),
              "Mamba block, parallel scan": MambaBlock(m, n, expand=tiny["expand"], inner_layernorms=True,
                                                       scan="parallel"),
              "MLP": MLP(m, tiny["dim_feedforward"])}
    timers = {name: (lambda block=block: block(x).sum().backward()) for name, block in blocks.items()}
    g = torch.Generator().manual_seed(0)
    def channels_last(width):                        # (b, width, l) as a view of (b, l, width), as the block has it
        return torch.randn(batch, length, width, generator=g).transpose(1, 2)
    scan_inputs = {"u": channels_last(d), "delta": channels_last(d), "A": -torch.rand(d, n, generator=g),
                   "B": channels_last(n), "C": channels_last(n), "D": torch.randn(d, generator=g), "z": channels_last(d),
                   "delta_bias": torch.randn(d, generator=g)}

    def scan(selective_scan):
        inputs = {name: value.detach().requires_grad_() for name, value in scan_inputs.items()}
        selective_scan(**inputs, delta_softplus=True).sum().backward()
    timers["its fused selective scan alone"] = lambda: scan(selective_scan_fused)
    timers["its parallel selective scan alone"] = lambda: scan(selective_scan_parallel)
    return timers


def time_in_turns(steps, repeats, warmup=2):
    """{name: median seconds per call} for {name: function}, called in turns."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--tokens-per-step", type=int, default=8192)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat, no files written")
    args = p.parse_args()
    tiny = dict(TINY, d_model=16, nhead=2, dim_feedforward=32, d_state=4) if args.smoke else TINY
    shapes = [(2, 16)] if args.smoke else [(16, 128), (12, 64), (8, 256)]
    contexts = [16, 32] if args.smoke else args.contexts
    tokens_per_step, repeats = (64, 1) if args.smoke else (args.tokens_per_step, args.repeats)
    print(f"training step, float32, CPU; {machine()}", flush=True)

    # 1. train_tiny.py's sizes.
    shape_rows = []
    for batch, length in shapes:
        steps = {name: step_timer({**tiny, **layers}, batch, length)[0]
                 for name, layers in {**VARIANTS, **PARALLEL}.items()}
        seconds = time_in_turns(steps, repeats)
        for name in steps:
            tokens_per_second = batch * length / seconds[name]
            shape_rows.append([f"{batch} x {length}", name, f"{1e3 * seconds[name]:.1f}", f"{tokens_per_second:,.0f}",
                               f"{seconds['transformer'] / seconds[name]:.2f}x"])
            print(" | ".join(shape_rows[-1]), flush=True)

    # 2. Against context length, the same tokens in every step.
    per_token = {}
    for length in contexts:
        batch = max(1, tokens_per_step // length)
        steps = {name: step_timer({**tiny, **layers}, batch, length)[0] for name, layers in VARIANTS.items()}
        for name, seconds in time_in_turns(steps, max(3, repeats // 3) if not args.smoke else 1).items():
            per_token[name, length] = seconds / (batch * length)
        print(f"context {length} (batch {batch}): " + ", ".join(
            f"{name} {1e6 * per_token[name, length]:.1f} us/token" for name in VARIANTS), flush=True)
    cheaper = [length for length in contexts if per_token["hybrid", length] < per_token["transformer", length]]
    crossover = next((length for i, length in enumerate(contexts) if all(c in cheaper for c in contexts[i:])), None)

    # 3. Experts.
    batch, length = shapes[0]
    hybrid = {**tiny, **VARIANTS["hybrid"]}
    f = tiny["dim_feedforward"]
    experts = 4 if args.smoke else 16
    moe_variants = {f"dense, dim_feedforward {f}": hybrid,
                    f"{experts} experts, top-2, every other layer": dict(hybrid, num_experts=experts,
                                                                          num_experts_per_tok=2),
                    f"dense, dim_feedforward {2 * f} (the active width of top-2)": dict(hybrid, dim_feedforward=2 * f),
                    f"dense, dim_feedforward {experts * f} (all experts' width)": dict(hybrid,
                                                                                       dim_feedforward=experts * f)}
    timers = {name: step_timer(config, batch, length) for name, config in moe_variants.items()}
    seconds = time_in_turns({name: step for name, (step, _) in timers.items()}, repeats)
    moe_rows = []
    for name, (_, model) in timers.items():
        total = sum(p.numel() for p in model.parameters())
        moe_rows.append([name, model.mlp_pattern, f"{total / 1e6:.2f}M", f"{active_parameters(model) / 1e6:.2f}M",
                         f"{1e3 * seconds[name]:.1f}"])
        print(" | ".join(moe_rows[-1]), flush=True)
    # 4. Where a layer's time goes.
    seconds = time_in_turns(block_timers(tiny, batch, length), repeats)
    block_rows = [[name, f"{1e3 * value:.1f}"] for name, value in seconds.items()]
    for row in block_rows:
        print(" | ".join(row), flush=True)
    # 5. torch.compile against eager.
    backend = "aot_eager" if args.smoke else "inductor"
    compile_variants = {f"{name}, {mode}": ({**tiny, **VARIANTS[name]}, backend if mode == "compiled" else None)
                        for name in ("hybrid", "transformer") for mode in ("eager", "compiled")}
    seconds = time_in_turns({name: step_timer(config, batch, length, compiled)[0]
                             for name, (config, compiled) in compile_variants.items()}, repeats)
    compile_rows = []
    for name in compile_variants:
        eager = seconds[name.replace("compiled", "eager")]
        compile_rows.append([name, f"{1e3 * seconds[name]:.1f}", f"{batch * length / seconds[name]:,.0f}",
                             f"{eager / seconds[name]:.2f}x"])
        print(" | ".join(compile_rows[-1]), flush=True)
    if args.smoke:
        return

    context_rows = [[length, max(1, tokens_per_step // length)]
                    + [f"{1e6 * per_token[name, length]:.1f}" for name in VARIANTS]
                    + [f"{per_token['transformer', length] / per_token['hybrid', length]:.2f}x"] for length in contexts]
    crossover_text = (f"the hybrid trains faster per token than the transformer from context {crossover} on"
                      if crossover else "the hybrid is not faster per token than the transformer at any context here")
    write_table("train_speed", "Training step at train_tiny.py's sizes (d_model 128, 4 layers, d_state 8, expand 1), "
                f"float32, CPU, median of {repeats} steps in turns", ["batch x context", "variant", "ms/step",
                                                                      "tokens/s", "tokens/s vs transformer"],
                shape_rows)
    write_table("train_speed_context", f"Training time per token against context length, {tokens_per_step} tokens "
                f"per step, float32, CPU: {crossover_text}",
                ["context", "batch"] + [f"{name} us/token" for name in VARIANTS] + ["hybrid speed vs transformer"],
                context_rows)
    write_table("train_speed_experts", f"Mixture of experts: training step of the hybrid at batch {batch} x "
                f"context {length}, float32, CPU, median of {repeats} steps in turns",
                ["MLPs", "mlp_pattern", "parameters", "active parameters per token", "ms/step"], moe_rows)
    write_table("train_speed_blocks", f"Forward + backward of one block at batch {batch} x context {length}, "
                f"d_model {tiny['d_model']}, d_state {tiny['d_state']}, expand {tiny['expand']}, float32, CPU, "
                f"median of {repeats} in turns", ["block", "ms"], block_rows)
    write_table("train_speed_compile", f"torch.compile (inductor) against eager: training step at batch {batch} x "
                f"context {length}, train_tiny.py's sizes, float32, CPU, median of {repeats} steps in turns after "
                "the compiling warm-up", ["variant", "ms/step", "tokens/s", "speed vs eager"], compile_rows)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in zip(VARIANTS, ("o-", "s-", "^-")):
        ax.loglog(contexts, [1e6 * per_token[name, length] for length in contexts], style, label=name)
    if crossover:
        ax.axvline(crossover, color="gray", ls=":", label=f"hybrid cheaper from {crossover}")
    ax.set(xlabel="context length (tokens per sequence)", ylabel="training time per token (us)",
           title=f"{tokens_per_step} tokens per step, d_model {tiny['d_model']}, 4 layers")
    save_figure(fig, (ax,), "train_speed", "Training cost against context length")


if __name__ == "__main__":
    main()
