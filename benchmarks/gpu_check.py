"""A short check of the CUDA path, for a machine with a GPU (about a minute):

    python benchmarks/gpu_check.py

On a CUDA device: the parallel scan equals the sequential one there (float32, outputs, last state and gradients;
bf16 inputs close to float32), train_tiny.py trains for 100 steps with bf16 autocast (float16 with its gradient
scaler where the GPU has no bf16) and generates, and the scan's times and the training tokens/s are printed. On
a machine without CUDA it says so and exits 0. The fused kernel is for CPUs; on a GPU scan="auto" is the parallel
scan, whose channel blocks there are sized by free memory. Exit status 1 if a check fails.
"""

import statistics
import sys
import tempfile
import time

import torch
from _common import machine  # first: it puts the repository on sys.path

import train_tiny
from JAMBA import selective_scan_parallel, selective_scan_sequential


def scan_inputs(b, d, n, l, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = {"u": torch.randn(b, d, l, generator=g), "delta": torch.rand(b, d, l, generator=g),
         "A": -torch.rand(d, n, generator=g) * 3, "B": torch.randn(b, n, l, generator=g),
         "C": torch.randn(b, n, l, generator=g), "D": torch.randn(d, generator=g), "z": torch.randn(b, d, l, generator=g),
         "delta_bias": torch.rand(d, generator=g), "initial_state": torch.randn(b, d, n, generator=g)}
    return {k: v.to(device, dtype).requires_grad_() for k, v in x.items()}


def outputs_and_grads(scan, x):
    out, last = scan(**x, delta_softplus=True, return_last_state=True)
    grads = torch.autograd.grad(out.float().sin().sum() + last.float().cos().sum(), list(x.values()))
    return [out.float(), last.float(), *[g.float() for g in grads]]


def relative_error(actual, expected):
    return max(((a - e).abs().max() / e.abs().max().clamp(min=1e-30)).item() for a, e in zip(actual, expected))


def scan_ms(x, repeats=10):
    def run():
        inputs = {k: v.detach().requires_grad_() for k, v in x.items()}
        selective_scan_parallel(**inputs, delta_softplus=True).sum().backward()
    run()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    print(f"CUDA check; {machine()}")
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (the CPU path is what the test suite checks)")
        return 0
    device = torch.device("cuda")
    bf16 = torch.cuda.is_bf16_supported()
    print(f"device: {torch.cuda.get_device_name(device)}, bf16 {'supported' if bf16 else 'not supported'}")
    failures = []
    x = scan_inputs(2, 64, 16, 300, device)
    expected = outputs_and_grads(selective_scan_sequential, x)
    error = relative_error(outputs_and_grads(selective_scan_parallel, x), expected)
    print(f"parallel = sequential on CUDA, float32, outputs and every gradient: max relative error {error:.1e}")
    failures += [] if error < 1e-4 else ["float32 scans differ"]
    low = {k: v.detach().bfloat16().requires_grad_() for k, v in x.items()}
    error = relative_error(outputs_and_grads(selective_scan_parallel, low)[:2], expected[:2])
    print(f"bf16 inputs against float32: max relative error {error:.1e} (computed in float32 inside)")
    failures += [] if error < 3e-2 else ["bf16 scan too far from float32"]
    for b, d, n, l in [(16, 128, 8, 128), (4, 256, 16, 1024), (8, 2048, 16, 2048)]:
        print(f"parallel scan forward + backward at b={b} d={d} n={n} l={l}: "
              f"{scan_ms(scan_inputs(b, d, n, l, device)):.2f} ms")
    dtype = "bfloat16" if bf16 else "float16"
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        status = train_tiny.main(["--device", "cuda", "--dtype", dtype, "--out", out, "--max-iters", "100",
                                  "--eval-interval", "50", "--eval-iters", "5", "--max-new-tokens", "200"])
        print(f"train_tiny.py, 100 steps with {dtype} autocast and a sample: exit status {status}, "
              f"{time.perf_counter() - start:.0f} s")
    failures += [] if status == 0 else ["train_tiny.py failed"]
    print("all checks passed" if not failures else f"FAILED: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
