// Fused combine backward (design §3) over the T packed rows. A row group (a
// warp, or a block for wide rows) walks whole batch rows b: it loads gS_b once,
// forms d_b = <gS_b, s^N_b> + grho_b, then for every step n < N_b
//   gz = (<gS_b, s^n> - d_b) h (1 - h),  gs = p gS_b + gz w,  gw += gz s,  gc += gz
// and gs = R gS_b for the last step. Each thread always owns the same columns,
// so gw needs no atomics: every row group writes one partial, and a second
// kernel sums the partials in a fixed order (in float64 for float32 data):
// the same inputs give bitwise the same gradients.
#include "common.h"

#include <algorithm>

namespace act {
namespace {

// Where the packed rows of one batch row live. The packed row of step k is
// order[bos + k] (rows of batch row b are its steps 0 .. N_b - 1, in order);
// every lane of a warp loads one of the first 32 up front and the walk reads
// them back with a shuffle, so a step costs no dependent global load.
struct BatchRowWalk {
  const int64_t* order;
  const int64_t* table;
  int64_t num_steps, bos, n_b, prefetched;

  __device__ __forceinline__ BatchRowWalk(const CombineBackwardParams& p, int64_t b)
      : order(p.order), table(p.step_table), num_steps(p.num_steps), bos(__ldg(p.first + b)), n_b(__ldg(p.steps + b)) {
    const int lane = threadIdx.x % 32;
    prefetched = lane < n_b ? __ldg(order + bos + lane) : 0;
  }
  __device__ __forceinline__ int64_t packed_row(int64_t k) const {
    const int64_t t = __shfl_sync(0xffffffffu, prefetched, static_cast<int>(k & 31));
    return k < 32 ? t : __ldg(order + bos + k);
  }
  template <typename T>
  __device__ __forceinline__ const T* row(const T* base, int64_t k, int64_t t) const {
    return base + __ldg(table + k) + (t - __ldg(table + 2 * num_steps + k)) * __ldg(table + num_steps + k);
  }
};

// Rows and gw held in registers: THREADS threads per row group (32 = a warp,
// 8 groups per 256-thread block; more = a block), each owning CHUNKS accesses
// of VEC elements (16 bytes). Every state row and gS_b is read from DRAM
// exactly once and every gs row written once: the minimum the contract moves.
template <typename T, int THREADS, int VEC, int CHUNKS>
__global__ void __launch_bounds__(THREADS * rows_per_block(THREADS))
combine_backward_registers_kernel(const CombineBackwardParams p) {
  using A = typename AccOf<T>::type;
  constexpr int ROWS = rows_per_block(THREADS);
  __shared__ A scratch[ROWS][THREADS / 32];
  const int group = threadIdx.x / THREADS;
  const int lane = threadIdx.x % THREADS;
  const int64_t H = p.hidden;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * ROWS + group;
  const int64_t stride_groups = static_cast<int64_t>(gridDim.x) * ROWS;

  const T* base = static_cast<const T*>(p.base);
  const A* w = static_cast<const A*>(p.weight);
  const A* pp = static_cast<const A*>(p.p);
  const A* hh = static_cast<const A*>(p.h);
  const A* extra = static_cast<const A*>(p.extra_dot);
  T* gs_out = static_cast<T*>(p.grad_states);

  A gw[CHUNKS][VEC];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
    for (int k = 0; k < VEC; ++k) gw[c][k] = 0;
  A gc = 0;

  auto col = [&](int c) { return (static_cast<int64_t>(c) * THREADS + lane) * VEC; };
  auto dot_with = [&](const Vec<T, VEC>(&g)[CHUNKS], const Vec<T, VEC>(&s)[CHUNKS]) {
    A acc = 0;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
      if (col(c) < H)
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc += load_as<A>(g[c].v[k]) * load_as<A>(s[c].v[k]);
    return acc;
  };
  auto load_row = [&](const T* src, Vec<T, VEC>(&dst)[CHUNKS]) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
      if (col(c) < H) dst[c] = load_readonly(reinterpret_cast<const Vec<T, VEC>*>(src + col(c)));
  };

  for (int64_t b = gid; b < p.batch; b += stride_groups) {
    const BatchRowWalk walk(p, b);
    Vec<T, VEC> g[CHUNKS], s[CHUNKS];
    load_row(static_cast<const T*>(p.grad_state) + b * p.grad_state_row_stride, g);
    const int64_t t_last = walk.packed_row(walk.n_b - 1);
    const A d_extra = __ldg(static_cast<const A*>(p.grad_ponder) + b) + (extra != nullptr ? __ldg(extra + t_last) : A(0));
    const A p_last = __ldg(pp + t_last);
    load_row(walk.row(base, walk.n_b - 1, t_last), s);
    const A d = row_sum<THREADS>(dot_with(g, s), scratch[group]) + d_extra;

    for (int64_t k = 0; k + 1 < walk.n_b; ++k) {
      const int64_t t = walk.packed_row(k);
      // h, p and the extra term are issued with the row: one memory round trip per step
      const A hv = __ldg(hh + t);
      const A pt = __ldg(pp + t);
      const A ex = extra != nullptr ? __ldg(extra + t) : A(0);
      load_row(walk.row(base, k, t), s);
      const A dot = row_sum<THREADS>(dot_with(g, s), scratch[group]) + ex;
      const A gz = (dot - d) * hv * (A(1) - hv);
      T* gs = gs_out + t * H;
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        if (col(c) < H) {
          const Vec<A, VEC> wv = load_readonly(reinterpret_cast<const Vec<A, VEC>*>(w + col(c)));
          Vec<T, VEC> out;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            out.v[e] = store_as<T, A>(pt * load_as<A>(g[c].v[e]) + gz * wv.v[e]);
            gw[c][e] += gz * load_as<A>(s[c].v[e]);
          }
          *reinterpret_cast<Vec<T, VEC>*>(gs + col(c)) = out;
        }
      }
      gc += gz;
    }
    // The last step's weight is the remainder R: no gradient path through its h.
    T* gs = gs_out + t_last * H;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      if (col(c) < H) {
        Vec<T, VEC> out;
#pragma unroll
        for (int e = 0; e < VEC; ++e) out.v[e] = store_as<T, A>(p_last * load_as<A>(g[c].v[e]));
        *reinterpret_cast<Vec<T, VEC>*>(gs + col(c)) = out;
      }
    }
  }

  A* partial = static_cast<A*>(p.grad_weight_partial) + gid * H;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
    if (col(c) < H)
#pragma unroll
      for (int e = 0; e < VEC; ++e) partial[col(c) + e] = gw[c][e];
  if (lane == 0) static_cast<A*>(p.grad_bias_partial)[gid] = gc;
}

// Any width and alignment (scalar accesses, very wide rows, float64): gw per
// row group in shared memory, rows streamed twice (the second pass hits L1/L2).
template <typename T, int THREADS>
__global__ void __launch_bounds__(THREADS * rows_per_block(THREADS))
combine_backward_loop_kernel(const CombineBackwardParams p) {
  using A = typename AccOf<T>::type;
  constexpr int ROWS = rows_per_block(THREADS);
  __shared__ A scratch[ROWS][THREADS / 32];
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int group = threadIdx.x / THREADS;
  const int lane = threadIdx.x % THREADS;
  const int64_t H = p.hidden;
  A* gw = reinterpret_cast<A*>(smem_raw) + group * H;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * ROWS + group;
  const int64_t stride_groups = static_cast<int64_t>(gridDim.x) * ROWS;
  for (int64_t j = lane; j < H; j += THREADS) gw[j] = 0;
  A gc = 0;

  const T* base = static_cast<const T*>(p.base);
  const A* w = static_cast<const A*>(p.weight);
  const A* pp = static_cast<const A*>(p.p);
  const A* hh = static_cast<const A*>(p.h);
  const A* extra = static_cast<const A*>(p.extra_dot);
  T* gs_out = static_cast<T*>(p.grad_states);

  for (int64_t b = gid; b < p.batch; b += stride_groups) {
    const BatchRowWalk walk(p, b);
    const T* g = static_cast<const T*>(p.grad_state) + b * p.grad_state_row_stride;
    const int64_t t_last = walk.packed_row(walk.n_b - 1);
    const T* s_last = walk.row(base, walk.n_b - 1, t_last);
    A d = row_sum<THREADS>(partial_dot<A, T, THREADS>(g, s_last, H, lane), scratch[group]) +
          static_cast<const A*>(p.grad_ponder)[b];
    if (extra != nullptr) d += extra[t_last];
    for (int64_t k = 0; k + 1 < walk.n_b; ++k) {
      const int64_t t = walk.packed_row(k);
      const T* s = walk.row(base, k, t);
      A dot = row_sum<THREADS>(partial_dot<A, T, THREADS>(g, s, H, lane), scratch[group]);
      if (extra != nullptr) dot += extra[t];
      const A hv = hh[t];
      const A gz = (dot - d) * hv * (A(1) - hv);
      const A pt = pp[t];
      T* gs = gs_out + t * H;
      for (int64_t j = lane; j < H; j += THREADS) {
        gs[j] = store_as<T, A>(pt * load_as<A>(g[j]) + gz * w[j]);
        gw[j] += gz * load_as<A>(s[j]);
      }
      gc += gz;
    }
    const A p_last = pp[t_last];
    T* gs = gs_out + t_last * H;
    for (int64_t j = lane; j < H; j += THREADS) gs[j] = store_as<T, A>(p_last * load_as<A>(g[j]));
  }

  A* partial = static_cast<A*>(p.grad_weight_partial) + gid * H;
  for (int64_t j = lane; j < H; j += THREADS) partial[j] = gw[j];
  if (lane == 0) static_cast<A*>(p.grad_bias_partial)[gid] = gc;
}

// gw[j] = sum over row groups g = 0, 1, ... of partial[g][j] in a fixed order:
// a block of 8 x 32 threads owns 32 columns; thread (y, x) sums the groups
// y, y + 8, ... of column x (in float64 for float32 data), and the 8 sums are
// added in order of y. gc likewise, by block 0.
template <typename A>
__global__ void __launch_bounds__(256) reduce_partials_kernel(const CombineBackwardParams p) {
  using Sum = double;
  __shared__ Sum sums[8][33];
  const int x = threadIdx.x % 32, y = threadIdx.x / 32;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + x;
  const A* partial = static_cast<const A*>(p.grad_weight_partial);
  Sum total = 0;
  if (j < p.hidden)
    for (int64_t g = y; g < p.num_groups; g += 8) total += static_cast<Sum>(partial[g * p.hidden + j]);
  sums[y][x] = total;
  __syncthreads();
  if (y == 0 && j < p.hidden) {
    Sum all = 0;
#pragma unroll
    for (int r = 0; r < 8; ++r) all += sums[r][x];
    static_cast<A*>(p.grad_weight)[j] = static_cast<A>(all);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    Sum all = 0;
    for (int64_t g = 0; g < p.num_groups; ++g) all += static_cast<const A*>(p.grad_bias_partial)[g];
    *static_cast<A*>(p.grad_bias) = static_cast<A>(all);
  }
}

int device_sms() {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

int threads_per_row(int64_t hidden) { return hidden <= 1024 ? 32 : hidden <= 4096 ? 128 : 512; }

template <int THREADS>
void launch(const CombineBackwardParams& p, size_t smem, cudaStream_t stream, void (*kernel)(CombineBackwardParams)) {
  constexpr int ROWS = rows_per_block(THREADS);
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "cudaFuncSetAttribute");
  }
  kernel<<<static_cast<unsigned>(p.num_groups / ROWS), THREADS * ROWS, smem, stream>>>(p);
}

template <typename T, int THREADS>
bool launch_registers(const CombineBackwardParams& p, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int VEC = 16 / sizeof(T);
  if constexpr (sizeof(T) == 8) {
    return false;  // float64 is for checking, not speed: the loop kernel serves it
  } else {
    // The caller states whether every packed state row starts on a 16-byte boundary.
    const bool vec_ok = p.rows_aligned_16 && p.hidden % VEC == 0 && p.grad_state_row_stride % VEC == 0 &&
                        aligned(p.base, 16) && aligned(p.grad_state, 16) && aligned(p.grad_states, 16) &&
                        aligned(p.weight, VEC * sizeof(A));
    if (!vec_ok) return false;
    const int64_t chunks = (p.hidden + THREADS * VEC - 1) / (THREADS * VEC);
    // 512 threads x 8 chunks would spill: gw, gS_b and s all live in registers
    constexpr int max_chunks = THREADS < 512 ? 8 : 4;
    return dispatch_chunks<max_chunks>(chunks, [&](auto tile) {
      launch<THREADS>(p, 0, stream, combine_backward_registers_kernel<T, THREADS, VEC, decltype(tile)::value>);
    });
  }
}

template <typename T, int THREADS>
void launch_threads(const CombineBackwardParams& p, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int ROWS = rows_per_block(THREADS);
  if (launch_registers<T, THREADS>(p, stream)) return;
  const size_t smem = static_cast<size_t>(ROWS) * p.hidden * sizeof(A);
  int device = 0, optin = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  if (smem > static_cast<size_t>(optin)) {
    throw std::invalid_argument("act_kernels: H = " + std::to_string(p.hidden) +
                                " needs more shared memory than the device offers for the combine backward "
                                "(unaligned or float64 rows this wide)");
  }
  launch<THREADS>(p, smem, stream, combine_backward_loop_kernel<T, THREADS>);
}

}  // namespace

int64_t combine_backward_groups(int64_t batch, int64_t hidden) {
  // Enough row groups in flight per SM to keep DRAM busy (each one's next
  // load waits on its own reduction), few enough that the gw partials stay a
  // small share of the traffic.
  const int threads = threads_per_row(hidden);
  const int64_t rows = rows_per_block(threads);
  const int64_t per_sm = threads == 32 ? 16 : threads == 128 ? 8 : 2;
  const int64_t wanted = std::min<int64_t>(batch, device_sms() * per_sm);
  return (wanted + rows - 1) / rows * rows;
}

void combine_backward(CombineBackwardParams& params, int dtype, cudaStream_t stream) {
  if (params.num_groups != combine_backward_groups(params.batch, params.hidden)) {
    throw std::invalid_argument("act_kernels: num_groups must come from combine_backward_groups");
  }
  ACT_DISPATCH_DTYPE(dtype, [&] {
    using A = typename AccOf<T>::type;
    switch (threads_per_row(params.hidden)) {
      case 32: launch_threads<T, 32>(params, stream); break;
      case 128: launch_threads<T, 128>(params, stream); break;
      default: launch_threads<T, 512>(params, stream); break;
    }
    check_launch("combine_backward");
    const unsigned blocks = static_cast<unsigned>((params.hidden + 31) / 32);
    reduce_partials_kernel<A><<<blocks, 256, 0, stream>>>(params);
    check_launch("combine_backward reduction");
  });
}

}  // namespace act
