// Decode attention over a paged KV pool for XLA:CPU (an XLA FFI custom call).
//
// XLA:CPU runs `attention.attend_paged` as a gather of pool blocks followed by small batched
// matmuls; at decode shapes (a few queries per row, ~1k keys) the gather alone costs several times
// the time it takes to read the keys once. This kernel reads each row's keys and values straight
// from the pool, once per (row, kv head), and splits the (row, kv head) pairs over XLA's thread pool
// (and, when there are fewer pairs than threads, as at batch 1, each pair's keys too).
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
  std::vector<float> q, scores;
  std::vector<int32_t> limit;
  std::vector<int64_t> slots, seen;
};

constexpr int64_t kValueTile = 256;  // keys whose values are reused across a pair's queries
constexpr int64_t kMinSplitKeys = 128;  // fewest keys a split of one pair's keys may get

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

// Pool slots of row b's keys j0 .. j0 + n - 1 (block ids clamped into the pool, as XLA's gather does).
void KeySlots(const Problem& p, int64_t b, int64_t j0, int64_t n, std::vector<int64_t>& slots) {
  const int64_t blocks = p.S / p.block_size;
  slots.resize(n);
  for (int64_t j = 0; j < n; ++j) {
    int64_t id = p.table[b * p.NB + (j0 + j) / p.block_size];
    id = std::min<int64_t>(std::max<int64_t>(id, 0), blocks - 1);
    slots[j] = id * p.block_size + (j0 + j) % p.block_size;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kPrefetchKeys = 16;  // how far ahead key/value rows are fetched (one block of 16)

// Asks for the cache lines of floats [row, row + count) ahead of their use.
inline void Prefetch(const float* row, int64_t count) {
  for (int64_t c = 0; c < count; c += 16) _mm_prefetch(reinterpret_cast<const char*>(row + c), _MM_HINT_T0);
}
#endif

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
      if (j + kPrefetchKeys + 4 <= n) {  // blocks are scattered: the hardware prefetcher stops at each
        for (int r = 0; r < 4; ++r) Prefetch(keys + slots[j + kPrefetchKeys + r] * D, D);
      }
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
    if (j + kPrefetchKeys < n) Prefetch(values + slots[j + kPrefetchKeys] * D, 8 * M);
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

// Where query head h of row b's query t starts in q and out [B, T, H, D].
inline int64_t HeadOffset(const Problem& p, int64_t b, int64_t t, int64_t h) {
  return ((b * p.T + t) * p.H + h) * p.D;
}

// The pair's keys to read: up to the largest query position of row b (within its table).
int64_t KeysOfRow(const Problem& p, int64_t b) {
  int64_t n = 0;
  for (int64_t t = 0; t < p.T; ++t) n = std::max<int64_t>(n, int64_t{p.q_pos[b * p.T + t]} + 1);
  return std::min<int64_t>(n, p.NB * p.block_size);
}

// Row b, kv head kh, keys [j0, j1): for each of its Q = G heads x T queries, the softmax over those
// keys at or before the query's position, unnormalised: max score m, sum of weights l, weighted
// values acc [D] (no key: m = -inf, l = 0, acc = 0). Splits of one pair merge in Merge.
void AttendRange(const Problem& p, int64_t b, int64_t kh, int64_t j0, int64_t j1, Scratch& w,
                 float* m_out, float* l_out, float* acc_out) {
  const int64_t G = p.H / p.K, Q = G * p.T, D = p.D, n = std::max<int64_t>(j1 - j0, 0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  w.q.resize(Q * D);
  w.limit.resize(Q);
  std::fill(acc_out, acc_out + Q * D, 0.f);
  for (int64_t t = 0; t < p.T; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = t * G + g;
      const float* src = p.q + HeadOffset(p, b, t, kh * G + g);
      for (int64_t d = 0; d < D; ++d) w.q[i * D + d] = src[d] * scale;
      w.limit[i] = p.q_pos[b * p.T + t];
    }
  }
  KeySlots(p, b, j0, n, w.slots);
  w.scores.resize(Q * n);
  w.seen.resize(Q);
  const float* k_head = p.k_pool + kh * p.S * D;
  const float* v_head = p.v_pool + kh * p.S * D;
  if (n > 0) Scores(w.q.data(), Q, k_head, w.slots.data(), n, D, w.scores.data());  // keys read once
  // Each query's weights over the keys at or before its position, in place.
  for (int64_t i = 0; i < Q; ++i) {
    float* s = &w.scores[i * n];
    const int64_t seen = std::max<int64_t>(std::min<int64_t>(int64_t{w.limit[i]} + 1 - j0, n), 0);
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < seen; ++j) m = std::max(m, s[j]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < seen; ++j) {
      s[j] = ExpNonPositive(s[j] - m);
      sum += s[j];
    }
    w.seen[i] = seen;
    m_out[i] = m;
    l_out[i] = sum;
  }
  // Weighted values a tile of keys at a time, so every query re-reads the tile from cache, not
  // from memory (a 2k-token row's values per kv head outgrow a core's L2).
  for (int64_t t0 = 0; t0 < n; t0 += kValueTile) {
    for (int64_t i = 0; i < Q; ++i) {
      const int64_t len = std::min<int64_t>(w.seen[i], t0 + kValueTile) - t0;
      if (len > 0) Weighted(&w.scores[i * n + t0], v_head, &w.slots[t0], len, D, &acc_out[i * D]);
    }
  }
}

// Work shared by the calling thread and the tasks it schedules: (row, kv head, key split) items.
// Tasks that start after every item is taken find nothing left and return; the state outlives
// the call (shared_ptr) for them.
struct Work {
  Work(const Problem& problem, int64_t key_splits)
      : p(problem), splits(key_splits), total(problem.B * problem.K * key_splits),
        q_per_pair(problem.H / problem.K * problem.T),
        m(total * q_per_pair), l(total * q_per_pair), acc(total * q_per_pair * problem.D) {}
  Problem p;
  int64_t splits, total, q_per_pair;
  std::vector<float> m, l, acc;  // per item and query: the unnormalised softmax of its keys
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable all_done;

  void Run() {
    Scratch scratch;
    for (int64_t item = next.fetch_add(1); item < total; item = next.fetch_add(1)) {
      const int64_t pair = item / splits, split = item % splits, b = pair / p.K;
      const int64_t n = KeysOfRow(p, b), per = (n + splits - 1) / splits;
      const int64_t j0 = std::min(split * per, n), j1 = std::min(j0 + per, n);
      const int64_t at = item * q_per_pair;
      AttendRange(p, b, pair % p.K, j0, j1, scratch, &m[at], &l[at], &acc[at * p.D]);
      if (done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }

  // Each query's output: its splits' softmaxes rescaled to the common max, summed, normalised.
  void Merge() const {
    const int64_t G = p.H / p.K, D = p.D;
    std::vector<float> out(D);
    for (int64_t pair = 0; pair < p.B * p.K; ++pair) {
      const int64_t b = pair / p.K, kh = pair % p.K;
      for (int64_t i = 0; i < q_per_pair; ++i) {
        float top = -std::numeric_limits<float>::infinity(), sum = 0.f;
        for (int64_t s = 0; s < splits; ++s) top = std::max(top, m[(pair * splits + s) * q_per_pair + i]);
        std::fill(out.begin(), out.end(), 0.f);
        for (int64_t s = 0; s < splits && top > -std::numeric_limits<float>::infinity(); ++s) {
          const int64_t at = (pair * splits + s) * q_per_pair + i;
          if (l[at] == 0.f) continue;
          const float f = std::exp(m[at] - top);
          sum += f * l[at];
          for (int64_t d = 0; d < D; ++d) out[d] += f * acc[at * D + d];
        }
        const float inv = sum > 0.f ? 1.0f / sum : 0.f;  // no key at all: zeros
        const int64_t t = i / G, g = i % G;
        float* dst = p.out + HeadOffset(p, b, t, kh * G + g);
        for (int64_t d = 0; d < D; ++d) dst[d] = out[d] * inv;
      }
    }
  }
};

// Key splits per (row, kv head): 1 when the pairs already give every thread work; more (down to
// kMinSplitKeys keys each) when there are fewer pairs than twice the threads, as at batch 1.
int64_t KeySplits(const Problem& p, int64_t threads) {
  const int64_t pairs = p.B * p.K;
  if (pairs >= 2 * threads) return 1;
  int64_t longest = 0;
  for (int64_t b = 0; b < p.B; ++b) longest = std::max(longest, KeysOfRow(p, b));
  const int64_t wanted = (2 * threads + pairs - 1) / pairs;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, longest / kMinSplitKeys));
}

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
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  auto work = std::make_shared<Work>(p, KeySplits(p, threads));
  const int64_t helpers = std::min<int64_t>(threads, work->total) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  {
    std::unique_lock<std::mutex> lock(work->mu);
    work->all_done.wait(lock, [&] { return work->done.load() == work->total; });
  }
  work->Merge();
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
