"""
JAMBA: a minimal, single-file PyTorch implementation of the Jamba hybrid Mamba-Transformer model.

References, open them beside this file:
  [Mamba] Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
          arXiv 2312.00752.
  [Jamba] Lieber et al., "Jamba: A Hybrid Transformer-Mamba Language Model", arXiv 2403.19887.
  The Mamba reference code (state-spaces/mamba): selective_scan_ref and mamba_simple.Mamba, whose
  argument layouts, parameter names and initialisation are kept, so its weights load as they are.
  The public Jamba code (transformers' JambaForCausalLM), whose module and configuration names are
  kept, so that its checkpoints load by a prefix; test_jamba.py checks the logits against it.

Reading order: the model first, each piece using only those above it; then the machinery it calls.
  1. Selective scans: sequential (Algorithm 2 as a loop), parallel, fused   [Mamba] 3, Algorithm 2
  2. MambaBlock                                                             [Mamba] Figure 3, 3.4
  3. AttentionBlock and its cache                                           [Jamba] Section 2
  4. MLP, MixtureOfExperts, load_balancing_loss                             [Jamba] Section 2
  5. layer_schedule, JambaConfig, JambaLayer, Jamba                         [Jamba] 2, Figure 1
  6. Generation: prefill, step, generate, pad_prompts                       [Mamba] 3.4
  7. Argument checks: each public entry point makes one call
  8. The fused kernels: loading kernels/fused.py, choosing a scan, when a step runs in one call
  9. The Hugging Face format: from_pretrained, save_pretrained

Glossary: the letters used in every shape comment.
  b  batch size                     l  sequence length (time)
  m  d_model, the residual width    d  SSM channels (d_inner = expand * d_model in a Mamba block)
  n  d_state, the SSM state size    r  dt_rank, the rank of the projection that makes Delta
  k  d_conv, the causal conv width  v  vocab_size
  h  attention heads (nhead)        e  head size, m // h
  g  key/value heads (GQA)          s  keys a query attends to, up to max_seq_length
  t  tokens, b * l flattened        c  a block of channels inside the parallel scan
  E  num_experts                    K  num_experts_per_tok, the router's top-K
Paper symbols: Delta (`delta`), A, B, C, D as in [Mamba] Section 2 and Algorithm 2; h the state.
Precision: as in the reference, the scans, the recurrent step, rotary positions and the router
compute in float32 for a float16 or bfloat16 model (exponentials, decays and long sums lose too much
in 8 or 11 bits of mantissa), float32 and float64 as they are: torch.promote_types(dtype, float32).
"""

import dataclasses
import functools
import importlib.util
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if torch.__version__ < "2.5":                  # torch 2.5 needs Python 3.9+: that is checked too
    raise ImportError(f"JAMBA needs torch 2.5+ and Python 3.9+, not torch {torch.__version__}")

# -------------------------------------------------------------------------------------------------
# 1. Selective scans
# -------------------------------------------------------------------------------------------------

def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False, return_last_state=False, initial_state=None,
                              _over_time=None):
    """The selective scan as a loop over time: [Mamba] Algorithm 2, lines 5-7, the oracle the fast
    scans are proven against. Signature and results as the reference's selective_scan_ref:
      u, delta, z (b, d, l); A (d, n), real; B, C (b, n, l); D, delta_bias (d,);
      initial_state (b, d, n) -> out (b, d, l) in u's dtype, and the last state h (b, d, n).
    Line 6 discretises A by the zero-order hold of Eq. (4), A-bar = exp(Delta A), but B by the
    simpler Euler step, B-bar = Delta B, not Eq. (4)'s (Delta A)^-1 (exp(Delta A) - I) Delta B. So
    does the reference: the two agree to first order in Delta, and A-bar is the term that matters.
    (_over_time is selective_scan_parallel's: what runs Eq. 2a and 2b in place of the loop.)"""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in, compute = u.dtype, torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (x.to(compute) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        # (b, d, l)  line 5's Parameter
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        # (b, d, l)  line 5's tau_Delta
        delta = F.softplus(delta)

    h = u.new_zeros(*u.shape[:2], A.shape[1]) if initial_state is None else \
        initial_state.to(compute)                                       # (b, d, n)
    if _over_time is not None:
        y, h = _over_time(u, delta, A, B, C, h)                         # (b, d, l), (b, d, n)
    else:
        ys = []
        # One step at a time. unbind, not delta[:, :, t]: indexing makes autograd build a full-size
        # gradient per step (quadratic); unbind's backward stacks the small per-step gradients once.
        for delta_t, u_t, B_t, C_t in zip(*(x.unbind(2) for x in (delta, u, B, C))):
            # (b, d, n)  A-bar_t, Eq. (4)
            dA_t = torch.exp(delta_t[..., None] * A)
            # (b, d, n)  B-bar_t u_t, Euler
            dBu_t = (delta_t * u_t)[..., None] * B_t[:, None]
            h = dA_t * h + dBu_t                                        # (b, d, n)  Eq. (2a)
            ys.append(torch.einsum("bdn,bn->bd", h, C_t))               # (b, d)     Eq. (2b)
        y = torch.stack(ys, 2)                                      # (b, d, l)

    if D is not None:
        y = y + D.to(compute)[:, None] * u                              # (b, d, l)  the skip D u
    if z is not None:
        # (b, d, l)  the gate, Figure 3
        y = y * F.silu(z.to(compute))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def _odd_even_scan_(a, x):
    """In place along dim 0 (time): x_t <- a_t * x_{t-1} + x_t, with x_{-1} = 0. Clobbers a.

    The odd-even parallel scan (Blelloch-style): O(l) work in log2(l) levels, each level one
    elementwise op on every other time step. For l = 8, writing x_i..j for "the recurrence from i
    to j":
      1. fold each pair (2i, 2i+1) into one step   x1 = x0..1   x3 = x2..3   x5 = x4..5   x7 = x6..7
         x_{2i+1} += a_{2i+1} x_{2i};  a_{2i+1} *= a_{2i}  (a_{2i+1} now spans the pair's two steps)
      2. the odd positions form a recurrence half as long: scan it (recursively, a strided view)
                                                   x1 = x0..1   x3 = x0..3   x5 = x0..5   x7 = x0..7
      3. each even position 2i >= 2 takes one step from the finished odd position before it
         x_{2i} += a_{2i} x_{2i-1}                 x2 = x0..2   x4 = x0..4   x6 = x0..6
    An odd length leaves its last element unpaired in step 1; step 3 finishes it like the others."""
    if len(x) < 2:
        return
    x[1::2].addcmul_(a[1::2], x[:-1:2])
    a[1::2].mul_(a[:-1:2])
    _odd_even_scan_(a[1::2], x[1::2])
    x[2::2].addcmul_(a[2::2], x[1:-1:2])


class _ParallelSelectiveScan(torch.autograd.Function):
    """Eq. (2a) and (2b) at all time steps at once, after Algorithm 2's line 5: u, delta (b, d, l);
    A (d, n); B, C (b, n, l); h0 (b, d, n) -> y = C h (b, d, l), the last state (b, d, n).
    Inside, tensors are time-major, (l, b, ...): each step the scan touches is one slab. Channels go
    in blocks whose (l, b, c, n) tensors stay in cache (the CPU's cache standing in for the GPU's
    SRAM of [Mamba] Section 3.3.2), and backward recomputes a block's states instead of storing
    them: memory O(b d l), not O(b d l n)."""

    @staticmethod
    def channel_blocks(b, d, l, n, device):
        """Slices of the d channels: about 4 MB per (l, b, c, n) float32 tensor on a CPU, whose
        cache then holds the few a block needs. A GPU has no cache that size, and each block costs a
        few dozen launches, so there a tensor may take a 256th of the free memory (about six are
        alive at once): a wide layer is then a block or a few, not thousands of tiny kernels."""
        elements = torch.cuda.mem_get_info(device)[0] // 256 if device.type == "cuda" else 2 ** 20
        c = max(1, elements // (b * l * n))
        return [slice(i, min(i + c, d)) for i in range(0, d, c)]

    @staticmethod
    def states(u, delta, A, B, h0):
        """Every h_t of one block, and A-bar: u, delta (l, b, c); A (c, n); B (l, b, n);
        h0 (b, c, n) -> h, dA (l, b, c, n). Eq. (2a), h_t = A-bar_t h_{t-1} + B-bar_t u_t, solved
        by _odd_even_scan_."""
        # (l, b, c, n)  A-bar, Eq. (4)
        dA = torch.exp(delta[..., None] * A)
        h = (delta * u)[..., None] * B[:, :, None]                      # (l, b, c, n)  B-bar u
        h[0].addcmul_(dA[0], h0)                                        # h0 enters at t = 0
        _odd_even_scan_(dA.clone(), h)
        return h, dA

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        (b, d, l), n = u.shape, A.shape[1]
        u, delta, B, C = (x.permute(2, 0, 1).contiguous() for x in (u, delta, B, C))   # (l, b, .)
        y, last = u.new_empty(l, b, d), u.new_empty(b, d, n)           # (l, b, d), (b, d, n)
        ctx.blocks = _ParallelSelectiveScan.channel_blocks(b, d, l, n, u.device)   # backward's too
        for ch in ctx.blocks:
            h, _ = _ParallelSelectiveScan.states(u[:, :, ch], delta[:, :, ch], A[ch], B, h0[:, ch])
            last[:, ch] = h[-1]
            y[:, :, ch] = torch.einsum("lbcn,lbn->lbc", h, C)            # (l, b, c)  Eq. (2b)
        ctx.save_for_backward(u, delta, A, B, C, h0)
        return y.permute(1, 2, 0), last                                 # (b, d, l), (b, d, n)

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        """Backpropagation through a linear recurrence is the same recurrence, backwards in time:
            g_t = dL/dh_t = C_t grad_y_t + A-bar_{t+1} g_{t+1}     (g_{l-1} also gets grad_last)
        which _odd_even_scan_ solves on time-reversed copies. Then dL/d(B-bar u)_t = g_t, and
        through A-bar = exp(Delta A), dL/d(Delta A)_t = g_t h_{t-1} A-bar_t; the chain rule gives
        the rest."""
        # time-major, as forward saved
        u, delta, A, B, C, h0 = ctx.saved_tensors
        grad_y = grad_y.permute(2, 0, 1).contiguous()                  # (l, b, d)
        grad_u, grad_delta, grad_A, grad_h0 = map(torch.empty_like, (u, delta, A, h0))
        # (l, b, n), summed over blocks
        grad_B, grad_C = map(torch.zeros_like, (B, C))
        for ch in ctx.blocks:
            u_c, delta_c, grad_y_c = (x[:, :, ch] for x in (u, delta, grad_y))   # (l, b, c)
            h, dA = _ParallelSelectiveScan.states(u_c, delta_c, A[ch], B, h0[:, ch])  # recomputed

            g = torch.einsum("lbc,lbn->lbcn", grad_y_c, C).flip(0)      # (l, b, c, n)  reversed
            g[0] += grad_last[:, ch]                                    # zeros where it is not used
            # A-bar_{t+1}, reversed
            dA_next = torch.cat([torch.zeros_like(dA[:1]), dA[1:].flip(0)])
            _odd_even_scan_(dA_next, g)
            # (l, b, c, n)  g_t = dL/dh_t
            g = g.flip(0)

            grad_h0[:, ch] = g[0] * dA[0]
            grad_C += torch.einsum("lbcn,lbc->lbn", h, grad_y_c)
            # dL/d(Delta A)_t = g_t h_{t-1} A-bar_t: (l, b, c, n), in the buffer of h_{t-1}
            grad_delta_A = torch.cat([h0[None, :, ch], h[:-1]]).mul_(g).mul_(dA)
            grad_delta_u = torch.einsum("lbcn,lbn->lbc", g, B)          # (l, b, c)  dL/d(Delta u)
            grad_u[:, :, ch] = grad_delta_u * delta_c
            grad_delta[:, :, ch] = grad_delta_u * u_c + torch.linalg.vecdot(grad_delta_A, A[ch])
            grad_A[ch] = torch.einsum("lbcn,lbc->cn", grad_delta_A, delta_c)
            grad_B += torch.einsum("lbcn,lbc->lbn", g, delta_c * u_c)
        grad_u, grad_delta, grad_B, grad_C = (
            x.permute(1, 2, 0) for x in (grad_u, grad_delta, grad_B, grad_C))   # (b, ., l)
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_h0


def selective_scan_parallel(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                            delta_softplus=False, return_last_state=False, initial_state=None):
    """The selective scan with no Python loop over time, in pure PyTorch for any device: the
    sequential scan, its signature, steps and results, with its loop over time done by
    _ParallelSelectiveScan. Every factor the scan multiplies is an A-bar in [0, 1] or a finite
    input, so large Delta and very negative A underflow to zero, never overflow."""
    return selective_scan_sequential(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     return_last_state, initial_state, _ParallelSelectiveScan.apply)


def selective_scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False, initial_state=None):
    """The selective scan as a fused CPU kernel: the sequential scan's signature and results.

    [Mamba] Section 3.3.2: the scan is bound by memory traffic, and materialising A-bar, B-bar u and
    the states in (b, d, l, n) costs n times the inputs' traffic. kernels/selective_scan.cpp does
    what the official CUDA kernel does in SRAM, with the CPU's L1 cache: each block of channels
    walks time with its state in cache, all of Algorithm 2 in one loop (its header explains how).
    A torch op, so torch.compile traces through it; CPU tensors only; built once, in seconds
    (section 8)."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out_h = _fused(required=True).selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                 initial_state)    # (b, d, l), (b, d, n)
    return out_h if return_last_state else out_h[0]


# -------------------------------------------------------------------------------------------------
# 2. The Mamba block
# -------------------------------------------------------------------------------------------------

class MambaBlock(nn.Module):
    """The Mamba mixer: [Mamba] Figure 3 and Algorithm 2, as the reference's mamba_simple.Mamba,
    whose parameter names, shapes and initialisation it keeps (its state_dict loads strictly):
      in_proj  (no bias)  m -> 2d, the SSM branch x and the gate z
      conv1d   depthwise causal conv of width k over time, with bias
      x_proj   (no bias)  d -> r + 2n: the input-dependent Delta (low rank), B and C (S6, 3.2)
      dt_proj  r -> d; its bias is softplus^-1 of dt ~ log-uniform[1e-3, 1e-1], floor 1e-4 (3.6)
      A_log    (d, n) = log(1..n) in every channel ("S4D-real"); A = -exp(A_log) < 0: |A-bar| < 1
      D        (d,) = 1, the skip connection
      out_proj (no bias)  d -> m
    inner_layernorms: [Jamba] Section 6.4 found Mamba layers at scale need RMSNorms on x_proj's
    split: dt_layernorm, b_layernorm, c_layernorm as in the public Jamba code (epsilon norm_eps).
    scan: "fused", "parallel", "sequential" (the selective_scan_ of that name) or "auto": fused on a
    CPU where it can be built (section 8), else parallel."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto",
                 inner_layernorms=False, norm_eps=1e-6, scan="auto"):
        super().__init__()
        _check_settings(**locals())               # every argument, by name
        self.d_inner = d = expand * d_model
        self.dt_rank = r = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.d_state, self.d_conv, self.inner_layernorms, self.scan = d_state, d_conv, \
            inner_layernorms, scan

        self.in_proj = nn.Linear(d_model, 2 * d, bias=False)
        self.conv1d = nn.Conv1d(d, d, d_conv, groups=d, padding=d_conv - 1)
        self.x_proj = nn.Linear(d, r + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(r, d)
        if inner_layernorms:
            self.dt_layernorm, self.b_layernorm, self.c_layernorm = (
                nn.RMSNorm(size, eps=norm_eps) for size in (r, d_state, d_state))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, d_model, bias=False)

        # Delta's projection: weights of its input's scale, and bias = softplus^-1(dt), so that the
        # first steps dt = softplus(bias) cover [1e-3, 1e-1] log-uniformly, as in the reference.
        nn.init.uniform_(self.dt_proj.weight, -r ** -0.5, r ** -0.5)
        dt = (0.001 * 100 ** torch.rand(d)).clamp(min=1e-4)
        self.dt_proj.bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))   # softplus^-1(dt)
        if scan in ("auto", "fused"):
            # built or found now, not inside a torch.compile trace
            _fused()

    def _conv(self, x, fused):
        """silu(causal depthwise conv1d(x)): (b, d, l) -> (b, d, l), t reading x_{t-k+1..t}."""
        if fused:
            return _fused(required=True).causal_conv(x.mT, self.conv1d.weight[:, 0], self.conv1d.bias).mT
        return F.silu(self.conv1d(x)[..., :x.shape[2]])

    def _delta_B_C(self, x):
        """The selection mechanism (Algorithm 2, lines 3-5): x (..., d) -> Delta before its bias
        (..., d), B and C (..., n); line 5's bias and softplus come in the scan."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], -1)
        if self.inner_layernorms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        return dt @ self.dt_proj.weight.t(), B, C

    def forward(self, x, mask=None):
        """x (b, l, m) -> (b, l, m); mask as in prefill."""
        return self.prefill(x, mask=mask)[0]

    def prefill(self, x, state=None, mask=None):
        """The parallel mode, [Mamba] Figure 3 in order: x (b, l, m) -> (out (b, l, m), the state
        after x), starting from state (conv_state (b, d, k), the conv's last k inputs; h (b, d, n))
        or zeros. mask (b, l), 1 at tokens and 0 at pads: pads are zeroed before in_proj and after
        the conv (as in transformers' Jamba), so pads before a row's tokens leave its state
        alone."""
        l, k = x.shape[1], self.d_conv
        keep = None if mask is None else mask[:, None].to(x.dtype)       # (b, 1, l)  0 at pads
        scan = _scan_function(self.scan, x.device)
        x_in, z = self.in_proj(x if keep is None else x * keep.mT).mT.chunk(2, 1)   # (b, d, l) each
        # the conv's inputs before x's
        if state is not None:
            x_in = torch.cat([state[0][..., 1:], x_in], 2)          # (b, d, k - 1 + l)
        x_conv = self._conv(x_in, fused=scan is selective_scan_fused)[..., -l:]   # (b, d, l)
        if keep is not None:
            x_conv = x_conv * keep
        delta, B, C = (t.mT for t in self._delta_B_C(x_conv.mT))        # (b, d, l), (b, n, l) twice
        A = -torch.exp(self.A_log.to(torch.promote_types(x.dtype, torch.float32)))   # (d, n)
        # (b, d, l), (b, d, n): Algorithm 2, and the gate y * silu(z) of Figure 3
        y, h = scan(x_conv, delta, A, B, C, self.D, z, self.dt_proj.bias, True, True,
                    None if state is None else state[1])
        conv_state = F.pad(x_in[..., -k:], (k - min(k, x_in.shape[2]), 0))   # (b, d, k)
        return self.out_proj(y.mT), (conv_state, h)                     # (b, l, m)

    def step(self, x, state):
        """The recurrent mode ([Mamba] Section 3.4, the reference's step): one token x (b, m) and
        the state (conv_state (b, d, k), h (b, d, n), whose dtype the SSM computes in) ->
        (out (b, m), the new state): Figure 3 at one position, the sequential scan's loop body once;
        O(1)."""
        conv_state, h = state
        x_in, z = self.in_proj(x).chunk(2, -1)                      # (b, d) each
        conv_state = torch.cat([conv_state[..., 1:], x_in[..., None]], -1)   # (b, d, k)
        x_conv = F.silu(torch.einsum("bdk,dk->bd", conv_state, self.conv1d.weight[:, 0])
                        + self.conv1d.bias)                             # (b, d)
        delta, B, C = self._delta_B_C(x_conv)                           # (b, d), (b, n), (b, n)
        u, delta, B, C, z, bias, A_log, D = (t.to(h.dtype) for t in (
            x_conv, delta, B, C, z, self.dt_proj.bias, self.A_log, self.D))
        delta = F.softplus(delta + bias)                                # (b, d)
        dA = torch.exp(delta[..., None] * -torch.exp(A_log))            # (b, d, n)  A-bar
        h = dA * h + (delta * u)[..., None] * B[:, None]                # (b, d, n)  Eq. (2a)
        y = torch.einsum("bdn,bn->bd", h, C) + D * u                    # (b, d)  Eq. (2b), + D u
        return self.out_proj((y * F.silu(z)).to(x.dtype)), (conv_state, h)


# -------------------------------------------------------------------------------------------------
# 3. The attention block
# -------------------------------------------------------------------------------------------------

def _rotary(x, positions):
    """Rotary position embedding (Su et al., RoFormer, arXiv 2104.09864): x (b, h, l, e) at
    positions (b, l) -> (b, h, l, e)."""
    e, compute = x.shape[3], torch.promote_types(x.dtype, torch.float32)
    inv_freq = 10000.0 ** (-torch.arange(0, e, 2, device=x.device, dtype=compute) / e)   # (e/2,)
    angle = positions[:, None, :, None].to(compute) * inv_freq          # (b, 1, l, e/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.to(compute).chunk(2, -1)                             # (b, h, l, e/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


class AttentionCache(NamedTuple):
    """An attention layer's state in generation. The first `length` slots of keys and values
    (b, g, room, e) hold the latest steps, oldest first, and is_token (b, 1, room, 1) which are
    tokens, not pads; next_position (b, 1), each row's next rotary position (its tokens so far)."""
    keys: torch.Tensor
    values: torch.Tensor
    is_token: torch.Tensor
    length: int
    next_position: torch.Tensor


class AttentionBlock(nn.Module):
    """Causal self-attention by F.scaled_dot_product_attention, with a key/value cache.
    num_key_value_heads: grouped-query attention (Ainslie et al., arXiv 2305.13245; [Jamba] Section
    2 has 32 query heads share 8): each group of query heads shares one key and one value head,
    which shrinks the cache by nhead // num_key_value_heads (None: nhead, multi-head attention).
    rotary: [Jamba] Section 6.5 found no positional encoding is needed after Mamba layers (they
    carry position implicitly); an attention layer before any can get rotary embeddings instead.
    In generation (prefill, step) each query sees the last max_seq_length steps only (a sliding
    window). Pads (0 in a mask (b, l)) are never attended to and take no rotary position, so that a
    left-padded row attends as it would alone."""

    def __init__(self, d_model, nhead, dropout=0.0, max_seq_length=1024, rotary=False,
                 num_key_value_heads=None):
        super().__init__()
        _check_settings(**locals())               # every argument, by name
        self.nhead, self.num_key_value_heads = nhead, num_key_value_heads or nhead
        self.head_size, self.dropout, self.rotary = d_model // nhead, dropout, rotary
        self.max_seq_length, g_e = max_seq_length, self.num_key_value_heads * self.head_size
        # m -> h e = m, g e, g e; m -> m
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(d_model, size, bias=False) for size in (d_model, g_e, g_e, d_model))
        self.resid_dropout = nn.Dropout(dropout)

    def _qkv(self, x, positions):
        """x (b, l, m) at rotary positions (b, l) -> q (b, h, l, e), k and v (b, g, l, e)."""
        q, k, v = (proj(x).unflatten(-1, (-1, self.head_size)).transpose(1, 2)   # (b, h or g, l, e)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.rotary:
            q, k = _rotary(q, positions), _rotary(k, positions)
        return q, k, v

    def _attend(self, q, k, v, mask=None, is_causal=False):
        """Each query head attends with its group's key/value head: q (b, h, l, e);
        k, v (b, g, s, e); mask (b, 1, l, s), True where a query may attend -> (b, l, m)."""
        y = F.scaled_dot_product_attention(q, k, v, mask, self.dropout if self.training else 0.0,
                                           is_causal, enable_gqa=k.shape[1] != q.shape[1])
        return self.resid_dropout(self.o_proj(y.transpose(1, 2).flatten(2)))   # (b, l, m)

    def forward(self, x, mask=None):
        """x (b, l, m) -> (b, l, m): each position attends to itself and the positions before it
        (l is at most max_seq_length, as Jamba.forward ensures); mask as in prefill."""
        if mask is not None:
            return self.prefill(x, mask=mask)[0]
        q, k, v = self._qkv(x, torch.arange(x.shape[1], device=x.device)[None])   # (b, ., l, e)
        return self._attend(q, k, v, is_causal=True)

    def prefill(self, x, state=None, mask=None):
        """The parallel mode of generation: x (b, l, m), the steps after state's (or the first) ->
        (out (b, l, m), the cache with x's keys and values appended). Each query attends to the
        tokens among the last max_seq_length steps, the cache's and x's own; mask (b, l): 0 at
        pads."""
        b, l, _ = x.shape
        is_token = x.new_ones(b, l, dtype=torch.bool) if mask is None else mask.bool()   # (b, l)
        first = 0 if state is None else state.next_position             # (b, 1)
        q, k, v = self._qkv(x, first + is_token.cumsum(-1) - 1)         # a pad repeats a position
        state = self._append(state, k, v, is_token, first + is_token.sum(-1, keepdim=True))
        s = min(state.length - l, self.max_seq_length - 1) + l          # the steps x's queries see
        seen = slice(state.length - s, state.length)
        causal = torch.ones(l, s, dtype=torch.bool, device=x.device).tril(s - l)   # (l, s)
        # (b, 1, l, s): the tokens among the last max_seq_length steps, and itself (else a pad's
        # query would see nothing: its output is not used)
        visible = causal.triu(s - l - self.max_seq_length + 1) & state.is_token[:, :, seen].mT
        return self._attend(q, state.keys[:, :, seen], state.values[:, :, seen],
                            visible | causal.triu(s - l)), state

    def step(self, x, state):
        """One token x (b, m) and its cache -> (out (b, m), the cache, appended to in place):
        prefill for one query, over the tokens among the last max_seq_length steps."""
        q, k, v = self._qkv(x[:, None], state.next_position)        # (b, h, 1, e), (b, g, 1, e)
        token = state.next_position >= 0                                # (b, 1)  True
        state = self._append(state, k, v, token, state.next_position + 1)
        seen = slice(max(0, state.length - self.max_seq_length), state.length)
        return self._attend(q, state.keys[:, :, seen], state.values[:, :, seen],
                            state.is_token[:, :, seen].mT)[:, 0], state     # mask (b, 1, 1, s)

    def _append(self, cache, k, v, is_token, next_position):
        """cache (or None) with l more steps written into its free slots: k, v (b, g, l, e),
        is_token (b, l). When too few slots are free, the steps a later query can still see (the
        last max_seq_length - 1) move to a new room with 64 slots to spare: a copy of them every 64
        steps, which adds a 64th to what attention reads per step, not the copy of every step."""
        new = (k, v, is_token[:, None, :, None])                        # (b, ., l, .)
        n, l = (0 if cache is None else cache.length), k.shape[2]
        if cache is None or n + l > cache.keys.shape[2]:
            kept = min(n, self.max_seq_length - 1)
            old = [t[:, :, :0] for t in new] if cache is None else cache[:3]
            cache = AttentionCache(*(torch.cat([o[:, :, n - kept:n], t.new_empty(
                *t.shape[:2], kept + l + 64, t.shape[3])], 2) for o, t in zip(old, new)), kept, 0)
            n = kept
        for buffer, t in zip(cache, new):
            buffer[:, :, n:n + l] = t
        return cache._replace(length=n + l, next_position=next_position)


# -------------------------------------------------------------------------------------------------
# 4. The MLP: dense, then a mixture of experts
# -------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Jamba's gated SiLU MLP (SwiGLU, Shazeer arXiv 2002.05202): down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model, dim_feedforward, dropout=0.0):
        super().__init__()
        self.gate_proj, self.up_proj = (
            nn.Linear(d_model, dim_feedforward, bias=False) for _ in range(2))
        self.down_proj = nn.Linear(dim_feedforward, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        """x (..., m) -> the same shape."""
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MixtureOfExperts(nn.Module):
    """[Jamba] Section 2's MoE layer: num_experts gated SiLU MLPs, of which a router picks
    num_experts_per_tok per token (Shazeer et al., arXiv 1701.06538); Jamba picks 2 of 16 in every
    other layer: 16x the parameters at about 2x the compute per token. The router is a bias-free
    linear with a softmax over all experts; each token's K most probable experts are weighted by
    those probabilities as they are, not renormalised (as the public Jamba code; Mixtral
    renormalises). Only the chosen experts run, each once on the tokens grouped to it. After a
    forward, router_probs (t, E) holds the probabilities for load_balancing_loss."""

    def __init__(self, d_model, dim_feedforward, num_experts, num_experts_per_tok=2, dropout=0.0):
        super().__init__()
        _check_settings(**locals())               # every argument, by name
        self.num_experts_per_tok = num_experts_per_tok
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(d_model, dim_feedforward, dropout) for _ in range(num_experts))
        self.router_probs = None

    def forward(self, x):
        """x (..., m) -> the same shape."""
        tokens = x.flatten(0, -2)                                       # (t, m)
        self.router_probs = F.softmax(self.router(tokens), -1,
                                      dtype=torch.promote_types(x.dtype, torch.float32))   # (t, E)
        weights, chosen = self.router_probs.topk(self.num_experts_per_tok, -1)   # (t, K) each
        out = torch.zeros_like(tokens)                                  # (t, m)
        for e, expert in enumerate(self.experts):
            # (t_e,) the tokens that chose e
            token, k = torch.where(chosen == e)
            # An expert no token chose still runs, on no rows, so that its weights get a zero
            # gradient rather than none (which DistributedDataParallel takes for an unused one).
            out.index_add_(0, token, weights[token, k, None].to(x.dtype) * expert(tokens[token]))
        return out.view_as(x)


def load_balancing_loss(router_probs, num_experts_per_tok, token_mask=None):
    """The Switch Transformer's auxiliary loss (Fedus et al., arXiv 2101.03961, Eq. 4-6) with top-K
    routing, as the public Jamba code: E sum_e f_e P_e, f_e the fraction of tokens that chose expert
    e among their K, P_e its mean router probability, over every MoE layer's tokens. f sums to K: an
    even spread gives K, piling onto few experts more; only P carries a gradient. router_probs: a
    (t, E) tensor per MoE layer; token_mask (t,): the tokens to count (not pads), or None."""
    probs = torch.cat(router_probs)                                     # (T, E)  every layer's
    E = probs.shape[1]
    # (T,): each token's weight in the means
    weight = probs.new_ones(len(probs)) if token_mask is None else \
        token_mask.to(probs.dtype).repeat(len(router_probs))
    chosen = probs.topk(num_experts_per_tok, -1).indices            # (T, K)
    f = weight @ F.one_hot(chosen, E).sum(1).to(probs.dtype) / weight.sum()   # (E,)  Eq. (5) x K
    P = weight @ probs / weight.sum()                                   # (E,)  Eq. (6)
    return E * (f * P).sum()                                            # Eq. (4)


# -------------------------------------------------------------------------------------------------
# 5. The layer plan and the Jamba model
# -------------------------------------------------------------------------------------------------

def layer_schedule(num_mamba_layers, num_transformer_layers, attn_layer_period=None,
                   attn_layer_offset=None):
    """The layer pattern, 'M' for Mamba and 'A' for attention. With a attention layers among N,
    attention layer k sits at floor((k + 1/2) N / a): spread evenly, each in the middle of its
    share. N=8, a=1 gives "MMMMAMMM", the 1:7 Jamba block of [Jamba] Section 2 and Figure 1; N=32,
    a=4 puts attention at 4, 12, 20, 28. With attn_layer_period and attn_layer_offset (the public
    configuration's way), layer i is attention where i % period == offset: Jamba-v0.1 has 32
    layers, period 8, offset 4."""
    n, a = num_mamba_layers + num_transformer_layers, num_transformer_layers
    if attn_layer_period is None:
        attention_at = {(2 * j + 1) * n // (2 * a) for j in range(a)}
    else:
        attention_at = {i for i in range(n) if i % attn_layer_period == attn_layer_offset}
    return "".join("A" if i in attention_at else "M" for i in range(n))


@dataclasses.dataclass
class JambaConfig:
    """Every setting of the model, in one place: Jamba(config) or Jamba(**settings), checkpoints
    and train_tiny.py's flags all read it. Names follow the public Jamba configuration's where it
    has the setting."""
    vocab_size: int
    d_model: int                       # the residual width m (Jamba: hidden_size, 4096)
    num_mamba_layers: int              # 0 gives a plain transformer
    num_transformer_layers: int        # attention layers; 0 gives a plain Mamba LM
    nhead: int                         # query heads
    dim_feedforward: int               # the MLPs' hidden width (Jamba: intermediate_size)
    max_seq_length: int                # forward's longest input; attention's window in generation
    dropout: float = 0.0
    d_state: int = 16                  # the Mamba block's settings, with the reference's defaults
    d_conv: int = 4
    expand: int = 2
    dt_rank: "int | str" = "auto"      # "auto": ceil(d_model / 16)
    num_key_value_heads: "int | None" = None   # grouped-query attention; None: nhead (Jamba: 8 of 32)
    num_experts: int = 1               # 1: every MLP is dense; Jamba: 16
    num_experts_per_tok: int = 2       # the router's top-K
    expert_layer_period: int = 2       # layer i has experts where i % period == offset: every
    expert_layer_offset: int = 1       # other layer, from the second, as in Jamba
    router_aux_loss_coef: float = 0.001    # the load-balancing term's weight in the loss
    attn_layer_period: "int | None" = None   # attention where i % period == offset (Jamba: 8, 4);
    attn_layer_offset: "int | None" = None   # None: spread evenly, see layer_schedule
    rotary: bool = True                # rotary positions in attention layers before any Mamba layer
    tie_word_embeddings: bool = True   # the head shares the embedding's weights (Jamba: False)
    rms_norm_eps: float = 1e-6
    scan: str = "auto"                 # fused kernel on CPU, else parallel; or the scan's name

    def __post_init__(self):
        _check_config(self)


class JambaLayer(nn.Module):
    """One pre-norm residual layer ([Jamba] Figure 1): x = x + mixer(norm(x)), then x = x +
    feed_forward(norm(x)). The mixer is a MambaBlock or an AttentionBlock, the feed-forward an MLP
    or a MixtureOfExperts."""

    def __init__(self, mixer, feed_forward, d_model, norm_eps=1e-6):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mixer = mixer
        self.pre_ff_layernorm = nn.RMSNorm(d_model, eps=norm_eps)
        self.feed_forward = feed_forward

    def forward(self, x, mask=None):
        """x (b, l, m) -> (b, l, m); mask (b, l) or None, as the mixers take it."""
        return self._feed_forward(x + self.mixer(self.input_layernorm(x), mask))

    def prefill(self, x, state=None, mask=None):
        """x (b, l, m) from the mixer's state (or none) -> (b, l, m), the mixer's state after x."""
        mixed, state = self.mixer.prefill(self.input_layernorm(x), state, mask)
        return self._feed_forward(x + mixed), state

    def step(self, x, state):
        """x (b, m) -> (b, m), the mixer's new state."""
        mixed, state = self.mixer.step(self.input_layernorm(x), state)
        return self._feed_forward(x + mixed), state

    def _feed_forward(self, x):
        """The second residual half: x + feed_forward(norm(x))."""
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class Jamba(nn.Module):
    """The Jamba language model ([Jamba] Section 2): token embedding, a plan of Mamba and attention
    layers (layer_schedule) with dense or mixture-of-experts feed-forwards, a final RMSNorm and an
    output head. Jamba(config) with a JambaConfig, or Jamba(**settings) with its fields.
    model.layer_pattern shows the mixers ('M' Mamba, 'A' attention), model.mlp_pattern the
    feed-forwards ('D' dense, 'E' experts); after a forward, model.aux_loss is the load-balancing
    term (None without experts). Jamba.from_pretrained and model.save_pretrained read and write the
    public Jamba checkpoint format (section 9)."""

    def __init__(self, config=None, **settings):
        super().__init__()
        self.config = c = JambaConfig(**settings) if config is None else config
        # a given config checked too; its plan
        self.layer_pattern = _check_config(c, config and settings)
        m, eps = c.d_model, c.rms_norm_eps
        self.mlp_pattern = "".join(
            "E" if c.num_experts > 1 and i % c.expert_layer_period == c.expert_layer_offset else "D"
            for i in range(len(self.layer_pattern)))
        self.embed_tokens = nn.Embedding(c.vocab_size, m)
        self.layers = nn.ModuleList(JambaLayer(
            MambaBlock(m, c.d_state, c.d_conv, c.expand, c.dt_rank, True, eps, c.scan)
            if kind == "M" else AttentionBlock(m, c.nhead, c.dropout, c.max_seq_length,
                                               c.rotary and "M" not in self.layer_pattern[:i],
                                               c.num_key_value_heads),
            MixtureOfExperts(m, c.dim_feedforward, c.num_experts, c.num_experts_per_tok,
                             c.dropout) if mlp == "E" else MLP(m, c.dim_feedforward, c.dropout),
            m, eps) for i, (kind, mlp) in enumerate(zip(self.layer_pattern, self.mlp_pattern)))
        self.final_layernorm = nn.RMSNorm(m, eps=eps)
        self.lm_head = nn.Linear(m, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            # weight tying (Press & Wolf)
            self.lm_head.weight = self.embed_tokens.weight
        self.aux_loss = None
        # GPT-2's init, leaving the Mamba block's own (dt_proj, conv1d, A_log, D) as it made them:
        # N(0, 0.02), and the projections that write into the residual stream scaled by 1/sqrt(2 N),
        # so that its variance does not grow with depth.
        for name, module in self.named_modules():
            if isinstance(module, (nn.Embedding, nn.Linear)) and not name.endswith("dt_proj"):
                nn.init.normal_(module.weight, std=0.02 / math.sqrt(2 * len(self.layers)) if
                                name.endswith(("out_proj", "o_proj", "down_proj")) else 0.02)

    def extra_repr(self):
        return f"layer_pattern={self.layer_pattern!r}, mlp_pattern={self.mlp_pattern!r}"

    def forward(self, idx=None, targets=None, attention_mask=None, inputs_embeds=None,
                return_hidden=False):
        """idx (b, l) token ids, l <= max_seq_length -> (logits (b, l, v), mean cross-entropy loss
        or None).
        targets (b, l): the next token at each position; -1 marks positions to ignore, as do pads.
        attention_mask (b, l): 1 for tokens, 0 for pads (any pattern here; generate needs left
        padding), which Mamba layers zero, attention layers never attend to, and the load-balancing
        term leaves out. With experts the loss adds router_aux_loss_coef times that term
        (model.aux_loss). For what is not tokens: inputs_embeds (b, l, m) in place of idx's
        embeddings (transformers' name); return_hidden=True returns the final hidden states
        (b, l, m), after the last RMSNorm, in place of logits, for a head of one's own."""
        mask = _check_inputs(self, idx, targets, attention_mask, inputs_embeds, return_hidden,
                             max_length=self.config.max_seq_length)
        x = self.embed_tokens(idx) if inputs_embeds is None else inputs_embeds   # (b, l, m)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_layernorm(x)                                     # (b, l, m)
        routers = [moe.router_probs for moe in self.modules() if isinstance(moe, MixtureOfExperts)]
        self.aux_loss = load_balancing_loss(routers, self.config.num_experts_per_tok, None if mask
                                            is None else mask.flatten()) if routers else None
        logits = x if return_hidden else self.lm_head(x)                # (b, l, v) or (b, l, m)
        if targets is None:                                             # return_hidden: always
            return logits, None
        targets = targets if mask is None else targets.masked_fill(~mask, -1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(),
                               ignore_index=-1)
        if self.aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * self.aux_loss
        return logits, loss

    # ---------------------------------------------------------------------------------------------
    # 6. Generation
    # ---------------------------------------------------------------------------------------------

    def prefill(self, idx=None, states=None, attention_mask=None, inputs_embeds=None,
                return_hidden=False):
        """The parallel pass of generation: idx (b, l), the tokens after those the states have read
        (or the first) -> (logits (b, l, v), states: (conv_state, h) per Mamba layer, an
        AttentionCache per attention layer). Pieces of any length, each read in parallel, give the
        logits and states of reading the whole. attention_mask as in forward, but left padding only
        (pads before a row's tokens; a pad after them is refused, since it would change the state);
        inputs_embeds and return_hidden as in forward."""
        mask = _check_inputs(self, idx, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             states=states, left_padded=True)
        x = self.embed_tokens(idx) if inputs_embeds is None else inputs_embeds   # (b, l, m)
        states = list(states or [None] * len(self.layers))
        for i, layer in enumerate(self.layers):
            x, states[i] = layer.prefill(x, states[i], mask)
        x = self.final_layernorm(x)                                     # (b, l, m)
        return (x if return_hidden else self.lm_head(x)), states       # (b, l, v) or (b, l, m)

    def step(self, token, states, inputs_embeds=None, return_hidden=False):
        """The recurrent pass: one token per sequence (b,) and the states -> (logits (b, v), the new
        states). inputs_embeds (b, m) in place of token (then None), and return_hidden, as in
        forward."""
        _check_step(self, token, states, inputs_embeds)
        x = self.embed_tokens(token) if inputs_embeds is None else inputs_embeds   # (b, m)
        if _fusable(self, x, states):               # the same arithmetic in one kernel call
            return _fused().model_step(self, x, states, return_hidden)
        states = list(states)
        for i, layer in enumerate(self.layers):
            x, states[i] = layer.step(x, states[i])
        x = self.final_layernorm(x)                                     # (b, m)
        return (x if return_hidden else self.lm_head(x)), states       # (b, v) or (b, m)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, attention_mask=None):
        """Continue idx (b, l) by max_new_tokens tokens -> (b, l + max_new_tokens), as nanoGPT's.
        Parallel prefills over the prompt, in pieces of max_seq_length, give every layer's state;
        then each new token costs one step() per layer: O(1) per token in Mamba layers, O(cache) in
        attention layers ([Jamba] Section 2). temperature=0 picks the most likely token (greedy);
        top_k keeps only the k most likely. Past max_seq_length Mamba layers carry their state on
        and attention layers see the last max_seq_length steps only (a sliding window). For prompts
        of different lengths, left-pad them and pass attention_mask (pad_prompts does both): each
        continues as it would alone. Call model.eval() first."""
        mask = _check_generate(self, idx, max_new_tokens, temperature, top_k, attention_mask)
        states, piece = None, self.config.max_seq_length
        for start in range(0, idx.shape[1], piece):
            logits, states = self.prefill(idx[:, start:start + piece], states,
                                          None if mask is None else mask[:, start:start + piece])
        logits = logits[:, -1]                                          # (b, v)
        for i in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1)                           # (b,)
            else:
                scaled = logits.float() / temperature                   # (b, v)
                # below the k-th largest: out
                if top_k is not None:
                    kth = scaled.topk(min(top_k, scaled.shape[-1]), -1).values[:, -1:]   # (b, 1)
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                token = torch.multinomial(F.softmax(scaled, -1), num_samples=1)[:, 0]   # (b,)
            idx = torch.cat([idx, token[:, None].to(idx.dtype)], 1)    # (b, l + i + 1)
            if i + 1 < max_new_tokens:
                logits, states = self.step(token, states)
        return idx


def pad_prompts(prompts, pad_id=0):
    """Prompts of different lengths as one left-padded batch for generate: a list of 1-D tensors of
    token ids -> (idx (b, l), attention_mask (b, l)), l the longest prompt's length, each row
    pad_id then its prompt."""
    _check_prompts(prompts)
    pad = functools.partial(nn.utils.rnn.pad_sequence, batch_first=True, padding_side="left")
    # (b, l) twice: pad_id, then each prompt; and its mask, 0 at the pads
    return pad(prompts, padding_value=pad_id), pad([torch.ones_like(p) for p in prompts])


# -------------------------------------------------------------------------------------------------
# 7. Argument checks
# -------------------------------------------------------------------------------------------------
# A clear ValueError or TypeError naming the argument and what is allowed, raised before any work;
# each rule written once.

def _check_settings(**s):
    """Every setting's rule, in one place: the blocks, JambaConfig and generate give theirs by
    name."""
    counts = ("vocab_size d_model num_mamba_layers num_transformer_layers nhead dim_feedforward "  # noqa: SIM905
              "max_seq_length d_state d_conv expand dt_rank num_experts num_key_value_heads "
              "num_experts_per_tok max_new_tokens top_k").split()    # the settings that are counts
    for name, value in s.items():
        if name not in counts or (name, value) in (("dt_rank", "auto"), ("num_key_value_heads", None),
                                                   ("top_k", None)):
            continue
        low = 0 if name in ["num_mamba_layers", "num_transformer_layers", "max_new_tokens"] else 1
        high = s["num_experts"] if name == "num_experts_per_tok" else None
        if type(value) is not int or value < low or high and value > high:
            allowed = f"an int in [1, num_experts={high}]" if high else \
                "a positive int" if low else "an int >= 0"
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if not 0 <= s.get("dropout", 0) < 1:
        raise ValueError(f"dropout must be in [0, 1), got {s['dropout']!r}")
    if s.get("scan", "auto") not in ["auto", "fused", "parallel", "sequential"]:
        raise ValueError(f"scan must be auto, fused, parallel or sequential, got {s['scan']!r}")
    if type(temperature := s.get("temperature", 0)) not in (int, float) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    # rotary: an even head size
    if "nhead" in s and s["d_model"] % ((2 if s["rotary"] else 1) * s["nhead"]):
        raise ValueError(f"d_model must be a multiple of nhead (and d_model // nhead even with "
                         f"rotary), got d_model={s['d_model']}, nhead={s['nhead']}")
    if s.get("num_key_value_heads") and s["nhead"] % s["num_key_value_heads"]:
        raise ValueError(f"nhead must be a multiple of num_key_value_heads, got "
                         f"nhead={s['nhead']}, num_key_value_heads={s['num_key_value_heads']}")


def _check_config(c, settings=None):
    """A JambaConfig (and no settings beside it): its settings, then what only the whole model
    knows: layers, periods, offsets. Returns its layer pattern."""
    if not isinstance(c, JambaConfig) or settings:
        raise TypeError("Jamba takes a JambaConfig or its fields as keyword arguments, not both")
    _check_settings(**dict(vars(c), rotary=False,
                           num_experts_per_tok=c.num_experts_per_tok if c.num_experts > 1 else 1))
    n = c.num_mamba_layers + c.num_transformer_layers
    if n == 0:
        raise ValueError("num_mamba_layers + num_transformer_layers must be at least 1, got 0")
    for name, used in (("attn_layer", (c.attn_layer_period, c.attn_layer_offset) != (None, None)),
                       ("expert_layer", c.num_experts > 1)):
        period, offset = getattr(c, f"{name}_period"), getattr(c, f"{name}_offset")
        if used and not (type(period) is type(offset) is int and 0 <= offset < period):
            raise ValueError(f"{name}_period and {name}_offset must be ints with 0 <= offset < "
                             f"period, got {period!r} and {offset!r} (give both together, or neither)")
    pattern = layer_schedule(c.num_mamba_layers, c.num_transformer_layers, c.attn_layer_period,
                             c.attn_layer_offset)
    if pattern.count("A") != c.num_transformer_layers:
        raise ValueError(f"attn_layer_period={c.attn_layer_period}, attn_layer_offset="
                         f"{c.attn_layer_offset} place {pattern.count('A')} attention layers among "
                         f"{n}, but num_transformer_layers={c.num_transformer_layers}")
    if c.num_experts > 1 and c.expert_layer_offset >= n:
        raise ValueError(f"expert_layer_offset={c.expert_layer_offset} places no layer among {n}: "
                         f"num_experts={c.num_experts} would never be used")
    if c.rotary and pattern.startswith("A"):          # rotary attention layers: an even head size
        _check_settings(d_model=c.d_model, nhead=c.nhead, rotary=True)
    return pattern


def _check_scan_args(*args):
    """The selective scans' arguments u, delta, A, B, C, D, z, delta_bias, initial_state, in
    that order: tensors (D, z, delta_bias, initial_state may be None) whose shapes fit together."""
    shapes = {"u": "bdl", "delta": "bdl", "A": "dn", "B": "bnl", "C": "bnl", "D": "d", "z": "bdl", "delta_bias": "d",
                  "initial_state": "bdn"}                                  # in the glossary's letters
    for name, value in zip(shapes, args):
        if not isinstance(value, torch.Tensor) and (value is not None or name in "u delta A B C"):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    u, A = args[0], args[2]
    if u.dim() != 3 or u.shape[2] == 0:
        raise ValueError("u must have shape (b, d, l) with at least one time step (l >= 1)")
    size = dict(zip("bdln", (*u.shape, A.shape[-1])))
    for (name, letters), value in zip(shapes.items(), args):
        shape = tuple(size[letter] for letter in letters)
        if value is not None and (value.shape != shape or value.is_complex()):
            raise ValueError(f"{name} must have shape {shape}, real (u's (b, d, l) is "
                             f"{tuple(u.shape)})")


def _check_inputs(model, idx, targets=None, attention_mask=None, inputs_embeds=None,
                  return_hidden=False, states=None, max_length=None, left_padded=False):
    """forward's, prefill's, step's and generate's inputs: idx (b, l) ids in [0, vocab_size), or
    inputs_embeds (b, l, m) in the model's dtype; targets and attention_mask (1 for tokens, 0 for
    pads, bool or int, as transformers takes it) of shape (b, l); states as prefill or step returned
    them. Returns the mask as bool, or None."""
    c, embeds = model.config, inputs_embeds is not None
    if (idx is None) != embeds or return_hidden and targets is not None:
        raise ValueError("give exactly one of idx (token ids) and inputs_embeds (vectors), not "
                         "both or neither" if targets is None else "return_hidden=True gives "
                         "hidden states, not logits: there is no loss for targets")
    name, x = ("inputs_embeds", inputs_embeds) if embeds else ("idx", idx)
    dtypes = [model.embed_tokens.weight.dtype] if embeds else [torch.int64, torch.int32]
    if getattr(x, "dtype", None) not in dtypes:
        wanted = f"the model's dtype {dtypes[0]}" if embeds else "ids, torch.int64 or torch.int32"
        raise TypeError(f"{name} must be a torch.Tensor of {wanted}, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2 + embeds or x.shape[1] == 0 or embeds and x.shape[2] != c.d_model:
        raise ValueError(f"{name} must have shape (b, l{f', d_model={c.d_model}' * embeds}) with "
                         f"l >= 1, got {tuple(x.shape)} (no empty sequence)")
    if not embeds and (idx.min() < 0 or idx.max() >= c.vocab_size):
        raise ValueError(f"idx holds ids in [{idx.min().item()}, {idx.max().item()}], outside "
                         f"[0, vocab_size={c.vocab_size})")
    shape = x.shape[:2]
    if max_length and shape[1] > max_length:
        raise ValueError(f"sequence length {shape[1]} is over max_seq_length={max_length}")
    for name, value in (("targets", targets), ("attention_mask", attention_mask)):
        if value is not None and getattr(value, "shape", None) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a tensor of shape (b, l) = {tuple(shape)}, got {got}")
    if states is not None:
        _check_states(model, states, shape[0])
    if attention_mask is None:
        return None
    if attention_mask.is_floating_point() or (attention_mask != attention_mask.bool()).any():
        raise ValueError(f"attention_mask must hold only 1 (token) and 0 (pad) as bool or int, got "
                         f"{attention_mask.dtype}")
    if not attention_mask.any():
        raise ValueError("attention_mask marks every position as a pad: there is no token to read")
    mask = attention_mask.bool()
    # A pad after a token would decay the Mamba state and fill its conv window: not the tokens'.
    if left_padded and not torch.equal(mask, mask.cummax(1).values):
        raise ValueError("attention_mask must be left-padded for generate and prefill: each row's "
                         "pads (0) before its tokens (1); pad_prompts(prompts, pad_id) makes one")
    return mask


def _check_states(model, states, b):
    """states as prefill or step returned them, for a batch of b: each layer's, in a list."""
    n = len(model.layers)
    if not isinstance(states, (list, tuple)) or len(states) != n:
        raise ValueError(f"states must be the list of {n} layer states that prefill or step "
                         "returned")
    for i, state in enumerate(states):
        mixer = model.layers[i].mixer
        mamba = isinstance(mixer, MambaBlock)
        shape_h = (b, mixer.d_inner, mixer.d_state) if mamba else (b, mixer.num_key_value_heads)
        if not isinstance(state, tuple) or isinstance(state, AttentionCache) == mamba or \
                getattr(state[1], "shape", ())[:len(shape_h)] != shape_h:
            raise ValueError(f"states[{i}] is not a state of layer {i} ({type(mixer).__name__}) "
                             f"for a batch of {b}: give the states this model's prefill or step "
                             "returned")


def _check_step(model, token, states, inputs_embeds):
    """step's vectors, where it is given vectors, and its states. Token ids are taken as they are:
    checking each one would cost more than the step on a GPU (reading a value back waits for the
    device)."""
    if inputs_embeds is not None:
        if getattr(inputs_embeds, "ndim", 0) != 2:
            raise ValueError("step's inputs_embeds must be one vector per sequence, a tensor of "
                             "shape (b, m)")
        inputs_embeds = inputs_embeds[:, None]                          # (b, 1, m), as prefill's
    if token is None or inputs_embeds is not None:
        _check_inputs(model, token, inputs_embeds=inputs_embeds)
    _check_states(model, states, len(token if inputs_embeds is None else inputs_embeds))


def _check_generate(model, idx, max_new_tokens, temperature, top_k, attention_mask):
    """generate's settings and prompt, its attention_mask left-padded: the mask as bool, or None."""
    # the settings among them: max_new_tokens, temperature, top_k
    _check_settings(**locals())
    mask = _check_inputs(model, idx, attention_mask=attention_mask, left_padded=True)
    if mask is not None and not mask[:, -1].all():
        raise ValueError("attention_mask must end every row with a token (1) for generate")
    return mask


def _check_prompts(prompts):
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(
            isinstance(p, torch.Tensor) and p.dim() == 1 and len(p) and not p.is_floating_point()
            for p in prompts):
        raise ValueError("prompts must be a non-empty list of 1-D tensors of token ids, each of at "
                         "least one token")

# -------------------------------------------------------------------------------------------------
# 8. The fused kernels
# -------------------------------------------------------------------------------------------------

_FUSED = None       # (kernels/fused.py's module or None, why not), once loaded


def _fused(required=False):
    """kernels/fused.py beside this file, loaded once (it builds kernels/selective_scan.cpp and
    registers its torch ops); None where it cannot be had, saying why once, or a RuntimeError saying
    why where it is required."""
    global _FUSED
    if _FUSED is None:
        path = Path(__file__).resolve().parent / "kernels/fused.py"
        module = sys.modules.get("jamba_fused_kernels")           # torch ops register only once
        if module is None and path.is_file():
            spec = importlib.util.spec_from_file_location("jamba_fused_kernels", path)
            module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        why = module.load() if module else "kernels/fused.py is not beside JAMBA.py"
        _FUSED = (None if why else module, why)
        if why:
            print(f"JAMBA: the fused selective scan is not available: {why}; scan='auto' uses the "
                  "parallel scan", file=sys.stderr, flush=True)
    if required and _FUSED[0] is None:
        raise RuntimeError(f"the fused selective scan is not available here: {_FUSED[1]}")
    return _FUSED[0]


def _scan_function(scan, device):
    """The scan that `scan` names: "auto" is the fused kernel on a CPU where it can be had, else the
    parallel scan."""
    if scan == "auto":
        scan = "fused" if device.type == "cpu" and _fused() else "parallel"
    return {"fused": selective_scan_fused, "parallel": selective_scan_parallel,
            "sequential": selective_scan_sequential}[scan]


def _fusable(model, x, states):
    """Whether a Jamba's step goes through kernels/fused.py's model_step, the same arithmetic in one
    call where hundreds of small torch ops cost more than it: a model on the fused scan (scan auto or
    fused, x on a CPU where the kernels can be had), in inference (no gradient, no dropout), x and
    the states of one dtype, float32 or float64 (model_step checks that the weights are too), and a
    small batch: it reads every weight once per sequence, torch's matrix products once per batch,
    which wins past about 4096 numbers in x (b * d_model)."""
    return (not (torch.is_grad_enabled() or model.training) and x.numel() <= 4096
            and {x.dtype, *(t.dtype for state in states for t in state[:2])}
            in ({torch.float32}, {torch.float64}) and model.config.scan in ("auto", "fused")
            and _scan_function("auto", x.device) is selective_scan_fused)


# -------------------------------------------------------------------------------------------------
# 9. The Hugging Face format
# -------------------------------------------------------------------------------------------------
# Our modules carry the public Jamba code's names: a checkpoint's tensors are ours under "model.",
# each layer's mixer named by its kind (mamba, self_attn); only the configuration is translated.

# JambaConfig's fields under their names in config.json (the layer counts come from the attention
# plan; silu and the Mamba biases, which every released Jamba shares, are checked), and the public
# defaults where they differ from JambaConfig's, for what a config.json leaves out.
_HF_CONFIG_NAMES = dict(
    d_model="hidden_size", dim_feedforward="intermediate_size", nhead="num_attention_heads",
    max_seq_length="max_position_embeddings", d_state="mamba_d_state", d_conv="mamba_d_conv",
    expand="mamba_expand", dt_rank="mamba_dt_rank",
    # and the names that are the same in both
    **{name: name for name in (  # noqa: SIM905
        "vocab_size num_key_value_heads num_experts num_experts_per_tok expert_layer_period "
        "expert_layer_offset router_aux_loss_coef attn_layer_period attn_layer_offset "
        "tie_word_embeddings rms_norm_eps").split()})
_HF_FIXED = {"hidden_act": "silu", "mamba_conv_bias": True, "mamba_proj_bias": False}
_HF_DEFAULTS = dict(
    vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    max_position_embeddings=262144, num_experts=16, attn_layer_period=8, attn_layer_offset=4,
    **_HF_FIXED)


def _safetensors():
    """safetensors.torch, imported where a checkpoint is read or written; missing, one line says
    so."""
    try:
        import safetensors.torch
    except ImportError:
        raise ModuleNotFoundError("checkpoints in the Hugging Face format need the safetensors "
                                  "package: pip install safetensors", name="safetensors") from None
    return safetensors.torch


def _hf_names(model):
    """Our state_dict's keys -> JambaForCausalLM's (a tied head has none)."""
    names = {}
    for key in model.state_dict():                # layers.{i}.mixer. named by the layer's kind
        kind = model.layer_pattern[int(key.split(".")[1])] if key.startswith("layers.") else None
        names[key] = "model." + key.replace(".mixer.", ".mamba." if kind == "M" else ".self_attn.")
    names["lm_head.weight"] = "lm_head.weight"    # the head is not under model.
    if model.config.tie_word_embeddings:
        del names["lm_head.weight"]
    return names


def _from_pretrained(cls, path, dtype=None):
    """A JambaForCausalLM checkpoint from a local directory (config.json and model.safetensors, or
    the shards model.safetensors.index.json lists; nothing is downloaded), with exactly its plan, in
    its stored dtype unless dtype is given, in eval mode; needs safetensors. Built on the meta
    device, the model takes the checkpoint's tensors as its parameters (one copy in memory). Experts
    come one by one (experts.{e}.gate_proj, the released files) or stacked in two tensors per layer
    (experts.gate_up_proj and down_proj, as recent transformers keeps them)."""
    # config.json and the shards first: problems raise here
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"path {str(path)!r} " + ("has no config.json: not a Hugging Face "
                         "checkpoint directory" if path.is_dir() else "is not a directory: give "
                         "the local directory of a Jamba checkpoint"))
    try:
        hf = {**_HF_DEFAULTS, **json.loads(config_file.read_text(encoding="utf-8"))}
    except ValueError as err:                     # UnicodeDecodeError among them
        raise ValueError(f"{config_file}: not readable JSON ({err})") from None
    unsupported = {key: hf[key] for key, ours in _HF_FIXED.items() if hf[key] != ours}
    if hf.get("model_type") != "jamba" or unsupported:
        raise ValueError(f"{config_file}: " + (f"{unsupported} is not supported (this "
                         "implementation has silu, a conv bias and no Mamba projection biases, as "
                         "released Jambas)"
                         if unsupported else f"model_type is {hf.get('model_type')!r}, but only "
                         "'jamba' (JambaForCausalLM) checkpoints can be loaded"))
    n, period, offset = hf["num_hidden_layers"], hf["attn_layer_period"], hf["attn_layer_offset"]
    a = sum(i % period == offset for i in range(n)) if isinstance(period, int) and period > 0 else 0
    try:
        config = JambaConfig(**{ours: hf[theirs] for ours, theirs in _HF_CONFIG_NAMES.items()
                                if theirs in hf}, rotary=False, num_mamba_layers=n - a,
                             num_transformer_layers=a)
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from None
    index = path / "model.safetensors.index.json"
    names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {
        "model.safetensors"}
    missing = sorted(name for name in names if not (path / name).is_file())
    if missing:
        raise ValueError(f"{index}: lists shards that are not in the directory: {missing}" if
                         index.is_file() else f"path {str(path)!r} has neither "
                         "model.safetensors nor model.safetensors.index.json")
    load_file = _safetensors().load_file
    hf_state = {key: tensor for name in sorted(names) for key, tensor in load_file(path / name).items()}
    for key in [key for key in hf_state if key.endswith(".experts.gate_up_proj")]:
        prefix = key.removesuffix("gate_up_proj")
        gate, up = hf_state.pop(key).chunk(2, 1)                   # (E, f, m) each
        # (m, f); none: see below
        for e, down in enumerate(hf_state.pop(prefix + "down_proj", [])):
            hf_state.update({f"{prefix}{e}.gate_proj.weight": gate[e], f"{prefix}{e}.up_proj."
                             "weight": up[e], f"{prefix}{e}.down_proj.weight": down})
    with torch.device("meta"):
        model = cls(config)
    if config.tie_word_embeddings:                # the embedding's tensor, stored twice or not
        hf_state.pop("lm_head.weight", None)
    state = model.state_dict()                    # meta tensors, each replaced by the checkpoint's
    for key, name in _hf_names(model).items():
        if name not in hf_state:
            raise ValueError(f"the checkpoint has no tensor {name!r}, which its config.json implies"
                             + " (nor experts.gate_up_proj)" * (".experts." in name))
        if hf_state[name].shape != state[key].shape:
            raise ValueError(f"{name} has shape {tuple(hf_state[name].shape)} in the checkpoint, "
                             f"but its config.json gives it {tuple(state[key].shape)}")
        state[key] = hf_state.pop(name).to(dtype)
    if hf_state:
        raise ValueError(f"the checkpoint has {len(hf_state)} tensors its config.json does not "
                         f"account for, e.g. {sorted(hf_state)[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    # assign=True made new Parameters, a tied head's meta
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def _hf_config(model, special_token_ids):
    """config.json for JambaForCausalLM: every setting of model in the public configuration's names
    (a ValueError saying what to change where the format cannot express the model). Numbers where it
    also allows a word or a spare value, as other readers (llama.cpp's converter) need."""
    c, n = model.config, len(model.layers)
    # attention before any Mamba layer has it
    if c.rotary and model.layer_pattern.startswith("A"):
        raise ValueError("the model has rotary positions in an attention layer, which Jamba's "
                         "format cannot express (its attention has no positional encoding): build "
                         "it with rotary=False")
    plan = next(({"attn_layer_period": period, "attn_layer_offset": offset}
                 for period in range(1, n + 2) for offset in range(period) if model.layer_pattern ==
                 layer_schedule(c.num_mamba_layers, c.num_transformer_layers, period, offset)), None)
    if plan is None:
        raise ValueError(f"layer_pattern {model.layer_pattern!r} is not one that attn_layer_period "
                         "and attn_layer_offset give (attention where i % period == offset): "
                         "choose a number of attention layers that divides the layers evenly, or set "
                         "them")
    settings = dict(vars(c), **plan,
                    num_key_value_heads=c.num_key_value_heads or c.nhead,
                    num_experts_per_tok=min(c.num_experts_per_tok, c.num_experts),
                    dt_rank=max(getattr(layer.mixer, "dt_rank", 0) for layer in model.layers)
                    or c.dt_rank)
    return {"architectures": ["JambaForCausalLM"], "model_type": "jamba", "num_hidden_layers": n,
            **{theirs: settings[ours] for ours, theirs in _HF_CONFIG_NAMES.items()}, **_HF_FIXED,
            "dtype": str(model.embed_tokens.weight.dtype)[6:],
            **dict.fromkeys(["bos_token_id", "eos_token_id", "pad_token_id"]),
            **(special_token_ids or {})}


def _save_pretrained(model, path, special_token_ids=None, files=None):
    """Write a JambaForCausalLM checkpoint directory (config.json, model.safetensors) that
    transformers and from_pretrained read; special_token_ids ({"eos_token_id": 2}; all None by
    default) go into config.json, files ({name: text}, a tokenizer.json say) beside them; needs
    safetensors. Written whole into a temporary directory beside path, then renamed: never half a
    checkpoint; what the format cannot express raises first. Returns the path."""
    hf_config, path = _hf_config(model, special_token_ids), Path(path)
    save_file, state = _safetensors().save_file, model.state_dict()
    tensors = {name: state[key].contiguous().cpu() for key, name in _hf_names(model).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # On an error the temporary directory goes; after the rename there is none left to remove.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
        tmp = Path(tmp)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for name, text in {"config.json": json.dumps(hf_config, indent=2) + "\n",
                           **(files or {})}.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if path.exists():                         # never half a checkpoint: the old one, or the new
            shutil.rmtree(path)
        tmp.rename(path)
        tmp.mkdir()                               # an empty one, for the with-block to remove
    return path


Jamba.from_pretrained, Jamba.save_pretrained = classmethod(_from_pretrained), _save_pretrained
