// Paged attention for CPU over conveyor's paged KV cache, one flat ragged batch per call.
//
// Owns: the op `conveyor_cpu::paged_attention`, which reads K/V straight from the cache
// [2, num_blocks, block_size, num_kv_heads, head_dim] through each request's block table (no
// gather copy), for decode rows and prefill chunks alike, and writes `out` [T, Hq, D].
//
// Invariants:
//   * Work item = (request, tile of <= kQueryTile query tokens, kv heads [h0, h0 + nh)). Its
//     rows are every query head of those kv groups for every token of the tile, so each K/V tile
//     is read once and shared by all query heads of its group (GQA).
//   * Vectors are 16 floats with AVX-512, else 8 (kLanes); a key tile is one vector of keys.
//   * Two layouts of the score tile. Few rows (decode): one row's keys along the vector lanes,
//     and all kv heads in one item, so each block of the cache is read front to back. Many rows
//     (prefill): kLanes rows along the lanes, one kv head per item, one FMA per (key, dim) per
//     row vector.
//   * Online (flash-style) softmax in fp32 over key tiles of <= kLanes keys in one block; scores
//     are in base 2 (scaled by scale * log2(e)). Accumulation is fp32 for fp32 and bf16 alike:
//     bf16 K/V are widened to fp32, except that with AVX512-BF16 decode scores multiply bf16
//     keys in place (vdpbf16ps, exact products, fp32 sums).
//   * Query i of a request sits at position p = seq_len - q_len + i and sees keys 0..p, or with a
//     sliding window W > 0 keys p - W + 1..p (HF's mask); keys before the tile's first visible
//     one are never read (their blocks may hold anything), nothing at or past seq_len is read,
//     and the kernel never writes the cache. Rows that see no key of a tile get probability 0.
//   * Items run in parallel (OpenMP, dynamic schedule, heaviest first); one thread owns an item
//     and its output rows, so nothing races.
//   * GCC/Clang vector extensions (plus the one AVX512-BF16 intrinsic, behind its macro): the
//     same source builds for AVX-512, AVX2 or plain SSE.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "exp2_poly.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define CONVEYOR_BF16_DOT 1   // decode scores of bf16 caches straight from the cache (vdpbf16ps)
#else
#define CONVEYOR_BF16_DOT 0
#endif

namespace conveyor_cpu {
namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

#ifdef __AVX512F__
constexpr int kLanes = 16;       // floats per vector: one zmm register
#else
constexpr int kLanes = 8;        // one ymm register (AVX2); plain SSE builds use two xmm
#endif
constexpr int kKeyTile = kLanes; // keys per tile: one vector of scores per row
constexpr int kQueryTile = 16;   // query tokens per work item
constexpr int kChains = 8;       // independent accumulators in the many-rows score kernel
constexpr int kPvRows = 2;       // query rows sharing each V load
constexpr int kPrefetchTiles = 2;   // K/V tiles requested ahead of use
// (query token x key x kv head) units worth a thread. 512, not 4096: the model's GEMMs keep the
// other threads awake, so a one-user decode (3 kv heads x 600 keys) or a short verify of a few
// drafts repays a second thread (Zen 4: 3 queries after 600 keys 84 -> 44 us a call; one-user
// grounded chats with speculation: 12% less attention time in all).
constexpr int64_t kWorkPerThread = 512;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef float vfu __attribute__((vector_size(4 * kLanes), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vuu __attribute__((vector_size(4 * kLanes), aligned(2)));
typedef float vq __attribute__((vector_size(16)));

#define INLINE inline __attribute__((always_inline))

// Spelled out: GCC builds a loop-filled vector lane by lane in some callers.
#ifdef __AVX512F__
INLINE vf splat(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
INLINE vf lane_ids() { return vf{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
#else
INLINE vf splat(float x) { return vf{x, x, x, x, x, x, x, x}; }
INLINE vf lane_ids() { return vf{0, 1, 2, 3, 4, 5, 6, 7}; }
#endif
INLINE vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
INLINE void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

// Folds a vector to 4 lanes with `op` (add or max) by halving it.
template <typename Op>
INLINE vq fold_to_quad(vf v, Op op) {
#ifdef __AVX512F__
  typedef float vh __attribute__((vector_size(32)));
  vh h = op(vh(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)),
            vh(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)));
  return op(vq(__builtin_shufflevector(h, h, 0, 1, 2, 3)),
            vq(__builtin_shufflevector(h, h, 4, 5, 6, 7)));
#else
  return op(vq(__builtin_shufflevector(v, v, 0, 1, 2, 3)),
            vq(__builtin_shufflevector(v, v, 4, 5, 6, 7)));
#endif
}

INLINE float hsum(vf v) {
  vq b = fold_to_quad(v, [](auto x, auto y) { return x + y; });
  return (b[0] + b[2]) + (b[1] + b[3]);
}

INLINE float hmax(vf v) {
  vq b = fold_to_quad(v, [](auto x, auto y) { return x > y ? x : y; });
  return std::max(std::max(b[0], b[1]), std::max(b[2], b[3]));
}

// Sums each of kLanes vectors into one lane, halving the width at each step with shuffles that
// stay cheap (256-bit halves, 128-bit lanes, in-lane pairs). Lane t of the result is the sum of
// input kSlot[t]: the partial sums of key t go to input kSlot[t].
#ifdef __AVX512F__
constexpr int kSlot[16] = {0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15};

INLINE vf transpose_sum(const vf* p) {
  vf a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                   20, 21, 22, 23) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10,
                                   11, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14,
                                   15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24,
                                   25, 12, 13, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26,
                                   27, 14, 15, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14,
                                 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, 13, 15,
                                 29, 31);
}
#else
constexpr int kSlot[8] = {0, 2, 4, 6, 1, 3, 5, 7};

INLINE vf transpose_sum(const vf* p) {
  vf a[4], b[2];
  for (int i = 0; i < 4; ++i)
    a[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(b[0], b[1], 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(b[0], b[1], 1, 3, 9, 11, 5, 7, 13, 15);
}
#endif

// 2^x for x <= 0 (relative error ~1e-7); exactly 0 below -126, which covers -inf.
INLINE vf exp2v(vf x) {
  vf xc = x < -126.0f ? splat(-126.0f) : x;
  vf n = (xc + 12582912.0f) - 12582912.0f;   // round to nearest integer (1.5 * 2^23 trick)
  vf f = xc - n;                             // in [-0.5, 0.5]
  vf p = exp2_fraction(f);
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf r = p * reinterpret_cast<vf&>(bits);
  return x < -126.0f ? splat(0.0f) : r;
}

INLINE float to_float(uint16_t h) {
  const uint32_t b = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
INLINE float to_float(float f) { return f; }
INLINE void from_float(float f, float* dst) { *dst = f; }
INLINE void from_float(float f, uint16_t* dst) {   // round to nearest even, NaN stays NaN
  uint32_t b;
  std::memcpy(&b, &f, 4);
  *dst = std::isnan(f) ? uint16_t(0x7fc0) : uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// Everything one call needs; element strides, not bytes.
struct Problem {
  const void* q;
  void* out;                       // contiguous [T, Hq, D], dtype of q
  bool q_bf16;
  int64_t q_tok_stride, q_head_stride;
  const void* k;                   // kv_cache[0]: [num_blocks, block_size, Hkv, D]
  const void* v;                   // kv_cache[1]
  int64_t block_stride, tok_stride;
  const int64_t* tables;
  int64_t table_stride;
  const int64_t* starts;
  const int64_t* seq_lens;
  int hq, hkv, group, block_size, head_dim;
  int64_t window;                  // sliding window in keys; 0: causal over the whole context
  float scale_log2;                // softmax scale * log2(e)
};

struct Item {
  int64_t req, tok_begin, tok_end, cost;
  int h0, nh;                      // kv heads [h0, h0 + nh)
};

// One resolved work item. Row r: token r / (nh * G), query head h0 * G + r % (nh * G).
struct Tile {
  int64_t tok0, pos0, kv_len;      // first flat token, its position, keys visited: [key_begin,
  int64_t key_begin, window;       //   kv_len); the window (0: none) the tile's rows see
  const int64_t* table;
  int nq, h0, nh, rows, rows_pad;
  bool rows_in_lanes;              // many rows: vectorise over rows, else over keys
};

// Per-thread buffers, sized for the largest item.
struct Scratch {
  std::vector<float> q, acc, s, kbuf, vbuf, m, l, corr, qpos;
  std::vector<uint16_t> q_bf16;    // unscaled bf16 queries in natural order (CONVEYOR_BF16_DOT)
  Scratch(int rows_pad, int row_width, int d)
      : q(size_t(rows_pad) * d), acc(size_t(rows_pad) * d), s(size_t(rows_pad) * kKeyTile),
        kbuf(size_t(kKeyTile) * row_width), vbuf(size_t(kKeyTile) * row_width), m(rows_pad),
        l(rows_pad), corr(rows_pad), qpos(rows_pad), q_bf16(size_t(rows_pad) * d) {}
};

// Whether decode tiles of this cache type score bf16 keys in place instead of widening them.
template <typename KV>
constexpr bool kDotsBf16 = CONVEYOR_BF16_DOT && std::is_same_v<KV, uint16_t>;

struct Rows {                      // kKeyTile K or V rows in fp32, `stride` floats apart
  const float* p;
  int64_t stride;
};

// n rows of `width` floats from the cache as kKeyTile fp32 rows (zeros after n): fp32 is read in
// place when no padding is needed, bf16 is widened into buf.
INLINE Rows stage(const float* src, int64_t stride, int n, int width, float* buf) {
  if (n == kKeyTile) return {src, stride};
  for (int t = 0; t < kKeyTile; ++t)
    for (int j = 0; j < width; j += kLanes)
      store(buf + t * width + j, t < n ? load(src + t * stride + j) : splat(0.0f));
  return {buf, width};
}

// bf16 rows are widened 2 * kLanes elements at a time without lane shuffles: the even elements
// land in one vector, the odd ones in the next. Queries are permuted alike (kv_dim), so dot
// products are unchanged, and the output undoes it.
INLINE Rows stage(const uint16_t* src, int64_t stride, int n, int width, float* buf) {
  const vu high = vu{} + 0xffff0000u;
  for (int t = 0; t < kKeyTile; ++t)
    for (int j = 0; j < width; j += 2 * kLanes) {
      vu pairs = t < n ? *reinterpret_cast<const vuu*>(src + t * stride + j) : vu{};
      vu even = pairs << 16, odd = pairs & high;
      store(buf + t * width + j, reinterpret_cast<vf&>(even));
      store(buf + t * width + j + kLanes, reinterpret_cast<vf&>(odd));
    }
  return {buf, width};
}

// Which head dimension column c of a staged K/V row (and of the accumulator) holds.
template <typename KV>
INLINE int kv_dim(int c) {
  if constexpr (sizeof(KV) == 4) return c;
  const int in_chunk = c % (2 * kLanes);
  return c - in_chunk + 2 * (in_chunk % kLanes) + in_chunk / kLanes;
}

// ---- few rows (decode): one row's scores along the lanes, s[r * kKeyTile + t] ----

template <int D>
INLINE vf scores_one_row(const float* q, const float* k, int64_t k_stride) {
  constexpr int ND = D / kLanes;
  vf qv[ND], part[kKeyTile];
  for (int j = 0; j < ND; ++j) qv[j] = load(q + j * kLanes);
  for (int t = 0; t < kKeyTile; ++t) {   // keys in memory order
    const float* kr = k + t * k_stride;
    vf a = qv[0] * load(kr);
    for (int j = 1; j < ND; ++j) a += qv[j] * load(kr + j * kLanes);
    part[kSlot[t]] = a;
  }
  return transpose_sum(part);
}

#if CONVEYOR_BF16_DOT
// The same for bf16 keys read in place, n of them: 32 products per instruction, exact in fp32.
template <int D>
INLINE vf scores_one_row_bf16(const uint16_t* q, const uint16_t* k, int64_t k_stride, int n) {
  constexpr int NC = D / 32;
  __m512bh qv[NC];
  vf part[kKeyTile];
  for (int j = 0; j < NC; ++j) qv[j] = (__m512bh)_mm512_loadu_si512(q + 32 * j);
  for (int t = 0; t < kKeyTile; ++t) {   // rows past n may lie outside the block: not read
    __m512 a = _mm512_setzero_ps();
    for (int j = 0; j < NC && t < n; ++j)
      a = _mm512_dpbf16_ps(a, qv[j], (__m512bh)_mm512_loadu_si512(k + t * k_stride + 32 * j));
    part[kSlot[t]] = (vf)a;
  }
  return transpose_sum(part);
}
#endif

// Scores and online-softmax step of every row; leaves probabilities in s, rescale in corr.
// score(r, head) gives row r's scaled scores against the tile's keys of that kv head.
template <typename Score>
void softmax_keys_in_lanes(const Tile& tl, int group, const Score& score, int64_t key0, int n,
                           Scratch& sc) {
  const int per_token = tl.nh * group;
  for (int r = 0; r < tl.rows; ++r) {
    const int64_t pos = tl.pos0 + r / per_token;
    const int64_t visible = std::min<int64_t>(n, pos - key0 + 1);
    const int64_t first = tl.window ? pos - tl.window + 1 - key0 : 0;   // first lane it sees
    float* srow = sc.s.data() + r * kKeyTile;
    if (visible <= 0 || first >= visible) {   // the whole tile lies outside this row's keys
      store(srow, splat(0.0f));
      sc.corr[r] = 1.0f;
      continue;
    }
    vf sv = score(r, (r % per_token) / group);
    sv = lane_ids() < float(visible) ? sv : splat(kNegInf);
    if (first > 0) sv = lane_ids() >= float(first) ? sv : splat(kNegInf);
    const float m_old = sc.m[r], m_new = std::max(m_old, hmax(sv));
    const float c = m_new == m_old ? 1.0f : exp2v(splat(m_old - m_new))[0];
    vf p = exp2v(sv - m_new);
    store(srow, p);
    sc.l[r] = sc.l[r] * c + hsum(p);
    sc.m[r] = m_new;
    sc.corr[r] = c;
  }
}

// ---- many rows (prefill): one key's scores along the lanes, s[t * rows_pad + r] ----

template <int D>
void scores_rows_in_lanes(const float* qt, int rows_pad, Rows k, float* st) {
  for (int rv = 0; rv < rows_pad; rv += kLanes)
    for (int t0 = 0; t0 < kKeyTile; t0 += kChains) {
      vf a[kChains] = {};
      for (int d = 0; d < D; ++d) {
        vf qv = load(qt + d * rows_pad + rv);
        for (int c = 0; c < kChains; ++c) a[c] += qv * k.p[(t0 + c) * k.stride + d];
      }
      for (int c = 0; c < kChains; ++c) store(st + (t0 + c) * rows_pad + rv, a[c]);
    }
}

void softmax_rows_in_lanes(const Tile& tl, int64_t key0, int n, Scratch& sc) {
  const int rp = tl.rows_pad;
  // pos0: the smallest position; kv_len - 1 the largest, whose window starts latest
  const bool masked = n < kKeyTile || key0 + n - 1 > tl.pos0 ||
                      (tl.window && key0 <= tl.kv_len - 1 - tl.window);
  const float lag = float(tl.window);   // hidden when key - pos0 <= qoff - window
  for (int rv = 0; rv < rp; rv += kLanes) {
    vf qoff = load(sc.qpos.data() + rv), mt = splat(kNegInf);
    for (int t = 0; t < kKeyTile; ++t) {
      float* sp = sc.s.data() + t * rp + rv;
      if (masked) {
        const vf rel = splat(float(key0 + t - tl.pos0));
        vf sv = rel > qoff ? splat(kNegInf) : load(sp);
        if (tl.window) sv = rel + lag <= qoff ? splat(kNegInf) : sv;
        store(sp, t < n ? sv : splat(kNegInf));
      }
      mt = vmax(mt, load(sp));
    }
    vf m_old = load(sc.m.data() + rv), m_new = vmax(m_old, mt), sum = splat(0.0f);
    // a row that has seen no key yet (window, padding) keeps m = -inf and gets p = 0, not NaN
    const vf m_use = m_new == splat(kNegInf) ? splat(0.0f) : m_new;
    for (int t = 0; t < kKeyTile; ++t) {
      float* sp = sc.s.data() + t * rp + rv;
      vf p = exp2v(load(sp) - m_use);
      store(sp, p);
      sum += p;
    }
    vf c = exp2v(m_old - m_use);
    store(sc.l.data() + rv, load(sc.l.data() + rv) * c + sum);
    store(sc.m.data() + rv, m_new);
    store(sc.corr.data() + rv, c);
  }
}

// ---- shared: acc[r] = acc[r] * corr[r] + sum_t p(r, t) * V[t], NR rows per V load ----

template <int D, int NR>
INLINE void accumulate_rows(float* acc, const float* p, int64_t p_row, int64_t p_key,
                            const float* corr, const float* v, int64_t v_stride, int n) {
  constexpr int ND = D / kLanes, CH = ND < 4 ? ND : 4;
  static_assert(ND % CH == 0, "head_dim / kLanes must be below 4 or a multiple of 4");
  for (int j0 = 0; j0 < ND; j0 += CH) {
    vf a[NR][CH];
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < CH; ++j) a[r][j] = load(acc + r * D + (j0 + j) * kLanes) * corr[r];
    for (int t = 0; t < n; ++t) {
      vf vv[CH];
      for (int j = 0; j < CH; ++j) vv[j] = load(v + t * v_stride + (j0 + j) * kLanes);
      for (int r = 0; r < NR; ++r) {
        vf pt = splat(p[r * p_row + t * p_key]);
        for (int j = 0; j < CH; ++j) a[r][j] += pt * vv[j];
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < CH; ++j) store(acc + r * D + (j0 + j) * kLanes, a[r][j]);
  }
}

// Rows [r0, r1) all read V of the same kv head, at `v`.
template <int D>
void accumulate_pv(Scratch& sc, int r0, int r1, int64_t p_row, int64_t p_key, const float* v,
                   int64_t v_stride, int n) {
  int r = r0;
  for (; r + kPvRows <= r1; r += kPvRows)
    accumulate_rows<D, kPvRows>(sc.acc.data() + r * D, sc.s.data() + r * p_row, p_row, p_key,
                                sc.corr.data() + r, v, v_stride, n);
  for (; r < r1; ++r)
    accumulate_rows<D, 1>(sc.acc.data() + r * D, sc.s.data() + r * p_row, p_row, p_key,
                          sc.corr.data() + r, v, v_stride, n);
}

#if CONVEYOR_BF16_DOT
// Decode tiles of bf16 caches multiply probabilities by V in bf16 too (vdpbf16ps, fp32 sums):
// the probabilities of keys t and t + 1 are rounded to bf16 and paired, V rows t and t + 1 are
// interleaved in place (unpacklo/hi), so no widened copy of V is made. The accumulator of a
// 32-dim chunk then holds head dim pv_dim(column) (the unpack order), undone in store_output.
INLINE int pv_dim(int c) {
  const int in = c % 32, j = in % 16;
  return c - in + 8 * (j / 4) + (in >= 16 ? 4 : 0) + j % 4;
}

template <int D, int NR>
INLINE void pv_rows_bf16(float* acc, const float* p, const float* corr, const uint16_t* v,
                         int64_t v_stride, int n) {
  constexpr int NC = D / 32;
  __m512 a[NR][2 * NC];
  uint32_t pairs[NR][kKeyTile / 2];
  for (int r = 0; r < NR; ++r) {
    const __m512 c = _mm512_set1_ps(corr[r]);
    for (int j = 0; j < 2 * NC; ++j) a[r][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + 16 * j), c);
    // p past n is 0 (masked scores), so an odd tail pairs its last key with a zero weight
    const __m256bh pb = _mm512_cvtneps_pbh(_mm512_loadu_ps(p + r * kKeyTile));
    std::memcpy(pairs[r], &pb, sizeof(pairs[r]));
  }
  for (int t = 0; t < n; t += 2) {
    const uint16_t* va = v + t * v_stride;
    for (int c = 0; c < NC; ++c) {
      const __m512i x = _mm512_loadu_si512(va + 32 * c);
      const __m512i y = t + 1 < n ? _mm512_loadu_si512(va + v_stride + 32 * c) : _mm512_setzero_si512();
      const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(x, y);
      const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(x, y);
      for (int r = 0; r < NR; ++r) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(int(pairs[r][t / 2]));
        a[r][2 * c] = _mm512_dpbf16_ps(a[r][2 * c], lo, w);
        a[r][2 * c + 1] = _mm512_dpbf16_ps(a[r][2 * c + 1], hi, w);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < 2 * NC; ++j) _mm512_storeu_ps(acc + r * D + 16 * j, a[r][j]);
}

// Rows [r0, r1) of a decode tile (one kv head's query rows), keys-in-lanes probabilities.
template <int D>
void accumulate_pv_bf16(Scratch& sc, int r0, int r1, const uint16_t* v, int64_t v_stride, int n) {
  int r = r0;
  for (; r + 3 <= r1; r += 3)
    pv_rows_bf16<D, 3>(sc.acc.data() + r * D, sc.s.data() + r * kKeyTile, sc.corr.data() + r, v,
                       v_stride, n);
  for (; r < r1; ++r)
    pv_rows_bf16<D, 1>(sc.acc.data() + r * D, sc.s.data() + r * kKeyTile, sc.corr.data() + r, v,
                       v_stride, n);
}
#endif

// ---- one work item ----

template <typename Q, typename KV, int D>
void load_queries(const Problem& pb, const Tile& tl, Scratch& sc) {
  const Q* q = static_cast<const Q*>(pb.q);
  const int per_token = tl.nh * pb.group, rp = tl.rows_pad;
  for (int r = 0; r < rp; ++r) {
    const bool real = r < tl.rows;
    const Q* src = q + (tl.tok0 + r / per_token) * pb.q_tok_stride +
                   (tl.h0 * pb.group + r % per_token) * pb.q_head_stride;
    for (int d = 0; d < D; ++d) {
      float x = real ? to_float(src[kv_dim<KV>(d)]) * pb.scale_log2 : 0.0f;
      sc.q[tl.rows_in_lanes ? size_t(d) * rp + r : size_t(r) * D + d] = x;
    }
    if (kDotsBf16<KV> && !tl.rows_in_lanes)
      for (int d = 0; d < D; ++d) from_float(to_float(src[d]), &sc.q_bf16[size_t(r) * D + d]);
    sc.qpos[r] = real ? float(r / per_token) : 3.0e38f;   // padding rows are never masked
    sc.m[r] = kNegInf;
    sc.l[r] = 0.0f;
  }
  std::fill(sc.acc.begin(), sc.acc.begin() + size_t(tl.rows) * D, 0.0f);
}

template <typename Q, typename KV, int D>
void store_output(const Problem& pb, const Tile& tl, const Scratch& sc) {
  Q* out = static_cast<Q*>(pb.out);
  const int per_token = tl.nh * pb.group;
  const bool pv_order = kDotsBf16<KV> && !tl.rows_in_lanes;   // accumulated by pv_rows_bf16
  for (int r = 0; r < tl.rows; ++r) {
    const int64_t head = tl.h0 * pb.group + r % per_token;
    Q* dst = out + ((tl.tok0 + r / per_token) * pb.hq + head) * int64_t(D);
    const float inv = 1.0f / sc.l[r];
    for (int d = 0; d < D; ++d) {
#if CONVEYOR_BF16_DOT
      const int col = pv_order ? pv_dim(d) : kv_dim<KV>(d);
#else
      const int col = kv_dim<KV>(d);
#endif
      from_float(sc.acc[size_t(r) * D + d] * inv, dst + col);
    }
  }
}

#if CONVEYOR_BF16_DOT
// 16 x 16 dwords in place: in, m[t] is row t; out, m[c] is column c (lane t holds row t's).
INLINE void transpose16(__m512i* m) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(m[2 * i], m[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(m[2 * i], m[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {   // m[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j
    m[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    m[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    m[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    m[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {   // gather lane L of m[j], m[4 + j], m[8 + j], m[12 + j]
    const __m512i x0 = _mm512_shuffle_i32x4(m[j], m[4 + j], 0x88);
    const __m512i x1 = _mm512_shuffle_i32x4(m[j], m[4 + j], 0xDD);
    const __m512i y0 = _mm512_shuffle_i32x4(m[8 + j], m[12 + j], 0x88);
    const __m512i y1 = _mm512_shuffle_i32x4(m[8 + j], m[12 + j], 0xDD);
    t[j] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    t[8 + j] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    t[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) m[i] = t[i];
}

// Unscaled scores of NR query rows against n <= kKeyTile bf16 keys of one kv head read in place
// (k, row stride k_stride): the keys are transposed once into dim pairs with key t in lane t,
// then each row adds one vdpbf16ps per dim pair. No horizontal sums; keys past n score 0.
template <int D, int NR>
INLINE void scores_transposed_bf16(const uint16_t* const* q, const uint16_t* k, int64_t k_stride,
                                   int n, float* const* out) {
  __m512 a[NR][2];
  for (int r = 0; r < NR; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  for (int c = 0; c < D / 32; ++c) {   // 16 dim pairs (32 dims) at a time
    __m512i m[16];
    for (int t = 0; t < kKeyTile; ++t)
      m[t] = t < n ? _mm512_loadu_si512(k + t * k_stride + 32 * c) : _mm512_setzero_si512();
    transpose16(m);
    for (int i = 0; i < 16; ++i)
      for (int r = 0; r < NR; ++r) {
        uint32_t pair;
        std::memcpy(&pair, q[r] + 32 * c + 2 * i, 4);
        a[r][i & 1] = _mm512_dpbf16_ps(a[r][i & 1], (__m512bh)m[i],
                                       (__m512bh)_mm512_set1_epi32(int(pair)));
      }
  }
  for (int r = 0; r < NR; ++r) _mm512_storeu_ps(out[r], _mm512_add_ps(a[r][0], a[r][1]));
}

// Raw scores of every row of a few-rows tile into s[r * kKeyTile + t], kv head by kv head, at
// most 4 rows per pass over the transposed keys.
template <int D>
void scores_all_rows_bf16(const Problem& pb, const Tile& tl, Scratch& sc, const uint16_t* k,
                          int n) {
  const int per_token = tl.nh * pb.group;
  for (int head = 0; head < tl.nh; ++head) {
    int rows[64], nr = 0;
    for (int r = 0; r < tl.rows && nr < 64; ++r)
      if ((r % per_token) / pb.group == head) rows[nr++] = r;
    for (int b = 0; b < nr; b += 4) {
      const int cnt = std::min(4, nr - b);
      const uint16_t* q[4];
      float* out[4];
      for (int j = 0; j < cnt; ++j) {
        q[j] = sc.q_bf16.data() + size_t(rows[b + j]) * D;
        out[j] = sc.s.data() + rows[b + j] * kKeyTile;
      }
      const uint16_t* kh = k + head * D;
      switch (cnt) {
        case 4: scores_transposed_bf16<D, 4>(q, kh, pb.tok_stride, n, out); break;
        case 3: scores_transposed_bf16<D, 3>(q, kh, pb.tok_stride, n, out); break;
        case 2: scores_transposed_bf16<D, 2>(q, kh, pb.tok_stride, n, out); break;
        default: scores_transposed_bf16<D, 1>(q, kh, pb.tok_stride, n, out); break;
      }
    }
  }
}
#endif

template <typename KV, int D>
void score_keys_in_lanes(const Problem& pb, const Tile& tl, Scratch& sc, const KV* k,
                         int64_t key0, int n) {
#if CONVEYOR_BF16_DOT
  if constexpr (kDotsBf16<KV>) {
    const vf scale = splat(pb.scale_log2);
    if (tl.rows <= 64 && D % 32 == 0) {
      scores_all_rows_bf16<D>(pb, tl, sc, k, n);   // each row's slot of s, read back just below
      auto score = [&](int r, int) { return load(sc.s.data() + r * kKeyTile) * scale; };
      return softmax_keys_in_lanes(tl, pb.group, score, key0, n, sc);
    }
    auto score = [&](int r, int head) {
      return scores_one_row_bf16<D>(sc.q_bf16.data() + r * D, k + head * D, pb.tok_stride, n) *
             scale;
    };
    return softmax_keys_in_lanes(tl, pb.group, score, key0, n, sc);
  }
#endif
  const Rows kr = stage(k, pb.tok_stride, n, tl.nh * D, sc.kbuf.data());
  auto score = [&](int r, int head) {
    return scores_one_row<D>(sc.q.data() + r * D, kr.p + head * D, kr.stride);
  };
  softmax_keys_in_lanes(tl, pb.group, score, key0, n, sc);
}

Tile make_tile(const Problem& pb, const Item& it) {
  Tile tl;
  const int64_t start = pb.starts[it.req], end = pb.starts[it.req + 1];
  tl.tok0 = it.tok_begin;
  tl.nq = int(it.tok_end - it.tok_begin);
  tl.pos0 = pb.seq_lens[it.req] - (end - start) + (it.tok_begin - start);
  tl.kv_len = tl.pos0 + tl.nq;
  tl.window = pb.window;
  tl.key_begin = pb.window ? std::max<int64_t>(0, tl.pos0 - pb.window + 1) : 0;
  tl.table = pb.tables + it.req * pb.table_stride;
  tl.h0 = it.h0;
  tl.nh = it.nh;
  tl.rows = tl.nq * tl.nh * pb.group;
  tl.rows_in_lanes = tl.nq * pb.group >= kLanes;   // make_items gives such tiles one kv head
  tl.rows_pad = tl.rows_in_lanes ? (tl.rows + kLanes - 1) / kLanes * kLanes : tl.rows;
  return tl;
}

template <typename KV, int D>
void attend_tile(const Problem& pb, const Tile& tl, Scratch& sc, const KV* k, const KV* v,
                 int64_t key0, int n) {
  if (tl.rows_in_lanes) {
    const Rows vr = stage(v, pb.tok_stride, n, tl.nh * D, sc.vbuf.data());
    const Rows kr = stage(k, pb.tok_stride, n, tl.nh * D, sc.kbuf.data());
    scores_rows_in_lanes<D>(sc.q.data(), tl.rows_pad, kr, sc.s.data());
    softmax_rows_in_lanes(tl, key0, n, sc);
    accumulate_pv<D>(sc, 0, tl.rows, 1, tl.rows_pad, vr.p, vr.stride, n);
    return;
  }
  score_keys_in_lanes<KV, D>(pb, tl, sc, k, key0, n);
#if CONVEYOR_BF16_DOT
  if constexpr (kDotsBf16<KV>) {
    for (int r0 = 0; r0 < tl.rows; r0 += pb.group)
      accumulate_pv_bf16<D>(sc, r0, r0 + pb.group, v + ((r0 / pb.group) % tl.nh) * D,
                            pb.tok_stride, n);
    return;
  }
#endif
  const Rows vr = stage(v, pb.tok_stride, n, tl.nh * D, sc.vbuf.data());
  for (int r0 = 0; r0 < tl.rows; r0 += pb.group) {   // one kv head's query rows at a time
    const int head = (r0 / pb.group) % tl.nh;
    accumulate_pv<D>(sc, r0, r0 + pb.group, kKeyTile, 1, vr.p + head * D, vr.stride, n);
  }
}

// Asks for the K/V rows of the tile starting at key0 to be brought into L2. Blocks are scattered,
// so the hardware prefetcher cannot follow them; kPrefetchTiles tiles of work hide the latency.
template <typename KV, int D>
INLINE void prefetch_tile(const Problem& pb, const Tile& tl, const KV* k, const KV* v,
                          int64_t key0) {
  if (key0 >= tl.kv_len) return;
  const int bs = pb.block_size, off = int(key0 % bs);
  const int n = int(std::min<int64_t>({kKeyTile, bs - off, tl.kv_len - key0}));
  const int64_t at = tl.table[key0 / bs] * pb.block_stride + off * pb.tok_stride;
  constexpr int kLine = 64 / int(sizeof(KV));
  for (int t = 0; t < n; ++t)
    for (int j = 0; j < tl.nh * D; j += kLine) {
      __builtin_prefetch(k + at + t * pb.tok_stride + j, 0, 1);
      __builtin_prefetch(v + at + t * pb.tok_stride + j, 0, 1);
    }
}

template <typename KV, int D>
void run_item(const Problem& pb, const Item& it, Scratch& sc) {
  const Tile tl = make_tile(pb, it);
  pb.q_bf16 ? load_queries<uint16_t, KV, D>(pb, tl, sc) : load_queries<float, KV, D>(pb, tl, sc);
  const KV* k_heads = static_cast<const KV*>(pb.k) + tl.h0 * D;
  const KV* v_heads = static_cast<const KV*>(pb.v) + tl.h0 * D;
  const int bs = pb.block_size;
  for (int64_t key0 = tl.key_begin; key0 < tl.kv_len;) {
    const int off = int(key0 % bs);
    const int n = int(std::min<int64_t>({kKeyTile, bs - off, tl.kv_len - key0}));
    const int64_t at = tl.table[key0 / bs] * pb.block_stride + off * pb.tok_stride;
    prefetch_tile<KV, D>(pb, tl, k_heads, v_heads, key0 + n + (kPrefetchTiles - 1) * kKeyTile);
    attend_tile<KV, D>(pb, tl, sc, k_heads + at, v_heads + at, key0, n);
    key0 += n;
  }
  pb.q_bf16 ? store_output<uint16_t, KV, D>(pb, tl, sc) : store_output<float, KV, D>(pb, tl, sc);
}

// ---- scheduling ----

// Rejects metadata the kernel would otherwise trust with raw pointers.
void check_request(const Problem& pb, int64_t req, int64_t num_blocks, int64_t table_width) {
  const int64_t start = pb.starts[req], end = pb.starts[req + 1], seq = pb.seq_lens[req];
  STD_TORCH_CHECK(start <= end && end - start <= seq, "request ", req, ": bad query range");
  if (start == end) return;
  const int64_t used_blocks = (seq + pb.block_size - 1) / pb.block_size;
  STD_TORCH_CHECK(used_blocks <= table_width, "request ", req, ": block table too short");
  for (int64_t b = 0; b < used_blocks; ++b) {
    const int64_t block = pb.tables[req * pb.table_stride + b];
    STD_TORCH_CHECK(block >= 0 && block < num_blocks, "request ", req, ": bad block ", block);
  }
}

// Keys a run of q_len queries ending at context length seq reads at most.
int64_t visible_keys(const Problem& pb, int64_t seq, int64_t q_len) {
  return pb.window ? std::min(seq, pb.window + q_len - 1) : seq;
}

// At most `requested` threads, fewer when the call is too small to repay waking them.
int choose_threads(const Problem& pb, int64_t num_reqs, int64_t requested) {
  int64_t work = 0;   // (query token x key x kv head) units
  for (int64_t req = 0; req < num_reqs; ++req)
    work += (pb.starts[req + 1] - pb.starts[req]) * visible_keys(pb, pb.seq_lens[req],
                                                                 pb.starts[req + 1] - pb.starts[req]) * pb.hkv;
  return int(std::clamp<int64_t>(work / kWorkPerThread, 1, std::max<int64_t>(requested, 1)));
}

// Work items, heaviest first so the dynamic schedule ends balanced. Few-row tiles take all kv
// heads (whole cache blocks read in order) unless that leaves too few items for the threads.
std::vector<Item> make_items(const Problem& pb, int64_t num_reqs, int threads) {
  std::vector<Item> items;
  int64_t fused_items = 0;
  for (int64_t req = 0; req < num_reqs; ++req) {
    const int64_t q_len = pb.starts[req + 1] - pb.starts[req];
    fused_items += q_len * pb.group >= kLanes ? pb.hkv * ((q_len + kQueryTile - 1) / kQueryTile)
                                              : (q_len > 0);
  }
  const bool split_heads = fused_items < 2 * threads;
  for (int64_t req = 0; req < num_reqs; ++req) {
    const int64_t start = pb.starts[req], end = pb.starts[req + 1], seq = pb.seq_lens[req];
    for (int64_t t = start; t < end; t += kQueryTile) {
      const int64_t t_end = std::min(end, t + kQueryTile);
      const int64_t cost = (t_end - t) * visible_keys(pb, seq - (end - t_end), t_end - t);
      const bool one_head = split_heads || (t_end - t) * pb.group >= kLanes;
      const int nh = one_head ? 1 : pb.hkv;
      for (int h = 0; h < pb.hkv; h += nh) items.push_back({req, t, t_end, cost * nh, h, nh});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

template <typename KV, int D>
void run_all(const Problem& pb, const std::vector<Item>& items, int max_threads) {
  const int threads = std::min<int>(max_threads, int(items.size()));
  int max_rows = 0, max_nh = 1;
  for (const Item& it : items) {
    const Tile tl = make_tile(pb, it);
    max_rows = std::max(max_rows, tl.rows_pad);
    max_nh = std::max(max_nh, tl.nh);
  }
  const int64_t num_items = int64_t(items.size());
#pragma omp parallel num_threads(threads)
  {
    Scratch sc(max_rows, max_nh * D, D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) run_item<KV, D>(pb, items[i], sc);
  }
}

template <typename KV>
void run_dim(const Problem& pb, const std::vector<Item>& items, int threads) {
  switch (pb.head_dim) {
    case 32: return run_all<KV, 32>(pb, items, threads);
    case 64: return run_all<KV, 64>(pb, items, threads);
    case 128: return run_all<KV, 128>(pb, items, threads);
    case 256: return run_all<KV, 256>(pb, items, threads);
    default: STD_TORCH_CHECK(false, "paged_attention: unsupported head_dim ", pb.head_dim);
  }
}

bool is_float_or_bf16(const Tensor& t) {
  return t.scalar_type() == ScalarType::Float || t.scalar_type() == ScalarType::BFloat16;
}

void check_inputs(const Tensor& out, const Tensor& query, const Tensor& kv_cache,
                  const Tensor& block_tables, const Tensor& starts, const Tensor& seq_lens) {
  STD_TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && kv_cache.dim() == 5, "bad ranks");
  STD_TORCH_CHECK(out.is_contiguous() && kv_cache.is_contiguous(), "out/kv_cache not contiguous");
  STD_TORCH_CHECK(query.stride(2) == 1, "query rows must be contiguous");
  STD_TORCH_CHECK(is_float_or_bf16(query) && is_float_or_bf16(kv_cache), "fp32/bf16 only");
  STD_TORCH_CHECK(out.scalar_type() == query.scalar_type(), "out dtype must match query");
  for (int i = 0; i < 3; ++i) STD_TORCH_CHECK(out.size(i) == query.size(i), "out shape");
  STD_TORCH_CHECK(query.size(2) == kv_cache.size(4), "head_dim mismatch");
  STD_TORCH_CHECK(query.size(1) % kv_cache.size(3) == 0, "num_heads % num_kv_heads != 0");
  for (const Tensor* t : {&block_tables, &starts, &seq_lens})
    STD_TORCH_CHECK(t->scalar_type() == ScalarType::Long && t->is_contiguous(), "int64 metadata");
  STD_TORCH_CHECK(starts.numel() == seq_lens.numel() + 1, "query_start_loc must be [B + 1]");
  STD_TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) >= seq_lens.numel(), "tables");
}

Problem make_problem(const Tensor& out, const Tensor& query, const Tensor& kv_cache,
                     const Tensor& block_tables, const Tensor& starts, const Tensor& seq_lens,
                     double scale, int64_t window) {
  const char* kv = static_cast<const char*>(kv_cache.const_data_ptr());
  Problem pb;
  pb.q = query.const_data_ptr();
  pb.out = out.mutable_data_ptr();
  pb.q_bf16 = query.scalar_type() == ScalarType::BFloat16;
  pb.q_tok_stride = query.stride(0);
  pb.q_head_stride = query.stride(1);
  pb.k = kv;
  pb.v = kv + kv_cache.stride(0) * int64_t(kv_cache.element_size());
  pb.block_stride = kv_cache.stride(1);
  pb.tok_stride = kv_cache.stride(2);
  pb.tables = static_cast<const int64_t*>(block_tables.const_data_ptr());
  pb.table_stride = block_tables.size(1);
  pb.starts = static_cast<const int64_t*>(starts.const_data_ptr());
  pb.seq_lens = static_cast<const int64_t*>(seq_lens.const_data_ptr());
  pb.hq = int(query.size(1));
  pb.hkv = int(kv_cache.size(3));
  pb.group = pb.hq / pb.hkv;
  pb.block_size = int(kv_cache.size(2));
  pb.head_dim = int(kv_cache.size(4));
  pb.window = window;
  pb.scale_log2 = float(scale * 1.4426950408889634);
  return pb;
}

}  // namespace

// out[t, h] = softmax(q[t, h] . K^T * scale, causal) . V over the request's paged context, or
// over its last `window` positions when window > 0.
void paged_attention(Tensor out, Tensor query, Tensor kv_cache, Tensor block_tables,
                     Tensor query_start_loc, Tensor seq_lens, double scale, int64_t window,
                     int64_t num_threads) {
  check_inputs(out, query, kv_cache, block_tables, query_start_loc, seq_lens);
  STD_TORCH_CHECK(window >= 0, "paged_attention: window must be >= 0");
  const Problem pb = make_problem(out, query, kv_cache, block_tables, query_start_loc, seq_lens,
                                  scale, window);
  const int64_t num_reqs = seq_lens.numel();
  for (int64_t req = 0; req < num_reqs; ++req)
    check_request(pb, req, kv_cache.size(1), block_tables.size(1));
  const int threads = choose_threads(pb, num_reqs, num_threads);
  const std::vector<Item> items = make_items(pb, num_reqs, threads);
  if (items.empty()) return;
  kv_cache.scalar_type() == ScalarType::BFloat16 ? run_dim<uint16_t>(pb, items, threads)
                                                 : run_dim<float>(pb, items, threads);
}

}  // namespace conveyor_cpu

STABLE_TORCH_LIBRARY(conveyor_cpu, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor block_tables, "
        "Tensor query_start_loc, Tensor seq_lens, float scale, int window, int num_threads) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("paged_attention", TORCH_BOX(&conveyor_cpu::paged_attention));
}
