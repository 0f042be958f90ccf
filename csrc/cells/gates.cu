// Fused GRU and LSTM gates: one thread per (row, hidden unit). A thread reads
// its unit's gate pre-activations from gi and gh (G loads each), computes in
// float32 (float64 for float64), and writes each output element once. The
// backward recomputes the gates from the same inputs instead of saving them.
#include "cells/gates.h"
#include "halting.h"

namespace act {
namespace {

constexpr int kThreads = 256;

template <typename A> __device__ __forceinline__ A sigmoid(A x) { return A(1) / (A(1) + exp(-x)); }

struct Index {
  int64_t row, unit;
};

__device__ __forceinline__ bool element(const GateParams& p, Index& at) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= p.rows * p.hidden) return false;
  at.row = k / p.hidden;
  at.unit = k - at.row * p.hidden;
  return true;
}

template <typename T, typename A>
__device__ __forceinline__ A gate(const void* base, int64_t stride, Index at, int64_t g, int64_t hidden) {
  return load_as<A>(static_cast<const T*>(base)[at.row * stride + g * hidden + at.unit]);
}

// A unit's GRU gates, recomputed the same way by the forward and the backward.
template <typename T, typename A>
struct GruGates {
  A r, z, n, gh_n, h;
  __device__ __forceinline__ GruGates(const GateParams& p, Index at) {
    const int64_t H = p.hidden;
    r = sigmoid(gate<T, A>(p.gi, p.gi_stride, at, 0, H) + gate<T, A>(p.gh, p.gh_stride, at, 0, H));
    z = sigmoid(gate<T, A>(p.gi, p.gi_stride, at, 1, H) + gate<T, A>(p.gh, p.gh_stride, at, 1, H));
    gh_n = gate<T, A>(p.gh, p.gh_stride, at, 2, H);
    n = tanh(gate<T, A>(p.gi, p.gi_stride, at, 2, H) + r * gh_n);
    h = gate<T, A>(p.state, p.state_stride, at, 0, H);
  }
  // h' = (1 - z) n + z h: the forward and the fused step's one formula
  __device__ __forceinline__ A next_h() const { return (A(1) - z) * n + z * h; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gru_forward_kernel(const GateParams p) {
  using A = typename AccOf<T>::type;
  Index at;
  if (!element(p, at)) return;
  const GruGates<T, A> q(p, at);
  static_cast<T*>(p.out_h)[at.row * p.hidden + at.unit] = store_as<T>(q.next_h());
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gru_backward_kernel(const GateParams p) {
  using A = typename AccOf<T>::type;
  Index at;
  if (!element(p, at)) return;
  const int64_t H = p.hidden;
  const GruGates<T, A> q(p, at);
  const A r = q.r, z = q.z, n = q.n, gh_n = q.gh_n, h = q.h;
  const A g = gate<T, A>(p.grad_h, p.grad_h_stride, at, 0, H);
  const A d_n = g * (A(1) - z) * (A(1) - n * n);
  const A d_z = g * (h - n) * z * (A(1) - z);
  const A d_r = d_n * gh_n * r * (A(1) - r);
  T* d_gi = static_cast<T*>(p.d_gi) + at.row * 3 * H + at.unit;
  T* d_gh = static_cast<T*>(p.d_gh) + at.row * 3 * H + at.unit;
  d_gi[0] = store_as<T>(d_r);
  d_gi[H] = store_as<T>(d_z);
  d_gi[2 * H] = store_as<T>(d_n);
  d_gh[0] = store_as<T>(d_r);
  d_gh[H] = store_as<T>(d_z);
  d_gh[2 * H] = store_as<T>(d_n * r);
  static_cast<T*>(p.d_state)[at.row * H + at.unit] = store_as<T>(g * z);
}

template <typename T, typename A>
struct LstmGates {
  A i, f, g, o, c;
  __device__ __forceinline__ LstmGates(const GateParams& p, Index at) {
    const int64_t H = p.hidden;
    i = sigmoid(gate<T, A>(p.gi, p.gi_stride, at, 0, H) + gate<T, A>(p.gh, p.gh_stride, at, 0, H));
    f = sigmoid(gate<T, A>(p.gi, p.gi_stride, at, 1, H) + gate<T, A>(p.gh, p.gh_stride, at, 1, H));
    g = tanh(gate<T, A>(p.gi, p.gi_stride, at, 2, H) + gate<T, A>(p.gh, p.gh_stride, at, 2, H));
    o = sigmoid(gate<T, A>(p.gi, p.gi_stride, at, 3, H) + gate<T, A>(p.gh, p.gh_stride, at, 3, H));
    c = gate<T, A>(p.state, p.state_stride, at, 0, H);
  }
  // c' = f c + i g, and h' = o tanh(c') from c' before rounding
  __device__ __forceinline__ A next_c() const { return f * c + i * g; }
  __device__ __forceinline__ A next_h(A c_new) const { return o * tanh(c_new); }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_forward_kernel(const GateParams p) {
  using A = typename AccOf<T>::type;
  Index at;
  if (!element(p, at)) return;
  const LstmGates<T, A> q(p, at);
  const A c_new = q.next_c();
  const int64_t k = at.row * p.hidden + at.unit;
  static_cast<T*>(p.out_c)[k] = store_as<T>(c_new);
  static_cast<T*>(p.out_h)[k] = store_as<T>(q.next_h(c_new));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_backward_kernel(const GateParams p) {
  using A = typename AccOf<T>::type;
  Index at;
  if (!element(p, at)) return;
  const int64_t H = p.hidden;
  const LstmGates<T, A> q(p, at);
  const A t = tanh(q.next_c());
  const A dh = gate<T, A>(p.grad_h, p.grad_h_stride, at, 0, H);
  const A dc = gate<T, A>(p.grad_c, p.grad_c_stride, at, 0, H) + dh * q.o * (A(1) - t * t);
  T* d_a = static_cast<T*>(p.d_gi) + at.row * 4 * H + at.unit;
  d_a[0] = store_as<T>(dc * q.g * q.i * (A(1) - q.i));
  d_a[H] = store_as<T>(dc * q.c * q.f * (A(1) - q.f));
  d_a[2 * H] = store_as<T>(dc * q.i * (A(1) - q.g * q.g));
  d_a[3 * H] = store_as<T>(dh * t * q.o * (A(1) - q.o));
  static_cast<T*>(p.d_state)[at.row * H + at.unit] = store_as<T>(dc * q.f);
}

// A ponder step's gates and halting step in one launch: THREADS threads per
// active row (as the halting kernels' row groups), each computing the gates
// of units lane, lane + THREADS, ... and storing h' (and c'), then the row's
// dot product w.h' and the halting decision, then the accumulation, which
// reads back the elements this same thread stored (no barrier needed).
// Halting reads h' rounded to T, as the unfused path (gates, then halting).
template <typename T, int THREADS, bool LSTM>
__global__ void __launch_bounds__(THREADS * rows_per_block(THREADS))
cell_halting_kernel(const CellHaltingParams cp) {
  using A = typename AccOf<T>::type;
  constexpr int ROWS = rows_per_block(THREADS);
  __shared__ A scratch[ROWS][THREADS / 32];
  const GateParams& g = cp.gates;
  const HaltingStepParams& p = cp.halting;
  const int group = threadIdx.x / THREADS;
  const int lane = threadIdx.x % THREADS;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * ROWS + group;
  if (i >= p.num_active) return;  // uniform per row group

  const int64_t b = p.active[i];
  const int64_t H = p.hidden;
  const A* w = static_cast<const A*>(p.weight);
  T* out_h = static_cast<T*>(g.out_h) + i * H;
  T* out_c = LSTM ? static_cast<T*>(g.out_c) + i * H : nullptr;
  const A r = static_cast<const A*>(p.running_sum)[b];
  A dot = 0;
  for (int64_t j = lane; j < H; j += THREADS) {
    const Index at{i, j};
    T h_new;
    if constexpr (LSTM) {
      const LstmGates<T, A> q(g, at);
      const A c_new = q.next_c();
      out_c[j] = store_as<T>(c_new);
      h_new = store_as<T>(q.next_h(c_new));
    } else {
      h_new = store_as<T>(GruGates<T, A>(g, at).next_h());
    }
    out_h[j] = h_new;
    dot += load_as<A>(h_new) * w[j];
  }
  dot = row_sum<THREADS>(dot, scratch[group]);
  if constexpr (THREADS == 32) __syncwarp();
  const Decision<A> d = decide<A>(p, i, r, dot);
  A* acc = static_cast<A*>(p.accumulator) + b * p.acc_row_stride;
  A* acc_c = LSTM ? static_cast<A*>(cp.acc_c) + b * cp.acc_c_stride : nullptr;
  for (int64_t j = lane; j < H; j += THREADS) {
    acc[j] += d.p * load_as<A>(out_h[j]);
    if constexpr (LSTM) acc_c[j] += d.p * load_as<A>(out_c[j]);
  }
  if (lane == 0) write_row_outputs(p, i, b, d);
}

template <typename T, int THREADS, bool LSTM>
void launch_cell_halting(const CellHaltingParams& cp, cudaStream_t stream) {
  constexpr int ROWS = rows_per_block(THREADS);
  const dim3 grid(static_cast<unsigned>((cp.halting.num_active + ROWS - 1) / ROWS));
  cell_halting_kernel<T, THREADS, LSTM><<<grid, THREADS * ROWS, 0, stream>>>(cp);
}

// A warp per row up to 1024 units, wider rows a block (as act/halting_step.cu).
template <bool LSTM>
void cell_halting_step(const CellHaltingParams& cp, int dtype, cudaStream_t stream) {
  if (cp.halting.num_active <= 0 || cp.halting.hidden <= 0) return;
  ACT_DISPATCH_DTYPE(dtype, [&] {
    if (cp.halting.hidden <= 1024) {
      launch_cell_halting<T, 32, LSTM>(cp, stream);
    } else if (cp.halting.hidden <= 4096) {
      launch_cell_halting<T, 128, LSTM>(cp, stream);
    } else {
      launch_cell_halting<T, 512, LSTM>(cp, stream);
    }
  });
  check_launch(LSTM ? "lstm_halting_step" : "gru_halting_step");
}

unsigned blocks_for(const GateParams& p) {
  return static_cast<unsigned>((p.rows * p.hidden + kThreads - 1) / kThreads);
}

}  // namespace

#define ACT_GATE_LAUNCH(NAME, KERNEL)                                                 \
  void NAME(const GateParams& params, int dtype, cudaStream_t stream) {              \
    if (params.rows <= 0 || params.hidden <= 0) return;                              \
    ACT_DISPATCH_DTYPE(dtype, [&] {                                                  \
      KERNEL<T><<<blocks_for(params), kThreads, 0, stream>>>(params);                \
    });                                                                              \
    check_launch(#NAME);                                                             \
  }

ACT_GATE_LAUNCH(gru_gates_forward, gru_forward_kernel)
ACT_GATE_LAUNCH(gru_gates_backward, gru_backward_kernel)
ACT_GATE_LAUNCH(lstm_gates_forward, lstm_forward_kernel)
ACT_GATE_LAUNCH(lstm_gates_backward, lstm_backward_kernel)

#undef ACT_GATE_LAUNCH

void gru_halting_step(const CellHaltingParams& params, int dtype, cudaStream_t stream) {
  cell_halting_step<false>(params, dtype, stream);
}

void lstm_halting_step(const CellHaltingParams& params, int dtype, cudaStream_t stream) {
  cell_halting_step<true>(params, dtype, stream);
}

}  // namespace act
