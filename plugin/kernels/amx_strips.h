// Sparse weight x bf16 tokens on the AMX tile unit (Intel Sapphire Rapids and later), shared by the kernels whose
// rows are stored compressed (nm_cpu.cpp, bitmask_cpu.cpp).
//
// Why: their vector loops multiply with AVX-512 FMAs (16 multiply-adds each), so from a handful of tokens on they
// are compute-bound, while oneDNN's dense bf16 GEMM runs on the tile unit and stays memory-bound to far larger
// batches: the sparse loops lost to dense from ~8 tokens. Here the sparse rows feed the same unit. Each strip of 16
// output rows is expanded from its stored values into a dense bf16 strip in cache by the kernel's own row expander
// (one vpexpandw per 32 inputs under the mask its format gives), and tdpbf16ps multiplies 16 rows x 32 inputs by 16
// tokens per instruction. Memory moves only the stored bytes; the expansion costs the same at any token count. The
// unit multiplies bf16 exactly into fp32 sums, as a bf16 GEMM does.
//
// Measured and kept simple (docs/methods/nm.md): expanding each span just before its tile load was 1.4x slower (the
// tile load waits for the vector stores to reach L1), and four token tiles per weight-tile load were no faster; two
// strips per block (with one or two token tiles, so each token tile load feeds two multiplies) and input chunks of 8
// or 32 spans were slower at 500 tokens on an Intel Xeon (11-14 against 8 ms for [5632, 2048]).
#pragma once

#if defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__) && \
    defined(__linux__)
#define SLIMSERVE_AMX 1

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/extension.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace slimserve_amx {

constexpr int64_t kTile = 16;   // output rows per strip, tokens per tile
constexpr int64_t kDepth = 32;  // inputs per tile multiply (16 bf16 pairs)

// Whether calls may use the tile unit: Linux hands the tile registers to a process only on request (arch_prctl
// ARCH_REQ_XCOMP_PERM, XTILEDATA), and SLIMSERVE_AMX=0 turns the path off, so the vector loops serve every call
// (for comparisons, and for tests of those loops on AMX hosts).
inline bool permitted() {
  static const bool granted = [] {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  const char* setting = std::getenv("SLIMSERVE_AMX");
  return granted && !(setting != nullptr && std::strcmp(setting, "0") == 0);
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline int64_t padded_depth(int64_t in) { return (in + kDepth - 1) / kDepth * kDepth; }

// Scratch of the calling thread, kept across calls: at prefill sizes (MiB) a fresh allocation was page-faulted on
// every call of every layer.
template <typename T>
std::vector<T>& scratch() {
  thread_local std::vector<T> buffer;
  return buffer;
}

// x [tokens, in] bf16 as the tile unit's second operand: per tile of 16 tokens and per pair of inputs (2i, 2i + 1)
// one 64-byte row holding (x[t, 2i], x[t, 2i + 1]) for the 16 tokens; zeros past the last token and past `in` (up to
// the depth padded to 32, so the expanded rows' padding multiplies zeros).
inline void pack_tokens(const at::Tensor& x, std::vector<uint32_t>& packed) {
  const int64_t tokens = x.size(0), in = x.size(1), pairs = padded_depth(in) / 2;
  const int64_t tiles = (tokens + kTile - 1) / kTile;
  TORCH_CHECK(kTile * in < INT32_MAX, "AMX strips: 16 x in_features must fit int32 offsets");
  packed.resize(tiles * pairs * kTile);
  uint32_t* rows = packed.data();
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  // Offsets of token t's element in a tile, in bf16 units: one 32-bit gather reads a pair for 16 tokens.
  const __m512i token_offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int>(in)));
  at::parallel_for(0, tiles * pairs, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t tile = r / pairs, first = 2 * (r % pairs), left = tokens - tile * kTile;
      const __mmask16 live = left >= kTile ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      uint32_t* row = rows + r * kTile;
      if (first + 1 < in) {
        const __m512i both = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, token_offsets,
                                                         xs + tile * kTile * in + first, 2);
        _mm512_storeu_si512(row, both);
      } else {  // the last input of an odd count (its pair's second half zero), or padding past the inputs
        for (int64_t t = 0; t < kTile; ++t) row[t] = first < in && t < left ? xs[(tile * kTile + t) * in + first] : 0;
      }
    }
  });
}

// Inputs per K-chunk for many tokens, in spans of 32: 512 inputs, so x's chunk for 500 tokens is 512 KiB (L2).
// Without chunks each strip multiplied all of x: at 500 tokens and 5632 inputs that streamed 5.6 MiB of packed x
// from L3 per strip. Up to kWholeRowTiles token tiles x fits in L2 whole and a strip's rows are expanded end to end
// (chunked, each row was read in 256-byte pieces 2 KiB apart, and 8 tokens ran 1.7x slower).
constexpr int64_t kChunkSpans = 16;
constexpr int64_t kWholeRowTiles = 4;

// y [tokens, out] = x · Wᵀ for contiguous bf16 x [tokens, in], y float32 or bf16 (rounded once from the fp32 sums, as a
// bf16 GEMM's output: a separate fp32 -> bf16 pass over y cost about a quarter of a 500-token prefill of 2:4). Threads
// take strips of 16 rows; each walks the inputs in K-chunks, expands its strips' chunk with `expand_row(o, dense,
// span_stride, s0, s1)` (row o's 32 bf16 inputs of span s written at dense + (s - s0) * span_stride, padding past the
// row's inputs zero) and adds its product with every token tile to sums kept per strip and tile, so each weight element
// is expanded once a call. The chunk is span-major, so each [16 rows, 32 inputs] tile is one contiguous KiB: row-major
// with a stride of 2 * in bytes put all 16 rows of a tile load in one L1 set at in = 2048.
template <typename ExpandRow, typename Out>
void strips(const at::Tensor& x, int64_t out, const ExpandRow& expand_row, Out* y) {
  const int64_t tokens = x.size(0), in = x.size(1);
  const int64_t depth = padded_depth(in), spans = depth / kDepth, tiles = (tokens + kTile - 1) / kTile;
  const int64_t strip_count = (out + kTile - 1) / kTile, tile_floats = kTile * kTile;
  std::vector<uint32_t>& packed_tokens = scratch<uint32_t>();
  pack_tokens(x, packed_tokens);
  const uint32_t* packed = packed_tokens.data();
  std::vector<float>& sums = scratch<float>();  // [strip][token tile][16 rows][16 tokens], written before read
  sums.resize(strip_count * tiles * tile_floats);
  at::parallel_for(0, strip_count, 1, [&](int64_t strip_begin, int64_t strip_end) {
    TileConfig config;
    for (int t = 0; t < 3; ++t) {  // tmm0: sums [16 rows, 16 tokens] fp32; tmm1: weights; tmm2: tokens
      config.rows[t] = kTile;
      config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    const int64_t chunk_spans = tiles <= kWholeRowTiles ? spans : kChunkSpans;
    std::vector<uint16_t> chunk(kTile * chunk_spans * kDepth);
    for (int64_t s0 = 0; s0 < spans; s0 += chunk_spans) {
      const int64_t s1 = std::min(spans, s0 + chunk_spans);
      for (int64_t strip = strip_begin; strip < strip_end; ++strip) {
        const int64_t o0 = strip * kTile, rows = std::min(kTile, out - o0);
        for (int64_t n = 0; n < kTile; ++n) {
          uint16_t* dense = chunk.data() + n * kDepth;
          if (n < rows) {
            expand_row(o0 + n, dense, kTile * kDepth, s0, s1);
          } else {
            for (int64_t s = s0; s < s1; ++s) _mm512_storeu_si512(dense + (s - s0) * kTile * kDepth, _mm512_setzero_si512());
          }
        }
        for (int64_t tile = 0; tile < tiles; ++tile) {
          float* partial = sums.data() + (strip * tiles + tile) * tile_floats;
          if (s0 == 0) {
            _tile_zero(0);
          } else {
            _tile_loadd(0, partial, 64);
          }
          const uint32_t* xs = packed + tile * (depth / 2) * kTile;
          for (int64_t s = s0; s < s1; ++s) {
            _tile_loadd(1, chunk.data() + (s - s0) * kTile * kDepth, 64);
            _tile_loadd(2, xs + s * (kDepth / 2) * kTile, 64);
            _tile_dpbf16ps(0, 1, 2);
          }
          _tile_stored(0, partial, 64);
        }
      }
    }
    _tile_release();
    // Each sum tile is [16 rows][16 tokens]; y wants [token][row]: a gather with stride 16 reads one token's column.
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(kTile));
    for (int64_t strip = strip_begin; strip < strip_end; ++strip) {
      const int64_t o0 = strip * kTile, rows = std::min(kTile, out - o0);
      const __mmask16 live = rows == kTile ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1);
      for (int64_t token = 0; token < tokens; ++token) {
        const float* tile_sums = sums.data() + (strip * tiles + token / kTile) * tile_floats + token % kTile;
        const __m512 sums_of_token = _mm512_i32gather_ps(column, tile_sums, 4);
        if constexpr (std::is_same_v<Out, float>) {
          _mm512_mask_storeu_ps(y + token * out + o0, live, sums_of_token);
        } else {
          _mm256_mask_storeu_epi16(y + token * out + o0, live, (__m256i)_mm512_cvtneps_pbh(sums_of_token));
        }
      }
    }
  });
}

}  // namespace slimserve_amx

#endif  // AMX + AVX512_BF16 + AVX512BW + AVX512VBMI2 on Linux
