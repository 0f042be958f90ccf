// Fused combine backward (DESIGN §3) over the T packed rows. A row group (a
// warp, or a block for wide rows) walks whole batch rows b: it loads gS_b once,
// forms d_b = <gS_b, s^N_b> + grho_b, then for every step n < N_b
//   gz = (<gS_b, s^n> - d_b) h (1 - h),  gs = p gS_b + gz w,  gw += gz s,  gc += gz
// and gs = R gS_b for the last step. gw is kept per row group in shared memory
// (each thread always owns the same columns: no atomics), written out as one
// partial per group, and summed over the groups in a fixed order by a second
// kernel: the same inputs give bitwise the same gradients.
#include "common.h"

#include <algorithm>

namespace act {
namespace {

template <typename T, int THREADS, int VEC>
__global__ void __launch_bounds__(THREADS == 32 ? 256 : THREADS)
combine_backward_kernel(const CombineBackwardParams p) {
  using A = typename AccOf<T>::type;
  constexpr int ROWS = THREADS == 32 ? 8 : 1;
  __shared__ A scratch[ROWS][THREADS / 32];
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int group = threadIdx.x / THREADS;
  const int lane = threadIdx.x % THREADS;
  const int64_t H = p.hidden;
  A* gw = reinterpret_cast<A*>(smem_raw) + group * H;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * ROWS + group;
  const int64_t stride_groups = static_cast<int64_t>(gridDim.x) * ROWS;
  const int64_t first_col = static_cast<int64_t>(lane) * VEC;
  constexpr int64_t col_step = THREADS * VEC;

  for (int64_t j = first_col; j < H; j += col_step)
#pragma unroll
    for (int k = 0; k < VEC; ++k) gw[j + k] = 0;
  A gc = 0;

  const T* base = static_cast<const T*>(p.base);
  const A* w = static_cast<const A*>(p.weight);
  const A* pp = static_cast<const A*>(p.p);
  const A* hh = static_cast<const A*>(p.h);
  const A* extra = static_cast<const A*>(p.extra_dot);
  T* gs_out = static_cast<T*>(p.grad_states);

  for (int64_t b = gid; b < p.batch; b += stride_groups) {
    const int64_t bos = p.first[b];
    const int64_t n_b = p.steps[b];
    const T* g = static_cast<const T*>(p.grad_state) + b * p.grad_state_row_stride;
    const int64_t t_last = p.order[bos + n_b - 1];
    const T* s_last = base + p.row_offsets[t_last];

    A d = row_sum<THREADS>(partial_dot<A, T, THREADS, VEC>(g, s_last, H, lane), scratch[group]) +
          static_cast<const A*>(p.grad_ponder)[b];
    if (extra != nullptr) d += extra[t_last];

    for (int64_t k_step = 0; k_step + 1 < n_b; ++k_step) {
      const int64_t t = p.order[bos + k_step];
      const T* s = base + p.row_offsets[t];
      A dot = row_sum<THREADS>(partial_dot<A, T, THREADS, VEC>(g, s, H, lane), scratch[group]);
      if (extra != nullptr) dot += extra[t];
      const A hv = hh[t];
      const A gz = (dot - d) * hv * (A(1) - hv);
      const A pt = pp[t];
      T* gs = gs_out + t * H;
      // gS_b and s^n were just read by this group: this pass hits L1/L2.
      for (int64_t j = first_col; j < H; j += col_step) {
        const Vec<T, VEC> gv = *reinterpret_cast<const Vec<T, VEC>*>(g + j);
        const Vec<T, VEC> sv = *reinterpret_cast<const Vec<T, VEC>*>(s + j);
        const Vec<A, VEC> wv = *reinterpret_cast<const Vec<A, VEC>*>(w + j);
        Vec<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out.v[k] = store_as<T, A>(pt * load_as<A>(gv.v[k]) + gz * wv.v[k]);
          gw[j + k] += gz * load_as<A>(sv.v[k]);
        }
        *reinterpret_cast<Vec<T, VEC>*>(gs + j) = out;
      }
      gc += gz;
    }
    // The last step's weight is the remainder R: no gradient path through its h.
    const A p_last = pp[t_last];
    T* gs = gs_out + t_last * H;
    for (int64_t j = first_col; j < H; j += col_step) {
      const Vec<T, VEC> gv = *reinterpret_cast<const Vec<T, VEC>*>(g + j);
      Vec<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = store_as<T, A>(p_last * load_as<A>(gv.v[k]));
      *reinterpret_cast<Vec<T, VEC>*>(gs + j) = out;
    }
  }

  A* partial = static_cast<A*>(p.grad_weight_partial) + gid * H;
  for (int64_t j = first_col; j < H; j += col_step)
#pragma unroll
    for (int k = 0; k < VEC; ++k) partial[j + k] = gw[j + k];
  if (lane == 0) static_cast<A*>(p.grad_bias_partial)[gid] = gc;
}

// gw[j] = sum over groups g = 0, 1, ... of partial[g][j], in that order.
template <typename A>
__global__ void reduce_partials_kernel(const CombineBackwardParams p) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const A* partial = static_cast<const A*>(p.grad_weight_partial);
  if (j < p.hidden) {
    A total = 0;
    for (int64_t g = 0; g < p.num_groups; ++g) total += partial[g * p.hidden + j];
    static_cast<A*>(p.grad_weight)[j] = total;
  }
  if (j == 0) {
    A total = 0;
    for (int64_t g = 0; g < p.num_groups; ++g) total += static_cast<const A*>(p.grad_bias_partial)[g];
    *static_cast<A*>(p.grad_bias) = total;
  }
}

int device_sms() {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

template <typename T, int THREADS, int VEC>
void launch_vec(const CombineBackwardParams& p, size_t smem, cudaStream_t stream) {
  constexpr int ROWS = THREADS == 32 ? 8 : 1;
  auto kernel = combine_backward_kernel<T, THREADS, VEC>;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)), "cudaFuncSetAttribute");
  }
  kernel<<<static_cast<unsigned>(p.num_groups / ROWS), THREADS * ROWS, smem, stream>>>(p);
}

template <typename T, int THREADS>
void launch_threads(CombineBackwardParams& p, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  constexpr int ROWS = THREADS == 32 ? 8 : 1;
  constexpr int VEC = 16 / sizeof(T);
  if (p.num_groups != combine_backward_groups(p.batch, p.hidden)) {
    throw std::invalid_argument("act_kernels: num_groups must come from combine_backward_groups");
  }
  const size_t smem = static_cast<size_t>(ROWS) * p.hidden * sizeof(A);
  int device = 0, optin = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  if (smem > static_cast<size_t>(optin)) {
    throw std::invalid_argument("act_kernels: H = " + std::to_string(p.hidden) +
                                " needs more shared memory than the device offers for the combine backward");
  }
  // Row offsets live on the device; the caller states whether every packed
  // state row starts on a 16-byte boundary.
  const bool vec_ok = p.rows_aligned_16 && p.hidden % VEC == 0 && p.grad_state_row_stride % VEC == 0 &&
                      aligned(p.base, 16) && aligned(p.grad_state, 16) && aligned(p.grad_states, 16) &&
                      aligned(p.weight, VEC * sizeof(A));
  if (vec_ok) {
    launch_vec<T, THREADS, VEC>(p, smem, stream);
  } else {
    launch_vec<T, THREADS, 1>(p, smem, stream);
  }
}

}  // namespace

int64_t combine_backward_groups(int64_t batch, int64_t hidden) {
  const int64_t rows = hidden <= 1024 ? 8 : 1;  // row groups per block, as launched below
  const int64_t wanted = std::min<int64_t>(batch, static_cast<int64_t>(device_sms()) * 8);
  return (wanted + rows - 1) / rows * rows;
}

void combine_backward(CombineBackwardParams& params, int dtype, cudaStream_t stream) {
  ACT_DISPATCH_DTYPE(dtype, [&] {
    using A = typename AccOf<T>::type;
    if (params.hidden <= 1024) {
      launch_threads<T, 32>(params, stream);
    } else if (params.hidden <= 4096) {
      launch_threads<T, 128>(params, stream);
    } else {
      launch_threads<T, 512>(params, stream);
    }
    check_launch("combine_backward");
    const unsigned threads = 256;
    const unsigned blocks = static_cast<unsigned>((params.hidden + threads - 1) / threads);
    reduce_partials_kernel<A><<<blocks, threads, 0, stream>>>(params);
    check_launch("combine_backward reduction");
  });
}

}  // namespace act
