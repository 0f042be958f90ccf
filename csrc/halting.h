// The tail of the ACT halting step (design §3), shared by the halting kernels
// (act/halting_step.cu) and the fused gate-and-halting kernels (cells/gates.cu):
// the halting test on the row's dot product, p, and the per-row outputs.
#pragma once

#include "common.h"

namespace act {

// The halting decision of one row (written by one thread).
template <typename A>
struct Decision {
  A h, r, p;
  bool halt;
  int64_t step;  // the row's step n
};

// `r` is running_sum[b] as read by every thread BEFORE the row reduction: the
// reduction's barrier orders those reads before thread 0 stores the new sum,
// so no slow warp of the row can read the updated value and decide (and
// accumulate) with the wrong p.
// Row i's step: one for the launch, or its own (the depth-wise scheduler, design §17).
template <typename A>
__device__ __forceinline__ Decision<A> decide(const HaltingStepParams& p, int64_t i, A r, A dot) {
  const A z = dot + *static_cast<const A*>(p.bias);
  const A h = A(1) / (A(1) + exp(-z));
  const int64_t step = p.row_steps != nullptr ? p.row_steps[i] : p.step;
  const bool halt = (r + h >= *static_cast<const A*>(p.threshold)) || (step >= p.max_steps);
  return {h, r, halt ? A(1) - r : h, halt, step};
}

template <typename A>
__device__ __forceinline__ void write_row_outputs(const HaltingStepParams& p, int64_t i, int64_t b,
                                                  const Decision<A>& d) {
  static_cast<A*>(p.running_sum)[b] = d.halt ? d.r : d.r + d.h;
  if (d.halt) {
    p.steps[b] = d.step;
    static_cast<A*>(p.remainder)[b] = d.p;
  }
  static_cast<A*>(p.p)[i] = d.p;
  static_cast<A*>(p.h)[i] = d.h;
  p.halted[i] = d.halt;
}

}  // namespace act
