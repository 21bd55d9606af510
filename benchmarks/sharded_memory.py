"""What each rank holds when train_tiny.py trains under torchrun: DDP (each rank keeps everything) against FSDP
(--fsdp: each rank keeps 1/N of the weights, gradients and AdamW's moments).

    python benchmarks/sharded_memory.py            # 1, 2 and 4 CPU ranks, a model of ~40M parameters: md (~3 min)
    python benchmarks/sharded_memory.py --smoke    # a tiny model on 2 ranks, seconds: checks that it runs

For each number of ranks and each way, torchrun starts this script's worker on that many processes (gloo on the
CPU). The worker builds the hybrid (MMMMAMMM, d_model 512, float32) and wraps it as train_tiny.py does (its
shard_run for FSDP, DistributedDataParallel for DDP, the bare model for DDP on one rank), then takes a few AdamW
steps on random tokens, the whole batch split over the ranks. It counts, on rank 0, the bytes of what the rank
itself holds (local shards under FSDP): parameters, gradients (after a backward) and optimizer state (after a
step); its peak resident memory, which adds activations, buffers (DDP's gradient buckets), torch itself and the
gathered layers FSDP holds during a layer's forward and backward; and the tokens per second of the whole batch.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types

import torch
import torch.distributed as dist
from _common import machine, write_table
from torch.nn.parallel import DistributedDataParallel

import train_tiny
from JAMBA import Jamba

MODEL = {"vocab_size": 256, "d_model": 512, "num_mamba_layers": 7, "num_transformer_layers": 1, "nhead": 8,
         "dim_feedforward": 2048, "max_seq_length": 256}
TINY = {"vocab_size": 32, "d_model": 32, "num_mamba_layers": 1, "num_transformer_layers": 1, "nhead": 2,
        "dim_feedforward": 64, "max_seq_length": 32, "d_state": 4}


def local_bytes(tensors):
    """Bytes of these tensors that this rank holds: a DTensor's local shard, a tensor whole."""
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)


def worker(args):
    """One rank of a run: the figures of rank 0, written as JSON to --report."""
    dist.init_process_group("gloo")
    rank, world_size, device = dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    torch.manual_seed(0)
    settings = TINY if args.smoke else MODEL
    model = Jamba(**settings)
    optimizer = train_tiny.make_optimizer(model, 1e-4, 0.1)
    if args.way == "fsdp":
        run = types.SimpleNamespace(model=model, optimizer=optimizer,
                                    scaler=torch.amp.GradScaler("cpu", enabled=False),
                                    args=types.SimpleNamespace(lr=1e-4, weight_decay=0.1))
        train_tiny.shard_run(run, device, "float32", lambda *_: None)
        trained, optimizer = model, run.optimizer
    else:
        trained = DistributedDataParallel(model) if world_size > 1 else model
    batch, length = args.batch_size, args.length
    tokens = torch.randint(0, settings["vocab_size"], (batch, length + 1), generator=torch.Generator().manual_seed(0))
    share = tokens.view(world_size, batch // world_size, length + 1)[rank]
    figures, times = {}, []
    for step in range(args.steps + 1):                  # the first step warms up, untimed
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        trained(share[:, :-1], share[:, 1:])[1].backward()
        figures["gradients"] = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    figures["parameters"] = local_bytes(model.parameters())
    figures["optimizer"] = local_bytes(value for state in optimizer.state.values() for value in state.values()
                                       if isinstance(value, torch.Tensor) and value.dim() > 0)
    figures["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: KiB
    figures["tokens_per_second"] = batch * length / (sum(times[1:]) / args.steps)
    figures["parameter_count"] = sum(p.numel() for p in model.parameters())
    figures["threads"] = torch.get_num_threads()
    if rank == 0:
        with open(args.report, "w") as f:
            json.dump(figures, f)
    del trained, model, optimizer
    dist.destroy_process_group()


def measure(way, ranks, args):
    """The figures of rank 0 of a torchrun of the worker."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   __file__, "--worker", "--way", way, "--report", report, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--length", str(args.length)] + ["--smoke"] * args.smoke
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{way} on {ranks} ranks failed:\n{result.stderr[-3000:]}")
        with open(report) as f:
            return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, over all ranks")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="a tiny model on 2 ranks, 1 step, no files written")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--way", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.ranks, args.steps, args.batch_size, args.length = [2], 1, 4, 16
    print(f"per-rank memory of training, DDP and FSDP, float32, CPU (gloo); {machine()}", flush=True)
    rows, ddp = [], {}
    for ranks in args.ranks:
        for way in ("ddp", "fsdp"):
            f = measure(way, ranks, args)
            state = f["parameters"] + f["gradients"] + f["optimizer"]
            ddp.setdefault(ranks, state)
            rows.append([ranks, way.upper(), f"{f['parameter_count'] / 1e6:.1f}M", f"{f['parameters'] / 2**20:.0f}",
                         f"{f['gradients'] / 2**20:.0f}", f"{f['optimizer'] / 2**20:.0f}", f"{state / 2**20:.0f}",
                         f"{state / ddp[ranks]:.3f}", f"{1 / ranks:.3f}", f"{f['peak_rss'] / 2**20:.0f}",
                         f"{f['tokens_per_second']:,.0f}", f["threads"]])
            print(" | ".join(str(cell) for cell in rows[-1]), flush=True)
    header = ["ranks", "way", "model", "parameters MiB", "gradients MiB", "AdamW state MiB", "state MiB",
              "state / DDP's", "1 / ranks", "peak resident MiB", "tokens/s", "threads per rank"]
    if not args.smoke:
        write_table("sharded_memory", f"What rank 0 holds training the hybrid (MMMMAMMM, d_model {MODEL['d_model']}) "
                    f"under torchrun, float32, CPU (gloo): batch {args.batch_size} x {args.length} over the ranks, "
                    f"{args.steps} steps after a warm-up", header, rows)


if __name__ == "__main__":
    main()
