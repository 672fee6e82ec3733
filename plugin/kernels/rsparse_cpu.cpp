// R-Sparse sparse product on CPU: y = (x ⊙ m) W with W stored transposed ([in, out], one
// contiguous row per input channel) and m = |x|·norm > t per token. Only the rows of the
// channels that are exact for at least one token (the union over the batch) are read; each
// token keeps its own mask through a zero coefficient. Several layers that share the input
// (q | k | v, gate | up) run as column segments of one call, each with its own channel norms
// and threshold, so they share one task pool across the threads. A segment's low-rank term for
// its inexact channels, U_r(S_r V_rᵀ(x ⊙ (1 − m))), is added in the same pass. Built at first use by
// slimserve/plugin/kernels/rsparse.py with torch.utils.cpp_extension.load, for the best ISA the
// compiler flags allow: AVX-512 (16 fp32 lanes), else AVX2 + FMA (8 lanes; AMD EPYC hosts have no
// AVX-512), else scalar loops.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "vector_rows.h"

namespace {

using slimserve_rows::kIsa;
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(SLIMSERVE_AVX2)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 16;  // unused: the scalar build has no vector part
#endif

// Most output columns one task accumulates at a time: tokens x kChunk float accumulators stay
// in L1 while every active row's chunk of weights is streamed once (1 KiB contiguous in bf16).
constexpr int64_t kChunk = 512;
// Rows combined per accumulator update: each accumulator load/store serves kRows weight rows,
// and each weight vector is loaded and widened once for all tokens.
constexpr int64_t kRows = 8;
// Columns per vector step: one vector load of weights, i.e. kLanes fp32 or 2·kLanes bf16 (widened as
// even/odd halves): 16 | 32 with AVX-512, 8 | 16 with AVX2.
template <typename T> constexpr int64_t kStep = std::is_same<T, float>::value ? kLanes : 2 * kLanes;

#if defined(__AVX512F__)
// A 512-bit load of weights widened to fp32: for bf16 the even columns are the low halves
// shifted up and the odd columns the high halves masked, so the accumulators of a 32-column
// step hold [even 16 | odd 16] and are interleaved back when the chunk is written out.
inline void widen(const c10::BFloat16* p, __m512& even, __m512& odd) {
  const __m512i raw = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void widen(const float* p, __m512& even, __m512& odd) {
  even = _mm512_loadu_ps(p);
  odd = even;
}
#elif defined(SLIMSERVE_AVX2)
// The 256-bit form of the same widening: 16 bf16 columns become [even 8 | odd 8].
inline void widen(const c10::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void widen(const float* p, __m256& even, __m256& odd) {
  even = _mm256_loadu_ps(p);
  odd = even;
}
#endif

// acc += coefᵀ · wt[rows, c0:c0+width] for one group of kRows rows, over the vector part of the chunk.
template <typename T>
void accumulate_group(const T* const* w, const float* coef, int64_t tokens, int64_t width_v, float* acc) {
#if defined(__AVX512F__)
  constexpr bool kBf16 = !std::is_same<T, float>::value;
  for (int64_t j = 0; j < width_v; j += kStep<T>) {
    __m512 even[kRows], odd[kRows];
    for (int64_t r = 0; r < kRows; ++r) widen(w[r] + j, even[r], odd[r]);
    for (int64_t n = 0; n < tokens; ++n) {
      float* a = acc + n * kChunk + j;
      __m512 se = _mm512_loadu_ps(a);
      __m512 so = kBf16 ? _mm512_loadu_ps(a + 16) : se;
      for (int64_t r = 0; r < kRows; ++r) {
        const __m512 c = _mm512_set1_ps(coef[r * tokens + n]);
        se = _mm512_fmadd_ps(c, even[r], se);
        if (kBf16) so = _mm512_fmadd_ps(c, odd[r], so);
      }
      _mm512_storeu_ps(a, se);
      if (kBf16) _mm512_storeu_ps(a + 16, so);
    }
  }
#elif defined(SLIMSERVE_AVX2)
  // AVX2 has 16 vector registers: the 8 rows go as two halves of 4 (8 widened vectors, two
  // accumulators, one broadcast), so nothing spills; the accumulators are read twice, from L1.
  constexpr bool kBf16 = !std::is_same<T, float>::value;
  constexpr int64_t kHalf = kRows / 2;
  for (int64_t j = 0; j < width_v; j += kStep<T>) {
    for (int64_t r0 = 0; r0 < kRows; r0 += kHalf) {
      __m256 even[kHalf], odd[kHalf];
      for (int64_t r = 0; r < kHalf; ++r) widen(w[r0 + r] + j, even[r], odd[r]);
      for (int64_t n = 0; n < tokens; ++n) {
        float* a = acc + n * kChunk + j;
        __m256 se = _mm256_loadu_ps(a);
        __m256 so = kBf16 ? _mm256_loadu_ps(a + 8) : se;
        for (int64_t r = 0; r < kHalf; ++r) {
          const __m256 c = _mm256_set1_ps(coef[(r0 + r) * tokens + n]);
          se = _mm256_fmadd_ps(c, even[r], se);
          if (kBf16) so = _mm256_fmadd_ps(c, odd[r], so);
        }
        _mm256_storeu_ps(a, se);
        if (kBf16) _mm256_storeu_ps(a + 8, so);
      }
    }
  }
#else
  (void)w; (void)coef; (void)tokens; (void)width_v; (void)acc;
#endif
}

// Writes the chunk's accumulators to y, undoing the even/odd layout of the vector part.
template <typename T>
void store_chunk(const float* acc, int64_t tokens, int64_t width_v, int64_t width, T* y, int64_t out) {
  for (int64_t n = 0; n < tokens; ++n) {
    const float* a = acc + n * kChunk;
    T* dst = y + n * out;
    for (int64_t j = 0; j < width_v; j += kStep<T>) {
      if (std::is_same<T, float>::value) {
        for (int64_t q = 0; q < kLanes; ++q) dst[j + q] = T(a[j + q]);
      } else {
        for (int64_t q = 0; q < kLanes; ++q) {
          dst[j + 2 * q] = T(a[j + q]);
          dst[j + 2 * q + 1] = T(a[j + kLanes + q]);
        }
      }
    }
    for (int64_t j = width_v; j < width; ++j) dst[j] = T(a[j]);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  sum = _mm512_reduce_add_ps(acc);
#elif defined(SLIMSERVE_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  sum = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// The R-Sparse mask: channel i of a token is exact when |x_i|·‖W[:, i]‖ > t.
inline bool is_exact(float value, float norm, float threshold) { return std::fabs(value) * norm > threshold; }

// A segment's low-rank term U_r(S_r V_rᵀ(x ⊙ (1 − m))), added in the same pass as the exact
// channels: per token the code S_r V_rᵀ(x ⊙ (1 − m)) is computed once per call, then its r
// entries act as r more "rows" whose weights are the rows of U_rᵀ, accumulated by the same
// vector loop as the rows of Wᵀ. Fusing it saves the four PyTorch calls per shard (two GEMMs,
// a slice, an add) that cost more than their arithmetic at decode sizes (SmolLM2 at α = 0.95
// ran at 0.95x dense with them).
template <typename T>
struct LowRank {
  const float* vs = nullptr;  // S_r·V_rᵀ [rank, in], float32
  const T* ut = nullptr;      // U_rᵀ [rank, segment width]
  int64_t rank = 0;
  std::vector<float> coef;  // [rank padded to kRows, tokens]: the codes, zero on padding rows
};

template <typename T>
void low_rank_code(const T* x, const float* norm, float threshold, int64_t tokens, int64_t in, LowRank<T>& lr) {
  std::vector<float> rest(tokens * in);
  for (int64_t n = 0; n < tokens; ++n) {
    for (int64_t i = 0; i < in; ++i) {
      const float v = static_cast<float>(x[n * in + i]);
      rest[n * in + i] = is_exact(v, norm[i], threshold) ? 0.f : v;
    }
  }
  const int64_t padded = (lr.rank + kRows - 1) / kRows * kRows;
  lr.coef.assign(padded * tokens, 0.f);
  at::parallel_for(0, lr.rank, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t n = 0; n < tokens; ++n) lr.coef[j * tokens + n] = dot(lr.vs + j * in, rest.data() + n * in, in);
    }
  });
}

// acc[n, :width] += Σ_k coef[k, n] · row(k)[:width] over `groups` groups of kRows rows.
template <typename T, typename RowPointer>
void accumulate_rows(RowPointer row, int64_t groups, const float* coef, int64_t tokens, int64_t width,
                     int64_t width_v, float* acc) {
  for (int64_t g = 0; g < groups; ++g) {
    const T* w[kRows];
    for (int64_t r = 0; r < kRows; ++r) w[r] = row(g * kRows + r);
    if (g + 1 < groups) {  // the next group's rows, ahead of the hardware prefetcher
      for (int64_t r = 0; r < kRows; ++r) {
        const char* next = reinterpret_cast<const char*>(row((g + 1) * kRows + r));
        for (int64_t b = 0; b < width * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(next + b);
      }
    }
    const float* cg = coef + g * kRows * tokens;
    accumulate_group(w, cg, tokens, width_v, acc);
    for (int64_t n = 0; n < tokens; ++n) {
      float* a = acc + n * kChunk;
      for (int64_t j = width_v; j < width; ++j) {
        float s = a[j];
        for (int64_t r = 0; r < kRows; ++r) s += cg[r * tokens + n] * static_cast<float>(w[r][j]);
        a[j] = s;
      }
    }
  }
}

// Output columns per task: at most kChunk and a whole number of vector steps, small enough
// that every thread gets about two tasks. Tasks are taken from a shared counter, so segments of
// different widths (q 576 | k 192 | v 192) still keep both threads busy to the end. Fixed
// 512-column tasks left a 576-wide layer as one 512- and one 64-column task (one thread idle
// most of the time) and a 192-wide one on a single thread; narrower tasks than needed cut
// each active row into more, shorter reads.
int64_t task_width(int64_t total_out, int64_t step) {
  constexpr int64_t kTasksPerThread = 2;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t target = (total_out + kTasksPerThread * threads - 1) / (kTasksPerThread * threads);
  return std::min(kChunk, std::max(step, (target + step - 1) / step * step));
}

// One segment's active rows (the union over the batch, padded to whole groups of kRows with
// zero coefficients) and their per-token coefficients [rows, tokens] (0 where a token's
// channel is not exact); writes the inexact remainder x ⊙ (1 − m) to `rest` when given.
template <typename T>
void segment_masks(const T* x, const float* norm, float threshold, T* rest, int64_t tokens, int64_t in,
                   std::vector<int64_t>& rows, std::vector<float>& coef) {
  rows.reserve(in + kRows);
  coef.reserve((in + kRows) * tokens);
  for (int64_t i = 0; i < in; ++i) {
    bool any = false;
    for (int64_t n = 0; n < tokens; ++n) {
      const bool keep = is_exact(static_cast<float>(x[n * in + i]), norm[i], threshold);
      any |= keep;
      if (rest != nullptr) rest[n * in + i] = keep ? T(0.f) : x[n * in + i];
    }
    if (!any) continue;
    rows.push_back(i);
    for (int64_t n = 0; n < tokens; ++n) {
      const float v = static_cast<float>(x[n * in + i]);
      coef.push_back(is_exact(v, norm[i], threshold) ? v : 0.f);
    }
  }
  while (rows.size() % kRows != 0) {
    rows.push_back(rows.empty() ? 0 : rows.back());
    coef.insert(coef.end(), tokens, 0.f);
  }
}

// Segment s owns columns [offsets[s], offsets[s+1]) of wt [in, total_out] and y [tokens, total_out],
// with its own channel norms norms[s * in ...], threshold and (optional) low-rank term.
template <typename T>
void sparse_mm(const T* x, const T* wt, const float* norms, const std::vector<float>& thresholds,
               const std::vector<int64_t>& offsets, std::vector<LowRank<T>>& low_rank, T* y, T* rest, int64_t tokens,
               int64_t in) {
  const int64_t segments = static_cast<int64_t>(thresholds.size());
  const int64_t total_out = offsets.back();
  std::vector<std::vector<int64_t>> rows(segments);
  std::vector<std::vector<float>> coef(segments);
  for (int64_t s = 0; s < segments; ++s) {
    segment_masks(x, norms + s * in, thresholds[s], rest == nullptr ? nullptr : rest + s * tokens * in, tokens, in,
                  rows[s], coef[s]);
    if (low_rank[s].rank > 0) low_rank_code(x, norms + s * in, thresholds[s], tokens, in, low_rank[s]);
  }
  const int64_t width = task_width(total_out, kStep<T>);
  std::vector<std::array<int64_t, 3>> tasks;  // segment, first column, width
  for (int64_t s = 0; s < segments; ++s) {
    for (int64_t c0 = offsets[s]; c0 < offsets[s + 1]; c0 += width) {
      tasks.push_back({s, c0, std::min(width, offsets[s + 1] - c0)});
    }
  }
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> acc(tokens * kChunk);
    for (int64_t t = next++; t < static_cast<int64_t>(tasks.size()); t = next++) {
      const auto& [s, c0, w] = tasks[t];
#if defined(__AVX512F__) || defined(SLIMSERVE_AVX2)
      const int64_t width_v = w / kStep<T> * kStep<T>;
#else
      const int64_t width_v = 0;
#endif
      std::fill(acc.begin(), acc.end(), 0.f);
      const auto& active = rows[s];
      accumulate_rows<T>([&](int64_t k) { return wt + active[k] * total_out + c0; },
                         static_cast<int64_t>(active.size()) / kRows, coef[s].data(), tokens, w, width_v, acc.data());
      const LowRank<T>& lr = low_rank[s];
      if (lr.rank > 0) {
        const int64_t segment_width = offsets[s + 1] - offsets[s];
        accumulate_rows<T>(
            [&](int64_t k) { return lr.ut + std::min(k, lr.rank - 1) * segment_width + (c0 - offsets[s]); },
            static_cast<int64_t>(lr.coef.size()) / (kRows * tokens), lr.coef.data(), tokens, w, width_v, acc.data());
      }
      store_chunk(acc.data(), tokens, width_v, w, y + c0, total_out);
    }
  });
}

}  // namespace

// x [N, in]; weight_t [in, total_out] (x's dtype, contiguous): the segments' Wᵀ side by side,
// segment s owning `splits[s]` columns; col_norms [S, in] float32; thresholds: S values.
// vs / ut: per segment S_r·V_rᵀ [r, in] (float32) and U_rᵀ [r, splits[s]] (x's dtype), an empty
// tensor for a segment without a low-rank term (empty lists for none); the term is added to y.
// Returns y [N, total_out]; when `rest` ([S, N, in]) is given, rest[s] receives x ⊙ (1 − m_s).
torch::Tensor rsparse_sparse_mm(torch::Tensor x, torch::Tensor weight_t, torch::Tensor col_norms,
                                std::vector<double> thresholds, std::vector<int64_t> splits,
                                c10::optional<torch::Tensor> rest, std::vector<torch::Tensor> vs,
                                std::vector<torch::Tensor> ut) {
  TORCH_CHECK(x.dim() == 2 && weight_t.dim() == 2 && x.size(1) == weight_t.size(0), "rsparse_sparse_mm: x ",
              x.sizes(), " does not match weight_t ", weight_t.sizes());
  TORCH_CHECK(x.scalar_type() == weight_t.scalar_type(), "rsparse_sparse_mm: x and weight_t dtypes differ");
  const int64_t segments = static_cast<int64_t>(splits.size());
  TORCH_CHECK(segments > 0 && static_cast<int64_t>(thresholds.size()) == segments,
              "rsparse_sparse_mm: need one threshold per segment, got ", thresholds.size(), " for ", segments);
  std::vector<int64_t> offsets{0};
  for (const int64_t width : splits) {
    TORCH_CHECK(width > 0, "rsparse_sparse_mm: segment widths must be positive");
    offsets.push_back(offsets.back() + width);
  }
  TORCH_CHECK(offsets.back() == weight_t.size(1), "rsparse_sparse_mm: segment widths sum to ", offsets.back(),
              ", weight_t has ", weight_t.size(1), " columns");
  TORCH_CHECK(col_norms.scalar_type() == at::kFloat && col_norms.dim() == 2 && col_norms.size(0) == segments &&
                  col_norms.size(1) == x.size(1),
              "col_norms must be float32 [segments, in]");
  TORCH_CHECK(weight_t.is_contiguous() && col_norms.is_contiguous(), "weight_t and col_norms must be contiguous");
  auto xc = x.contiguous();
  const int64_t tokens = xc.size(0), in = xc.size(1);
  auto y = torch::empty({tokens, offsets.back()}, xc.options());
  if (rest.has_value()) {
    TORCH_CHECK(rest->is_contiguous() && rest->dim() == 3 && rest->size(0) == segments && rest->size(1) == tokens &&
                    rest->size(2) == in && rest->scalar_type() == xc.scalar_type(),
                "rest must be a contiguous [segments, N, in] tensor of x's dtype");
  }
  TORCH_CHECK(vs.size() == ut.size() && (vs.empty() || static_cast<int64_t>(vs.size()) == segments),
              "rsparse_sparse_mm: give vs and ut for every segment (empty tensors where a segment has none) or for none");
  for (size_t s = 0; s < vs.size(); ++s) {
    if (vs[s].numel() == 0) continue;
    TORCH_CHECK(vs[s].dim() == 2 && vs[s].size(1) == in && ut[s].dim() == 2 && ut[s].size(1) == splits[s] &&
                    ut[s].size(0) == vs[s].size(0) && vs[s].is_contiguous() && ut[s].is_contiguous() &&
                    vs[s].scalar_type() == at::kFloat && ut[s].scalar_type() == xc.scalar_type(),
                "rsparse_sparse_mm: segment ", s, " needs contiguous float32 vs [r, ", in, "] and ut [r, ", splits[s],
                "] in x's dtype, got ", vs[s].sizes(), " and ", ut[s].sizes());
  }
  const std::vector<float> t(thresholds.begin(), thresholds.end());
  const auto run = [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    std::vector<LowRank<T>> low_rank(segments);
    for (size_t s = 0; s < vs.size(); ++s) {
      if (vs[s].numel() == 0) continue;
      low_rank[s].vs = vs[s].data_ptr<float>();
      low_rank[s].ut = ut[s].data_ptr<T>();
      low_rank[s].rank = vs[s].size(0);
    }
    sparse_mm(xc.data_ptr<T>(), weight_t.data_ptr<T>(), col_norms.data_ptr<float>(), t, offsets, low_rank,
              y.data_ptr<T>(), rest.has_value() ? rest->data_ptr<T>() : nullptr, tokens, in);
  };
  if (xc.scalar_type() == at::kBFloat16) {
    run(static_cast<c10::BFloat16*>(nullptr));
  } else {
    TORCH_CHECK(xc.scalar_type() == at::kFloat, "rsparse_sparse_mm supports bfloat16 and float32, got ",
                xc.scalar_type());
    run(static_cast<float*>(nullptr));
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rsparse_sparse_mm", &rsparse_sparse_mm,
        "R-Sparse exact-channel product of one or more column segments, reading only active rows of W^T");
  m.def("isa", [] { return std::string(kIsa); }, "the instruction set this build's inner loops use");
}
