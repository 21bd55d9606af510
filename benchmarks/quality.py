"""Quality per budget: validation loss against wall-clock training time for four variants of about equal size.

    python benchmarks/quality.py --data ../shared/data/tinyshakespeare.txt --time-budget 300   # the README's table
    python benchmarks/quality.py                      # the offline default corpus, 180 s per variant (~13 min)
    python benchmarks/quality.py --smoke              # tiny sizes, seconds: checks that the script still runs

Each variant is one run of train_tiny.py with the same corpus, budget and training flags, differing only in the
layer mix: the hybrid is train_tiny.py's default model; the plain transformer and plain Mamba have the same
d_model, layers and MLPs; "hybrid + experts" is the hybrid with Jamba's mixture of experts in every other layer
(4 experts, top-1: the same active parameters per token, 4x the MLP parameters in those layers). Each trains until
the budget is spent, its learning-rate schedule ending there.
Validation loss is measured every --eval-interval steps (the clock includes it).
"""

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import HERE, active_parameters, machine, pyplot, save_figure, write_table

import train_tiny
from JAMBA import Jamba

VARIANTS = {"hybrid": ["--num_mamba_layers", "3", "--num_transformer_layers", "1"],
            "transformer": ["--num_mamba_layers", "0", "--num_transformer_layers", "4"],
            "mamba": ["--num_mamba_layers", "4", "--num_transformer_layers", "0"],
            # Jamba's experts in every other layer, top-1: the hybrid's active parameters, 4x its MLP parameters.
            "hybrid + experts": ["--num_mamba_layers", "3", "--num_transformer_layers", "1", "--num_experts", "4",
                                 "--num_experts_per_tok", "1"]}
SMOKE_FLAGS = ["--d_model", "16", "--nhead", "2", "--dim_feedforward", "32", "--max_seq_length", "32",
               "--d_state", "4", "--batch-size", "4", "--block-size", "16", "--eval-iters", "2", "--max-iters", "6",
               "--eval-interval", "3", "--max-new-tokens", "5"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="corpus for train_tiny.py; default: its offline standard-library corpus")
    p.add_argument("--time-budget", type=float, default=180.0, help="seconds of training per variant")
    p.add_argument("--eval-interval", type=int, default=150)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no files written")
    args = p.parse_args()
    print(f"quality per budget: {args.data or 'the standard-library corpus'}, {args.time_budget:.0f} s per variant; "
          f"{machine()}")
    corpus_name = Path(args.data).stem if args.data else "stdlib"
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The smoke run checks two variants, the one with experts among them.
        for name, flags in (list(VARIANTS.items())[::3] if args.smoke else VARIANTS.items()):
            out = Path(tmp) / name
            command = [sys.executable, str(HERE.parent / "train_tiny.py"), "--out", str(out), "--device", "cpu",
                       *(["--data", args.data] if args.data else []), *flags]
            command += SMOKE_FLAGS if args.smoke else ["--time-budget", str(args.time_budget), "--max-iters",
                                                       "1000000", "--eval-interval", str(args.eval_interval),
                                                       "--eval-iters", "10", "--max-new-tokens", "200"]
            print("$ " + " ".join(command[1:]), flush=True)
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
            print(result.stdout.split("--- sample")[0].strip(), flush=True)
            ckpt = train_tiny.load_checkpoint(out / "ckpt.pt")
            with torch.device("meta"):
                model = Jamba(**ckpt["config"])
            runs[name] = {"ckpt": ckpt, "params": sum(p.numel() for p in model.parameters()),
                          "active": active_parameters(model), "pattern": model.layer_pattern + (
                                  f" / {model.mlp_pattern}" if "E" in model.mlp_pattern else "")}
    if args.smoke:
        return
    rows = []
    for name, run in runs.items():
        ckpt, best = run["ckpt"], run["ckpt"]["best_val_loss"]
        tokens = ckpt["step"] * ckpt["args"]["batch_size"] * ckpt["args"]["block_size"]
        rows.append([name, run["pattern"], f"{run['params'] / 1e6:.2f}M", f"{run['active'] / 1e6:.2f}M", ckpt["step"],
                     f"{tokens:,}", f"{ckpt['seconds']:.0f}", f"{best:.4f}", f"{best / math.log(2):.3f}"])
    write_table(f"quality_{corpus_name}", f"Validation loss after {args.time_budget:.0f} s of training on "
                f"{Path(args.data).name if args.data else 'the standard-library corpus'}",
                ["variant", "layers", "parameters", "active parameters", "steps", "tokens", "seconds",
                 "best val (nats)", "best val (bits/char)"], rows)
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in runs.items():
        history = run["ckpt"]["history"]
        ax.plot([h["seconds"] for h in history], [h["val"] for h in history], "o-", ms=3,
                label=f"{name} ({run['active'] / 1e6:.2f}M active)")
    ax.set(xlabel="wall-clock seconds of training (evaluations included)", ylabel="validation loss (nats/char)",
           title=f"{Path(args.data).name if args.data else 'standard-library corpus'}, "
                 f"{args.time_budget:.0f} s budget")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.secondary_yaxis("right", functions=(lambda nats: nats / math.log(2), lambda bits: bits * math.log(2))
                       ).set_ylabel("bits per character")
    save_figure(fig, (ax,), f"quality_{corpus_name}", "Quality per budget")


if __name__ == "__main__":
    main()
