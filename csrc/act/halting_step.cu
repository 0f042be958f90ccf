// Fused halting step (design §3): for each active row, z = w.s + c,
// h = sigmoid(z), the halting test on the float32/64 running sum, p (h or the
// remainder), N and R for rows that halt, accumulator[b] += p s, and p, h and
// a halted flag per row for the backward and the compaction.
#include "halting.h"

namespace act {
namespace {

// Row held in registers: THREADS threads share one row (32 = a warp per row,
// 8 rows per 256-thread block; more = a block per row), each owning CHUNKS
// accesses of VEC elements (16 bytes). The accumulator row does not depend on
// the dot product, so its loads are issued together with the state's: one
// round trip to DRAM per row instead of two.
template <typename T, int THREADS, int VEC, int CHUNKS>
__global__ void __launch_bounds__(THREADS * rows_per_block(THREADS))
halting_step_registers_kernel(const HaltingStepParams p) {
  using A = typename AccOf<T>::type;
  constexpr int ROWS = rows_per_block(THREADS);
  __shared__ A scratch[ROWS][THREADS / 32];
  const int group = threadIdx.x / THREADS;
  const int lane = threadIdx.x % THREADS;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * ROWS + group;
  if (i >= p.num_active) return;  // uniform per row group (whole block when ROWS = 1)

  const int64_t b = p.active[i];
  const int64_t H = p.hidden;
  const T* s = static_cast<const T*>(p.state) + i * p.state_row_stride;
  const A* w = static_cast<const A*>(p.weight);
  A* acc = static_cast<A*>(p.accumulator) + b * p.acc_row_stride;
  const A r = static_cast<const A*>(p.running_sum)[b];

  Vec<T, VEC> sv[CHUNKS];
  Vec<A, VEC> av[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t j = (static_cast<int64_t>(c) * THREADS + lane) * VEC;
    if (j < H) {
      sv[c] = load_readonly(reinterpret_cast<const Vec<T, VEC>*>(s + j));
      av[c] = *reinterpret_cast<const Vec<A, VEC>*>(acc + j);
    }
  }
  A dot = 0;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t j = (static_cast<int64_t>(c) * THREADS + lane) * VEC;
    if (j < H) {
      const Vec<A, VEC> wv = load_readonly(reinterpret_cast<const Vec<A, VEC>*>(w + j));
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += load_as<A>(sv[c].v[k]) * wv.v[k];
    }
  }
  dot = row_sum<THREADS>(dot, scratch[group]);
  if constexpr (THREADS == 32) __syncwarp();  // row_sum's block barrier does this for wider groups
  const Decision<A> d = decide<A>(p, i, r, dot);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t j = (static_cast<int64_t>(c) * THREADS + lane) * VEC;
    if (j < H) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) av[c].v[k] += d.p * load_as<A>(sv[c].v[k]);
      *reinterpret_cast<Vec<A, VEC>*>(acc + j) = av[c];
    }
  }
  if (lane == 0) write_row_outputs(p, i, b, d);
}

// Any width and alignment (scalar accesses, very wide rows, float64): the row
// is streamed twice, the second pass hitting L1/L2.
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS * rows_per_block(THREADS))
halting_step_loop_kernel(const HaltingStepParams p) {
  using A = typename AccOf<T>::type;
  constexpr int ROWS = rows_per_block(THREADS);
  __shared__ A scratch[ROWS][THREADS / 32];
  const int group = threadIdx.x / THREADS;
  const int lane = threadIdx.x % THREADS;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * ROWS + group;
  if (i >= p.num_active) return;

  const int64_t b = p.active[i];
  const int64_t H = p.hidden;
  const T* s = static_cast<const T*>(p.state) + i * p.state_row_stride;
  const A* w = static_cast<const A*>(p.weight);
  const A r = static_cast<const A*>(p.running_sum)[b];
  A dot = 0;
  for (int64_t j = lane; j < H; j += THREADS) dot += load_as<A>(s[j]) * w[j];
  dot = row_sum<THREADS>(dot, scratch[group]);
  if constexpr (THREADS == 32) __syncwarp();
  const Decision<A> d = decide<A>(p, i, r, dot);
  A* acc = static_cast<A*>(p.accumulator) + b * p.acc_row_stride;
  for (int64_t j = lane; j < H; j += THREADS) acc[j] += d.p * load_as<A>(s[j]);
  if (lane == 0) write_row_outputs(p, i, b, d);
}

template <int THREADS>
void launch(const HaltingStepParams& p, cudaStream_t stream, void (*kernel)(HaltingStepParams)) {
  constexpr int ROWS = rows_per_block(THREADS);
  const dim3 grid(static_cast<unsigned>((p.num_active + ROWS - 1) / ROWS));
  kernel<<<grid, THREADS * ROWS, 0, stream>>>(p);
}

// Picks the smallest register tile that covers H for THREADS threads per row.
template <typename T, int THREADS>
bool launch_registers(const HaltingStepParams& p, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_ok = p.hidden % VEC == 0 && p.state_row_stride % VEC == 0 &&
                      p.acc_row_stride % VEC == 0 && aligned(p.state, 16) &&
                      aligned(p.accumulator, VEC * sizeof(A)) && aligned(p.weight, VEC * sizeof(A));
  if constexpr (sizeof(T) == 8) {
    return false;  // float64 is for checking, not speed: the loop kernel serves it
  } else {
    if (!vec_ok) return false;
    const int64_t chunks = (p.hidden + THREADS * VEC - 1) / (THREADS * VEC);
    return dispatch_chunks<8>(chunks, [&](auto tile) {
      launch<THREADS>(p, stream, halting_step_registers_kernel<T, THREADS, VEC, decltype(tile)::value>);
    });
  }
}

template <typename T, int THREADS>
void launch_threads(const HaltingStepParams& p, cudaStream_t stream) {
  if (!launch_registers<T, THREADS>(p, stream)) {
    launch<THREADS>(p, stream, halting_step_loop_kernel<T, THREADS>);
  }
}

}  // namespace

void halting_step(const HaltingStepParams& params, int dtype, cudaStream_t stream) {
  if (params.num_active == 0) return;
  ACT_DISPATCH_DTYPE(dtype, [&] {
    // A warp per row up to 1024 columns; wider rows get a block, so that each
    // thread holds at most 8 16-byte accesses of the row.
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
