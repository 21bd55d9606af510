"""What the hybrid buys: multi-query associative recall, and recall at lengths never seen in training.

    python benchmarks/recall.py            # the tables (md) and plots (png) of README's "What the hybrid buys"
    python benchmarks/recall.py --smoke    # tiny sizes, seconds: checks that the script still runs

Three variants built from Jamba with the same width, depth and MLPs (about equal parameter counts): a plain
transformer with rotary positions (AA), a plain Mamba (MM), and the hybrid (MA: a Mamba layer, then attention with
no positional encoding, [Jamba] Section 6.5). Each is trained on multi-query associative recall (MQAR, Zoology:
Arora et al., arXiv 2312.04927), drawn fresh at every step by multi_query_recall, and scored on held-out sequences.
Each variant gets the best of the learning rates --lrs on seed 0 (as Zoology gives each model its best), then
trains its other seeds at that rate.
  1. accuracy against training steps and wall-clock seconds at --length with --pairs key-value pairs, --seeds seeds;
  2. the same task with more pairs (--sweep-pairs) and one seed: where a small recurrent state runs out;
  3. the models of 1, trained at --length, evaluated at longer sequences (--eval-lengths) with the same number of
     pairs, whose queries then sit up to that far from the keys they ask about.
"""

import argparse
import math
import statistics
import time

import torch
from _common import machine, pyplot, save_figure, write_table

from JAMBA import Jamba
from train_tiny import make_optimizer

VARIANTS = {"transformer": {"num_mamba_layers": 0, "num_transformer_layers": 2},
            "mamba": {"num_mamba_layers": 2, "num_transformer_layers": 0},
            "hybrid": {"num_mamba_layers": 1, "num_transformer_layers": 1}}


def multi_query_recall(batch, length, num_pairs, vocab_size, generator):
    """Zoology's multi-query associative recall (MQAR): (idx (b, l), targets (b, l)).

    Keys come from the lower half of the vocabulary and values from the upper half, so a token says which it is.
    Each sequence opens with num_pairs (key, value) pairs, k1 v1 k2 v2 ..., all keys distinct and all values
    distinct. The rest of the sequence is two-token slots of random tokens, and num_pairs of those slots, chosen at
    random, become queries: one key each, every key exactly once, followed by its value. The only scored
    positions are the query keys, where the next token to predict is the value that key was paired with;
    every other target is -1, which Jamba's loss ignores.
    """
    half, K = vocab_size // 2, num_pairs
    if 4 * K > length:
        raise ValueError(f"{K} pairs need a length of at least {4 * K} (the pairs, then a slot per query), "
                         f"got {length}")
    keys = torch.rand(batch, half, generator=generator).argsort(-1)[:, :K]                  # (b, K) distinct
    values = half + torch.rand(batch, vocab_size - half, generator=generator).argsort(-1)[:, :K]   # (b, K)
    idx = torch.randint(0, vocab_size, (batch, length), generator=generator)               # (b, l) filler
    idx[:, 0:2 * K:2], idx[:, 1:2 * K:2] = keys, values
    slots = torch.rand(batch, (length - 2 * K) // 2, generator=generator).argsort(-1)[:, :K]   # (b, K) distinct
    query_at = 2 * K + 2 * slots                                                           # (b, K) query keys
    idx.scatter_(1, query_at, keys)
    idx.scatter_(1, query_at + 1, values)
    targets = torch.full_like(idx, -1).scatter_(1, query_at, values)                       # (b, l)
    return idx, targets


@torch.no_grad()
def recall_accuracy(model, length, num_pairs, vocab_size, sequences=256, seed=10_000):
    """The fraction of query positions whose most likely next token is the right value, on held-out sequences."""
    model.eval()
    idx, targets = multi_query_recall(sequences, length, num_pairs, vocab_size, torch.Generator().manual_seed(seed))
    correct = 0
    for i in range(0, sequences, 64):
        logits, _ = model(idx[i:i + 64])
        scored = targets[i:i + 64] >= 0
        correct += (logits.argmax(-1)[scored] == targets[i:i + 64][scored]).sum().item()
    model.train()
    return correct / (sequences * num_pairs)


def train(variant, args, num_pairs, seed, eval_every, lr):
    """Train one model on fresh MQAR batches: (model, history of (step, seconds, accuracy))."""
    torch.manual_seed(seed)
    model = Jamba(vocab_size=args.vocab_size, d_model=args.d_model, nhead=4, dim_feedforward=2 * args.d_model,
                  max_seq_length=max(args.eval_lengths + [args.length]), d_state=args.d_state, expand=1,
                  **VARIANTS[variant])
    optimizer = make_optimizer(model, lr, 0.1)
    generator = torch.Generator().manual_seed(seed)
    history, seconds = [], 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        warmup = min(1.0, step / (0.1 * args.steps))
        for group in optimizer.param_groups:       # linear warm-up over 10% of the steps, cosine decay to lr/10
            group["lr"] = lr * warmup * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        idx, targets = multi_query_recall(args.batch_size, args.length, num_pairs, args.vocab_size, generator)
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds += time.perf_counter() - start
        if step % eval_every == 0 or step == args.steps:
            history.append((step, seconds, recall_accuracy(model, args.length, num_pairs, args.vocab_size)))
    return model, history


def spread(values):
    """'mean (min-max)' of a list of accuracies, in percent."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int, default=128)
    p.add_argument("--length", type=int, default=64, help="training sequence length")
    p.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3],
                   help="peak learning rates tried on seed 0; each variant keeps its best")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sweep-pairs", type=int, nargs="*", default=[4, 8, 16])
    p.add_argument("--sweep-steps", type=int, default=1500)
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="train only these (a check of one variant: then no files are written)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no files written")
    args = p.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants}
    if args.smoke:
        args.d_model, args.steps, args.seeds, args.sweep_steps, args.batch_size = 16, 4, 1, 4, 8
        args.length, args.pairs, args.sweep_pairs, args.eval_lengths = 16, 2, [2, 4], [16, 32]
    eval_every = max(1, args.steps // 15)
    print(f"MQAR: vocab {args.vocab_size}, length {args.length}, {args.pairs} pairs, d_model {args.d_model}, "
          f"d_state {args.d_state}, 2 layers, {args.steps} steps of {args.batch_size}; {machine()}", flush=True)

    runs, tried, best_lr = {}, {}, {}              # (variant, seed) -> (model, history); (variant, lr) -> accuracy
    for variant in variants:
        for lr in args.lrs:
            run = train(variant, args, args.pairs, 0, eval_every, lr)
            tried[variant, lr] = run[1][-1][2]
            print(f"{variant:12s} seed 0, lr {lr:g}: accuracy {100 * tried[variant, lr]:5.1f}% after {args.steps} "
                  f"steps, {run[1][-1][1]:.0f} s", flush=True)
            if variant not in best_lr or tried[variant, lr] > tried[variant, best_lr[variant]]:
                best_lr[variant], runs[variant, 0] = lr, run
        for seed in range(1, args.seeds):
            runs[variant, seed] = train(variant, args, args.pairs, seed, eval_every, best_lr[variant])
            step, seconds, accuracy = runs[variant, seed][1][-1]
            print(f"{variant:12s} seed {seed}, lr {best_lr[variant]:g}: accuracy {100 * accuracy:5.1f}% after {step} "
                  f"steps, {seconds:.0f} s", flush=True)
    sweep = {}
    sweep_args = argparse.Namespace(**{**vars(args), "steps": args.sweep_steps})
    for num_pairs in args.sweep_pairs:
        length = max(args.length, 4 * num_pairs)
        for variant in variants:
            history = train(variant, argparse.Namespace(**{**vars(sweep_args), "length": length}), num_pairs, 0,
                            max(1, args.sweep_steps // 5), best_lr[variant])[1]
            sweep[variant, num_pairs] = history[-1][2]
            print(f"sweep {num_pairs:3d} pairs (length {length}): {variant:12s} "
                  f"{100 * sweep[variant, num_pairs]:5.1f}%", flush=True)
    lengths = {}
    for (variant, seed), (model, _) in runs.items():
        for length in args.eval_lengths:
            lengths.setdefault((variant, length), []).append(
                recall_accuracy(model, length, args.pairs, args.vocab_size, sequences=128))
    for length in args.eval_lengths:
        print(f"length {length:5d}: " + ", ".join(f"{v} {spread(lengths[v, length])}" for v in variants), flush=True)
    if args.smoke or len(variants) < len(VARIANTS):
        return

    rows = []
    for variant in VARIANTS:
        model, history = runs[variant, 0]
        finals = [runs[variant, seed][1][-1][2] for seed in range(args.seeds)]
        seconds = [runs[variant, seed][1][-1][1] for seed in range(args.seeds)]
        params = sum(p.numel() for p in model.parameters())
        rows.append([variant, model.layer_pattern, f"{params / 1e3:.0f}k", args.steps,
                     f"{statistics.mean(seconds):.0f}", f"{best_lr[variant]:g}",
                     ", ".join(f"{100 * tried[variant, lr]:.1f} at {lr:g}" for lr in args.lrs), spread(finals)])
    write_table("recall", f"Multi-query associative recall: vocabulary {args.vocab_size}, length {args.length}, "
                f"{args.pairs} pairs, d_model {args.d_model}, d_state {args.d_state}, accuracy in % on held-out "
                f"sequences, mean (min-max) over {args.seeds} seeds",
                ["variant", "layers", "parameters", "steps", "seconds", "learning rate", "seed 0 at each rate %",
                 "accuracy %"], rows)
    write_table("recall_pairs", f"More pairs to recall, one seed, {args.sweep_steps} steps; length "
                f"max({args.length}, 4 x pairs); accuracy in %",
                ["pairs"] + list(VARIANTS), [[k] + [f"{100 * sweep[v, k]:.1f}" for v in VARIANTS]
                                              for k in args.sweep_pairs])
    write_table("recall_length", f"Recall at lengths never seen in training (trained at {args.length}), "
                f"{args.pairs} pairs; accuracy in %, mean (min-max) over {args.seeds} seeds",
                ["length"] + list(VARIANTS), [[length] + [spread(lengths[v, length]) for v in VARIANTS]
                                              for length in args.eval_lengths])
    plt = pyplot()
    if plt is None:
        return
    styles = dict(zip(VARIANTS, ("o-", "^-", "s-")))
    fig, (ax_steps, ax_time, ax_pairs) = plt.subplots(1, 3, figsize=(14, 4.2))
    for variant in VARIANTS:
        histories = [runs[variant, seed][1] for seed in range(args.seeds)]
        steps = [step for step, _, _ in histories[0]]
        accuracy = [[100 * h[i][2] for h in histories] for i in range(len(steps))]
        mean = [statistics.mean(a) for a in accuracy]
        ax_steps.plot(steps, mean, styles[variant], ms=3, label=variant)
        ax_steps.fill_between(steps, [min(a) for a in accuracy], [max(a) for a in accuracy], alpha=0.2)
        for seed, history in enumerate(histories):
            ax_time.plot([s for _, s, _ in history], [100 * a for _, _, a in history], styles[variant], ms=2,
                         alpha=0.7, color=ax_steps.lines[-1].get_color(), label=variant if seed == 0 else None)
        ax_pairs.plot(args.sweep_pairs, [100 * sweep[variant, k] for k in args.sweep_pairs], styles[variant],
                      label=variant)
    ax_steps.set(xlabel="training steps", ylabel="recall accuracy (%)", ylim=(0, 102),
                 title=f"{args.pairs} pairs, length {args.length} (mean, min-max of {args.seeds} seeds)")
    ax_time.set(xlabel="wall-clock seconds of training", ylabel="recall accuracy (%)", ylim=(0, 102),
                title="the same runs against time")
    ax_pairs.set(xlabel="key-value pairs", ylabel="recall accuracy (%)", ylim=(0, 102), xscale="log",
                 xticks=args.sweep_pairs, xticklabels=[str(k) for k in args.sweep_pairs],
                 title=f"more pairs ({args.sweep_steps} steps, 1 seed)")
    ax_pairs.minorticks_off()
    save_figure(fig, (ax_steps, ax_time, ax_pairs), "recall", "Multi-query associative recall")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in VARIANTS:
        values = [lengths[variant, length] for length in args.eval_lengths]
        ax.plot(args.eval_lengths, [100 * statistics.mean(v) for v in values], styles[variant], label=variant)
        ax.fill_between(args.eval_lengths, [100 * min(v) for v in values], [100 * max(v) for v in values], alpha=0.2)
    ax.axvline(args.length, color="gray", ls=":", label="training length")
    ax.set(xscale="log", xlabel="sequence length at evaluation", ylabel="recall accuracy (%)", ylim=(0, 102),
           xticks=args.eval_lengths, xticklabels=[str(length) for length in args.eval_lengths],
           title=f"trained at {args.length}, {args.pairs} pairs at every length")
    ax.minorticks_off()
    save_figure(fig, (ax,), "recall_length", "Recall beyond the training length")


if __name__ == "__main__":
    main()
