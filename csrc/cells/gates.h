// Fused GRU and LSTM gates (act_kernels/ops/cells): the pointwise part of a
// recurrent cell step, after the input and hidden projections. Gate order is
// torch's: GRU (r, z, n), LSTM (i, f, g, o). Raw pointers and sizes.
#pragma once

#include "common.h"

namespace act {

struct GateParams {
  const void* gi;               // (A, G*H) T: x W_ih^T + b_ih, row stride gi_stride
  int64_t gi_stride;
  const void* gh;               // (A, G*H) T: h W_hh^T + b_hh, row stride gh_stride
  int64_t gh_stride;
  const void* state;            // (A, H) T: h (GRU) or c (LSTM), row stride state_stride
  int64_t state_stride;
  const void* grad_h;           // backward: (A, H) T, row stride grad_h_stride
  int64_t grad_h_stride;
  const void* grad_c;           // LSTM backward: (A, H) T, row stride grad_c_stride
  int64_t grad_c_stride;
  void* out_h;                  // forward: (A, H) T contiguous
  void* out_c;                  // LSTM forward: (A, H) T contiguous
  void* d_gi;                   // backward: (A, G*H) T contiguous (LSTM: d gi = d gh)
  void* d_gh;                   // GRU backward: (A, 3H) T contiguous
  void* d_state;                // backward: (A, H) T contiguous
  int64_t rows;
  int64_t hidden;
};

// A ponder step's gates and its halting step in one launch: the forward gate
// params (out_h, and out_c for an LSTM) plus the halting params, whose state
// is the new h. acc_c (B, H) Acc, row stride acc_c_stride: the LSTM's c
// mean field, accumulated with the same p (unused for a GRU).
struct CellHaltingParams {
  GateParams gates;
  HaltingStepParams halting;
  void* acc_c;
  int64_t acc_c_stride;
};

void gru_gates_forward(const GateParams& params, int dtype, cudaStream_t stream);
void gru_gates_backward(const GateParams& params, int dtype, cudaStream_t stream);
void lstm_gates_forward(const GateParams& params, int dtype, cudaStream_t stream);
void lstm_gates_backward(const GateParams& params, int dtype, cudaStream_t stream);
void gru_halting_step(const CellHaltingParams& params, int dtype, cudaStream_t stream);
void lstm_halting_step(const CellHaltingParams& params, int dtype, cudaStream_t stream);

}  // namespace act
