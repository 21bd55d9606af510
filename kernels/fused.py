"""The engine room of JAMBA.py's Mamba block on a CPU: selective_scan.cpp beside this file, compiled on first use, and
its kernels registered as torch ops.

selective_scan.cpp holds [Mamba] Algorithm 2 as one loop over time per block of channels (the selective scan,
forward and backward), the block's causal conv, and a whole model's recurrent step. It is compiled with the
machine's C++ compiler and no torch headers, in seconds, into ~/.cache/jamba, and called through ctypes. The scan
and the conv are torch ops (torch.library.custom_op): each has a fake kernel, which gives torch.compile its outputs'
shapes without running it, and an autograd formula, so `torch.compile(model, fullgraph=True)` traces a Mamba block
through them.

JAMBA.py loads this file the first time a Mamba block asks for it (JAMBA._fused) and uses its parallel scan
where it is missing or cannot be built; Jamba.step goes through model_step where JAMBA._fusable says it helps.
Letters as in JAMBA.py's glossary; D is d padded to whole blocks of LANES.
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

import torch
import torch.nn.functional as F

LANES = 64      # channels per block: the lanes of the kernel's inner loops (any vector width divides it)
CHUNK = 32      # time steps per chunk: forward saves the state at each chunk's start, backward reruns a chunk
TYPES = {torch.float32: "f32", torch.float64: "f64"}      # the dtypes it is built for, and their suffix
# The settings model_step takes from a JambaConfig, in order (num_key_value_heads None: nhead)
CONFIG = ("d_model vocab_size d_state d_conv expand dim_feedforward nhead num_key_value_heads num_experts "  # noqa: SIM905
          "num_experts_per_tok max_seq_length").split()
SOURCE = Path(__file__).with_name("selective_scan.cpp")
_library = None


def load():
    """Compile (or find in the cache) and load the kernels; None once they are there, or why not (a str)."""
    global _library
    wanted = os.environ.get("CXX", "c++")
    compiler = shutil.which(wanted)
    path = _build(compiler) if compiler else f"the compiler CXX={wanted!r} was not found"
    if isinstance(path, str):
        return path
    _library = ctypes.CDLL(str(path))


def _build(compiler):
    """Compile SOURCE with compiler into the cache (atomically: a second process reuses or redoes it whole),
    keyed by the source, the compiler, the flags and the CPU; its path, or why it failed (a str)."""
    flags = ["-O3", "-fno-trapping-math", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC",
             f"-DLANES={LANES}", f"-DCHUNK={CHUNK}"]
    info = Path("/proc/cpuinfo")                # the CPU's instructions, for which -march=native builds
    cpu = [platform.machine(), info.read_text().partition("\nflags")[2].partition("\n")[0] if info.is_file() else ""]
    key = hashlib.sha256(repr([SOURCE.read_text(), compiler, flags, cpu]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jamba"
    path = cache / f"selective_scan_{key}.so"
    if path.is_file():
        return path
    print(f"JAMBA: compiling the fused selective scan, once (about 2 s, with {compiler}; kept in {cache})",
          file=sys.stderr, flush=True)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            # OpenMP for the threads and this CPU's vector instructions; failing that, one thread, then neither.
            for extra in (["-fopenmp", "-march=native"], ["-march=native"], []):
                result = subprocess.run([compiler, *flags, *extra, str(SOURCE), "-o", f"{tmp}/built.so"],
                                        capture_output=True, text=True, check=False)
                if result.returncode == 0:
                    return Path(shutil.move(f"{tmp}/built.so", path))
    except OSError as err:
        return f"it cannot be built in {cache} ({err})"
    return f"{compiler} could not compile it ({result.stderr.strip()[:300]})"


def _call(kernel, *args):
    """kernel_f32 or kernel_f64 (by the first argument's dtype) on args as C types: a tensor's memory, an int
    or a bool as int64, a list of tensors as an array of their memory (a ctypes value as it is), None as a null
    pointer."""
    getattr(_library, f"{kernel}_{TYPES[args[0].dtype]}")(*(
        ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int64(a) if isinstance(a, int)
        else (ctypes.c_void_p * len(a))(*(t.data_ptr() for t in a)) if isinstance(a, list) else a for a in args))


def _threads(b, l, d, n):
    """Threads for a kernel: torch's number, but no more than there are blocks, nor one per under 64k updates."""
    return ctypes.c_int(max(1, min(torch.get_num_threads(), b * d // LANES, b * l * d * n // 2 ** 16)))


# The ops take the kernels' layouts: u, delta, z and out (b, l, D), channels contiguous and D whole blocks of
# LANES; B, C (b, l, n); A (n, D); delta_bias, D_skip (D,); h0 and last (b, D, n); saved (b, chunks, n, D), the
# state at each chunk's start, which backward restarts from. Every op returns new tensors, its inputs unchanged.

torch.library.define("jamba::selective_scan", "(Tensor u, Tensor delta, Tensor delta_bias, bool softplus, "
                     "Tensor A, Tensor B, Tensor C, Tensor D_skip, Tensor? z, Tensor h0) -> (Tensor, Tensor, Tensor)")
torch.library.define("jamba::selective_scan_backward", "(Tensor u, Tensor delta, Tensor delta_bias, bool softplus, "
                     "Tensor A, Tensor B, Tensor C, Tensor D_skip, Tensor? z, Tensor saved, Tensor grad_out, "
                     "Tensor grad_last) -> Tensor[]")
torch.library.define("jamba::causal_conv", "(Tensor x, Tensor weight, Tensor bias) -> Tensor")
torch.library.define("jamba::causal_conv_backward", "(Tensor x, Tensor weight, Tensor bias, Tensor grad_out) "
                     "-> Tensor[]")


@torch.library.impl("jamba::selective_scan", "cpu")
def _scan_op(u, delta, delta_bias, softplus, A, B, C, D_skip, z, h0):
    (b, l, d), n = u.shape, A.shape[0]
    out, last, saved = _scan_op_fake(u, delta, delta_bias, softplus, A, B, C, D_skip, z, h0)
    _call("scan_forward", u, delta, delta_bias, softplus, A, B, C, D_skip, z, h0, out, last, saved, b, l, d, n,
          _threads(b, l, d, n))
    return out, last, saved


@torch.library.register_fake("jamba::selective_scan")
def _scan_op_fake(u, delta, delta_bias, softplus, A, B, C, D_skip, z, h0):
    """The outputs, unfilled: their shapes for torch.compile's tracing, and the buffers the op fills."""
    (b, l, d), n = u.shape, A.shape[0]
    return torch.empty_like(u), torch.empty_like(h0), u.new_empty(b, -(-l // CHUNK), n, d)


@torch.library.impl("jamba::selective_scan_backward", "cpu")
def _scan_backward_op(u, delta, delta_bias, softplus, A, B, C, D_skip, z, saved, grad_out, grad_last):
    (b, l, d), n = u.shape, A.shape[0]
    threads = _threads(b, l, d, n)
    grad_u, grad_delta, grad_z, grad_h0 = _scan_backward_op_fake(u, delta, delta_bias, softplus, A, B, C,
                                                                 D_skip, z, saved, grad_out, grad_last)[:4]
    # Sums over sequences (A, D, delta_bias) and over channels (B, C) are gathered per thread, then added here.
    sizes = [n * d, d, d, b * l * n, b * l * n]
    sums = u.new_zeros(threads.value, sum(sizes))
    _call("scan_backward", u, delta, delta_bias, softplus, A, B, C, D_skip, z, saved, grad_out, grad_last,
          grad_u, grad_delta, grad_z if z is not None else None, grad_h0, sums, b, l, d, n, threads)
    grad_A, grad_D, grad_delta_bias, grad_B, grad_C = (part.sum(0) for part in sums.split(sizes, dim=1))
    return [grad_u, grad_delta, grad_z, grad_h0, grad_A.view(n, d), grad_D, grad_delta_bias,
            grad_B.view(b, l, n), grad_C.view(b, l, n)]


@torch.library.register_fake("jamba::selective_scan_backward")
def _scan_backward_op_fake(u, delta, delta_bias, softplus, A, B, C, D_skip, z, saved, grad_out, grad_last):
    """The outputs, unfilled, as _scan_op_fake's (grad_z empty where there is no z)."""
    return [*map(torch.empty_like, (u, u, u if z is not None else u[:0])), u.new_empty(u.shape[0], *A.shape[::-1]),
            *map(torch.empty_like, (A, D_skip, delta_bias, B, C))]


def _scan_setup(ctx, inputs, output):
    u, delta, delta_bias, softplus, A, B, C, D_skip, z, _ = inputs
    ctx.save_for_backward(u, delta, delta_bias, A, B, C, D_skip, z, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.softplus = softplus


def _scan_backward(ctx, grad_out, grad_last, grad_saved):
    """Forward's chunks rerun from their saved states, then the adjoint recurrence backwards in time."""
    u, delta, delta_bias, A, B, C, D_skip, z, saved = ctx.saved_tensors
    (grad_u, grad_delta, grad_z, grad_h0, grad_A, grad_D, grad_delta_bias, grad_B,
     grad_C) = torch.ops.jamba.selective_scan_backward(u, delta, delta_bias, ctx.softplus, A, B, C, D_skip, z,
                                                       saved, grad_out.contiguous(), grad_last.contiguous())
    return (grad_u, grad_delta, grad_delta_bias, None, grad_A, grad_B, grad_C, grad_D,
            None if z is None else grad_z, grad_h0)


torch.library.register_autograd("jamba::selective_scan", _scan_backward, setup_context=_scan_setup)


@torch.library.impl("jamba::causal_conv", "cpu")
def _conv_op(x, weight, bias):
    """silu(causal depthwise conv1d(x)): x and out (b, l, D); weight (k, D); bias (D,)."""
    (b, l, d), k = x.shape, weight.shape[0]
    out = torch.empty_like(x)
    _call("conv_forward", x, weight, bias, out, b, l, d, k, _threads(b, l, d, k))
    return out


@torch.library.register_fake("jamba::causal_conv")
def _conv_op_fake(x, weight, bias):
    return torch.empty_like(x)


@torch.library.impl("jamba::causal_conv_backward", "cpu")
def _conv_backward_op(x, weight, bias, grad_out):
    (b, l, d), k = x.shape, weight.shape[0]
    threads = _threads(b, l, d, k)
    grad_x = torch.empty_like(x)
    grad_weight, grad_bias = x.new_zeros(threads.value, k, d), x.new_zeros(threads.value, d)   # per thread
    _call("conv_backward", x, weight, bias, grad_out, grad_x, grad_weight, grad_bias, b, l, d, k, threads)
    return [grad_x, grad_weight.sum(0), grad_bias.sum(0)]


@torch.library.register_fake("jamba::causal_conv_backward")
def _conv_backward_op_fake(x, weight, bias, grad_out):
    return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)]


def _conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, grad_out):
    return tuple(torch.ops.jamba.causal_conv_backward(*ctx.saved_tensors, grad_out.contiguous()))


torch.library.register_autograd("jamba::causal_conv", _conv_backward, setup_context=_conv_setup)


def _padded(x, dtype):
    """x (..., d) in dtype, with zero channels after its own up to whole blocks of LANES, contiguous."""
    pad = -x.shape[-1] % LANES
    return (F.pad(x.to(dtype), (0, pad)) if pad else x.to(dtype)).contiguous()


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """JAMBA.selective_scan_fused's work, its arguments checked: u, delta, z (b, d, l); A (d, n); B, C (b, n, l);
    D, delta_bias (d,); initial_state (b, d, n); D, z, delta_bias, initial_state possibly None -> out (b, d, l)
    in u's dtype, last state (b, d, n) in float32 or float64 (float32 for fp16 and bf16 inputs). The channels
    are padded with zeros to whole blocks, and autograd takes the padding off the gradients."""
    devices = {x.device.type for x in (u, delta, A, B, C, D, z, delta_bias, initial_state) if x is not None}
    if devices != {"cpu"}:
        raise ValueError(f"the fused selective scan runs on CPU tensors, got tensors on {sorted(devices)}: use "
                         "selective_scan_parallel (scan='parallel' or 'auto') there")
    (b, d, _), n = u.shape, A.shape[1]
    compute, zeros = torch.promote_types(u.dtype, torch.float32), u.new_zeros(d)
    h0 = u.new_zeros(b, d, n) if initial_state is None else initial_state
    out, last, _ = torch.ops.jamba.selective_scan(_padded(u.mT, compute), _padded(delta.mT, compute),              # (b, l, D)
                            _padded(zeros if delta_bias is None else delta_bias, compute), bool(delta_softplus),
                            _padded(A.t(), compute), B.to(compute).mT.contiguous(), C.to(compute).mT.contiguous(),
                            _padded(zeros if D is None else D, compute), None if z is None else
                            _padded(z.mT, compute), _padded(h0.mT, compute).mT.contiguous())
    return out[..., :d].mT.to(u.dtype), last[:, :d]                                 # (b, d, l), (b, d, n)


def causal_conv(x, weight, bias):
    """silu(causal depthwise conv1d(x)) of a Mamba block, in the layout the scan reads: x (b, l, d) -> (b, l, d);
    weight (d, k) and bias (d,) of its nn.Conv1d; computed in float32 or float64 (float32 for fp16 and bf16)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    out = torch.ops.jamba.causal_conv(_padded(x, compute), _padded(weight.t(), compute), _padded(bias, compute))   # (b, l, D)
    return out[..., :x.shape[2]].to(x.dtype)


def model_step(model, x, states, return_hidden):
    """Jamba.step after the embedding, in one call: every layer's norms, mixer, residuals and feed-forward, the
    final norm and the head, the arithmetic of the torch step. Inference only, everything of x's dtype (float32 or
    float64): x (b, m) -> (logits (b, v), or the final hidden states (b, m) with return_hidden; the new states)."""
    states, tensors, cache = list(states), [], []
    for i, s in enumerate(states):
        if model.layer_pattern[i] == "M":       # copies, which the kernel steps in place
            states[i] = s = tuple(t.clone(memory_format=torch.contiguous_format) for t in s)
        else:       # the cache with a slot for this token's key and value, marked a token, which the kernel fills
            states[i] = s = model.layers[i].mixer._append(s, s.keys[:, :, :1], s.values[:, :, :1],
                                                          s.next_position >= 0, s.next_position + 1)
            cache += s.length, s.keys.shape[2]
        tensors += filter(torch.is_tensor, s)
    # the parameters in model.parameters()'s order, a tied head's again (model.parameters() costs more)
    weights = [p for module in model.modules() for p in module._parameters.values() if p is not None]
    c = model.config
    if {(w.dtype, w.device) for w in weights} != {(x.dtype, x.device)}:
        raise TypeError(f"the model's parameters must all be of x's dtype and device, {x.dtype} on {x.device}")
    out = x.new_empty(len(x), c.d_model if return_hidden else c.vocab_size)
    _call("model_step", x.contiguous(), out, weights, tensors, torch.tensor(cache),
          (model.layer_pattern + model.mlp_pattern).encode(), len(x), *(getattr(c, name) or c.nhead for name in
          CONFIG), max(getattr(layer.mixer, "dt_rank", 0) for layer in model.layers), c.rotary, return_hidden,
          ctypes.c_double(c.rms_norm_eps), torch.get_num_threads())
    return out, states
