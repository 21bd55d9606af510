"""
JAMBA: a minimal, single-file PyTorch implementation of the Jamba hybrid Mamba-Transformer language model.

References, open them beside this file:
  [Mamba] Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752.
  [Jamba] Lieber et al., "Jamba: A Hybrid Transformer-Mamba Language Model", arXiv 2403.19887.
  The Mamba reference code (state-spaces/mamba): selective_scan_ref and mamba_simple.Mamba, whose argument
  layouts, parameter names and initialisation are matched here so that a reference layer's weights load as they are.
  The public Jamba code (transformers' JambaForCausalLM): its configuration names are kept, and
  Jamba.from_pretrained loads its checkpoints; test_jamba.py checks the logits against it.

Reading order (each piece depends only on those above it):
  selective scans (sequential, parallel, fused) -> MambaBlock -> AttentionBlock -> MLP, then MixtureOfExperts
  -> layer plan and JambaConfig -> Jamba model -> generation -> loading a released checkpoint.

Glossary: the letters used in every shape comment.
  b  batch size                     l  sequence length (time)
  m  d_model, the residual width    d  channels of the SSM (d_inner = expand * d_model inside a Mamba block)
  n  d_state, the SSM state size    r  dt_rank, the rank of the projection that makes Delta
  k  d_conv, the causal conv width  v  vocab_size
  h  attention heads (nhead)        e  head size, m // h
  g  key/value heads (GQA)          s  cache slots, up to max_seq_length
  t  tokens, b * l flattened        c  a block of channels inside the parallel and fused scans
  E  num_experts                    K  num_experts_per_tok, the router's top-K
Paper symbols: Delta (here `delta`), A, B, C, D as in [Mamba] Section 2 and Algorithm 2; `dA` is
A-bar = exp(Delta A) and `dBu` is B-bar u = Delta B u, both of Eq. (4).
"""

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------
# 1. Selective scans
# ---------------------------------------------------------------------------------------------------------------

def _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Raise a clear error, before any work, when the selective-scan arguments do not fit together."""
    given = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    for name, value in given.items():
        optional = name in ("D", "z", "delta_bias", "initial_state")
        if not isinstance(value, torch.Tensor) and not (optional and value is None):
            raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got "
                            f"{type(value).__name__}")
    if u.dim() != 3 or u.shape[2] == 0:
        raise ValueError(f"u must have shape (b, d, l) with at least one time step (l >= 1), got {tuple(u.shape)}")
    b, d, l = u.shape
    if A.dim() != 2 or A.shape[0] != d or A.is_complex():
        raise ValueError(f"A must be a real tensor of shape (d={d}, n), got {tuple(A.shape)} {A.dtype}")
    n = A.shape[1]
    expected = dict(delta=(b, d, l), B=(b, n, l), C=(b, n, l), z=(b, d, l), D=(d,), delta_bias=(d,),
                    initial_state=(b, d, n))
    for name, shape in expected.items():
        if given[name] is not None and tuple(given[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (u is (b, d, l) = {tuple(u.shape)}, A is (d, n) = "
                             f"{tuple(A.shape)}), got {tuple(given[name].shape)}")


def _compute_dtype(dtype):
    """What the scans, the recurrent step, rotary positions and the router compute in, as the reference code does:
    float32 for fp16/bf16 (their exponentials, decays and long sums lose too much in 8 or 11 bits of mantissa);
    float32 and float64 as they are. Inputs are cast to it, and outputs back to the input's dtype."""
    return torch.promote_types(dtype, torch.float32)


def _scan_inputs(u, delta, A, B, C, delta_bias, delta_softplus):
    """The sequential and parallel scans' common start: inputs in the _compute_dtype, delta = softplus(delta + bias)."""
    compute = _compute_dtype(u.dtype)
    u, delta, A, B, C = (x.to(compute) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A, B, C


def _scan_output(y, u, D, z, dtype_in):
    """The sequential and parallel scans' common end: the skip D u of Algorithm 2, the gate silu(z) of Figure 3."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              return_last_state=False, initial_state=None):
    """The selective scan as a loop over time: [Mamba] Algorithm 2 and Eq. (2a, 2b) with the ZOH of Eq. (4).

    The readable reference, same signature and semantics as the Mamba reference's selective_scan_ref:
        h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t        (b, d, n)   A-bar and B-bar of Eq. (4)
        y_t = C_t . h_t + D u_t                                 (b, d)
        out = y * silu(z)                                       when z is given
    u, delta, z (b, d, l);  A (d, n), real;  B, C (b, n, l);  D, delta_bias (d,);  initial_state (b, d, n)  ->
    out (b, d, l) in u's dtype, and last_state (b, d, n) in the _compute_dtype when return_last_state."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    u, delta, A, B, C = _scan_inputs(u, delta, A, B, C, delta_bias, delta_softplus)

    b, d, n = u.shape[0], u.shape[1], A.shape[1]
    h = u.new_zeros(b, d, n) if initial_state is None else initial_state.to(u.dtype)   # (b, d, n)
    ys = []
    # One time step at a time. unbind, not delta[:, :, t]: indexing makes autograd build a full-size gradient per
    # step (quadratic); unbind's backward stacks the small per-step gradients once.
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(2), u.unbind(2), B.unbind(2), C.unbind(2)):  # (b, d), (b, n)
        dA_t = torch.exp(delta_t.unsqueeze(-1) * A)                   # (b, d, n)      A-bar_t, Eq. (4)
        dBu_t = (delta_t * u_t).unsqueeze(-1) * B_t.unsqueeze(1)      # (b, d, n)      B-bar_t u_t (Euler for B)
        h = dA_t * h + dBu_t                                          # (b, d, n)      Eq. (2a)
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))                 # (b, d)         Eq. (2b)
    y = torch.stack(ys, dim=2)                                        # (b, d, l)
    out = _scan_output(y, u, D, z, dtype_in)                          # (b, d, l)      + D u, * silu(z)
    return (out, h) if return_last_state else out


def _scan_forward_(a, x):
    """In place along dim 0 (time): x_t <- a_t * x_{t-1} + x_t, with x_{-1} = 0. Clobbers a.

    The odd-even parallel scan (Blelloch-style): O(l) work in log2(l) levels, each level one elementwise op on
    every other time step, all channels at once. For l = 8, writing x_i..j for "the recurrence from i to j":

        1. fold each pair (2i, 2i+1) into one step       x1 = x0..1   x3 = x2..3   x5 = x4..5   x7 = x6..7
           x_{2i+1} += a_{2i+1} x_{2i};  a_{2i+1} *= a_{2i}   (a_{2i+1} now carries the pair over its two steps)
        2. the odd positions form a recurrence half as long: scan it in place (recursively, on a strided view)
                                                        x1 = x0..1   x3 = x0..3   x5 = x0..5   x7 = x0..7
        3. each even position 2i >= 2 takes one step from the finished odd position before it
           x_{2i} += a_{2i} x_{2i-1}                    x2 = x0..2   x4 = x0..4   x6 = x0..6
    An odd length leaves its last element unpaired in step 1; step 3 finishes it like any other even position."""
    l = x.shape[0]
    if l < 2:
        return
    x[1::2].addcmul_(a[1::2], x[0:l - 1:2])
    a[1::2].mul_(a[0:l - 1:2])
    _scan_forward_(a[1::2], x[1::2])
    x[2::2].addcmul_(a[2::2], x[1:l - 1:2])


def _scan_backward_(a, x):
    """The mirror image of _scan_forward_: x_t <- a_t * x_{t+1} + x_t, with x_l = 0, in place along dim 0.
    Pairs are counted from the end, (l-2, l-1), (l-4, l-3), ...; with odd l the unpaired element is x_0."""
    l = x.shape[0]
    if l < 2:
        return
    s = l % 2                                                        # where the first pair starts
    x[s::2].addcmul_(a[s::2], x[s + 1::2])
    a[s::2].mul_(a[s + 1::2])
    _scan_backward_(a[s::2], x[s::2])
    x[1 - s:l - 1:2].addcmul_(a[1 - s:l - 1:2], x[2 - s::2])


# On a CPU, channels per block are chosen so that one (l, b, c, n) float32 tensor is about 4 MB: the handful of them
# that a block needs stay in cache and are reused by the allocator, instead of faulting in fresh pages.
_BLOCK_ELEMENTS = 2 ** 20


def _channel_blocks(b, d, l, n, device):
    """Slices of the d channels, one block each. A GPU has no cache of that size to fit, and each block costs a
    few dozen kernel launches, so there a block may take a 64th of the free memory per (l, b, c, n) tensor (about
    six are alive at once): a wide layer is then one block or a few, not thousands of tiny kernels."""
    elements = torch.cuda.mem_get_info(device)[0] // 256 if device.type == "cuda" else _BLOCK_ELEMENTS
    c = max(1, elements // (b * l * n))
    return [slice(i, min(i + c, d)) for i in range(0, d, c)]


def _block_states(u, delta, A, B, h0):
    """All states h_t of one block of channels, and A-bar: Eq. (2a) solved by _scan_forward_.
    u, delta (l, b, c);  A (c, n);  B (l, b, n);  h0 (b, c, n)  ->  h, dA (l, b, c, n)."""
    dA = torch.exp(delta.unsqueeze(-1) * A)                           # (l, b, c, n)   A-bar, Eq. (4)
    h = (delta * u).unsqueeze(-1) * B.unsqueeze(2)                    # (l, b, c, n)   B-bar u
    h[0].addcmul_(dA[0], h0)                                          # the carried-in state enters at t = 0
    _scan_forward_(dA.clone(), h)
    return h, dA


class _ParallelSelectiveScan(torch.autograd.Function):
    """selective_scan_parallel's y_t = C_t . h_t and h_l, forward and backward, from inputs already through
    _scan_inputs. Inside, tensors are time-major, (l, b, ...): each time step the scan touches is one slab."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        b, d, l = u.shape
        n = A.shape[1]
        u, delta = u.permute(2, 0, 1).contiguous(), delta.permute(2, 0, 1).contiguous()   # (l, b, d)
        B, C = B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()           # (l, b, n)
        y = u.new_empty(l, b, d)                                      # (l, b, d)
        last_state = u.new_empty(b, d, n)                             # (b, d, n)
        for ch in _channel_blocks(b, d, l, n, u.device):
            h, _ = _block_states(u[:, :, ch], delta[:, :, ch], A[ch], B, h0[:, ch])   # (l, b, c, n)
            last_state[:, ch] = h[-1]
            y[:, :, ch] = torch.linalg.vecdot(h, C.unsqueeze(2))      # (l, b, c)      Eq. (2b)
        ctx.save_for_backward(u, delta, A, B, C, h0)
        return y.permute(1, 2, 0), last_state                         # (b, d, l), (b, d, n)

    @staticmethod
    def backward(ctx, grad_y, grad_last_state):
        """Backpropagation through a linear recurrence is the same recurrence run backwards in time:
            g_t = dL/dh_t = C_t grad_y_t + A-bar_{t+1} g_{t+1}    (g_{l-1} also receives grad_last_state)
        and then dL/d(B-bar u)_t = g_t and dL/d(A-bar)_t = g_t h_{t-1}; the chain rule gives the rest."""
        u, delta, A, B, C, h0 = ctx.saved_tensors                     # (l, b, d), (d, n), (l, b, n), (b, d, n)
        l, b, d = u.shape
        n = A.shape[1]
        grad_y = grad_y.permute(2, 0, 1).contiguous()                # (l, b, d)
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)   # (l, b, d)
        grad_A, grad_h0 = torch.empty_like(A), torch.empty_like(h0)         # (d, n), (b, d, n)
        grad_B, grad_C = torch.zeros_like(B), torch.zeros_like(C)           # (l, b, n)
        for ch in _channel_blocks(b, d, l, n, u.device):
            u_c, delta_c, A_c, gy_c = u[:, :, ch], delta[:, :, ch], A[ch], grad_y[:, :, ch]   # (l, b, c), (c, n)
            h, dA = _block_states(u_c, delta_c, A_c, B, h0[:, ch])    # (l, b, c, n)   recomputed, not stored

            g = gy_c.unsqueeze(-1) * C.unsqueeze(2)                   # (l, b, c, n)   the direct part of dL/dh_t
            if grad_last_state is not None:
                g[-1] += grad_last_state[:, ch]
            dA_next = torch.empty_like(dA)                            # (l, b, c, n)   A-bar_{t+1}, 0 past the end
            dA_next[:-1] = dA[1:]
            dA_next[-1] = 0
            _scan_backward_(dA_next, g)                               # g_t += A-bar_{t+1} g_{t+1}

            grad_h0[:, ch] = g[0] * dA[0]
            grad_dA_log = dA_next                                     # reuse the buffer for dL/d(delta A):
            grad_dA_log[1:] = h[:-1]
            grad_dA_log[0] = h0[:, ch]                                # h_{t-1}
            grad_dA_log.mul_(g).mul_(dA)                              # (l, b, c, n)   g_t h_{t-1} A-bar_t
            grad_C += h.mul_(gy_c.unsqueeze(-1)).sum(2)               # (l, b, n)      last use of h: in place

            g_B = torch.linalg.vecdot(g, B.unsqueeze(2))              # (l, b, c)      sum_n g_t B_t
            grad_u[:, :, ch] = g_B * delta_c
            grad_delta[:, :, ch] = g_B * u_c + torch.linalg.vecdot(grad_dA_log, A_c)
            grad_A[ch] = (grad_dA_log * delta_c.unsqueeze(-1)).sum((0, 1))
            grad_B += g.mul_((delta_c * u_c).unsqueeze(-1)).sum(2)    # (l, b, n)      last use of g: in place
        return (grad_u.permute(1, 2, 0), grad_delta.permute(1, 2, 0), grad_A, grad_B.permute(1, 2, 0),
                grad_C.permute(1, 2, 0), grad_h0)


def selective_scan_parallel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, initial_state=None):
    """The selective scan with no Python loop over time, in pure PyTorch for any device; same signature and results
    as selective_scan_sequential. Channels are taken in blocks whose (l, b, c, n) tensors stay in cache (the CPU's
    cache standing in for the GPU's SRAM of [Mamba] Section 3.3.2), each block's recurrence solved by the odd-even
    scan of _scan_forward_ (its docstring has the picture), and backward recomputes each block's states instead of
    storing them: memory O(b d l), not O(b d l n). Every factor the scan multiplies is an A-bar in [0, 1] or a
    finite input, so large delta and very negative A underflow to zero and never overflow."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    u, delta, A, B, C = _scan_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    h0 = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state.to(u.dtype)
    y, last_state = _ParallelSelectiveScan.apply(u, delta, A, B, C, h0)   # (b, d, l), (b, d, n)
    out = _scan_output(y, u, D, z, dtype_in)
    return (out, last_state) if return_last_state else out


_FUSED = None        # kernels/fused.py once loaded, or why it cannot be had (a str)


def _fused_kernels():
    """kernels/fused.py beside this file (it builds kernels/selective_scan.cpp, registers the torch ops), loaded
    once; or why it cannot be had (a str), printed once."""
    global _FUSED
    if _FUSED is None:
        path = Path(__file__).resolve().with_name("kernels") / "fused.py"
        module = sys.modules.get("jamba_fused_kernels")               # its torch ops can be registered only once
        if module is None and path.is_file():
            spec = importlib.util.spec_from_file_location("jamba_fused_kernels", path)
            module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        _FUSED = (module.load() or module) if module else "kernels/fused.py is not beside JAMBA.py"
        if isinstance(_FUSED, str):
            print(f"JAMBA: the fused selective scan is not available: {_FUSED}; scan='auto' uses the parallel scan",
                  file=sys.stderr, flush=True)
    return _FUSED


def selective_scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, initial_state=None):
    """The selective scan as a fused CPU kernel; same signature and results as selective_scan_sequential.

    [Mamba] Section 3.3.2: the scan is bound by memory traffic, and materialising A-bar, B-bar u and the states in
    (b, d, l, n) costs n times the inputs' traffic. kernels/selective_scan.cpp does what the official CUDA kernel
    does in SRAM, with the CPU's L1 cache: each block of channels walks time with its state in cache, all of
    Algorithm 2 in one loop (its header explains how); a torch op, so torch.compile traces through it. CPU tensors
    only, computed in the _compute_dtype; a C++ compiler builds it once, in seconds."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kernels = _fused_kernels()
    if isinstance(kernels, str):
        raise RuntimeError(f"the fused selective scan is not available here: {kernels}")
    out, last_state = kernels.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (out, last_state) if return_last_state else out


# ---------------------------------------------------------------------------------------------------------------
# 2. The Mamba block
# ---------------------------------------------------------------------------------------------------------------

_SCANS = {"fused": selective_scan_fused, "parallel": selective_scan_parallel, "sequential": selective_scan_sequential}


def _scan_function(scan, device):
    """The scan that `scan` names; "auto" is the fused kernel on the CPU where it can be had, else the parallel scan."""
    if scan == "auto":
        scan = "fused" if device.type == "cpu" and not isinstance(_fused_kernels(), str) else "parallel"
    elif scan == "fused" and isinstance(_fused_kernels(), str):
        raise RuntimeError(f"the fused selective scan is not available here: {_fused_kernels()}")
    return _SCANS[scan]


def _check_int(name, value, low=1, high=None, high_name=None):
    """The one integer check: a ValueError naming the argument unless value is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = ("a positive int" if low == 1 else f"an int >= {low}") if high is None else \
            f"an int in [{low}, {f'{high_name}={high}' if high_name else high}]"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


class MambaBlock(nn.Module):
    """The Mamba mixer: [Mamba] Figure 3 and Algorithm 2, as the reference's mamba_simple.Mamba.

    Parameter names, shapes and initialisation match the reference (so its state_dict loads with strict=True):
      in_proj  (no bias)  m -> 2d, the SSM branch x and the gate z
      conv1d   depthwise causal conv of width k over time, with bias
      x_proj   (no bias)  d -> r + 2n, the input-dependent Delta (low rank), B and C of Section 3.2 (S6)
      dt_proj  r -> d; its bias is softplus^-1 of dt ~ log-uniform[1e-3, 1e-1], floored at 1e-4 (Section 3.6)
      A_log    (d, n) = log(1..n) for every channel ("S4D-real"); A = -exp(A_log) stays negative, so |A-bar| < 1
      D        (d,) = 1, the skip connection
      out_proj (no bias)  d -> m
    inner_layernorms: [Jamba] Section 6.4 found that Mamba layers at scale need RMSNorms on the x_proj split (dt, B
    and C): dt_layernorm, b_layernorm, c_layernorm as in the public Jamba code, with epsilon norm_eps. scan: "fused",
    "parallel", "sequential" (selective_scan_*) or "auto": fused on the CPU where it can be built, else parallel."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", inner_layernorms=False,
                 norm_eps=1e-6, scan="auto"):
        super().__init__()
        self.check_settings(d_model, d_state, d_conv, expand, dt_rank, scan)
        dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        d_inner = expand * d_model
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.inner_layernorms, self.scan = inner_layernorms, scan
        if scan in ("auto", "fused"):
            _fused_kernels()                             # built or found now, not first inside a torch.compile trace

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        if inner_layernorms:
            self.dt_layernorm = nn.RMSNorm(dt_rank, eps=norm_eps)
            self.b_layernorm = nn.RMSNorm(d_state, eps=norm_eps)
            self.c_layernorm = nn.RMSNorm(d_state, eps=norm_eps)

        # Delta's projection: weights of the same scale as its input's, bias = softplus^-1(dt) so that the initial
        # step sizes dt = softplus(bias) cover [1e-3, 1e-1] log-uniformly, as in the reference.
        nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))          # softplus^-1(dt)
        self.dt_proj._no_reinit = True                                          # Jamba's init keeps it

        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True            # as the reference marks them
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    @staticmethod
    def check_settings(d_model, d_state, d_conv, expand, dt_rank, scan):
        """A ValueError naming the first setting the block cannot be built with (JambaConfig asks it too)."""
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            _check_int(name, value)
        if dt_rank != "auto":
            _check_int("dt_rank (or 'auto')", dt_rank)
        if scan not in ("auto", *_SCANS):
            raise ValueError(f"scan must be one of {['auto', *_SCANS]}, got {scan!r}")

    def _delta_B_C(self, x):
        """The selection mechanism (Algorithm 2, lines 3-5): x (..., d) -> delta before bias (..., d), B, C (..., n)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_layernorms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return dt @ self.dt_proj.weight.t(), B, C                               # bias and softplus come in the scan

    def _conv(self, x_in, history, fused):
        """silu(causal depthwise conv1d(x_in)), the input of the SSM (Figure 3): (b, l, d) -> (b, l, d); history
        (b, k - 1, d), the inputs before x_in's first (zeros when None)."""
        l = x_in.shape[1]
        if history is not None:                          # convolve them too, then drop their outputs
            x_in = torch.cat([history, x_in], dim=1)                            # (b, k - 1 + l, d)
        if fused:                                        # the fused kernel, in the scan's layout
            out = _fused_kernels().causal_conv(x_in, self.conv1d.weight[:, 0], self.conv1d.bias)   # (b, ., d)
        else:
            out = F.silu(self.conv1d(x_in.transpose(1, 2))[..., :x_in.shape[1]]).transpose(1, 2)   # drop the tail
        return out[:, -l:]                                                      # (b, l, d)

    def forward(self, x, mask=None):
        """x (b, l, m) -> (b, l, m); mask (b, l) as in prefill."""
        return self.prefill(x, mask=mask)[0]

    def prefill(self, x, state=None, mask=None):
        """The parallel mode over x (b, l, m), from state (conv_state (b, d, k), the conv's last k inputs; ssm_state
        (b, d, n), h in the _compute_dtype) or zeros -> (out (b, l, m), the state after x, for step() or another
        prefill). mask (b, l), 1 for tokens, 0 for pads: pads are zeroed before in_proj and after the conv (as in
        transformers' Jamba), so pads before a sequence's first token leave its state as if they were not there."""
        k = self.d_conv
        scan = _scan_function(self.scan, x.device)
        keep = None if mask is None else mask.unsqueeze(-1).to(x.dtype)         # (b, l, 1)
        x_in, z = self.in_proj(x if keep is None else x * keep).chunk(2, dim=-1)   # (b, l, d) each
        history = None if state is None else state[0][:, :, 1:].transpose(1, 2)  # (b, k - 1, d)
        x_conv = self._conv(x_in, history, fused=scan is selective_scan_fused)  # (b, l, d)
        if keep is not None:
            x_conv = x_conv * keep
        delta, B, C = self._delta_B_C(x_conv)                                   # (b, l, d), (b, l, n), (b, l, n)
        compute = _compute_dtype(x.dtype)
        A = -torch.exp(self.A_log.to(compute))                                  # (d, n)
        y, ssm_state = scan(
            x_conv.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
            self.D.to(compute), z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.to(compute), delta_softplus=True,
            return_last_state=True, initial_state=None if state is None else state[1])   # (b, d, l), (b, d, n)
        window = x_in if history is None else torch.cat([history, x_in], dim=1)
        conv_state = F.pad(window[:, -k:].transpose(1, 2), (k - min(k, window.shape[1]), 0))   # (b, d, k)
        return self.out_proj(y.transpose(1, 2)), (conv_state, ssm_state)       # (b, l, m)

    def step(self, x, state):
        """The recurrent mode ([Mamba] Section 3.4, the reference's step): one token x (b, m), state (conv_state
        (b, d, k), ssm_state (b, d, n), whose dtype the SSM runs in) -> (out (b, m), new state); O(1) time, memory."""
        conv_state, ssm_state = state
        xz = self.in_proj(x)                                                    # (b, 2d)
        if (_scan_function(self.scan, x.device) is selective_scan_fused and not torch.is_grad_enabled()
                and x.dtype == ssm_state.dtype == conv_state.dtype):    # float32 or float64 weights: no casts
            # One call of the fused kernels from in_proj's output to out_proj's input: the arithmetic below, a few
            # dozen small torch operations fewer per token (inference only: no gradient flows through it).
            y, conv_state, ssm_state = _fused_kernels().mamba_step(self, xz, conv_state, ssm_state)   # (b, d)
            return self.out_proj(y), (conv_state, ssm_state)
        x_in, z = xz.chunk(2, dim=-1)                                           # (b, d) each
        conv_state = torch.cat([conv_state[:, :, 1:], x_in.unsqueeze(-1)], dim=-1)   # (b, d, k)  slide the window
        x_conv = F.silu(torch.einsum("bdk,dk->bd", conv_state, self.conv1d.weight[:, 0]) + self.conv1d.bias)  # (b, d)
        delta, B, C = self._delta_B_C(x_conv)                                   # (b, d), (b, n), (b, n)
        compute = ssm_state.dtype
        u, B, C = x_conv.to(compute), B.to(compute), C.to(compute)
        delta = F.softplus(delta.to(compute) + self.dt_proj.bias.to(compute))   # (b, d)
        dA = torch.exp(delta.unsqueeze(-1) * -torch.exp(self.A_log.to(compute)))    # (b, d, n)  A-bar, Eq. (4)
        ssm_state = dA * ssm_state + (delta * u).unsqueeze(-1) * B.unsqueeze(1)     # (b, d, n)  Eq. (2a)
        y = torch.einsum("bdn,bn->bd", ssm_state, C) + self.D.to(compute) * u      # (b, d)     Eq. (2b)
        y = y * F.silu(z.to(compute))                                           # (b, d)
        return self.out_proj(y.to(x.dtype)), (conv_state, ssm_state)


# ---------------------------------------------------------------------------------------------------------------
# 3. The attention block
# ---------------------------------------------------------------------------------------------------------------

def _rotary(x, positions):
    """Rotary position embedding (Su et al., RoFormer, arXiv 2104.09864) of x (b, h, l, e) at positions (b, l)."""
    e = x.shape[3]
    compute = _compute_dtype(x.dtype)
    inv_freq = 10000.0 ** (-torch.arange(0, e, 2, device=x.device, dtype=compute) / e)          # (e/2,)
    angle = positions[:, None, :, None].to(compute) * inv_freq                   # (b, 1, l, e/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.to(compute).chunk(2, dim=-1)                                     # (b, h, l, e/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)   # (b, h, l, e)


class AttentionCache(NamedTuple):
    """An attention layer's state in generation. keys, values (b, g, s, e): a ring of s slots (room for twice the
    prompt at first, doubling as it fills, up to max_seq_length), step t in slot t % max_seq_length; positions (b, s),
    each slot's rotary position (-1: a pad or empty); seen, the steps taken in, pads included; pads, whether any was."""
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    seen: int
    pads: bool = False


def _attention_mask(query_steps, key_steps, key_is_token, window):
    """(b, 1, l, s): True where a query may attend to a key: a token (key_is_token (b, s)) at the query's step or one
    of the window - 1 before it; and its own step, so that a pad's query (all else masked) stays finite, unused."""
    behind = query_steps[:, None] - key_steps[None, :]                          # (l, s)  steps back
    in_window = (behind >= 0) & (behind < window)                               # (l, s)
    return (in_window & key_is_token[:, None, :] | (behind == 0))[:, None]


class AttentionBlock(nn.Module):
    """Causal self-attention through F.scaled_dot_product_attention, with a key/value cache for generation.
    num_key_value_heads: grouped-query attention (Ainslie et al., arXiv 2305.13245; [Jamba] Section 2 has 32 query
    heads share 8): each group of query heads shares one key and one value head, which shrinks the cache by
    nhead // num_key_value_heads (None: nhead, plain multi-head attention).
    rotary: [Jamba] Section 6.5 found no positional encoding is needed when Mamba layers come first (they carry
    position implicitly); an attention layer with no Mamba layer before it can get rotary embeddings instead.
    In generation (prefill, step) each query attends to the last max_seq_length steps only (a sliding window over
    the AttentionCache's ring buffer). Pads (0 in a mask (b, l)) are never attended to and take no rotary
    position, so a left-padded sequence attends as it would alone."""

    def __init__(self, d_model, nhead, dropout=0.0, max_seq_length=1024, rotary=False, num_key_value_heads=None):
        super().__init__()
        self.check_settings(d_model, nhead, dropout, max_seq_length, rotary, num_key_value_heads)
        num_key_value_heads = nhead if num_key_value_heads is None else num_key_value_heads
        self.nhead, self.num_key_value_heads, self.head_size = nhead, num_key_value_heads, d_model // nhead
        self.dropout, self.max_seq_length, self.rotary = dropout, max_seq_length, rotary
        # q, k and v in one matmul (the public Jamba code has three: q_proj, k_proj, v_proj, stacked in this order).
        self.qkv_proj = nn.Linear(d_model, (nhead + 2 * num_key_value_heads) * self.head_size, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    @staticmethod
    def check_settings(d_model, nhead, dropout, max_seq_length, rotary, num_key_value_heads):
        """A ValueError naming the first setting the block cannot be built with (JambaConfig asks it too)."""
        for name, value in (("d_model", d_model), ("nhead", nhead), ("max_seq_length", max_seq_length),
                            ("num_key_value_heads", nhead if num_key_value_heads is None else num_key_value_heads)):
            _check_int(name, value)
        if d_model % nhead or (rotary and (d_model // nhead) % 2):
            raise ValueError(f"d_model must be a multiple of nhead (and d_model // nhead even with rotary), "
                             f"got d_model={d_model}, nhead={nhead}")
        if num_key_value_heads is not None and nhead % num_key_value_heads:
            raise ValueError(f"nhead must be a multiple of num_key_value_heads, got nhead={nhead}, "
                             f"num_key_value_heads={num_key_value_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

    def _qkv(self, x, positions):
        """x (b, l, m) at rotary positions (b, l) -> q (b, h, l, e), k and v (b, g, l, e)."""
        b, l, _ = x.shape
        g = self.num_key_value_heads
        qkv = self.qkv_proj(x).view(b, l, self.nhead + 2 * g, self.head_size).transpose(1, 2)  # (b, h + 2g, l, e)
        q, k, v = qkv.split([self.nhead, g, g], dim=1)
        if self.rotary:
            q, k = _rotary(q, positions), _rotary(k, positions)
        return q, k, v

    def _attend(self, q, k, v, **kwargs):
        """Every query head attends with the key/value head of its group: (b, h, l, e), (b, g, s, e) -> (b, l, m)."""
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.num_key_value_heads != self.nhead, **kwargs)
        return self.resid_dropout(self.out_proj(y.transpose(1, 2).flatten(2)))

    def forward(self, x, mask=None):
        """x (b, l, m) -> (b, l, m), every position attending to itself and the positions before it."""
        b, l, _ = x.shape
        if mask is not None or l > self.max_seq_length:
            return self._attend_after(x, None, mask)[0]
        q, k, v = self._qkv(x, torch.arange(l, device=x.device).expand(b, l))  # (b, h, l, e), (b, g, l, e)
        return self._attend(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)

    def prefill(self, x, state=None, mask=None):
        """The parallel mode of generation: x (b, l, m), the steps after state's (or the first ones) -> (out (b, l, m),
        the cache with x's keys and values written in). Each query attends to the keys of the last max_seq_length
        steps, the cache's and x's own; mask (b, l) marks pads with 0."""
        out, k, v, positions = self._attend_after(x, state, mask)
        pads = (state is not None and state.pads) or (mask is not None and not bool(mask.all()))
        return out, self._write(state, k, v, positions, pads)

    def _attend_after(self, x, state, mask):
        """prefill's attention: (out (b, l, m), k, v (b, g, l, e) and positions (b, l) for the cache)."""
        b, l, _ = x.shape
        window, seen = self.max_seq_length, 0 if state is None else state.seen
        is_token = torch.ones(b, l, dtype=torch.bool, device=x.device) if mask is None else mask.bool()   # (b, l)
        first = 0 if state is None else state.positions.amax(-1, keepdim=True) + 1   # (b, 1)  next rotary position
        positions = torch.where(is_token, first + is_token.cumsum(-1) - 1, -1)   # (b, l)  -1 at pads
        q, k, v = self._qkv(x, positions.clamp(min=0))                          # (b, h, l, e), (b, g, l, e)
        steps = torch.arange(seen, seen + l, device=x.device)                   # (l,)
        keys, values, key_positions, key_steps = k, v, positions, steps
        if state is not None:                                                   # the cache's keys come first
            filled = min(seen, window)
            slots = torch.arange(filled, device=x.device)                       # slot i holds the latest step
            keys = torch.cat([state.keys[:, :, :filled], k], dim=2)              # (b, g, s + l, e)
            values = torch.cat([state.values[:, :, :filled], v], dim=2)
            key_positions = torch.cat([state.positions[:, :filled], positions], dim=1)   # (b, s + l)
            key_steps = torch.cat([slots + window * ((seen - 1 - slots) // window), steps])   # t < seen, t = i mod s
        attn_mask = _attention_mask(steps, key_steps, key_positions >= 0, window)   # (b, 1, l, s + l)
        out = self._attend(q, keys, values, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return out, k, v, positions

    def step(self, x, state):
        """One token x (b, m) with its cache -> (out (b, m), the cache, updated in place): prefill of one token, with
        no window mask (every cached key is a past step within it); pads the cache took in are still masked."""
        positions = state.positions.amax(-1, keepdim=True) + 1                  # (b, 1)
        q, k, v = self._qkv(x.unsqueeze(1), positions)                          # (b, h, 1, e), (b, g, 1, e)
        state = self._write(state, k, v, positions, state.pads)
        filled = min(state.seen, self.max_seq_length)
        is_token = state.positions[:, None, None, :filled] >= 0 if state.pads else None   # (b, 1, 1, s)  not pads
        return self._attend(q, state.keys[:, :, :filled], state.values[:, :, :filled], attn_mask=is_token)[:, 0], state

    def _write(self, state, k, v, positions, pads):
        """The cache with l more steps k, v (b, g, l, e) at positions (b, l) written into its ring (all of them, or
        the last max_seq_length when l is longer), growing its room first if need be."""
        (b, g, l, e), window = k.shape, self.max_seq_length
        seen = 0 if state is None else state.seen
        room = 0 if state is None else state.keys.shape[2]
        if room < min(window, seen + l):                                        # twice what is needed, at most s
            new_room = min(window, 2 * (seen + l))
            keys, values = k.new_zeros(b, g, new_room, e), v.new_zeros(b, g, new_room, e)   # (b, g, s, e)
            key_positions = positions.new_full((b, new_room), -1)               # (b, s)
            if state is not None:
                keys[:, :, :room], values[:, :, :room], key_positions[:, :room] = state.keys, state.values, \
                    state.positions
        else:
            keys, values, key_positions = state.keys, state.values, state.positions
        # Step t goes to slot t % max_seq_length: the kept steps fill the ring to its end, then wrap to its start.
        first = max(0, l - window)                                              # only the last window steps stay
        slot = (seen + first) % window
        for start, end in ((first, min(l, first + window - slot)), (first + window - slot, l)):
            if start < end:
                at = slice(slot, slot + end - start)
                keys[:, :, at], values[:, :, at], key_positions[:, at] = k[:, :, start:end], v[:, :, start:end], \
                    positions[:, start:end]
                slot = 0
        return AttentionCache(keys, values, key_positions, seen + l, pads)


# ---------------------------------------------------------------------------------------------------------------
# 4. The MLP: dense, then a mixture of experts
# ---------------------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Jamba's gated SiLU MLP (SwiGLU, Shazeer arXiv 2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model, dim_feedforward, dropout=0.0):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, dim_feedforward, bias=False)
        self.up_proj = nn.Linear(d_model, dim_feedforward, bias=False)
        self.down_proj = nn.Linear(dim_feedforward, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        """x (..., m) -> the same shape."""
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MixtureOfExperts(nn.Module):
    """[Jamba] Section 2's MoE layer: num_experts gated SiLU MLPs, of which a router picks num_experts_per_tok for
    each token (Shazeer et al., arXiv 1701.06538); Jamba picks 2 of 16 in every other layer: 16x the parameters at
    about 2x the compute per token. The router is a bias-free linear with a softmax over all experts (in
    _compute_dtype); each token's K most probable experts are weighted by those probabilities as they are, not
    renormalised (as the public Jamba code; Mixtral renormalises). Only the chosen experts run, each once on the
    tokens grouped to it. After a forward, router_probs (t, E) holds the probabilities for load_balancing_loss."""

    def __init__(self, d_model, dim_feedforward, num_experts, num_experts_per_tok=2, dropout=0.0):
        super().__init__()
        self.check_settings(num_experts, num_experts_per_tok)
        self.num_experts_per_tok = num_experts_per_tok
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(d_model, dim_feedforward, dropout) for _ in range(num_experts))
        self.router_probs = None

    @staticmethod
    def check_settings(num_experts, num_experts_per_tok):
        """A ValueError naming the first setting the block cannot be built with (JambaConfig asks it too)."""
        _check_int("num_experts", num_experts)
        _check_int("num_experts_per_tok", num_experts_per_tok, 1, num_experts, "num_experts")

    def forward(self, x):
        """x (..., m) -> the same shape."""
        tokens = x.reshape(-1, x.shape[-1])                                     # (t, m)
        compute = _compute_dtype(x.dtype)
        self.router_probs = F.softmax(self.router(tokens), dim=-1, dtype=compute)   # (t, E)
        weights, chosen = self.router_probs.topk(self.num_experts_per_tok, dim=-1)       # (t, K) each
        # Sort the t*K (token, expert) pairs by expert: each expert's tokens are then one contiguous slice.
        order = chosen.flatten().argsort()                                      # (t K,)
        per_expert = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        token_of = (order // self.num_experts_per_tok).split(per_expert)        # E slices of token indices
        weight_of = weights.flatten()[order].to(x.dtype).unsqueeze(-1).split(per_expert)   # E slices (t_e, 1)
        out = torch.zeros_like(tokens)                                          # (t, m)
        for expert, token_index, weight in zip(self.experts, token_of, weight_of):
            # An expert no token chose still runs, on zero rows, so that its weights get a zero gradient rather
            # than none (which DistributedDataParallel would take for a parameter that is not used at all).
            out.index_add_(0, token_index, weight * expert(tokens[token_index]))   # (t_e, m) added at its tokens
        return out.view_as(x)


def load_balancing_loss(router_probs, num_experts_per_tok, token_mask=None):
    """The Switch Transformer's auxiliary loss (Fedus et al., arXiv 2101.03961, Eq. 4-6) with top-K routing, as in
    the public Jamba code: E sum_e f_e P_e, f_e the fraction of tokens that chose expert e among their K, P_e its
    mean router probability, pooled over every MoE layer's tokens. f sums to K: an even spread gives K, piling onto
    few experts more; only P carries a gradient. router_probs: a (t, E) tensor per MoE layer; token_mask (t,): the
    tokens to count (pads left out, as transformers' load_balancing_loss_func), or None."""
    probs = torch.cat(router_probs)                                             # (T, E)  every layer's tokens
    num_experts = probs.shape[-1]
    weight = probs.new_ones(probs.shape[0]) if token_mask is None else token_mask.to(probs.dtype).repeat(
        len(router_probs))                                                      # (T,)
    chosen = probs.topk(num_experts_per_tok, dim=-1).indices                    # (T, K)
    f = weight @ F.one_hot(chosen, num_experts).sum(1).to(probs.dtype) / weight.sum()   # (E,)  Eq. (5), times K
    P = weight @ probs / weight.sum()                                           # (E,)  Eq. (6)
    return num_experts * (f * P).sum()                                          # Eq. (4)


# ---------------------------------------------------------------------------------------------------------------
# 5. The layer plan and the Jamba model
# ---------------------------------------------------------------------------------------------------------------

def layer_schedule(num_mamba_layers, num_transformer_layers, attn_layer_period=None, attn_layer_offset=None):
    """The layer pattern, 'M' for Mamba and 'A' for attention. With a attention layers among N layers, attention
    layer k sits at floor((k + 1/2) N / a): spread evenly, each in the middle of its share. N=8, a=1 gives
    "MMMMAMMM", the 1:7 Jamba block of [Jamba] Section 2 / Figure 1; N=32, a=4 puts attention at 4, 12, 20, 28.
    With attn_layer_period and attn_layer_offset (the public Jamba configuration's way), layer i is attention
    when i % attn_layer_period == attn_layer_offset instead: Jamba-v0.1 has 32 layers, period 8, offset 4."""
    n_layers = num_mamba_layers + num_transformer_layers
    if attn_layer_period is None:
        attention_at = {(2 * k + 1) * n_layers // (2 * num_transformer_layers) for k in range(num_transformer_layers)}
    else:
        attention_at = {i for i in range(n_layers) if i % attn_layer_period == attn_layer_offset}
    return "".join("A" if i in attention_at else "M" for i in range(n_layers))


@dataclasses.dataclass
class JambaConfig:
    """Every setting of the model, in one place: Jamba(config) or Jamba(**settings), checkpoints and train_tiny.py's
    flags all read it. Names follow the public Jamba configuration where it has the setting."""
    vocab_size: int
    d_model: int                       # the residual width m (Jamba: hidden_size, 4096)
    num_mamba_layers: int              # 0 gives a plain transformer
    num_transformer_layers: int        # attention layers; 0 gives a plain Mamba LM
    nhead: int                         # query heads
    dim_feedforward: int               # hidden width of the MLP and of each expert (Jamba: intermediate_size)
    max_seq_length: int                # the longest input of forward(); attention caches keep at most this many
    dropout: float = 0.0
    d_state: int = 16                  # the Mamba block's settings, with the reference's defaults
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"        # "auto": ceil(d_model / 16)
    num_key_value_heads: int | None = None   # grouped-query attention; None: nhead (Jamba: 8 for 32 query heads)
    num_experts: int = 1               # 1: every MLP is dense; Jamba: 16
    num_experts_per_tok: int = 2       # the router's top-K
    expert_layer_period: int = 2       # layer i has experts when i % period == offset: every other layer,
    expert_layer_offset: int = 1       # starting at the second, as in Jamba
    router_aux_loss_coef: float = 0.001    # the load-balancing term's weight in the loss, as in Jamba
    attn_layer_period: int | None = None   # attention where i % period == offset (Jamba: 8, 4);
    attn_layer_offset: int | None = None   # None: spread evenly, see layer_schedule
    rotary: bool = True                # rotary positions in attention layers that no Mamba layer precedes
    tie_word_embeddings: bool = True   # the head shares the embedding's weights (Jamba's checkpoints: False)
    rms_norm_eps: float = 1e-6
    scan: str = "auto"                 # fused kernel on CPU, else parallel; or "fused", "parallel", "sequential"

    def __post_init__(self):
        """Checks what only the whole model knows (layers, periods, offsets), then asks each kind of block."""
        for name, low in (("vocab_size", 1), ("dim_feedforward", 1), ("max_seq_length", 1), ("num_mamba_layers", 0),
                          ("num_transformer_layers", 0)):
            _check_int(name, getattr(self, name), low)
        n_layers = self.num_mamba_layers + self.num_transformer_layers
        if n_layers == 0:
            raise ValueError("num_mamba_layers + num_transformer_layers must be at least 1, got 0 layers")
        if (self.attn_layer_period is None) != (self.attn_layer_offset is None):
            raise ValueError("give attn_layer_period and attn_layer_offset together, or neither")
        for name, used in (("attn_layer", self.attn_layer_period is not None), ("expert_layer", self.num_experts > 1)):
            period, offset = getattr(self, f"{name}_period"), getattr(self, f"{name}_offset")
            if used and (isinstance(period, bool) or not isinstance(period, int) or not isinstance(offset, int)
                         or not 0 <= offset < period):
                raise ValueError(f"{name}_period and {name}_offset must be ints with 0 <= offset < period, "
                                 f"got {period!r} and {offset!r}")
        pattern = layer_schedule(self.num_mamba_layers, self.num_transformer_layers, self.attn_layer_period,
                                 self.attn_layer_offset)
        if pattern.count("A") != self.num_transformer_layers:
            raise ValueError(f"attn_layer_period={self.attn_layer_period}, attn_layer_offset={self.attn_layer_offset}"
                             f" place {pattern.count('A')} attention layers among {n_layers}, but "
                             f"num_transformer_layers={self.num_transformer_layers}")
        if self.num_experts > 1 and self.expert_layer_offset >= n_layers:
            raise ValueError(f"expert_layer_offset={self.expert_layer_offset} places no layer among {n_layers}: "
                             f"num_experts={self.num_experts} would never be used")
        if "M" in pattern:
            MambaBlock.check_settings(self.d_model, self.d_state, self.d_conv, self.expand, self.dt_rank, self.scan)
        if "A" in pattern:                      # rotary where no Mamba layer comes before (see Jamba)
            rotary = self.rotary and pattern.index("A") < (pattern + "M").index("M")
            AttentionBlock.check_settings(self.d_model, self.nhead, self.dropout, self.max_seq_length, rotary,
                                          self.num_key_value_heads)
        MixtureOfExperts.check_settings(self.num_experts, self.num_experts_per_tok if self.num_experts > 1 else 1)


class JambaLayer(nn.Module):
    """One pre-norm residual layer ([Jamba] Figure 1): x = x + mixer(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, mixer, mlp, d_model, norm_eps=1e-6):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mixer = mixer
        self.mlp_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mlp = mlp

    def forward(self, x, mask=None):
        """x (b, l, m) -> (b, l, m); mask (b, l) or None, as the mixers take it."""
        x = x + self.mixer(self.mixer_norm(x), mask)
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x, state=None, mask=None):
        """x (b, l, m) from the mixer's state (or none) -> (b, l, m), the mixer's state after x."""
        mixed, state = self.mixer.prefill(self.mixer_norm(x), state, mask)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state

    def step(self, x, state):
        """x (b, m) -> (b, m), the mixer's new state."""
        mixed, state = self.mixer.step(self.mixer_norm(x), state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state


class Jamba(nn.Module):
    """The Jamba language model ([Jamba] Section 2): token embedding, a plan of Mamba and attention layers
    (layer_schedule) whose MLPs are dense or mixtures of experts, a final RMSNorm and an output head.
    Jamba(config) with a JambaConfig, or Jamba(**settings) with its fields: Jamba(vocab_size=65, d_model=128, ...).
    model.layer_pattern shows the mixers ('M' Mamba, 'A' attention), model.mlp_pattern the MLPs ('D' dense,
    'E' experts); after a forward, model.aux_loss is the load-balancing term (None without experts)."""

    def __init__(self, config=None, **settings):
        super().__init__()
        if config is None:
            config = JambaConfig(**settings)
        elif not isinstance(config, JambaConfig) or settings:
            raise TypeError("Jamba takes a JambaConfig or its fields as keyword arguments, not both")
        self.config = c = config
        self.layer_pattern = layer_schedule(c.num_mamba_layers, c.num_transformer_layers, c.attn_layer_period,
                                            c.attn_layer_offset)
        self.mlp_pattern = "".join("E" if c.num_experts > 1 and i % c.expert_layer_period == c.expert_layer_offset
                                   else "D" for i in range(len(self.layer_pattern)))
        first_mamba = self.layer_pattern.index("M") if "M" in self.layer_pattern else len(self.layer_pattern)

        def mixer(i, kind):
            if kind == "M":
                return MambaBlock(c.d_model, c.d_state, c.d_conv, c.expand, c.dt_rank, inner_layernorms=True,
                                  norm_eps=c.rms_norm_eps, scan=c.scan)
            return AttentionBlock(c.d_model, c.nhead, c.dropout, c.max_seq_length, c.rotary and i < first_mamba,
                                  c.num_key_value_heads)

        def mlp(kind):
            if kind == "E":
                return MixtureOfExperts(c.d_model, c.dim_feedforward, c.num_experts, c.num_experts_per_tok, c.dropout)
            return MLP(c.d_model, c.dim_feedforward, c.dropout)

        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(JambaLayer(mixer(i, kind), mlp(mlp_kind), c.d_model, c.rms_norm_eps)
                                    for i, (kind, mlp_kind) in enumerate(zip(self.layer_pattern, self.mlp_pattern)))
        self.norm = nn.RMSNorm(c.d_model, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embedding.weight                         # weight tying (Press & Wolf 2017)
        self.aux_loss = None
        # GPT-2's init, leaving the Mamba-specific init (dt_proj, conv1d, A_log, D) exactly as MambaBlock made it:
        # N(0, 0.02) everywhere, and the projections that write into the residual stream scaled by 1/sqrt(2 N) so
        # that its variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Embedding, nn.Linear)) and not getattr(module, "_no_reinit", False):
                nn.init.normal_(module.weight, std=0.02)
        for name, param in self.named_parameters():
            if name.endswith(("out_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * len(self.layers)))

    def extra_repr(self):
        return f"layer_pattern={self.layer_pattern!r}, mlp_pattern={self.mlp_pattern!r}"

    def _check_inputs(self, idx, targets=None, attention_mask=None, inputs_embeds=None):
        """A TypeError or ValueError naming the argument, before any work: idx (b, l) ids in [0, vocab_size), or
        inputs_embeds (b, l, m) in the model's dtype; targets and attention_mask (1 for tokens, 0 for pads, bool or
        int, as transformers takes it) of shape (b, l). Returns the mask as bool, or None."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of idx (token ids) and inputs_embeds (vectors), not both or neither")
        if inputs_embeds is not None:
            dtype = self.embedding.weight.dtype
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dtype != dtype:
                got = inputs_embeds.dtype if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
                raise TypeError(f"inputs_embeds must be a torch.Tensor of the model's dtype {dtype}, got {got}")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0 or inputs_embeds.shape[2] != self.config.d_model:
                raise ValueError(f"inputs_embeds must have shape (b, l, d_model={self.config.d_model}) with l >= 1, "
                                 f"got {tuple(inputs_embeds.shape)}")
            idx = inputs_embeds[..., 0]                                         # (b, l): the shape to check against
        elif not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        elif idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold token ids as torch.int64 or torch.int32, got {idx.dtype}")
        elif idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must have shape (b, l) with l >= 1 (not an empty sequence), got {tuple(idx.shape)}")
        elif idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"idx holds ids in [{idx.min().item()}, {idx.max().item()}], "
                             f"outside [0, vocab_size={self.config.vocab_size})")
        for name, value in (("targets", targets), ("attention_mask", attention_mask)):
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape != idx.shape):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a tensor of shape (b, l) = {tuple(idx.shape)}, got {got}")
        if attention_mask is None:
            return None
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise ValueError(f"attention_mask must hold 1 (token) and 0 (pad) as bool or int, got "
                             f"{attention_mask.dtype}")
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask must hold only 1 (token) and 0 (pad), got other values")
        if not attention_mask.any():
            raise ValueError("attention_mask marks every position as a pad: there is no token to read")
        return attention_mask.to(torch.bool)

    def _check_states(self, states, b):
        """states as prefill or step returned them, for this model and a batch of b sequences."""
        if not isinstance(states, (list, tuple)) or len(states) != len(self.layers):
            got = f"{len(states)} states" if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(f"states must be the list of {len(self.layers)} layer states that prefill or step "
                             f"returned, got {got}")
        for i, (layer, state) in enumerate(zip(self.layers, states)):
            mixer = layer.mixer
            if isinstance(mixer, MambaBlock):
                shapes = [(b, mixer.d_inner, mixer.d_conv), (b, mixer.d_inner, mixer.d_state)]
                fits = isinstance(state, tuple) and len(state) == 2 and all(
                    isinstance(t, torch.Tensor) and tuple(t.shape) == shape for t, shape in zip(state, shapes))
            else:
                fits = isinstance(state, AttentionCache) and state.keys.shape[:2] == (b, mixer.num_key_value_heads) \
                    and state.keys.shape[3] == mixer.head_size
            if not fits:
                raise ValueError(f"states[{i}] is not a state of layer {i} ({type(mixer).__name__}) for a batch of "
                                 f"{b}: give the states this model's prefill or step returned for the same batch")

    def _out(self, x, return_hidden):
        x = self.norm(x)                                                        # (b, l, m) or (b, m)
        return x if return_hidden else self.lm_head(x)                          # (b, l, v) or (b, v)

    def forward(self, idx=None, targets=None, attention_mask=None, inputs_embeds=None, return_hidden=False):
        """idx (b, l) token ids, l <= max_seq_length -> (logits (b, l, v), mean cross-entropy loss or None).
        targets (b, l): the next token at each position; -1 marks positions to ignore, and so do pads.
        attention_mask (b, l): 1 for tokens, 0 for pads (any pattern here; generate needs left padding), which
        Mamba layers zero, attention layers never attend to, and the load-balancing term leaves out. With experts,
        the loss adds router_aux_loss_coef times the load-balancing term, readable as model.aux_loss. For what is
        not tokens: inputs_embeds (b, l, m) in place of idx's embedding rows (transformers' name); return_hidden=True
        returns the final hidden states (b, l, m), after the last RMSNorm, in place of logits, for one's own head."""
        if return_hidden and targets is not None:
            raise ValueError("return_hidden=True gives hidden states, not logits: there is no loss for targets")
        mask = self._check_inputs(idx, targets, attention_mask, inputs_embeds)
        x = self.embedding(idx) if inputs_embeds is None else inputs_embeds    # (b, l, m)
        if x.shape[1] > self.config.max_seq_length:
            raise ValueError(f"sequence length {x.shape[1]} is over max_seq_length={self.config.max_seq_length}")
        for layer in self.layers:
            x = layer(x, mask)
        logits = self._out(x, return_hidden)                                    # (b, l, v) or (b, l, m)
        routers = [layer.mlp.router_probs for layer in self.layers if isinstance(layer.mlp, MixtureOfExperts)]
        self.aux_loss = None if not routers else load_balancing_loss(
            routers, self.config.num_experts_per_tok, None if mask is None else mask.flatten())
        if targets is None:
            return logits, None
        targets = targets if mask is None else targets.masked_fill(~mask, -1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=-1)
        if self.aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * self.aux_loss
        return logits, loss

    # -----------------------------------------------------------------------------------------------------------
    # 6. Generation
    # -----------------------------------------------------------------------------------------------------------

    def prefill(self, idx=None, states=None, attention_mask=None, inputs_embeds=None, return_hidden=False):
        """The parallel pass of generation: idx (b, l), the tokens after those the states have read (or the first)
        -> (logits (b, l, v), states: (conv_state, ssm_state) per Mamba layer, an AttentionCache per attention
        layer). Pieces of any length, each read in parallel, give the logits and states of reading the whole.
        attention_mask as in forward, left padding only; inputs_embeds and return_hidden as in forward."""
        mask = self._check_inputs(idx, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        x = self.embedding(idx) if inputs_embeds is None else inputs_embeds    # (b, l, m)
        if states is not None:
            self._check_states(states, x.shape[0])
        new_states = []
        for layer, state in zip(self.layers, states or [None] * len(self.layers)):
            x, state = layer.prefill(x, state, mask)
            new_states.append(state)
        return self._out(x, return_hidden), new_states                          # (b, l, v) or (b, l, m)

    def step(self, token, states, inputs_embeds=None, return_hidden=False):
        """The recurrent pass: one token per sequence (b,) and the states -> (logits (b, v), new states).
        inputs_embeds (b, m) in place of token (then token=None), and return_hidden, as in forward."""
        if token is None or inputs_embeds is not None:
            if inputs_embeds is not None and not (isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.dim() == 2):
                raise ValueError("step's inputs_embeds must be one vector per sequence, a tensor of shape (b, m)")
            self._check_inputs(token, inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, None])
        x = self.embedding(token) if inputs_embeds is None else inputs_embeds  # (b, m)
        new_states = []
        for layer, state in zip(self.layers, states):
            x, state = layer.step(x, state)
            new_states.append(state)
        return self._out(x, return_hidden), new_states                          # (b, v) or (b, m)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, attention_mask=None):
        """Continue idx (b, l) by max_new_tokens tokens -> (b, l + max_new_tokens), as nanoGPT's generate.
        Parallel prefills over the prompt, in pieces of max_seq_length, return every layer's state; then each new
        token costs one step() per layer: O(1) per token in Mamba layers, O(cache) in attention layers ([Jamba]
        Section 2). temperature=0 picks the most likely token (greedy); top_k keeps only the k most likely.
        Past max_seq_length Mamba layers carry their state on and attention layers attend to the most recent
        max_seq_length tokens only (a sliding window). For prompts of different lengths, left-pad them and pass
        attention_mask (pad_prompts does both): each continues as it would alone. Call model.eval() first."""
        _check_int("max_new_tokens", max_new_tokens, low=0)
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None:
            _check_int("top_k (or None)", top_k)
        mask = self._check_inputs(idx, attention_mask=attention_mask)
        if mask is not None and ((mask[:, 1:] < mask[:, :-1]).any() or not mask[:, -1].all()):
            raise ValueError("attention_mask must be left-padded for generate: each row's pads (0) before its tokens "
                             "(1), and a token last; pad_prompts(prompts, pad_id) makes such a batch")
        states, piece = None, self.config.max_seq_length
        for start in range(0, idx.shape[1], piece):
            logits, states = self.prefill(idx[:, start:start + piece], states,
                                          None if mask is None else mask[:, start:start + piece])
        logits = logits[:, -1]                                                  # (b, v)
        new_tokens = []
        for i in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(dim=-1)                                   # (b,)
            else:
                scaled = logits.float() / temperature                           # (b, v)
                if top_k is not None and top_k < scaled.shape[-1]:
                    kth_largest = torch.topk(scaled, top_k, dim=-1).values[:, -1:]    # (b, 1)
                    scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
                token = torch.multinomial(F.softmax(scaled, dim=-1), num_samples=1)[:, 0]   # (b,)
            new_tokens.append(token)
            if i + 1 < max_new_tokens:
                logits, states = self.step(token, states)
        return torch.cat([idx, torch.stack(new_tokens, dim=1).to(idx.dtype)], dim=1) if new_tokens else idx

    # -----------------------------------------------------------------------------------------------------------
    # 7. Checkpoints in and out: a released Jamba loaded, a model saved in its format
    # -----------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """A JambaForCausalLM checkpoint from a local directory (config.json and model.safetensors, or the shards
        model.safetensors.index.json lists; nothing is downloaded), with exactly its plan: attention and experts'
        periods and offsets, heads, norms' epsilon, tied or untied head, no positional encoding ([Jamba] Section 6.5).
        Experts are read per expert (experts.{e}.gate_proj, the released files) or stacked (experts.gate_up_proj,
        recent transformers). Built on the meta device, the model takes the checkpoint's tensors as its parameters:
        one copy in memory, in their stored dtype unless dtype is given. Needs safetensors. Returns it in eval mode."""
        config, files = _read_hf_config(Path(path))
        load_file = _safetensors().load_file
        with torch.device("meta"):
            model = cls(config)
        state = _state_from_hf({key: value for file in files for key, value in load_file(file).items()}, model)
        if dtype is not None:
            state = {key: value.to(dtype) for key, value in state.items()}
        # assign=True makes the loaded tensors the parameters (no second copy); it also makes new Parameter
        # objects, so the no-weight-decay marks and the tied head are put back afterwards.
        marked = {name for name, param in model.named_parameters() if getattr(param, "_no_weight_decay", False)}
        model.load_state_dict(state, strict=True, assign=True)
        for name, param in model.named_parameters():
            param._no_weight_decay = name in marked
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embedding.weight
        return model.eval()

    def save_pretrained(self, path, special_token_ids=None, files=None):
        """Write a JambaForCausalLM checkpoint directory (config.json, model.safetensors) that transformers and
        from_pretrained read; special_token_ids ({"eos_token_id": 2}; all None by default) go into config.json, files
        ({name: text}, a tokenizer.json say) beside them. Written whole into a temporary directory, then renamed into
        place: never half a checkpoint; what the format cannot express raises first. Needs safetensors."""
        hf_config = _hf_config(self, special_token_ids)
        save_file = _safetensors().save_file
        state, tensors = self.state_dict(), {}
        for key, name in _hf_names(self).items():
            parts = state[key].split(_qkv_sizes(self, key)) if isinstance(name, tuple) else [state[key]]
            for part_name, part in zip(name if isinstance(name, tuple) else [name], parts):
                tensors[part_name] = part.detach().contiguous().cpu()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        try:
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
            save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
            for name, text in (files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            old = path.with_name(f".{path.name}-old-{os.getpid()}")
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


def pad_prompts(prompts, pad_id=0):
    """Prompts of different lengths as one left-padded batch for generate: a list of 1-D tensors of token ids ->
    (idx (b, l), attention_mask (b, l)), l the longest prompt's length, each row pad_id then its prompt."""
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(
            isinstance(p, torch.Tensor) and p.dim() == 1 and len(p) and not p.is_floating_point() for p in prompts):
        raise ValueError("prompts must be a non-empty list of 1-D tensors of token ids, each of at least one token")
    longest = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), longest), pad_id, dtype=prompts[0].dtype, device=prompts[0].device)
    attention_mask = torch.zeros(len(prompts), longest, dtype=torch.long, device=prompts[0].device)
    for row, prompt in enumerate(prompts):
        idx[row, longest - len(prompt):], attention_mask[row, longest - len(prompt):] = prompt, 1
    return idx, attention_mask


# The public configuration's defaults (transformers' JambaConfig), for keys a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-6,
                    tie_word_embeddings=False, max_position_embeddings=262144, num_experts=16,
                    num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=8,
                    attn_layer_offset=4, router_aux_loss_coef=0.001, mamba_d_state=16, mamba_d_conv=4,
                    mamba_expand=2, mamba_dt_rank="auto", mamba_conv_bias=True, mamba_proj_bias=False)
# JambaConfig's fields under their names in config.json (the layer counts come from the attention plan, and the
# settings every released Jamba shares, silu and the Mamba biases, are only checked).
_HF_CONFIG_NAMES = dict(d_model="hidden_size", dim_feedforward="intermediate_size", nhead="num_attention_heads",
                        max_seq_length="max_position_embeddings", d_state="mamba_d_state", d_conv="mamba_d_conv",
                        expand="mamba_expand", dt_rank="mamba_dt_rank", **{name: name for name in (
                            "vocab_size", "num_key_value_heads", "num_experts", "num_experts_per_tok",
                            "expert_layer_period", "expert_layer_offset", "router_aux_loss_coef", "attn_layer_period",
                            "attn_layer_offset", "tie_word_embeddings", "rms_norm_eps")})
_HF_FIXED = dict(hidden_act="silu", mamba_conv_bias=True, mamba_proj_bias=False)


def _safetensors():
    """safetensors.torch, imported only where a checkpoint is read or written; where missing, one line saying so."""
    try:
        import safetensors.torch
    except ImportError:
        raise ModuleNotFoundError("checkpoints in the Hugging Face format need the safetensors package: pip install "
                                  "safetensors", name="safetensors") from None
    return safetensors.torch


def _read_hf_config(path):
    """(JambaConfig, safetensors files) of a JambaForCausalLM directory; any problem raises before a tensor is read."""
    if not path.is_dir():
        raise ValueError(f"path {str(path)!r} is not a directory: give the local directory of a Jamba checkpoint "
                         "(config.json and model.safetensors)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"path {str(path)!r} has no config.json: not a Hugging Face checkpoint directory")
    try:
        hf = {**_HF_DEFAULTS, **json.loads(config_file.read_text(encoding="utf-8"))}
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not readable JSON ({err})") from None
    if hf.get("model_type") != "jamba":
        raise ValueError(f"{config_file}: model_type is {hf.get('model_type')!r}, but only 'jamba' "
                         "(JambaForCausalLM) checkpoints can be loaded")
    unsupported = {key: hf[key] for key, ours in _HF_FIXED.items() if hf[key] != ours}
    if unsupported:
        raise ValueError(f"{config_file}: {unsupported} is not supported (this implementation has silu, a conv bias "
                         "and no Mamba projection biases, as every released Jamba)")
    n_layers, period, offset = hf["num_hidden_layers"], hf["attn_layer_period"], hf["attn_layer_offset"]
    n_attention = sum(i % period == offset for i in range(n_layers)) if isinstance(period, int) and period > 0 else 0
    try:
        config = JambaConfig(**{ours: hf[theirs] for ours, theirs in _HF_CONFIG_NAMES.items()}, rotary=False,
                             num_mamba_layers=n_layers - n_attention, num_transformer_layers=n_attention)
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise ValueError(f"path {str(path)!r} has neither model.safetensors nor model.safetensors.index.json")
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise ValueError(f"{index}: lists shards that are not in the directory: {missing}")
    return config, files


def _hf_names(model):
    """Our state_dict's keys -> JambaForCausalLM's names (embedding = model.embed_tokens, norm = final_layernorm,
    mixer_norm = input_layernorm, mlp_norm = pre_ff_layernorm, mixer = mamba or self_attn, mlp = feed_forward, its
    experts per expert); qkv_proj -> (q_proj, k_proj, v_proj) stacked, out_proj -> o_proj; a tied head has none."""
    names = {}
    for key in model.state_dict():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if not key.startswith("layers."):
            names[key] = {"embedding.weight": "model.embed_tokens.weight",
                          "norm.weight": "model.final_layernorm.weight"}.get(key, key)
            continue
        _, i, module, rest = key.split(".", 3)
        prefix = f"model.layers.{i}."
        if module == "mixer" and model.layer_pattern[int(i)] == "A":
            names[key] = (tuple(f"{prefix}self_attn.{p}_proj.weight" for p in "qkv") if rest == "qkv_proj.weight"
                          else f"{prefix}self_attn.o_proj.weight")
        else:
            names[key] = prefix + {"mixer": "mamba", "mixer_norm": "input_layernorm", "mlp_norm": "pre_ff_layernorm",
                                   "mlp": "feed_forward"}[module] + "." + rest
    return names


def _qkv_sizes(model, key):
    """The rows of q, k and v in the qkv_proj.weight under key: d_model, then g e twice."""
    mixer = model.get_submodule(key.removesuffix(".qkv_proj.weight"))
    return [model.config.d_model] + 2 * [mixer.num_key_value_heads * mixer.head_size]


def _state_from_hf(hf_state, model):
    """model's state_dict from the tensors of a JambaForCausalLM checkpoint (names as _hf_names maps them), which
    may also keep experts stacked in two tensors per layer (experts.gate_up_proj, experts.down_proj)."""
    c, used, state = model.config, set(), {}

    def take(hf_key, expected_shape):
        if hf_key not in hf_state:
            raise ValueError(f"the checkpoint has no tensor {hf_key!r}, which its config.json implies")
        if tuple(hf_state[hf_key].shape) != tuple(expected_shape):
            raise ValueError(f"{hf_key} has shape {tuple(hf_state[hf_key].shape)} in the checkpoint, but its "
                             f"config.json gives it {tuple(expected_shape)}")
        used.add(hf_key)
        return hf_state[hf_key]

    stacked = {}                                    # the MoE layers whose experts come stacked in two tensors
    for i, kind in enumerate(model.mlp_pattern):
        prefix = f"model.layers.{i}.feed_forward.experts."
        if kind == "E" and f"{prefix}0.gate_proj.weight" not in hf_state:
            if f"{prefix}gate_up_proj" not in hf_state:
                found = sorted(key for key in hf_state if key.startswith(prefix))[:4]
                raise ValueError(f"layer {i}: cannot read its experts: expected {prefix}{{e}}.gate_proj.weight "
                                 f"(released files) or {prefix}gate_up_proj (transformers), found {found}")
            E, f, m = c.num_experts, c.dim_feedforward, c.d_model
            stacked[prefix] = (take(f"{prefix}gate_up_proj", (E, 2 * f, m)), take(f"{prefix}down_proj", (E, m, f)))

    shapes = {key: param.shape for key, param in model.state_dict().items()}
    for key, name in _hf_names(model).items():
        if isinstance(name, tuple):                 # q, k, v stacked into qkv_proj
            state[key] = torch.cat([take(part, (rows, c.d_model)) for part, rows in zip(name, _qkv_sizes(model, key))])
        elif name.rsplit(".", 3)[0] + "." in stacked:
            gate_up, down = stacked[name.rsplit(".", 3)[0] + "."]
            _, e, kind, _ = name.rsplit(".", 3)
            f = c.dim_feedforward
            state[key] = {"gate_proj": gate_up[int(e), :f], "up_proj": gate_up[int(e), f:],
                          "down_proj": down[int(e)]}[kind]
        else:
            state[key] = take(name, shapes[key])
    if c.tie_word_embeddings:                       # tied: the embedding's tensor, whether stored twice or not
        used.add("lm_head.weight")
        state["lm_head.weight"] = state["embedding.weight"]
    unexpected = sorted(set(hf_state) - used)
    if unexpected:
        raise ValueError(f"the checkpoint has {len(unexpected)} tensors its config.json does not account for, "
                         f"e.g. {unexpected[:3]}")
    return state


def _hf_config(model, special_token_ids):
    """config.json for JambaForCausalLM: every setting of model in the public configuration's names (a ValueError
    saying what to change where the format cannot express the model)."""
    c, n_layers = model.config, len(model.layers)
    if any(isinstance(layer.mixer, AttentionBlock) and layer.mixer.rotary for layer in model.layers):
        raise ValueError("the model has rotary positions in an attention layer, which Jamba's format cannot express "
                         "(its attention has no positional encoding): build it with rotary=False")
    plans = [(c.attn_layer_period, c.attn_layer_offset)] if c.attn_layer_period is not None else [
        (period, offset) for period in range(1, n_layers + 2) for offset in range(period)]
    plan = next(((period, offset) for period, offset in plans if model.layer_pattern == "".join(
        "A" if i % period == offset else "M" for i in range(n_layers))), None)
    if plan is None:
        raise ValueError(f"layer_pattern {model.layer_pattern!r} is not one that attn_layer_period and "
                         "attn_layer_offset give (attention where i % period == offset): choose a number of "
                         "attention layers that divides the layers evenly, or set the period and offset")
    settings = dict(dataclasses.asdict(c), attn_layer_period=plan[0], attn_layer_offset=plan[1],
                    num_key_value_heads=c.num_key_value_heads or c.nhead)
    return {"architectures": ["JambaForCausalLM"], "model_type": "jamba", "num_hidden_layers": n_layers,
            **{theirs: settings[ours] for ours, theirs in _HF_CONFIG_NAMES.items()}, **_HF_FIXED,
            "attention_dropout": 0.0, "dtype": str(model.embedding.weight.dtype).removeprefix("torch."),
            **dict(dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id")), **(special_token_ids or {}))}
