// y [N, out] float32 = x [N, in] float32 · Wᵀ for a dense weight W [out, in] kept in bf16 on a host that serves
// float32 (AVX2 only: no bf16 arithmetic, so vLLM loads a bf16 checkpoint into float32 buffers). Used for the dense
// factors of the compressed schemes (low-rank U and V, the dictionary of dictsparse, the low-rank part of
// lowrank_sparse) where their values are bf16 numbers (plugin/kernels/precision.py): widening bf16 to float32 is a
// 16-bit shift, exact, so the product is the float32 product of the same numbers, and a memory-bound decode step
// streams half the bytes of vLLM's float32 copy.
//
// W is stored as panels of kPanelRows rows side by side ([ceil(out / 16), in, 16], rows past `out` zero; packed once
// at load by plugin/kernels/gemm.py), so one input's 16 weights are one contiguous 32-byte run. Within a panel rows
// 4-7 and 8-11 trade places (panel_position), so that interleaving the 32 bytes with zeros (vpunpcklwd / vpunpckhwd,
// which work within 128-bit halves) widens them into rows 0-7 and 8-15 in order: one load and two shuffles per input
// where two widening loads and two shifts took twice the shuffle-port work. Few tokens (decode): each panel's 16
// outputs are two registers per token, and per input the panel's two widened vectors meet each of up to 6 tokens'
// broadcast input in 12 FMAs; no horizontal sums, no input tail. Dotting rows instead (4 rows x 2 tokens, one
// horizontal sum per row and token, a scalar tail past the last 8 inputs) ran 1.7x slower on [5632, 2048] and
// 2.3-2.5x on the tall low-rank U factors whose inputs are a rank of 64-315 (AMD EPYC Zen 2, 8 tokens, ms rows /
// panels: [5632, 2048] 1.95 / 1.14, [5632, 315] 0.41 / 0.16, [1536, 87] 0.067 / 0.029). The same loop serves prefill
// too, ahead of the tiled GEMM, except for short panels (a low-rank U, few inputs): those take
// bf16_panels_linear_strips from plugin/kernels/gemm.py's crossover, the panels widened to float32 in cache as the W
// panels of slimserve's register-tiled GEMM (tile_gemm_panels in vector_rows.h) on AVX2 builds; other builds gather
// rows into strips for ATen's GEMM.
// Built at first use by plugin/kernels/cpp.py: AVX2 + FMA loops on AVX2 builds, scalar loops elsewhere (only AVX2
// hosts keep dense factors in bf16 panels; other builds exist so the arithmetic is tested everywhere). Builds with
// AVX512_BF16 also carry bf16_rows_linear: bf16 factors served in bf16, kept as plain rows (see there).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>

#include "vector_rows.h"

namespace {

using slimserve_rows::kIsa;

constexpr int64_t kPanelRows = 16;
// Tokens one pass over a panel multiplies: 6 x 2 accumulators, the panel's two vectors and a broadcast fill the 16
// registers. Measured against passes of 4 (AMD EPYC Zen 2, 24 tokens, ms a token): [5632, 2048] 0.135 against 0.193,
// [5632, 315] 0.018 against 0.025.
constexpr int kPassTokens = 6;

// Where row r of a panel is stored: bits 2 and 3 of r swapped (rows 4-7 and 8-11 trade places; see above).
inline int64_t panel_position(int64_t r) { return (r & ~int64_t{12}) | ((r & 4) << 1) | ((r & 8) >> 1); }

#if defined(SLIMSERVE_AVX2)
static_assert(kPanelRows == slimserve_rows::kTileRows, "the panels are tile_gemm's W panels");

// One input's 16 stored weights (32 bytes at p) as rows 0-7 (low) and 8-15 (high) in float32.
inline void widen_panel_input(const c10::BFloat16* p, __m256& low, __m256& high) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), raw));
  high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), raw));
}
#endif

// y[n, o0 .. o0 + 16) (of `out` columns, row stride ldy; set, or added to with `accumulate`) for NT tokens of x
// ([NT, in] at row stride ldx) from one panel ([in, 16]). Fewer than 4 tokens split the inputs over kChains
// accumulator sets, so at least 8 FMA chains are in flight. Accumulators are named arrays indexed by unrolled
// constants: with a two-dimensional array GCC stored all twelve to the stack on every input (store-bound, 2x slower).
template <int NT>
void panel_times_tokens(const float* x, int64_t ldx, int64_t in, const c10::BFloat16* panel, float* y, int64_t ldy,
                        int64_t out, int64_t o0, bool accumulate) {
  const int64_t valid = std::min(kPanelRows, out - o0);
  alignas(32) float sums[NT][kPanelRows];
#if defined(SLIMSERVE_AVX2)
  constexpr int kChains = NT >= 4 ? 1 : 4 / NT;
  __m256 lo[kChains * NT], hi[kChains * NT];
#pragma GCC unroll 8
  for (int a = 0; a < kChains * NT; ++a) lo[a] = hi[a] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kChains <= in; j += kChains) {
#pragma GCC unroll 4
    for (int c = 0; c < kChains; ++c) {
      __m256 w0, w1;
      widen_panel_input(panel + (j + c) * kPanelRows, w0, w1);
#pragma GCC unroll 8
      for (int n = 0; n < NT; ++n) {
        const __m256 xb = _mm256_broadcast_ss(x + n * ldx + j + c);
        lo[c * NT + n] = _mm256_fmadd_ps(w0, xb, lo[c * NT + n]);
        hi[c * NT + n] = _mm256_fmadd_ps(w1, xb, hi[c * NT + n]);
      }
    }
  }
  for (; j < in; ++j) {
    __m256 w0, w1;
    widen_panel_input(panel + j * kPanelRows, w0, w1);
#pragma GCC unroll 8
    for (int n = 0; n < NT; ++n) {
      const __m256 xb = _mm256_broadcast_ss(x + n * ldx + j);
      lo[n] = _mm256_fmadd_ps(w0, xb, lo[n]);
      hi[n] = _mm256_fmadd_ps(w1, xb, hi[n]);
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < NT; ++n) {
    __m256 low = lo[n], high = hi[n];
    for (int c = 1; c < kChains; ++c) {
      low = _mm256_add_ps(low, lo[c * NT + n]);
      high = _mm256_add_ps(high, hi[c * NT + n]);
    }
    _mm256_store_ps(sums[n], low);
    _mm256_store_ps(sums[n] + 8, high);
  }
#else
  for (int n = 0; n < NT; ++n) {
    for (int64_t r = 0; r < kPanelRows; ++r) {
      float s = 0.f;
      const c10::BFloat16* weights = panel + panel_position(r);
      for (int64_t j = 0; j < in; ++j) s += static_cast<float>(weights[j * kPanelRows]) * x[n * ldx + j];
      sums[n][r] = s;
    }
  }
#endif
  for (int n = 0; n < NT; ++n) {
    float* row = y + n * ldy + o0;
    if (accumulate) {
      for (int64_t r = 0; r < valid; ++r) row[r] += sums[n][r];
    } else {
      std::memcpy(row, sums[n], sizeof(float) * valid);
    }
  }
}

// y [tokens, out] (row stride ldy; set, or added to) = x [tokens, in] (row stride ldx) · Wᵀ for W's panel_count
// panels at w, the panels split over the threads.
void panels_times_tokens(const float* x, int64_t ldx, int64_t tokens, int64_t in, const c10::BFloat16* w,
                         int64_t panel_count, float* y, int64_t ldy, int64_t out, bool accumulate) {
  at::parallel_for(0, panel_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const c10::BFloat16* panel = w + p * in * kPanelRows;
      const int64_t o0 = p * kPanelRows;
      int64_t n = 0;
      for (; n + kPassTokens <= tokens; n += kPassTokens) {
        panel_times_tokens<kPassTokens>(x + n * ldx, ldx, in, panel, y + n * ldy, ldy, out, o0, accumulate);
      }
      const float* xn = x + n * ldx;
      float* yn = y + n * ldy;
      switch (tokens - n) {
        case 1: panel_times_tokens<1>(xn, ldx, in, panel, yn, ldy, out, o0, accumulate); break;
        case 2: panel_times_tokens<2>(xn, ldx, in, panel, yn, ldy, out, o0, accumulate); break;
        case 3: panel_times_tokens<3>(xn, ldx, in, panel, yn, ldy, out, o0, accumulate); break;
        case 4: panel_times_tokens<4>(xn, ldx, in, panel, yn, ldy, out, o0, accumulate); break;
        case 5: panel_times_tokens<5>(xn, ldx, in, panel, yn, ldy, out, o0, accumulate); break;
        default: break;
      }
    }
  });
}

void check_panels(const torch::Tensor& panels, int64_t in, int64_t out, const char* op) {
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == in && panels.size(2) == kPanelRows &&
              panels.size(0) == (out + kPanelRows - 1) / kPanelRows, op, ": panels must be [ceil(out / 16), in, 16] "
              "for in = ", in, " and out = ", out);
  TORCH_CHECK(panels.scalar_type() == at::kBFloat16 && panels.is_contiguous(), op,
              ": panels must be contiguous bfloat16");
}

void check_args(const torch::Tensor& x, const torch::Tensor& panels, int64_t out, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be float32 [N, in]");
  check_panels(panels, x.size(1), out, op);
}

#if defined(SLIMSERVE_AVX2)
// tile_gemm_panels' fill: W's panels (bf16 at w, `in` inputs) widened to float32 panels in cache.
inline auto widened_panels(const c10::BFloat16* w, int64_t in) {
  return [w, in](float* b_panels, int64_t first, int64_t row_panels) {
    const c10::BFloat16* src = w + first / kPanelRows * in * kPanelRows;
    for (int64_t i = 0; i < row_panels * in * kPanelRows; i += kPanelRows) {
      __m256 low, high;
      widen_panel_input(src + i, low, high);
      _mm256_storeu_ps(b_panels + i, low);
      _mm256_storeu_ps(b_panels + i + 8, high);
    }
  };
}
#endif

// y [tokens, out] (row stride ldy; set, or added to) = x · Wᵀ for x = columns column .. column + in of `source`
// (float32, unit column stride) and W's panels: the tiled GEMM on the panels widened in cache where `strips` (AVX2
// builds), else the panels loop; both read x's columns in place (the loop without even a view: a few-token call is
// a few microseconds).
void panels_product_into(const torch::Tensor& source, int64_t column, int64_t in, const torch::Tensor& panels,
                         int64_t out, float* y, int64_t ldy, bool accumulate, bool strips) {
  const c10::BFloat16* w = panels.data_ptr<c10::BFloat16>();
#if defined(SLIMSERVE_AVX2)
  if (strips) {
    slimserve_rows::tile_gemm_panels_into(source.narrow(1, column, in), out, widened_panels(w, in), y, ldy,
                                          accumulate);
    return;
  }
#endif
  panels_times_tokens(source.data_ptr<float>() + column, source.stride(0), source.size(0), in, w, panels.size(0), y,
                      ldy, out, accumulate);
}

}  // namespace

// y = x · Wᵀ (float32) for few tokens, W's panels streamed once per 6 tokens as bf16.
torch::Tensor bf16_panels_linear(torch::Tensor x, torch::Tensor panels, int64_t out) {
  check_args(x, panels, out, "bf16_panels_linear");
  const auto xc = x.contiguous();
  const int64_t tokens = xc.size(0), in = xc.size(1);
  auto y = torch::empty({tokens, out}, xc.options());
  panels_times_tokens(xc.data_ptr<float>(), in, tokens, in, panels.data_ptr<c10::BFloat16>(), panels.size(0),
                      y.data_ptr<float>(), out, out, false);
  return y;
}

namespace {

// y [N, Σ outs] (set, or added to where `accumulate`) = (x Vᵀ)[:, slice i] · Uᵢᵀ into columns of U i, for V's
// panels and each U's (inputs: its rank, its slice of x Vᵀ, in order), each product written straight into its
// columns (no separate sum, no concatenation). A factor with fewer than `strips_below_inputs` inputs takes the tiled
// GEMM (bf16_panels_linear's many-token rule; 0 keeps every factor on the panels loop).
void lowrank_panels_into(const torch::Tensor& x, const torch::Tensor& v_panels,
                         const std::vector<torch::Tensor>& u_panels, const std::vector<int64_t>& u_outs,
                         int64_t rank, torch::Tensor& y, bool accumulate, int64_t strips_below_inputs) {
  const auto xc = x.contiguous();
  const int64_t width = y.size(1);
  auto z = torch::empty({x.size(0), rank}, x.options());
  panels_product_into(xc, 0, xc.size(1), v_panels, rank, z.data_ptr<float>(), rank, false,
                      xc.size(1) < strips_below_inputs);
  int64_t start = 0, column = 0;
  for (size_t i = 0; i < u_panels.size(); ++i) {
    const int64_t part = u_panels[i].size(1);
    panels_product_into(z, start, part, u_panels[i], u_outs[i], y.data_ptr<float>() + column, width, accumulate,
                        part < strips_below_inputs);
    start += part;
    column += u_outs[i];
  }
}

// The rank (Σ U inputs) and output width (Σ outs) of a low-rank layer on panels, its factors checked.
std::pair<int64_t, int64_t> check_lowrank_panels(const torch::Tensor& x, const torch::Tensor& v_panels,
                                                 const std::vector<torch::Tensor>& u_panels,
                                                 const std::vector<int64_t>& u_outs, const char* op) {
  TORCH_CHECK(u_panels.size() == u_outs.size() && !u_panels.empty(), op, ": one output width per U panels");
  int64_t rank = 0, width = 0;
  for (size_t i = 0; i < u_panels.size(); ++i) {
    check_panels(u_panels[i], u_panels[i].size(1), u_outs[i], op);
    rank += u_panels[i].size(1);
    width += u_outs[i];
  }
  check_args(x, v_panels, rank, op);
  return {rank, width};
}

}  // namespace

// y [N, Σ outs] += the low-rank products: a lowrank_sparse layer's low-rank part added onto its sparse product in
// one call (plugin/kernels/lowrank_sparse.py).
void bf16_panels_lowrank_add(torch::Tensor x, torch::Tensor v_panels, std::vector<torch::Tensor> u_panels,
                             std::vector<int64_t> u_outs, torch::Tensor y, int64_t strips_below_inputs) {
  const auto [rank, width] = check_lowrank_panels(x, v_panels, u_panels, u_outs, "bf16_panels_lowrank_add");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 && y.size(0) == x.size(0) &&
              y.size(1) == width, "bf16_panels_lowrank_add: y must be contiguous float32 [N, sum(u_outs)]");
  lowrank_panels_into(x, v_panels, u_panels, u_outs, rank, y, true, strips_below_inputs);
}

// y [N, Σ outs] = (x Vᵀ) Uᵢᵀ per U into its columns: a low-rank layer (one shard, or a fused layer's V stacked and
// its U's) on one call where the host serves float32 and keeps the factors as bf16 panels (plugin/kernels/gemm.py,
// LowRankPanels).
torch::Tensor bf16_panels_lowrank(torch::Tensor x, torch::Tensor v_panels, std::vector<torch::Tensor> u_panels,
                                  std::vector<int64_t> u_outs, int64_t strips_below_inputs) {
  const auto [rank, width] = check_lowrank_panels(x, v_panels, u_panels, u_outs, "bf16_panels_lowrank");
  auto y = torch::empty({x.size(0), width}, x.options());
  lowrank_panels_into(x, v_panels, u_panels, u_outs, rank, y, false, strips_below_inputs);
  return y;
}

// y = x · Wᵀ (float32) for many tokens: the panels widened to float32 in cache, multiplied by a dense GEMM.
torch::Tensor bf16_panels_linear_strips(torch::Tensor x, torch::Tensor panels, int64_t out) {
  check_args(x, panels, out, "bf16_panels_linear_strips");
  const int64_t in = panels.size(1);
  const c10::BFloat16* w = panels.data_ptr<c10::BFloat16>();
#if defined(SLIMSERVE_AVX2)
  return slimserve_rows::tile_gemm_panels(x, out, widened_panels(w, in));
#else
  return slimserve_rows::strips_gemm(x, out, at::kFloat,
                                     [&](torch::Tensor& strip, int64_t first, int64_t begin, int64_t end) {
    float* rows = strip.data_ptr<float>();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = first + r;
      const c10::BFloat16* panel = w + o / kPanelRows * in * kPanelRows + panel_position(o % kPanelRows);
      for (int64_t j = 0; j < in; ++j) rows[r * in + j] = static_cast<float>(panel[j * kPanelRows]);
    }
  });
#endif
}

#if defined(SLIMSERVE_DPBF16)
// y [N, out] bf16 = x [N, in] · Wᵀ for bf16 x and a dense bf16 W [out, in] stored as plain rows, on the bf16 dot
// loops the bitmask kernel runs (each row's spans loaded as they are instead of expanded under a mask): on CPUs with
// AVX512_BF16 and no tile unit (AMD Zen 4) they beat vLLM's prepacked oneDNN GEMM at one and two tokens, whose
// few-token path reads the weight more slowly than its own 4-token GEMM does. AMD EPYC (Zen 4), 2 threads, the six
// low-rank factors of the Llama 2048/5632 layer at 30 % of bytes (V [716, 2048], U [2048, 716], V [1051, 2048],
// U [5632, 1051], V [1051, 5632], U [2048, 1051]), each streamed from memory, summed ms oneDNN / this, two runs:
// 1 token 1.45-1.72 / 0.89-1.29, 2 tokens 1.70-1.84 / 1.22-1.41, 4 1.27-1.47 / 1.31-1.42, 8 1.58-1.74 / 1.54-1.59,
// 16 2.16-2.19 / 2.45-2.74, 32 3.61-3.63 / 4.03-4.49, 64 6.43-7.06 / 7.15-8.08; at 128, where plugin/kernels/gemm.py
// takes ATen's GEMM on the same rows, 12.1-12.7 / 14.0-15.1.
torch::Tensor bf16_rows_linear(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) &&
              x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "bf16_rows_linear: x [N, in] and a contiguous weight [out, in], both bfloat16");
  const auto xc = x.contiguous();
  const int64_t out = weight.size(0);
  auto y = torch::empty({xc.size(0), out}, xc.options());
  slimserve_rows::dense_rows(slimserve_rows::padded_in_scratch(xc),
                             reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>()), out,
                             slimserve_rows::bf16_store(reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()), out));
  return y;
}

// y [N, Σ outs] bf16 = (x Vᵀ) Uᵢᵀ per shard into its columns, for a low-rank layer (one shard, or a fused
// layer's q/k/v or gate/up: V stacked row-wise, shard i's U reading its slice of x Vᵀ, in order), every factor as
// plain bf16 rows on bf16_rows_linear's dot loops. The same products, rounded as one call per factor rounds them
// (x Vᵀ in bf16 between them), in one call where a fused layer took one per factor and a slice, a copy and a store
// per U, each a trip through the dispatcher (plugin/kernels/gemm.py, LowRankRows).
torch::Tensor bf16_rows_lowrank(torch::Tensor x, torch::Tensor v, std::vector<torch::Tensor> us) {
  std::vector<int64_t> ranks, outs;
  for (const auto& u : us) {
    TORCH_CHECK(u.dim() == 2 && u.scalar_type() == at::kBFloat16 && u.is_contiguous(),
                "bf16_rows_lowrank: every U must be a contiguous bfloat16 [out, rank]");
    ranks.push_back(u.size(1));
    outs.push_back(u.size(0));
  }
  TORCH_CHECK(!us.empty() && x.dim() == 2 && v.dim() == 2 && x.size(1) == v.size(1) &&
              v.size(0) == std::accumulate(ranks.begin(), ranks.end(), int64_t{0}) &&
              x.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && v.is_contiguous(),
              "bf16_rows_lowrank: x [N, in] and a contiguous V [Σ ranks, in], both bfloat16");
  const auto rows = [](const torch::Tensor& w) {
    return reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  };
  const auto u_product = [&](size_t i, const slimserve_rows::PaddedTokens& z, const auto& store) {
    slimserve_rows::dense_rows(z, rows(us[i]), outs[i], store);
  };
  return slimserve_rows::first_rows_then_shards(x, rows(v), ranks, outs, u_product);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_panels_linear", &bf16_panels_linear,
        "y = x · Wᵀ (float32) for few tokens, W stored as bf16 panels [ceil(out / 16), in, 16]");
  m.def("bf16_panels_linear_strips", &bf16_panels_linear_strips,
        "y = x · Wᵀ (float32) for many tokens: W's panels widened to float32 in cache, multiplied by a dense GEMM");
  m.def("bf16_panels_lowrank_add", &bf16_panels_lowrank_add,
        "y += (x Vᵀ) Uᵢᵀ per U into its columns, V and every U stored as bf16 panels");
  m.def("bf16_panels_lowrank", &bf16_panels_lowrank,
        "y = (x Vᵀ) Uᵢᵀ per U into its columns (float32), V and every U stored as bf16 panels");
  m.def("isa", [] { return std::string(kIsa); }, "the instruction set this build's inner loops use");
#if defined(SLIMSERVE_DPBF16)
  m.def("bf16_rows_linear", &bf16_rows_linear,
        "y = x · Wᵀ (bf16) for few bf16 tokens, W stored as plain bf16 rows, on the bf16 dot loops");
  m.def("bf16_rows_lowrank", &bf16_rows_lowrank,
        "y = (x Vᵀ) Uᵢᵀ per U into its columns (bf16), for few bf16 tokens, every factor as plain bf16 rows");
#endif
}
