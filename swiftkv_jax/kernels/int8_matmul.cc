// y = x @ dequantise(w).T for int8 weights on XLA:CPU (an XLA FFI custom call), for the few rows
// of a decode step (and the many of a prefill chunk where the CPU has AVX-512 VNNI).
//
// Decode at small batch reads every weight once per step, so bytes per weight set its speed; but
// XLA:CPU runs an int8 weight-only matmul by converting the whole weight to float32 before its dot
// (~0.14x of float32 at one row, benchmarks/bench_weight_dtypes.py). This kernel reads the int8
// weights in place. Weights are laid out [N outputs, K inputs] (each output's inputs contiguous, as
// Hugging Face and GGUF store them), with one float32 scale per block of B inputs of each output
// (B = K: one per output): w_float[n, k] = w[n, k] * scales[n, k / B].
// Three paths, the first that applies:
//  * AVX-512 VNNI (K a multiple of 64, B of 32): the rows are quantised too, symmetric int8 per
//    block of 32 inputs (as llama.cpp's Q8 dot products do), and each 64 weights x 64 inputs is
//    one integer dot-product instruction (vpdpbusd), scaled once per block: ~1.6x the float
//    path's multiply rate at 8 rows, fewer instructions per weight at one. Each row is quantised
//    on its own and the integer sums are exact, so a row's result does not depend on the others.
//    From 17 rows (prefill chunks) the same products run as a GEMM over weights repacked per
//    tile (RangeGemm): ~3x XLA's float32 dot here.
//  * AVX2 + FMA: for each tile of 4 outputs the weights are read once, converted and scaled into a
//    float32 scratch that stays in L1, and every row of x is multiplied with it there; at one or
//    two rows they are read straight from the int8 values instead.
//  * scalar (no AVX2, or asked for: tests compare the paths).
// Contiguous ranges of outputs are split over our own helper threads (Helpers, below; the float
// copy for prefill chunks over XLA's pool), their weights prefetched a few tiles ahead.

#ifdef __linux__
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SWIFTKV_INT8_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SWIFTKV_INT8_VNNI 1
#endif
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 4;           // outputs per tile (converted together into the scratch)
constexpr int64_t kMinItem = 16;       // outputs per unit of work handed to a thread, at least
constexpr int64_t kItemsPerThread = 4; // contiguous items per thread (their weights stream in order)
constexpr int64_t kPrefetchTiles = 4;  // how far ahead the weights are prefetched

constexpr int64_t kActBlock = 32;     // inputs per activation scale (the VNNI path)
constexpr int64_t kChunk = 64;        // inputs per integer dot-product instruction (two act blocks)

// Which loop computes the products: the fastest the CPU has, or one asked for by tests.
enum Path : int64_t { kBest = 0, kScalar = 1, kFloat = 2 };

// The rows of x quantised for the VNNI path: per row and block of 32 inputs, int8 values and
// their scale; per chunk of 64 inputs the two blocks' scales as one 16-lane vector (lanes 0-7:
// the first block, 8-15: the second, as vpdpbusd's lanes sum 4 inputs each), and -128 x the sum
// of each 4 values (the weights enter the instruction as unsigned w + 128; this undoes the 128).
struct QuantisedRows {
  std::vector<int8_t> q;              // [R, K]
  std::vector<float> lane_scales;     // [R, K / 64, 16]
  std::vector<int32_t> offsets;       // [R, K / 4]
  std::vector<float> block_scales;    // [R, K / 32] (the GEMM path)
  std::vector<int32_t> block_offsets;  // [R, K / 32]: -128 x the block's sum
};

struct Problem {
  const float* x;       // [R, K]
  const int8_t* w;      // [N, K]
  const float* scales;  // [N, NB]
  float* y;             // [R, N]
  int64_t R, K, N, NB, B;
  const QuantisedRows* xq = nullptr;  // set when the VNNI path runs
};

// Output n of every row, scalar: the reference path (and the one without AVX2).
void OutputScalar(const Problem& p, int64_t n) {
  const int8_t* wn = p.w + n * p.K;
  for (int64_t r = 0; r < p.R; ++r) {
    const float* xr = p.x + r * p.K;
    float acc = 0.f;
    for (int64_t b = 0; b < p.NB; ++b) {
      float part = 0.f;
      for (int64_t k = b * p.B; k < (b + 1) * p.B; ++k) part += xr[k] * static_cast<float>(wn[k]);
      acc += part * p.scales[n * p.NB + b];
    }
    p.y[r * p.N + n] = acc;
  }
}

#ifdef SWIFTKV_INT8_AVX2
inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 int8 weights as float32.
inline __m256 Load8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

// Weights of outputs [n, n + count) -> float32 scratch rows of K, scaled block by block.
void Dequantise(const Problem& p, int64_t n, int64_t count, float* scratch) {
  for (int64_t i = 0; i < count; ++i) {
    const int8_t* wn = p.w + (n + i) * p.K;
    const float* sn = p.scales + (n + i) * p.NB;
    float* dst = scratch + i * p.K;
    for (int64_t b = 0; b < p.NB; ++b) {
      const int64_t k0 = b * p.B, k1 = k0 + p.B;
      const __m256 s = _mm256_set1_ps(sn[b]);
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) {
        _mm256_storeu_ps(dst + k, _mm256_mul_ps(Load8(wn + k), s));
      }
      for (; k < k1; ++k) dst[k] = static_cast<float>(wn[k]) * sn[b];
    }
  }
}

// RB rows starting at r0 times the kTile scratch rows: 4 x RB accumulators, x read once per tile.
template <int RB>
void RowsTimesTile(const Problem& p, int64_t r0, int64_t n, const float* scratch) {
  __m256 acc[RB][kTile];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < kTile; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t K = p.K, K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 w[kTile];
    for (int j = 0; j < kTile; ++j) w[j] = _mm256_loadu_ps(scratch + j * K + k);
    for (int r = 0; r < RB; ++r) {
      const __m256 xv = _mm256_loadu_ps(p.x + (r0 + r) * K + k);
      for (int j = 0; j < kTile; ++j) acc[r][j] = _mm256_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    const float* xr = p.x + (r0 + r) * K;
    for (int j = 0; j < kTile; ++j) {
      float sum = HorizontalSum(acc[r][j]);
      for (int64_t k = K8; k < K; ++k) sum += xr[k] * scratch[j * K + k];
      p.y[(r0 + r) * p.N + n + j] = sum;
    }
  }
}

// One or two rows times outputs [n, n + kTile), straight from the int8 weights: each block's
// products are summed unscaled, then scaled once (the fewest instructions per weight: at one row
// the loop must keep up with memory).
template <int RB, int T>
void RowsTimesWeights(const Problem& p, int64_t r0, int64_t n) {
  __m256 acc[RB][T];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < T; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t K = p.K, B = p.B;
  const int8_t* w = p.w + n * K;
  for (int64_t b = 0; b < p.NB; ++b) {
    __m256 part[RB][T];
    for (int r = 0; r < RB; ++r)
      for (int j = 0; j < T; ++j) part[r][j] = _mm256_setzero_ps();
    for (int64_t k = b * B; k < (b + 1) * B; k += 8) {
      if (k % 64 == 0)  // each cache line of the tile kPrefetchTiles ahead, as this one is read
        for (int j = 0; j < T; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(w + (kPrefetchTiles * T + j) * K + k), _MM_HINT_T0);
      __m256 wf[T];
      for (int j = 0; j < T; ++j) wf[j] = Load8(w + j * K + k);
      for (int r = 0; r < RB; ++r) {
        const __m256 xv = _mm256_loadu_ps(p.x + (r0 + r) * K + k);
        for (int j = 0; j < T; ++j) part[r][j] = _mm256_fmadd_ps(xv, wf[j], part[r][j]);
      }
    }
    for (int j = 0; j < T; ++j) {
      const __m256 s = _mm256_set1_ps(p.scales[(n + j) * p.NB + b]);
      for (int r = 0; r < RB; ++r) acc[r][j] = _mm256_fmadd_ps(part[r][j], s, acc[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < T; ++j) p.y[(r0 + r) * p.N + n + j] = HorizontalSum(acc[r][j]);
}

// Outputs [n, n + kTile) of every row.
void TileVector(const Problem& p, int64_t n, float* scratch) {
  if (p.B % 8 == 0 && p.R <= 2) {
    if (p.R == 2) RowsTimesWeights<2, kTile>(p, 0, n); else RowsTimesWeights<1, kTile>(p, 0, n);
    return;
  }
  Dequantise(p, n, kTile, scratch);
  int64_t r = 0;
  for (; r + 3 <= p.R; r += 3) RowsTimesTile<3>(p, r, n, scratch);
  if (p.R - r == 2) RowsTimesTile<2>(p, r, n, scratch);
  if (p.R - r == 1) RowsTimesTile<1>(p, r, n, scratch);
}
#endif

#ifdef SWIFTKV_INT8_VNNI
bool VnniApplies(const Problem& p) { return p.K % kChunk == 0 && p.B % kActBlock == 0; }

// x [R, K] -> QuantisedRows: per block of 32, scale = max |x| / 127, value = round(x * 127 / max)
// (to nearest even: the default rounding mode, as lrintf and NumPy's rint).
void QuantiseRows(const float* x, int64_t R, int64_t K, QuantisedRows* out) {
  out->q.resize(R * K);
  out->lane_scales.resize(R * (K / kChunk) * 16);
  out->offsets.resize(R * K / 4);
  out->block_scales.resize(R * K / kActBlock);
  out->block_offsets.resize(R * K / kActBlock);
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * K;
    int8_t* qr = out->q.data() + r * K;
    for (int64_t k0 = 0; k0 < K; k0 += kActBlock) {
      const __m512 a = _mm512_loadu_ps(xr + k0), b = _mm512_loadu_ps(xr + k0 + 16);
      const float amax =
          _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, abs_mask), _mm512_and_ps(b, abs_mask)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k0),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k0 + 16),
                       _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv))));
      float* lanes = out->lane_scales.data() + (r * (K / kChunk) + k0 / kChunk) * 16 + (k0 % kChunk) / 4;
      std::fill(lanes, lanes + 8, amax / 127.f);
      out->block_scales[(r * K + k0) / kActBlock] = amax / 127.f;
    }
    for (int64_t i = 0; i < K / 4; ++i)
      out->offsets[r * K / 4 + i] = -128 * (qr[4 * i] + qr[4 * i + 1] + qr[4 * i + 2] + qr[4 * i + 3]);
    for (int64_t b = 0; b < K / kActBlock; ++b) {
      int32_t sum = 0;
      for (int64_t i = 0; i < kActBlock / 4; ++i) sum += out->offsets[r * K / 4 + b * kActBlock / 4 + i];
      out->block_offsets[r * K / kActBlock + b] = sum;
    }
  }
}

// Rows [r0, r0 + RB) times outputs [n, n + T): per chunk of 64 inputs one vpdpbusd per row and
// output, converted and scaled by (row block scale x weight block scale) into float accumulators.
template <int RB, int T>
void RowsTimesWeightsVnni(const Problem& p, int64_t r0, int64_t n) {
  const QuantisedRows& xq = *p.xq;
  const int64_t K = p.K, chunks = K / kChunk;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[RB][T];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < T; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k = c * kChunk;
    __m512i w[T];
    __m512 ws[T];
    for (int j = 0; j < T; ++j) {
      const int8_t* wj = p.w + (n + j) * K + k;
      _mm_prefetch(reinterpret_cast<const char*>(wj + kPrefetchTiles * T * K), _MM_HINT_T0);
      w[j] = _mm512_xor_si512(_mm512_loadu_si512(wj), flip);  // w + 128, as unsigned bytes
      const float* sj = p.scales + (n + j) * p.NB;
      ws[j] = _mm512_insertf32x8(_mm512_set1_ps(sj[k / p.B]), _mm256_set1_ps(sj[(k + kActBlock) / p.B]), 1);
    }
    for (int r = 0; r < RB; ++r) {
      const int64_t row = r0 + r;
      const __m512i xv = _mm512_loadu_si512(xq.q.data() + row * K + k);
      const __m512i off = _mm512_loadu_si512(xq.offsets.data() + row * K / 4 + k / 4);
      const __m512 xs = _mm512_loadu_ps(xq.lane_scales.data() + (row * chunks + c) * 16);
      for (int j = 0; j < T; ++j) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(off, w[j], xv));
        acc[r][j] = _mm512_fmadd_ps(_mm512_mul_ps(dot, xs), ws[j], acc[r][j]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < T; ++j) p.y[(r0 + r) * p.N + n + j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <int T>
void AllRowsVnni(const Problem& p, int64_t n) {
  int64_t r = 0;
  for (; r + 8 <= p.R; r += 8) RowsTimesWeightsVnni<8, T>(p, r, n);
  switch (p.R - r) {
    case 7: RowsTimesWeightsVnni<7, T>(p, r, n); break;
    case 6: RowsTimesWeightsVnni<6, T>(p, r, n); break;
    case 5: RowsTimesWeightsVnni<5, T>(p, r, n); break;
    case 4: RowsTimesWeightsVnni<4, T>(p, r, n); break;
    case 3: RowsTimesWeightsVnni<3, T>(p, r, n); break;
    case 2: RowsTimesWeightsVnni<2, T>(p, r, n); break;
    case 1: RowsTimesWeightsVnni<1, T>(p, r, n); break;
    default: break;
  }
}

// Outputs [n0, n1) of every row on the VNNI path: 4 outputs at a time at 1-2 rows (more loads in
// flight), 2 at more rows (registers), 1 for the tail.
void RangeVnni(const Problem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (p.R <= 2)
    for (; n + 4 <= n1; n += 4) AllRowsVnni<4>(p, n);
  for (; n + 2 <= n1; n += 2) AllRowsVnni<2>(p, n);
  for (; n < n1; ++n) AllRowsVnni<1>(p, n);
}

// Prefill chunks (many rows) on the VNNI path: a GEMM over weights repacked one tile of outputs at
// a time into the layout the instruction wants for many rows: per 4 inputs, the 4 bytes of each of
// 16 outputs side by side (one 64-byte vector), so one vpdpbusd multiplies 16 outputs x 4 inputs
// by one row's 4 inputs broadcast, and a lane sums a whole block of 32 inputs in integers before
// the block's scales are applied once (the decode path scales every 64 products: fine when memory
// bounds it, ~f32's rate when compute does). The repack (a 16 x 16 dword transpose: ~6
// instructions per 64 bytes) runs once per call and serves every row of the chunk.
constexpr int64_t kGemmMinRows = 17;  // fewer rows: the decode path (weights streamed once; Python
                                      // sends only <= 16 rows here on CPUs without VNNI)
constexpr int kGroup = 16;            // outputs per vector
constexpr int kGroupsPerTile = 2;     // outputs per tile (and per register block): 32

// 16 vectors of 16 int32 (row j = output j's 4-byte groups k) -> their transpose (column k = the
// k-th 4-byte group of each of the 16 outputs): 64 shuffles, within 128-bit lanes, then of lanes.
inline void Transpose16x16(__m512i v[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  // b[4m + c], 128-bit lane L: outputs 4m..4m+3 of group 4L + c
  for (int m = 0; m < 4; ++m) {
    b[4 * m + 0] = _mm512_unpacklo_epi64(a[4 * m], a[4 * m + 2]);
    b[4 * m + 1] = _mm512_unpackhi_epi64(a[4 * m], a[4 * m + 2]);
    b[4 * m + 2] = _mm512_unpacklo_epi64(a[4 * m + 1], a[4 * m + 3]);
    b[4 * m + 3] = _mm512_unpackhi_epi64(a[4 * m + 1], a[4 * m + 3]);
  }
  // group 4L + c = lane L of b[c], b[4 + c], b[8 + c], b[12 + c]: a 4 x 4 transpose of lanes
  for (int c = 0; c < 4; ++c) {
    const __m512i y0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), y1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i y2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i y3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    v[c] = _mm512_shuffle_i32x4(y0, y2, 0x88);
    v[4 + c] = _mm512_shuffle_i32x4(y0, y2, 0xDD);
    v[8 + c] = _mm512_shuffle_i32x4(y1, y3, 0x88);
    v[12 + c] = _mm512_shuffle_i32x4(y1, y3, 0xDD);
  }
}

// Outputs [n0, n0 + 32) (those < N; the rest zero) -> packed[g][K / 4][16] int32 of (w + 128)
// bytes and scales[g][K / 32][16] (each output's scale for each block of 32 inputs).
void PackTile(const Problem& p, int64_t n0, int32_t* packed, float* scales) {
  const int64_t K4 = p.K / 4, NB32 = p.K / kActBlock;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int g = 0; g < kGroupsPerTile; ++g) {
    const int64_t first = n0 + g * kGroup;
    for (int64_t c = 0; c < p.K / kChunk; ++c) {  // 64 inputs (16 groups of 4) of 16 outputs
      __m512i v[kGroup];
      for (int j = 0; j < kGroup; ++j) {
        const int8_t* wj = p.w + (first + j) * p.K + c * kChunk;
        if (first + j < p.N) _mm_prefetch(reinterpret_cast<const char*>(wj + 4 * kChunk), _MM_HINT_T0);
        v[j] = _mm512_xor_si512(first + j < p.N ? _mm512_loadu_si512(wj) : _mm512_setzero_si512(), flip);
      }
      Transpose16x16(v);
      for (int k = 0; k < kGroup; ++k) _mm512_storeu_si512(packed + (g * K4 + c * kGroup + k) * kGroup, v[k]);
    }
    for (int j = 0; j < kGroup; ++j) {
      const int64_t n = first + j;
      for (int64_t b = 0; b < NB32; ++b)
        scales[(g * NB32 + b) * kGroup + j] = n < p.N ? p.scales[n * p.NB + b * kActBlock / p.B] : 0.f;
    }
  }
}

// Rows [r0, r0 + RB) times the packed tile's 32 outputs; y written for outputs < N.
template <int RB>
void RowsTimesPackedTile(const Problem& p, int64_t r0, int64_t n0, const int32_t* packed,
                         const float* scales) {
  const QuantisedRows& xq = *p.xq;
  const int64_t K4 = p.K / 4, NB32 = p.K / kActBlock;
  constexpr int G = kGroupsPerTile;
  __m512 acc[RB][G];
  for (int r = 0; r < RB; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int64_t b = 0; b < NB32; ++b) {
    __m512i dot[RB][G];
    const int32_t* xr[RB];
    for (int r = 0; r < RB; ++r) {
      const int64_t row = r0 + r;
      xr[r] = reinterpret_cast<const int32_t*>(xq.q.data() + row * p.K + b * kActBlock);
      const __m512i off = _mm512_set1_epi32(xq.block_offsets[row * NB32 + b]);
      for (int g = 0; g < G; ++g) dot[r][g] = off;
    }
    for (int i = 0; i < kActBlock / 4; ++i) {
      __m512i w[G];
      for (int g = 0; g < G; ++g) w[g] = _mm512_loadu_si512(packed + (g * K4 + b * (kActBlock / 4) + i) * kGroup);
      for (int r = 0; r < RB; ++r) {
        int32_t x4;
        std::memcpy(&x4, xr[r] + i, 4);
        const __m512i xb = _mm512_set1_epi32(x4);
        for (int g = 0; g < G; ++g) dot[r][g] = _mm512_dpbusd_epi32(dot[r][g], w[g], xb);
      }
    }
    __m512 ws[G];
    for (int g = 0; g < G; ++g) ws[g] = _mm512_loadu_ps(scales + (g * NB32 + b) * kGroup);
    for (int r = 0; r < RB; ++r) {
      const __m512 xs = _mm512_set1_ps(xq.block_scales[(r0 + r) * NB32 + b]);
      for (int g = 0; g < G; ++g)
        acc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][g]), _mm512_mul_ps(ws[g], xs), acc[r][g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const int64_t n = n0 + g * kGroup;
    if (n >= p.N) break;
    const __mmask16 mask = p.N - n >= kGroup ? 0xffff : static_cast<__mmask16>((1u << (p.N - n)) - 1);
    for (int r = 0; r < RB; ++r) _mm512_mask_storeu_ps(p.y + (r0 + r) * p.N + n, mask, acc[r][g]);
  }
}

// Outputs [n0, n1) of every row (n0 a multiple of 32): tile by tile, packed, then all rows.
void RangeGemm(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int64_t tile = kGroup * kGroupsPerTile;
  thread_local std::vector<int32_t> packed;
  thread_local std::vector<float> scales;
  packed.resize(kGroupsPerTile * p.K / 4 * kGroup);
  scales.resize(kGroupsPerTile * p.K / kActBlock * kGroup);
  for (int64_t n = n0; n < n1; n += tile) {
    PackTile(p, n, packed.data(), scales.data());
    int64_t r = 0;
    for (; r + 6 <= p.R; r += 6) RowsTimesPackedTile<6>(p, r, n, packed.data(), scales.data());
    switch (p.R - r) {
      case 5: RowsTimesPackedTile<5>(p, r, n, packed.data(), scales.data()); break;
      case 4: RowsTimesPackedTile<4>(p, r, n, packed.data(), scales.data()); break;
      case 3: RowsTimesPackedTile<3>(p, r, n, packed.data(), scales.data()); break;
      case 2: RowsTimesPackedTile<2>(p, r, n, packed.data(), scales.data()); break;
      case 1: RowsTimesPackedTile<1>(p, r, n, packed.data(), scales.data()); break;
      default: break;
    }
  }
}
#endif

// Runs fn(0), ..., fn(items - 1) on the calling thread and on XLA's thread pool, and returns when
// all are done. A task that starts after every item is taken returns at once; the shared state
// outlives the call for it (fn is only called while items remain, so its captures stay valid).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  auto run = [state, items, &fn] {
    for (int64_t i = state->next.fetch_add(1); i < items; i = state->next.fetch_add(1)) {
      fn(i);
      if (state->done.fetch_add(1) + 1 == items) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->all_done.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->all_done.wait(lock, [&] { return state->done.load() == items; });
}

// Our own helper threads for the matmul calls (one fewer than the CPUs this process may use).
// A decode step makes ~120 of these calls back to back, each ~20-150 us of work: waking one of
// XLA's pool threads for each cost ~50-75 us a call (measured: a 1536 x 576 x 8 call took 150 us in
// XLA vs 75 us in a C++ harness). So a helper spins a short while after each call (the next one
// is usually that close) before it sleeps on a condition variable; the caller works too.
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Helpers {
 public:
  static Helpers& Get() {
    static Helpers* helpers = new Helpers();  // never destroyed: threads outlive static teardown
    return *helpers;
  }

  int64_t threads() const { return static_cast<int64_t>(threads_.size()) + 1; }

  // Runs fn(0), ..., fn(items - 1) on the calling thread and the helpers; returns when all are done.
  void Run(int64_t items, const std::function<void(int64_t)>& fn) {
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->items = items;
    std::atomic_store_explicit(&job_, job, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_release);
    if (sleeping_.load(std::memory_order_acquire) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      wake_.notify_all();
    }
    job->Work();
    while (job->done.load(std::memory_order_acquire) < items) CpuRelax();
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* fn = nullptr;  // valid while an item is not done
    int64_t items = 0;
    std::atomic<int64_t> next{0}, done{0};
    void Work() {
      for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
        (*fn)(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  Helpers() {
    const char* env = std::getenv("SWIFTKV_JAX_SPIN_US");
    spin_ = std::chrono::microseconds(env ? std::atoll(env) : 100);
    int cpus = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#ifdef __linux__
    cpu_set_t set;  // the CPUs this process may use (taskset, containers), not all the machine's
    if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
#endif
    for (int i = 1; i < cpus; ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& t : threads_) t.detach();
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int64_t spins = 1; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        if (spins % 256 == 0 && std::chrono::steady_clock::now() - start > spin_) {  // the clock: rarely
          std::unique_lock<std::mutex> lock(mu_);
          sleeping_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          sleeping_.fetch_sub(1);
          break;
        }
        CpuRelax();
      }
      seen = generation_.load(std::memory_order_acquire);
      std::atomic_load_explicit(&job_, std::memory_order_acquire)->Work();
    }
  }

  std::vector<std::thread> threads_;
  std::shared_ptr<Job> job_ = std::make_shared<Job>();
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};
  std::mutex mu_;
  std::condition_variable wake_;
  std::chrono::microseconds spin_;
};

// Outputs per unit of work: contiguous ranges, a few per thread, a multiple of `tile`.
int64_t ItemSize(int64_t n, int64_t threads, int64_t tile = kTile) {
  threads = std::max<int64_t>(threads, 1);
  return (std::max(kMinItem, n / (threads * kItemsPerThread)) + tile - 1) / tile * tile;
}

ffi::Error CheckShapes(const Problem& p, const char* what) {
  if (p.NB <= 0 || p.K % p.NB != 0) return ffi::Error::InvalidArgument(what);
  return ffi::Error::Success();
}

// y_i = x @ dequantise(w_i).T for every weight i given (q/k/v, or gate/up: one input, one call, so
// the threads start once for all of them: a decode step's matmuls are short and one after another).
// args: w_0, scales_0, w_1, scales_1, ...; rets: y_0, y_1, ...
ffi::Error Int8MatmulImpl(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                          ffi::RemainingRets rets, int64_t path) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || args.size() == 0 || args.size() != 2 * rets.size())
    return ffi::Error::InvalidArgument("int8 matmul: x [R,K], then (w [N,K], scales [N,NB]) per output");
  std::vector<Problem> problems;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto w = args.get<ffi::Buffer<ffi::S8>>(2 * i);
    auto scales = args.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !scales.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("int8 matmul: weights int8, scales and outputs float32");
    const auto wd = w->dimensions(), sd = scales->dimensions();
    if (wd.size() != 2 || sd.size() != 2 || wd[1] != xd[1] || sd[0] != wd[0])
      return ffi::Error::InvalidArgument("int8 matmul: x [R,K], w [N,K], scales [N,NB]");
    Problem p{x.typed_data(), w->typed_data(), scales->typed_data(), (*y)->typed_data(),
              xd[0], xd[1], wd[0], sd[1], 0};
    if (auto e = CheckShapes(p, "int8 matmul: scales' blocks must divide K"); e.failure()) return e;
    p.B = p.K / p.NB;
    if (p.R * p.N > 0) problems.push_back(p);
  }
#ifdef SWIFTKV_INT8_VNNI
  // The rows quantised once for every weight of the call; kept per calling thread so a decode
  // step's ~120 calls reuse its buffers instead of allocating them each time.
  thread_local QuantisedRows xq;
  bool vnni = path == kBest && !problems.empty() &&
              std::all_of(problems.begin(), problems.end(), [](const Problem& p) { return VnniApplies(p); });
  if (vnni) {
    QuantiseRows(x.typed_data(), xd[0], xd[1], &xq);
    for (auto& p : problems) p.xq = &xq;
  }
#endif
  // Units of work over all the outputs: contiguous ranges, none across two weights.
  struct Range { int64_t problem, n0, n1; };
  std::vector<Range> ranges;
  int64_t total = 0;
  for (const auto& p : problems) total += p.N;
  int64_t tile = kTile;
#ifdef SWIFTKV_INT8_VNNI
  const bool gemm = vnni && xd[0] >= kGemmMinRows;  // every weight of a call has the same rows
  if (gemm) tile = kGroup * kGroupsPerTile;
#endif
  const int64_t item = ItemSize(total, Helpers::Get().threads(), tile);
  for (size_t i = 0; i < problems.size(); ++i)
    for (int64_t n0 = 0; n0 < problems[i].N; n0 += item)
      ranges.push_back({static_cast<int64_t>(i), n0, std::min(problems[i].N, n0 + item)});
  Helpers::Get().Run(static_cast<int64_t>(ranges.size()), [&](int64_t i) {
    const Range& range = ranges[i];
    const Problem& p = problems[range.problem];
    int64_t n = range.n0;
#ifdef SWIFTKV_INT8_VNNI
    if (p.xq != nullptr) {
      if (gemm) RangeGemm(p, n, range.n1); else RangeVnni(p, n, range.n1);
      return;
    }
#endif
#ifdef SWIFTKV_INT8_AVX2
    thread_local std::vector<float> scratch;
    scratch.resize(kTile * p.K);
    if (path != kScalar)
      for (; n + kTile <= range.n1; n += kTile) TileVector(p, n, scratch.data());
#endif
    for (; n < range.n1; ++n) OutputScalar(p, n);
  });
  return ffi::Error::Success();
}

// w [N, K] int8 * scales -> float32 [N, K]: the float copy a prefill chunk's matmul reads (a chunk
// of many rows then multiplies with XLA's dot). `x`, the matmul's input, is not read: it makes the
// conversion wait for it, so XLA cannot hoist every layer's copy to the start of the program (where
// all of them would be alive at once: the whole model in float32, written and read from memory).
ffi::Error Int8DequantiseImpl(ffi::ThreadPool pool, ffi::AnyBuffer, ffi::Buffer<ffi::S8> w,
                              ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> out) {
  const auto wd = w.dimensions(), sd = scales.dimensions();
  if (wd.size() != 2 || sd.size() != 2 || sd[0] != wd[0])
    return ffi::Error::InvalidArgument("int8 dequantise: w [N,K], scales [N,NB]");
  Problem p{nullptr, w.typed_data(), scales.typed_data(), out->typed_data(), 0, wd[1], wd[0], sd[1], 0};
  if (auto e = CheckShapes(p, "int8 dequantise: scales' blocks must divide K"); e.failure()) return e;
  p.B = p.K / p.NB;
  if (p.N * p.K == 0) return ffi::Error::Success();
  const int64_t item = ItemSize(p.N, pool.num_threads());
  ParallelFor(pool, (p.N + item - 1) / item, [&](int64_t i) {
    const int64_t n0 = i * item, n1 = std::min(p.N, n0 + item);
#ifdef SWIFTKV_INT8_AVX2
    Dequantise(p, n0, n1 - n0, p.y + n0 * p.K);
#else
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < p.K; ++k)
        p.y[n * p.K + k] = static_cast<float>(p.w[n * p.K + k]) * p.scales[n * p.NB + k / p.B];
#endif
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwiftkvInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("path"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwiftkvInt8Dequantise, Int8DequantiseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
