// PonderNet's two kernels (design §10): the fused halting step and the packed
// reverse-scan backward. Raw pointers and sizes, as the ACT kernels take them.
#pragma once

#include "common.h"

namespace act {

struct PonderNetStepParams {
  const void* state;            // (A, H) T, row stride state_row_stride, unit column stride
  int64_t state_row_stride;
  const int64_t* active;        // (A,) batch rows, ascending
  const void* weight;           // (H,) Acc
  const void* bias;             // (1,) Acc
  void* unhalted;               // (B,) Acc: u^(n-1) in, u^n out for the active rows
  int64_t* steps;               // (B,) int64, set for rows that halt
  const void* uniform;          // (A,) Acc Bernoulli draws (mode 1), else nullptr
  const void* limits;           // (2,) Acc: eps, threshold
  void* p;                      // (A,) Acc out
  void* lam;                    // (A,) Acc out
  void* u_before;               // (A,) Acc out: u^(n-1)
  bool* halted;                 // (A,) out
  int64_t num_active;
  int64_t hidden;
  int64_t step;
  int64_t max_steps;
  int mode;                     // 0 train (u^n < eps), 1 sample (uniform < lambda), 2 threshold
};

struct PonderNetBackwardParams {
  const int64_t* order;         // (T,) packed entries grouped by batch row, in step order
  const int64_t* first;         // (B,) start of each batch row in `order`
  const int64_t* steps;         // (B,) N
  const void* p;                // (T,) Acc
  const void* lam;              // (T,) Acc
  const void* u_before;         // (T,) Acc
  const void* grad_p;           // (T,) Acc, contiguous
  const void* grad_kl;          // (B,) Acc, contiguous
  const void* logs;             // (2,) Acc: log lp, log(1 - lp)
  void* grad_z;                 // (T,) Acc out
  int64_t batch;
};

// dtype: the state's code for the step; the accumulation dtype's (float32 or
// float64) for the backward.
void pondernet_step(const PonderNetStepParams& params, int dtype, cudaStream_t stream);
void pondernet_backward(const PonderNetBackwardParams& params, int acc_dtype, cudaStream_t stream);

}  // namespace act
