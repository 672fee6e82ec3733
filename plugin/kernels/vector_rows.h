// What slimserve's CPU kernels share (ell_cpu.cpp, bitmask_cpu.cpp, nm_cpu.cpp, rsparse_cpu.cpp): which instruction
// set a build's loops use, the batched row loop of the row-sparse encodings, and the two many-token roads: strips
// of a decoded weight through a dense GEMM (on AVX2 slimserve's register-tiled one, elsewhere ATen's), and (AVX2) a
// loop over the stored values only on panels of tokens; and
// (AVX512_BF16) the bf16 dot-product loop over expanded spans. One place, so an ISA rule or a tuning measured on one
// kernel holds for all of them.
//
// The ISA is chosen at compile time from the flags plugin/kernels/cpp.py passes: AVX-512 (16 fp32 lanes), else
// AVX2 + FMA (8 lanes; AMD EPYC hosts have no AVX-512), else scalar loops.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define SLIMSERVE_AVX2 1
#endif

namespace slimserve_rows {

// f(0) .. f(7) with each index a compile-time constant: the few-token row loops unroll a row's next 8 mask or offsets
// bytes and pick their accumulator set by the byte's place, so the index must be known where the code is generated
// (an accumulator array indexed at run time went to the stack, every FMA waiting on a store-to-load trip).
template <typename F, int... K> inline void each_of(std::integer_sequence<int, K...>, F&& f) {
  (f(std::integral_constant<int, K>{}), ...);
}
template <typename F> inline void each_of_8(F&& f) { each_of(std::make_integer_sequence<int, 8>{}, f); }

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
#elif defined(SLIMSERVE_AVX2)
constexpr const char* kIsa = "avx2";
#else
constexpr const char* kIsa = "scalar";
#endif

#if defined(SLIMSERVE_AVX2)
// Eight values widened to fp32 (bf16 is the high half of an fp32, so widening is a 16-bit shift, exact).
template <typename V> inline __m256 load_values8(const V* p) {
  if constexpr (std::is_same<V, float>::value) {
    return _mm256_loadu_ps(p);
  } else {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
}

inline float reduce_add8(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}
#endif

// The vpshufb control that places packed bf16 values into 8 float32 lanes: lane i takes packed value
// value_of_lane[i] (its two bytes to the lane's high half: widening bf16 is exact that way) or zero where it is
// negative. The packed bytes must sit in both 128-bit halves (vpshufb works within each half), so one in-lane shuffle
// places, widens and zeros, where a widening load, a shift, a cross-lane permute and a blend did the same.
inline void bf16_placing_control(const int value_of_lane[8], int8_t control[32]) {
  for (int i = 0; i < 8; ++i) {
    const int value = value_of_lane[i];
    control[4 * i] = control[4 * i + 1] = -128;  // -128: vpshufb writes a zero byte
    control[4 * i + 2] = value < 0 ? -128 : static_cast<int8_t>(2 * value);
    control[4 * i + 3] = value < 0 ? -128 : static_cast<int8_t>(2 * value + 1);
  }
}

// The row length of a batch's transposed activations zt ([k, ld] float32, padding columns zero), which is also how
// many tokens one pass over a row multiplies: 16 (one AVX-512 register, two AVX2 halves), except that AVX2 takes up
// to 8 tokens in one register, so an 8-token decode step does one FMA per stored value, not two with half the lanes
// padding. Past 8 tokens AVX2 keeps 16 a pass: two passes of 8 read each zt cache line twice and were slower
// (bitmask 6.0 vs 4.4 ms at 16 tokens on an AMD EPYC).
inline int64_t batch_width(int64_t tokens) {
#if defined(SLIMSERVE_AVX2)
  return tokens <= 8 ? 8 : (tokens + 15) / 16 * 16;
#else
  return (tokens + 15) / 16 * 16;
#endif
}

// A batch of a row-sparse weight: y[n, o] = Σ_i values[o, i] · zt[column(o, i), n]. Each row's nnz stored values
// are read once per pass of min(ld, 16) tokens and each is broadcast against that many tokens of its column with
// one aligned load and one FMA (two chains hide the FMA latency). `row_offsets(o)` prepares row o and returns
// `offset(i)`, the zt offset (column · ld) of its stored value i: ELL reads its index, the bitmask kernel decodes
// the row's mask once into a buffer. y is float32 or bf16 whatever the values are (see output_dtype).
template <typename V, typename O, typename RowOffsets>
void batched_rows(const float* zt, int64_t ld, const V* values, int64_t nnz, O* y, int64_t tokens,
                  int64_t out_features, int64_t row_begin, int64_t row_end, const RowOffsets& row_offsets) {
  const int64_t step = std::min<int64_t>(ld, 16);
  for (int64_t o = row_begin; o < row_end; ++o) {
    const V* val = values + o * nnz;
    const auto offset = row_offsets(o);
    for (int64_t n0 = 0; n0 < tokens; n0 += step) {
      const int64_t nt = std::min<int64_t>(step, tokens - n0);
      alignas(64) float sums[16] = {};
      const float* base = zt + n0;
#if defined(__AVX512F__)
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t i = 0;
      for (; i + 1 < nnz; i += 2) {
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(val[i])), _mm512_load_ps(base + offset(i)), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(val[i + 1])), _mm512_load_ps(base + offset(i + 1)),
                               acc1);
      }
      if (i < nnz) {
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(val[i])), _mm512_load_ps(base + offset(i)), acc0);
      }
      _mm512_store_ps(sums, _mm512_add_ps(acc0, acc1));
#elif defined(SLIMSERVE_AVX2)
      if (step == 8) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 1 < nnz; i += 2) {
          acc0 = _mm256_fmadd_ps(_mm256_set1_ps(static_cast<float>(val[i])), _mm256_load_ps(base + offset(i)), acc0);
          acc1 = _mm256_fmadd_ps(_mm256_set1_ps(static_cast<float>(val[i + 1])), _mm256_load_ps(base + offset(i + 1)),
                                 acc1);
        }
        if (i < nnz) {
          acc0 = _mm256_fmadd_ps(_mm256_set1_ps(static_cast<float>(val[i])), _mm256_load_ps(base + offset(i)), acc0);
        }
        _mm256_store_ps(sums, _mm256_add_ps(acc0, acc1));
      } else {
        __m256 lo0 = _mm256_setzero_ps(), hi0 = _mm256_setzero_ps(), lo1 = _mm256_setzero_ps(),
               hi1 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 1 < nnz; i += 2) {
          const float* z0 = base + offset(i);
          const float* z1 = base + offset(i + 1);
          const __m256 v0 = _mm256_set1_ps(static_cast<float>(val[i]));
          const __m256 v1 = _mm256_set1_ps(static_cast<float>(val[i + 1]));
          lo0 = _mm256_fmadd_ps(v0, _mm256_load_ps(z0), lo0);
          hi0 = _mm256_fmadd_ps(v0, _mm256_load_ps(z0 + 8), hi0);
          lo1 = _mm256_fmadd_ps(v1, _mm256_load_ps(z1), lo1);
          hi1 = _mm256_fmadd_ps(v1, _mm256_load_ps(z1 + 8), hi1);
        }
        if (i < nnz) {
          const float* z0 = base + offset(i);
          const __m256 v0 = _mm256_set1_ps(static_cast<float>(val[i]));
          lo0 = _mm256_fmadd_ps(v0, _mm256_load_ps(z0), lo0);
          hi0 = _mm256_fmadd_ps(v0, _mm256_load_ps(z0 + 8), hi0);
        }
        _mm256_store_ps(sums, _mm256_add_ps(lo0, lo1));
        _mm256_store_ps(sums + 8, _mm256_add_ps(hi0, hi1));
      }
#else
      for (int64_t i = 0; i < nnz; ++i) {
        const float value = static_cast<float>(val[i]);
        const float* z = base + offset(i);
        for (int64_t n = 0; n < step; ++n) sums[n] += value * z[n];
      }
#endif
      for (int64_t n = 0; n < nt; ++n) y[(n0 + n) * out_features + o] = static_cast<O>(sums[n]);
    }
  }
}

// The dtype a row-sparse product (ELL, bitmask) writes for activations z: bf16 for bf16 z, float32 otherwise. Not
// the values' dtype: a host that serves float32 keeps bf16 values as the checkpoint stored them (stored_values in
// plugin/kernels/precision.py), and its float32 sums must not be rounded to bf16 on the way out.
inline at::ScalarType output_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

// fn(values, out) with both pointers typed: values float32 or bf16, out (an output or a strip) float32 or bf16.
template <typename Fn>
void with_value_types(const at::Tensor& values, at::Tensor& out, const Fn& fn) {
  const auto with_out = [&](const auto* val) {
    if (out.scalar_type() == at::kBFloat16) {
      fn(val, out.data_ptr<c10::BFloat16>());
    } else {
      fn(val, out.data_ptr<float>());
    }
  };
  if (values.scalar_type() == at::kBFloat16) {
    with_out(values.data_ptr<c10::BFloat16>());
  } else {
    with_out(values.data_ptr<float>());
  }
}

#if defined(__AVX2__)
// r[0..8), eight rows of eight floats, transposed in place: r[j] becomes column j.
inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

// Rows src[0 .. rows) (`in` values each, row stride ld; rows <= lanes <= 8) as lanes lane0 .. lane0 + lanes of a
// panel [in, width], lanes past `rows` zero: on AVX2, 8 x 8 blocks transposed in registers. A panel narrower than 8
// takes all 8 lanes of each store anyway and lets the next input's store rewrite the spill (a masked store is
// microcoded on AMD Zen 2 and made packing x 5x slower); its last input goes through a buffer.
inline void rows_into_panel(const float* src, int64_t ld, int64_t in, int64_t rows, float* panel, int64_t width,
                            int64_t lane0, int64_t lanes) {
  int64_t main = 0;
#if defined(__AVX2__)
  main = in / 8 * 8;
  for (int64_t k = 0; k < main; k += 8) {
    __m256 r[8];
    for (int64_t i = 0; i < 8; ++i) r[i] = i < rows ? _mm256_loadu_ps(src + i * ld + k) : _mm256_setzero_ps();
    transpose8x8(r);
    for (int j = 0; j < 8; ++j) {
      float* slot = panel + (k + j) * width + lane0;
      if (lanes == 8 || (width < 8 && (j < 7 || k + 8 < main))) {
        _mm256_storeu_ps(slot, r[j]);
      } else {
        alignas(32) float lane_values[8];
        _mm256_store_ps(lane_values, r[j]);
        std::memcpy(slot, lane_values, sizeof(float) * lanes);
      }
    }
  }
#endif
  for (int64_t k = main; k < in; ++k) {
    float* slot = panel + k * width + lane0;
    for (int64_t i = 0; i < lanes; ++i) slot[i] = i < rows ? src[i * ld + k] : 0.f;
  }
}

// x [N, in] as float32 panels [ceil(N / width), in, width]: panel p holds tokens p·width .. p·width + width - 1 side
// by side for each input, so a kernel reads one input's tokens as one contiguous run; tokens past N are zero. One
// threaded pass over x, 8 tokens at a time (rows_into_panel): element by element it took 0.5-1 ms for a [512, 1536] x
// (a plain copy takes 0.06), as long as the whole GEMM of a rank-87 factor. Rows are read at x's own row stride, so
// a column slice (a U's share of x Vᵀ) is packed in place, not copied first.
inline at::Tensor pack_token_panels(const at::Tensor& x, int64_t width) {
  const int64_t tokens = x.size(0), in = x.size(1), count = (tokens + width - 1) / width;
  auto xf = x.to(at::kFloat);
  if (xf.stride(1) != 1 || (tokens > 1 && xf.stride(0) < in)) xf = xf.contiguous();  // rows apart, columns adjacent
  const int64_t ld = xf.stride(0);
  const float* xp = xf.data_ptr<float>();
  auto panels = torch::empty({count, in, width}, xf.options());
  float* packed = panels.data_ptr<float>();
  at::parallel_for(0, count, 1, [&](int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t valid = std::min(width, tokens - p * width);
      for (int64_t i0 = 0; i0 < width; i0 += 8) {
        const int64_t lanes = std::min<int64_t>(8, width - i0);
        rows_into_panel(xp + (p * width + i0) * ld, ld, in, std::max<int64_t>(0, std::min(lanes, valid - i0)),
                        packed + p * in * width, width, i0, lanes);
      }
    }
  });
  return panels;
}

// x [tokens, in] float32 (columns adjacent, rows stride(0) apart) as the few-token AVX2 loops read it: each block of
// `block` tokens (the last may hold fewer, nt) laid out [ceil(in / 8)][nt][8], zeros past column in, from float
// n0 * width on (width: in rounded up to 8). Those loops load 8 inputs of every token of a block per step; read in
// place, the tokens' rows lie in * 4 bytes apart, a multiple of 4 KiB at the usual widths, so all of a step's lines
// fall in one L1 set and fill its 8 ways, and the weights' streams evict them. Interleaved, a step reads one run of
// bytes. AMD EPYC (Zen 3), 2 threads, 8 tokens, ms in place / interleaved: bf16 2:4 [2048, 2048] cache-resident
// 0.99 / 0.74 and 0.96 / 0.74, [5632, 2048] streamed 2.77 / 2.28 and 2.74 / 2.63 (dense float32 oneDNN 3.2-3.3).
inline at::Tensor interleaved_tokens(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "interleaved_tokens: x must be float32 [tokens, in] with adjacent columns");
  const int64_t tokens = x.size(0), in = x.size(1), width = (in + 7) / 8 * 8, ld = x.stride(0);
  auto blocks = torch::zeros({tokens * width}, x.options());
  const float* xp = x.data_ptr<float>();
  float* b = blocks.data_ptr<float>();
  for (int64_t n0 = 0; n0 < tokens; n0 += block) {
    const int64_t nt = std::min(block, tokens - n0);
    for (int64_t d = 0; d < width / 8; ++d) {
      const int64_t count = std::min<int64_t>(8, in - 8 * d);
      for (int64_t n = 0; n < nt; ++n) {
        std::memcpy(b + n0 * width + (d * nt + n) * 8, xp + (n0 + n) * ld + 8 * d, sizeof(float) * count);
      }
    }
  }
  return blocks;
}

// zt for batched_rows: z [tokens, k] float32 transposed into [k, batch_width(tokens)], padding columns zero (one
// token panel of that width).
inline at::Tensor transposed_batch(const at::Tensor& z) {
  return pack_token_panels(z, batch_width(z.size(0))).select(0, 0);
}

#if defined(SLIMSERVE_AVX2)
// A register-blocked GEMM for the AVX2 strips (below), because ATen's GEMM on a freshly decoded strip repacks both
// operands on every call and ran 1.3-1.5x slower than vLLM's prepacked oneDNN GEMM on the same float32 numbers.
// Here x is packed once per call into panels of kTileTokens tokens ([in, 6] each), each thread takes up to kUnitRows
// rows of W at a time (balanced_unit_rows), decoded 8 rows at a time (they stay in L2) and transposed into panels of
// kTileRows rows ([in, 16] each, zero rows past `out`), and one 6 x 16 tile of y is 12 accumulators: per input, two
// loads of W, six broadcasts of x and twelve FMAs, so the FMA units set the pace, not the loads (the panel loop below
// needs a load per FMA). kDepth inputs at a time keep a W panel (16 KiB) in L1 while the token panels stream past it; y
// is written directly in its [N, out] layout, no transposed copy. Units of 128 and 256 rows, and token blocks that keep
// x's panels in L3 (W decoded once per block), were measured and were no faster (docs/methods/cpu_kernels.md).
constexpr int64_t kTileTokens = 6;
constexpr int64_t kTileRows = 16;
constexpr int64_t kDepth = 256;
constexpr int64_t kUnitRows = 64;

// c[6][16] (row stride ldc) = or += Σ_k a[k][0..6) ⊗ b[k][0..16) over `depth` inputs.
inline void tile_6x16(const float* a, const float* b, int64_t depth, float* c, int64_t ldc, bool accumulate) {
  __m256 acc[kTileTokens][2];
  for (int i = 0; i < kTileTokens; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kTileRows), b1 = _mm256_loadu_ps(b + k * kTileRows + 8);
    for (int i = 0; i < kTileTokens; ++i) {
      const __m256 xi = _mm256_broadcast_ss(a + k * kTileTokens + i);
      acc[i][0] = _mm256_fmadd_ps(xi, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xi, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < kTileTokens; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(ci));
      acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(ci + 8));
    }
    _mm256_storeu_ps(ci, acc[i][0]);
    _mm256_storeu_ps(ci + 8, acc[i][1]);
  }
}

// Rows a thread takes at a time: the most of 64, 48, 32 and 16 that gives no thread more rows than the others need
// (576 rows on 2 threads: 12 units of 48, where units of 64 split 5 against 4 and left a thread idle for a ninth).
inline int64_t balanced_unit_rows(int64_t out, int64_t threads) {
  int64_t best = kUnitRows, best_load = INT64_MAX;
  for (int64_t rows = kUnitRows; rows >= kTileRows; rows -= kTileRows) {
    const int64_t units = (out + rows - 1) / rows, load = (units + threads - 1) / threads * rows;
    if (load < best_load) best = rows, best_load = load;
  }
  return best;
}

// y [N, out] (float32, row stride ldy; set, or added to with `accumulate`) = x [N, in] · Wᵀ with W's row panels
// written by `fill_panels(b_panels, first, row_panels)`: rows first .. first + 16 · row_panels of W (first a multiple
// of 16) as row_panels panels [in, 16] float32 at b_panels, rows past `out` zero.
template <typename FillPanels>
void tile_gemm_panels_into(const at::Tensor& x, int64_t out, const FillPanels& fill_panels, float* yp, int64_t ldy,
                           bool accumulate) {
  const int64_t tokens = x.size(0), in = x.size(1);
  if (in == 0) {  // sums of nothing: the tiles below would leave y as it was
    if (!accumulate) {
      for (int64_t t = 0; t < tokens; ++t) std::fill(yp + t * ldy, yp + t * ldy + out, 0.0f);
    }
    return;
  }
  const int64_t token_panels = (tokens + kTileTokens - 1) / kTileTokens;
  const auto a_panels = pack_token_panels(x, kTileTokens);
  const float* a = a_panels.data_ptr<float>();
  const int64_t unit_rows = balanced_unit_rows(out, at::get_num_threads()), units = (out + unit_rows - 1) / unit_rows;
  at::parallel_for(0, units, 1, [&](int64_t unit_begin, int64_t unit_end) {
    std::vector<float> b_panels(unit_rows * in);
    alignas(32) float edge[kTileTokens * kTileRows];
    for (int64_t u = unit_begin; u < unit_end; ++u) {
      const int64_t first = u * unit_rows, rows = std::min(unit_rows, out - first);
      const int64_t row_panels = (rows + kTileRows - 1) / kTileRows;
      fill_panels(b_panels.data(), first, row_panels);
      for (int64_t k0 = 0; k0 < in; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, in - k0);
        for (int64_t p = 0; p < token_panels; ++p) {
          const float* ap = a + (p * in + k0) * kTileTokens;
          const int64_t n0 = p * kTileTokens, nt = std::min(kTileTokens, tokens - n0);
          for (int64_t q = 0; q < row_panels; ++q) {
            const float* bq = b_panels.data() + (q * in + k0) * kTileRows;
            const int64_t o0 = first + q * kTileRows, ot = std::min(kTileRows, out - o0);
            if (nt == kTileTokens && ot == kTileRows) {
              tile_6x16(ap, bq, depth, yp + n0 * ldy + o0, ldy, accumulate || k0 > 0);
              continue;
            }
            tile_6x16(ap, bq, depth, edge, kTileRows, false);  // a part tile: through a buffer, the valid part kept
            for (int64_t i = 0; i < nt; ++i) {
              float* yi = yp + (n0 + i) * ldy + o0;
              for (int64_t r = 0; r < ot; ++r) yi[r] = (accumulate || k0 > 0 ? yi[r] : 0.f) + edge[i * kTileRows + r];
            }
          }
        }
      }
    }
  });
}

// tile_gemm_panels_into a new y [N, out].
template <typename FillPanels>
at::Tensor tile_gemm_panels(const at::Tensor& x, int64_t out, const FillPanels& fill_panels) {
  auto y = torch::empty({x.size(0), out}, x.options().dtype(at::kFloat));
  tile_gemm_panels_into(x, out, fill_panels, y.data_ptr<float>(), out, false);
  return y;
}

// y [N, out] float32 = x [N, in] · Wᵀ with W's rows written by `fill_rows` as strips_gemm's are: decoded 8 rows at a
// time (they stay in L2) and transposed into the row panels.
template <typename FillRows>
at::Tensor tile_gemm(const at::Tensor& x, int64_t out, const FillRows& fill_rows) {
  const int64_t in = x.size(1);
  return tile_gemm_panels(x, out, [&](float* b_panels, int64_t first, int64_t row_panels) {
    auto eight = torch::empty({8, in}, x.options().dtype(at::kFloat));  // once per unit of up to 64 rows
    for (int64_t r0 = 0; r0 < row_panels * kTileRows; r0 += 8) {
      const int64_t filled = std::max<int64_t>(0, std::min<int64_t>(8, out - first - r0));
      auto decoded = eight.narrow(0, 0, filled);
      if (filled > 0) fill_rows(decoded, first + r0, 0, filled);
      rows_into_panel(eight.data_ptr<float>(), in, in, filled, b_panels + r0 / kTileRows * in * kTileRows, kTileRows,
                      r0 % kTileRows, 8);  // rows past `out` zero
    }
  });
}
#endif

// y [N, out] = x [N, in] · Wᵀ in `dtype` for many tokens (prefill), float32 on AVX2 builds by tile_gemm; otherwise
// strips of W's rows are decoded into one buffer that stays in cache and multiplied by ATen's GEMM as x · stripᵀ
// (oneDNN's bf16 GEMM ran strip · xᵀ into yᵀ 15-20 % slower: AMD EPYC (Zen 4), 2 threads, [5632, 2048] at 512 tokens,
// 35.1 against 30.7 ms for the product alone, dense prepacked 26.5). Decoding
// the whole weight per call instead allocates, page-faults and writes a dense copy of the layer on every call
// (46 MiB fp32 for [5632, 2048]), which cost more than the GEMM of a few hundred tokens. A strip holds up to 4 MiB
// (at least 256 rows), so a small model's layer is one strip, and each GEMM writes straight into its columns of y.
// Strips of 256 rows copied in from a separate product cost every GEMM call its fixed overhead and a copy: same host,
// bitmask weights of the real SmolLM2 (density 0.74), ms 4 MiB / 256 rows (dense prepacked): gate+up [3072, 576] at
// 128 tokens 1.44 / 1.81 (1.32), at 512 4.75 / 5.03 (4.38); q+k+v [960, 576] at 128 0.51 / 0.58 (0.40); a Llama's
// [11264, 2048] at density 0.43, 512 tokens 58.8 / 61.9 (53.7). `fill_rows(strip, first, begin, end)` writes rows
// first + begin .. first + end of W as rows begin .. end of `strip` ([rows, in], `dtype`); threads split each strip's
// rows.
template <typename FillRows>
at::Tensor strips_gemm(const at::Tensor& x, int64_t out, at::ScalarType dtype, const FillRows& fill_rows) {
  if (x.size(1) == 0) return torch::zeros({x.size(0), out}, x.options().dtype(dtype));  // no inputs: sums of nothing
#if defined(SLIMSERVE_AVX2)
  if (dtype == at::kFloat) return tile_gemm(x, out, fill_rows);
#endif
  constexpr int64_t kStripBytes = 4 << 20;
  const auto xd = x.to(dtype).contiguous();
  auto y = torch::empty({x.size(0), out}, x.options().dtype(dtype));
  const int64_t strip_rows = std::max<int64_t>(256, kStripBytes / (x.size(1) * y.element_size()));
  auto strip = torch::empty({std::min(out, strip_rows), x.size(1)}, y.options());
  for (int64_t first = 0; first < out; first += strip_rows) {
    auto rows = strip.narrow(0, 0, std::min(strip_rows, out - first));
    at::parallel_for(0, rows.size(0), 16, [&](int64_t begin, int64_t end) { fill_rows(rows, first, begin, end); });
    auto columns = y.narrow(1, first, rows.size(0));
    at::mm_out(columns, xd, rows.t());
  }
  return y;
}

#if defined(__AVX2__) && defined(__FMA__)
#define SLIMSERVE_PANELS 1
// Many tokens (prefill) multiplying only a sparse weight's stored values: at 50 % density half of a dense GEMM's
// multiply-adds (2:4 and 4:8 nm, dictsparse coefficients at s = k/2), where strips_gemm multiplies the zeros too.
// It needs a load of x per FMA where tile_gemm needs two loads per three, and on AMD Zen 3 the loads, not the FMAs, set
// its pace (a scratch loop of FMAs on L1-resident memory operands ran at about 4.3 G loads a second a core), so each
// weight's broadcast and the load of its column are spread over as many FMAs as the registers allow: x is packed in
// panels of kPanelTokens tokens ([in, 48] each) and a stored value w at column c updates its row's 48 token sums with
// one broadcast and six FMAs against panel row c (192 contiguous bytes), two rows at a time (12 accumulators). Rows go
// in blocks of kPanelRowBlock, decoded once (columns times 48, values widened to fp32) and reused by every panel,
// kPanelChunk values of a row at a time: the block's chunk (64 KiB) stays in L2 and the panel rows it touches (128
// inputs at 2:4, 24 KiB) in L1; chunks of 128 (48 KiB of panel rows) ran about 10 % slower, panels of 64 tokens one
// row at a time slower too; panels of 32 were level on two threads and 15 % slower on one (docs/methods/cpu_kernels.md).
// At density 0.5 or below it beat the strips at every count measured from 24-64 tokens to 2048. AVX-512 builds compile
// it too (AVX2 is a subset), but the kernels keep the strips there: this 8-lane loop was not measured against a 16-lane
// GEMM.
constexpr int64_t kPanelTokens = 48;
constexpr int64_t kPanelRowBlock = 128;
constexpr int64_t kPanelChunk = 64;

// Row o of `values` ([rows, n], float32 or bfloat16, contiguous) as float32 at w, for a panel_product decoder.
inline void widen_row(const at::Tensor& values, int64_t o, float* w) {
  const int64_t n = values.size(1);
  if (values.scalar_type() == at::kBFloat16) {
    const c10::BFloat16* v = values.data_ptr<c10::BFloat16>() + o * n;
    for (int64_t t = 0; t < n; ++t) w[t] = static_cast<float>(v[t]);
  } else {
    std::memcpy(w, values.data_ptr<float>() + o * n, sizeof(float) * n);
  }
}

// The first `rows` rows of `cols` / `weights` (nnz a row; stored values j0 .. j1) times one token panel [in, 8 · V]
// into those rows' sums at `sums` (row stride ld), set when j0 is 0, else added to. Two rows at a time keep 2 · V
// FMA chains in flight; an unpaired last row computes itself twice and stores once.
template <int V>
inline void panel_rows(const float* panel, const int32_t* cols, const float* weights, int64_t nnz, int64_t rows,
                       int64_t j0, int64_t j1, float* sums, int64_t ld) {
  for (int64_t r = 0; r < rows; r += 2) {
    const bool pair = r + 1 < rows;
    const int32_t* c0 = cols + r * nnz;
    const int32_t* c1 = pair ? c0 + nnz : c0;
    const float* w0 = weights + r * nnz;
    const float* w1 = pair ? w0 + nnz : w0;
    float* y0 = sums + r * ld;
    float* y1 = pair ? y0 + ld : y0;
    __m256 a[V], b[V];
    for (int k = 0; k < V; ++k) {
      a[k] = j0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y0 + 8 * k);
      b[k] = j0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(y1 + 8 * k);
    }
    for (int64_t j = j0; j < j1; ++j) {
      const __m256 u = _mm256_broadcast_ss(w0 + j), v = _mm256_broadcast_ss(w1 + j);
      const float* x0 = panel + c0[j];
      const float* x1 = panel + c1[j];
      for (int k = 0; k < V; ++k) {
        a[k] = _mm256_fmadd_ps(u, _mm256_loadu_ps(x0 + 8 * k), a[k]);
        b[k] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x1 + 8 * k), b[k]);
      }
    }
    for (int k = 0; k < V; ++k) {
      _mm256_storeu_ps(y1 + 8 * k, b[k]);
      _mm256_storeu_ps(y0 + 8 * k, a[k]);
    }
  }
}

// y [N, out] float32 = x [N, in] · Wᵀ for W with nnz stored values a row. `decode_row(o, cols, weights)` writes
// row o's value columns times kPanelTokens (offsets into a panel) and its values widened to float32; it may write
// up to 8 columns past the row's nnz (the next row's decode overwrites them).
template <typename DecodeRow>
at::Tensor panel_product(const at::Tensor& x, int64_t out, int64_t nnz, const DecodeRow& decode_row) {
  const int64_t tokens = x.size(0), in = x.size(1);
  TORCH_CHECK(in * kPanelTokens < INT32_MAX, "panel_product: in_features x 48 must fit int32 offsets");
  // The last panel's zero tokens past N are not multiplied: it runs on as many vectors as it holds tokens (padded to
  // a whole panel, a 32-token step took 1.5x the FMAs it needs).
  const int64_t whole = tokens / kPanelTokens, rest_vectors = (tokens - whole * kPanelTokens + 7) / 8;
  const int64_t ld = whole * kPanelTokens + 8 * rest_vectors;
  const auto panels = pack_token_panels(x, kPanelTokens);  // [ceil(N / 48), in, 48]
  auto y = torch::empty({tokens, out}, panels.options());
  const float* packed = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, kPanelRowBlock, [&](int64_t row_begin, int64_t row_end) {
    std::vector<int32_t> cols(kPanelRowBlock * nnz + 8);  // rows decode in order, each may write 8 slots past its end
    std::vector<float> weights(kPanelRowBlock * nnz);
    std::vector<float> block_sums(kPanelRowBlock * ld);  // the block's rows x every token, in L2 between chunks
    for (int64_t b0 = row_begin; b0 < row_end; b0 += kPanelRowBlock) {
      const int64_t rows = std::min(kPanelRowBlock, row_end - b0);
      for (int64_t r = 0; r < rows; ++r) decode_row(b0 + r, cols.data() + r * nnz, weights.data() + r * nnz);
      for (int64_t j0 = 0; j0 < nnz; j0 += kPanelChunk) {
        const int64_t j1 = std::min(nnz, j0 + kPanelChunk);
        for (int64_t p = 0; p < whole; ++p) {
          panel_rows<kPanelTokens / 8>(packed + p * in * kPanelTokens, cols.data(), weights.data(), nnz, rows, j0, j1,
                                       block_sums.data() + p * kPanelTokens, ld);
        }
        const float* last = packed + whole * in * kPanelTokens;
        float* last_sums = block_sums.data() + whole * kPanelTokens;
        switch (rest_vectors) {
#define SLIMSERVE_LAST_PANEL(V) \
  case V: panel_rows<V>(last, cols.data(), weights.data(), nnz, rows, j0, j1, last_sums, ld); break;
          SLIMSERVE_LAST_PANEL(1) SLIMSERVE_LAST_PANEL(2) SLIMSERVE_LAST_PANEL(3)
          SLIMSERVE_LAST_PANEL(4) SLIMSERVE_LAST_PANEL(5) SLIMSERVE_LAST_PANEL(6)
#undef SLIMSERVE_LAST_PANEL
          default: break;  // no tokens past the whole panels
        }
      }
      for (int64_t r0 = 0; r0 < rows; r0 += 8) {  // the block's sums into its columns of y, 8 x 8 at a time
        const int64_t lanes = std::min<int64_t>(8, rows - r0);
        rows_into_panel(block_sums.data() + r0 * ld, ld, tokens, lanes, yp + b0 + r0, out, 0, lanes);
      }
    }
  });
  return y;
}
#endif

#if defined(__AVX512VBMI2__)
// 32 bf16 inputs (raw bits) from the first popcount(mask) of the 32 stored values at `packed`, zeros where `mask`
// has no bit. The values are loaded first and expanded in registers: expanding straight from memory is microcoded on
// AMD Zen 4 and made expanded_dot below twice as slow.
inline __m512i expand_bf16(const uint16_t* packed, uint32_t mask, int count = 16) {
  const __m512i kept = count == 16
      ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed)))
      : _mm512_maskz_loadu_epi16(count == 32 ? ~0u : (1u << count) - 1, packed);
  return _mm512_maskz_expand_epi16(mask, kept);
}

#endif

#if defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
#define SLIMSERVE_DPBF16 1
// bf16 batches of a sparse weight on CPUs with AVX512_BF16 and no usable tile unit (AMD Zen 4, or AMX not
// permitted), where oneDNN's dense bf16 GEMM is bound by memory up to about 8 tokens (weights streamed from memory)
// and by vdpbf16ps from about 16: each row's 32-input spans
// are expanded in registers from its stored values (vpexpandw under a 32-bit mask) and dotted with the inputs of
// kTokens tokens by _mm512_dpbf16_ps, kRows rows at a time (kRows * kTokens accumulators). The stored bytes are read
// and expanded once per call, the expansions kept for the later blocks of tokens; the vector loops gather x once per
// stored value and token instead.
//
// A group is rows i, i + q, i + 2q ... of the thread's range (q its kRows-th part), not adjacent rows, whose value
// streams leapfrogged each other and lost the hardware prefetcher (the cursors prefetch their own streams besides).
// AMD EPYC (Zen 4), 2 threads, [5632, 2048], 8 copies of the weight streamed from memory, ms at 8 tokens, two rows at
// a time: 2:4 1.27 (adjacent rows) -> 1.06 (i / i + half) -> 0.84 (and the cursor prefetching its values 1 KiB
// ahead); dense 0.95-1.1.
// x [N, in] as bf16 in a zeroed [rows, width] buffer (rows >= N, width >= in): whole blocks of tokens and spans of
// inputs, whose padding the dot loops multiply by zero instead of testing for.
inline at::Tensor zero_padded(const at::Tensor& x, int64_t rows, int64_t width) {
  auto padded = torch::zeros({rows, width}, x.options().dtype(at::kBFloat16));
  padded.narrow(0, 0, x.size(0)).narrow(1, 0, x.size(1)).copy_(x);
  return padded;
}

// kRows cursors f(0) .. f(kRows - 1), for loops over that many rows at once (cursors may hold references).
template <typename F, size_t... I>
std::array<std::invoke_result_t<F, int64_t>, sizeof...(I)> cursors(const F& f, std::index_sequence<I...>) {
  return {f(static_cast<int64_t>(I))...};
}

// The dot loops' inputs: `tokens` rows of `in` bf16 inputs (raw bits), row t at data + t * stride, each zero from
// `in` up to its whole last span of 32, and whole rows of zeros after the last token up to the loops' block of tokens
// (padded_token_rows): padding the loops multiply by zero instead of testing for.
struct PaddedTokens {
  const uint16_t* data;
  int64_t stride;
  int64_t tokens;
  int64_t in;
};

// The rows of tokens the dot loops read for `tokens` tokens (rows_dot's choice of block), and a row's inputs padded to
// whole spans.
inline int64_t padded_token_rows(int64_t tokens) { return tokens == 1 ? 1 : tokens <= 4 ? 4 : (tokens + 7) / 8 * 8; }
inline int64_t padded_inputs(int64_t in) { return (in + 31) / 32 * 32; }

// store(t, o, sum) for every token t < x.tokens and row o < out: sum = x_t · row o, float32.
template <int kTokens, int kRows, typename RowSpans, typename Store>
void dot_blocks(const PaddedTokens& x, int64_t out, const RowSpans& row_spans, const Store& store) {
  const int64_t tokens = x.tokens, spans = (x.in + 31) / 32, width = x.stride;
  const int64_t blocks = (tokens + kTokens - 1) / kTokens;
  const uint16_t* xp = x.data;
  at::parallel_for(0, (out + kRows - 1) / kRows, 8, [&](int64_t group_begin, int64_t group_end) {
    const int64_t row_begin = kRows * group_begin, row_end = std::min(kRows * group_end, out);
    const int64_t part = (row_end - row_begin + kRows - 1) / kRows;
    // The first block of tokens expands the rows' spans; later blocks reload them from here (L1 or L2).
    std::vector<__m512i> expanded(blocks > 1 ? kRows * spans : 0);
    for (int64_t g = 0; g < part; ++g) {
      int64_t rows[kRows];
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
        const int64_t o = row_begin + g + i * part;
        rows[i] = o < row_end ? o : row_begin + g;  // a slot past the range dots row g again
      }
      auto cursor = cursors([&](int64_t i) { return row_spans(rows[i]); }, std::make_index_sequence<kRows>());
      // One block of tokens against the group's rows, whose spans `span(s, i)` gives. Every loop over the tokens and
      // rows is unrolled whole (constant trip counts, no bound in a condition), so the accumulators live in
      // registers: otherwise GCC kept them on the stack too and stored every sum of the span loop, which made the
      // bitmask product 2x slower on Zen 4 (1.40 -> 0.67 ms above at 43 % density).
      const auto dot_block = [&](int64_t b, const auto& span) {
        __m512 acc[kRows][kTokens];
#pragma GCC unroll 8
        for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 16
          for (int t = 0; t < kTokens; ++t) acc[i][t] = _mm512_setzero_ps();
        }
        const uint16_t* xb = xp + b * kTokens * width;
        for (int64_t s = 0; s < spans; ++s) {
          __m512bh w[kRows];
#pragma GCC unroll 8
          for (int i = 0; i < kRows; ++i) w[i] = (__m512bh)span(s, i);
#pragma GCC unroll 16
          for (int t = 0; t < kTokens; ++t) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + t * width + s * 32);
#pragma GCC unroll 8
            for (int i = 0; i < kRows; ++i) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], w[i], xv);
          }
        }
#pragma GCC unroll 16
        for (int t = 0; t < kTokens; ++t) {
          if (b * kTokens + t < tokens) {
#pragma GCC unroll 8
            for (int i = 0; i < kRows; ++i) store(b * kTokens + t, rows[i], _mm512_reduce_add_ps(acc[i][t]));
          }
        }
      };
      if (blocks == 1) {
        dot_block(0, [&](int64_t, int i) { return cursor[i].next(); });
        continue;
      }
      dot_block(0, [&](int64_t s, int i) {
        const __m512i span = cursor[i].next();
        _mm512_store_si512(&expanded[s * kRows + i], span);
        return span;
      });
      for (int64_t b = 1; b < blocks; ++b) {
        dot_block(b, [&](int64_t s, int i) { return _mm512_load_si512(&expanded[s * kRows + i]); });
      }
    }
  });
}

// The sums for one bf16 token: dot_blocks' spans without its blocks of tokens, which at one token dotted rows of
// zeros for every useful one. kRows rows at a time keep that many vdpbf16ps chains in flight: rows g, g + q, g + 2q
// and g + 3q of the thread's range (q its quarter), for the prefetcher as in dot_blocks; a slot past the range dots
// row g again.
template <typename RowSpans, typename Store>
void dot_one(const PaddedTokens& x, int64_t out, const RowSpans& row_spans, const Store& store) {
  constexpr int64_t kRows = 4;
  const int64_t spans = (x.in + 31) / 32;
  const uint16_t* xp = x.data;
  at::parallel_for(0, (out + kRows - 1) / kRows, 8, [&](int64_t group_begin, int64_t group_end) {
    const int64_t row_begin = kRows * group_begin, row_end = std::min(kRows * group_end, out);
    const int64_t quarter = (row_end - row_begin + kRows - 1) / kRows;
    for (int64_t g = 0; g < quarter; ++g) {
      const auto row = [&](int64_t i) {
        const int64_t o = row_begin + g + i * quarter;
        return o < row_end ? o : row_begin + g;
      };
      auto rows = cursors([&](int64_t i) { return row_spans(row(i)); }, std::make_index_sequence<kRows>());
      __m512 acc[kRows];
#pragma GCC unroll 4
      for (int64_t i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t s = 0; s < spans; ++s) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + s * 32);
#pragma GCC unroll 4
        for (int64_t i = 0; i < kRows; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)rows[i].next(), xv);
      }
#pragma GCC unroll 4
      for (int64_t i = 0; i < kRows; ++i) store(0, row(i), _mm512_reduce_add_ps(acc[i]));
    }
  });
}

// store(t, o, x_t · row o of W) for every token and row, x bf16. `row_spans(o)` returns a cursor over row o of W
// whose `next()` gives its 32-input spans in order (expand_bf16 results); inputs past `in` in the last span must come
// back zero. One token takes dot_one; up to 4 tokens dot one block of 4, four rows at a time (half the dot products
// of a padded block of 8); more tokens blocks of 8, three rows at a time (24 accumulators), each row's spans
// expanded once for all blocks. AMD EPYC (Zen 4), 2 threads, bitmask at 43 % density (lowrank_sparse's S, gate and
// up stacked: [11264, 2048]), 4 copies cycled, interleaved in one process, median ms against two rows re-expanded
// per block: 2 / 4 tokens 1.17 / 1.24 against 1.24 / 1.33, 8 tokens 1.51-1.53 against 1.92-1.99, 16 tokens 2.68
// against 3.34; dictsparse's C [5632, 1547] at 8 tokens 0.61 against 0.70. In separate runs at 128 tokens 16.7-18.3
// against 27.4 (oneDNN's dense GEMM 14.4-14.9).
template <typename RowSpans, typename Store>
void rows_dot(const PaddedTokens& x, int64_t out, const RowSpans& row_spans, const Store& store) {
  if (x.tokens == 0) return;  // the loops below would read a block of tokens that was never padded
  if (x.tokens == 1) {
    dot_one(x, out, row_spans, store);
  } else if (x.tokens <= 4) {
    dot_blocks<4, 4>(x, out, row_spans, store);
  } else {
    dot_blocks<8, 3>(x, out, row_spans, store);
  }
}

// One row of a dense bf16 weight as the 32-input spans the dot loops above take, inputs past `in` zero. kPrefetch:
// the cursor prefetches its row 2 KiB ahead into L2, which blocks of tokens need (a block's dot products come between
// two spans of a row) and one token does not (it ran 0.93-0.98x as fast with it). Into L2, not L1, and 2 KiB ahead, not
// 1 (BitmaskSpans' choice for rows at 43 % density, whose values advance under half as fast): AMD EPYC (Zen 4), 2
// threads, vLLM's seven fused factor shapes of the Llama layer at 30 % of bytes, each streamed from memory, summed ms
// 1 KiB into L1 / this / oneDNN's GEMM: 2 tokens 2.22 / 2.07 / 2.73, 4 tokens 2.33 / 2.04 / 2.22, 8 tokens 2.60 /
// 2.21 / 2.64, 16-64 tokens 1.00-1.04x (bound by the dot products there, 0.91x of oneDNN).
template <bool kPrefetch>
struct DenseSpans {
  const uint16_t* row;
  int64_t in;
  int64_t first = 0;
  __m512i next() {
    const uint16_t* p = row + first;
    if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T1);
    const int64_t left = in - first;
    first += 32;
    if (left >= 32) return _mm512_loadu_si512(p);
    return _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, static_cast<uint32_t>(left)), p);
  }
};

// x's rows (bf16, contiguous) padded for the dot loops in this thread's scratch, followed by `extra_per_row` zeroed
// elements per padded row of tokens (a second product's inputs: first_rows_then_shards). The scratch is reused from
// call to call, so the rows operators below make no tensor but their output: on SmolLM2's layers their padding,
// conversions and slices as ATen operators were about 20 a call, each 0.5-2 µs through the dispatcher.
inline PaddedTokens padded_in_scratch(const at::Tensor& x, int64_t extra_per_row = 0, uint16_t** extra = nullptr) {
  thread_local std::vector<uint16_t> scratch;
  const int64_t tokens = x.size(0), in = x.size(1), width = padded_inputs(in), rows = padded_token_rows(tokens);
  scratch.assign(rows * (width + extra_per_row), 0);
  const auto* source = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  for (int64_t t = 0; t < tokens; ++t) std::memcpy(scratch.data() + t * width, source + t * in, sizeof(uint16_t) * in);
  if (extra != nullptr) *extra = scratch.data() + rows * width;
  return {scratch.data(), width, tokens, in};
}

// y [N, out] float32 = x [N, in] · Wᵀ for bf16 x (contiguous), W's rows given by `row_spans` (a sparse weight's
// decoding cursors), on rows_dot.
template <typename RowSpans>
at::Tensor expanded_dot(const at::Tensor& x, int64_t out, const RowSpans& row_spans) {
  auto y = torch::empty({x.size(0), out}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  rows_dot(padded_in_scratch(x), out, row_spans, [yp, out](int64_t t, int64_t o, float sum) { yp[t * out + o] = sum; });
  return y;
}

// A store for the dot loops: each sum rounded to bf16 (as ATen rounds float32) into row t, column `column` + o of y
// (raw bits, rows `ld` apart).
inline auto bf16_store(uint16_t* y, int64_t ld, int64_t column = 0) {
  return [y, ld, column](int64_t t, int64_t o, float sum) { y[t * ld + column + o] = c10::BFloat16(sum).x; };
}

// store(t, o, x_t · row o) for a dense bf16 W [out, x.in] stored as plain rows at `w`, on the dot loops above with
// each row's spans loaded as stored: one token without the cursor's prefetch, blocks with it (on AMD Zen 4 the blocks
// ran 8-64 tokens at 0.74-0.88x of oneDNN's GEMM without any).
template <typename Store>
void dense_rows(const PaddedTokens& x, const uint16_t* w, int64_t out, const Store& store) {
  const int64_t in = x.in;
  if (x.tokens == 1) {
    dot_one(x, out, [&](int64_t o) { return DenseSpans<false>{w + o * in, in}; }, store);
  } else {
    rows_dot(x, out, [&](int64_t o) { return DenseSpans<true>{w + o * in, in}; }, store);
  }
}

// y [N, Σ outs] bf16: shard i's second product of its `widths[i]` columns of z = x Fᵀ, into its own columns, in
// order, for a compressed layer of two factors whose first, F, is plain bf16 rows [Σ widths, in] at `first` (a fused
// layer's stacked). z is rounded to bf16 (as one call per factor rounds it) straight into the scratch, each shard's
// columns padded to whole spans for its second product, which `shard_product(i, z_i, store)` runs on the dot loops,
// storing each sum through `store`. One call and one tensor made for the whole layer: bf16_rows_lowrank (second
// factor U, dense rows) and bitmask_matmul_dictionary (second factor C, a bitmask); before, a fused layer crossed
// the dispatcher per factor and per shard for a slice, a copy and a store.
template <typename ShardProduct>
at::Tensor first_rows_then_shards(const at::Tensor& x, const uint16_t* first, const std::vector<int64_t>& widths,
                                  const std::vector<int64_t>& outs, const ShardProduct& shard_product) {
  const auto xc = x.contiguous();
  // each shard's first column in the padded z and in y; the last entries are their widths
  std::vector<int64_t> z_columns{0}, y_columns{0};
  for (size_t i = 0; i < widths.size(); ++i) {
    z_columns.push_back(z_columns.back() + padded_inputs(widths[i]));
    y_columns.push_back(y_columns.back() + outs[i]);
  }
  const int64_t tokens = xc.size(0), z_width = z_columns.back(), y_width = y_columns.back();
  uint16_t* z = nullptr;
  const PaddedTokens xt = padded_in_scratch(xc, z_width, &z);
  const int64_t width = std::accumulate(widths.begin(), widths.end(), int64_t{0});
  dense_rows(xt, first, width, [&](int64_t t, int64_t o, float sum) {
    size_t i = 0;
    for (; o >= widths[i]; ++i) o -= widths[i];
    z[t * z_width + z_columns[i] + o] = c10::BFloat16(sum).x;
  });
  auto y = torch::empty({tokens, y_width}, xc.options());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  for (size_t i = 0; i < widths.size(); ++i) {
    shard_product(i, PaddedTokens{z + z_columns[i], z_width, tokens, widths[i]}, bf16_store(yp, y_width, y_columns[i]));
  }
  return y;
}
#endif  // SLIMSERVE_DPBF16

}  // namespace slimserve_rows
