// Fused halting step (DESIGN §3): for each active row, z = w.s + c,
// h = sigmoid(z), the halting test on the float32/64 running sum, p (h or the
// remainder), N and R for rows that halt, accumulator[b] += p s, and p, h and
// a halted flag per row for the backward and the compaction.
#include "common.h"

namespace act {
namespace {

// THREADS threads share one row: 32 = a warp per row (8 rows per 256-thread
// block), more = a block per row. VEC elements per access (16-byte loads
// where the row width and alignment allow).
template <typename T, int THREADS, int VEC>
__global__ void __launch_bounds__(THREADS == 32 ? 256 : THREADS)
halting_step_kernel(const HaltingStepParams p) {
  using A = typename AccOf<T>::type;
  constexpr int ROWS = THREADS == 32 ? 8 : 1;
  __shared__ A scratch[ROWS][THREADS / 32];
  const int group = threadIdx.x / THREADS;
  const int lane = threadIdx.x % THREADS;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * ROWS + group;
  if (i >= p.num_active) return;  // uniform per row group (whole block when ROWS = 1)

  const int64_t b = p.active[i];
  const int64_t H = p.hidden;
  const T* s = static_cast<const T*>(p.state) + i * p.state_row_stride;
  const A* w = static_cast<const A*>(p.weight);

  A dot = 0;
  for (int64_t j = static_cast<int64_t>(lane) * VEC; j < H; j += THREADS * VEC) {
    const Vec<T, VEC> sv = *reinterpret_cast<const Vec<T, VEC>*>(s + j);
    const Vec<A, VEC> wv = *reinterpret_cast<const Vec<A, VEC>*>(w + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dot += load_as<A>(sv.v[k]) * wv.v[k];
  }
  dot = row_sum<THREADS>(dot, scratch[group]);

  const A z = dot + *static_cast<const A*>(p.bias);
  const A h = A(1) / (A(1) + exp(-z));
  A* running = static_cast<A*>(p.running_sum);
  const A r = running[b];
  const bool halt = (r + h >= *static_cast<const A*>(p.threshold)) || (p.step >= p.max_steps);
  const A pv = halt ? A(1) - r : h;

  // Second pass over the row: it was just read by this row group, so it comes
  // from L1/L2, not DRAM.
  A* acc = static_cast<A*>(p.accumulator) + b * p.acc_row_stride;
  for (int64_t j = static_cast<int64_t>(lane) * VEC; j < H; j += THREADS * VEC) {
    const Vec<T, VEC> sv = *reinterpret_cast<const Vec<T, VEC>*>(s + j);
    Vec<A, VEC> av = *reinterpret_cast<const Vec<A, VEC>*>(acc + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) av.v[k] += pv * load_as<A>(sv.v[k]);
    *reinterpret_cast<Vec<A, VEC>*>(acc + j) = av;
  }
  if (lane == 0) {
    running[b] = halt ? r : r + h;
    if (halt) {
      p.steps[b] = p.step;
      static_cast<A*>(p.remainder)[b] = pv;
    }
    static_cast<A*>(p.p)[i] = pv;
    static_cast<A*>(p.h)[i] = h;
    p.halted[i] = halt;
  }
}

template <typename T, int THREADS>
void launch_threads(const HaltingStepParams& p, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int ROWS = THREADS == 32 ? 8 : 1;
  constexpr int VEC = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((p.num_active + ROWS - 1) / ROWS));
  const dim3 block(THREADS * ROWS);
  const bool vec_ok = p.hidden % VEC == 0 && p.state_row_stride % VEC == 0 &&
                      p.acc_row_stride % VEC == 0 && aligned(p.state, 16) &&
                      aligned(p.accumulator, VEC * sizeof(A)) && aligned(p.weight, VEC * sizeof(A));
  if (vec_ok) {
    halting_step_kernel<T, THREADS, VEC><<<grid, block, 0, stream>>>(p);
  } else {
    halting_step_kernel<T, THREADS, 1><<<grid, block, 0, stream>>>(p);
  }
}

}  // namespace

void halting_step(const HaltingStepParams& params, int dtype, cudaStream_t stream) {
  if (params.num_active == 0) return;
  ACT_DISPATCH_DTYPE(dtype, [&] {
    if (params.hidden <= 1024) {
      launch_threads<T, 32>(params, stream);
    } else if (params.hidden <= 4096) {
      launch_threads<T, 128>(params, stream);
    } else {
      launch_threads<T, 512>(params, stream);
    }
  });
  check_launch("halting_step");
}

}  // namespace act
