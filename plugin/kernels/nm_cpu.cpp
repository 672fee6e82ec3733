// N:M semi-structured sparse × dense product on CPU: y[n, o] = Σ_j x[n, col(o, j)] · values[o, j], where
// col(o, j) = (j / kept) · group + offset(o, j) and the offsets are packed ceil(log2 group) bits each, little-endian
// per row (see loaders/schemes/nm.py). The stored bytes (values + packed offsets) are read once per row and batch of
// up to 8 tokens: at decode the product is memory-bound, so reading 56 % of dense bf16's bytes (2:4) is the speed-up.
//
// 2:4 has a permute path: 16 values (8 groups) cover 32 consecutive inputs and their 32 offset bits are one uint32,
// decoded into 16 lane indices with a variable shift; the x entries are picked out of two registers with a permute
// (AVX-512 vpermt2ps; AVX2 two vpermps and a blend). 4:8 has the same path with 3-bit offsets (16 values = 4 groups
// = 32 inputs, 48 offset bits); the two differ only in how a block's offsets become lane indices (block_index). 1:4
// too, with 16 values covering 64 inputs (two permutes and a fixed blend). Other patterns decode each row's columns
// into a small buffer and gather. Built at first use by plugin/kernels/cpp.py for the best ISA the flags allow:
// AVX-512, AVX2 + FMA (AMD EPYC hosts have no AVX-512), else scalar. Many-token steps multiply only the kept weights
// on AVX2 builds, elsewhere strips of rows decompressed in cache (both in vector_rows.h). bf16 batches of 2:4 and 4:8
// on CPUs with AMX run on the tile unit instead (amx_strips.h), prefill included.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "amx_strips.h"
#include "vector_rows.h"

namespace {

using slimserve_rows::kIsa;
#if defined(SLIMSERVE_AVX2)
using slimserve_rows::load_values8;
using slimserve_rows::reduce_add8;
#endif

constexpr int64_t kTokenBlock = 8;  // accumulators kept in registers per row; larger batches loop over blocks

// Offset of stored entry j of a row whose packed bit stream starts at `row` (bits per entry `bits`).
inline int32_t offset_at(const uint8_t* row, int64_t j, int bits) {
  const int64_t bit = j * bits;
  uint32_t word = row[bit >> 3];
  if (((bit & 7) + bits) > 8) word |= static_cast<uint32_t>(row[(bit >> 3) + 1]) << 8;
  return static_cast<int32_t>((word >> (bit & 7)) & ((1u << bits) - 1));
}

// Input column of every stored entry of one row (group start + offset), times `scale` (1, or a panel row's length so
// each is an offset into a panel), without per-entry divisions. 2:4 takes a byte (two groups, four values) at a
// time without bit arithmetic across bytes; a row whose inputs end in a lone group reads the low half of its byte.
inline void decode_columns(const uint8_t* meta, int32_t* cols, int64_t in, int64_t kept, int64_t group, int bits,
                           int32_t scale = 1) {
  if (kept == 2 && group == 4) {
    for (int64_t d = 0; d < (in + 4) / 8; ++d) {
      const int32_t m = meta[d], base = static_cast<int32_t>(8 * d);
      cols[4 * d] = (base + (m & 3)) * scale;
      cols[4 * d + 1] = (base + ((m >> 2) & 3)) * scale;
      if (8 * d + 4 < in) {
        cols[4 * d + 2] = (base + 4 + ((m >> 4) & 3)) * scale;
        cols[4 * d + 3] = (base + 4 + ((m >> 6) & 3)) * scale;
      }
    }
    return;
  }
  int64_t j = 0, start = 0;
  if (kept == 4 && group == 8) {
    // Two 4:8 groups' eight 3-bit offsets fill three bytes: one 24-bit word, no entry crossing a byte boundary to
    // test. Entry by entry through offset_at, the kept-weights loop's per-call decode took a 64-token [5632, 2048]
    // float32 call from 13.6 to 17.8 ms (AMD EPYC Zen 3, 2 threads; dense oneDNN 13.7).
    for (; start + 16 <= in; start += 16, j += 8) {
      const uint8_t* bytes = meta + j / 8 * 3;
      const uint32_t word = bytes[0] | static_cast<uint32_t>(bytes[1]) << 8 | static_cast<uint32_t>(bytes[2]) << 16;
      for (int i = 0; i < 8; ++i) {
        cols[j + i] = (static_cast<int32_t>(start) + i / 4 * 8 + static_cast<int32_t>((word >> (3 * i)) & 7)) * scale;
      }
    }
  }
  for (; start < in; start += group) {
    for (int64_t k = 0; k < kept; ++k, ++j) {
      cols[j] = (static_cast<int32_t>(start) + offset_at(meta, j, bits)) * scale;
    }
  }
}

template <typename V> inline float to_float(V v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
template <typename V> inline __m512 load16(const V* p) {
  if constexpr (std::is_same<V, float>::value) {
    return _mm512_loadu_ps(p);
  } else {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
}
#endif

// The patterns with a permute path. Each turns the offsets of one block of stored values starting at j (16 with
// AVX-512, 8 with AVX2) into each value's input position relative to the block's first input (group / kept * j);
// rows_fixed does the rest. 2:4 and 4:8 store half their inputs, so a block spans 32 inputs (AVX2: 16); 1:4 a quarter,
// so 64 (AVX2: 32).
// 2:4 and 1:4: 2-bit offsets, so a block's 16 values (AVX2: 8) have one 32-bit word (16 bits) of offsets; value i
// sits in group i / kKept, at input 4 (i / kKept) + its offset from the block's first input.
template <int KeptOfFour>
struct OfFour {
  static constexpr int kKept = KeptOfFour, kGroup = 4, kBits = 2;
#if defined(__AVX512F__)
  static __m512i block_index(const uint8_t* meta, int64_t j) {
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i shifts = _mm512_slli_epi32(lanes, 1);
    const __m512i bases = _mm512_slli_epi32(_mm512_srli_epi32(lanes, kKept - 1), 2);  // 4 (i / kKept), kKept 1 or 2
    uint32_t word;
    std::memcpy(&word, meta + j / 4, 4);
    return _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts),
                                             _mm512_set1_epi32(3)), bases);
  }
#elif defined(SLIMSERVE_AVX2)
  static __m256i block_index(const uint8_t* meta, int64_t j) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i shifts = _mm256_slli_epi32(lanes, 1);
    const __m256i bases = _mm256_slli_epi32(_mm256_srli_epi32(lanes, kKept - 1), 2);
    uint16_t half;
    std::memcpy(&half, meta + j / 4, 2);
    return _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(half), shifts),
                                             _mm256_set1_epi32(3)), bases);
  }
#endif
};
using TwoOfFour = OfFour<2>;
using OneOfFour = OfFour<1>;

struct FourOfEight {
  static constexpr int kKept = 4, kGroup = 8, kBits = 3;
#if defined(__AVX512F__)
  // 16 values = 4 groups = inputs 2j .. 2j + 31; their 48 offset bits are six bytes, spread over the lanes from two
  // 24-bit halves (lanes 0-7 read bits 0-23, lanes 8-15 bits 24-47). Exactly six bytes are read (the row's last
  // block may end the tensor), as whole words: assembling them in memory and reading them back wider stalls store
  // forwarding on every block.
  static __m512i block_index(const uint8_t* meta, int64_t j) {
    const __m512i shifts = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 0, 3, 6, 9, 12, 15, 18, 21);
    const __m512i bases = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
    uint32_t first;
    uint16_t last;
    std::memcpy(&first, meta + j / 16 * 6, 4);
    std::memcpy(&last, meta + j / 16 * 6 + 4, 2);
    const uint32_t high = (first >> 24) | (static_cast<uint32_t>(last) << 8);
    const __m512i spread = _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(first)), 0xFF00,
                                                  static_cast<int>(high));
    return _mm512_add_epi32(_mm512_and_si512(_mm512_srlv_epi32(spread, shifts), _mm512_set1_epi32(7)), bases);
  }
#elif defined(SLIMSERVE_AVX2)
  // 8 values = 2 groups = inputs 2j .. 2j + 15; 24 offset bits, three bytes
  static __m256i block_index(const uint8_t* meta, int64_t j) {
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    const __m256i bases = _mm256_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8);
    uint16_t pair;
    std::memcpy(&pair, meta + j / 8 * 3, 2);
    const uint32_t word = pair | (static_cast<uint32_t>(meta[j / 8 * 3 + 2]) << 16);
    return _mm256_add_epi32(
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), _mm256_set1_epi32(7)),
        bases);
  }
#endif
};

#if defined(__AVX512F__)
// The 16 x entries a block's indices name, from its window of 16 * kSpread inputs at xr (kSpread = group / kept).
// A window of 64 (1:4) is two pairs of registers: lanes 0-7 always index the first 32 inputs, lanes 8-15 the last.
template <int kSpread>
inline __m512 pick16(const float* xr, __m512i idx) {
  const __m512 low = _mm512_permutex2var_ps(_mm512_loadu_ps(xr), idx, _mm512_loadu_ps(xr + 16));
  if constexpr (kSpread == 2) {
    return low;
  } else {
    const __m512 high = _mm512_permutex2var_ps(_mm512_loadu_ps(xr + 32), idx, _mm512_loadu_ps(xr + 48));
    return _mm512_mask_blend_ps(0xFF00, low, high);
  }
}
#elif defined(SLIMSERVE_AVX2)
// The 8 x entries a block's indices name, from its window of 8 * kSpread inputs at xr: per 16 inputs two vpermps and
// a blend on bit 3 of the index; a window of 32 (1:4) takes lanes 0-3 from the first 16 inputs, 4-7 from the last.
template <int kSpread>
inline __m256 pick8(const float* xr, __m256i idx) {
  const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 of the index as the sign bit
  const auto half = [&](const float* x16) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(x16), idx),
                            _mm256_permutevar8x32_ps(_mm256_loadu_ps(x16 + 8), idx), upper);
  };
  if constexpr (kSpread == 2) {
    return half(xr);
  } else {
    return _mm256_blend_ps(half(xr), half(xr + 16), 0xF0);
  }
}
#endif

// Rows of a permute-path pattern for a block of NT tokens (a compile-time count, so the NT accumulators stay in
// registers): x is [tokens, in] float32 starting at the block's first token, y [tokens, out] float32 likewise. The
// x entries of a block are picked out of its window with permutes (pick16 / pick8).
template <typename V, int NT, typename Pattern>
void rows_fixed(const float* x, const V* values, const uint8_t* positions, float* y, int64_t in, int64_t out,
                int64_t row_begin, int64_t row_end) {
  constexpr int kSpread = Pattern::kGroup / Pattern::kKept;  // inputs per stored value
  const int64_t stored = in / kSpread, meta_bytes = (stored * Pattern::kBits + 7) / 8;
#if defined(__AVX512F__)
  const int64_t main = stored / 16 * 16;
#elif defined(SLIMSERVE_AVX2)
  const int64_t main = stored / 8 * 8;
#else
  const int64_t main = 0;
#endif
  for (int64_t o = row_begin; o < row_end; ++o) {
    const V* val = values + o * stored;
    const uint8_t* meta = positions + o * meta_bytes;
    float sums[NT];
#if defined(__AVX512F__)
    __m512 acc[NT];
    for (int n = 0; n < NT; ++n) acc[n] = _mm512_setzero_ps();
    for (int64_t j = 0; j < main; j += 16) {
      const __m512i idx = Pattern::block_index(meta, j);
      const __m512 vv = load16(val + j);
      for (int n = 0; n < NT; ++n) acc[n] = _mm512_fmadd_ps(pick16<kSpread>(x + n * in + kSpread * j, idx), vv, acc[n]);
    }
    for (int n = 0; n < NT; ++n) sums[n] = _mm512_reduce_add_ps(acc[n]);
#elif defined(SLIMSERVE_AVX2)
    __m256 acc[NT];
    for (int n = 0; n < NT; ++n) acc[n] = _mm256_setzero_ps();
    for (int64_t j = 0; j < main; j += 8) {
      const __m256i idx = Pattern::block_index(meta, j);
      const __m256 vv = load_values8(val + j);
      for (int n = 0; n < NT; ++n) acc[n] = _mm256_fmadd_ps(pick8<kSpread>(x + n * in + kSpread * j, idx), vv, acc[n]);
    }
    for (int n = 0; n < NT; ++n) sums[n] = reduce_add8(acc[n]);
#else
    for (int n = 0; n < NT; ++n) sums[n] = 0.f;
#endif
    for (int64_t j = main; j < stored; ++j) {  // tail (and the whole row in the scalar build)
      const int64_t col = j / Pattern::kKept * Pattern::kGroup + offset_at(meta, j, Pattern::kBits);
      const float v = to_float(val[j]);
      for (int n = 0; n < NT; ++n) sums[n] += x[n * in + col] * v;
    }
    for (int n = 0; n < NT; ++n) y[n * out + o] = sums[n];
  }
}

#if defined(SLIMSERVE_AVX2)
// AVX2 rows of 2:4 and 4:8 at every token count: each row's kept values are expanded to dense lanes in registers,
// 8 inputs at a time (4 stored values, zero lanes where pruned), and multiplied with plain FMAs against x (read
// interleaved, below).
// The permute path above re-picks x entries for every token (two vpermps and a blend per token and 8 values); here
// the one permute per 8 inputs is shared by every token of the block, so the FMAs alone bound the loop even though
// it multiplies the pruned zeros too. Up to 4 tokens the inputs alternate between accumulator sets so that at least
// four FMA chains are in flight: with one chain a token the expanded loop lost to the permute path at one token and
// so did not serve it. Inputs go in chunks whose x rows of a block stay in L1 while the thread's rows pass over them
// (8 tokens of 2048 fp32 inputs are 64 KiB, twice an EPYC core's L1): 24 KiB of x a chunk, at least 512 inputs.
// Short chunks cost few tokens their streaming: a chunk of a row is then a few cache lines, and at one token the
// 512-input chunks of old ran at 0.93 ms on [5632, 2048] (bf16, streamed) against 0.56 for whole rows. AMD EPYC
// (Zen 2), 2 threads, bf16, weights streamed, ms permute path / expanded, [5632, 2048]: one token 0.93 / 0.56, and
// the expanded loop with one set against two at 2 tokens 1.09 / 0.66, 4 tokens 1.24 / 1.00; [2048, 5632] one token
// 0.92 / 0.57, 2 tokens 1.08 / 0.78; 8 tokens (one set either way) level, 1.7-1.8.
// A block's x is read interleaved (slimserve_rows::interleaved_tokens, which says why).
constexpr int64_t kExpandedChunkBytes = 24 * 1024;
constexpr int64_t kExpandedMinChunk = 512;

// Lane bytes of 8 dense inputs: which of 4 stored values (lanes 0-3 of a register whose lanes 4-7 are zero) each input
// takes, 4 (a zero lane) where pruned.
struct TwoOfFourLanes {
  static constexpr int kBits = 2;
  uint64_t byte_lanes[256];  // one offsets byte = two groups = 4 stored values = 8 inputs
  // For bf16 values, the bf16_placing_control (vector_rows.h) per offsets byte: each kept input takes its stored
  // value (the 8 bytes of the 4 values broadcast to both 128-bit halves), pruned inputs zero.
  alignas(32) int8_t bf16_control[256][32];
  TwoOfFourLanes() {
    for (int b = 0; b < 256; ++b) {
      uint8_t lanes[8] = {4, 4, 4, 4, 4, 4, 4, 4};
      for (int k = 0; k < 4; ++k) lanes[k / 2 * 4 + ((b >> (2 * k)) & 3)] = static_cast<uint8_t>(k);
      std::memcpy(&byte_lanes[b], lanes, 8);
      int value_of_lane[8];
      for (int i = 0; i < 8; ++i) value_of_lane[i] = lanes[i] < 4 ? lanes[i] : -1;
      slimserve_rows::bf16_placing_control(value_of_lane, bf16_control[b]);
    }
  }
  uint64_t operator()(const uint8_t* meta, int64_t d) const { return byte_lanes[meta[d]]; }  // inputs 8d .. 8d + 7
  __m256i bf16_placing(const uint8_t* meta, int64_t d) const {
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(bf16_control[meta[d]]));
  }
};

struct FourOfEightLanes {
  static constexpr int kBits = 3;
  uint64_t pair_lanes[64];  // two 3-bit offsets -> lanes 0 and 1 at them, 4 elsewhere (4096 whole-group entries would
                            // not stay in L1 beside x)
  // For bf16 values, the bf16_placing_control (vector_rows.h) of each pair of offsets: the first pair places stored
  // values 0 and 1, the second 2 and 3. A group's control is the bytewise min of its pairs' (vpshufb's zero byte, -128,
  // is above every byte index), so bf16 groups take TwoOfFourLanes' one shuffle: the permute road above moved the
  // offsets between general and vector registers three times a group and ran one token at 3.5x 2:4's time (2.2 against
  // 0.62 ms on [5632, 2048], AMD EPYC Zen 3).
  alignas(32) int8_t first_control[64][32];
  alignas(32) int8_t second_control[64][32];
  FourOfEightLanes() {
    for (int c = 0; c < 64; ++c) {
      uint8_t lanes[8] = {4, 4, 4, 4, 4, 4, 4, 4};
      lanes[c & 7] = 0;
      lanes[c >> 3] = 1;
      std::memcpy(&pair_lanes[c], lanes, 8);
      int first[8] = {-1, -1, -1, -1, -1, -1, -1, -1}, second[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
      first[c & 7] = 0;
      first[c >> 3] = 1;
      second[c & 7] = 2;
      second[c >> 3] = 3;
      slimserve_rows::bf16_placing_control(first, first_control[c]);
      slimserve_rows::bf16_placing_control(second, second_control[c]);
    }
  }
  static uint32_t group_bits(const uint8_t* meta, int64_t d) {  // group d: 12 offset bits from bit 12d
    uint16_t bits;
    std::memcpy(&bits, meta + d * 12 / 8, 2);
    return (bits >> (d * 12 % 8)) & 0xFFF;
  }
  uint64_t operator()(const uint8_t* meta, int64_t d) const {
    const uint32_t group = group_bits(meta, d);
    // the second pair's lanes are 2, 3 (and 6, a zero lane too, where pruned); the bytewise min merges the pairs
    const __m128i first = _mm_cvtsi64_si128(static_cast<int64_t>(pair_lanes[group & 63]));
    const __m128i second = _mm_add_epi8(_mm_cvtsi64_si128(static_cast<int64_t>(pair_lanes[group >> 6])),
                                        _mm_set1_epi8(2));
    return static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_min_epu8(first, second)));
  }
  __m256i bf16_placing(const uint8_t* meta, int64_t d) const {
    const uint32_t group = group_bits(meta, d);
    return _mm256_min_epu8(_mm256_load_si256(reinterpret_cast<const __m256i*>(first_control[group & 63])),
                           _mm256_load_si256(reinterpret_cast<const __m256i*>(second_control[group >> 6])));
  }
};

// 4 stored values in lanes 0-3, zeros in lanes 4-7.
template <typename V> inline __m256 load4_zero_upper(const V* p) {
  __m128 four;
  if constexpr (std::is_same<V, float>::value) {
    four = _mm_loadu_ps(p);
  } else {
    const __m128i wide = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    four = _mm_castsi128_ps(_mm_slli_epi32(wide, 16));
  }
  return _mm256_set_m128(_mm_setzero_ps(), four);
}

template <typename V, int NT, typename Lanes>
void rows_expanded(const float* x, const V* values, const uint8_t* positions, float* y, int64_t in, int64_t out,
                   int64_t row_begin, int64_t row_end, const Lanes& lanes) {
  const int64_t stored = in / 2, meta_bytes = (stored * Lanes::kBits + 7) / 8;
  constexpr int kChains = NT >= 5 ? 1 : NT >= 2 ? 2 : 4;
  constexpr int64_t chunk = std::max<int64_t>(kExpandedMinChunk, kExpandedChunkBytes / (NT * sizeof(float)) / 8 * 8);
  for (int64_t c0 = 0; c0 < in; c0 += chunk) {
    const int64_t d1 = std::min(in, c0 + chunk) / 8;
    for (int64_t o = row_begin; o < row_end; ++o) {
      const V* val = values + o * stored;
      const uint8_t* meta = positions + o * meta_bytes;
      __m256 acc[kChains][NT];
      for (int c = 0; c < kChains; ++c) {
        for (int n = 0; n < NT; ++n) acc[c][n] = _mm256_setzero_ps();
      }
      // A chunk of a row is a few cache lines: too short for the hardware prefetcher to ramp up on each new row, so
      // the row two ahead is prefetched by hand (a line of its values per 8 offsets bytes).
      _mm_prefetch(reinterpret_cast<const char*>(meta + 2 * meta_bytes + c0 / 8), _MM_HINT_T0);
      const auto step = [&](auto chain, int64_t d) {
        constexpr int c = decltype(chain)::value;
        __m256 w;
        if constexpr (std::is_same<V, c10::BFloat16>::value) {
          int64_t four;
          std::memcpy(&four, val + 4 * d, sizeof(four));
          w = _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_set1_epi64x(four), lanes.bf16_placing(meta, d)));
        } else {
          const __m256i idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(lanes(meta, d))));
          w = _mm256_permutevar8x32_ps(load4_zero_upper(val + 4 * d), idx);
        }
        for (int n = 0; n < NT; ++n) acc[c][n] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (d * NT + n) * 8), w, acc[c][n]);
      };
      int64_t d = c0 / 8;
      for (; d + 8 <= d1; d += 8) {
        _mm_prefetch(reinterpret_cast<const char*>(val + 2 * stored + 4 * d), _MM_HINT_T0);
        slimserve_rows::each_of_8([&](auto k) {
          step(std::integral_constant<int, decltype(k)::value % kChains>{}, d + k);
        });
      }
      for (; d < d1; ++d) step(std::integral_constant<int, 0>{}, d);
      for (int n = 0; n < NT; ++n) {
        __m256 total = acc[0][n];
        for (int c = 1; c < kChains; ++c) total = _mm256_add_ps(total, acc[c][n]);
        y[n * out + o] = (c0 == 0 ? 0.f : y[n * out + o]) + reduce_add8(total);
      }
    }
  }
}

template <typename V, typename Lanes>
void rows_expanded_tokens(const float* x, const V* values, const uint8_t* positions, float* y, int64_t tokens,
                          int64_t in, int64_t out, int64_t row_begin, int64_t row_end, const Lanes& lanes) {
  for (int64_t n0 = 0; n0 < tokens; n0 += kTokenBlock) {
    const float* xb = x + n0 * in;
    float* yb = y + n0 * out;
    switch (std::min(kTokenBlock, tokens - n0)) {
      case 1: rows_expanded<V, 1>(xb, values, positions, yb, in, out, row_begin, row_end, lanes); break;
      case 2: rows_expanded<V, 2>(xb, values, positions, yb, in, out, row_begin, row_end, lanes); break;
      case 3: rows_expanded<V, 3>(xb, values, positions, yb, in, out, row_begin, row_end, lanes); break;
      case 4: rows_expanded<V, 4>(xb, values, positions, yb, in, out, row_begin, row_end, lanes); break;
      case 5: rows_expanded<V, 5>(xb, values, positions, yb, in, out, row_begin, row_end, lanes); break;
      case 6: rows_expanded<V, 6>(xb, values, positions, yb, in, out, row_begin, row_end, lanes); break;
      case 7: rows_expanded<V, 7>(xb, values, positions, yb, in, out, row_begin, row_end, lanes); break;
      default: rows_expanded<V, 8>(xb, values, positions, yb, in, out, row_begin, row_end, lanes); break;
    }
  }
}
#endif  // SLIMSERVE_AVX2

// All tokens through rows_fixed, in blocks of up to 8 (each block re-reads the rows, which are cache-hot then).
template <typename V, typename Pattern>
void rows_tokens(const float* x, const V* values, const uint8_t* positions, float* y, int64_t tokens, int64_t in,
                 int64_t out, int64_t row_begin, int64_t row_end) {
  for (int64_t n0 = 0; n0 < tokens; n0 += kTokenBlock) {
    const float* xb = x + n0 * in;
    float* yb = y + n0 * out;
    switch (std::min(kTokenBlock, tokens - n0)) {
      case 1: rows_fixed<V, 1, Pattern>(xb, values, positions, yb, in, out, row_begin, row_end); break;
      case 2: rows_fixed<V, 2, Pattern>(xb, values, positions, yb, in, out, row_begin, row_end); break;
      case 3: rows_fixed<V, 3, Pattern>(xb, values, positions, yb, in, out, row_begin, row_end); break;
      case 4: rows_fixed<V, 4, Pattern>(xb, values, positions, yb, in, out, row_begin, row_end); break;
      case 5: rows_fixed<V, 5, Pattern>(xb, values, positions, yb, in, out, row_begin, row_end); break;
      case 6: rows_fixed<V, 6, Pattern>(xb, values, positions, yb, in, out, row_begin, row_end); break;
      case 7: rows_fixed<V, 7, Pattern>(xb, values, positions, yb, in, out, row_begin, row_end); break;
      default: rows_fixed<V, 8, Pattern>(xb, values, positions, yb, in, out, row_begin, row_end); break;
    }
  }
}

// Any kept:group: decode the row's input columns once, then gather x per token.
template <typename V>
void rows_general(const float* x, const V* values, const uint8_t* positions, float* y, int64_t tokens, int64_t in,
                  int64_t out, int64_t kept, int64_t group, int64_t row_begin, int64_t row_end) {
  const int bits = group <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(group - 1));
  const int64_t stored = in / group * kept, meta_bytes = (stored * bits + 7) / 8;
  std::vector<int32_t> cols(stored);
  for (int64_t o = row_begin; o < row_end; ++o) {
    const V* val = values + o * stored;
    const uint8_t* meta = positions + o * meta_bytes;
    decode_columns(meta, cols.data(), in, kept, group, bits);
    for (int64_t n = 0; n < tokens; ++n) {
      const float* xr = x + n * in;
      float s = 0.f;
      int64_t j = 0;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (; j + 16 <= stored; j += 16) {
        const __m512i idx = _mm512_loadu_si512(cols.data() + j);
        acc = _mm512_fmadd_ps(_mm512_i32gather_ps(idx, xr, 4), load16(val + j), acc);
      }
      s = _mm512_reduce_add_ps(acc);
#elif defined(SLIMSERVE_AVX2)
      __m256 acc = _mm256_setzero_ps();
      for (; j + 8 <= stored; j += 8) {
        const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols.data() + j));
        acc = _mm256_fmadd_ps(_mm256_i32gather_ps(xr, idx, 4), load_values8(val + j), acc);
      }
      s = reduce_add8(acc);
#endif
      for (; j < stored; ++j) s += xr[cols[j]] * to_float(val[j]);
      y[n * out + o] = s;
    }
  }
}

template <typename V>
void matmul_dispatch(const torch::Tensor& xf, const torch::Tensor& values, const torch::Tensor& positions,
                     torch::Tensor& y, int64_t kept, int64_t group) {
  const int64_t tokens = xf.size(0), in = xf.size(1), out = values.size(0);
  const float* x = xf.data_ptr<float>();
  const V* val = values.data_ptr<V>();
  const uint8_t* meta = positions.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
#if defined(SLIMSERVE_AVX2)
  const bool expanded = in % 8 == 0 && ((kept == 2 && group == 4) || (kept == 4 && group == 8));
  static const TwoOfFourLanes two_of_four;
  static const FourOfEightLanes four_of_eight;
  const torch::Tensor blocks = expanded && tokens > 1 ? slimserve_rows::interleaved_tokens(xf, kTokenBlock) : xf;
  if (expanded) x = blocks.data_ptr<float>();
#endif
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
#if defined(SLIMSERVE_AVX2)
    if (expanded && group == 4) {
      rows_expanded_tokens<V>(x, val, meta, yp, tokens, in, out, begin, end, two_of_four);
      return;
    }
    if (expanded) {
      rows_expanded_tokens<V>(x, val, meta, yp, tokens, in, out, begin, end, four_of_eight);
      return;
    }
#endif
    if (kept == 2 && group == 4) {
      rows_tokens<V, TwoOfFour>(x, val, meta, yp, tokens, in, out, begin, end);
    } else if (kept == 4 && group == 8) {
      rows_tokens<V, FourOfEight>(x, val, meta, yp, tokens, in, out, begin, end);
    } else if (kept == 1 && group == 4) {
      rows_tokens<V, OneOfFour>(x, val, meta, yp, tokens, in, out, begin, end);
    } else {
      rows_general<V>(x, val, meta, yp, tokens, in, out, kept, group, begin, end);
    }
  });
}

void check_args(const torch::Tensor& values, const torch::Tensor& positions, int64_t in, int64_t kept,
                int64_t group) {
  TORCH_CHECK(values.dim() == 2 && positions.dim() == 2 && positions.size(0) == values.size(0),
              "nm: values [out, in*kept/group] and positions [out, bytes]");
  TORCH_CHECK(values.is_contiguous() && positions.is_contiguous(), "nm: values and positions must be contiguous");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
              "nm: values must be float32 or bfloat16");
  TORCH_CHECK(positions.scalar_type() == at::kByte, "nm: positions must be uint8");
  TORCH_CHECK(group >= 2 && group <= 256 && kept >= 1 && kept <= group && in % group == 0,
              "nm: need 1 <= kept <= group <= 256 and in_features a multiple of group");
  const int bits = 64 - __builtin_clzll(static_cast<uint64_t>(group - 1));
  const int64_t stored = in / group * kept;
  TORCH_CHECK(values.size(1) == stored && positions.size(1) == (stored * bits + 7) / 8,
              "nm: values / positions widths do not match in_features, kept and group");
}

#if defined(__AVX512VBMI2__)
// 2:4 and 4:8 rows keep 16 of every 32 inputs; the masks below give which, so AVX-512 VBMI2's expands (AMD Zen 4,
// Intel Ice Lake and later) turn 16 stored values into 32 dense inputs in one or two instructions.
// Kept-input mask of 32 inputs (their 16 stored values) of one row, from that span's offsets.
struct TwoOfFourMask {
  uint8_t byte_mask[256];  // one offsets byte (two groups) -> the 8 inputs it keeps
  TwoOfFourMask() {
    for (int b = 0; b < 256; ++b) {
      byte_mask[b] = static_cast<uint8_t>((1 << (b & 3)) | (1 << ((b >> 2) & 3)) | (16 << ((b >> 4) & 3)) |
                                          (16 << ((b >> 6) & 3)));
    }
  }
  uint32_t operator()(const uint8_t* meta, int64_t span) const {  // 32 offset bits: 4 bytes
    const uint8_t* m = meta + span * 4;
    return byte_mask[m[0]] | (byte_mask[m[1]] << 8) | (byte_mask[m[2]] << 16) |
           (static_cast<uint32_t>(byte_mask[m[3]]) << 24);
  }
  // The masks of spans span .. span + 7 (32 offset bytes) at once: each offsets nibble is one group, whose 4-input
  // mask a 16-entry byte shuffle gives, where operator() costs eight dependent table loads a span.
  void eight(const uint8_t* meta, int64_t span, uint32_t* masks) const {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(meta + span * 4));
    const __m256i nibble = _mm256_set1_epi8(15);
    const __m256i table =  // nibble (two 2-bit offsets a, b) -> (1 << a) | (1 << b)
        _mm256_broadcastsi128_si256(_mm_setr_epi8(1, 3, 5, 9, 3, 2, 6, 10, 5, 6, 4, 12, 9, 10, 12, 8));
    const __m256i low = _mm256_shuffle_epi8(table, _mm256_and_si256(bytes, nibble));
    const __m256i high = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(masks), _mm256_or_si256(low, _mm256_slli_epi16(high, 4)));
  }
};

struct FourOfEightMask {
  uint8_t group_mask[4096];  // one group's four 3-bit offsets -> the 8 inputs it keeps
  FourOfEightMask() {
    for (int c = 0; c < 4096; ++c) {
      group_mask[c] = static_cast<uint8_t>((1 << (c & 7)) | (1 << ((c >> 3) & 7)) | (1 << ((c >> 6) & 7)) |
                                           (1 << ((c >> 9) & 7)));
    }
  }
  uint32_t operator()(const uint8_t* meta, int64_t span) const {  // 48 offset bits: 6 bytes, 12 per group
    const uint8_t* m = meta + span * 6;
    const uint32_t low = m[0] | (m[1] << 8) | (m[2] << 16), high = m[3] | (m[4] << 8) | (m[5] << 16);
    return group_mask[low & 0xFFF] | (group_mask[low >> 12] << 8) | (group_mask[high & 0xFFF] << 16) |
           (static_cast<uint32_t>(group_mask[high >> 12]) << 24);
  }
};

// Calls `fn` with the mask table of 2:4 (kept 2) or 4:8 (kept 4), each built once per process.
template <typename Fn>
auto with_span_mask(int64_t kept, const Fn& fn) {
  static const TwoOfFourMask two_of_four;
  static const FourOfEightMask four_of_eight;
  return kept == 2 ? fn(two_of_four) : fn(four_of_eight);
}

// 32 dense inputs at `dense` from the 16 stored values at `kept`, zeros where `mask` has no bit.
inline void expand_span(const c10::BFloat16* kept, uint32_t mask, c10::BFloat16* dense) {
  _mm512_storeu_si512(dense, slimserve_rows::expand_bf16(reinterpret_cast<const uint16_t*>(kept), mask));
}

inline void expand_span(const float* kept, uint32_t mask, float* dense) {
  // Each half of the span holds whole groups, so 8 of its 16 inputs are kept (2:4 and 4:8 alike).
  _mm512_storeu_ps(dense, _mm512_maskz_expand_ps(static_cast<__mmask16>(mask),
                                                 _mm512_castps256_ps512(_mm256_loadu_ps(kept))));
  _mm512_storeu_ps(dense + 16, _mm512_maskz_expand_ps(static_cast<__mmask16>(mask >> 16),
                                                      _mm512_castps256_ps512(_mm256_loadu_ps(kept + 8))));
}

// decompress_rows for 2:4 and 4:8: expand loads over whole 32-input spans, the last partial span entry by entry.
template <typename V, typename Mask>
void expand_rows(const V* values, const uint8_t* positions, V* dense, int64_t in, int64_t kept, int64_t group,
                 int bits, const Mask& mask, int64_t row_begin, int64_t row_end) {
  const int64_t stored = in / group * kept, meta_bytes = (stored * bits + 7) / 8, spans = in / 32;
  for (int64_t o = row_begin; o < row_end; ++o) {
    V* row = dense + o * in;
    const V* val = values + o * stored;
    const uint8_t* meta = positions + o * meta_bytes;
    for (int64_t s = 0; s < spans; ++s) expand_span(val + s * 16, mask(meta, s), row + s * 32);
    std::memset(static_cast<void*>(row + spans * 32), 0, sizeof(V) * (in - spans * 32));
    for (int64_t j = spans * 16; j < stored; ++j) row[j / kept * group + offset_at(meta, j, bits)] = val[j];
  }
}
#endif

// Rows row_begin .. row_end of W as dense rows of O (float32, or bf16 for bf16 values).
template <typename V, typename O>
void decompress_rows(const V* values, const uint8_t* positions, O* dense, int64_t in, int64_t kept, int64_t group,
                     int64_t row_begin, int64_t row_end) {
  const int bits = 64 - __builtin_clzll(static_cast<uint64_t>(group - 1));
#if defined(__AVX512VBMI2__)
  if constexpr (std::is_same<V, O>::value) {
    if ((kept == 2 && group == 4) || (kept == 4 && group == 8)) {
      with_span_mask(kept, [&](const auto& mask) {
        expand_rows(values, positions, dense, in, kept, group, bits, mask, row_begin, row_end);
      });
      return;
    }
  }
#endif
  const int64_t stored = in / group * kept, meta_bytes = (stored * bits + 7) / 8;
  std::vector<int32_t> cols(stored);
  for (int64_t o = row_begin; o < row_end; ++o) {
    O* row = dense + o * in;
    std::memset(static_cast<void*>(row), 0, sizeof(O) * in);
    const V* val = values + o * stored;
    decode_columns(positions + o * meta_bytes, cols.data(), in, kept, group, bits);
    for (int64_t j = 0; j < stored; ++j) row[cols[j]] = static_cast<O>(val[j]);
  }
}

#if defined(SLIMSERVE_AMX)
// bf16 batches on CPUs with AMX run on the tile unit (amx_strips.h); 2:4 and 4:8 rows expand 32 inputs from their 16
// kept values under the mask their offsets give. Measured with bench/nm_kernel.py on an Intel Xeon (2 threads,
// [5632, 2048] and [2048, 5632]): the permute path wins at 1 and 2 tokens (0.39-0.41 against 0.43-0.45 ms at 2; it
// reads only the stored bytes), the two are level at 3, and from there on the tile unit wins, prefill included.
constexpr int64_t kAmxFromTokens = 3;

template <typename Mask>
void matmul_amx(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& positions, const Mask& mask,
                torch::Tensor& y) {
  const int64_t stored = values.size(1), meta_bytes = positions.size(1);
  const auto* val = reinterpret_cast<const uint16_t*>(values.data_ptr<c10::BFloat16>());
  const uint8_t* meta = positions.data_ptr<uint8_t>();
  // Every span stores 16 values, so a chunk's first value is found without `consumed`.
  const auto expand_row = [&](int64_t o, uint16_t* dense, int64_t span_stride, int64_t s0, int64_t s1, int64_t&) {
    const uint16_t* kept = val + o * stored;
    const uint8_t* row_meta = meta + o * meta_bytes;
    int64_t s = s0;
    if constexpr (std::is_same_v<Mask, TwoOfFourMask>) {
      alignas(32) uint32_t masks[8];
      for (; s + 8 <= s1; s += 8) {
        mask.eight(row_meta, s, masks);
        for (int64_t i = 0; i < 8; ++i) {
          _mm512_storeu_si512(dense + (s + i - s0) * span_stride,
                              slimserve_rows::expand_bf16(kept + (s + i) * 16, masks[i]));
        }
      }
    }
    for (; s < s1; ++s) {
      _mm512_storeu_si512(dense + (s - s0) * span_stride, slimserve_rows::expand_bf16(kept + s * 16, mask(row_meta, s)));
    }
  };
  slimserve_amx::strips(x, values.size(0), expand_row, y.data_ptr<c10::BFloat16>());
}
#endif  // SLIMSERVE_AMX

#if defined(SLIMSERVE_DPBF16)
// From this many tokens the dot loops (2:4's gathered loop where VBMI allows, else expanded_dot) beat the permute
// loop, which reads only the stored bytes too. AMD EPYC (Zen 4), 2 threads, 2:4 [5632, 2048], weights streamed:
// 2 tokens 0.41-0.43 ms gathered, 0.46 expanded, against 0.51-0.54; one token stays on the permute loop (0.33-0.35 ms,
// about the memory's rate). Dense: 0.8-1.0 ms at 1-2 tokens.
constexpr int64_t kDotFromTokens = 2;
#endif

#if defined(SLIMSERVE_DPBF16) && defined(__AVX512VBMI__)
#define SLIMSERVE_NM24_GATHERED 1
#endif

// Whether this build runs bf16 batches of this pattern on the bf16 dot-product loop (expanded_dot, vector_rows.h).
bool dot_usable(int64_t in, int64_t kept, int64_t group) {
#if defined(SLIMSERVE_DPBF16)
  return ((kept == 2 && group == 4) || (kept == 4 && group == 8)) && in % 32 == 0;
#else
  (void)in, (void)kept, (void)group;
  return false;
#endif
}

// Whether this build runs bf16 batches of this pattern on the loop over the kept columns (nm_matmul_gathered).
bool gathered_usable(int64_t in, int64_t kept, int64_t group) {
#if defined(SLIMSERVE_NM24_GATHERED)
  return kept == 2 && group == 4 && in % 64 == 0;
#else
  (void)in, (void)kept, (void)group;
  return false;
#endif
}

// Whether this build and process run bf16 batches of this pattern on the tile unit.
bool amx_usable(int64_t in, int64_t kept, int64_t group) {
#if defined(SLIMSERVE_AMX)
  return ((kept == 2 && group == 4) || (kept == 4 && group == 8)) && in % slimserve_amx::kDepth == 0 &&
         slimserve_amx::permitted();
#else
  (void)in, (void)kept, (void)group;
  return false;
#endif
}
}  // namespace

#if defined(SLIMSERVE_DPBF16)
// The checks of the bf16 batch loops: x [N, in] and values bf16, the scheme's tensors consistent, the pattern one the
// loop takes (`usable`, described by `takes`).
void check_bf16_batch(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& positions,
                      int64_t kept, int64_t group, bool usable, const char* op, const char* takes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16, op,
              ": x [N, in] and values must be bfloat16");
  check_args(values, positions, x.size(1), kept, group);
  TORCH_CHECK(usable, op, ": takes ", takes);
}

// One row's 32-input spans for expanded_dot: 16 stored values each, placed by the pattern's mask table (2:4 decodes
// the masks of 8 spans at once, where whole ones remain: 0.74 -> 0.69 ms at 8 tokens on the shape above). The values
// are prefetched 1 KiB ahead, the metadata 256 bytes (docs/methods/nm.md).
template <typename Mask>
struct NMSpans {
  const uint16_t* values;
  const uint8_t* meta;
  const Mask& mask;
  int64_t span = 0;
  int64_t spans = 0;
  uint32_t masks[8];
  __m512i next() {
    uint32_t bits;
    if constexpr (std::is_same_v<Mask, TwoOfFourMask>) {
      if (span < (spans & ~int64_t{7})) {  // in a whole block of 8 spans
        if ((span & 7) == 0) {
          mask.eight(meta, span, masks);
          _mm_prefetch(reinterpret_cast<const char*>(meta + 4 * span) + 256, _MM_HINT_T0);
        }
        bits = masks[span & 7];
      } else {
        bits = mask(meta, span);
      }
    } else {
      bits = mask(meta, span);
    }
    _mm_prefetch(reinterpret_cast<const char*>(values + 16 * span) + 1024, _MM_HINT_T0);
    const __m512i dense = slimserve_rows::expand_bf16(values + 16 * span, bits);
    ++span;
    return dense;
  }
};

// y [N, out] float32 = x [N, in] · Wᵀ for bf16 x and values of a pattern dot_usable takes.
torch::Tensor nm_matmul_dot(torch::Tensor x, torch::Tensor values, torch::Tensor positions, int64_t kept,
                            int64_t group) {
  check_bf16_batch(x, values, positions, kept, group, dot_usable(x.size(1), kept, group), "nm_matmul_dot",
                   "2:4 or 4:8 with in_features a multiple of 32");
  const int64_t stored = values.size(1), meta_bytes = positions.size(1);
  const auto* val = reinterpret_cast<const uint16_t*>(values.data_ptr<c10::BFloat16>());
  const uint8_t* meta = positions.data_ptr<uint8_t>();
  return with_span_mask(kept, [&](const auto& mask) {
    return slimserve_rows::expanded_dot(x.contiguous(), values.size(0), [&](int64_t o) {
      return NMSpans<std::decay_t<decltype(mask)>>{val + o * stored, meta + o * meta_bytes, mask, 0, x.size(1) / 32};
    });
  });
}
#endif

#if defined(SLIMSERVE_NM24_GATHERED)
namespace {
// 2:4 bf16 batches that skip the zeros. expanded_dot dots each row's spans expanded to 32 inputs, zeros included, so
// it does a dense GEMM's vdpbf16ps; here each token's 64 inputs are permuted to the row's 32 kept columns instead
// (one vpermt2w, which runs beside vdpbf16ps on Zen 4) and dotted with the row's 32 stored values: half the dot
// products. In a loop held in L1 on an AMD EPYC (Zen 4), 2 rows x 8 tokens x 64 inputs took 4.4 ns this way against
// 10.0 ns expanded.
constexpr int64_t kGatheredRowGroup = 64;  // rows whose values stay in L2 while every block of tokens passes them

// The columns (0..63) of the 32 values a row stores for 64 inputs, from their 8 metadata bytes: value j sits at
// 4 (j / 2) + its 2-bit offset, bits 2j and 2j + 1 (what nm_columns in loaders/schemes/nm.py computes). vpmultishiftqb
// with control byte b takes bits b .. b + 7 of the broadcast metadata, so byte 2j of the result holds field j.
struct GatheredColumns {
  __m512i bit_offsets, group_starts;
  GatheredColumns() {
    alignas(64) uint8_t offsets[64];
    alignas(64) uint16_t starts[32];
    for (int b = 0; b < 64; ++b) offsets[b] = static_cast<uint8_t>(b);
    for (int j = 0; j < 32; ++j) starts[j] = static_cast<uint16_t>(4 * (j / 2));
    bit_offsets = _mm512_load_si512(offsets);
    group_starts = _mm512_load_si512(starts);
  }
  __m512i operator()(const uint8_t* meta) const {
    uint64_t bits;
    std::memcpy(&bits, meta, 8);
    const __m512i fields = _mm512_multishift_epi64_epi8(bit_offsets, _mm512_set1_epi64(static_cast<int64_t>(bits)));
    return _mm512_add_epi16(_mm512_and_si512(fields, _mm512_set1_epi16(3)), group_starts);
  }
};

// y [tokens, out] float32 for x padded to whole blocks of kTokens tokens ([blocks * kTokens, in], in a multiple of
// 64). Rows go in groups of kGatheredRowGroup; each block of tokens passes a group's rows kRows at a time (rows i,
// i + q, i + 2q, ... of the group, q = a kRows-th of it, for the prefetcher, as in dot_blocks), so a prefill
// re-reads the group's values from L2 per block. Each token's 64 inputs are loaded once into registers and permuted
// for every row: x, which many tokens' blocks keep in L2 rather than L1, is the loop's heaviest stream.
template <int kRows, int kTokens>
void gathered_dot_blocks(const uint16_t* xp, int64_t tokens, int64_t in, const uint16_t* values, const uint8_t* meta,
                         int64_t out, float* yp) {
  const int64_t chunks = in / 64, stored = in / 2, meta_bytes = in / 8;
  const int64_t blocks = (tokens + kTokens - 1) / kTokens;
  const GatheredColumns columns;
  at::parallel_for(0, (out + kGatheredRowGroup - 1) / kGatheredRowGroup, 1, [&](int64_t group_begin,
                                                                                int64_t group_end) {
    for (int64_t group = group_begin; group < group_end; ++group) {
      const int64_t row_begin = group * kGatheredRowGroup, row_end = std::min(row_begin + kGatheredRowGroup, out);
      const int64_t step = (row_end - row_begin + kRows - 1) / kRows;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint16_t* xb = xp + b * kTokens * in;
        for (int64_t i = 0; i < step; ++i) {
          int64_t rows[kRows];
          const uint16_t* v[kRows];
          const uint8_t* m[kRows];
#pragma GCC unroll 8
          for (int r = 0; r < kRows; ++r) {
            const int64_t o = row_begin + i + r * step;
            rows[r] = o < row_end ? o : row_begin + i;  // a slot past the group repeats its first row
            v[r] = values + rows[r] * stored;
            m[r] = meta + rows[r] * meta_bytes;
          }
          __m512 acc[kRows][kTokens];  // every loop below unrolled whole: see dot_blocks
#pragma GCC unroll 8
          for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 8
            for (int t = 0; t < kTokens; ++t) acc[r][t] = _mm512_setzero_ps();
          }
          for (int64_t c = 0; c < chunks; ++c) {
            __m512bh w[kRows];
            __m512i cols[kRows];
#pragma GCC unroll 8
            for (int r = 0; r < kRows; ++r) {
              _mm_prefetch(reinterpret_cast<const char*>(v[r] + 32 * c) + 1024, _MM_HINT_T0);
              __m512i kept = _mm512_loadu_si512(v[r] + 32 * c);
              cols[r] = columns(m[r] + 8 * c);
              asm("" : "+v"(kept), "+v"(cols[r]));  // in registers: otherwise reloaded for every token's product
              w[r] = (__m512bh)kept;
            }
#pragma GCC unroll 8
            for (int t = 0; t < kTokens; ++t) {
              __m512i lo = _mm512_loadu_si512(xb + t * in + 64 * c);
              __m512i hi = _mm512_loadu_si512(xb + t * in + 64 * c + 32);
              asm("" : "+v"(lo), "+v"(hi));  // loaded once: otherwise every row's vpermt2w reloads them
#pragma GCC unroll 8
              for (int r = 0; r < kRows; ++r) {
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], w[r], (__m512bh)_mm512_permutex2var_epi16(lo, cols[r], hi));
              }
            }
          }
#pragma GCC unroll 8
          for (int t = 0; t < kTokens; ++t) {
            if (b * kTokens + t < tokens) {
              float* yn = yp + (b * kTokens + t) * out;
#pragma GCC unroll 8
              for (int r = 0; r < kRows; ++r) yn[rows[r]] = _mm512_reduce_add_ps(acc[r][t]);
            }
          }
        }
      }
    }
  });
}
}  // namespace

// y [N, out] float32 = x [N, in] · Wᵀ for bf16 x and 2:4 values, in a multiple of 64, half a dense GEMM's dot products.
torch::Tensor nm_matmul_gathered(torch::Tensor x, torch::Tensor values, torch::Tensor positions, int64_t kept,
                                 int64_t group) {
  check_bf16_batch(x, values, positions, kept, group, gathered_usable(x.size(1), kept, group), "nm_matmul_gathered",
                   "2:4 with in_features a multiple of 64");
  constexpr int kRows = 4, kTokens = 4;  // 16 accumulators; 2 x 8 was level at 8 tokens and slower from 64
  const int64_t tokens = x.size(0), in = x.size(1), out = values.size(0);
  const auto padded = slimserve_rows::zero_padded(x, (tokens + kTokens - 1) / kTokens * kTokens, in);
  auto y = torch::empty({tokens, out}, x.options().dtype(at::kFloat));
  const auto* xp = reinterpret_cast<const uint16_t*>(padded.data_ptr<c10::BFloat16>());
  const auto* val = reinterpret_cast<const uint16_t*>(values.data_ptr<c10::BFloat16>());
  const uint8_t* meta = positions.data_ptr<uint8_t>();
  gathered_dot_blocks<kRows, kTokens>(xp, tokens, in, val, meta, out, y.data_ptr<float>());
  return y;
}
#endif

// y [N, out] = x [N, in] · Wᵀ, W given by its kept values and packed offsets: float32, or bf16 where bf16 batches
// take the tile unit (rounded once from its fp32 sums).
torch::Tensor nm_matmul(torch::Tensor x, torch::Tensor values, torch::Tensor positions, int64_t kept, int64_t group) {
  TORCH_CHECK(x.dim() == 2, "nm_matmul: x must be [N, in]");
  check_args(values, positions, x.size(1), kept, group);
#if defined(SLIMSERVE_AMX)
  if (x.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16 && x.size(0) >= kAmxFromTokens &&
      amx_usable(x.size(1), kept, group)) {
    auto y = torch::empty({x.size(0), values.size(0)}, x.options());
    with_span_mask(kept, [&](const auto& mask) { matmul_amx(x.contiguous(), values, positions, mask, y); });
    return y;
  }
#endif
#if defined(SLIMSERVE_DPBF16)
  if (x.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16 && x.size(0) >= kDotFromTokens) {
#if defined(SLIMSERVE_NM24_GATHERED)
    if (gathered_usable(x.size(1), kept, group)) return nm_matmul_gathered(x, values, positions, kept, group);
#endif
    if (dot_usable(x.size(1), kept, group)) return nm_matmul_dot(x, values, positions, kept, group);
  }
#endif
  auto xf = x.to(at::kFloat).contiguous();
  auto y = torch::empty({x.size(0), values.size(0)}, xf.options());
  if (values.scalar_type() == at::kBFloat16) {
    matmul_dispatch<c10::BFloat16>(xf, values, positions, y, kept, group);
  } else {
    matmul_dispatch<float>(xf, values, positions, y, kept, group);
  }
  return y;
}

// y [N, out] = x [N, in] · Wᵀ in x's dtype for many tokens (prefill) where the tile unit does not take them, on
// strips of W decompressed in cache (vector_rows.h): bf16 strips for bf16 x and values, float32 otherwise (float32
// x keeps float32 arithmetic whatever the values' dtype).
torch::Tensor nm_matmul_strips(torch::Tensor x, torch::Tensor values, torch::Tensor positions, int64_t kept,
                               int64_t group) {
  TORCH_CHECK(x.dim() == 2, "nm_matmul_strips: x must be [N, in]");
  const int64_t in = x.size(1);
  check_args(values, positions, in, kept, group);
  const int64_t stored = values.size(1), meta_bytes = positions.size(1);
  const uint8_t* meta = positions.data_ptr<uint8_t>();
  const bool bf16 = x.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16;
  const auto y = slimserve_rows::strips_gemm(x, values.size(0), bf16 ? at::kBFloat16 : at::kFloat,
                                             [&](torch::Tensor& strip, int64_t first, int64_t begin, int64_t end) {
    slimserve_rows::with_value_types(values, strip, [&](const auto* val, auto* dense) {
      decompress_rows(val + first * stored, meta + first * meta_bytes, dense, in, kept, group, begin, end);
    });
  });
  return y.to(x.scalar_type());
}

#if defined(SLIMSERVE_PANELS)
// y [N, out] = x [N, in] · Wᵀ in x's dtype for many tokens, multiplying only the kept weights (vector_rows.h).
torch::Tensor nm_matmul_kept(torch::Tensor x, torch::Tensor values, torch::Tensor positions, int64_t kept,
                             int64_t group) {
  TORCH_CHECK(x.dim() == 2, "nm_matmul_kept: x must be [N, in]");
  const int64_t in = x.size(1), stored = values.size(1), meta_bytes = positions.size(1);
  check_args(values, positions, in, kept, group);
  const int bits = 64 - __builtin_clzll(static_cast<uint64_t>(group - 1));
  const uint8_t* meta = positions.data_ptr<uint8_t>();
  const auto y = slimserve_rows::panel_product(x, values.size(0), stored, [&](int64_t o, int32_t* cols, float* w) {
    decode_columns(meta + o * meta_bytes, cols, in, kept, group, bits, slimserve_rows::kPanelTokens);
    slimserve_rows::widen_row(values, o, w);
  });
  return y.to(x.scalar_type());
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nm_matmul", &nm_matmul,
        "y = x · Wᵀ for N:M sparse W stored as kept values + packed offsets (float32 out; bf16 on the AMX tile unit)");
  m.def("nm_matmul_strips", &nm_matmul_strips,
        "y = x · Wᵀ in x's dtype for many tokens: strips of W decompressed in cache, each multiplied by a dense GEMM");
#if defined(SLIMSERVE_PANELS)
  m.def("nm_matmul_kept", &nm_matmul_kept,
        "y = x · Wᵀ in x's dtype for many tokens, multiplying only the kept weights (AVX2 builds)");
#endif
  m.def("isa", [] { return std::string(kIsa); }, "the instruction set this build's inner loops use");
#if defined(SLIMSERVE_DPBF16)
  m.def("nm_matmul_dot", &nm_matmul_dot,
        "y = x · Wᵀ for bf16 batches of 2:4 / 4:8 rows: expanded spans dotted with _mm512_dpbf16_ps (float32 out)");
#endif
  m.def("dot_usable", &dot_usable, "whether this build runs bf16 batches of this pattern on the bf16 dot-product loop");
#if defined(SLIMSERVE_NM24_GATHERED)
  m.def("nm_matmul_gathered", &nm_matmul_gathered,
        "y = x · Wᵀ for bf16 batches of 2:4 rows: x permuted to the kept columns, half the dot products (float32 out)");
#endif
  m.def("gathered_usable", &gathered_usable,
        "whether this build runs bf16 batches of this pattern on the loop over the kept columns");
  m.def("amx_usable", &amx_usable,
        "whether bf16 batches of this pattern and input count run on the AMX tile unit in this build and process");
}
