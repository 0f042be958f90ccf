// Shared pieces of the act_kernels CUDA kernels: parameter structs (raw
// pointers, sizes, strides; no libtorch), dtype dispatch, vector loads, error
// checks and block reductions.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace act {

// Matches act_kernels/ops/cuda_kernels.py: DTYPE_CODES.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("act_kernels CUDA error in ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

// Checks the launch itself (bad configuration) without synchronising.
inline void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

struct HaltingStepParams {
  const void* state;            // (A, H) T, row stride state_row_stride, unit column stride
  int64_t state_row_stride;
  const int64_t* active;        // (A,) batch rows, ascending
  const void* weight;           // (H,) Acc
  const void* bias;             // (1,) Acc
  const void* threshold;        // (1,) Acc: 1 - eps
  void* running_sum;            // (B,) Acc, updated
  void* accumulator;            // (B, H) Acc, row stride acc_row_stride, updated
  int64_t acc_row_stride;
  int64_t* steps;               // (B,) int64, set for rows that halt
  void* remainder;              // (B,) Acc, set for rows that halt
  void* p;                      // (A,) Acc out
  void* h;                      // (A,) Acc out
  bool* halted;                 // (A,) out
  int64_t num_active;
  int64_t hidden;
  int64_t step;
  int64_t max_steps;
  const int64_t* row_steps;     // (A,) int64 or nullptr: row i at its own step (in place of step)
};

struct CombineBackwardParams {
  const void* base;             // packed row t of step k (0-based) starts at element
  const int64_t* step_table;    //   base + delta[k] + (t - first_row[k]) * row_stride[k];
                                //   step_table = (3, S) int64: delta, row_stride, first_row
  int64_t num_steps;            // S
  const int64_t* order;         // (T,) packed rows grouped by batch row, in step order
  const int64_t* first;         // (B,) start of each batch row in `order`
  const int64_t* steps;         // (B,) N
  const void* p;                // (T,) Acc
  const void* h;                // (T,) Acc
  const void* extra_dot;        // (T,) Acc or nullptr
  const void* grad_state;       // (B, H) T, row stride grad_state_row_stride
  int64_t grad_state_row_stride;
  const void* grad_ponder;      // (B,) Acc
  const void* weight;           // (H,) Acc
  void* grad_states;            // (T, H) T out, contiguous
  void* grad_weight_partial;    // (G, H) Acc out, one row per row group
  void* grad_bias_partial;      // (G,) Acc out
  void* grad_weight;            // (H,) Acc out
  void* grad_bias;              // (1,) Acc out
  int64_t batch;
  int64_t hidden;
  int64_t num_groups;           // G, filled in by the launcher
  bool rows_aligned_16;         // every packed state row starts on a 16-byte boundary
};

// Row groups: THREADS threads share one row. 32 = a warp per row, 8 rows per
// 256-thread block; more = a block per row. Kernels and launchers both use it.
__host__ __device__ constexpr int rows_per_block(int threads) { return threads == 32 ? 8 : 1; }

// Calls f(std::integral_constant<int, C>) for the smallest register tile C in
// 1, 2, 4, 8 (at most MAX_CHUNKS) with C >= chunks; false when none fits.
template <int MAX_CHUNKS, typename F>
bool dispatch_chunks(int64_t chunks, F&& f) {
  if (chunks <= 1) { f(std::integral_constant<int, 1>{}); return true; }
  if (chunks <= 2) { f(std::integral_constant<int, 2>{}); return true; }
  if (chunks <= 4) { f(std::integral_constant<int, 4>{}); return true; }
  if constexpr (MAX_CHUNKS >= 8) {
    if (chunks <= 8) { f(std::integral_constant<int, 8>{}); return true; }
  }
  return false;
}

#ifdef __CUDACC__  // device helpers: only the .cu files see them
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename A, typename T> __device__ __forceinline__ A load_as(T v) { return static_cast<A>(to_float(v)); }
template <> __device__ __forceinline__ double load_as<double, double>(double v) { return v; }

template <typename T, typename A> __device__ __forceinline__ T store_as(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half store_as<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements moved as one aligned access (16 bytes for VEC * sizeof(T) = 16).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

// A read-only (non-coherent path) load of a Vec: tells the compiler the data
// cannot alias this kernel's stores, so loads may be issued early and grouped.
template <typename V>
__device__ __forceinline__ V load_readonly(const V* src) {
  static_assert(sizeof(V) % 4 == 0, "Vec of at least 4 bytes");
  V out;
  if constexpr (sizeof(V) % 16 == 0) {
    const int4* from = reinterpret_cast<const int4*>(src);
    int4* to = reinterpret_cast<int4*>(&out);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(V) / 16); ++i) to[i] = __ldg(from + i);
  } else {
    const int* from = reinterpret_cast<const int*>(src);
    int* to = reinterpret_cast<int*>(&out);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(V) / 4); ++i) to[i] = __ldg(from + i);
  }
  return out;
}

// Sum over the THREADS threads that share one row; THREADS is 32 (a warp per
// row) or a multiple of 32 (a block per row, reduced through shared memory).
// The reduction tree is fixed, so results are bitwise reproducible.
template <int THREADS, typename A>
__device__ __forceinline__ A row_sum(A v, A* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if constexpr (THREADS == 32) {
    return v;
  } else {
    constexpr int WARPS = THREADS / 32;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();  // scratch may still be read by the previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    A total = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += scratch[w];
    return total;
  }
}

// This thread's share of <a, b> over a row of H elements; the caller reduces
// it over the row group with row_sum.
template <typename A, typename T, int THREADS>
__device__ __forceinline__ A partial_dot(const T* a, const T* b, int64_t H, int lane) {
  A acc = 0;
  for (int64_t j = lane; j < H; j += THREADS) acc += load_as<A>(a[j]) * load_as<A>(b[j]);
  return acc;
}
#endif  // __CUDACC__

inline bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Runs `body` with T bound to the C++ type of `code`.
#define ACT_DISPATCH_DTYPE(code, ...)                                   \
  switch (static_cast<::act::DType>(code)) {                            \
    case ::act::DType::kFloat32: { using T = float; __VA_ARGS__(); break; }          \
    case ::act::DType::kFloat16: { using T = __half; __VA_ARGS__(); break; }         \
    case ::act::DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__(); break; } \
    case ::act::DType::kFloat64: { using T = double; __VA_ARGS__(); break; }         \
    default: throw std::invalid_argument("act_kernels: unknown dtype code " + std::to_string(code)); \
  }

void halting_step(const HaltingStepParams& params, int dtype, cudaStream_t stream);
void combine_backward(CombineBackwardParams& params, int dtype, cudaStream_t stream);
// Row groups the combine backward runs with: the caller sizes the gw partials by it.
int64_t combine_backward_groups(int64_t batch, int64_t hidden);

}  // namespace act
