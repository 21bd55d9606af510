// [Mamba] Algorithm 2 fused into one pass over memory. Every channel is independent: the d channels are taken in
// blocks of LANES (the lanes of every inner loop over c, which the compiler turns into vector instructions), the
// blocks of all sequences are shared among the threads, and each block walks time in order with its state h
// (n x LANES numbers) in L1 cache. Each step reads u, delta, z (LANES each) and B, C (n each) and writes y: the
// (b, d, l, n) tensors of discretisation and states are never made.
// Layouts: u, delta, z, out and their gradients (b, l, d), channels contiguous; B, C (b, l, n); A (n, d); D (d);
// h0, last and grad_h0 (b, d, n); saved (b, chunks, n, d), the state at the start of each chunk of CHUNK steps.
// d is a multiple of LANES (the caller pads with channels whose inputs are 0). After the scan come the Mamba block's
// causal conv and, last, a whole model's recurrent step (Jamba.step in one call, model_step).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

constexpr int W = LANES;

// exp(x) = 2^k exp(r) with k = round(x / ln 2) and |r| <= ln(2) / 2, exp(r) by its Taylor series to r^6 (float) or
// r^12 (double): arithmetic and bit moves only, so it vectorises over the lanes, where a call to libm's exp would not.
template <typename T> struct Bits;
template <> struct Bits<float> { using I = int32_t; static constexpr int mantissa = 23, bias = 127, terms = 7; };
template <> struct Bits<double> { using I = int64_t; static constexpr int mantissa = 52, bias = 1023, terms = 13; };

template <typename T> static inline T exp_(T x) {
    using I = typename Bits<T>::I;
    const T lo = sizeof(T) == 4 ? T(-87.3) : T(-708.3), hi = sizeof(T) == 4 ? T(88.7) : T(709.7);
    const T round = T(1.5) * T(I(1) << Bits<T>::mantissa);           // (x + round) - round: x rounded to an int
    const T xc = std::min(std::max(x, lo), hi);
    const T t = xc * T(1.4426950408889634) + round;
    const T k = t - round;
    const T r = xc - k * T(0.693145751953125) - k * T(1.42860682030941723212e-06);   // ln 2 in two parts
    T p = T(1);
#pragma GCC unroll 16
    for (int i = Bits<T>::terms - 1; i >= 1; --i) p = T(1) + p * r * T(1.0 / i);      // Horner
    I bits, round_bits;
    std::memcpy(&bits, &t, sizeof(T));
    std::memcpy(&round_bits, &round, sizeof(T));
    bits = (bits - round_bits + Bits<T>::bias) << Bits<T>::mantissa;                   // the bits of 2^k
    T two_k;
    std::memcpy(&two_k, &bits, sizeof(T));
    return x < lo ? T(0) : (x > hi ? T(INFINITY) : p * two_k);
}

// log(x) for x >= 1 (all softplus needs): x = 2^e m with m in [sqrt(1/2), sqrt(2)), and log m = 2 atanh(s) with
// s = (m - 1) / (m + 1), |s| < 0.18, by its series to s^9 (float) or s^19 (double). Vectorises as exp_ does.
template <typename T> static inline T log_(T x) {
    using I = typename Bits<T>::I;
    I bits;
    std::memcpy(&bits, &x, sizeof(T));
    I e = (bits >> Bits<T>::mantissa) - Bits<T>::bias;
    bits = (bits & ((I(1) << Bits<T>::mantissa) - 1)) | (I(Bits<T>::bias) << Bits<T>::mantissa);
    T m;
    std::memcpy(&m, &bits, sizeof(T));
    const bool halve = m > T(1.4142135623730951);
    m = halve ? m * T(0.5) : m;
    e = halve ? e + 1 : e;
    const T s = (m - T(1)) / (m + T(1)), s2 = s * s;
    T p = T(1);
#pragma GCC unroll 16
    for (int i = sizeof(T) == 4 ? 9 : 19; i >= 3; i -= 2) p = T(1) + p * s2 * T((i - 2.0) / i);   // Horner
    return T(e) * T(0.6931471805599453) + T(2) * s * p;
}

// softplus(x) = log(1 + e^x), with Goldberg's correction so that it stays exact where e^x is below the precision
// of 1 + e^x, and x itself past 20, as torch's softplus.
template <typename T> static inline T softplus_(T x) {
    const T t = exp_(x), u = T(1) + t;
    return x > T(20) ? x : (u == T(1) ? t : log_(u) * t / (u - T(1)));
}

template <typename T> struct Scan {
    const T *u, *delta, *delta_bias, *A, *B, *C, *D, *z, *h0;   // z may be null
    bool softplus;                                    // delta = softplus(delta + delta_bias), else delta + delta_bias
    T *out, *last, *saved;                            // saved is null when no backward follows
    const T *grad_out, *grad_last;                    // grad_last may be null
    T *grad_u, *grad_delta, *grad_z, *grad_h0;
    T* sums;                                          // per thread: grad_A (n, d), grad_D (d), grad_delta_bias (d),
    int64_t b, l, d, n;                               // grad_B, grad_C (b, l, n); the caller adds them up
};

// delta for one step of a block: the raw delta plus its bias, through softplus ([Mamba] Section 3.6, as the
// reference's delta_softplus), here rather than in a pass of its own over (b, l, d).
template <typename T> static inline void step_delta(const Scan<T>& s, int64_t row, int64_t c0, T* delta) {
    for (int c = 0; c < W; ++c) delta[c] = s.delta[row + c] + s.delta_bias[c0 + c];
    if (s.softplus)
        for (int c = 0; c < W; ++c) delta[c] = softplus_(delta[c]);
}

// One time step of a block: for each state dimension k, h_k = exp(delta A_k) h_k + delta B_k u (Eq. 2a with the
// ZOH of Eq. 4) and y += C_k h_k (Eq. 2b). dA receives exp(delta A) (n x W) for the backward.
template <typename T> static inline void ssm_step(const T* __restrict delta, const T* __restrict u,
                                                  const T* __restrict A, const T* __restrict B,
                                                  const T* __restrict C, int64_t n, const T* h_in, T* h,
                                                  T* __restrict y, T* __restrict dA) {
    T du[W];
    for (int c = 0; c < W; ++c) { du[c] = delta[c] * u[c]; y[c] = T(0); }
    for (int64_t k = 0; k < n; ++k) {
#pragma omp simd
        for (int c = 0; c < W; ++c) {
            dA[k * W + c] = exp_(delta[c] * A[k * W + c]);
            h[k * W + c] = dA[k * W + c] * h_in[k * W + c] + du[c] * B[k];
            y[c] += C[k] * h[k * W + c];
        }
    }
}

template <typename T> struct Block {                  // one thread's scratch space
    std::vector<T> A, delta, dA, h, y, g, grad_A;
    Block(int64_t n, int64_t steps) : A(n * W), delta(steps * W), dA(steps * n * W), h((steps + 1) * n * W),
                                      y(steps * W), g(n * W), grad_A(n * W) {}
};

template <typename T> static void forward_block(const Scan<T>& s, int64_t bi, int64_t c0, Block<T>& m) {
    const int64_t l = s.l, d = s.d, n = s.n, chunks = (l + CHUNK - 1) / CHUNK;
    for (int64_t k = 0; k < n; ++k) {
        std::memcpy(&m.A[k * W], s.A + k * d + c0, W * sizeof(T));
        for (int c = 0; c < W; ++c) m.h[k * W + c] = s.h0[(bi * d + c0 + c) * n + k];
    }
    T y[W], delta[W];
    for (int64_t t = 0; t < l; ++t) {
        if (s.saved && t % CHUNK == 0)                  // where the backward will restart this chunk from
            for (int64_t k = 0; k < n; ++k)
                std::memcpy(s.saved + ((bi * chunks + t / CHUNK) * n + k) * d + c0, &m.h[k * W], W * sizeof(T));
        const int64_t row = (bi * l + t) * d + c0, bc = (bi * l + t) * n;
        step_delta(s, row, c0, delta);
        ssm_step(delta, s.u + row, m.A.data(), s.B + bc, s.C + bc, n, m.h.data(), m.h.data(), y, m.dA.data());
        // The skip connection D u and the gate silu(z) of Figure 3, on y while it is in registers.
        T* __restrict out = s.out + row;
        for (int c = 0; c < W; ++c) out[c] = y[c] + s.D[c0 + c] * s.u[row + c];
        if (s.z)
            for (int c = 0; c < W; ++c) out[c] *= s.z[row + c] / (T(1) + exp_(-s.z[row + c]));
    }
    if (s.last)
        for (int64_t k = 0; k < n; ++k)
            for (int c = 0; c < W; ++c) s.last[(bi * d + c0 + c) * n + k] = m.h[k * W + c];
}

// Backpropagation through the recurrence is the same recurrence backwards in time: g = dL/dh_t gathers C_t dL/dy_t
// and flows on to h_{t-1} through exp(delta_t A). The states are not stored in forward: each chunk of time is first
// rerun forward from the state saved at its start (h[0..CHUNK], dA kept), then walked backwards.
template <typename T> static void backward_block(const Scan<T>& s, int tid, int64_t bi, int64_t c0, Block<T>& m) {
    const int64_t l = s.l, d = s.d, n = s.n, chunks = (l + CHUNK - 1) / CHUNK;
    T *grad_A_sum = s.sums + tid * (n * d + 2 * d + 2 * s.b * l * n), *grad_D_sum = grad_A_sum + n * d;
    T *grad_bias_sum = grad_D_sum + d, *grad_B = grad_bias_sum + d, *grad_C = grad_B + s.b * l * n;
    T grad_D[W] = {}, grad_bias[W] = {};
    for (int64_t k = 0; k < n; ++k) {
        std::memcpy(&m.A[k * W], s.A + k * d + c0, W * sizeof(T));
        for (int c = 0; c < W; ++c) {
            m.g[k * W + c] = s.grad_last ? s.grad_last[(bi * d + c0 + c) * n + k] : T(0);
            m.grad_A[k * W + c] = T(0);
        }
    }
    for (int64_t j = chunks - 1; j >= 0; --j) {
        const int64_t t0 = j * CHUNK, t1 = std::min(l, t0 + CHUNK);
        for (int64_t k = 0; k < n; ++k)                 // h[i]: the state before step t0 + i
            std::memcpy(&m.h[k * W], s.saved + ((bi * chunks + j) * n + k) * d + c0, W * sizeof(T));
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t row = (bi * l + t) * d + c0, bc = (bi * l + t) * n, i = t - t0;
            step_delta(s, row, c0, &m.delta[i * W]);
            ssm_step(&m.delta[i * W], s.u + row, m.A.data(), s.B + bc, s.C + bc, n, &m.h[i * n * W],
                     &m.h[(i + 1) * n * W], &m.y[i * W], &m.dA[i * n * W]);
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
            const int64_t row = (bi * l + t) * d + c0, bc = (bi * l + t) * n, i = t - t0;
            const T *u = s.u + row, *delta = &m.delta[i * W], *D = s.D + c0;
            T grad_y[W], grad_u[W], grad_delta[W], du[W];
            for (int c = 0; c < W; ++c) {
                grad_y[c] = s.grad_out[row + c];
                du[c] = delta[c] * u[c];
                grad_delta[c] = T(0);
            }
            if (s.z) {                                   // through the gate: out = (y + D u) silu(z)
                const T* __restrict z = s.z + row;
#pragma omp simd
                for (int c = 0; c < W; ++c) {
                    const T sigmoid = T(1) / (T(1) + exp_(-z[c]));
                    s.grad_z[row + c] = grad_y[c] * (m.y[i * W + c] + D[c] * u[c]) * sigmoid *
                                        (T(1) + z[c] * (T(1) - sigmoid));
                    grad_y[c] *= z[c] * sigmoid;
                }
            }
            for (int c = 0; c < W; ++c) {
                grad_D[c] += grad_y[c] * u[c];
                grad_u[c] = grad_y[c] * D[c];
            }
            const T *B = s.B + bc, *C = s.C + bc;
            for (int64_t k = 0; k < n; ++k) {
                T* __restrict g = &m.g[k * W];
                const T *h = &m.h[(i + 1) * n * W + k * W], *h_prev = &m.h[i * n * W + k * W];
                const T *dA = &m.dA[i * n * W + k * W], *A = &m.A[k * W];
                T* __restrict grad_A = &m.grad_A[k * W];
                T sum_B = T(0), sum_C = T(0);
#pragma omp simd reduction(+ : sum_B, sum_C)
                for (int c = 0; c < W; ++c) {
                    sum_C += grad_y[c] * h[c];               // dL/dC_t: summed over the channels
                    g[c] += C[k] * grad_y[c];                // now g = dL/dh_t
                    const T grad_dA = g[c] * h_prev[c] * dA[c];   // dL/d(delta A)
                    grad_delta[c] += grad_dA * A[c] + g[c] * B[k] * u[c];
                    grad_u[c] += g[c] * B[k] * delta[c];
                    grad_A[c] += grad_dA * delta[c];
                    sum_B += g[c] * du[c];                   // dL/dB_t
                    g[c] *= dA[c];                           // on to dL/dh_{t-1}
                }
                grad_B[bc + k] += sum_B;
                grad_C[bc + k] += sum_C;
            }
            if (s.softplus)                              // d softplus(x) / dx = sigmoid(x)
                for (int c = 0; c < W; ++c)
                    grad_delta[c] /= T(1) + exp_(-(s.delta[row + c] + s.delta_bias[c0 + c]));
            for (int c = 0; c < W; ++c) grad_bias[c] += grad_delta[c];
            std::memcpy(s.grad_u + row, grad_u, W * sizeof(T));
            std::memcpy(s.grad_delta + row, grad_delta, W * sizeof(T));
        }
    }
    for (int64_t k = 0; k < n; ++k)
        for (int c = 0; c < W; ++c) {
            s.grad_h0[(bi * d + c0 + c) * n + k] = m.g[k * W + c];
            grad_A_sum[k * d + c0 + c] += m.grad_A[k * W + c];
        }
    for (int c = 0; c < W; ++c) {
        grad_D_sum[c0 + c] += grad_D[c];
        grad_bias_sum[c0 + c] += grad_bias[c];
    }
}

// The causal depthwise convolution of width k and its SiLU, in front of the SSM (Figure 3): for each channel,
// out_t = silu(bias + sum_j w_j x_{t-k+1+j}), with x = 0 before the first step. x, out, grad_x (b, l, d); w (k, d).
template <typename T> struct Conv {
    const T *x, *w, *bias;
    T* out;
    const T* grad_out;
    T *grad_x, *grad_w, *grad_bias;                   // the last two per thread: (threads, k, d), (threads, d)
    int64_t b, l, d, k;
};

// pre = bias + sum_j w_j x_{t-k+1+j} for the W channels of a block; x points at its sequence's first row.
template <typename T> static inline void conv_at(const Conv<T>& s, const T* x, int64_t c0, int64_t t, T* pre) {
    for (int c = 0; c < W; ++c) pre[c] = s.bias[c0 + c];
    for (int64_t j = std::max<int64_t>(0, s.k - 1 - t); j < s.k; ++j) {
        const T *x_j = x + (t - s.k + 1 + j) * s.d, *w = s.w + j * s.d + c0;
        for (int c = 0; c < W; ++c) pre[c] += w[c] * x_j[c];
    }
}

template <typename T> static void conv_forward_block(const Conv<T>& s, int64_t bi, int64_t c0) {
    const T* x = s.x + bi * s.l * s.d + c0;
    T pre[W];
    for (int64_t t = 0; t < s.l; ++t) {
        conv_at(s, x, c0, t, pre);
        T* __restrict out = s.out + (bi * s.l + t) * s.d + c0;
        for (int c = 0; c < W; ++c) out[c] = pre[c] / (T(1) + exp_(-pre[c]));
    }
}

// Backward: dL/dpre through the SiLU at every step first (into grad_pre, l x W), then each input gathers it from
// the k outputs it feeds.
template <typename T> static void conv_backward_block(const Conv<T>& s, int tid, int64_t bi, int64_t c0,
                                                      std::vector<T>& grad_pre) {
    const int64_t l = s.l, d = s.d, k = s.k;
    const T* x = s.x + bi * l * d + c0;
    T* grad_w = s.grad_w + tid * k * d + c0;
    T pre[W];
    for (int64_t t = 0; t < l; ++t) {
        conv_at(s, x, c0, t, pre);
        const T* grad_out = s.grad_out + (bi * l + t) * d + c0;
        T* __restrict g = &grad_pre[t * W];
        for (int c = 0; c < W; ++c) {
            const T sigmoid = T(1) / (T(1) + exp_(-pre[c]));
            g[c] = grad_out[c] * sigmoid * (T(1) + pre[c] * (T(1) - sigmoid));
            s.grad_bias[tid * d + c0 + c] += g[c];
        }
        for (int64_t j = std::max<int64_t>(0, k - 1 - t); j < k; ++j)
            for (int c = 0; c < W; ++c) grad_w[j * d + c] += g[c] * x[(t - k + 1 + j) * d + c];
    }
    for (int64_t t = 0; t < l; ++t) {                  // x_t feeds out_{t+k-1-j} through w_j
        T* __restrict grad_x = s.grad_x + (bi * l + t) * d + c0;
        for (int c = 0; c < W; ++c) grad_x[c] = T(0);
        for (int64_t j = std::max<int64_t>(0, t + k - l); j < k; ++j)
            for (int c = 0; c < W; ++c) grad_x[c] += grad_pre[(t + k - 1 - j) * W + c] * s.w[j * d + c0 + c];
    }
}

// A whole Jamba model, one token for each of b sequences: Jamba.step after the embedding, in one call. Each
// sequence is read by a team of threads (with fewer sequences than threads: all of them; else one each): the loops
// marked SHARED split their iterations among the team, ONE is done by one of them, and each ends with a barrier.
// Where no parallel region encloses them (OpenMP off) they run as plain loops.
#define SHARED _Pragma("omp for schedule(static)")
#define ONE _Pragma("omp single")

// w: the model's parameters in model.parameters()'s order (the embedding, then per layer its input norm, its
// mixer's, its pre-ff norm, its MLP's or its router's and experts'; the final norm), then the head's (the
// embedding's again when tied). states, per layer: a Mamba layer's conv window (b, d, k) and h (b, d, n), stepped
// in place; an attention layer's keys and values (b, g, room, e), is_token (b, room) and next_position (b), with
// the slot of this token's key and value (length - 1, written here) marked a token. cache: each attention layer's
// length and room.
template <typename T> struct Model {
    const T *x, *const *w;
    void* const* states;
    const int64_t* cache;
    const char *layers, *mlps;             // the model's layer and MLP patterns
    int64_t count;                         // of layers
    T* out;                                // (b, v) logits, or the final hidden states (b, m)
    int64_t m, v, n, k, d, f, heads, groups, experts, top_k, window, r;
    bool rotary, hidden;
    T eps;
};

// A team's working memory for one sequence. p: the attention scores of each head.
template <typename T> struct Scratch {
    std::vector<T> x, normed, mixed, sum, xz, y, q, gate, up, probs, u, dt_B_C, p;
    Scratch(const Model<T>& M, int64_t longest)
        : x(M.m), normed(M.m), mixed(M.m), sum(M.m), xz(2 * M.d), y(std::max(M.d, M.m)), q(M.m), gate(M.f),
          up(M.f), probs(M.experts), u(M.d), dt_B_C(M.r + 2 * M.n), p(M.heads * longest) {}
};

// out = w x for a (rows, cols) row-major matrix w, as nn.Linear keeps its weight; rows shared.
template <typename T> static void matvec(const T* w, const T* x, T* out, int64_t rows, int64_t cols) {
    SHARED
    for (int64_t i = 0; i < rows; ++i) {
        const T* row = w + i * cols;
        T sum = T(0);
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < cols; ++j) sum += row[j] * x[j];
        out[i] = sum;
    }
}

template <typename T> static void rms_norm(T* x, int64_t size, const T* weight, T eps) {
    T sum = T(0);
    for (int64_t i = 0; i < size; ++i) sum += x[i] * x[i];
    const T scale = T(1) / std::sqrt(sum / T(size) + eps);
    for (int64_t i = 0; i < size; ++i) x[i] *= scale * weight[i];
}

// The recurrent mode ([Mamba] Section 3.4) of one sequence: MambaBlock.step between in_proj and out_proj (xz,
// in_proj's output, x then z -> y (d)), the conv window (d, k) and h (d, n) stepped in place. w: the block's
// parameters from A_log (A_log (d, n), D, in_proj, conv (d, k) and its bias, x_proj (r + 2n, d), dt_proj (d, r)
// and its bias, the RMSNorms of dt, B and C, out_proj).
template <typename T> static void mamba_step(const Model<T>& M, const T* const* w, T* window, T* h, Scratch<T>& S) {
    const int64_t d = M.d, n = M.n, r = M.r, k = M.k;
    const T *A_log = w[0], *D = w[1], *conv_w = w[3], *conv_b = w[4], *dt_proj_w = w[6], *dt_proj_b = w[7];
    T *u = S.u.data(), *dt = S.dt_B_C.data(), *B = dt + r, *C = B + n;
    SHARED
    for (int64_t c = 0; c < d; ++c) {                  // the conv window slides by one; u = silu(conv)
        T* now = window + c * k;
        T pre = conv_b[c] + conv_w[c * k + k - 1] * S.xz[c];
        for (int64_t j = 0; j < k - 1; ++j) {
            now[j] = now[j + 1];
            pre += conv_w[c * k + j] * now[j];
        }
        now[k - 1] = S.xz[c];
        u[c] = pre / (T(1) + exp_(-pre));
    }
    matvec(w[5], u, dt, r + 2 * n, d);                 // x_proj: dt, B and C (Algorithm 2, lines 3-5)
    ONE {                                              // Jamba's RMSNorms on dt, B and C
        rms_norm(dt, r, w[8], M.eps);
        rms_norm(B, n, w[9], M.eps);
        rms_norm(C, n, w[10], M.eps);
    }
    SHARED
    for (int64_t c = 0; c < d; ++c) {
        T delta = dt_proj_b[c];                        // delta = softplus(dt_proj(dt)), line 6
        for (int64_t j = 0; j < r; ++j) delta += dt_proj_w[c * r + j] * dt[j];
        delta = delta > T(20) ? delta : std::log1p(std::exp(delta));   // linear past 20, as torch's softplus
        const T du = delta * u[c], *A = A_log + c * n;
        T *hc = h + c * n, sum = T(0);
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {              // h = exp(delta A) h + delta B u; y = C . h (Eq. 2, 4)
            hc[i] = exp_(-delta * exp_(A[i])) * hc[i] + du * B[i];
            sum += C[i] * hc[i];
        }
        const T z = S.xz[d + c];
        S.y[c] = (sum + D[c] * u[c]) * z / (T(1) + exp_(-z));     // + D u, then the gate
    }
}

// The gated SiLU MLP: out = down(silu(gate(x)) * up(x)); w: gate (f, m), up (f, m), down (m, f).
template <typename T> static void mlp(const Model<T>& M, const T* const* w, const T* x, T* out, Scratch<T>& S) {
    matvec(w[0], x, S.gate.data(), M.f, M.m);
    matvec(w[1], x, S.up.data(), M.f, M.m);
    SHARED
    for (int64_t i = 0; i < M.f; ++i) S.gate[i] = S.gate[i] / (T(1) + exp_(-S.gate[i])) * S.up[i];
    matvec(w[2], S.gate.data(), out, M.m, M.f);
}

// Rotary embedding (RoFormer) of one head x (e) at position pos, as JAMBA._rotary: halves x1, x2 ->
// x1 cos - x2 sin, x1 sin + x2 cos at angles pos * 10000^(-2i/e).
template <typename T> static void rotary(T* x, int64_t e, int64_t pos) {
    for (int64_t i = 0; i < e / 2; ++i) {
        const T angle = T(pos) * std::pow(T(10000), -T(2 * i) / T(e)), x1 = x[i], x2 = x[i + e / 2];
        x[i] = x1 * std::cos(angle) - x2 * std::sin(angle);
        x[i + e / 2] = x1 * std::sin(angle) + x2 * std::cos(angle);
    }
}

// One query token of sequence bi attends over its cache (AttentionBlock.step): q, k, v of S.normed, rotated where
// the layer has rotary positions; k and v written to the cache's slot length - 1; each query head, shared,
// softmax(q.k / sqrt(e)) over its group's keys among the last `window` slots that hold tokens -> S.y (m), the
// heads' outputs side by side. w: q_proj, k_proj, v_proj.
template <typename T> static void attend(const Model<T>& M, const T* const* w, void* const* s, const int64_t* cache,
                                         bool rotate, int64_t bi, Scratch<T>& S) {
    const int64_t m = M.m, e = m / M.heads, g = M.groups, length = cache[0], room = cache[1];
    const int64_t first = std::max<int64_t>(0, length - M.window), pos = ((const int64_t*)s[3])[bi] - 1;
    T *keys = (T*)s[0] + bi * g * room * e, *values = (T*)s[1] + bi * g * room * e;
    const bool* is_token = (const bool*)s[2] + bi * room;
    matvec(w[0], S.normed.data(), S.q.data(), m, m);
    for (int64_t gi = 0; gi < g; ++gi) {
        matvec(w[1] + gi * e * m, S.normed.data(), keys + (gi * room + length - 1) * e, e, m);
        matvec(w[2] + gi * e * m, S.normed.data(), values + (gi * room + length - 1) * e, e, m);
    }
    if (rotate) {
        SHARED
        for (int64_t hi = 0; hi < M.heads + g; ++hi)      // the query heads, then the new keys
            rotary(hi < M.heads ? S.q.data() + hi * e : keys + ((hi - M.heads) * room + length - 1) * e, e, pos);
    }
    SHARED
    for (int64_t hi = 0; hi < M.heads; ++hi) {
        const int64_t gi = hi / (M.heads / g);
        T *q = S.q.data() + hi * e, *y = S.y.data() + hi * e, *p = S.p.data() + hi * length, top = -INFINITY;
        for (int64_t t = first; t < length; ++t) {
            if (!is_token[t]) continue;
            const T* key = keys + (gi * room + t) * e;
            T dot = T(0);
            for (int64_t j = 0; j < e; ++j) dot += q[j] * key[j];
            p[t] = dot / std::sqrt(T(e));
            top = std::max(top, p[t]);
        }
        T total = T(0);
        std::fill(y, y + e, T(0));
        for (int64_t t = first; t < length; ++t) {
            if (!is_token[t]) continue;
            const T weight = std::exp(p[t] - top), *value = values + (gi * room + t) * e;
            total += weight;
            for (int64_t j = 0; j < e; ++j) y[j] += weight * value[j];
        }
        for (int64_t j = 0; j < e; ++j) y[j] /= total;
    }
}

// Sequence bi through every layer: x = x + mixer(norm(x)), x = x + feed_forward(norm(x)) (JambaLayer.step), then
// the final norm and the head.
template <typename T> static void model_row(const Model<T>& M, int64_t bi, Scratch<T>& S) {
    const int64_t m = M.m, d = M.d;
    T *x = S.x.data(), *normed = S.normed.data(), *mixed = S.mixed.data();
    const T* const* w = M.w + 1;                     // after the embedding
    void* const* s = M.states;
    const int64_t* cache = M.cache;
    ONE std::copy(M.x + bi * m, M.x + (bi + 1) * m, x);
    for (int64_t i = 0; i < M.count; ++i) {
        ONE {
            std::copy(x, x + m, normed);
            rms_norm(normed, m, w[0], M.eps);
        }
        ++w;
        if (M.layers[i] == 'M') {                    // A_log, D, in_proj, conv, x_proj, dt_proj, three norms, out_proj
            matvec(w[2], normed, S.xz.data(), 2 * d, m);
            mamba_step(M, w, (T*)s[0] + bi * d * M.k, (T*)s[1] + bi * d * M.n, S);
            matvec(w[11], S.y.data(), mixed, m, d);
            w += 12;
            s += 2;
        } else {                                     // q, k, v, o
            const bool rotate = M.rotary && !std::memchr(M.layers, 'M', i);   // before any Mamba layer
            attend(M, w, s, cache, rotate, bi, S);
            matvec(w[3], S.y.data(), mixed, m, m);
            w += 4;
            s += 4;
            cache += 2;
        }
        ONE {
            for (int64_t j = 0; j < m; ++j) x[j] += mixed[j];
            std::copy(x, x + m, normed);
            rms_norm(normed, m, w[0], M.eps);
            std::fill(S.sum.begin(), S.sum.end(), T(0));
        }
        ++w;
        if (M.mlps[i] == 'D') {
            mlp(M, w, normed, S.sum.data(), S);
            w += 3;
        } else {    // a mixture of experts: the top_k by the router's softmax, weighted by their probabilities
            matvec(w[0], normed, S.probs.data(), M.experts, m);
            ONE {
                const T top = *std::max_element(S.probs.begin(), S.probs.end());
                T total = T(0);
                for (T& prob : S.probs) total += prob = std::exp(prob - top);
                std::vector<T> sorted(S.probs);
                std::nth_element(sorted.begin(), sorted.begin() + M.top_k - 1, sorted.end(), std::greater<T>());
                const T kth = sorted[M.top_k - 1];    // those above it, then ties at it by index, K in all
                int64_t ties = M.top_k - std::count_if(S.probs.begin(), S.probs.end(), [&](T p) { return p > kth; });
                for (T& prob : S.probs)                                // the weight, 0 for the others
                    prob = prob > kth || (prob == kth && ties-- > 0) ? prob / total : T(0);
            }
            for (int64_t e = 0; e < M.experts; ++e) {
                if (S.probs[e] == T(0)) continue;
                mlp(M, w + 1 + 3 * e, normed, mixed, S);
                SHARED
                for (int64_t j = 0; j < m; ++j) S.sum[j] += S.probs[e] * mixed[j];
            }
            w += 1 + 3 * M.experts;
        }
        ONE for (int64_t j = 0; j < m; ++j) x[j] += S.sum[j];
    }
    ONE rms_norm(x, m, w[0], M.eps);
    if (M.hidden) {
        ONE std::copy(x, x + m, M.out + bi * m);
    } else {
        matvec(w[1], x, M.out + bi * M.v, M.v, m);
    }
}

// Work items (one block of LANES channels of one sequence each) in contiguous runs, one run per thread. With
// OpenMP the threads are torch's own: the process has loaded torch's OpenMP runtime, which this library then shares,
// so the two never compete for the cores. f(thread, first item, end) sets up its scratch space once per thread.
template <typename F> static void in_parallel(int64_t items, int threads, F f) {
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
        const int tid = 0, team = 1;
#endif
        f(tid, items * tid / team, items * (tid + 1) / team);
    }
}

#define EXPORT(T, suffix)                                                                                         \
    extern "C" void scan_forward_##suffix(const T* u, const T* delta, const T* delta_bias, int64_t softplus,      \
                                          const T* A, const T* B, const T* C, const T* D, const T* z,             \
                                          const T* h0, T* out, T* last, T* saved, int64_t b, int64_t l,           \
                                          int64_t d, int64_t n, int threads) {                                    \
        const Scan<T> s{u, delta, delta_bias, A, B, C, D, z, h0, softplus != 0, out, last, saved, nullptr,       \
                        nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, b, l, d, n};                      \
        in_parallel(b * (d / W), threads, [&](int, int64_t begin, int64_t end) {                                 \
            Block<T> m(n, 1);                                                                                     \
            for (int64_t i = begin; i < end; ++i) forward_block(s, i / (d / W), i % (d / W) * W, m);              \
        });                                                                                                       \
    }                                                                                                             \
    extern "C" void scan_backward_##suffix(const T* u, const T* delta, const T* delta_bias, int64_t softplus,     \
                                           const T* A, const T* B, const T* C, const T* D, const T* z,            \
                                           const T* saved, const T* grad_out, const T* grad_last, T* grad_u,      \
                                           T* grad_delta, T* grad_z, T* grad_h0, T* sums, int64_t b, int64_t l,   \
                                           int64_t d, int64_t n, int threads) {                                   \
        const Scan<T> s{u, delta, delta_bias, A, B, C, D, z, nullptr, softplus != 0, nullptr, nullptr,            \
                        (T*)saved, grad_out, grad_last, grad_u, grad_delta, grad_z, grad_h0, sums, b, l, d, n};   \
        in_parallel(b * (d / W), threads, [&](int tid, int64_t begin, int64_t end) {                             \
            Block<T> m(n, CHUNK);                                                                                 \
            for (int64_t i = begin; i < end; ++i) backward_block(s, tid, i / (d / W), i % (d / W) * W, m);        \
        });                                                                                                       \
    }                                                                                                             \
    extern "C" void model_step_##suffix(const T* x, T* out, const T* const* w, void* const* states,               \
                                        const int64_t* cache, const char* patterns, int64_t b, int64_t m,         \
                                        int64_t v, int64_t n, int64_t k, int64_t expand, int64_t f,               \
                                        int64_t heads, int64_t groups, int64_t experts, int64_t top_k,            \
                                        int64_t window, int64_t r, int64_t rotary, int64_t hidden, double eps,    \
                                        int64_t threads) {                                                        \
        const int64_t layers = std::strlen(patterns) / 2;             /* then as many of the MLPs' */             \
        const Model<T> M{x, w, states, cache, patterns, patterns + layers, layers, out, m, v, n, k, expand * m,   \
                         f, heads, groups, experts, top_k, window, r, rotary != 0, hidden != 0, T(eps)};          \
        int64_t longest = 1;                                                                                      \
        for (int64_t i = 0, j = 0; i < layers; ++i)   /* the longest attention cache */                           \
            if (patterns[i] == 'A') longest = std::max(longest, cache[2 * j++]);                                  \
        if (b < threads) {                        /* one team for each sequence in turn */                        \
            Scratch<T> S(M, longest);                                                                             \
            _Pragma("omp parallel num_threads(threads)")                                                          \
            for (int64_t bi = 0; bi < b; ++bi) model_row(M, bi, S);                                               \
        } else {                                  /* a team of one for each sequence */                           \
            in_parallel(b, int(threads), [&](int, int64_t begin, int64_t end) {                                   \
                Scratch<T> S(M, longest);                                                                         \
                for (int64_t bi = begin; bi < end; ++bi) {                                                        \
                    _Pragma("omp parallel num_threads(1)")                                                        \
                    model_row(M, bi, S);                                                                          \
                }                                                                                                 \
            });                                                                                                   \
        }                                                                                                         \
    }                                                                                                             \
    extern "C" void conv_forward_##suffix(const T* x, const T* w, const T* bias, T* out, int64_t b, int64_t l,    \
                                          int64_t d, int64_t k, int threads) {                                    \
        const Conv<T> s{x, w, bias, out, nullptr, nullptr, nullptr, nullptr, b, l, d, k};                         \
        in_parallel(b * (d / W), threads, [&](int, int64_t begin, int64_t end) {                                 \
            for (int64_t i = begin; i < end; ++i) conv_forward_block(s, i / (d / W), i % (d / W) * W);            \
        });                                                                                                       \
    }                                                                                                             \
    extern "C" void conv_backward_##suffix(const T* x, const T* w, const T* bias, const T* grad_out, T* grad_x,   \
                                           T* grad_w, T* grad_bias, int64_t b, int64_t l, int64_t d, int64_t k,   \
                                           int threads) {                                                         \
        const Conv<T> s{x, w, bias, nullptr, grad_out, grad_x, grad_w, grad_bias, b, l, d, k};                    \
        in_parallel(b * (d / W), threads, [&](int tid, int64_t begin, int64_t end) {                             \
            std::vector<T> grad_pre(l * W);                                                                       \
            for (int64_t i = begin; i < end; ++i) conv_backward_block(s, tid, i / (d / W), i % (d / W) * W, grad_pre); \
        });                                                                                                       \
    }
EXPORT(float, f32)
EXPORT(double, f64)
