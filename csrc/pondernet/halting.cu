// PonderNet's fused halting step and packed backward (design §10).
//
// Step: a warp per running row computes z = w.s + c (fixed reduction tree, so
// bitwise repeatable), then one lane does the scalar work: lambda = sigmoid(z),
// u^n = u^(n-1) (1 - lambda), the stop test of the mode, p, and the halting
// bookkeeping. Backward: a thread per batch row walks its steps from the last
// down with R^k = sum_{n > k} gp'^n p^n, writing
//   dL/dz^k = lambda^k (u^k gp'^k - R^k)  (k < N),  0  (k = N).
#include "pondernet/pondernet.h"

namespace act {
namespace {

constexpr int kRowsPerBlock = 8;   // a warp per row, 8 rows per 256-thread block

template <typename T>
__global__ void __launch_bounds__(32 * kRowsPerBlock) pondernet_step_kernel(const PonderNetStepParams p) {
  using A = typename AccOf<T>::type;
  const int lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (i >= p.num_active) return;  // uniform per warp
  const int64_t b = p.active[i];
  const T* s = static_cast<const T*>(p.state) + i * p.state_row_stride;
  const A* w = static_cast<const A*>(p.weight);
  A part = 0;
  for (int64_t j = lane; j < p.hidden; j += 32) part += load_as<A>(s[j]) * w[j];
  const A dot = row_sum<32, A>(part, nullptr);
  if (lane != 0) return;

  const A* limits = static_cast<const A*>(p.limits);
  A* unhalted = static_cast<A*>(p.unhalted);
  const A u = unhalted[b];          // this row's only reader and writer is this lane
  const A z = dot + *static_cast<const A*>(p.bias);
  const A lam = A(1) / (A(1) + exp(-z));
  const A u_after = u * (A(1) - lam);
  bool halt;
  if (p.mode == 0) {
    halt = u_after < limits[0];
  } else if (p.mode == 1) {
    halt = static_cast<const A*>(p.uniform)[i] < lam;
  } else {
    halt = A(1) - u_after >= limits[1];
  }
  halt = halt || (p.step >= p.max_steps);
  unhalted[b] = u_after;
  if (halt) p.steps[b] = p.step;
  static_cast<A*>(p.p)[i] = halt ? u : lam * u;   // the halting step takes the rest
  static_cast<A*>(p.lam)[i] = lam;
  static_cast<A*>(p.u_before)[i] = u;
  p.halted[i] = halt;
}

template <typename A>
__global__ void pondernet_backward_kernel(const PonderNetBackwardParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.batch) return;
  const A* prob = static_cast<const A*>(p.p);
  const A* lam = static_cast<const A*>(p.lam);
  const A* u_before = static_cast<const A*>(p.u_before);
  const A* logs = static_cast<const A*>(p.logs);
  const A gkl = static_cast<const A*>(p.grad_kl)[b];
  const int64_t n_b = p.steps[b];
  const int64_t start = p.first[b];
  A r = 0;                          // R^k = sum_{n > k} gp'^n p^n
  for (int64_t k = n_b; k >= 1; --k) {
    const int64_t t = p.order[start + k - 1];
    const A pk = prob[t];
    const bool last = k == n_b;
    const A log_g = last ? A(k - 1) * logs[1] : logs[0] + A(k - 1) * logs[1];
    const A kl_path = pk > A(0) ? log(pk) - log_g + A(1) : A(0);   // 0 log 0 = 0: no path
    const A gp = static_cast<const A*>(p.grad_p)[t] + gkl * kl_path;
    const A l = lam[t];
    static_cast<A*>(p.grad_z)[t] = last ? A(0) : l * (u_before[t] * (A(1) - l) * gp - r);
    r += gp * pk;
  }
}

}  // namespace

void pondernet_step(const PonderNetStepParams& params, int dtype, cudaStream_t stream) {
  if (params.num_active <= 0) return;
  if (params.mode < 0 || params.mode > 2) throw std::invalid_argument("act_kernels: unknown PonderNet mode");
  if (params.mode == 1 && params.uniform == nullptr)
    throw std::invalid_argument("act_kernels: PonderNet sample mode needs the uniform draws");
  const int64_t blocks = (params.num_active + kRowsPerBlock - 1) / kRowsPerBlock;
  ACT_DISPATCH_DTYPE(dtype, [&] {
    pondernet_step_kernel<T><<<static_cast<unsigned>(blocks), 32 * kRowsPerBlock, 0, stream>>>(params);
  });
  check_launch("pondernet_step");
}

void pondernet_backward(const PonderNetBackwardParams& params, int acc_dtype, cudaStream_t stream) {
  if (params.batch <= 0) return;
  constexpr int threads = 128;
  const int64_t blocks = (params.batch + threads - 1) / threads;
  switch (static_cast<DType>(acc_dtype)) {
    case DType::kFloat32:
      pondernet_backward_kernel<float><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(params);
      break;
    case DType::kFloat64:
      pondernet_backward_kernel<double><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(params);
      break;
    default:
      throw std::invalid_argument("act_kernels: the PonderNet backward runs in float32 or float64");
  }
  check_launch("pondernet_backward");
}

}  // namespace act
