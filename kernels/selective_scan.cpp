// [Mamba] Algorithm 2 fused into one pass over memory. Every channel is independent: the d channels are taken in
// blocks of LANES (the lanes of every inner loop over c, which the compiler turns into vector instructions), the
// blocks of all sequences are shared among the threads, and each block walks time in order with its state h
// (n x LANES numbers) in L1 cache. Each step reads u, delta, z (LANES each) and B, C (n each) and writes y: the
// (b, d, l, n) tensors of discretisation and states are never made.
// Layouts: u, delta, z, out and their gradients (b, l, d), channels contiguous; B, C (b, l, n); A (n, d); D (d);
// h0, last and grad_h0 (b, d, n); saved (b, chunks, n, d), the state at the start of each chunk of CHUNK steps.
// d is a multiple of LANES (the caller pads with channels whose inputs are 0).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// The recurrent mode ([Mamba] Section 3.4), one token for each of b sequences: all of MambaBlock.step between
// in_proj and out_proj in one call (step itself does it in a few dozen small torch operations). Layouts: window,
// new_window (b, d, k); xz (b, 2d), in_proj's output, x then z; y (b, d); h, new_h (b, d, n); conv_w (d, k);
// x_proj_w (r + 2n, d); dt_proj_w (d, r); A_log (d, n). The three norm weights are null without the inner norms.
template <typename T> struct Step {
    const T *window, *xz, *conv_w, *conv_b, *x_proj_w, *dt_norm_w, *b_norm_w, *c_norm_w, *dt_proj_w, *dt_proj_b,
        *A_log, *D, *h;
    T *new_window, *new_h, *y;
    int64_t b, d, n, r, k;
    T eps;
};

template <typename T> static void rms_norm(T* x, int64_t size, const T* weight, T eps) {
    T sum = T(0);
    for (int64_t i = 0; i < size; ++i) sum += x[i] * x[i];
    const T scale = T(1) / std::sqrt(sum / T(size) + eps);
    for (int64_t i = 0; i < size; ++i) x[i] *= scale * weight[i];
}

template <typename T> static void mamba_step(const Step<T>& s) {
    const int64_t d = s.d, n = s.n, r = s.r, k = s.k;
    std::vector<T> u(d), dt_B_C(r + 2 * n);
    for (int64_t bi = 0; bi < s.b; ++bi) {
        for (int64_t c = 0; c < d; ++c) {              // the conv window slides by one; u = silu(conv)
            const T *old = s.window + (bi * d + c) * k, *w = s.conv_w + c * k;
            T* now = s.new_window + (bi * d + c) * k;
            T pre = s.conv_b[c] + w[k - 1] * s.xz[bi * 2 * d + c];
            for (int64_t j = 0; j < k - 1; ++j) {
                now[j] = old[j + 1];
                pre += w[j] * now[j];
            }
            now[k - 1] = s.xz[bi * 2 * d + c];
            u[c] = pre / (T(1) + exp_(-pre));
        }
        for (int64_t j = 0; j < r + 2 * n; ++j) {      // x_proj: dt, B and C (Algorithm 2, lines 3-5)
            const T* w = s.x_proj_w + j * d;
            T sum = T(0);
#pragma omp simd reduction(+ : sum)
            for (int64_t c = 0; c < d; ++c) sum += w[c] * u[c];
            dt_B_C[j] = sum;
        }
        const T *dt = dt_B_C.data(), *B = dt + r, *C = B + n;
        if (s.dt_norm_w) {                               // Jamba's RMSNorms on dt, B and C
            rms_norm(dt_B_C.data(), r, s.dt_norm_w, s.eps);
            rms_norm(dt_B_C.data() + r, n, s.b_norm_w, s.eps);
            rms_norm(dt_B_C.data() + r + n, n, s.c_norm_w, s.eps);
        }
        for (int64_t c = 0; c < d; ++c) {
            T delta = s.dt_proj_b[c];                    // delta = softplus(dt_proj(dt)), line 6
            for (int64_t j = 0; j < r; ++j) delta += s.dt_proj_w[c * r + j] * dt[j];
            delta = delta > T(20) ? delta : std::log1p(std::exp(delta));   // linear past 20, as torch's softplus
            const T du = delta * u[c], *A_log = s.A_log + c * n, *h = s.h + (bi * d + c) * n;
            T* __restrict h_new = s.new_h + (bi * d + c) * n;
            T sum = T(0);
#pragma omp simd reduction(+ : sum)
            for (int64_t i = 0; i < n; ++i) {            // h = exp(delta A) h + delta B u; y = C . h (Eq. 2, 4)
                h_new[i] = exp_(-delta * exp_(A_log[i])) * h[i] + du * B[i];
                sum += C[i] * h_new[i];
            }
            const T z = s.xz[bi * 2 * d + d + c];
            s.y[bi * d + c] = (sum + s.D[c] * u[c]) * z / (T(1) + exp_(-z));   // + D u, then the gate
        }
    }
}

// out = w x for a (rows, cols) row-major matrix w, as nn.Linear keeps its weight.
template <typename T> static void matvec(const T* w, const T* x, T* out, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) {
        const T* row = w + i * cols;
        T sum = T(0);
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < cols; ++j) sum += row[j] * x[j];
        out[i] = sum;
    }
}

// A Jamba layer with a Mamba mixer, one token: r = x + out_proj(mamba_step(in_proj(norm(x)))), then for a dense
// MLP out = r + down(silu(gate(norm(r))) * up(norm(r))), with JambaLayer's two RMSNorms; without one (no gate_w),
// out = r.
template <typename T> struct Layer {
    const T *x, *norm_w, *in_proj_w, *out_proj_w, *ff_norm_w, *gate_w, *up_w, *down_w;
    T* out;
    int64_t m, f;
    T eps;
};

template <typename T> static void layer_step(const Layer<T>& L, Step<T> s) {
    const int64_t b = s.b, m = L.m, d = s.d, f = L.f;
    std::vector<T> normed(m), xz(b * 2 * d), y(b * d), gate(f), up(f);
    for (int64_t bi = 0; bi < b; ++bi) {
        std::copy(L.x + bi * m, L.x + (bi + 1) * m, normed.begin());
        rms_norm(normed.data(), m, L.norm_w, L.eps);
        matvec(L.in_proj_w, normed.data(), xz.data() + bi * 2 * d, 2 * d, m);
    }
    s.xz = xz.data();
    s.y = y.data();
    mamba_step(s);
    for (int64_t bi = 0; bi < b; ++bi) {
        T* out = L.out + bi * m;
        matvec(L.out_proj_w, y.data() + bi * d, out, m, d);
        for (int64_t j = 0; j < m; ++j) out[j] += L.x[bi * m + j];      // the first residual
        if (!L.gate_w) continue;                                        // a mixture of experts: torch's to run
        std::copy(out, out + m, normed.begin());
        rms_norm(normed.data(), m, L.ff_norm_w, L.eps);
        matvec(L.gate_w, normed.data(), gate.data(), f, m);
        matvec(L.up_w, normed.data(), up.data(), f, m);
        for (int64_t i = 0; i < f; ++i) gate[i] = gate[i] / (T(1) + exp_(-gate[i])) * up[i];
        matvec(L.down_w, gate.data(), normed.data(), m, f);
        for (int64_t j = 0; j < m; ++j) out[j] += normed[j];            // the second
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
    extern "C" void scan_forward_##suffix(const T* u, const T* delta, const T* delta_bias, int softplus,          \
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
    extern "C" void scan_backward_##suffix(const T* u, const T* delta, const T* delta_bias, int softplus,         \
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
    extern "C" void mamba_step_##suffix(const T* window, const T* xz, const T* conv_w,                          \
                                        const T* conv_b, const T* x_proj_w, const T* dt_norm_w,                   \
                                        const T* b_norm_w, const T* c_norm_w, const T* dt_proj_w,                 \
                                        const T* dt_proj_b, const T* A_log, const T* D, const T* h,               \
                                        T* new_window, T* new_h, T* y, int64_t b, int64_t d, int64_t n,           \
                                        int64_t r, int64_t k, double eps) {                                       \
        mamba_step(Step<T>{window, xz, conv_w, conv_b, x_proj_w, dt_norm_w, b_norm_w, c_norm_w, dt_proj_w,       \
                           dt_proj_b, A_log, D, h, new_window, new_h, y, b, d, n, r, k, T(eps)});                 \
    }                                                                                                             \
    extern "C" void layer_step_##suffix(const T* x, const T* norm_w, const T* in_proj_w, const T* window,         \
                                        const T* conv_w, const T* conv_b, const T* x_proj_w, const T* dt_norm_w,  \
                                        const T* b_norm_w, const T* c_norm_w, const T* dt_proj_w,                 \
                                        const T* dt_proj_b, const T* A_log, const T* D, const T* h,               \
                                        const T* out_proj_w, const T* ff_norm_w, const T* gate_w, const T* up_w,  \
                                        const T* down_w, T* new_window, T* new_h, T* out, int64_t b, int64_t m,   \
                                        int64_t d, int64_t n, int64_t r, int64_t k, int64_t f, double inner_eps,  \
                                        double eps) {                                                             \
        layer_step(Layer<T>{x, norm_w, in_proj_w, out_proj_w, ff_norm_w, gate_w, up_w, down_w, out, m, f, T(eps)},  \
                   Step<T>{window, nullptr, conv_w, conv_b, x_proj_w, dt_norm_w, b_norm_w, c_norm_w, dt_proj_w,   \
                           dt_proj_b, A_log, D, h, new_window, new_h, nullptr, b, d, n, r, k, T(inner_eps)});     \
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
