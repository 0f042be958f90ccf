// pybind11 module act_kernels._C: the two kernels, called with raw device
// pointers (as integers), sizes, strides, a dtype code and the CUDA stream.
// No libtorch: one build serves every torch version. Errors surface as
// Python RuntimeError / ValueError.
#include <pybind11/pybind11.h>

#include "common.h"
#include "cells/gates.h"
#include "attention/ragged_cpu.h"
#include "cells/gates_cpu.h"
#include "pondernet/pondernet.h"

namespace py = pybind11;

namespace {

template <typename P> P* ptr(uintptr_t v) { return reinterpret_cast<P*>(v); }

void halting_step(uintptr_t state, int64_t state_row_stride, uintptr_t active, uintptr_t weight,
                  uintptr_t bias, uintptr_t threshold, uintptr_t running_sum, uintptr_t accumulator,
                  int64_t acc_row_stride, uintptr_t steps, uintptr_t remainder, uintptr_t p,
                  uintptr_t h, uintptr_t halted, int64_t num_active, int64_t hidden, int64_t step,
                  int64_t max_steps, uintptr_t row_steps, int dtype, uintptr_t stream) {
  act::HaltingStepParams params{};
  params.state = ptr<const void>(state);
  params.state_row_stride = state_row_stride;
  params.active = ptr<const int64_t>(active);
  params.weight = ptr<const void>(weight);
  params.bias = ptr<const void>(bias);
  params.threshold = ptr<const void>(threshold);
  params.running_sum = ptr<void>(running_sum);
  params.accumulator = ptr<void>(accumulator);
  params.acc_row_stride = acc_row_stride;
  params.steps = ptr<int64_t>(steps);
  params.remainder = ptr<void>(remainder);
  params.p = ptr<void>(p);
  params.h = ptr<void>(h);
  params.halted = ptr<bool>(halted);
  params.num_active = num_active;
  params.hidden = hidden;
  params.step = step;
  params.max_steps = max_steps;
  params.row_steps = ptr<const int64_t>(row_steps);
  act::halting_step(params, dtype, reinterpret_cast<cudaStream_t>(stream));
}

int64_t combine_backward(uintptr_t base, uintptr_t step_table, int64_t num_steps, uintptr_t order, uintptr_t first,
                         uintptr_t steps, uintptr_t p, uintptr_t h, uintptr_t extra_dot,
                         uintptr_t grad_state, int64_t grad_state_row_stride, uintptr_t grad_ponder,
                         uintptr_t weight, uintptr_t grad_states, uintptr_t grad_weight_partial,
                         uintptr_t grad_bias_partial, uintptr_t grad_weight, uintptr_t grad_bias,
                         int64_t batch, int64_t hidden, int64_t num_groups, bool rows_aligned_16,
                         int dtype, uintptr_t stream) {
  act::CombineBackwardParams params{};
  params.base = ptr<const void>(base);
  params.step_table = ptr<const int64_t>(step_table);
  params.num_steps = num_steps;
  params.order = ptr<const int64_t>(order);
  params.first = ptr<const int64_t>(first);
  params.steps = ptr<const int64_t>(steps);
  params.p = ptr<const void>(p);
  params.h = ptr<const void>(h);
  params.extra_dot = ptr<const void>(extra_dot);  // 0 -> nullptr: no tuple-state term
  params.grad_state = ptr<const void>(grad_state);
  params.grad_state_row_stride = grad_state_row_stride;
  params.grad_ponder = ptr<const void>(grad_ponder);
  params.weight = ptr<const void>(weight);
  params.grad_states = ptr<void>(grad_states);
  params.grad_weight_partial = ptr<void>(grad_weight_partial);
  params.grad_bias_partial = ptr<void>(grad_bias_partial);
  params.grad_weight = ptr<void>(grad_weight);
  params.grad_bias = ptr<void>(grad_bias);
  params.batch = batch;
  params.hidden = hidden;
  params.num_groups = num_groups;
  params.rows_aligned_16 = rows_aligned_16;
  act::combine_backward(params, dtype, reinterpret_cast<cudaStream_t>(stream));
  return params.num_groups;
}

void pondernet_step(uintptr_t state, int64_t state_row_stride, uintptr_t active, uintptr_t weight,
                    uintptr_t bias, uintptr_t unhalted, uintptr_t steps, uintptr_t uniform, uintptr_t limits,
                    uintptr_t p, uintptr_t lam, uintptr_t u_before, uintptr_t halted, int64_t num_active,
                    int64_t hidden, int64_t step, int64_t max_steps, int mode, int dtype, uintptr_t stream) {
  act::PonderNetStepParams params{};
  params.state = ptr<const void>(state);
  params.state_row_stride = state_row_stride;
  params.active = ptr<const int64_t>(active);
  params.weight = ptr<const void>(weight);
  params.bias = ptr<const void>(bias);
  params.unhalted = ptr<void>(unhalted);
  params.steps = ptr<int64_t>(steps);
  params.uniform = ptr<const void>(uniform);  // 0 -> nullptr outside sample mode
  params.limits = ptr<const void>(limits);
  params.p = ptr<void>(p);
  params.lam = ptr<void>(lam);
  params.u_before = ptr<void>(u_before);
  params.halted = ptr<bool>(halted);
  params.num_active = num_active;
  params.hidden = hidden;
  params.step = step;
  params.max_steps = max_steps;
  params.mode = mode;
  act::pondernet_step(params, dtype, reinterpret_cast<cudaStream_t>(stream));
}

void pondernet_backward(uintptr_t order, uintptr_t first, uintptr_t steps, uintptr_t p, uintptr_t lam,
                        uintptr_t u_before, uintptr_t grad_p, uintptr_t grad_kl, uintptr_t logs,
                        uintptr_t grad_z, int64_t batch, int acc_dtype, uintptr_t stream) {
  act::PonderNetBackwardParams params{};
  params.order = ptr<const int64_t>(order);
  params.first = ptr<const int64_t>(first);
  params.steps = ptr<const int64_t>(steps);
  params.p = ptr<const void>(p);
  params.lam = ptr<const void>(lam);
  params.u_before = ptr<const void>(u_before);
  params.grad_p = ptr<const void>(grad_p);
  params.grad_kl = ptr<const void>(grad_kl);
  params.logs = ptr<const void>(logs);
  params.grad_z = ptr<void>(grad_z);
  params.batch = batch;
  act::pondernet_backward(params, acc_dtype, reinterpret_cast<cudaStream_t>(stream));
}

// One entry for the four gate kernels: op 0 GRU forward, 1 GRU backward,
// 2 LSTM forward, 3 LSTM backward; pointers an op does not use are 0.
void cell_gates(int op, uintptr_t gi, int64_t gi_stride, uintptr_t gh, int64_t gh_stride, uintptr_t state,
                int64_t state_stride, uintptr_t grad_h, int64_t grad_h_stride, uintptr_t grad_c,
                int64_t grad_c_stride, uintptr_t out_h, uintptr_t out_c, uintptr_t d_gi, uintptr_t d_gh,
                uintptr_t d_state, int64_t rows, int64_t hidden, int dtype, uintptr_t stream) {
  act::GateParams params{};
  params.gi = ptr<const void>(gi);
  params.gi_stride = gi_stride;
  params.gh = ptr<const void>(gh);
  params.gh_stride = gh_stride;
  params.state = ptr<const void>(state);
  params.state_stride = state_stride;
  params.grad_h = ptr<const void>(grad_h);
  params.grad_h_stride = grad_h_stride;
  params.grad_c = ptr<const void>(grad_c);
  params.grad_c_stride = grad_c_stride;
  params.out_h = ptr<void>(out_h);
  params.out_c = ptr<void>(out_c);
  params.d_gi = ptr<void>(d_gi);
  params.d_gh = ptr<void>(d_gh);
  params.d_state = ptr<void>(d_state);
  params.rows = rows;
  params.hidden = hidden;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (op) {
    case 0: act::gru_gates_forward(params, dtype, s); break;
    case 1: act::gru_gates_backward(params, dtype, s); break;
    case 2: act::lstm_gates_forward(params, dtype, s); break;
    case 3: act::lstm_gates_backward(params, dtype, s); break;
    default: throw std::invalid_argument("act_kernels: unknown gate op " + std::to_string(op));
  }
}

void cell_halting_step(int op, uintptr_t gi, int64_t gi_stride, uintptr_t gh, int64_t gh_stride, uintptr_t state,
                       int64_t state_stride, uintptr_t out_h, uintptr_t out_c, uintptr_t active, uintptr_t weight,
                       uintptr_t bias, uintptr_t threshold, uintptr_t running_sum, uintptr_t accumulator,
                       int64_t acc_row_stride, uintptr_t acc_c, int64_t acc_c_stride, uintptr_t steps,
                       uintptr_t remainder, uintptr_t p, uintptr_t h, uintptr_t halted, int64_t num_active,
                       int64_t hidden, int64_t step, int64_t max_steps, int dtype, uintptr_t stream) {
  act::CellHaltingParams params{};
  params.gates.gi = ptr<const void>(gi);
  params.gates.gi_stride = gi_stride;
  params.gates.gh = ptr<const void>(gh);
  params.gates.gh_stride = gh_stride;
  params.gates.state = ptr<const void>(state);
  params.gates.state_stride = state_stride;
  params.gates.out_h = ptr<void>(out_h);
  params.gates.out_c = ptr<void>(out_c);
  params.gates.rows = num_active;
  params.gates.hidden = hidden;
  params.halting.state = ptr<const void>(out_h);
  params.halting.state_row_stride = hidden;
  params.halting.active = ptr<const int64_t>(active);
  params.halting.weight = ptr<const void>(weight);
  params.halting.bias = ptr<const void>(bias);
  params.halting.threshold = ptr<const void>(threshold);
  params.halting.running_sum = ptr<void>(running_sum);
  params.halting.accumulator = ptr<void>(accumulator);
  params.halting.acc_row_stride = acc_row_stride;
  params.halting.steps = ptr<int64_t>(steps);
  params.halting.remainder = ptr<void>(remainder);
  params.halting.p = ptr<void>(p);
  params.halting.h = ptr<void>(h);
  params.halting.halted = ptr<bool>(halted);
  params.halting.num_active = num_active;
  params.halting.hidden = hidden;
  params.halting.step = step;
  params.halting.max_steps = max_steps;
  params.acc_c = ptr<void>(acc_c);
  params.acc_c_stride = acc_c_stride;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (op) {
    case 0: act::gru_halting_step(params, dtype, s); break;
    case 1: act::lstm_halting_step(params, dtype, s); break;
    default: throw std::invalid_argument("act_kernels: unknown cell halting op " + std::to_string(op));
  }
}

// The CPU gate kernels (cells/gates_cpu.h): kind 0 GRU, 1 LSTM; float32 or
// float64. With step > 0 the forward also runs the halting step (the
// halting pointers are read only then).
template <typename T>
void cpu_cell_forward_typed(int kind, uintptr_t gi, int64_t s_gi, uintptr_t gh, int64_t s_gh, uintptr_t state,
                            int64_t s_state, uintptr_t out_h, uintptr_t out_c, int64_t rows, int64_t hidden,
                            const act::cpu::Halting<T>* halting) {
  if (kind == 0) {
    act::cpu::gru_forward<T>(ptr<const T>(gi), s_gi, ptr<const T>(gh), s_gh, ptr<const T>(state), s_state,
                             ptr<T>(out_h), rows, hidden, halting);
  } else {
    act::cpu::lstm_forward<T>(ptr<const T>(gi), s_gi, ptr<const T>(gh), s_gh, ptr<const T>(state), s_state,
                              ptr<T>(out_h), ptr<T>(out_c), rows, hidden, halting);
  }
}

template <typename T>
void cpu_cell_forward_halting(int kind, uintptr_t gi, int64_t s_gi, uintptr_t gh, int64_t s_gh, uintptr_t state,
                              int64_t s_state, uintptr_t out_h, uintptr_t out_c, int64_t rows, int64_t hidden,
                              uintptr_t active, uintptr_t weight, uintptr_t bias, uintptr_t threshold,
                              uintptr_t running_sum, uintptr_t acc_h, int64_t acc_h_stride, uintptr_t acc_c,
                              int64_t acc_c_stride, uintptr_t steps, uintptr_t remainder, uintptr_t p, uintptr_t h,
                              uintptr_t halted, int64_t step, int64_t max_steps) {
  if (step <= 0) {
    cpu_cell_forward_typed<T>(kind, gi, s_gi, gh, s_gh, state, s_state, out_h, out_c, rows, hidden, nullptr);
    return;
  }
  const act::cpu::Halting<T> q{ptr<const int64_t>(active), ptr<const T>(weight), ptr<const T>(bias),
                               ptr<const T>(threshold), ptr<T>(running_sum), ptr<T>(acc_h), acc_h_stride,
                               ptr<T>(acc_c), acc_c_stride, ptr<int64_t>(steps), ptr<T>(remainder), ptr<T>(p),
                               ptr<T>(h), ptr<bool>(halted), step, max_steps};
  cpu_cell_forward_typed<T>(kind, gi, s_gi, gh, s_gh, state, s_state, out_h, out_c, rows, hidden, &q);
}

void cpu_cell_forward(int kind, uintptr_t gi, int64_t s_gi, uintptr_t gh, int64_t s_gh, uintptr_t state,
                      int64_t s_state, uintptr_t out_h, uintptr_t out_c, int64_t rows, int64_t hidden,
                      uintptr_t active, uintptr_t weight, uintptr_t bias, uintptr_t threshold, uintptr_t running_sum,
                      uintptr_t acc_h, int64_t acc_h_stride, uintptr_t acc_c, int64_t acc_c_stride, uintptr_t steps,
                      uintptr_t remainder, uintptr_t p, uintptr_t h, uintptr_t halted, int64_t step,
                      int64_t max_steps, int dtype) {
  if (kind != 0 && kind != 1) throw std::invalid_argument("act_kernels: unknown cell kind " + std::to_string(kind));
  if (dtype == static_cast<int>(act::DType::kFloat32)) {
    cpu_cell_forward_halting<float>(kind, gi, s_gi, gh, s_gh, state, s_state, out_h, out_c, rows, hidden, active,
                                    weight, bias, threshold, running_sum, acc_h, acc_h_stride, acc_c, acc_c_stride,
                                    steps, remainder, p, h, halted, step, max_steps);
  } else if (dtype == static_cast<int>(act::DType::kFloat64)) {
    cpu_cell_forward_halting<double>(kind, gi, s_gi, gh, s_gh, state, s_state, out_h, out_c, rows, hidden, active,
                                     weight, bias, threshold, running_sum, acc_h, acc_h_stride, acc_c, acc_c_stride,
                                     steps, remainder, p, h, halted, step, max_steps);
  } else {
    throw std::invalid_argument("act_kernels: the CPU gate kernels take float32 or float64");
  }
}

template <typename T>
void cpu_halting_step_typed(uintptr_t state, int64_t s_state, int64_t rows, int64_t hidden, uintptr_t active,
                            uintptr_t weight, uintptr_t bias, uintptr_t threshold, uintptr_t running_sum,
                            uintptr_t acc, int64_t acc_stride, uintptr_t steps, uintptr_t remainder, uintptr_t p,
                            uintptr_t h, uintptr_t halted, int64_t step, int64_t max_steps, uintptr_t row_steps) {
  const act::cpu::Halting<T> q{ptr<const int64_t>(active), ptr<const T>(weight), ptr<const T>(bias),
                               ptr<const T>(threshold), ptr<T>(running_sum), ptr<T>(acc), acc_stride,
                               nullptr, 0, ptr<int64_t>(steps), ptr<T>(remainder), ptr<T>(p),
                               ptr<T>(h), ptr<bool>(halted), step, max_steps, ptr<const int64_t>(row_steps)};
  act::cpu::halting_forward<T>(ptr<const T>(state), s_state, rows, hidden, &q);
}

// ACT's halting step on the CPU over given states, in the state's dtype
// (float32 or float64): the contract of ops/halting.py's halting_step.
// row_steps: 0, every row at `step`, or an (A,) int64 array of each row's step.
void cpu_halting_step(uintptr_t state, int64_t s_state, int64_t rows, int64_t hidden, uintptr_t active,
                      uintptr_t weight, uintptr_t bias, uintptr_t threshold, uintptr_t running_sum, uintptr_t acc,
                      int64_t acc_stride, uintptr_t steps, uintptr_t remainder, uintptr_t p, uintptr_t h,
                      uintptr_t halted, int64_t step, int64_t max_steps, uintptr_t row_steps, int dtype) {
  if (dtype == static_cast<int>(act::DType::kFloat32)) {
    cpu_halting_step_typed<float>(state, s_state, rows, hidden, active, weight, bias, threshold, running_sum, acc,
                                  acc_stride, steps, remainder, p, h, halted, step, max_steps, row_steps);
  } else if (dtype == static_cast<int>(act::DType::kFloat64)) {
    cpu_halting_step_typed<double>(state, s_state, rows, hidden, active, weight, bias, threshold, running_sum, acc,
                                   acc_stride, steps, remainder, p, h, halted, step, max_steps, row_steps);
  } else {
    throw std::invalid_argument("act_kernels: the CPU halting step takes float32 or float64");
  }
}

template <typename T>
void cpu_cell_backward_typed(int kind, uintptr_t grad_h, int64_t s_dh, uintptr_t grad_c, int64_t s_dc, uintptr_t gi,
                             int64_t s_gi, uintptr_t gh, int64_t s_gh, uintptr_t state, int64_t s_state,
                             uintptr_t d_gi, uintptr_t d_gh, uintptr_t d_state, int64_t rows, int64_t hidden) {
  if (kind == 0) {
    act::cpu::gru_backward<T>(ptr<const T>(grad_h), s_dh, ptr<const T>(gi), s_gi, ptr<const T>(gh), s_gh,
                              ptr<const T>(state), s_state, ptr<T>(d_gi), ptr<T>(d_gh), ptr<T>(d_state), rows,
                              hidden);
  } else {
    act::cpu::lstm_backward<T>(ptr<const T>(grad_h), s_dh, ptr<const T>(grad_c), s_dc, ptr<const T>(gi), s_gi,
                               ptr<const T>(gh), s_gh, ptr<const T>(state), s_state, ptr<T>(d_gi),
                               ptr<T>(d_state), rows, hidden);
  }
}

template <typename T>
void cpu_ragged_attention_typed(uintptr_t q, int64_t q_row, int64_t q_head, uintptr_t k, int64_t k_row,
                                int64_t k_head, uintptr_t v, int64_t v_row, int64_t v_head, int64_t pool_rows,
                                uintptr_t kv_rows, int64_t tokens, uintptr_t cu, int64_t batch, uintptr_t q_rows,
                                int64_t queries, int64_t heads, int64_t kv_heads, int64_t dim, bool causal,
                                double scale, uintptr_t out) {
  const act::cpu::RaggedAttention<T> a{ptr<const T>(q), q_row, q_head, ptr<const T>(k), k_row, k_head,
                                       ptr<const T>(v), v_row, v_head, pool_rows, ptr<const int64_t>(kv_rows),
                                       tokens, ptr<const int32_t>(cu), batch, ptr<const int64_t>(q_rows), queries,
                                       heads, kv_heads, dim, causal, scale, ptr<T>(out)};
  act::cpu::ragged_attention_forward<T>(a);
}

// Ragged attention's forward on the CPU (float32 or float64): the contract
// of ops/attention/reference.py's ragged_attention, without autograd.
void cpu_ragged_attention(uintptr_t q, int64_t q_row, int64_t q_head, uintptr_t k, int64_t k_row, int64_t k_head,
                          uintptr_t v, int64_t v_row, int64_t v_head, int64_t pool_rows, uintptr_t kv_rows,
                          int64_t tokens, uintptr_t cu, int64_t batch, uintptr_t q_rows, int64_t queries,
                          int64_t heads, int64_t kv_heads, int64_t dim,
                          bool causal, double scale, uintptr_t out, int dtype) {
  if (dtype == static_cast<int>(act::DType::kFloat32)) {
    cpu_ragged_attention_typed<float>(q, q_row, q_head, k, k_row, k_head, v, v_row, v_head, pool_rows, kv_rows,
                                      tokens, cu, batch,
                                      q_rows, queries, heads, kv_heads, dim, causal, scale, out);
  } else if (dtype == static_cast<int>(act::DType::kFloat64)) {
    cpu_ragged_attention_typed<double>(q, q_row, q_head, k, k_row, k_head, v, v_row, v_head, pool_rows, kv_rows,
                                      tokens, cu, batch,
                                       q_rows, queries, heads, kv_heads, dim, causal, scale, out);
  } else {
    throw std::invalid_argument("act_kernels: the CPU ragged attention takes float32 or float64");
  }
}

void cpu_cell_backward(int kind, uintptr_t grad_h, int64_t s_dh, uintptr_t grad_c, int64_t s_dc, uintptr_t gi,
                       int64_t s_gi, uintptr_t gh, int64_t s_gh, uintptr_t state, int64_t s_state, uintptr_t d_gi,
                       uintptr_t d_gh, uintptr_t d_state, int64_t rows, int64_t hidden, int dtype) {
  if (kind != 0 && kind != 1) throw std::invalid_argument("act_kernels: unknown cell kind " + std::to_string(kind));
  if (dtype == static_cast<int>(act::DType::kFloat32)) {
    cpu_cell_backward_typed<float>(kind, grad_h, s_dh, grad_c, s_dc, gi, s_gi, gh, s_gh, state, s_state, d_gi, d_gh,
                                   d_state, rows, hidden);
  } else if (dtype == static_cast<int>(act::DType::kFloat64)) {
    cpu_cell_backward_typed<double>(kind, grad_h, s_dh, grad_c, s_dc, gi, s_gi, gh, s_gh, state, s_state, d_gi,
                                    d_gh, d_state, rows, hidden);
  } else {
    throw std::invalid_argument("act_kernels: the CPU gate kernels take float32 or float64");
  }
}

int64_t combine_backward_groups(int64_t batch, int64_t hidden) {
  return act::combine_backward_groups(batch, hidden);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "act_kernels CUDA kernels (raw-pointer interface; see act_kernels/ops/cuda_kernels.py)";
  m.def("halting_step", &halting_step, "Fused ACT halting step over the active rows");
  m.def("combine_backward", &combine_backward, "Fused ACT combine backward over the packed rows");
  m.def("pondernet_step", &pondernet_step, "Fused PonderNet halting step over the running rows");
  m.def("pondernet_backward", &pondernet_backward, "PonderNet backward of p and kl: a reverse scan per row");
  m.def("cell_gates", &cell_gates, "Fused GRU/LSTM gates, forward or recomputing backward (op 0-3)");
  m.def("cpu_cell_forward", &cpu_cell_forward, py::call_guard<py::gil_scoped_release>(),
        "CPU GRU (kind 0) / LSTM (1) gates, with the halting step when step > 0 (float32, float64)");
  m.def("cpu_cell_backward", &cpu_cell_backward, py::call_guard<py::gil_scoped_release>(),
        "CPU GRU / LSTM gates backward, recomputing the gates (float32, float64)");
  m.def("cpu_ragged_attention", &cpu_ragged_attention, py::call_guard<py::gil_scoped_release>(),
        "Ragged attention's forward on the CPU (float32, float64), no autograd");
  m.def("cpu_halting_step", &cpu_halting_step, py::call_guard<py::gil_scoped_release>(),
        "ACT's halting step on the CPU over given states (float32/float64)");
  m.def("cell_halting_step", &cell_halting_step,
        "A GRU (op 0) or LSTM (op 1) ponder step's gates and its halting step in one launch");
  m.def("combine_backward_groups", &combine_backward_groups,
        "Number of row groups (gw partial rows) the combine backward uses for (B, H)");
  py::register_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const std::invalid_argument& err) {
      PyErr_SetString(PyExc_ValueError, err.what());
    }
  });
}
