"""Speed and memory of the two selective scans against sequence length.

    python benchmarks/scan_speed.py            # b=4, d=256, n=16, float32, l = 64 ... 4096: table, md and png
    python benchmarks/scan_speed.py --smoke    # tiny sizes, seconds: checks that the script still runs

Times are the whole selective scan (discretisation, scan, C contraction, D skip, z gate), forward and forward +
backward, median of --repeats runs, both scans timed side by side in one fresh process per length. Peak memory is
how far one forward + backward raises the resident set above the inputs, in a fresh process per cell (Linux only).
"""

import argparse
import json
import subprocess
import sys

import torch

from _common import HERE, machine, median_ms, pyplot, save_figure, write_table
from JAMBA import selective_scan_parallel, selective_scan_sequential

SCANS = {"sequential": selective_scan_sequential, "parallel": selective_scan_parallel}


def inputs(b, d, n, l):
    g = torch.Generator().manual_seed(0)
    return dict(u=torch.randn(b, d, l, generator=g), delta=torch.randn(b, d, l, generator=g),
                A=-torch.rand(d, n, generator=g), B=torch.randn(b, n, l, generator=g),
                C=torch.randn(b, n, l, generator=g), D=torch.randn(d, generator=g),
                z=torch.randn(b, d, l, generator=g), delta_bias=torch.randn(d, generator=g))


def forward_backward(scan, x):
    x = {k: v.detach().requires_grad_() for k, v in x.items()}
    scan(**x, delta_softplus=True).sum().backward()


MEASURE_PEAK = """
import scan_speed as s
status = lambda field: next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field))
x = {k: v.requires_grad_() for k, v in s.inputs(*ARGS).items()}
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


def time_both_scans(b, d, n, l, repeats):
    """Median forward and forward + backward times of both scans, side by side in this one process."""
    x = inputs(b, d, n, l)
    row = {"l": l}
    for name, scan in SCANS.items():
        with torch.no_grad():
            row[f"{name}_fwd"] = median_ms(lambda: scan(**x, delta_softplus=True), repeats)
        row[f"{name}_fwdbwd"] = median_ms(lambda: forward_backward(scan, x), repeats)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat, no files written")
    p.add_argument("--time-one", type=int, metavar="L", help=argparse.SUPPRESS)   # one length, in a child process
    args = p.parse_args()
    b, d, n = (2, 8, 4) if args.smoke else (4, 256, 16)
    lengths, repeats = ([8, 33] if args.smoke else args.lengths), (1 if args.smoke else args.repeats)
    if args.time_one:
        print(json.dumps(time_both_scans(b, d, n, args.time_one, repeats)))
        return
    print(f"selective scan, b={b} d={d} n={n} float32 on CPU; {machine()}")
    results = []
    for l in lengths:
        # Each length in a fresh process, so that what the allocator kept from other sizes does not count.
        command = [sys.executable, __file__, "--time-one", str(l), "--repeats", str(repeats)]
        row = json.loads(subprocess.run(command + (["--smoke"] if args.smoke else []), capture_output=True,
                                        text=True, check=True).stdout)
        for name in SCANS:
            row[f"{name}_mb"] = peak_memory_mb(name, b, d, n, l)
        results.append(row)
        print(json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)
    if args.smoke:
        return
    header = ["l", "sequential fwd ms", "parallel fwd ms", "fwd ratio", "sequential fwd+bwd ms",
              "parallel fwd+bwd ms", "fwd+bwd ratio", "sequential peak MB", "parallel peak MB"]
    rows = [[r["l"], f"{r['sequential_fwd']:.1f}", f"{r['parallel_fwd']:.1f}",
             f"{r['sequential_fwd'] / r['parallel_fwd']:.1f}x", f"{r['sequential_fwdbwd']:.1f}",
             f"{r['parallel_fwdbwd']:.1f}", f"{r['sequential_fwdbwd'] / r['parallel_fwdbwd']:.1f}x",
             f"{r['sequential_mb']:.0f}", f"{r['parallel_mb']:.0f}"] for r in results]
    write_table("scan_speed", f"Selective scan, b={b} d={d} n={n}, float32, CPU, median of {repeats} runs",
                header, rows)
    plt = pyplot()
    if plt is None:
        return
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in (("sequential", "o-"), ("parallel", "s-")):
        ax_time.loglog(lengths, [r[f"{name}_fwd"] for r in results], style, label=f"{name} forward", alpha=0.6)
        ax_time.loglog(lengths, [r[f"{name}_fwdbwd"] for r in results], style, label=f"{name} fwd+bwd", lw=2)
        ax_mem.loglog(lengths, [r[f"{name}_mb"] for r in results], style, label=name)
    ax_time.set(xlabel="sequence length l", ylabel="milliseconds (median)", title="time")
    ax_mem.set(xlabel="sequence length l", ylabel="MB", title="peak memory of forward + backward")
    save_figure(fig, (ax_time, ax_mem), "scan_speed", f"Selective scan, b={b} d={d} n={n} float32")


if __name__ == "__main__":
    main()
