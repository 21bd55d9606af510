"""Speed and memory of the three selective scans against sequence length, and the fused kernel against its floor.

    python benchmarks/scan_speed.py            # b=4, d=256, n=16, float32, l = 64 ... 4096, and two sizes: md and png
    python benchmarks/scan_speed.py --smoke    # tiny sizes, seconds: checks that the script still runs

Times are the whole selective scan (discretisation, scan, C contraction, D skip, z gate), forward and forward +
backward, median of --repeats runs, the three scans timed side by side in one fresh process per length. Peak memory
is how far one forward + backward raises the resident set above the inputs, in a fresh process per cell (Linux
only). The inputs are laid out as the Mamba block makes them: (b, d, l) views of (b, l, d) tensors.
The floor is what the arithmetic alone costs here: one exp, a multiply and an add per element of (b, l, d, n), by
torch over a block that stays in cache, as often as the scan has elements; forward + backward is twice that (the
fused backward recomputes exp(delta A) once).
"""

import argparse
import json
import subprocess
import sys

import torch
from _common import HERE, machine, median_ms, pyplot, save_figure, write_table

from JAMBA import (
    selective_scan_fused,
    selective_scan_parallel,
    selective_scan_sequential,
)

SCANS = {"sequential": selective_scan_sequential, "parallel": selective_scan_parallel, "fused": selective_scan_fused}
# train_tiny.py's Mamba layers (batch 16 x context 128, d_model 128, expand 1, d_state 8) and a wider, longer one.
SIZES = {"train_tiny.py's sizes": (16, 128, 8, 128), "b=4 d=256 n=16 l=1024": (4, 256, 16, 1024)}


def inputs(b, d, n, l):
    g = torch.Generator().manual_seed(0)

    def channels_last(*shape):                       # (b, x, l) as a view of a (b, l, x) tensor
        return torch.randn(shape[0], shape[2], shape[1], generator=g).transpose(1, 2)
    return {"u": channels_last(b, d, l), "delta": channels_last(b, d, l), "A": -torch.rand(d, n, generator=g),
            "B": channels_last(b, n, l), "C": channels_last(b, n, l), "D": torch.randn(d, generator=g),
            "z": channels_last(b, d, l), "delta_bias": torch.randn(d, generator=g)}


def forward_backward(scan, x):
    x = {k: v.detach().requires_grad_() for k, v in x.items()}
    scan(**x, delta_softplus=True).sum().backward()


def floor_ms(elements, repeats):
    """Milliseconds for one exp, one multiply and one add on `elements` numbers, 1 MB at a time (in cache)."""
    block = 2 ** 18
    a, w, out = torch.rand(block), torch.rand(block), torch.empty(block)

    def run():
        for _ in range(-(-elements // block)):
            torch.exp(a, out=out)
            out.mul_(w).add_(a)
    return median_ms(run, repeats)


MEASURE_PEAK = """
import scan_speed as s
status = lambda field: next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field))
x = {k: v.requires_grad_() for k, v in s.inputs(*ARGS).items()}
s.forward_backward(s.SCANS[NAME], s.inputs(2, 8, 4, 8))   # the fused kernel's one-time load, outside the peak
open('/proc/self/clear_refs', 'w').write('5')   # reset this process's peak resident set (VmHWM) to now
before = status('VmRSS:')
s.SCANS[NAME](**x, delta_softplus=True).sum().backward()
print((status('VmHWM:') - before) / 1024)
"""


def peak_memory_mb(scan_name, b, d, n, l):
    """How far one forward + backward raises the resident set above what the inputs already hold (MB), measured in
    a fresh process (Linux /proc) so that nothing the benchmark did before counts."""
    code = MEASURE_PEAK.replace("ARGS", repr((b, d, n, l))).replace("NAME", repr(scan_name))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=HERE)
    return float(out.stdout.strip())


def time_scans(b, d, n, l, repeats, names=tuple(SCANS)):
    """Median forward and forward + backward times of the scans, side by side in this one process."""
    x = inputs(b, d, n, l)
    row = {"l": l}
    for name in names:
        with torch.no_grad():
            row[f"{name}_fwd"] = median_ms(lambda scan=SCANS[name]: scan(**x, delta_softplus=True), repeats)
        row[f"{name}_fwdbwd"] = median_ms(lambda scan=SCANS[name]: forward_backward(scan, x), repeats)
    row["floor"] = floor_ms(b * l * d * n, repeats)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat, no files written")
    p.add_argument("--time-one", type=int, nargs=4, metavar=("B", "D", "N", "L"), help=argparse.SUPPRESS)
    args = p.parse_args()
    b, d, n = (2, 8, 4) if args.smoke else (4, 256, 16)
    lengths, repeats = ([33] if args.smoke else args.lengths), (1 if args.smoke else args.repeats)
    if args.time_one:                                # one size, in a child process
        print(json.dumps(time_scans(*args.time_one, repeats)))
        return

    def timed(b, d, n, l):
        # Each size in a fresh process, so that what the allocator kept from other sizes does not count.
        command = [sys.executable, __file__, "--time-one", str(b), str(d), str(n), str(l), "--repeats", str(repeats)]
        return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    print(f"selective scan, float32 on CPU; {machine()}")
    size_rows = []
    for name, (sb, sd, sn, sl) in ({"smoke": (2, 8, 4, 8)} if args.smoke else SIZES).items():
        r = timed(sb, sd, sn, sl)
        size_rows.append([name, f"{r['parallel_fwd']:.2f}", f"{r['fused_fwd']:.2f}",
                          f"{r['parallel_fwd'] / r['fused_fwd']:.1f}x", f"{r['parallel_fwdbwd']:.2f}",
                          f"{r['fused_fwdbwd']:.2f}", f"{r['parallel_fwdbwd'] / r['fused_fwdbwd']:.1f}x",
                          f"{2 * r['floor']:.2f}", f"{r['fused_fwdbwd'] / (2 * r['floor']):.1f}x"])
        print(" | ".join(size_rows[-1]), flush=True)
    results = []
    for l in lengths:
        row = timed(b, d, n, l)
        for name in SCANS:
            row[f"{name}_mb"] = peak_memory_mb(name, b, d, n, l)
        results.append(row)
        print(json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)
    if args.smoke:
        return
    write_table("scan_speed_sizes", f"Parallel and fused selective scans at two sizes, float32, CPU, median of "
                f"{repeats} runs", ["size", "parallel fwd ms", "fused fwd ms", "fwd speed-up", "parallel fwd+bwd ms",
                                    "fused fwd+bwd ms", "fwd+bwd speed-up", "floor fwd+bwd ms",
                                    "fused fwd+bwd / floor"], size_rows)
    header = ["l"] + [f"{name} {what} ms" for what in ("fwd", "fwd+bwd") for name in SCANS] + \
        [f"{name} peak MB" for name in SCANS]
    rows = [[r["l"]] + [f"{r[f'{name}_{what}']:.1f}" for what in ("fwd", "fwdbwd") for name in SCANS]
            + [f"{r[f'{name}_mb']:.0f}" for name in SCANS] for r in results]
    write_table("scan_speed", f"Selective scans, b={b} d={d} n={n}, float32, CPU, median of {repeats} runs",
                header, rows)
    plt = pyplot()
    if plt is None:
        return
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in (("sequential", "o-"), ("parallel", "s-"), ("fused", "^-")):
        ax_time.loglog(lengths, [r[f"{name}_fwd"] for r in results], style, label=f"{name} forward", alpha=0.6)
        ax_time.loglog(lengths, [r[f"{name}_fwdbwd"] for r in results], style, label=f"{name} fwd+bwd", lw=2)
        ax_mem.loglog(lengths, [r[f"{name}_mb"] for r in results], style, label=name)
    ax_time.loglog(lengths, [2 * r["floor"] for r in results], "k:", label="floor, fwd+bwd")
    ax_time.set(xlabel="sequence length l", ylabel="milliseconds (median)", title="time")
    ax_mem.set(xlabel="sequence length l", ylabel="MB", title="peak memory of forward + backward")
    save_figure(fig, (ax_time, ax_mem), "scan_speed", f"Selective scans, b={b} d={d} n={n} float32")


if __name__ == "__main__":
    main()
