// Row-sparse (ELLPACK) × dense product on CPU: y[n, o] = Σ_t z[n, idx[o, t]] · val[o, t].
// Each output row streams its s stored values and indices once for the whole batch (they are
// the bytes that matter at decode). One token gathers 16 z entries per step; a batch reads
// z transposed ([k, N], float32, cache-resident) so each stored value updates up to 16 tokens
// with one contiguous load and one FMA (vector_rows.h). Indices are uint8 (k <= 256), int16 or int32. Built at
// first use by plugin/kernels/cpp.py, for the best ISA the compiler flags allow: AVX-512 (16 lanes, masked loads),
// else AVX2 + FMA (8 lanes, unmasked main loop and a scalar tail; AMD EPYC hosts have no AVX-512), else scalar.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vector_rows.h"

namespace {

using slimserve_rows::kIsa;
#if defined(SLIMSERVE_AVX2)
using slimserve_rows::load_values8;
using slimserve_rows::reduce_add8;
#endif

constexpr int64_t kMaxTokens = 16;  // accumulators per row kept in registers; larger batches loop

#if defined(__AVX512F__)
template <typename I> inline __m512i load_indices(const I* p, __mmask16 m) {
  if constexpr (std::is_same<I, uint8_t>::value) {
    // A full 16-byte load where 16 indices remain; the tail copies its few bytes (AVX-512F has no byte mask).
    if (m == (__mmask16)0xFFFF) return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    alignas(16) uint8_t tail[16] = {0};
    for (int i = 0; i < 16 && ((m >> i) & 1); ++i) tail[i] = p[i];
    return _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
  } else if constexpr (std::is_same<I, int16_t>::value) {
    return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, p));
  } else {
    return _mm512_maskz_loadu_epi32(m, p);
  }
}

template <typename V> inline __m512 load_values(const V* p, __mmask16 m) {
  if constexpr (std::is_same<V, float>::value) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}
#endif

#if defined(SLIMSERVE_AVX2)
// Eight indices widened to int32 and eight values widened to fp32 (bf16 is the high half of an fp32).
template <typename I> inline __m256i load_indices8(const I* p) {
  if constexpr (std::is_same<I, uint8_t>::value) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (std::is_same<I, int16_t>::value) {
    return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
}

#endif

template <typename V, typename I, typename O>
void ell_rows(const float* z, const V* values, const I* indices, O* y, int64_t tokens, int64_t atoms,
              int64_t out_features, int64_t nnz, int64_t row_begin, int64_t row_end) {
  for (int64_t o = row_begin; o < row_end; ++o) {
    const V* val = values + o * nnz;
    const I* idx = indices + o * nnz;
    for (int64_t n0 = 0; n0 < tokens; n0 += kMaxTokens) {
      const int64_t nt = std::min(kMaxTokens, tokens - n0);
      float sums[kMaxTokens];
#if defined(__AVX512F__)
      __m512 acc[kMaxTokens];
      for (int64_t n = 0; n < nt; ++n) acc[n] = _mm512_setzero_ps();
      for (int64_t t = 0; t < nnz; t += 16) {
        const __mmask16 m = nnz - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nnz - t)) - 1);
        const __m512i vi = load_indices(idx + t, m);
        const __m512 vv = load_values(val + t, m);
        for (int64_t n = 0; n < nt; ++n) {
          const __m512 vz = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, vi, z + (n0 + n) * atoms, 4);
          acc[n] = _mm512_fmadd_ps(vz, vv, acc[n]);
        }
      }
      for (int64_t n = 0; n < nt; ++n) sums[n] = _mm512_reduce_add_ps(acc[n]);
#elif defined(SLIMSERVE_AVX2)
      // One token at a time (this path serves a single token): 8-lane gathers, a scalar tail.
      const int64_t main = nnz / 8 * 8;
      for (int64_t n = 0; n < nt; ++n) {
        const float* zr = z + (n0 + n) * atoms;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 16 <= main; t += 16) {  // two chains: gathers are slow, keep two in flight
          acc0 = _mm256_fmadd_ps(_mm256_i32gather_ps(zr, load_indices8(idx + t), 4), load_values8(val + t), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_i32gather_ps(zr, load_indices8(idx + t + 8), 4), load_values8(val + t + 8),
                                 acc1);
        }
        if (t < main) acc0 = _mm256_fmadd_ps(_mm256_i32gather_ps(zr, load_indices8(idx + t), 4), load_values8(val + t), acc0);
        float s = reduce_add8(_mm256_add_ps(acc0, acc1));
        for (t = main; t < nnz; ++t) s += zr[idx[t]] * static_cast<float>(val[t]);
        sums[n] = s;
      }
#else
      for (int64_t n = 0; n < nt; ++n) {
        float s = 0.f;
        const float* zr = z + (n0 + n) * atoms;
        for (int64_t t = 0; t < nnz; ++t) s += zr[idx[t]] * static_cast<float>(val[t]);
        sums[n] = s;
      }
#endif
      for (int64_t n = 0; n < nt; ++n) y[(n0 + n) * out_features + o] = static_cast<O>(sums[n]);
    }
  }
}

template <typename V, typename I, typename O>
void ell_dispatch(const torch::Tensor& zf, const V* val, const I* idx, int64_t out_features, int64_t nnz, O* out) {
  const int64_t tokens = zf.size(0), atoms = zf.size(1);
#if defined(__AVX512F__) || defined(SLIMSERVE_AVX2)
  if (tokens > 1) {
    const auto zt = slimserve_rows::transposed_batch(zf);
    const float* zt_ptr = zt.data_ptr<float>();
    const int64_t ld = zt.size(1);
    at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
      slimserve_rows::batched_rows(zt_ptr, ld, val, nnz, out, tokens, out_features, begin, end, [&](int64_t o) {
        const I* row = idx + o * nnz;
        return [row, ld](int64_t t) { return static_cast<int64_t>(row[t]) * ld; };
      });
    });
    return;
  }
#endif
  const float* z = zf.data_ptr<float>();
  at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
    ell_rows(z, val, idx, out, tokens, atoms, out_features, nnz, begin, end);
  });
}

void check_args(const torch::Tensor& z, const torch::Tensor& values, const torch::Tensor& indices, const char* op) {
  TORCH_CHECK(z.dim() == 2 && values.dim() == 2 && indices.sizes() == values.sizes(), op,
              ": z [N, k], values and indices [out, s]");
  TORCH_CHECK(values.is_contiguous() && indices.is_contiguous(), op, ": values and indices must be contiguous");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16, op,
              ": values must be float32 or bfloat16");
  TORCH_CHECK(indices.scalar_type() == at::kByte || indices.scalar_type() == at::kShort ||
              indices.scalar_type() == at::kInt, op, ": indices must be uint8, int16 or int32");
}

// fn(indices' data) with its element type (uint8, int16 or int32, as check_args allows).
template <typename Fn>
void with_indices(const torch::Tensor& indices, const Fn& fn) {
  if (indices.scalar_type() == at::kByte) {
    fn(indices.data_ptr<uint8_t>());
  } else if (indices.scalar_type() == at::kShort) {
    fn(indices.data_ptr<int16_t>());
  } else {
    fn(indices.data_ptr<int32_t>());
  }
}

// Rows first + begin .. first + end of C as dense float32 rows (zeroed here) at rows begin .. end of `strip`.
template <typename V, typename I>
void ell_rows_to_dense(const V* values, const I* indices, float* strip, int64_t atoms, int64_t nnz, int64_t first,
                       int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float* row = strip + r * atoms;
    std::memset(row, 0, sizeof(float) * atoms);
    const V* val = values + (first + r) * nnz;
    const I* idx = indices + (first + r) * nnz;
    for (int64_t t = 0; t < nnz; ++t) row[idx[t]] = static_cast<float>(val[t]);
  }
}

}  // namespace

torch::Tensor ell_matmul(torch::Tensor z, torch::Tensor values, torch::Tensor indices) {
  check_args(z, values, indices, "ell_matmul");
  auto zf = z.to(at::kFloat).contiguous();
  auto y = torch::empty({z.size(0), values.size(0)}, values.options().dtype(slimserve_rows::output_dtype(z)));
  with_indices(indices, [&](const auto* idx) {
    slimserve_rows::with_value_types(values, y, [&](const auto* val, auto* out) {
      ell_dispatch(zf, val, idx, values.size(0), values.size(1), out);
    });
  });
  return y;
}

// y [N, out] float32 = z · Cᵀ for many tokens (prefill), on strips of C expanded in cache (vector_rows.h).
torch::Tensor ell_matmul_strips(torch::Tensor z, torch::Tensor values, torch::Tensor indices) {
  check_args(z, values, indices, "ell_matmul_strips");
  const int64_t atoms = z.size(1), nnz = values.size(1);
  return slimserve_rows::strips_gemm(z, values.size(0), at::kFloat,
                                     [&](torch::Tensor& strip, int64_t first, int64_t begin, int64_t end) {
    with_indices(indices, [&](const auto* idx) {
      if (values.scalar_type() == at::kBFloat16) {
        ell_rows_to_dense(values.data_ptr<c10::BFloat16>(), idx, strip.data_ptr<float>(), atoms, nnz, first, begin, end);
      } else {
        ell_rows_to_dense(values.data_ptr<float>(), idx, strip.data_ptr<float>(), atoms, nnz, first, begin, end);
      }
    });
  });
}

#if defined(SLIMSERVE_PANELS)
// y [N, out] float32 = z · Cᵀ for many tokens, multiplying only the stored values (vector_rows.h).
torch::Tensor ell_matmul_kept(torch::Tensor z, torch::Tensor values, torch::Tensor indices) {
  check_args(z, values, indices, "ell_matmul_kept");
  const int64_t nnz = values.size(1);
  return slimserve_rows::panel_product(z, values.size(0), nnz, [&](int64_t o, int32_t* cols, float* w) {
    with_indices(indices, [&](const auto* idx) {
      for (int64_t t = 0; t < nnz; ++t) cols[t] = static_cast<int32_t>(idx[o * nnz + t]) * slimserve_rows::kPanelTokens;
    });
    slimserve_rows::widen_row(values, o, w);
  });
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ell_matmul_strips", &ell_matmul_strips,
        "y = z · Cᵀ (float32) for many tokens: strips of C expanded in cache, each multiplied by a dense GEMM");
#if defined(SLIMSERVE_PANELS)
  m.def("ell_matmul_kept", &ell_matmul_kept,
        "y = z · Cᵀ (float32) for many tokens, multiplying only the stored values (AVX2 builds)");
#endif
  m.def("ell_matmul", &ell_matmul, "y = z · Cᵀ for row-sparse C stored as ELLPACK values + indices");
  m.def("isa", [] { return std::string(kIsa); }, "the instruction set this build's inner loops use");
}
