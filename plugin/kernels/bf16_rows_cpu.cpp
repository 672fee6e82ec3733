// y [N, out] float32 = x [N, in] float32 · Wᵀ for a dense weight W [out, in] kept in bf16 on a host that serves
// float32 (AVX2 only: no bf16 arithmetic, so vLLM loads a bf16 checkpoint into float32 buffers). Used for the dense
// factors of the compressed schemes (low-rank U and V, the dictionary of dictsparse, the low-rank part of
// lowrank_sparse) where their values are bf16 numbers (plugin/kernels/precision.py): widening bf16 to float32 is a
// 16-bit shift, exact, so the product is the float32 product of the same numbers, and a memory-bound decode step
// streams half the bytes of vLLM's float32 copy.
//
// Few tokens (decode): blocks of 4 rows, each row's 8 inputs at a time widened once and multiplied with 2 tokens'
// inputs (8 accumulators in registers); the block's rows (4 · in · 2 bytes, 16 KiB at in = 2048) stay in L1 while
// further pairs of tokens pass over them, so memory moves each weight byte once a call. Many tokens (prefill): rows
// widened to float32 in cache and multiplied by a dense GEMM (strips_gemm in vector_rows.h: on AVX2 builds its
// register-tiled tile_gemm).
// Built at first use by plugin/kernels/cpp.py: AVX2 + FMA loops on AVX2 builds, scalar loops elsewhere (only AVX2
// hosts keep dense factors in bf16; other builds exist so the arithmetic is tested everywhere).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#include "vector_rows.h"

namespace {

using slimserve_rows::kIsa;
#if defined(SLIMSERVE_AVX2)
using slimserve_rows::load_values8;
using slimserve_rows::reduce_add8;
#endif

constexpr int64_t kBlockRows = 4;

// y[n, o0 + r] for kRows rows from o0 and NT tokens from x (row-major [NT, in]; y row stride `out`). The
// accumulators are indexed by constants only, so they stay in registers (kRows · NT of them, at most 8).
template <int kRows, int NT>
void rows_times_tokens(const float* x, int64_t in, const c10::BFloat16* w, int64_t o0, float* y, int64_t out) {
  const int64_t main = in / 8 * 8;
  float sums[kRows][NT];
#if defined(SLIMSERVE_AVX2)
  __m256 acc[kRows][NT];
  for (int r = 0; r < kRows; ++r) {
    for (int n = 0; n < NT; ++n) acc[r][n] = _mm256_setzero_ps();
  }
  for (int64_t j = 0; j < main; j += 8) {
    __m256 xv[NT];
    for (int n = 0; n < NT; ++n) xv[n] = _mm256_loadu_ps(x + n * in + j);
    for (int r = 0; r < kRows; ++r) {
      const __m256 wv = load_values8(w + (o0 + r) * in + j);
      for (int n = 0; n < NT; ++n) acc[r][n] = _mm256_fmadd_ps(wv, xv[n], acc[r][n]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int n = 0; n < NT; ++n) sums[r][n] = reduce_add8(acc[r][n]);
  }
#else
  for (int r = 0; r < kRows; ++r) {
    for (int n = 0; n < NT; ++n) {
      float s = 0.f;
      for (int64_t j = 0; j < main; ++j) s += static_cast<float>(w[(o0 + r) * in + j]) * x[n * in + j];
      sums[r][n] = s;
    }
  }
#endif
  for (int r = 0; r < kRows; ++r) {
    for (int n = 0; n < NT; ++n) {
      float s = sums[r][n];
      for (int64_t j = main; j < in; ++j) s += static_cast<float>(w[(o0 + r) * in + j]) * x[n * in + j];
      y[n * out + o0 + r] = s;
    }
  }
}

// Rows [o0, o0 + kRows) for every token: pairs of tokens, then a last single one, over the same rows (in L1).
template <int kRows>
void rows_all_tokens(const float* x, int64_t tokens, int64_t in, const c10::BFloat16* w, int64_t o0, float* y, int64_t out) {
  int64_t n = 0;
  for (; n + 2 <= tokens; n += 2) rows_times_tokens<kRows, 2>(x + n * in, in, w, o0, y + n * out, out);
  if (n < tokens) rows_times_tokens<kRows, 1>(x + n * in, in, w, o0, y + n * out, out);
}

void check_args(const torch::Tensor& x, const torch::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), op,
              ": x [N, in] and weight [out, in] must agree on in");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(), op,
              ": x must be float32 and weight contiguous bfloat16");
}

}  // namespace

// y = x · weightᵀ (float32) for few tokens, weight streamed once as bf16.
torch::Tensor bf16_rows_linear(torch::Tensor x, torch::Tensor weight) {
  check_args(x, weight, "bf16_rows_linear");
  const auto xc = x.contiguous();
  const int64_t tokens = xc.size(0), in = xc.size(1), out = weight.size(0);
  auto y = torch::empty({tokens, out}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const c10::BFloat16* w = weight.data_ptr<c10::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = out / kBlockRows;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) rows_all_tokens<kBlockRows>(xp, tokens, in, w, b * kBlockRows, yp, out);
  });
  for (int64_t o = blocks * kBlockRows; o < out; ++o) rows_all_tokens<1>(xp, tokens, in, w, o, yp, out);
  return y;
}

// y = x · weightᵀ (float32) for many tokens: strips of rows widened to float32 in cache, a GEMM each.
torch::Tensor bf16_rows_linear_strips(torch::Tensor x, torch::Tensor weight) {
  check_args(x, weight, "bf16_rows_linear_strips");
  return slimserve_rows::strips_gemm(x, weight.size(0), at::kFloat,
                                     [&](torch::Tensor& strip, int64_t first, int64_t begin, int64_t end) {
    float* rows = strip.data_ptr<float>();
    for (int64_t r = begin; r < end; ++r) slimserve_rows::widen_row(weight, first + r, rows + r * strip.size(1));
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_rows_linear", &bf16_rows_linear, "y = x · Wᵀ (float32) for few tokens, W streamed as bf16");
  m.def("bf16_rows_linear_strips", &bf16_rows_linear_strips,
        "y = x · Wᵀ (float32) for many tokens: strips of W widened to float32 in cache, each multiplied by a dense GEMM");
  m.def("isa", [] { return std::string(kIsa); }, "the instruction set this build's inner loops use");
}
