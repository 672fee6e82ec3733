// Row-sparse × dense product on CPU for the BITMASK encoding (loaders/schemes/sparse_rows.py):
// y[n, o] = Σ_{j set in mask[o]} z[n, j] · val[o, rank of j in the row], every row holding exactly
// s values (so row o's values start at o·s and rows run in parallel without prefix sums).
// mask is [out, ceil(k/8)] uint8, column j at bit j % 8 of byte j / 8 (little-endian bit order).
//
// Decode (one token) streams each row's mask and packed values once and reads z contiguously:
//  * AVX-512: 16 mask bits at a time, the row's next popcount values expanded into the set lanes
//    (_mm512_maskz_expandloadu_ps for fp32; bf16 is widened by a masked load, then expanded) and
//    multiplied with a masked load of 16 z entries.
//  * AVX2 + FMA: one mask byte at a time, 8 packed values placed by a 256-entry table (bf16 values: one vpshufb that
//    also widens and zeros; float32: _mm256_permutevar8x32_ps indices and a blend) and multiplied with 8 z entries
//    of every token of the batch, two rows at a time from 2 tokens where those tokens' x is past L1.
//  * scalar: the set bits one by one.
// A batch (N > 1) decodes each row's mask once, reads z transposed ([k, N] float32, cache-resident) and,
// for each stored value, updates 16 tokens with one contiguous load and one FMA (vector_rows.h, shared with ELL).
// bf16 batches on CPUs with AMX run on the tile unit instead (amx_strips.h): each row's 32 atoms at a time are
// expanded from its packed values under 32 bits of its own mask, so the stored mask is the expand mask as it is.
// CPUs with AVX512_BF16 but no tile unit (AMD Zen 4) expand the same way in registers and dot the spans with
// vdpbf16ps (expanded_dot in vector_rows.h).
// Built at first use by plugin/kernels/cpp.py for the best ISA the compiler flags allow.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "amx_strips.h"
#include "vector_rows.h"

namespace {

using slimserve_rows::kIsa;
#if defined(SLIMSERVE_AVX2)
using slimserve_rows::reduce_add8;
#endif

template <typename V> inline float to_float(V v) { return static_cast<float>(v); }

// Bits [j0, j0 + width) of a row's mask (width 8 or 16), zero past the row's last byte.
inline uint32_t mask_bits16(const uint8_t* row, int64_t mask_bytes, int64_t j0) {
  const int64_t b = j0 >> 3;
  return row[b] | (b + 1 < mask_bytes ? static_cast<uint32_t>(row[b + 1]) << 8 : 0u);
}

#if defined(__AVX512F__)
// The next popcount(bits) packed values of a row, expanded into the lanes whose bit is set.
template <typename V> inline __m512 expand_values(const V* p, __mmask16 bits) {
  if constexpr (std::is_same<V, float>::value) {
    return _mm512_maskz_expandloadu_ps(bits, p);
  } else {
    const __mmask16 first = static_cast<__mmask16>((1u << __builtin_popcount(bits)) - 1);
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first, p));
    return _mm512_maskz_expand_ps(bits, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
}
#endif

#if defined(SLIMSERVE_AVX2)
// kPermute[b][i]: for a set bit i of byte b, its rank among b's set bits (the packed value it takes); for an unset
// bit, the sign bit alone (_mm256_permutevar8x32_ps reads only the low 3 bits, _mm256_blendv_ps only the sign).
const std::array<std::array<int32_t, 8>, 256> kPermute = [] {
  std::array<std::array<int32_t, 8>, 256> table{};
  for (int b = 0; b < 256; ++b) {
    int rank = 0;
    for (int i = 0; i < 8; ++i) table[b][i] = (b >> i) & 1 ? rank++ : INT32_MIN;
  }
  return table;
}();

// kExpandBf16[b]: the bf16_placing_control (vector_rows.h) of mask byte b: each set bit's lane takes the next packed
// value, the others zero. The float32 road (kPermute) was the one-token loop's bound at bf16 too: about 4.3 cycles a
// mask byte on an AMD EPYC Zen 2.
alignas(32) const std::array<std::array<int8_t, 32>, 256> kExpandBf16 = [] {
  std::array<std::array<int8_t, 32>, 256> table{};
  for (int b = 0; b < 256; ++b) {
    int value_of_lane[8], rank = 0;
    for (int i = 0; i < 8; ++i) value_of_lane[i] = (b >> i) & 1 ? rank++ : -1;
    slimserve_rows::bf16_placing_control(value_of_lane, table[b].data());
  }
  return table;
}();

// Where 8 packed values can be read from p: p itself, or (kGuarded, the row near the end of the values buffer) only
// its `count` values copied into the zeroed `tail`; elsewhere the extra ones belong to the next row.
template <bool kGuarded, typename V> inline const V* readable8(const V* p, int count, const V* end, V* tail) {
  if constexpr (kGuarded) {
    if (p + 8 > end) {
      std::memset(tail, 0, sizeof(V) * 8);
      std::memcpy(tail, p, sizeof(V) * count);
      return tail;
    }
  }
  return p;
}

// One mask byte's 8 columns of a row as a vector: the byte's popcount packed values placed on its set lanes and
// zeroed on the others; advances the row's value cursor.
template <bool kGuarded, typename V> inline __m256 mask_byte_values(uint32_t bits, const V*& v, const V* values_end) {
  const int count = __builtin_popcount(bits);
  alignas(32) V tail[8];
  const V* p = readable8<kGuarded>(v, count, values_end, tail);
  v += count;
  if constexpr (std::is_same<V, c10::BFloat16>::value) {
    const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i control = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandBf16[bits].data()));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(packed, control));
  } else {
    const __m256i order = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kPermute[bits].data()));
    const __m256 placed = _mm256_permutevar8x32_ps(slimserve_rows::load_values8(p), order);
    return _mm256_blendv_ps(placed, _mm256_setzero_ps(), _mm256_castsi256_ps(order));
  }
}

// Row o of C dotted with NT tokens of z (float32, interleaved as slimserve_rows::interleaved_tokens lays out a block
// of NT tokens): each mask byte's values are placed once and multiplied with every token's 8 columns, so the row's
// values and mask stream once for the batch and z is read in order (no decoded column list). Up to four tokens also
// split the bytes over kChains accumulator sets, so at least four FMA chains are in flight (an FMA takes 5 cycles on
// Zen 2, two issue a cycle): with one set 3 and 4 tokens took 1.14 / 1.16 ms on [5632, 2048] (density 0.43, bf16,
// streamed), with two 0.84 / 1.00.
// A row's mask bytes come 8 to a 64-bit load: one load fewer per byte took one token from 0.84 to 0.69 ms there
// (the loop is bound by its loads, not by memory: 0.77 ms with the weights in cache before). The accumulators are
// indexed by constants only: GCC kept an array indexed by the byte's parity on the stack, and every FMA waited on a
// store-to-load round trip (about 7 cycles a mask byte on an AMD EPYC, 2.5x the one-token loop's time). z is zero
// past column k, so a last byte that runs past it multiplies zeros.
template <int NT, bool kGuarded, typename V>
inline void bitmask_row_avx2(const float* z, int64_t atoms, const uint8_t* mrow, const V* v, const V* values_end,
                             float* sums) {
  constexpr int kChains = NT >= 5 ? 1 : NT >= 2 ? 2 : 4;
  __m256 acc[kChains][NT];
  for (int c = 0; c < kChains; ++c) {
    for (int n = 0; n < NT; ++n) acc[c][n] = _mm256_setzero_ps();
  }
  const int64_t bytes = (atoms + 7) / 8;
  const auto byte_step = [&](auto chain, uint32_t bits, int64_t b) {
    constexpr int c = decltype(chain)::value;
    const __m256 vals = mask_byte_values<kGuarded>(bits, v, values_end);
    for (int n = 0; n < NT; ++n) acc[c][n] = _mm256_fmadd_ps(vals, _mm256_loadu_ps(z + (b * NT + n) * 8), acc[c][n]);
  };
  int64_t b = 0;
  for (; b + 8 <= bytes; b += 8) {  // the next 8 mask bytes in one load
    uint64_t bits;
    std::memcpy(&bits, mrow + b, 8);
    slimserve_rows::each_of_8([&](auto k) {
      byte_step(std::integral_constant<int, decltype(k)::value % kChains>{}, (bits >> (8 * k)) & 0xff, b + k);
    });
  }
  for (; b < bytes; ++b) byte_step(std::integral_constant<int, 0>{}, mrow[b], b);
  for (int n = 0; n < NT; ++n) {
    __m256 total = acc[0][n];
    for (int c = 1; c < kChains; ++c) total = _mm256_add_ps(total, acc[c][n]);
    sums[n] = reduce_add8(total);
  }
}

// Rows o and o + 1 of C dotted with NT (at most 4) tokens of z, interleaved: the two rows' mask bytes are placed side
// by side and each token's 8 columns are loaded once for both, so a batch reads z from cache half as often per FMA.
// At 8 tokens one row at a time loads 8 columns of z (64 KiB at 2048 inputs: from L2, not L1) for every 8 FMAs, and
// L2's bandwidth bounded the loop. Unset lanes are zero in the placed values, and z past column k.
template <int NT, bool kGuarded, typename V>
inline void bitmask_row_pair_avx2(const float* z, int64_t atoms, const uint8_t* mrow0, const uint8_t* mrow1,
                                  const V* v0, const V* v1, const V* values_end, float* sums0, float* sums1) {
  __m256 first[NT], second[NT];
  for (int n = 0; n < NT; ++n) first[n] = second[n] = _mm256_setzero_ps();
  const int64_t bytes = (atoms + 7) / 8;
  const auto byte_pair = [&](uint32_t bits0, uint32_t bits1, int64_t b) {
    const __m256 w0 = mask_byte_values<kGuarded>(bits0, v0, values_end);
    const __m256 w1 = mask_byte_values<kGuarded>(bits1, v1, values_end);
    for (int n = 0; n < NT; ++n) {
      __m256 x = _mm256_loadu_ps(z + (b * NT + n) * 8);
      asm("" : "+x"(x));  // one load for both FMAs: GCC folds it into each otherwise (14 loads per 8 FMAs)
      first[n] = _mm256_fmadd_ps(w0, x, first[n]);
      second[n] = _mm256_fmadd_ps(w1, x, second[n]);
    }
  };
  int64_t b = 0;
  for (; b + 8 <= bytes; b += 8) {  // the two rows' next 8 mask bytes in one load each
    uint64_t bits0, bits1;
    std::memcpy(&bits0, mrow0 + b, 8);
    std::memcpy(&bits1, mrow1 + b, 8);
    slimserve_rows::each_of_8([&](auto k) { byte_pair((bits0 >> (8 * k)) & 0xff, (bits1 >> (8 * k)) & 0xff, b + k); });
  }
  for (; b < bytes; ++b) byte_pair(mrow0[b], mrow1[b], b);
  for (int n = 0; n < NT; ++n) {
    sums0[n] = reduce_add8(first[n]);
    sums1[n] = reduce_add8(second[n]);
  }
}

// Where the tokens' x is past an L1 data cache (kL1Bytes), from kPairsFromTokens tokens, bitmask_rows_avx2 takes rows
// in pairs (bitmask_row_pair_avx2), 4 tokens a pass over a pair (8 accumulators; the pair's values are in L1 for the
// second pass): each load of x from L2 feeds two rows. The pair is row i of the thread's range and row i + half of
// it, so each of the two rows' value streams runs forward through memory; pairs of adjacent rows leapfrogged each
// other and the hardware prefetcher lost them (streamed [5632, 2048] at 2 tokens 1.02 ms against 0.62 resident).
// Measured on an AMD EPYC (Zen 2), 2 threads, bf16 values, density 0.43, weights streamed from memory (8 copies
// rotated, as a model's layers are), ms pairs / one row: [5632, 2048] 0.71 / 0.76 at 2 tokens, 0.87 / 0.98 at 4,
// 1.40 / 1.90 at 6, 1.53 / 2.68 at 8; [2048, 5632] 0.66 / 0.78 at 2, 0.79 / 1.19 at 4, 1.46 / 2.30 at 8. Where x fits
// L1 pairs lost: thirty real SmolLM2 OATS layers (576 and 1536 inputs) took 10.2 / 11.1 ms (one row / pairs) in S at
// 2 tokens, 16.4 / 18.3 at 6, 19.7 / 20.9 at 8 (whose down projection, x 48 KiB, pairs: 0.127 / 0.166 ms alone).
constexpr int kPairsFromTokens = 2;
constexpr int64_t kL1Bytes = 32 * 1024;

// Whether bitmask_rows_avx2 takes NT tokens of `atoms` inputs in row pairs: x past L1 (above).
constexpr bool row_pairs(int64_t tokens, int64_t atoms) {
  return tokens >= kPairsFromTokens && tokens * atoms * int64_t{sizeof(float)} > kL1Bytes;
}

// Tokens a pass over a pair of rows takes (8 accumulators). z is interleaved in blocks of this many tokens there
// (interleaved_tokens), so each pass reads one run of bytes: a block of all 8 tokens had each pass read half of every
// 256 bytes, on half the L1 sets, and ran 8 tokens 2.7x slower than rows read in place (AMD EPYC, Zen 3).
constexpr int kPairPassTokens = 4;

// Rows [row_begin, row_end) of y [NT, out] from z, NT tokens of k atoms interleaved in blocks of NT tokens, or of
// kPairPassTokens where they go in row pairs (row_pairs); a row's last mask byte may load up to 8 values past the row,
// unmasked unless that leaves the values buffer.
template <int NT, typename V, typename O>
void bitmask_rows_avx2(const float* z, int64_t atoms, const V* values, const uint8_t* mask, O* y, int64_t out,
                       int64_t nnz, int64_t mask_bytes, const V* values_end, int64_t row_begin, int64_t row_end) {
  constexpr int kFirstPass = NT > kPairPassTokens ? kPairPassTokens : NT, kSecondPass = NT - kFirstPass;
  const bool pairs = row_pairs(NT, atoms);
  const float* z_second = z + kFirstPass * ((atoms + 7) / 8 * 8);  // the second block's first token, in pairs' layout
  const int64_t half = pairs ? (row_end - row_begin) / 2 : 0;
  if constexpr (NT >= kPairsFromTokens) {
    for (int64_t o0 = row_begin; o0 < row_begin + half; ++o0) {
      const int64_t o1 = o0 + half;
      const V* v0 = values + o0 * nnz;
      const V* v1 = values + o1 * nnz;
      const uint8_t* m0 = mask + o0 * mask_bytes;
      const uint8_t* m1 = mask + o1 * mask_bytes;
      float sums0[NT], sums1[NT];
      const auto passes = [&](auto guarded) {
        constexpr bool kGuarded = decltype(guarded)::value;
        bitmask_row_pair_avx2<kFirstPass, kGuarded>(z, atoms, m0, m1, v0, v1, values_end, sums0, sums1);
        if constexpr (kSecondPass > 0) {
          bitmask_row_pair_avx2<kSecondPass, kGuarded>(z_second, atoms, m0, m1, v0, v1, values_end,
                                                       sums0 + kFirstPass, sums1 + kFirstPass);
        }
      };
      if (v1 + nnz + 8 <= values_end) {  // o1 is the later row: its last byte is the one that may leave the buffer
        passes(std::false_type{});
      } else {
        passes(std::true_type{});
      }
      for (int n = 0; n < NT; ++n) {
        y[n * out + o0] = static_cast<O>(sums0[n]);
        y[n * out + o1] = static_cast<O>(sums1[n]);
      }
    }
  }
  for (int64_t o = row_begin + 2 * half; o < row_end; ++o) {  // every row, or an odd range's last one
    const V* v = values + o * nnz;
    const uint8_t* m = mask + o * mask_bytes;
    float sums[NT];
    const auto row = [&](auto guarded) {
      constexpr bool kGuarded = decltype(guarded)::value;
      if (pairs) {
        bitmask_row_avx2<kFirstPass, kGuarded>(z, atoms, m, v, values_end, sums);
        if constexpr (kSecondPass > 0) bitmask_row_avx2<kSecondPass, kGuarded>(z_second, atoms, m, v, values_end,
                                                                                sums + kFirstPass);
      } else {
        bitmask_row_avx2<NT, kGuarded>(z, atoms, m, v, values_end, sums);
      }
    };
    if (v + nnz + 8 <= values_end) {
      row(std::false_type{});
    } else {
      row(std::true_type{});
    }
    for (int n = 0; n < NT; ++n) y[n * out + o] = static_cast<O>(sums[n]);
  }
}

// Tokens from which AVX2 batches take the transposed batch loop (vector_rows.h) instead of bitmask_rows_avx2.
constexpr int64_t kRowsAvx2MaxTokens = 8;
#endif

// kSetBits[b]: the positions of byte b's set bits in increasing order, then zeros.
const std::array<std::array<uint8_t, 8>, 256> kSetBits = [] {
  std::array<std::array<uint8_t, 8>, 256> table{};
  for (int b = 0; b < 256; ++b) {
    int count = 0;
    for (int i = 0; i < 8; ++i) {
      if ((b >> i) & 1) table[b][count++] = static_cast<uint8_t>(i);
    }
  }
  return table;
}();

// A row's mask decoded into the zt offset (column · ld) of each of its nnz stored values. Branch-free per
// byte: all eight table entries are written (one 256-bit store with AVX2) and the cursor advances by the
// popcount, so `offsets` needs nnz + 8 slots. A branch per set bit instead mispredicted on about every
// other bit of a random mask and cost 10x the FMAs of a 2-16 token batch.
inline void decode_row_offsets(const uint8_t* mrow, int64_t mask_bytes, int32_t ld, int64_t nnz, int32_t* offsets) {
  int64_t t = 0;
#if defined(__AVX2__)
  const __m256i stride = _mm256_set1_epi32(ld);
#endif
  for (int64_t b = 0; b < mask_bytes && t < nnz; ++b) {
    const uint8_t bits = mrow[b];
#if defined(__AVX2__)
    const __m256i positions = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kSetBits[bits].data())));
    const __m256i columns = _mm256_add_epi32(positions, _mm256_set1_epi32(static_cast<int32_t>(b * 8)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(offsets + t), _mm256_mullo_epi32(columns, stride));
#else
    for (int i = 0; i < 8; ++i) offsets[t + i] = static_cast<int32_t>(b * 8 + kSetBits[bits][i]) * ld;
#endif
    t += __builtin_popcount(bits);
  }
}

#if !defined(SLIMSERVE_AVX2)
// One token: rows [row_begin, row_end) of y[0, :] from z [k] (float32); AVX2 builds take bitmask_rows_avx2.
template <typename V, typename O>
void bitmask_rows_one_token(const float* z, int64_t atoms, const V* values, const uint8_t* mask, O* y,
                            int64_t nnz, int64_t mask_bytes, const V* values_end, int64_t row_begin, int64_t row_end) {
  for (int64_t o = row_begin; o < row_end; ++o) {
    const uint8_t* mrow = mask + o * mask_bytes;
    const V* v = values + o * nnz;
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t j0 = 0;
    for (; j0 + 16 < atoms; j0 += 32) {  // two independent chains hide the FMA latency
      const __mmask16 b0 = static_cast<__mmask16>(mask_bits16(mrow, mask_bytes, j0));
      const __mmask16 b1 = static_cast<__mmask16>(mask_bits16(mrow, mask_bytes, j0 + 16));
      acc0 = _mm512_fmadd_ps(expand_values(v, b0), _mm512_maskz_loadu_ps(b0, z + j0), acc0);
      v += __builtin_popcount(b0);
      acc1 = _mm512_fmadd_ps(expand_values(v, b1), _mm512_maskz_loadu_ps(b1, z + j0 + 16), acc1);
      v += __builtin_popcount(b1);
    }
    if (j0 < atoms) {
      const __mmask16 b0 = static_cast<__mmask16>(mask_bits16(mrow, mask_bytes, j0));
      acc0 = _mm512_fmadd_ps(expand_values(v, b0), _mm512_maskz_loadu_ps(b0, z + j0), acc0);
    }
    y[o] = static_cast<O>(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)));
#else
    float s = 0.f;
    for (int64_t b = 0; b < mask_bytes; ++b) {
      for (uint32_t bits = mrow[b]; bits != 0; bits &= bits - 1) s += z[b * 8 + __builtin_ctz(bits)] * to_float(*v++);
    }
    y[o] = static_cast<O>(s);
#endif
  }
  (void)atoms;
  (void)values_end;
}
#endif

template <typename V, typename O>
void bitmask_dispatch(const torch::Tensor& zf, const V* val, int64_t out_features, int64_t nnz, const torch::Tensor& mask,
                      O* out) {
  const int64_t tokens = zf.size(0), atoms = zf.size(1), mask_bytes = mask.size(1);
  if (tokens == 0) return;  // the few-token loops below would read a block of tokens never given
  const uint8_t* msk = mask.data_ptr<uint8_t>();
  const V* values_end = val + out_features * nnz;
#if defined(SLIMSERVE_AVX2)
  if (tokens <= kRowsAvx2MaxTokens) {
    // one token of whole mask bytes is its own interleaving
    const auto interleaved = tokens == 1 && atoms % 8 == 0
        ? zf : slimserve_rows::interleaved_tokens(zf, row_pairs(tokens, atoms) ? kPairPassTokens : kRowsAvx2MaxTokens);
    const float* z = interleaved.data_ptr<float>();
    const auto rows = [&](auto tokens_constant) {
      at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
        bitmask_rows_avx2<decltype(tokens_constant)::value>(z, atoms, val, msk, out, out_features, nnz, mask_bytes,
                                                            values_end, begin, end);
      });
    };
    switch (tokens) {
      case 1: return rows(std::integral_constant<int, 1>{});
      case 2: return rows(std::integral_constant<int, 2>{});
      case 3: return rows(std::integral_constant<int, 3>{});
      case 4: return rows(std::integral_constant<int, 4>{});
      case 5: return rows(std::integral_constant<int, 5>{});
      case 6: return rows(std::integral_constant<int, 6>{});
      case 7: return rows(std::integral_constant<int, 7>{});
      default: return rows(std::integral_constant<int, 8>{});
    }
  }
#endif
  if (tokens > 1) {
    // Each row's mask is decoded once into its nnz zt offsets (decode_row_offsets), not once per pass of tokens.
    const auto zt = slimserve_rows::transposed_batch(zf);
    const int64_t ld = zt.size(1);
    TORCH_CHECK(atoms * ld < INT32_MAX, "bitmask_matmul: k x tokens must fit int32 offsets; split the batch");
    const float* zt_ptr = zt.data_ptr<float>();
    at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> offsets(nnz + 8);  // zt offset of each stored column of the current row
      slimserve_rows::batched_rows(zt_ptr, ld, val, nnz, out, tokens, out_features, begin, end, [&](int64_t o) {
        decode_row_offsets(msk + o * mask_bytes, mask_bytes, static_cast<int32_t>(ld), nnz, offsets.data());
        return [row = offsets.data()](int64_t i) { return static_cast<int64_t>(row[i]); };
      });
    });
    return;
  }
#if !defined(SLIMSERVE_AVX2)
  const float* z = zf.data_ptr<float>();
  at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
    bitmask_rows_one_token(z, atoms, val, msk, out, nnz, mask_bytes, values_end, begin, end);
  });
#endif
}

#if defined(__AVX512VBMI2__)
// One row's 32-atom spans (for expanded_dot in vector_rows.h and bf16 strips): its next popcount(bits) packed values,
// expanded under those 32 bits of its mask, so the stored mask is the expand mask as it is (as for the tile unit).
struct BitmaskSpans {
  const uint8_t* mask;
  int64_t mask_bytes;
  const uint16_t* packed;
  int64_t span = 0;
  __m512i next() {
    uint32_t bits = 0;
    const int64_t first = 4 * span++;
    if (first + 4 <= mask_bytes) {
      std::memcpy(&bits, mask + first, 4);  // a fixed size: inlined as one load
    } else {
      for (int64_t b = first; b < mask_bytes; ++b) bits |= static_cast<uint32_t>(mask[b]) << (8 * (b - first));
    }
    const int count = __builtin_popcount(bits);
    if ((first & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(mask + first) + 256, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(packed) + 1024, _MM_HINT_T0);
    // Only the span's own values are loaded (so the last row's never read past the tensor), without a branch: one
    // in the loop made GCC keep expanded_dot's accumulators on the stack.
    __m512i kept = _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, count), packed);
    // Keeps the load a load: the compiler folds it into vpexpandw's memory form otherwise, which ran the
    // tile unit's 8-token bitmask product at 0.64 ms against 0.5 for the register form on an Intel Xeon (on
    // AMD Zen 4 that form is microcoded).
    asm("" : "+v"(kept));
    const __m512i dense = _mm512_maskz_expand_epi16(bits, kept);
    packed += count;
    return dense;
  }
};
#endif

#if defined(SLIMSERVE_AMX)
// bf16 batches from this many tokens take the tile unit (bench/sparse_kernels.py: the batched vector loop ran at
// 0.2-0.5x of the dense layer from 2 tokens on). One token takes the one-token dot loop where the build has it
// (dot_one): on an Intel Xeon with AMX, 74 % of atoms kept, bf16, 2 threads, each call on the next of ~400 MB
// of weight copies, [5632, 2048] / [2048, 5632] / [1536, 576] took 1.10 / 0.89 / 0.117 ms there,
// 1.5-1.6 / 1.4 / 0.12 ms on the tile unit (bound by expanding rows into strips) and 1.7 / 1.8 / 0.16 ms in the
// one-token loop (dense: 0.96 / 0.90 / 0.09 ms). With the tile unit's few-token strips (amx_strips.h) it still
// leads there: L3-resident, half the atoms kept, [5632, 2048] / [2048, 5632] 0.41 / 0.39 ms against the tile unit's
// 0.63 / 0.49 ms at two tokens.
constexpr int64_t kAmxFromTokens = 2;

// y [tokens, out] bf16 = z · Cᵀ on the tile unit, for bf16 z and values.
torch::Tensor matmul_amx(const torch::Tensor& z, const torch::Tensor& values, const torch::Tensor& mask) {
  const int64_t out = values.size(0), nnz = values.size(1), mask_bytes = mask.size(1);
  const auto* val = reinterpret_cast<const uint16_t*>(values.data_ptr<c10::BFloat16>());
  const uint8_t* msk = mask.data_ptr<uint8_t>();
  const auto expand_row = [&](int64_t o, uint16_t* dense, int64_t span_stride, int64_t s0, int64_t s1,
                               int64_t& consumed) {  // the values of row o that spans before s0 used
    const uint16_t* row_values = val + o * nnz;
    BitmaskSpans spans{msk + o * mask_bytes, mask_bytes, row_values + consumed, s0};
    for (int64_t s = s0; s < s1; ++s) _mm512_storeu_si512(dense + (s - s0) * span_stride, spans.next());
    consumed = spans.packed - row_values;
  };
  auto y = torch::empty({z.size(0), out}, z.options());
  slimserve_amx::strips(z, out, expand_row, y.data_ptr<c10::BFloat16>());
  return y;
}
#endif

#if defined(SLIMSERVE_DPBF16)
// bf16 batches from this many tokens take expanded_dot (one token its one-token loop). AMD EPYC (Zen 4), 2 threads,
// [5632, 2048] at density 0.43, 8 weight copies streamed from memory: one token 0.29 ms against 0.73 for the float32
// expand loop (which reads each stored value once too, but widened and one row at a time); dense 0.8-0.9 ms.
constexpr int64_t kDotFromTokens = 1;
#endif


// `strided_rows`: values and mask may be views of the leading columns of wider rows (each row contiguous), which the
// strips read row by row; the other loops read both as one contiguous stream.
void check_strip_args(const torch::Tensor& values, const torch::Tensor& mask, int64_t atoms, const char* op,
                      bool strided_rows = false) {
  const bool rows_contiguous = values.dim() == 2 && mask.dim() == 2 &&
      (strided_rows ? (values.stride(1) == 1 || values.size(1) <= 1) && (mask.stride(1) == 1 || mask.size(1) <= 1)
                    : values.is_contiguous() && mask.is_contiguous());
  TORCH_CHECK(rows_contiguous && mask.scalar_type() == at::kByte && mask.size(0) == values.size(0) &&
              mask.size(1) == (atoms + 7) / 8 &&
              (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
              op, ": values [out, s] float32 or bfloat16, mask [out, ceil(k/8)] uint8",
              strided_rows ? ", each row contiguous" : "");
}

}  // namespace

#if defined(SLIMSERVE_DPBF16)
// Row o of C (bf16 values, contiguous with its mask) as the dot loops' cursor.
inline auto bitmask_rows(const torch::Tensor& values, const torch::Tensor& mask) {
  const int64_t nnz = values.size(1), mask_bytes = mask.size(1);
  const auto* val = reinterpret_cast<const uint16_t*>(values.data_ptr<c10::BFloat16>());
  const uint8_t* msk = mask.data_ptr<uint8_t>();
  return [=](int64_t o) { return BitmaskSpans{msk + o * mask_bytes, mask_bytes, val + o * nnz}; };
}

// y [N, out] float32 = z · Cᵀ for bf16 z and values, on the bf16 dot-product loop.
torch::Tensor bitmask_matmul_dot(torch::Tensor z, torch::Tensor values, torch::Tensor mask) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16,
              "bitmask_matmul_dot: z [N, k] and values must be bfloat16");
  check_strip_args(values, mask, z.size(1), "bitmask_matmul_dot");
  return slimserve_rows::expanded_dot(z.contiguous(), values.size(0), bitmask_rows(values, mask));
}
#endif

// Whether bf16 batches run on the AMX tile unit in this build and process.
bool amx_usable() {
#if defined(SLIMSERVE_AMX)
  return slimserve_amx::permitted();
#else
  return false;
#endif
}

torch::Tensor bitmask_matmul(torch::Tensor z, torch::Tensor values, torch::Tensor mask) {
  TORCH_CHECK(z.dim() == 2 && values.dim() == 2 && mask.dim() == 2 && mask.size(0) == values.size(0),
              "bitmask_matmul: z [N, k], values [out, s], mask [out, ceil(k/8)]");
  TORCH_CHECK(mask.size(1) == (z.size(1) + 7) / 8, "bitmask_matmul: mask must have ceil(k/8) bytes per row");
  TORCH_CHECK(values.is_contiguous() && mask.is_contiguous(), "bitmask_matmul: values and mask must be contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kByte, "bitmask_matmul: mask must be uint8");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
              "bitmask_matmul: values must be float32 or bfloat16");
#if defined(SLIMSERVE_AMX)
  if (z.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16 && amx_usable()) {
#if defined(SLIMSERVE_DPBF16)
    if (z.size(0) == 1) return bitmask_matmul_dot(z, values, mask).to(at::kBFloat16);
#endif
    if (z.size(0) >= kAmxFromTokens) return matmul_amx(z.contiguous(), values, mask);
  }
#endif
#if defined(SLIMSERVE_DPBF16)
  if (z.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16 && z.size(0) >= kDotFromTokens) {
    return bitmask_matmul_dot(z, values, mask).to(at::kBFloat16);
  }
#endif
  auto zf = z.to(at::kFloat).contiguous();
  auto y = torch::empty({z.size(0), values.size(0)}, values.options().dtype(slimserve_rows::output_dtype(z)));
  slimserve_rows::with_value_types(values, y, [&](const auto* val, auto* out) {
    bitmask_dispatch(zf, val, values.size(0), values.size(1), mask, out);
  });
  return y;
}

// y [N, Σ outs] float32 = z[:, shard i's atoms] · Cᵢᵀ per shard into its columns, for float32 z (x Dᵀ of a fused
// dictsparse layer's stacked dictionaries) and shard i's C a bitmask over its atoms[i] atoms, in order, on the
// few-token loops: a layer's coefficients in one call where each shard's slice, copy, product and store crossed the
// dispatcher (plugin/kernels/bitmask.py, DictionaryBitmaskPanels). The slices and stores here are plain copies.
torch::Tensor bitmask_matmul_shards(torch::Tensor z, std::vector<torch::Tensor> values, std::vector<torch::Tensor> masks,
                                    std::vector<int64_t> atoms) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == at::kFloat && !values.empty() && values.size() == masks.size() &&
              masks.size() == atoms.size() && z.size(1) == std::accumulate(atoms.begin(), atoms.end(), int64_t{0}),
              "bitmask_matmul_shards: float32 z [N, Σ atoms] and one values, mask and atom count per shard");
  int64_t width = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    check_strip_args(values[i], masks[i], atoms[i], "bitmask_matmul_shards");
    width += values[i].size(0);
  }
  auto y = torch::empty({z.size(0), width}, z.options());
  int64_t start = 0, column = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const int64_t out = values[i].size(0);
    const bool whole = values.size() == 1;
    const auto zi = whole ? z.contiguous() : z.narrow(1, start, atoms[i]).contiguous();
    auto yi = whole ? y : torch::empty({z.size(0), out}, z.options());
    slimserve_rows::with_value_types(values[i], yi, [&](const auto* val, auto* sums) {
      bitmask_dispatch(zi, val, out, values[i].size(1), masks[i], sums);
    });
    if (!whole) y.narrow(1, column, out).copy_(yi);
    start += atoms[i];
    column += out;
  }
  return y;
}

#if defined(SLIMSERVE_DPBF16)
// y [N, out] bf16 = [x | x Vᵀ] · Cᵀ for bf16 x: lowrank_sparse_folded's few-token step (U stored after S in C's rows)
// as one call. V comes as plain bf16 rows [r, in] on the dot loops (vector_rows.h's dense_rows): on AMD Zen 4 at one
// token they read a dense weight 1.08-1.19x faster than vLLM's oneDNN GEMM, whose call on SmolLM2's small V's cost
// about 22 µs. The joined inputs, as wide as C's mask bytes, are built in the dot loops' scratch after x's padded
// rows: x copied, x Vᵀ rounded to bf16 beside it; C's sums are stored as bf16 (in Python the joined inputs cost three
// operators and 10 µs more a call, docs/methods/lowrank_sparse.md; as ATen tensors here, five operators). C takes the
// dot loops even where bitmask_matmul would take the tile unit: the fold is built only on hosts without one.
torch::Tensor bitmask_matmul_lowrank(torch::Tensor x, torch::Tensor v, torch::Tensor values, torch::Tensor mask) {
  TORCH_CHECK(x.dim() == 2 && v.dim() == 2 && mask.dim() == 2 && x.size(1) == v.size(1) &&
              x.size(1) + v.size(0) <= 8 * mask.size(1),
              "bitmask_matmul_lowrank: x [N, in] and V [r, in] with in + r within the mask's 8 x bytes inputs");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && v.is_contiguous() &&
              values.scalar_type() == at::kBFloat16,
              "bitmask_matmul_lowrank: x, a contiguous V and the values must be bfloat16");
  const int64_t joined = 8 * mask.size(1), joined_width = slimserve_rows::padded_inputs(joined);
  check_strip_args(values, mask, joined, "bitmask_matmul_lowrank");
  const auto xc = x.contiguous();
  const int64_t tokens = xc.size(0), in = xc.size(1), out = values.size(0);
  uint16_t* inputs = nullptr;
  const auto xt = slimserve_rows::padded_in_scratch(xc, joined_width, &inputs);
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(inputs + t * joined_width, xt.data + t * xt.stride, sizeof(uint16_t) * in);
  }
  slimserve_rows::dense_rows(xt, reinterpret_cast<const uint16_t*>(v.data_ptr<c10::BFloat16>()), v.size(0),
                             slimserve_rows::bf16_store(inputs, joined_width, in));
  auto y = torch::empty({tokens, out}, xc.options());
  slimserve_rows::rows_dot(slimserve_rows::PaddedTokens{inputs, joined_width, tokens, joined}, out,
                           bitmask_rows(values, mask),
                           slimserve_rows::bf16_store(reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()), out));
  return y;
}

// y [N, Σ outs] bf16 = (x Dᵀ) Cᵢᵀ per shard into its columns, for a dictsparse layer (one shard, or a fused layer's
// q/k/v or gate/up: the dictionaries D stacked row-wise as plain bf16 rows, shard i's C a bitmask over its `atoms[i]`
// atoms, reading its slice of x Dᵀ, in order), on the dot loops: the same products, rounded as one call per factor
// rounds them (x Dᵀ in bf16 between them), in one call where a fused layer crossed the dispatcher for D, the output,
// and per shard a slice, a copy, the product and a store (plugin/kernels/bitmask.py, DictionaryBitmaskRows). C takes
// the dot loops even where bitmask_matmul would take the tile unit: the layer is built only on hosts without one.
torch::Tensor bitmask_matmul_dictionary(torch::Tensor x, torch::Tensor dictionary, std::vector<torch::Tensor> values,
                                        std::vector<torch::Tensor> masks, std::vector<int64_t> atoms) {
  TORCH_CHECK(values.size() == masks.size() && values.size() == atoms.size() && !values.empty(),
              "bitmask_matmul_dictionary: one values, mask and atom count per shard");
  std::vector<int64_t> outs;
  for (size_t i = 0; i < values.size(); ++i) {
    TORCH_CHECK(values[i].scalar_type() == at::kBFloat16,
                "bitmask_matmul_dictionary: every shard's values must be bfloat16");
    check_strip_args(values[i], masks[i], atoms[i], "bitmask_matmul_dictionary");
    outs.push_back(values[i].size(0));
  }
  TORCH_CHECK(x.dim() == 2 && dictionary.dim() == 2 && x.size(1) == dictionary.size(1) &&
              dictionary.size(0) == std::accumulate(atoms.begin(), atoms.end(), int64_t{0}) &&
              x.scalar_type() == at::kBFloat16 && dictionary.scalar_type() == at::kBFloat16 &&
              dictionary.is_contiguous(),
              "bitmask_matmul_dictionary: x [N, in] and a contiguous dictionary [Σ atoms, in], both bfloat16");
  return slimserve_rows::first_rows_then_shards(
      x, reinterpret_cast<const uint16_t*>(dictionary.data_ptr<c10::BFloat16>()), atoms, outs,
      [&](size_t i, const slimserve_rows::PaddedTokens& z, const auto& store) {
        slimserve_rows::rows_dot(z, outs[i], bitmask_rows(values[i], masks[i]), store);
      });
}
#endif

namespace {
// Rows first + begin .. first + end of C as dense rows in O (float32 or bf16; zeroed here) at rows begin .. end of
// `strip`. bf16 rows of bf16 values are expanded 32 atoms at a time where VBMI2 allows, else set bit by set bit.
// Row o's values start at values + o * value_stride and its mask_bytes mask bytes at mask + o * mask_stride (strides
// past a row's own length: the rows of a wider layout, lowrank_sparse_folded's).
template <typename V, typename O>
void bitmask_rows_to_dense(const V* values, const V* values_end, const uint8_t* mask, O* strip, int64_t atoms,
                           int64_t nnz, int64_t value_stride, int64_t mask_bytes, int64_t mask_stride, int64_t first,
                           int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t o = first + r;
    const V* v = values + o * value_stride;
    O* row = strip + r * atoms;
#if defined(__AVX512VBMI2__)
    if constexpr (std::is_same<V, c10::BFloat16>::value && std::is_same<O, c10::BFloat16>::value) {
      BitmaskSpans spans{mask + o * mask_stride, mask_bytes, reinterpret_cast<const uint16_t*>(v)};
      for (int64_t j = 0; j < atoms; j += 32) {
        const int64_t left = atoms - j;  // the last span is stored under a mask: the next row may be another thread's
        _mm512_mask_storeu_epi16(row + j, left >= 32 ? ~0u : (1u << left) - 1, spans.next());
      }
      continue;
    }
#endif
#if defined(SLIMSERVE_AVX2)
    if constexpr (std::is_same<O, float>::value) {
      // a full mask byte's 8 columns placed in registers (the row loop's permutation) and stored whole: the bit loop
      // below took about 3.5 cycles a column, as long as the GEMM of a 32-token strip
      const uint8_t* mrow = mask + o * mask_stride;
      const int64_t full_bytes = atoms / 8;
      const bool guarded = v + nnz + 8 > values_end;
      for (int64_t b = 0; b < full_bytes; ++b) {
        const __m256 vals = guarded ? mask_byte_values<true>(mrow[b], v, values_end)
                                    : mask_byte_values<false>(mrow[b], v, values_end);
        _mm256_storeu_ps(row + 8 * b, vals);
      }
      for (int64_t j = full_bytes * 8; j < atoms; ++j) row[j] = (mrow[full_bytes] >> (j % 8)) & 1 ? to_float(*v++) : 0.f;
      continue;
    }
#endif
    std::memset(static_cast<void*>(row), 0, sizeof(O) * atoms);
    for (int64_t b = 0; b < mask_bytes; ++b) {
      for (uint32_t bits = mask[o * mask_stride + b]; bits != 0; bits &= bits - 1) {
        row[b * 8 + __builtin_ctz(bits)] = static_cast<O>(to_float(*v++));
      }
    }
  }
}

}  // namespace

// y [N, out] = z · Cᵀ for many tokens (prefill) off the tile unit, on strips of C decoded in cache (float32 out, bf16 for
// bf16 batches where the CPU has AVX512_BF16; vector_rows.h). values and mask may be views of the leading columns of
// wider rows (each row contiguous): lowrank_sparse_folded keeps U after S in every row and multiplies S alone here.
torch::Tensor bitmask_matmul_strips(torch::Tensor z, torch::Tensor values, torch::Tensor mask) {
  TORCH_CHECK(z.dim() == 2, "bitmask_matmul_strips: z must be [N, k]");
  const int64_t atoms = z.size(1), nnz = values.size(1), mask_bytes = mask.size(1);
  check_strip_args(values, mask, atoms, "bitmask_matmul_strips", /*strided_rows=*/true);
  const int64_t value_stride = values.stride(0), mask_stride = mask.stride(0);
  const uint8_t* msk = mask.data_ptr<uint8_t>();
#if defined(__AVX512BF16__)
  // A CPU with native bf16 dot products runs a bf16 GEMM at about twice the fp32 rate (AMD Zen 4), so bf16 batches
  // keep bf16 strips; elsewhere bf16 GEMMs are emulated and the strips stay float32.
  const bool bf16 = z.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16;
#else
  const bool bf16 = false;
#endif
  const int64_t out = values.size(0);
  return slimserve_rows::strips_gemm(z, out, bf16 ? at::kBFloat16 : at::kFloat,
                                     [&](torch::Tensor& strip, int64_t first, int64_t begin, int64_t end) {
    slimserve_rows::with_value_types(values, strip, [&](const auto* val, auto* rows) {
      // the last row's values end the storage these rows read
      const auto* values_end = val + (out > 0 ? (out - 1) * value_stride + nnz : 0);
      bitmask_rows_to_dense(val, values_end, msk, rows, atoms, nnz, value_stride, mask_bytes, mask_stride, first, begin,
                            end);
    });
  });
}

#if defined(SLIMSERVE_PANELS)
// y [N, out] float32 = z · Cᵀ for many tokens, multiplying only the stored values (vector_rows.h).
torch::Tensor bitmask_matmul_kept(torch::Tensor z, torch::Tensor values, torch::Tensor mask) {
  TORCH_CHECK(z.dim() == 2, "bitmask_matmul_kept: z must be [N, k]");
  const int64_t atoms = z.size(1), nnz = values.size(1), mask_bytes = mask.size(1);
  check_strip_args(values, mask, atoms, "bitmask_matmul_kept");
  const uint8_t* msk = mask.data_ptr<uint8_t>();
  return slimserve_rows::panel_product(z, values.size(0), nnz, [&](int64_t o, int32_t* cols, float* w) {
    decode_row_offsets(msk + o * mask_bytes, mask_bytes, slimserve_rows::kPanelTokens, nnz, cols);
    slimserve_rows::widen_row(values, o, w);
  });
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bitmask_matmul_strips", &bitmask_matmul_strips,
        "y = z · Cᵀ (float32) for many tokens: strips of C decoded in cache, each multiplied by a dense GEMM");
#if defined(SLIMSERVE_PANELS)
  m.def("bitmask_matmul_kept", &bitmask_matmul_kept,
        "y = z · Cᵀ (float32) for many tokens, multiplying only the stored values (AVX2 builds)");
#endif
  m.def("bitmask_matmul", &bitmask_matmul, "y = z · Cᵀ for row-sparse C stored as packed values + a bit mask");
  m.def("bitmask_matmul_shards", &bitmask_matmul_shards,
        "y = z · Cᵢᵀ per shard into its columns (float32) for float32 z, each C a bitmask over its atoms (few tokens)");
#if defined(SLIMSERVE_DPBF16)
  m.def("bitmask_matmul_lowrank", &bitmask_matmul_lowrank,
        "y = [x | x Vᵀ] · Cᵀ (bf16) for V as plain bf16 rows (lowrank_sparse_folded's few tokens)");
  m.def("bitmask_matmul_dictionary", &bitmask_matmul_dictionary,
        "y = (x Dᵀ) Cᵢᵀ per shard into its columns (bf16), D as plain bf16 rows, each C a bitmask (few tokens)");
  m.def("bitmask_matmul_dot", &bitmask_matmul_dot,
        "y = z · Cᵀ for bf16 batches: expanded 32-atom spans dotted with _mm512_dpbf16_ps (float32 out)");
#endif
  m.def("isa", [] { return std::string(kIsa); }, "the instruction set this build's inner loops use");
  m.def("amx_usable", &amx_usable, "whether bf16 batches run on the AMX tile unit in this build and process");
}
