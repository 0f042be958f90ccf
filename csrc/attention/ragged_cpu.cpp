// See ragged_cpu.h. Per query and head: the scores of its visible keys into a
// buffer, their maximum, then the exponentials and the weighted sum of the
// values, normalized once (two passes over the keys, exact softmax). The
// inner loops run over the contiguous features and vectorize at -O3.
#include "attention/ragged_cpu.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

namespace act {
namespace cpu {

// q . k over d features in eight independent lanes: a plain running sum is
// one dependency chain the compiler may not reorder (no fast-math), lanes it
// vectorizes.
template <typename T>
inline T dot(const T* q, const T* k, int64_t dim) {
  T lanes[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += q[d + l] * k[d + l];
  }
  T tail = T(0);
  for (; d < dim; ++d) tail += q[d] * k[d];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + tail;
}

// One query's heads that share kv head g: their scores over the visible keys
// (each key row read once for the group), then their outputs (each value row
// read once). scores: (group, count) scratch.
template <typename T>
inline void group_attention(const RaggedAttention<T>& a, int64_t i, int64_t g, int64_t group, int64_t start,
                            int64_t count, T* scores) {
  const T scale = static_cast<T>(a.scale);
  const T* qg = a.q + i * a.q_row + g * group * a.q_head;
  T* og = a.out + (i * a.heads + g * group) * a.dim;
  for (int64_t d = 0; d < group * a.dim; ++d) og[d] = T(0);
  if (count <= 0) return;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t row = a.kv_rows ? a.kv_rows[start + j] : start + j;
    const T* kj = a.k + row * a.k_row + g * a.k_head;
    for (int64_t h = 0; h < group; ++h) scores[h * count + j] = dot(qg + h * a.q_head, kj, a.dim) * scale;
  }
  T total[64];
  const int64_t heads = std::min<int64_t>(group, 64);
  for (int64_t h = 0; h < heads; ++h) {
    T* sh = scores + h * count;
    T best = sh[0];
    for (int64_t j = 1; j < count; ++j) best = std::max(best, sh[j]);
    T sum = T(0);
    for (int64_t j = 0; j < count; ++j) {
      sh[j] = std::exp(sh[j] - best);
      sum += sh[j];
    }
    total[h] = sum;
  }
  for (int64_t j = 0; j < count; ++j) {
    const int64_t row = a.kv_rows ? a.kv_rows[start + j] : start + j;
    const T* vj = a.v + row * a.v_row + g * a.v_head;
    for (int64_t h = 0; h < heads; ++h) {
      const T e = scores[h * count + j];
      T* o = og + h * a.dim;
      for (int64_t d = 0; d < a.dim; ++d) o[d] += e * vj[d];
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    const T inv = T(1) / total[h];
    T* o = og + h * a.dim;
    for (int64_t d = 0; d < a.dim; ++d) o[d] *= inv;
  }
}

// Compiled for AVX2 and for the baseline ISA; the loader picks by the running
// CPU. Neither contracts to FMA, so both round alike.
template <typename T>
__attribute__((target_clones("avx2", "default"))) void forward_loop(const RaggedAttention<T>& a,
                                                                          int64_t group, T* scores) {
  for (int64_t i = 0; i < a.queries; ++i) {
    const int64_t token = a.q_rows[i];
    // the query's sequence: the last b with cu[b] <= token
    const int32_t* upper = std::upper_bound(a.cu, a.cu + a.batch + 1, static_cast<int32_t>(token));
    const int64_t b = (upper - a.cu) - 1;
    const int64_t start = a.cu[b];
    const int64_t count = (a.causal ? token + 1 : a.cu[b + 1]) - start;
    for (int64_t g = 0; g < a.kv_heads; ++g) group_attention(a, i, g, group, start, count, scores);
  }
}

// The indices a call reads through, checked in full (O(B + A + T_tok), small
// beside the attention): offsets that start at 0 or more, never decrease and
// end within the tokens; queries inside the offsets (in int64, before any
// narrowing); pool rows inside the pools.
template <typename T>
void check_indices(const RaggedAttention<T>& a) {
  if (a.batch < 0 || a.cu[0] < 0) throw std::invalid_argument("act_kernels: cu_seqlens must start at 0 or more");
  for (int64_t b = 0; b < a.batch; ++b) {
    if (a.cu[b + 1] < a.cu[b]) throw std::invalid_argument("act_kernels: cu_seqlens must be non-decreasing");
  }
  if (a.cu[a.batch] > a.tokens) {
    throw std::invalid_argument("act_kernels: cu_seqlens reaches past the tokens the pools hold");
  }
  for (int64_t i = 0; i < a.queries; ++i) {
    if (a.q_rows[i] < a.cu[0] || a.q_rows[i] >= a.cu[a.batch]) {
      throw std::invalid_argument("act_kernels: a query row lies outside cu_seqlens");
    }
  }
  if (a.kv_rows != nullptr) {
    for (int64_t j = a.cu[0]; j < a.cu[a.batch]; ++j) {
      if (a.kv_rows[j] < 0 || a.kv_rows[j] >= a.pool_rows) {
        throw std::invalid_argument("act_kernels: kv_rows points outside the pools");
      }
    }
  }
}

template <typename T>
void ragged_attention_forward(const RaggedAttention<T>& a) {
  if (a.kv_heads <= 0 || a.heads % a.kv_heads != 0) {
    throw std::invalid_argument("act_kernels: heads must be a multiple of kv_heads");
  }
  const int64_t group = a.heads / a.kv_heads;
  if (group > 64) throw std::invalid_argument("act_kernels: at most 64 query heads per kv head");
  check_indices(a);
  int64_t longest = 0;
  for (int64_t b = 0; b < a.batch; ++b) longest = std::max<int64_t>(longest, a.cu[b + 1] - a.cu[b]);
  std::vector<T> scores(static_cast<size_t>(group * std::max<int64_t>(longest, 1)));
  forward_loop<T>(a, group, scores.data());
}

template void ragged_attention_forward<float>(const RaggedAttention<float>&);
template void ragged_attention_forward<double>(const RaggedAttention<double>&);

}  // namespace cpu
}  // namespace act
