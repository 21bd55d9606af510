"""The engine room of JAMBA.py's Mamba block on a CPU: selective_scan.cpp beside this file, compiled on first use, and
its kernels registered as torch ops.

selective_scan.cpp holds [Mamba] Algorithm 2 as one loop over time per block of channels (the selective scan,
forward and backward), the block's causal conv, and its recurrent step. It is compiled with the machine's C++
compiler and no torch headers, in seconds, into ~/.cache/jamba, and called through ctypes. The scan and the conv are
torch ops (torch.library.custom_op): each has a fake kernel, which gives torch.compile its outputs' shapes without
running it, and an autograd formula, so `torch.compile(model, fullgraph=True)` traces a Mamba block through them.

JAMBA.py loads this file the first time a Mamba block asks for it (JAMBA._fused_kernels) and uses its parallel scan
where it is missing or cannot be built. Letters as in JAMBA.py's glossary; D is d padded to whole blocks of LANES.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

LANES = 64      # channels per block: the lanes of the kernel's inner loops (any vector width divides it)
CHUNK = 32      # time steps per chunk: forward saves the state at each chunk's start, backward reruns a chunk
TYPES = {torch.float32: "f32", torch.float64: "f64"}      # the dtypes it is built for, and their suffix
SOURCE = Path(__file__).with_name("selective_scan.cpp")
_library = None


def load():
    """Compile (or find in the cache) and load the kernels; None once they are there, or why not (a str)."""
    global _library
    wanted = os.environ.get("CXX")
    compiler = shutil.which(wanted) if wanted else next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))),
                                                         None)
    if compiler is None:
        return f"the compiler CXX={wanted!r} was not found" if wanted else "no C++ compiler found (g++ or clang++)"
    path = _build(compiler)
    if isinstance(path, str):
        return path
    _library = ctypes.CDLL(str(path))
    for name in ("scan_forward", "scan_backward", "conv_forward", "conv_backward", "mamba_step"):
        for suffix in TYPES.values():
            getattr(_library, f"{name}_{suffix}").restype = None
    return None


def _build(compiler):
    """Compile SOURCE with compiler into the cache (atomically: a second process reuses or redoes it whole), keyed
    by the source, the compiler, the flags and the CPU; its path, or why it failed (a str)."""
    flags = ["-O3", "-fno-trapping-math", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", f"-DLANES={LANES}",
             f"-DCHUNK={CHUNK}"]
    cpu = platform.machine() + platform.processor()
    if Path("/proc/cpuinfo").is_file():                  # -march=native builds for this CPU's instruction set
        cpu += "".join(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith(("model name", "flags")))[:4096]
    source = SOURCE.read_text()
    key = hashlib.sha256("\n".join([source, compiler, *flags, cpu]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jamba"
    path = cache / f"selective_scan_{key}.so"
    if path.is_file():
        return path
    print(f"JAMBA: compiling the fused selective scan, once (about 2 s, with {compiler}; kept in {cache})",
          file=sys.stderr, flush=True)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / "selective_scan.so"
            # OpenMP for the threads and this CPU's vector instructions; failing that, one thread, then neither.
            for extra in (["-fopenmp", "-march=native"], ["-march=native"], []):
                result = subprocess.run([compiler, *flags, *extra, str(SOURCE), "-o", str(built)],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    os.replace(built, path)
                    return path
    except OSError as err:
        return f"it cannot be built in {cache} ({err})"
    error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip()[:200])
    return f"{compiler} could not compile it ({error})"


def _pointers(*tensors):
    """The tensors' memory as C pointers, None for a null one."""
    return [None if t is None else ctypes.c_void_p(t.data_ptr()) for t in tensors]


def _threads(b, l, d, n):
    """Threads for a kernel: torch's number, but no more than there are blocks, nor one per under 64k updates."""
    return ctypes.c_int(max(1, min(torch.get_num_threads(), b * d // LANES, b * l * d * n // 2 ** 16)))


# The ops take the kernels' layouts: u, delta, z and out (b, l, D), channels contiguous and D whole blocks of LANES;
# B, C (b, l, n); A (n, D); delta_bias, D_skip (D,); h0 and last (b, D, n); saved (b, chunks, n, D), the state at
# each chunk's start, which backward restarts from. Every op returns new tensors and changes none of its inputs.

@torch.library.custom_op("jamba::selective_scan", mutates_args=())
def _scan_op(u: torch.Tensor, delta: torch.Tensor, delta_bias: torch.Tensor, softplus: bool, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor, D_skip: torch.Tensor, z: Optional[torch.Tensor],
             h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (b, l, d), n = u.shape, A.shape[0]
    out, last, saved = _scan_op_fake(u, delta, delta_bias, softplus, A, B, C, D_skip, z, h0)
    getattr(_library, "scan_forward_" + TYPES[u.dtype])(
        *_pointers(u, delta, delta_bias), ctypes.c_int(softplus),
        *_pointers(A, B, C, D_skip, z, h0, out, last, saved), *map(ctypes.c_int64, (b, l, d, n)), _threads(b, l, d, n))
    return out, last, saved


@_scan_op.register_fake
def _scan_op_fake(u, delta, delta_bias, softplus, A, B, C, D_skip, z, h0):
    """The outputs, unfilled: their shapes for torch.compile's tracing, and the buffers the op fills."""
    (b, l, d), n = u.shape, A.shape[0]
    return torch.empty_like(u), torch.empty_like(h0), u.new_empty(b, -(-l // CHUNK), n, d)


@torch.library.custom_op("jamba::selective_scan_backward", mutates_args=())
def _scan_backward_op(u: torch.Tensor, delta: torch.Tensor, delta_bias: torch.Tensor, softplus: bool,
                      A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D_skip: torch.Tensor,
                      z: Optional[torch.Tensor], saved: torch.Tensor, grad_out: torch.Tensor,
                      grad_last: torch.Tensor) -> list[torch.Tensor]:
    (b, l, d), n = u.shape, A.shape[0]
    threads = _threads(b, l, d, n)
    grad_u, grad_delta, grad_z, grad_h0 = _scan_backward_op_fake(u, delta, delta_bias, softplus, A, B, C, D_skip, z,
                                                                 saved, grad_out, grad_last)[:4]
    # Sums over sequences (A, D, delta_bias) and over channels (B, C) are gathered per thread, then added here.
    sizes = [n * d, d, d, b * l * n, b * l * n]
    sums = u.new_zeros(threads.value, sum(sizes))
    getattr(_library, "scan_backward_" + TYPES[u.dtype])(
        *_pointers(u, delta, delta_bias), ctypes.c_int(softplus),
        *_pointers(A, B, C, D_skip, z, saved, grad_out, grad_last, grad_u, grad_delta, grad_z if z is not None
                   else None, grad_h0, sums), *map(ctypes.c_int64, (b, l, d, n)), threads)
    grad_A, grad_D, grad_delta_bias, grad_B, grad_C = (part.sum(0) for part in sums.split(sizes, dim=1))
    return [grad_u, grad_delta, grad_z, grad_h0, grad_A.view(n, d), grad_D, grad_delta_bias, grad_B.view(b, l, n),
            grad_C.view(b, l, n)]


@_scan_backward_op.register_fake
def _scan_backward_op_fake(u, delta, delta_bias, softplus, A, B, C, D_skip, z, saved, grad_out, grad_last):
    """The outputs, unfilled, as _scan_op_fake's (grad_z empty where there is no z)."""
    (b, l, d), n = u.shape, A.shape[0]
    return [torch.empty_like(u), torch.empty_like(u), torch.empty_like(u) if z is not None else u.new_empty(0),
            u.new_empty(b, d, n), torch.empty_like(A), torch.empty_like(D_skip), torch.empty_like(delta_bias),
            torch.empty_like(B), torch.empty_like(C)]


def _scan_setup(ctx, inputs, output):
    u, delta, delta_bias, softplus, A, B, C, D_skip, z, h0 = inputs
    ctx.save_for_backward(u, delta, delta_bias, A, B, C, D_skip, z, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.softplus = softplus


def _scan_backward(ctx, grad_out, grad_last, grad_saved):
    """Forward's chunks rerun from their saved states, then the adjoint recurrence backwards in time."""
    u, delta, delta_bias, A, B, C, D_skip, z, saved = ctx.saved_tensors
    (grad_u, grad_delta, grad_z, grad_h0, grad_A, grad_D, grad_delta_bias, grad_B,
     grad_C) = _scan_backward_op(u, delta, delta_bias, ctx.softplus, A, B, C, D_skip, z, saved,
                                 grad_out.contiguous(), grad_last.contiguous())
    return (grad_u, grad_delta, grad_delta_bias, None, grad_A, grad_B, grad_C, grad_D,
            None if z is None else grad_z, grad_h0)


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup)


@torch.library.custom_op("jamba::causal_conv", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv1d(x)): x and out (b, l, D); weight (k, D); bias (D,)."""
    (b, l, d), k = x.shape, weight.shape[0]
    out = torch.empty_like(x)
    getattr(_library, "conv_forward_" + TYPES[x.dtype])(*_pointers(x, weight, bias, out),
                                                        *map(ctypes.c_int64, (b, l, d, k)), _threads(b, l, d, k))
    return out


@_conv_op.register_fake
def _conv_op_fake(x, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op("jamba::causal_conv_backward", mutates_args=())
def _conv_backward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      grad_out: torch.Tensor) -> list[torch.Tensor]:
    (b, l, d), k = x.shape, weight.shape[0]
    threads = _threads(b, l, d, k)
    grad_x = torch.empty_like(x)
    grad_weight, grad_bias = x.new_zeros(threads.value, k, d), x.new_zeros(threads.value, d)   # per thread
    getattr(_library, "conv_backward_" + TYPES[x.dtype])(*_pointers(x, weight, bias, grad_out, grad_x, grad_weight,
                                                                    grad_bias), *map(ctypes.c_int64, (b, l, d, k)),
                                                         threads)
    return [grad_x, grad_weight.sum(0), grad_bias.sum(0)]


@_conv_backward_op.register_fake
def _conv_backward_op_fake(x, weight, bias, grad_out):
    return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)]


def _conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, grad_out):
    return tuple(_conv_backward_op(*ctx.saved_tensors, grad_out.contiguous()))


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def _pad_channels(x, pad, dim):
    """x with pad channels of zeros after its own along dim, contiguous."""
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim)
    return x.contiguous()


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """JAMBA.selective_scan_fused's work, its arguments checked: u, delta, z (b, d, l); A (d, n); B, C (b, n, l);
    D, delta_bias (d,); initial_state (b, d, n); D, z, delta_bias, initial_state possibly None -> out (b, d, l) in
    u's dtype, last state (b, d, n) in float32 or float64 (float32 for fp16 and bf16 inputs). (b, d, l) views of
    (b, l, d) tensors, as a Mamba block's are, cost no copy; the channels are padded with zeros to whole blocks,
    and autograd takes the padding off the gradients."""
    devices = {x.device.type for x in (u, delta, A, B, C, D, z, delta_bias, initial_state) if x is not None}
    if devices != {"cpu"}:
        raise ValueError(f"the fused selective scan runs on CPU tensors, got tensors on {sorted(devices)}: use "
                         "selective_scan_parallel (scan='parallel' or 'auto') there")
    (b, d, l), n = u.shape, A.shape[1]
    compute, pad = torch.promote_types(u.dtype, torch.float32), -d % LANES
    h0 = u.new_zeros(b, d, n, dtype=compute) if initial_state is None else initial_state.to(compute)
    delta_bias, D = (u.new_zeros(d, dtype=compute) if x is None else x.to(compute) for x in (delta_bias, D))
    u_, delta, z = (None if x is None else _pad_channels(x.to(compute).transpose(1, 2), pad, 2)
                    for x in (u, delta, z))                                          # (b, l, D)
    A = _pad_channels(A.to(compute), pad, 0).t().contiguous()                       # (n, D)
    delta_bias, D, h0 = _pad_channels(delta_bias, pad, 0), _pad_channels(D, pad, 0), _pad_channels(h0, pad, 1)
    B, C = (x.to(compute).transpose(1, 2).contiguous() for x in (B, C))              # (b, l, n)
    out, last, _ = _scan_op(u_, delta, delta_bias, bool(delta_softplus), A, B, C, D, z, h0)   # (b, l, D), (b, D, n)
    return out[..., :d].transpose(1, 2).to(u.dtype), last[:, :d]                    # (b, d, l), (b, d, n)


def causal_conv(x, weight, bias):
    """silu(causal depthwise conv1d(x)) of a Mamba block, in the layout the scan reads: x (b, l, d) -> (b, l, d);
    weight (d, k) and bias (d,) of its nn.Conv1d; computed in float32 or float64 (float32 for fp16 and bf16)."""
    d, compute = x.shape[2], torch.promote_types(x.dtype, torch.float32)
    pad = -d % LANES
    out = _conv_op(_pad_channels(x.to(compute), pad, 2), _pad_channels(weight.to(compute), pad, 0).t().contiguous(),
                   _pad_channels(bias.to(compute), pad, 0))                          # (b, l, D)
    return out[..., :d].to(x.dtype)


def mamba_step(block, xz, conv_state, ssm_state):
    """A MambaBlock's step() from in_proj's output xz (b, 2d) to out_proj's input y (b, d), in one call: the conv
    window, x_proj, the inner RMSNorms, dt_proj, softplus, the state update, C h, D and the gate. Inference only (no
    gradient flows through it), for float32 or float64 weights and states -> (y, new conv_state, new ssm_state)."""
    b, d, n = xz.shape[0], block.d_inner, block.d_state
    conv_state, ssm_state = conv_state.contiguous(), ssm_state.contiguous()
    norms = ((block.dt_layernorm.weight, block.b_layernorm.weight, block.c_layernorm.weight)
             if block.inner_layernorms else (None, None, None))
    eps = block.dt_layernorm.eps if block.inner_layernorms else 0.0
    new_conv_state, new_ssm_state, y = torch.empty_like(conv_state), torch.empty_like(ssm_state), xz.new_empty(b, d)
    getattr(_library, "mamba_step_" + TYPES[xz.dtype])(
        *_pointers(conv_state, xz, block.conv1d.weight, block.conv1d.bias, block.x_proj.weight, *norms,
                   block.dt_proj.weight, block.dt_proj.bias, block.A_log, block.D, ssm_state, new_conv_state,
                   new_ssm_state, y), *map(ctypes.c_int64, (b, d, n, block.dt_rank, block.d_conv)),
        ctypes.c_double(eps))
    return y, new_conv_state, new_ssm_state
