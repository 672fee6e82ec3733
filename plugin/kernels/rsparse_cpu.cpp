// R-Sparse sparse product on CPU: y = (x ⊙ m) W with W stored transposed ([in, out], one
// contiguous row per input channel) and m = |x|·norm > t per token. Only the rows of the
// channels that are exact for at least one token (the union over the batch) are read; each
// token keeps its own mask through a zero coefficient. Built at first use by
// slimserve/plugin/kernels/rsparse.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Output columns one task accumulates at a time: tokens x kChunk float accumulators stay in
// L1 while every active row's kChunk weights are streamed once (1 KiB contiguous in bf16).
constexpr int64_t kChunk = 512;
// Rows combined per accumulator update: each accumulator load/store serves kRows weight rows,
// and each weight vector is loaded and widened once for all tokens.
constexpr int64_t kRows = 8;
// Columns per vector step: 32 bf16 (one 512-bit load, widened as even/odd halves) or 16 fp32.
template <typename T> constexpr int64_t kStep = std::is_same<T, float>::value ? 16 : 32;

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
        for (int64_t q = 0; q < 16; ++q) dst[j + q] = T(a[j + q]);
      } else {
        for (int64_t q = 0; q < 16; ++q) {
          dst[j + 2 * q] = T(a[j + q]);
          dst[j + 2 * q + 1] = T(a[j + 16 + q]);
        }
      }
    }
    for (int64_t j = width_v; j < width; ++j) dst[j] = T(a[j]);
  }
}

template <typename T>
void sparse_mm(const T* x, const T* wt, const float* norm, float threshold, T* y, T* rest, int64_t tokens,
               int64_t in, int64_t out) {
  // 1. Masks, the union of exact channels (padded to whole groups of kRows with zero
  //    coefficients), their coefficients [rows, tokens] (0 where a token's channel is not
  //    exact) and, if asked, the inexact remainder x ⊙ (1 − m).
  std::vector<int64_t> rows;
  std::vector<float> coef;
  rows.reserve(in + kRows);
  coef.reserve((in + kRows) * tokens);
  for (int64_t i = 0; i < in; ++i) {
    bool any = false;
    for (int64_t n = 0; n < tokens; ++n) {
      const bool keep = std::fabs(static_cast<float>(x[n * in + i])) * norm[i] > threshold;
      any |= keep;
      if (rest != nullptr) rest[n * in + i] = keep ? T(0.f) : x[n * in + i];
    }
    if (!any) continue;
    rows.push_back(i);
    for (int64_t n = 0; n < tokens; ++n) {
      const float v = static_cast<float>(x[n * in + i]);
      coef.push_back(std::fabs(v) * norm[i] > threshold ? v : 0.f);
    }
  }
  while (rows.size() % kRows != 0) {
    rows.push_back(rows.empty() ? 0 : rows.back());
    coef.insert(coef.end(), tokens, 0.f);
  }
  const int64_t groups = static_cast<int64_t>(rows.size()) / kRows;
  // 2. Output chunks in parallel; each streams the active rows of its columns once.
  const int64_t chunks = (out + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(tokens * kChunk);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * kChunk;
      const int64_t width = std::min(kChunk, out - c0);
#if defined(__AVX512F__)
      const int64_t width_v = width / kStep<T> * kStep<T>;
#else
      const int64_t width_v = 0;
#endif
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < groups; ++g) {
        const T* w[kRows];
        for (int64_t r = 0; r < kRows; ++r) w[r] = wt + rows[g * kRows + r] * out + c0;
        if (g + 1 < groups) {  // the next group's rows, ahead of the hardware prefetcher
          for (int64_t r = 0; r < kRows; ++r) {
            const char* next = reinterpret_cast<const char*>(wt + rows[(g + 1) * kRows + r] * out + c0);
            for (int64_t b = 0; b < width * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(next + b);
          }
        }
        const float* cg = coef.data() + g * kRows * tokens;
        accumulate_group(w, cg, tokens, width_v, acc.data());
        for (int64_t n = 0; n < tokens; ++n) {
          float* a = acc.data() + n * kChunk;
          for (int64_t j = width_v; j < width; ++j) {
            float s = a[j];
            for (int64_t r = 0; r < kRows; ++r) s += cg[r * tokens + n] * static_cast<float>(w[r][j]);
            a[j] = s;
          }
        }
      }
      store_chunk(acc.data(), tokens, width_v, width, y + c0, out);
    }
  });
}

}  // namespace

// x [N, in], weight_t [in, out] (same dtype, contiguous), col_norm [in] float32.
// Returns y [N, out]; when `rest` is defined it receives x ⊙ (1 − m).
torch::Tensor rsparse_sparse_mm(torch::Tensor x, torch::Tensor weight_t, torch::Tensor col_norm, double threshold,
                                c10::optional<torch::Tensor> rest) {
  TORCH_CHECK(x.dim() == 2 && weight_t.dim() == 2 && x.size(1) == weight_t.size(0), "rsparse_sparse_mm: x ",
              x.sizes(), " does not match weight_t ", weight_t.sizes());
  TORCH_CHECK(x.scalar_type() == weight_t.scalar_type(), "rsparse_sparse_mm: x and weight_t dtypes differ");
  TORCH_CHECK(col_norm.scalar_type() == at::kFloat && col_norm.numel() == x.size(1), "col_norm must be float32 [in]");
  TORCH_CHECK(weight_t.is_contiguous() && col_norm.is_contiguous(), "weight_t and col_norm must be contiguous");
  auto xc = x.contiguous();
  const int64_t tokens = xc.size(0), in = xc.size(1), out = weight_t.size(1);
  auto y = torch::empty({tokens, out}, xc.options());
  if (rest.has_value()) {
    TORCH_CHECK(rest->is_contiguous() && rest->sizes() == xc.sizes() && rest->scalar_type() == xc.scalar_type(),
                "rest must be a contiguous tensor shaped and typed like x");
  }
  const float t = static_cast<float>(threshold);
  if (xc.scalar_type() == at::kBFloat16) {
    sparse_mm(xc.data_ptr<c10::BFloat16>(), weight_t.data_ptr<c10::BFloat16>(), col_norm.data_ptr<float>(), t,
              y.data_ptr<c10::BFloat16>(), rest.has_value() ? rest->data_ptr<c10::BFloat16>() : nullptr, tokens, in,
              out);
  } else {
    TORCH_CHECK(xc.scalar_type() == at::kFloat, "rsparse_sparse_mm supports bfloat16 and float32, got ",
                xc.scalar_type());
    sparse_mm(xc.data_ptr<float>(), weight_t.data_ptr<float>(), col_norm.data_ptr<float>(), t, y.data_ptr<float>(),
              rest.has_value() ? rest->data_ptr<float>() : nullptr, tokens, in, out);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rsparse_sparse_mm", &rsparse_sparse_mm, "R-Sparse exact-channel product reading only active rows of W^T");
}
