// The fused GRU/LSTM gates on the CPU (see gates_cpu.h). One pass over a
// row's units computes its gates and writes each output element once; the
// fused step then reduces the row's halting dot product and accumulates.
// The unit loops are written branch-free so the compiler vectorizes them;
// float32 uses a polynomial exp (about 1 ulp) that vectorizes, where libm's
// expf would be a scalar call per element, and float64 uses std::exp.
#include "cells/gates_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace act {
namespace cpu {
namespace {

// exp(x) for float: x = k ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6
// Taylor polynomial (error r^7 / 7! < 2e-7 relative), times 2^k built in the
// exponent bits. x is clamped to [-87, 88], where 2^k stays a normal float.
// No branches (selects, and rounding by adding and subtracting 1.5 * 2^23),
// so that a loop calling it vectorizes.
__attribute__((always_inline)) inline float exp_of(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const float r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  const int bits = (static_cast<int>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_of(double x) { return std::exp(x); }

template <typename T> __attribute__((always_inline)) inline T sigmoid(T x) { return T(1) / (T(1) + exp_of(-x)); }
// tanh(x) = 2 sigmoid(2x) - 1, as the Triton kernels compute it
template <typename T> __attribute__((always_inline)) inline T tanh_of(T x) { return T(2) / (T(1) + exp_of(T(-2) * x)) - T(1); }

// The halting step of active row i whose new state is out_h (and out_c).
template <typename T>
void halt_row(const Halting<T>& q, int64_t i, const T* out_h, const T* out_c, int64_t hidden) {
  const int64_t b = q.active[i];
  const T r = q.running_sum[b];
  T dot = 0;
  for (int64_t j = 0; j < hidden; ++j) dot += out_h[j] * q.weight[j];
  const T h = T(1) / (T(1) + std::exp(-(dot + q.bias[0])));
  const int64_t step = q.row_steps != nullptr ? q.row_steps[i] : q.step;
  const bool halt = (r + h >= q.threshold[0]) || (step >= q.max_steps);
  const T p = halt ? T(1) - r : h;
  q.running_sum[b] = halt ? r : r + h;
  if (halt) {
    q.steps[b] = step;
    q.remainder[b] = p;
  }
  T* acc_h = q.acc_h + b * q.acc_h_stride;
  for (int64_t j = 0; j < hidden; ++j) acc_h[j] += p * out_h[j];
  if (out_c != nullptr) {
    T* acc_c = q.acc_c + b * q.acc_c_stride;
    for (int64_t j = 0; j < hidden; ++j) acc_c[j] += p * out_c[j];
  }
  q.p[i] = p;
  q.h[i] = h;
  q.halted[i] = halt;
}

}  // namespace

// Each entry point is compiled twice, for x86-64 with AVX2 (8 floats
// a lane) and for the baseline, and the loader picks the one this CPU runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ACT_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ACT_CPU_CLONES
#endif

// One row of each kernel. Every slice is its own restrict parameter: GCC
// honours restrict on parameters (kept through inlining), and stores at j,
// H + j, 2H + j through one pointer would read to it as possibly
// overlapping, which keeps the loop scalar. Inlined into each clone below,
// so the loops are compiled for that clone's instruction set.
#define ACT_ROW template <typename T> __attribute__((always_inline)) inline void

ACT_ROW gru_forward_row(const T* __restrict a_r, const T* __restrict a_z, const T* __restrict a_n,
                        const T* __restrict b_r, const T* __restrict b_z, const T* __restrict b_n,
                        const T* __restrict h, T* __restrict out, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = sigmoid(a_r[j] + b_r[j]);
    const T z = sigmoid(a_z[j] + b_z[j]);
    const T n = tanh_of(a_n[j] + r * b_n[j]);
    out[j] = (T(1) - z) * n + z * h[j];
  }
}

ACT_ROW lstm_forward_row(const T* __restrict a_i, const T* __restrict a_f, const T* __restrict a_g,
                         const T* __restrict a_o, const T* __restrict b_i, const T* __restrict b_f,
                         const T* __restrict b_g, const T* __restrict b_o, const T* __restrict c,
                         T* __restrict out_h, T* __restrict out_c, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T ig = sigmoid(a_i[j] + b_i[j]);
    const T fg = sigmoid(a_f[j] + b_f[j]);
    const T gg = tanh_of(a_g[j] + b_g[j]);
    const T og = sigmoid(a_o[j] + b_o[j]);
    const T c_new = fg * c[j] + ig * gg;
    out_c[j] = c_new;
    out_h[j] = og * tanh_of(c_new);
  }
}

ACT_ROW gru_backward_row(const T* __restrict g, const T* __restrict a_r, const T* __restrict a_z,
                         const T* __restrict a_n, const T* __restrict b_r, const T* __restrict b_z,
                         const T* __restrict b_n, const T* __restrict h, T* __restrict da_r, T* __restrict da_z,
                         T* __restrict da_n, T* __restrict db_r, T* __restrict db_z, T* __restrict db_n,
                         T* __restrict dh, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = sigmoid(a_r[j] + b_r[j]);
    const T z = sigmoid(a_z[j] + b_z[j]);
    const T n = tanh_of(a_n[j] + r * b_n[j]);
    const T d_n = g[j] * (T(1) - z) * (T(1) - n * n);
    const T d_z = g[j] * (h[j] - n) * z * (T(1) - z);
    const T d_r = d_n * b_n[j] * r * (T(1) - r);
    da_r[j] = d_r;
    da_z[j] = d_z;
    da_n[j] = d_n;
    db_r[j] = d_r;
    db_z[j] = d_z;
    db_n[j] = d_n * r;
    dh[j] = g[j] * z;
  }
}

ACT_ROW lstm_backward_row(const T* __restrict dh_out, const T* __restrict dc_in, const T* __restrict a_i,
                          const T* __restrict a_f, const T* __restrict a_g, const T* __restrict a_o,
                          const T* __restrict b_i, const T* __restrict b_f, const T* __restrict b_g,
                          const T* __restrict b_o, const T* __restrict c, T* __restrict da_i,
                          T* __restrict da_f, T* __restrict da_g, T* __restrict da_o, T* __restrict dc_out,
                          int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T ig = sigmoid(a_i[j] + b_i[j]);
    const T fg = sigmoid(a_f[j] + b_f[j]);
    const T gg = tanh_of(a_g[j] + b_g[j]);
    const T og = sigmoid(a_o[j] + b_o[j]);
    const T t = tanh_of(fg * c[j] + ig * gg);
    const T dh = dh_out[j];
    const T dc = dc_in[j] + dh * og * (T(1) - t * t);
    da_i[j] = dc * gg * ig * (T(1) - ig);
    da_f[j] = dc * c[j] * fg * (T(1) - fg);
    da_g[j] = dc * ig * (T(1) - gg * gg);
    da_o[j] = dh * t * og * (T(1) - og);
    dc_out[j] = dc * fg;
  }
}

#undef ACT_ROW

template <typename T>
ACT_CPU_CLONES void gru_forward(const T* gi, int64_t s_gi, const T* gh, int64_t s_gh, const T* h, int64_t s_h,
                                T* out_h, int64_t rows, int64_t hidden, const Halting<T>* halting) {
  const int64_t H = hidden;
  for (int64_t i = 0; i < rows; ++i) {
    const T* a = gi + i * s_gi;
    const T* b = gh + i * s_gh;
    T* o = out_h + i * H;
    gru_forward_row(a, a + H, a + 2 * H, b, b + H, b + 2 * H, h + i * s_h, o, H);
    if (halting != nullptr) halt_row(*halting, i, o, static_cast<const T*>(nullptr), H);
  }
}

template <typename T>
ACT_CPU_CLONES void lstm_forward(const T* gi, int64_t s_gi, const T* gh, int64_t s_gh, const T* c, int64_t s_c,
                                 T* out_h, T* out_c, int64_t rows, int64_t hidden, const Halting<T>* halting) {
  const int64_t H = hidden;
  for (int64_t i = 0; i < rows; ++i) {
    const T* a = gi + i * s_gi;
    const T* b = gh + i * s_gh;
    T* oh = out_h + i * H;
    T* oc = out_c + i * H;
    lstm_forward_row(a, a + H, a + 2 * H, a + 3 * H, b, b + H, b + 2 * H, b + 3 * H, c + i * s_c, oh, oc, H);
    if (halting != nullptr) halt_row(*halting, i, oh, oc, H);
  }
}

template <typename T>
ACT_CPU_CLONES void gru_backward(const T* grad, int64_t s_grad, const T* gi, int64_t s_gi, const T* gh,
                                 int64_t s_gh, const T* h, int64_t s_h, T* d_gi, T* d_gh, T* d_h, int64_t rows,
                                 int64_t hidden) {
  const int64_t H = hidden;
  for (int64_t i = 0; i < rows; ++i) {
    const T* a = gi + i * s_gi;
    const T* b = gh + i * s_gh;
    T* da = d_gi + i * 3 * H;
    T* db = d_gh + i * 3 * H;
    gru_backward_row(grad + i * s_grad, a, a + H, a + 2 * H, b, b + H, b + 2 * H, h + i * s_h, da, da + H,
                     da + 2 * H, db, db + H, db + 2 * H, d_h + i * H, H);
  }
}

template <typename T>
ACT_CPU_CLONES void lstm_backward(const T* grad_h, int64_t s_dh, const T* grad_c, int64_t s_dc, const T* gi,
                                  int64_t s_gi, const T* gh, int64_t s_gh, const T* c, int64_t s_c, T* d_a, T* d_c,
                                  int64_t rows, int64_t hidden) {
  const int64_t H = hidden;
  for (int64_t i = 0; i < rows; ++i) {
    const T* a = gi + i * s_gi;
    const T* b = gh + i * s_gh;
    T* da = d_a + i * 4 * H;
    lstm_backward_row(grad_h + i * s_dh, grad_c + i * s_dc, a, a + H, a + 2 * H, a + 3 * H, b, b + H, b + 2 * H,
                      b + 3 * H, c + i * s_c, da, da + H, da + 2 * H, da + 3 * H, d_c + i * H, H);
  }
}

template <typename T>
void halting_forward(const T* state, int64_t s_state, int64_t rows, int64_t hidden, const Halting<T>* halting) {
  for (int64_t i = 0; i < rows; ++i) halt_row(*halting, i, state + i * s_state, static_cast<const T*>(nullptr), hidden);
}

#define ACT_CPU_INSTANTIATE(T)                                                                              \
  template void halting_forward<T>(const T*, int64_t, int64_t, int64_t, const Halting<T>*);                  \
  template void gru_forward<T>(const T*, int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t, \
                               const Halting<T>*);                                                          \
  template void lstm_forward<T>(const T*, int64_t, const T*, int64_t, const T*, int64_t, T*, T*, int64_t,    \
                                int64_t, const Halting<T>*);                                                \
  template void gru_backward<T>(const T*, int64_t, const T*, int64_t, const T*, int64_t, const T*, int64_t,  \
                                T*, T*, T*, int64_t, int64_t);                                               \
  template void lstm_backward<T>(const T*, int64_t, const T*, int64_t, const T*, int64_t, const T*, int64_t, \
                                 const T*, int64_t, T*, T*, int64_t, int64_t);

ACT_CPU_INSTANTIATE(float)
ACT_CPU_INSTANTIATE(double)

#undef ACT_CPU_INSTANTIATE
#undef ACT_CPU_CLONES

}  // namespace cpu
}  // namespace act
