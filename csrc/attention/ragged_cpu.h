// Ragged attention's forward on the CPU (act_kernels/ops/attention, design §9):
// the contract of reference.ragged_attention without autograd, float32 and
// float64, one thread, plain C++ on raw pointers. Each query reads its own
// sequence's keys through the token -> pool-row index, with no padding, no
// gather and no mask: what a decode step needs, one or a few queries per
// sequence over a long cache.
#pragma once

#include <cstdint>

namespace act {
namespace cpu {

template <typename T>
struct RaggedAttention {
  const T* q;              // (A, Hq, d): row stride q_row, head stride q_head, features contiguous
  int64_t q_row, q_head;
  const T* k;              // pool (P, Hkv, d): row stride k_row, head stride k_head, features contiguous
  int64_t k_row, k_head;
  const T* v;              // pool (P, Hkv, d), strides v_row, v_head
  int64_t v_row, v_head;
  int64_t pool_rows;       // P: rows of both pools
  const int64_t* kv_rows;  // (T_tok,) token j reads pool row kv_rows[j]; nullptr: row j
  int64_t tokens;          // T_tok: kv_rows' length (P without kv_rows)
  const int32_t* cu;       // (B + 1,) sequence offsets
  int64_t batch;
  const int64_t* q_rows;   // (A,) packed token index of every query
  int64_t queries, heads, kv_heads, dim;
  bool causal;
  double scale;
  T* out;                  // (A, Hq, d) contiguous
};

// Softmax statistics and sums in T (float32 for float32, float64 for float64).
// Every index is checked before anything is read: bad input raises
// std::invalid_argument, never reads outside the pools.
template <typename T>
void ragged_attention_forward(const RaggedAttention<T>& a);

}  // namespace cpu
}  // namespace act
