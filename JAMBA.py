"""
JAMBA: a minimal, single-file PyTorch implementation of the Jamba hybrid Mamba-Transformer language model.

References, open them beside this file:
  [Mamba] Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752.
  [Jamba] Lieber et al., "Jamba: A Hybrid Transformer-Mamba Language Model", arXiv 2403.19887.
  The Mamba reference code (state-spaces/mamba): selective_scan_ref and mamba_simple.Mamba, whose argument
  layouts, parameter names and initialisation are matched here so that a reference layer's weights load as they are.

Reading order (each piece depends only on those above it):
  selective scans (sequential, then parallel) -> MambaBlock -> AttentionBlock -> MLP -> layer schedule
  -> Jamba model -> generation.

Glossary: the letters used in every shape comment.
  b  batch size                     l  sequence length (time)
  m  d_model, the residual width    d  channels of the SSM (d_inner = expand * d_model inside a Mamba block)
  n  d_state, the SSM state size    r  dt_rank, the rank of the projection that makes Delta
  k  d_conv, the causal conv width  v  vocab_size
  h  attention heads (nhead)        e  head size, m // h
  s  cache slots, max_seq_length    c  a block of channels inside the parallel scan
Paper symbols: Delta (here `delta`), A, B, C, D as in [Mamba] Section 2 and Algorithm 2; `dA` is
A-bar = exp(Delta A) and `dBu` is B-bar u = Delta B u, both of Eq. (4).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------
# 1. Selective scans
# ---------------------------------------------------------------------------------------------------------------

def _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Raise a clear error, before any work, when the selective-scan arguments do not fit together."""
    for name, value in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if u.dim() != 3:
        raise ValueError(f"u must have shape (b, d, l), got {tuple(u.shape)}")
    b, d, l = u.shape
    if A.dim() != 2 or A.shape[0] != d or A.is_complex():
        raise ValueError(f"A must be a real tensor of shape (d={d}, n), got {tuple(A.shape)} {A.dtype}")
    n = A.shape[1]
    expected = {"delta": (b, d, l), "B": (b, n, l), "C": (b, n, l), "z": (b, d, l), "D": (d,),
                "delta_bias": (d,), "initial_state": (b, d, n)}
    given = {"delta": delta, "B": B, "C": C, "z": z, "D": D, "delta_bias": delta_bias, "initial_state": initial_state}
    for name, value in given.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} (u is (b, d, l) = {tuple(u.shape)}, "
                             f"A is (d, n) = {tuple(A.shape)}), got {tuple(value.shape)}")
    if l == 0:
        raise ValueError("u must hold at least one time step (l >= 1), got l = 0")


def _scan_inputs(u, delta, A, B, C, delta_bias, delta_softplus):
    """Both scans' common start: upcast to the compute dtype (float32 for fp16/bf16, float64 stays float64), then
    delta = softplus(delta + delta_bias) as the reference does."""
    compute = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (x.to(compute) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A, B, C


def _scan_output(y, u, D, z, dtype_in):
    """Both scans' common end: the skip connection D u of Algorithm 2 and the gate silu(z) of Figure 3."""
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
    Args:
        u, delta, z: (b, d, l);  A: (d, n), real;  B, C: (b, n, l);  D, delta_bias: (d,);  initial_state: (b, d, n)
    Returns:
        out (b, d, l) in u's dtype, and last_state (b, d, n) in the compute dtype when return_last_state.
    fp16/bf16 inputs are computed in float32, float64 stays float64.
    """
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
    An odd length leaves its last element unpaired in step 1; step 3 finishes it like any other even position.
    """
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


# Channels per block are chosen so that one (l, b, c, n) float32 tensor is about 4 MB: the handful of them that a
# block needs stay in the CPU's cache and are reused by the allocator, instead of faulting in fresh pages.
_BLOCK_ELEMENTS = 2 ** 20


def _channel_blocks(b, d, l, n):
    c = max(1, _BLOCK_ELEMENTS // (b * l * n))
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
    """y_t = C_t . h_t and h_l for h_t = A-bar_t h_{t-1} + B-bar_t u_t, in blocks of channels, the states
    recomputed in backward. Inputs are in the compute dtype, delta already biased and softplus-ed.
    Inside, tensors are time-major, (l, b, ...), so that each time step the scan touches is one contiguous slab."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        b, d, l = u.shape
        n = A.shape[1]
        u, delta = u.permute(2, 0, 1).contiguous(), delta.permute(2, 0, 1).contiguous()   # (l, b, d)
        B, C = B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()           # (l, b, n)
        y = u.new_empty(l, b, d)                                      # (l, b, d)
        last_state = u.new_empty(b, d, n)                             # (b, d, n)
        for ch in _channel_blocks(b, d, l, n):
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
        for ch in _channel_blocks(b, d, l, n):
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
    """The selective scan with no Python loop over time; same signature and results as selective_scan_sequential.

    The algorithm, in the spirit of [Mamba] Section 3.3.2 (kernel fusion and recomputation), with the CPU cache
    playing the role of the GPU's SRAM:
      1. Channels are independent, so they are processed in blocks of c channels small enough that the block's
         (l, b, c, n) tensors stay in cache. The full (b, d, l, n) state tensor is never materialised.
      2. Within a block: discretise (A-bar = exp(delta A), B-bar u = delta B u), solve the linear recurrence
         h_t = A-bar_t h_{t-1} + B-bar_t u_t with an in-place odd-even parallel scan over time (_scan_forward_:
         log2(l) levels of elementwise ops on every other time step, O(l) work), then contract with C.
      3. Backward recomputes each block's states instead of storing them, and runs the same scan backwards in
         time for the gradient (_ParallelSelectiveScan.backward), so memory is O(b d l), not O(b d l n).
    Every factor the scan multiplies is an A-bar in [0, 1] or a finite input, so large delta and very negative A
    underflow to zero and never overflow.
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    u, delta, A, B, C = _scan_inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    h0 = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state.to(u.dtype)
    y, last_state = _ParallelSelectiveScan.apply(u, delta, A, B, C, h0)   # (b, d, l), (b, d, n)
    out = _scan_output(y, u, D, z, dtype_in)
    return (out, last_state) if return_last_state else out


# ---------------------------------------------------------------------------------------------------------------
# 2. The Mamba block
# ---------------------------------------------------------------------------------------------------------------

_SCANS = {"parallel": selective_scan_parallel, "sequential": selective_scan_sequential}


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


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
    dt_layernorm, b_layernorm, c_layernorm: [Jamba] Section 6.4 found Mamba layers at scale need RMSNorms on the
    x_proj split (dt, B, C) before it is used; named as in the public Jamba implementation.
    scan: "parallel" (selective_scan_parallel) or "sequential" (the readable reference loop).
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_layernorm=False,
                 b_layernorm=False, c_layernorm=False, scan="parallel"):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            _positive_int(name, value)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        _positive_int("dt_rank (or 'auto')", dt_rank)
        if scan not in _SCANS:
            raise ValueError(f"scan must be one of {sorted(_SCANS)}, got {scan!r}")
        d_inner = expand * d_model
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.scan = scan

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.dt_layernorm = nn.RMSNorm(dt_rank, eps=1e-6) if dt_layernorm else None
        self.b_layernorm = nn.RMSNorm(d_state, eps=1e-6) if b_layernorm else None
        self.c_layernorm = nn.RMSNorm(d_state, eps=1e-6) if c_layernorm else None

        # Delta's projection: weights of the same scale as its input's, bias = softplus^-1(dt) so that the initial
        # step sizes dt = softplus(bias) cover [1e-3, 1e-1] log-uniformly, as in the reference.
        nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))          # softplus^-1(dt)
        self.dt_proj._no_reinit = True                                          # Jamba._init_weights keeps it

        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_log._no_weight_decay = True                                      # as the reference marks them
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def _delta_B_C(self, x):
        """The selection mechanism (Algorithm 2, lines 3-5): x (..., d) -> delta before bias (..., d), B, C (..., n)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_layernorm is not None:
            dt = self.dt_layernorm(dt)
        if self.b_layernorm is not None:
            B = self.b_layernorm(B)
        if self.c_layernorm is not None:
            C = self.c_layernorm(C)
        return dt @ self.dt_proj.weight.t(), B, C                               # bias and softplus come in the scan

    def forward(self, x, return_state=False):
        """x (b, l, m) -> (b, l, m); with return_state also the state step() continues from:
        (conv_state (b, d, k), the last k inputs of the conv; ssm_state (b, d, n), h_l)."""
        l = x.shape[1]
        x_in, z = self.in_proj(x).chunk(2, dim=-1)                              # (b, l, d) each
        x_in = x_in.transpose(1, 2)                                             # (b, d, l)
        x_conv = F.silu(self.conv1d(x_in)[..., :l])                             # (b, d, l)  causal: drop the tail
        delta, B, C = self._delta_B_C(x_conv.transpose(1, 2))                   # (b, l, d), (b, l, n), (b, l, n)
        A = -torch.exp(self.A_log.float())                                      # (d, n)
        y, ssm_state = _SCANS[self.scan](
            x_conv, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
            z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_last_state=True)                                             # (b, d, l), (b, d, n)
        out = self.out_proj(y.transpose(1, 2))                                  # (b, l, m)
        if not return_state:
            return out
        conv_state = F.pad(x_in, (self.d_conv - l, 0))                          # (b, d, k)  crops; pads if l < k
        return out, (conv_state, ssm_state)

    def step(self, x, state):
        """The recurrent mode ([Mamba] Section 3.4, the reference's step): one token x (b, m) and
        state = (conv_state (b, d, k), ssm_state (b, d, n)) -> (out (b, m), new state); O(1) time and memory."""
        conv_state, ssm_state = state
        x_in, z = self.in_proj(x).chunk(2, dim=-1)                              # (b, d) each
        conv_state = torch.cat([conv_state[:, :, 1:], x_in.unsqueeze(-1)], dim=-1)   # (b, d, k)  slide the window
        x_conv = F.silu(torch.einsum("bdk,dk->bd", conv_state, self.conv1d.weight[:, 0]) + self.conv1d.bias)  # (b, d)
        delta, B, C = self._delta_B_C(x_conv)                                   # (b, d), (b, n), (b, n)
        delta = F.softplus(delta + self.dt_proj.bias)                           # (b, d)
        dA = torch.exp(delta.unsqueeze(-1) * -torch.exp(self.A_log.float()))   # (b, d, n)  A-bar, Eq. (4)
        ssm_state = dA * ssm_state + (delta * x_conv).unsqueeze(-1) * B.unsqueeze(1)   # (b, d, n)  Eq. (2a)
        y = torch.einsum("bdn,bn->bd", ssm_state, C) + self.D * x_conv         # (b, d)     Eq. (2b)
        return self.out_proj(y * F.silu(z)), (conv_state, ssm_state)


# ---------------------------------------------------------------------------------------------------------------
# 3. The attention block
# ---------------------------------------------------------------------------------------------------------------

def _rotary(x, start):
    """Rotary position embedding (Su et al., RoFormer, arXiv 2104.09864) of x (b, h, l, e) at positions start, ..."""
    l, e = x.shape[2], x.shape[3]
    compute = torch.promote_types(x.dtype, torch.float32)
    inv_freq = 10000.0 ** (-torch.arange(0, e, 2, device=x.device, dtype=compute) / e)          # (e/2,)
    angle = torch.arange(start, start + l, device=x.device, dtype=compute)[:, None] * inv_freq   # (l, e/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.to(compute).chunk(2, dim=-1)                                     # (b, h, l, e/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)   # (b, h, l, e)


class AttentionBlock(nn.Module):
    """Causal multi-head self-attention through F.scaled_dot_product_attention, with a key/value cache.

    rotary: [Jamba] Section 6.5 found no positional encoding is needed when Mamba layers come first (they carry
    position implicitly); an attention layer with no Mamba layer before it gets rotary embeddings instead.
    The cache holds max_seq_length slots per head; generation past that keeps the most recent max_seq_length
    keys and values (a sliding window over a ring buffer).
    """

    def __init__(self, d_model, nhead, dropout=0.0, max_seq_length=1024, rotary=False):
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("nhead", nhead)
        _positive_int("max_seq_length", max_seq_length)
        if d_model % nhead or (rotary and (d_model // nhead) % 2):
            raise ValueError(f"d_model must be a multiple of nhead (and d_model // nhead even with rotary), "
                             f"got d_model={d_model}, nhead={nhead}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.nhead, self.dropout, self.max_seq_length, self.rotary = nhead, dropout, max_seq_length, rotary
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, return_state=False):
        """x (b, l, m) -> (b, l, m); with return_state also the cache (keys (b, h, s, e), values, tokens seen)."""
        b, l, m = x.shape
        q, k, v = self.qkv_proj(x).view(b, l, 3, self.nhead, m // self.nhead).permute(2, 0, 3, 1, 4)  # (b, h, l, e)
        if self.rotary:
            q, k = _rotary(q, 0), _rotary(k, 0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)                      # (b, h, l, e)
        out = self.resid_dropout(self.out_proj(y.transpose(1, 2).reshape(b, l, m)))   # (b, l, m)
        if not return_state:
            return out
        keys = k.new_zeros(b, self.nhead, self.max_seq_length, m // self.nhead)  # (b, h, s, e)
        values = torch.zeros_like(keys)                                         # (b, h, s, e)
        keys[:, :, :l], values[:, :, :l] = k, v
        return out, (keys, values, l)

    def step(self, x, state):
        """One token x (b, m) with state (keys, values, tokens seen) -> (out (b, m), state); the cache is updated
        in place. Every cached key is in the past, so no mask is needed; its order does not matter either."""
        keys, values, seen = state
        b, m = x.shape
        q, k, v = self.qkv_proj(x).view(b, 3, self.nhead, 1, m // self.nhead).unbind(1)   # (b, h, 1, e) each
        if self.rotary:
            q, k = _rotary(q, seen), _rotary(k, seen)
        slot = seen % self.max_seq_length                                       # ring buffer: overwrite the oldest
        keys[:, :, slot], values[:, :, slot] = k[:, :, 0], v[:, :, 0]
        filled = min(seen + 1, self.max_seq_length)
        y = F.scaled_dot_product_attention(q, keys[:, :, :filled], values[:, :, :filled])   # (b, h, 1, e)
        return self.resid_dropout(self.out_proj(y.reshape(b, m))), (keys, values, seen + 1)


# ---------------------------------------------------------------------------------------------------------------
# 4. The MLP
# ---------------------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """Jamba's gated SiLU MLP (SwiGLU, Shazeer arXiv 2002.05202): down(silu(gate(x)) * up(x)).
    [Jamba] Section 2 replaces some of these with mixture-of-experts layers; this implementation keeps them dense."""

    def __init__(self, d_model, dim_feedforward, dropout=0.0):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, dim_feedforward, bias=False)
        self.up_proj = nn.Linear(d_model, dim_feedforward, bias=False)
        self.down_proj = nn.Linear(dim_feedforward, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        """x (b, l, m) or (b, m) -> the same shape."""
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


# ---------------------------------------------------------------------------------------------------------------
# 5. The layer schedule and the Jamba model
# ---------------------------------------------------------------------------------------------------------------

def layer_schedule(num_mamba_layers, num_transformer_layers):
    """The layer pattern, 'M' for Mamba and 'A' for attention. With a attention layers among N layers, attention
    layer k sits at floor((k + 1/2) N / a): spread evenly, each in the middle of its share. N=8, a=1 gives
    "MMMMAMMM", the 1:7 Jamba block of [Jamba] Section 2 / Figure 1; N=32, a=4 puts attention at 4, 12, 20, 28."""
    n_layers = num_mamba_layers + num_transformer_layers
    attention_at = {(2 * k + 1) * n_layers // (2 * num_transformer_layers) for k in range(num_transformer_layers)}
    return "".join("A" if i in attention_at else "M" for i in range(n_layers))


class JambaLayer(nn.Module):
    """One pre-norm residual layer ([Jamba] Figure 1): x = x + mixer(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, mixer, d_model, dim_feedforward, dropout):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.mixer = mixer
        self.mlp_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.mlp = MLP(d_model, dim_feedforward, dropout)

    def forward(self, x, return_state=False):
        """x (b, l, m) -> (b, l, m), and the mixer's state with return_state."""
        mixed = self.mixer(self.mixer_norm(x), return_state=return_state)
        x = x + (mixed[0] if return_state else mixed)
        x = x + self.mlp(self.mlp_norm(x))
        return (x, mixed[1]) if return_state else x

    def step(self, x, state):
        """x (b, m) -> (b, m), new state."""
        mixed, state = self.mixer.step(self.mixer_norm(x), state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state


class Jamba(nn.Module):
    """The Jamba language model ([Jamba] Section 2): token embedding, a schedule of Mamba and attention layers
    (layer_schedule), a final RMSNorm and an output head tied to the embedding.

    num_mamba_layers=0 gives a plain (rotary) transformer, num_transformer_layers=0 a plain Mamba LM.
    max_seq_length: the longest input forward() accepts, and the size of the attention caches in generate().
    The keyword arguments after dropout configure every MambaBlock (Jamba's RMSNorms on dt, B, C are always on).
    """

    def __init__(self, vocab_size, d_model, num_mamba_layers, num_transformer_layers, nhead, dim_feedforward,
                 max_seq_length, dropout=0.0, d_state=16, d_conv=4, expand=2, dt_rank="auto", scan="parallel"):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("nhead", nhead),
                            ("dim_feedforward", dim_feedforward), ("max_seq_length", max_seq_length)):
            _positive_int(name, value)
        for name, value in (("num_mamba_layers", num_mamba_layers), ("num_transformer_layers", num_transformer_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if num_mamba_layers + num_transformer_layers == 0:
            raise ValueError("num_mamba_layers + num_transformer_layers must be at least 1, got 0 layers")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.config = dict(vocab_size=vocab_size, d_model=d_model, num_mamba_layers=num_mamba_layers,
                           num_transformer_layers=num_transformer_layers, nhead=nhead,
                           dim_feedforward=dim_feedforward, max_seq_length=max_seq_length, dropout=dropout,
                           d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, scan=scan)
        self.vocab_size, self.max_seq_length = vocab_size, max_seq_length
        self.layer_pattern = layer_schedule(num_mamba_layers, num_transformer_layers)

        first_mamba = self.layer_pattern.index("M") if "M" in self.layer_pattern else len(self.layer_pattern)
        mixers = [MambaBlock(d_model, d_state, d_conv, expand, dt_rank, dt_layernorm=True, b_layernorm=True,
                             c_layernorm=True, scan=scan) if kind == "M" else
                  AttentionBlock(d_model, nhead, dropout, max_seq_length, rotary=i < first_mamba)
                  for i, kind in enumerate(self.layer_pattern)]
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(JambaLayer(mixer, d_model, dim_feedforward, dropout) for mixer in mixers)
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight                             # weight tying (Press & Wolf 2017)
        # GPT-2's init, leaving the Mamba-specific init (dt_proj, conv1d, A_log, D) exactly as MambaBlock made it:
        # N(0, 0.02) everywhere, and the projections that write into the residual stream scaled by 1/sqrt(2 N) so
        # that its variance does not grow with depth.
        self.apply(self._init_weights)
        for layer in self.layers:
            for residual_output in (layer.mixer.out_proj, layer.mlp.down_proj):
                nn.init.normal_(residual_output.weight, std=0.02 / math.sqrt(2 * len(self.layers)))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear) and not getattr(module, "_no_reinit", False):
            nn.init.normal_(module.weight, std=0.02)

    def extra_repr(self):
        return f"layer_pattern={self.layer_pattern!r}"

    def _check_idx(self, idx, name="idx"):
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must hold token ids as torch.int64 or torch.int32, got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"{name} must have shape (b, l), got {tuple(idx.shape)}")
        if idx.shape[1] == 0:
            raise ValueError(f"{name} is an empty sequence (l = 0); give at least one token")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.vocab_size):
            raise ValueError(f"{name} holds ids in [{idx.min().item()}, {idx.max().item()}], "
                             f"outside [0, vocab_size={self.vocab_size})")

    def _trunk(self, idx, return_state):
        """Logits (b, l, v) for idx (b, l), and with return_state every layer's state."""
        if idx.shape[1] > self.max_seq_length:
            raise ValueError(f"sequence length {idx.shape[1]} is over max_seq_length={self.max_seq_length}")
        x = self.embedding(idx)                                                 # (b, l, m)
        states = []
        for layer in self.layers:
            x = layer(x, return_state=return_state)
            if return_state:
                x, state = x
                states.append(state)
        logits = self.lm_head(self.norm(x))                                     # (b, l, v)
        return (logits, states) if return_state else logits

    def forward(self, idx, targets=None):
        """idx (b, l) token ids, l <= max_seq_length -> (logits (b, l, v), mean cross-entropy loss or None).
        targets (b, l): the next token at each position; -1 marks positions to ignore."""
        self._check_idx(idx)
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
                got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
                raise ValueError(f"targets must be a tensor of idx's shape {tuple(idx.shape)}, got {got}")
        logits = self._trunk(idx, return_state=False)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=-1)
        return logits, loss

    # -----------------------------------------------------------------------------------------------------------
    # 6. Generation
    # -----------------------------------------------------------------------------------------------------------

    def prefill(self, idx):
        """The parallel pass of generation: idx (b, l) -> (logits (b, l, v), states), one state per layer:
        (conv_state, ssm_state) for Mamba layers, (keys, values, tokens seen) for attention layers."""
        self._check_idx(idx)
        return self._trunk(idx, return_state=True)

    def step(self, token, states):
        """The recurrent pass: one token per sequence (b,) and the states -> (logits (b, v), new states)."""
        x = self.embedding(token)                                               # (b, m)
        new_states = []
        for layer, state in zip(self.layers, states):
            x, state = layer.step(x, state)
            new_states.append(state)
        return self.lm_head(self.norm(x)), new_states                           # (b, v)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue idx (b, l) by max_new_tokens tokens -> (b, l + max_new_tokens), as nanoGPT's generate.

        One parallel prefill over the prompt returns every layer's state, then each new token costs one step()
        per layer: O(1) per token in Mamba layers, O(cache) in attention layers ([Jamba] Section 2).
        temperature=0 picks the most likely token (greedy); top_k keeps only the k most likely.
        Past max_seq_length nothing crashes: Mamba layers carry their state on, attention layers attend to the most
        recent max_seq_length tokens only (a sliding window), and a prompt longer than max_seq_length is read in
        parallel up to max_seq_length and token by token after that. Call model.eval() first to turn dropout off.
        """
        self._check_idx(idx)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
        logits, states = self.prefill(idx[:, :self.max_seq_length])
        logits = logits[:, -1]                                                  # (b, v)
        for t in range(self.max_seq_length, idx.shape[1]):
            logits, states = self.step(idx[:, t], states)
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
