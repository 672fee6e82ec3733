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

// `count` elements of the calling thread's scratch of type T, kept across calls (at prefill sizes, MiB, a fresh
// allocation was page-faulted on every call of every layer), at a 64-byte boundary: a tile row that straddles two
// cache lines takes two loads, and with the vectors' own alignment, which varies from process to process, the same
// 512-token product ran in 6 or in 15 ms.
template <typename T>
T* scratch(int64_t count) {
  static_assert(64 % sizeof(T) == 0);
  thread_local std::vector<T> buffer;
  buffer.resize(count + 64 / sizeof(T));
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<T*>((address + 63) / 64 * 64);
}

// x [tokens, in] bf16 as the tile unit's second operand: per tile of `lanes` tokens (16, or all tokens when fewer) and
// per pair of inputs (2i, 2i + 1) one row of 4 * lanes bytes holding (x[t, 2i], x[t, 2i + 1]) for those tokens; zeros
// past the last token and past `in` (up to the depth padded to 32, so the expanded rows' padding multiplies zeros).
// The tile count is rounded up to a multiple of `tile_multiple` with tiles of zeros.
inline const uint32_t* pack_tokens(const at::Tensor& x, int64_t lanes, int64_t tile_multiple = 1) {
  const int64_t tokens = x.size(0), in = x.size(1), pairs = padded_depth(in) / 2;
  const int64_t tiles = (tokens + lanes * tile_multiple - 1) / (lanes * tile_multiple) * tile_multiple;
  TORCH_CHECK(kTile * in < INT32_MAX, "AMX strips: 16 x in_features must fit int32 offsets");
  uint32_t* rows = scratch<uint32_t>(tiles * pairs * lanes);
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  // Offsets of token t's element in a tile, in bf16 units: one 32-bit gather reads a pair for 16 tokens.
  const __m512i token_offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int>(in)));
  at::parallel_for(0, tiles * pairs, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t tile = r / pairs, first = 2 * (r % pairs);
      const int64_t left = std::max<int64_t>(0, std::min(lanes, tokens - tile * lanes));
      const __mmask16 live = left >= kTile ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
      uint32_t* row = rows + r * lanes;
      if (first + 1 < in) {
        const __m512i both = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, token_offsets,
                                                         xs + tile * lanes * in + first, 2);
        _mm512_mask_storeu_epi32(row, lanes == kTile ? 0xFFFF : static_cast<__mmask16>((1u << lanes) - 1), both);
      } else {  // the last input of an odd count (its pair's second half zero), or padding past the inputs
        for (int64_t t = 0; t < lanes; ++t) row[t] = first < in && t < left ? xs[(tile * lanes + t) * in + first] : 0;
      }
    }
  });
  return rows;
}

// Writes strip `o0`'s sums to y [tokens, out]: `sums` holds per token tile one [16 rows][lanes tokens] fp32 tile, y
// wants [token][row], so a gather with stride `lanes` reads one token's column. bf16 y is rounded once from the fp32
// sums, as a bf16 GEMM's output (a separate fp32 -> bf16 pass over y cost about a quarter of a 500-token 2:4 prefill).
template <typename Out>
inline void write_strip(const float* sums, int64_t lanes, int64_t tokens, int64_t out, int64_t o0, Out* y) {
  const int64_t rows = std::min(kTile, out - o0);
  const __mmask16 live = rows == kTile ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1);
  const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(lanes)));
  for (int64_t token = 0; token < tokens; ++token) {
    const __m512 sums_of_token = _mm512_i32gather_ps(column, sums + token / lanes * kTile * lanes + token % lanes, 4);
    if constexpr (std::is_same_v<Out, float>) {
      _mm512_mask_storeu_ps(y + token * out + o0, live, sums_of_token);
    } else {
      _mm256_mask_storeu_epi16(y + token * out + o0, live, (__m256i)_mm512_cvtneps_pbh(sums_of_token));
    }
  }
}

// Up to this many token tiles (64 tokens: decode batches, speculative verification) a strip's sums stay in tile
// registers tmm0-3 while the strip walks its inputs in chunks of kL1ChunkSpans spans, each expanded into one of two
// 8 KiB buffers just before it is multiplied, so weight tiles load from L1 (a whole expanded strip, 64 KiB at 2048
// inputs, did not fit there, and its tile loads came from L2).
constexpr int64_t kRegisterTiles = 4;
constexpr int64_t kL1ChunkSpans = 8;

// Rows o0 .. o0 + rows - 1 (rows <= 16, fewer at the last strip) of spans s0 .. s1 expanded into the span-major
// `chunk` (see strips), the strip's other rows zero; consumed[n] is row o0 + n's carry for expand_row.
template <typename ExpandRow>
inline void expand_strip(const ExpandRow& expand_row, int64_t o0, int64_t rows, int64_t s0, int64_t s1,
                         int64_t* consumed, uint16_t* chunk) {
  for (int64_t n = 0; n < kTile; ++n) {
    uint16_t* dense = chunk + n * kDepth;
    if (n < rows) {
      expand_row(o0 + n, dense, kTile * kDepth, s0, s1, consumed[n]);
    } else {
      for (int64_t s = s0; s < s1; ++s) _mm512_storeu_si512(dense + (s - s0) * kTile * kDepth, _mm512_setzero_si512());
    }
  }
}

// One span of a strip times `Tiles` token tiles: weights in tmm4, tokens through tmm5-7, sums in tmm0 .. Tiles - 1.
template <int Tiles>
inline void multiply_span(const uint16_t* weights, const uint32_t* tokens, int64_t tile_step, int64_t stride) {
  _tile_loadd(4, weights, 64);
  _tile_loadd(5, tokens, stride);
  _tile_dpbf16ps(0, 4, 5);
  if constexpr (Tiles > 1) {
    _tile_loadd(6, tokens + tile_step, stride);
    _tile_dpbf16ps(1, 4, 6);
  }
  if constexpr (Tiles > 2) {
    _tile_loadd(7, tokens + 2 * tile_step, stride);
    _tile_dpbf16ps(2, 4, 7);
  }
  if constexpr (Tiles > 3) {
    _tile_loadd(5, tokens + 3 * tile_step, stride);
    _tile_dpbf16ps(3, 4, 5);
  }
}

template <int Tiles>
inline void store_sums(float* sums, int64_t stride) {
  _tile_stored(0, sums, stride);
  if constexpr (Tiles > 1) _tile_stored(1, sums + kTile * kTile, stride);
  if constexpr (Tiles > 2) _tile_stored(2, sums + 2 * kTile * kTile, stride);
  if constexpr (Tiles > 3) _tile_stored(3, sums + 3 * kTile * kTile, stride);
}

template <int Tiles>
inline void zero_sums() {
  _tile_zero(0);
  if constexpr (Tiles > 1) _tile_zero(1);
  if constexpr (Tiles > 2) _tile_zero(2);
  if constexpr (Tiles > 3) _tile_zero(3);
}

// y = x · Wᵀ for up to kRegisterTiles token tiles (see strips); x packed by pack_tokens with `lanes` tokens a tile.
template <int Tiles, typename ExpandRow, typename Out>
void register_strips(const uint32_t* packed, int64_t lanes, int64_t tokens, int64_t in, int64_t out,
                     const ExpandRow& expand_row, Out* y) {
  const int64_t depth = padded_depth(in), spans = depth / kDepth, strip_count = (out + kTile - 1) / kTile;
  const int64_t tile_step = depth / 2 * lanes, span_step = kDepth / 2 * lanes, stride = 4 * lanes;
  at::parallel_for(0, strip_count, 1, [&](int64_t strip_begin, int64_t strip_end) {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {  // tmm0-3: sums [16 rows, lanes tokens] fp32; tmm4: weights; tmm5-7: tokens
      config.rows[t] = kTile;
      config.colsb[t] = t == 4 ? 64 : static_cast<uint16_t>(stride);
    }
    _tile_loadconfig(&config);
    alignas(64) uint16_t chunks[2][kTile * kL1ChunkSpans * kDepth];
    alignas(64) float sums[kRegisterTiles * kTile * kTile];
    int64_t chunk_count = 0;
    for (int64_t strip = strip_begin; strip < strip_end; ++strip) {
      const int64_t o0 = strip * kTile, rows = std::min(kTile, out - o0);
      int64_t consumed[kTile] = {};
      zero_sums<Tiles>();
      for (int64_t s0 = 0; s0 < spans; s0 += kL1ChunkSpans) {
        const int64_t s1 = std::min(spans, s0 + kL1ChunkSpans);
        uint16_t* chunk = chunks[chunk_count++ & 1];  // the other buffer may still feed tile loads in flight
        expand_strip(expand_row, o0, rows, s0, s1, consumed, chunk);
        for (int64_t s = s0; s < s1; ++s) {
          multiply_span<Tiles>(chunk + (s - s0) * kTile * kDepth, packed + s * span_step, tile_step, stride);
        }
      }
      store_sums<Tiles>(sums, stride);
      write_strip(sums, lanes, tokens, out, o0, y);
    }
    _tile_release();
  });
}

// Inputs per K-chunk above kRegisterTiles token tiles, in spans of 32: 512 inputs, so x's chunk for 500 tokens is
// 512 KiB (L2). Without chunks each strip multiplied all of x: at 500 tokens and 5632 inputs that streamed 5.6 MiB of
// packed x from L3 per strip.
constexpr int64_t kChunkSpans = 16;
// Strips per block above kRegisterTiles token tiles: a block walks all K-chunks before the next starts, so its sums
// (32 KiB a strip at 512 tokens, 512 KiB a block) stay in L2 beside x's chunk; with all of a thread's strips in one
// pass their sums (11 MiB at [5632, 2048]) crossed L3 twice a chunk. Even, so blocks hold whole pairs of strips.
constexpr int64_t kBlockStrips = 16;

// Two strips' expanded chunks times two token tiles, the sums of the four products in tmm0-3 across the chunk's
// spans: each weight and token tile loaded feeds two multiplies, where one multiply per two loads (the tokens' from
// L2) ran [5632, 2048] at 512 tokens in 5.8 ms against 5.5 (Intel Xeon, 2 threads).
inline void multiply_chunk_2x2(const uint16_t* weights_a, const uint16_t* weights_b, const uint32_t* tokens_a,
                               const uint32_t* tokens_b, int64_t spans, float* sums_a, float* sums_b, bool first) {
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, sums_a, 64);
    _tile_loadd(1, sums_a + kTile * kTile, 64);
    _tile_loadd(2, sums_b, 64);
    _tile_loadd(3, sums_b + kTile * kTile, 64);
  }
  for (int64_t s = 0; s < spans; ++s) {
    _tile_loadd(4, weights_a + s * kTile * kDepth, 64);
    _tile_loadd(6, tokens_a + s * (kDepth / 2) * kTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, tokens_b + s * (kDepth / 2) * kTile, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, weights_b + s * kTile * kDepth, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, sums_a, 64);
  _tile_stored(1, sums_a + kTile * kTile, 64);
  _tile_stored(2, sums_b, 64);
  _tile_stored(3, sums_b + kTile * kTile, 64);
}

// y [tokens, out] = x · Wᵀ for contiguous bf16 x [tokens, in], y float32 or bf16 (rounded once from the fp32 sums).
// Threads take strips of 16 rows and expand each strip's rows chunk by chunk with `expand_row(o, dense, span_stride,
// s0, s1, consumed)` (row o's 32 bf16 inputs of span s written at dense + (s - s0) * span_stride, padding past the
// row's inputs zero; `consumed` starts at 0 and is the expander's to carry from one chunk of a row to the next, e.g.
// how many stored values the spans before s0 used), so each weight element is expanded once a call. A chunk is
// span-major, so each [16 rows, 32 inputs] tile is one contiguous KiB: row-major with a stride of 2 * in bytes put all
// 16 rows of a tile load in one L1 set at in = 2048. Up to kRegisterTiles token tiles the sums stay in tile registers
// (register_strips); above, each thread walks blocks of its strips, a block the inputs in K-chunks, a chunk its strips
// and token tiles in pairs (multiply_chunk_2x2), and the sums per strip and token tile wait in L2 between chunks.
template <typename ExpandRow, typename Out>
void strips(const at::Tensor& x, int64_t out, const ExpandRow& expand_row, Out* y) {
  const int64_t tokens = x.size(0), in = x.size(1);
  const int64_t depth = padded_depth(in), spans = depth / kDepth, tiles = (tokens + kTile - 1) / kTile;
  const int64_t strip_count = (out + kTile - 1) / kTile, tile_floats = kTile * kTile;
  if (tiles <= kRegisterTiles) {
    // A lone tile of fewer than 16 tokens is packed and multiplied at its own width: half the loads at 8 tokens.
    const int64_t lanes = std::min(kTile, tokens);
    const uint32_t* packed = pack_tokens(x, lanes);
    switch (tiles) {
      case 1: return register_strips<1>(packed, lanes, tokens, in, out, expand_row, y);
      case 2: return register_strips<2>(packed, lanes, tokens, in, out, expand_row, y);
      case 3: return register_strips<3>(packed, lanes, tokens, in, out, expand_row, y);
      default: return register_strips<4>(packed, lanes, tokens, in, out, expand_row, y);
    }
  }
  const int64_t tile_pairs = (tiles + 1) / 2, padded_tiles = 2 * tile_pairs;  // an odd count gains a tile of zeros
  const uint32_t* packed = pack_tokens(x, kTile, 2);
  const int64_t tile_step = depth / 2 * kTile, span_step = kDepth / 2 * kTile;
  at::parallel_for(0, strip_count, 1, [&](int64_t strip_begin, int64_t strip_end) {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {  // tmm0-3: sums [16 rows, 16 tokens] fp32; tmm4-5: weights; tmm6-7: tokens
      config.rows[t] = kTile;
      config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    alignas(64) uint16_t chunks[2][kTile * kChunkSpans * kDepth];
    int64_t consumed[kBlockStrips * kTile];
    float* sums = scratch<float>(kBlockStrips * padded_tiles * tile_floats);  // [strip of block][tile][16][16]
    for (int64_t block = strip_begin; block < strip_end; block += kBlockStrips) {
      // A block of an odd strip count ends in a strip past its range whose rows expand to zeros and are not written.
      const int64_t block_end = std::min(strip_end, block + kBlockStrips);
      std::fill(consumed, consumed + kBlockStrips * kTile, 0);
      for (int64_t s0 = 0; s0 < spans; s0 += kChunkSpans) {
        const int64_t s1 = std::min(spans, s0 + kChunkSpans);
        for (int64_t pair = block; pair < block_end; pair += 2) {
          for (int64_t half = 0; half < 2; ++half) {
            const int64_t strip = pair + half, o0 = strip * kTile;
            const int64_t rows = strip < block_end ? std::min(kTile, out - o0) : 0;
            expand_strip(expand_row, o0, rows, s0, s1, consumed + (strip - block) * kTile, chunks[half]);
          }
          float* sums_a = sums + (pair - block) * padded_tiles * tile_floats;
          float* sums_b = sums_a + padded_tiles * tile_floats;
          for (int64_t tile = 0; tile < padded_tiles; tile += 2) {
            const uint32_t* tokens_a = packed + tile * tile_step + s0 * span_step;
            multiply_chunk_2x2(chunks[0], chunks[1], tokens_a, tokens_a + tile_step, s1 - s0,
                               sums_a + tile * tile_floats, sums_b + tile * tile_floats, s0 == 0);
          }
        }
      }
      for (int64_t strip = block; strip < block_end; ++strip) {
        write_strip(sums + (strip - block) * padded_tiles * tile_floats, kTile, tokens, out, strip * kTile, y);
      }
    }
    _tile_release();
  });
}

}  // namespace slimserve_amx

#endif  // AMX + AVX512_BF16 + AVX512BW + AVX512VBMI2 on Linux
