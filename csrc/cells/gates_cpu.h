// The fused GRU/LSTM gates on the CPU: the contracts of act_kernels/ops/cells
// (reference.py), float32 and float64, one thread. Plain C++, raw pointers:
// gates forward, gates-and-halting step forward, recomputing backward.
#pragma once

#include <cstdint>

namespace act {
namespace cpu {

// The ponder loop's halting buffers and this step's arguments (design §3).
// Every pointer is in the accumulation dtype T except active and steps.
template <typename T>
struct Halting {
  const int64_t* active;  // (A,) batch rows
  const T* weight;        // (H,)
  const T* bias;          // (1,)
  const T* threshold;     // (1,): 1 - eps
  T* running_sum;         // (B,) updated
  T* acc_h;               // (B, H) row stride acc_h_stride, += p h'
  int64_t acc_h_stride;
  T* acc_c;               // LSTM: (B, H) row stride acc_c_stride, += p c'
  int64_t acc_c_stride;
  int64_t* steps;         // (B,) = step for rows that halt
  T* remainder;           // (B,) = p for rows that halt
  T* p;                   // (A,) out
  T* h;                   // (A,) out: the halting unit's output
  bool* halted;           // (A,) out
  int64_t step, max_steps;
  const int64_t* row_steps;  // (A,) or nullptr: row i at its own step row_steps[i] (in place of step)
};

// gi, gh (A, G*H) with row strides; state h (GRU) or c (LSTM) (A, H) with a
// row stride; outputs (A, H) contiguous. halting == nullptr: the gates only.
template <typename T>
void gru_forward(const T* gi, int64_t s_gi, const T* gh, int64_t s_gh, const T* h, int64_t s_h, T* out_h,
                 int64_t rows, int64_t hidden, const Halting<T>* halting);
template <typename T>
void lstm_forward(const T* gi, int64_t s_gi, const T* gh, int64_t s_gh, const T* c, int64_t s_c, T* out_h,
                  T* out_c, int64_t rows, int64_t hidden, const Halting<T>* halting);

// The halting step alone, over given new states (A, H) with a row stride:
// the per-token transformer's step, whose state comes from its layers.
template <typename T>
void halting_forward(const T* state, int64_t s_state, int64_t rows, int64_t hidden, const Halting<T>* halting);

// Backward, recomputing the gates: d_gi, d_gh (A, 3H) and d_h (A, H) for a
// GRU; d_a (A, 4H) (= d gi = d gh) and d_c (A, H) for an LSTM; contiguous.
template <typename T>
void gru_backward(const T* grad, int64_t s_grad, const T* gi, int64_t s_gi, const T* gh, int64_t s_gh,
                  const T* h, int64_t s_h, T* d_gi, T* d_gh, T* d_h, int64_t rows, int64_t hidden);
template <typename T>
void lstm_backward(const T* grad_h, int64_t s_dh, const T* grad_c, int64_t s_dc, const T* gi, int64_t s_gi,
                   const T* gh, int64_t s_gh, const T* c, int64_t s_c, T* d_a, T* d_c, int64_t rows,
                   int64_t hidden);

}  // namespace cpu
}  // namespace act
