// Decode attention over a paged KV pool for XLA:CPU (an XLA FFI custom call).
//
// XLA:CPU runs `attention.attend_paged` as a gather of pool blocks followed by small batched
// matmuls; at decode shapes (a few queries per row, ~1k keys) the gather alone costs several times
// the time it takes to read the keys once. This kernel reads each row's keys and values straight
// from the pool, once per (row, kv head), and splits the (row, kv head) pairs over XLA's thread pool.
// Same contract as attend_paged: row b's key at position p lives in pool slot
// block_table[b, p / block_size] * block_size + p % block_size; query t of row b at position
// q_pos[b, t] sees the keys at positions <= q_pos[b, t] (a negative position: no query, zeros out).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* q;        // [B, T, H, D]
  const float* k_pool;   // [K, S, D]
  const float* v_pool;   // [K, S, D]
  const int32_t* table;  // [B, NB]
  const int32_t* q_pos;  // [B, T]
  float* out;            // [B, T, H, D]
  int64_t B, T, H, D, K, S, NB, block_size;
};

// Scratch of one worker, reused across the (row, kv head) pairs it takes.
struct Scratch {
  std::vector<float> q, scores, acc;
  std::vector<int32_t> limit;
  std::vector<int64_t> slots, seen;
  std::vector<float> sums;
};

constexpr int64_t kValueTile = 256;  // keys whose values are reused across a pair's queries

inline float Dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// e^x for x <= 0 to ~2 ulp, written so that loops of it vectorise (std::exp does not without
// -ffast-math): x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial, 2^n by exponent bits.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);  // below this e^x is under float's smallest normal: flushes to ~0
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split high + low
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  std::memcpy(&bits, &p, sizeof bits);
  bits += e - (127 << 23);
  std::memcpy(&p, &bits, sizeof bits);
  return p;
}

// Pool slots of row b's first n keys (block ids clamped into the pool, as XLA's gather does).
void KeySlots(const Problem& p, int64_t b, int64_t n, std::vector<int64_t>& slots) {
  const int64_t blocks = p.S / p.block_size;
  slots.resize(n);
  for (int64_t j = 0; j < n; ++j) {
    int64_t id = p.table[b * p.NB + j / p.block_size];
    id = std::min<int64_t>(std::max<int64_t>(id, 0), blocks - 1);
    slots[j] = id * p.block_size + j % p.block_size;
  }
}

// scores[i * n + j] = q_i . key_j for Q queries q [Q, D] and the n keys at rows slots[j] of keys.
void Scores(const float* q, int64_t Q, const float* keys, const int64_t* slots, int64_t n,
            int64_t D, float* scores) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {  // four keys at a time: four FMA chains, one horizontal sum for all four
    for (; j + 4 <= n; j += 4) {
      const float* k0 = keys + slots[j] * D;
      const float* k1 = keys + slots[j + 1] * D;
      const float* k2 = keys + slots[j + 2] * D;
      const float* k3 = keys + slots[j + 3] * D;
      for (int64_t i = 0; i < Q; ++i) {
        const float* qi = q + i * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 x = _mm256_loadu_ps(qi + d);
          a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + d), a0);
          a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k1 + d), a1);
          a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k2 + d), a2);
          a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k3 + d), a3);
        }
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        _mm_storeu_ps(scores + i * n + j,
                      _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
      }
    }
  }
#endif
  for (; j < n; ++j) {
    const float* key = keys + slots[j] * D;
    for (int64_t i = 0; i < Q; ++i) scores[i * n + j] = Dot(q + i * D, key, D);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// out[0 : 8M] += sum_j weights[j] * values[slots[j]][0 : 8M]: the sums stay in M registers.
template <int M>
void WeightedColumns(const float* weights, const float* values, const int64_t* slots, int64_t n,
                     int64_t D, float* out) {
  __m256 acc[M];
  for (int r = 0; r < M; ++r) acc[r] = _mm256_loadu_ps(out + 8 * r);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 w = _mm256_broadcast_ss(weights + j);
    const float* v = values + slots[j] * D;
    for (int r = 0; r < M; ++r) acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * r), acc[r]);
  }
  for (int r = 0; r < M; ++r) _mm256_storeu_ps(out + 8 * r, acc[r]);
}
#endif

// out [D] += sum_j weights[j] * value_j over the n values at rows slots[j] of values.
void Weighted(const float* weights, const float* values, const int64_t* slots, int64_t n,
              int64_t D, float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) {
    for (int64_t d = 0; d < D; d += 64) {  // 64 columns (8 registers) at a time
      const float* v = values + d;
      switch (std::min<int64_t>(D - d, 64) / 8) {
        case 1: WeightedColumns<1>(weights, v, slots, n, D, out + d); break;
        case 2: WeightedColumns<2>(weights, v, slots, n, D, out + d); break;
        case 3: WeightedColumns<3>(weights, v, slots, n, D, out + d); break;
        case 4: WeightedColumns<4>(weights, v, slots, n, D, out + d); break;
        case 5: WeightedColumns<5>(weights, v, slots, n, D, out + d); break;
        case 6: WeightedColumns<6>(weights, v, slots, n, D, out + d); break;
        case 7: WeightedColumns<7>(weights, v, slots, n, D, out + d); break;
        default: WeightedColumns<8>(weights, v, slots, n, D, out + d); break;
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    const float w = weights[j];
    const float* value = values + slots[j] * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += w * value[d];
  }
}

// Row b, kv head kh: its G query heads x T queries over keys 0..(largest query position).
void AttendPair(const Problem& p, int64_t b, int64_t kh, Scratch& w) {
  const int64_t G = p.H / p.K, Q = G * p.T, D = p.D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  w.q.resize(Q * D);
  w.limit.resize(Q);
  w.acc.assign(Q * D, 0.f);
  int64_t n = 0;  // keys to read: up to the largest query position of the row
  for (int64_t t = 0; t < p.T; ++t) {
    const int32_t pos = p.q_pos[b * p.T + t];
    n = std::max<int64_t>(n, static_cast<int64_t>(pos) + 1);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = t * G + g;
      const float* src = p.q + ((b * p.T + t) * p.H + kh * G + g) * D;
      for (int64_t d = 0; d < D; ++d) w.q[i * D + d] = src[d] * scale;
      w.limit[i] = pos;
    }
  }
  n = std::min<int64_t>(n, p.NB * p.block_size);
  if (n > 0) {
    KeySlots(p, b, n, w.slots);
    w.scores.resize(Q * n);
    const float* k_head = p.k_pool + kh * p.S * D;
    const float* v_head = p.v_pool + kh * p.S * D;
    Scores(w.q.data(), Q, k_head, w.slots.data(), n, D, w.scores.data());  // keys read once
    // Each query's softmax over the keys at or before its position: weights in place, their sum.
    w.seen.resize(Q);
    w.sums.resize(Q);
    for (int64_t i = 0; i < Q; ++i) {
      float* s = &w.scores[i * n];
      const int64_t seen = std::max<int64_t>(
          std::min<int64_t>(static_cast<int64_t>(w.limit[i]) + 1, n), 0);  // 0: no query, zeros out
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < seen; ++j) m = std::max(m, s[j]);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < seen; ++j) {
        s[j] = ExpNonPositive(s[j] - m);
        sum += s[j];
      }
      w.seen[i] = seen;
      w.sums[i] = sum;
    }
    // Weighted values a tile of keys at a time, so every query re-reads the tile from cache, not
    // from memory (a 2k-token row's values per kv head outgrow a core's L2).
    for (int64_t j0 = 0; j0 < n; j0 += kValueTile) {
      for (int64_t i = 0; i < Q; ++i) {
        const int64_t len = std::min<int64_t>(w.seen[i], j0 + kValueTile) - j0;
        if (len > 0)
          Weighted(&w.scores[i * n + j0], v_head, &w.slots[j0], len, D, &w.acc[i * D]);
      }
    }
    for (int64_t i = 0; i < Q; ++i) {
      if (w.seen[i] == 0) continue;
      const float inv = 1.0f / w.sums[i];
      for (int64_t d = 0; d < D; ++d) w.acc[i * D + d] *= inv;
    }
  }
  for (int64_t t = 0; t < p.T; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      float* dst = p.out + ((b * p.T + t) * p.H + kh * G + g) * D;
      std::copy_n(&w.acc[(t * G + g) * D], D, dst);
    }
  }
}

// Work shared by the calling thread and the tasks it schedules. Tasks that start after every pair
// is taken find nothing left and return; the state outlives the call (shared_ptr) for them.
struct Work {
  explicit Work(const Problem& problem) : p(problem), total(problem.B * problem.K) {}
  Problem p;
  int64_t total;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable all_done;

  void Run() {
    Scratch scratch;
    for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) {
      AttendPair(p, i / p.K, i % p.K, scratch);
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> k_pool, ffi::Buffer<ffi::F32> v_pool,
                              ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> q_pos,
                              ffi::ResultBuffer<ffi::F32> out, int64_t block_size) {
  const auto qd = q.dimensions(), kd = k_pool.dimensions(), td = table.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || td.size() != 2 ||
      v_pool.dimensions().size() != 3 || v_pool.dimensions()[0] != kd[0] ||
      v_pool.dimensions()[1] != kd[1] || v_pool.dimensions()[2] != kd[2])
    return ffi::Error::InvalidArgument("paged attention: q [B,T,H,D], pools [K,S,D], table [B,NB]");
  Problem p{q.typed_data(), k_pool.typed_data(), v_pool.typed_data(), table.typed_data(),
            q_pos.typed_data(), out->typed_data(), qd[0], qd[1], qd[2], qd[3], kd[0], kd[1],
            td[1], block_size};
  if (p.D != kd[2] || p.H % p.K != 0 || td[0] != p.B || block_size <= 0 || p.S % block_size != 0)
    return ffi::Error::InvalidArgument("paged attention: inconsistent shapes");
  if (p.B * p.K == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work>(p);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->total) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->all_done.wait(lock, [&] { return work->done.load() == work->total; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwiftkvPagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size"));
