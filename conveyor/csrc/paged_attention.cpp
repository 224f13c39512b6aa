// Paged attention for CPU over conveyor's paged KV cache, one flat ragged batch per call.
//
// Owns: the op `conveyor_cpu::paged_attention`, which reads K/V straight from the cache
// [2, num_blocks, block_size, num_kv_heads, head_dim] through each request's block table (no
// gather copy), for decode rows and prefill chunks alike, and writes `out` [T, Hq, D].
//
// Invariants:
//   * Work item = (request, kv head, tile of <= kQueryTile query tokens). The item holds every
//     query head of its kv group, so each K/V tile is loaded once and shared by the whole group.
//   * Online (flash-style) softmax in fp32 over key tiles of <= 16 keys taken from one block;
//     scores are kept in base 2 (queries are pre-scaled by scale * log2(e)).
//   * Query at position p sees keys 0..p (p = seq_len - q_len + i); nothing past seq_len is read.
//   * Items run in parallel (OpenMP, dynamic schedule, heaviest first); an item is owned by one
//     thread, so outputs never race.
//   * Only GCC/Clang vector extensions are used: the same code builds for AVX-512, AVX2 or SSE.
//     The kernel never writes the cache (the Python side writes this step's K/V first).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace conveyor_cpu {
namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

constexpr int kLanes = 16;       // floats per vector (one zmm; two ymm on AVX2)
constexpr int kKeyTile = 16;     // keys per tile
constexpr int kQueryTile = 16;   // query tokens per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#ifdef __AVX512F__
constexpr int kChains = 8;       // independent FMA chains in the rows-in-lanes score kernel
#else
constexpr int kChains = 4;       // 16 ymm registers: keep accumulators from spilling
#endif

typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vhu __attribute__((vector_size(32), aligned(2)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

#define INLINE inline __attribute__((always_inline))

INLINE vf splat(float x) { return vf{} + x; }
INLINE vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
INLINE void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
INLINE vf load(const uint16_t* p) {   // 16 bf16 -> 16 fp32 (bf16 is the top half of fp32)
  vu wide = __builtin_convertvector(*reinterpret_cast<const vhu*>(p), vu) << 16;
  return reinterpret_cast<vf&>(wide);
}
INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
INLINE vf lane_ids() { return vf{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

INLINE float hsum(vf v) {
  vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

INLINE float hmax(vf v) {
  vf8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  vf8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vf8 a = lo > hi ? lo : hi;
  vf4 c = __builtin_shufflevector(a, a, 0, 1, 2, 3), d = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  vf4 b = c > d ? c : d;
  return std::max(std::max(b[0], b[1]), std::max(b[2], b[3]));
}

// 2^x for x <= 0 (relative error ~1e-7); exactly 0 below -126, which covers -inf.
INLINE vf exp2v(vf x) {
  vf xc = x < -126.0f ? splat(-126.0f) : x;
  vf n = (xc + 12582912.0f) - 12582912.0f;   // round to nearest integer (1.5 * 2^23 trick)
  vf f = xc - n;                             // in [-0.5, 0.5]
  vf p = splat(1.5403530e-4f);
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf r = p * reinterpret_cast<vf&>(bits);
  return x < -126.0f ? splat(0.0f) : r;
}

INLINE float to_float(uint16_t h) { uint32_t b = uint32_t(h) << 16; float f; std::memcpy(&f, &b, 4); return f; }
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
  void* out;
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
  float scale_log2;                // softmax scale * log2(e)
};

struct Item {
  int64_t req, tok_begin, tok_end, cost;
  int kv_head;
};

// Per-thread buffers, sized for the largest tile.
struct Scratch {
  std::vector<float> q, acc, s, kbuf, vbuf, m, l, corr, qpos;
  Scratch(int rows_pad, int d)
      : q(size_t(rows_pad) * d), acc(size_t(rows_pad) * d), s(size_t(rows_pad) * kKeyTile),
        kbuf(size_t(kKeyTile) * d), vbuf(size_t(kKeyTile) * d), m(rows_pad), l(rows_pad),
        corr(rows_pad), qpos(rows_pad) {}
};

// One resolved work item: `rows` = query tokens x heads of the group, row r = token r / G.
struct Tile {
  int64_t tok0, pos0, kv_len;      // first flat token, its position, keys visited
  const int64_t* table;
  int nq, rows, rows_pad, kv_head;
  bool rows_in_lanes;              // many rows: vectorise over rows, else over keys
};

struct Rows {                      // n K or V rows in fp32, `stride` floats apart
  const float* p;
  int64_t stride;
};

// fp32 K/V tiles are read in place unless padding to `n_pad` rows is needed.
template <int D>
Rows stage(const float* src, int64_t stride, int n, int n_pad, float* buf) {
  if (n == n_pad) return {src, stride};
  for (int t = 0; t < n_pad; ++t)
    for (int j = 0; j < D; j += kLanes)
      store(buf + t * D + j, t < n ? load(src + t * stride + j) : splat(0.0f));
  return {buf, D};
}

template <int D>
Rows stage(const uint16_t* src, int64_t stride, int n, int n_pad, float* buf) {
  for (int t = 0; t < n_pad; ++t)
    for (int j = 0; j < D; j += kLanes)
      store(buf + t * D + j, t < n ? load(src + t * stride + j) : splat(0.0f));
  return {buf, D};
}

// ---- few rows (decode): scores of one row lie along lanes, s[r * 16 + t] ----

template <int D>
void scores_keys_in_lanes(const float* q, int rows, Rows k, int n, float* s) {
  constexpr int ND = D / kLanes;
  for (int t = 0; t < n; ++t) {
    vf kr[ND];
    for (int j = 0; j < ND; ++j) kr[j] = load(k.p + t * k.stride + j * kLanes);
    for (int r = 0; r < rows; ++r) {
      vf a = load(q + r * D) * kr[0];
      for (int j = 1; j < ND; ++j) a += load(q + r * D + j * kLanes) * kr[j];
      s[r * kKeyTile + t] = hsum(a);
    }
  }
}

// Online-softmax step; leaves probabilities in s and each row's rescale factor in corr.
void softmax_keys_in_lanes(const Tile& tl, int group, int64_t key0, int n, Scratch& sc) {
  for (int r = 0; r < tl.rows; ++r) {
    float* srow = sc.s.data() + r * kKeyTile;
    int64_t visible = std::clamp<int64_t>(tl.pos0 + r / group - key0 + 1, 0, n);
    vf sv = lane_ids() < float(visible) ? load(srow) : splat(kNegInf);
    float mt = hmax(sv), m_old = sc.m[r];
    if (mt == kNegInf) {   // the whole tile lies after this row's position
      store(srow, splat(0.0f));
      sc.corr[r] = 1.0f;
      continue;
    }
    float m_new = std::max(m_old, mt), c = std::exp2(m_old - m_new);
    vf p = exp2v(sv - m_new);
    store(srow, p);
    sc.l[r] = sc.l[r] * c + hsum(p);
    sc.m[r] = m_new;
    sc.corr[r] = c;
  }
}

// ---- many rows (prefill): one key's scores lie along lanes, st[t * rows_pad + r] ----

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
  const bool masked = n < kKeyTile || key0 + n - 1 > tl.pos0;   // pos0: the smallest position
  for (int rv = 0; rv < rp; rv += kLanes) {
    vf qoff = load(sc.qpos.data() + rv), mt = splat(kNegInf);
    for (int t = 0; t < kKeyTile; ++t) {
      float* sp = sc.s.data() + t * rp + rv;
      if (masked) {
        vf sv = splat(float(key0 + t - tl.pos0)) > qoff ? splat(kNegInf) : load(sp);
        store(sp, t < n ? sv : splat(kNegInf));
      }
      mt = vmax(mt, load(sp));
    }
    vf m_old = load(sc.m.data() + rv), m_new = vmax(m_old, mt), sum = splat(0.0f);
    for (int t = 0; t < kKeyTile; ++t) {
      float* sp = sc.s.data() + t * rp + rv;
      vf p = exp2v(load(sp) - m_new);
      store(sp, p);
      sum += p;
    }
    vf c = exp2v(m_old - m_new);
    store(sc.l.data() + rv, load(sc.l.data() + rv) * c + sum);
    store(sc.m.data() + rv, m_new);
    store(sc.corr.data() + rv, c);
  }
}

// ---- shared: acc[r] = acc[r] * corr[r] + sum_t p(r, t) * V[t] ----

template <int D>
void accumulate_pv(const Tile& tl, Scratch& sc, int64_t p_row, int64_t p_key, Rows v, int n) {
  constexpr int ND = D / kLanes;
  constexpr int CH = ND % 4 == 0 ? 4 : (ND % 3 == 0 ? 3 : (ND % 2 == 0 ? 2 : 1));
  for (int r = 0; r < tl.rows; ++r) {
    float* acc = sc.acc.data() + r * D;
    const float* p = sc.s.data() + r * p_row;
    vf c = splat(sc.corr[r]);
    for (int j0 = 0; j0 < ND; j0 += CH) {
      vf a[CH];
      for (int j = 0; j < CH; ++j) a[j] = load(acc + (j0 + j) * kLanes) * c;
      for (int t = 0; t < n; ++t) {
        vf pt = splat(p[t * p_key]);
        for (int j = 0; j < CH; ++j) a[j] += pt * load(v.p + t * v.stride + (j0 + j) * kLanes);
      }
      for (int j = 0; j < CH; ++j) store(acc + (j0 + j) * kLanes, a[j]);
    }
  }
}

// ---- one work item ----

template <typename Q, int D>
void load_queries(const Problem& pb, const Tile& tl, Scratch& sc) {
  const Q* q = static_cast<const Q*>(pb.q);
  const int g = pb.group, rp = tl.rows_pad;
  for (int r = 0; r < rp; ++r) {
    const bool real = r < tl.rows;
    const Q* src = q + (tl.tok0 + r / g) * pb.q_tok_stride + (tl.kv_head * g + r % g) * pb.q_head_stride;
    for (int d = 0; d < D; ++d) {
      float x = real ? to_float(src[d]) * pb.scale_log2 : 0.0f;
      sc.q[tl.rows_in_lanes ? size_t(d) * rp + r : size_t(r) * D + d] = x;
    }
    sc.qpos[r] = real ? float(r / g) : 3.0e38f;   // padding rows never masked: finite scores
    sc.m[r] = kNegInf;
    sc.l[r] = 0.0f;
  }
  std::fill(sc.acc.begin(), sc.acc.begin() + size_t(tl.rows) * D, 0.0f);
}

template <typename Q, int D>
void store_output(const Problem& pb, const Tile& tl, const Scratch& sc) {
  Q* out = static_cast<Q*>(pb.out);
  const int g = pb.group;
  for (int r = 0; r < tl.rows; ++r) {
    Q* dst = out + ((tl.tok0 + r / g) * pb.hq + tl.kv_head * g + r % g) * int64_t(D);
    const float inv = 1.0f / sc.l[r];
    for (int d = 0; d < D; ++d) from_float(sc.acc[size_t(r) * D + d] * inv, dst + d);
  }
}

Tile make_tile(const Problem& pb, const Item& it) {
  Tile tl;
  const int64_t start = pb.starts[it.req], end = pb.starts[it.req + 1];
  tl.tok0 = it.tok_begin;
  tl.nq = int(it.tok_end - it.tok_begin);
  tl.pos0 = pb.seq_lens[it.req] - (end - start) + (it.tok_begin - start);
  tl.kv_len = tl.pos0 + tl.nq;
  tl.table = pb.tables + it.req * pb.table_stride;
  tl.kv_head = it.kv_head;
  tl.rows = tl.nq * pb.group;
  tl.rows_in_lanes = tl.rows >= kLanes;
  tl.rows_pad = (tl.rows + kLanes - 1) / kLanes * kLanes;
  return tl;
}

template <typename KV, int D>
void run_item(const Problem& pb, const Item& it, Scratch& sc) {
  const Tile tl = make_tile(pb, it);
  pb.q_bf16 ? load_queries<uint16_t, D>(pb, tl, sc) : load_queries<float, D>(pb, tl, sc);
  const KV* k_head = static_cast<const KV*>(pb.k) + tl.kv_head * D;
  const KV* v_head = static_cast<const KV*>(pb.v) + tl.kv_head * D;
  const int bs = pb.block_size;
  for (int64_t key0 = 0; key0 < tl.kv_len;) {
    const int off = int(key0 % bs);
    const int n = int(std::min<int64_t>({kKeyTile, bs - off, tl.kv_len - key0}));
    const int64_t at = tl.table[key0 / bs] * pb.block_stride + off * pb.tok_stride;
    const int n_pad = tl.rows_in_lanes ? kKeyTile : n;
    Rows k = stage<D>(k_head + at, pb.tok_stride, n, n_pad, sc.kbuf.data());
    Rows v = stage<D>(v_head + at, pb.tok_stride, n, n_pad, sc.vbuf.data());
    if (tl.rows_in_lanes) {
      scores_rows_in_lanes<D>(sc.q.data(), tl.rows_pad, k, sc.s.data());
      softmax_rows_in_lanes(tl, key0, n, sc);
      accumulate_pv<D>(tl, sc, 1, tl.rows_pad, v, n);
    } else {
      scores_keys_in_lanes<D>(sc.q.data(), tl.rows, k, n, sc.s.data());
      softmax_keys_in_lanes(tl, pb.group, key0, n, sc);
      accumulate_pv<D>(tl, sc, kKeyTile, 1, v, n);
    }
    key0 += n;
  }
  pb.q_bf16 ? store_output<uint16_t, D>(pb, tl, sc) : store_output<float, D>(pb, tl, sc);
}

// ---- scheduling ----

// Work items, heaviest first so the dynamic schedule ends balanced. Validates the metadata the
// kernel would otherwise trust with raw pointers.
std::vector<Item> make_items(const Problem& pb, int64_t num_reqs, int64_t num_blocks,
                             int64_t table_width) {
  std::vector<Item> items;
  for (int64_t req = 0; req < num_reqs; ++req) {
    const int64_t start = pb.starts[req], end = pb.starts[req + 1], seq = pb.seq_lens[req];
    STD_TORCH_CHECK(start <= end && end - start <= seq, "request ", req, ": bad query range");
    const int64_t used_blocks = (seq + pb.block_size - 1) / pb.block_size;
    STD_TORCH_CHECK(end == start || used_blocks <= table_width, "request ", req,
                    ": block table too short for seq_len ", seq);
    for (int64_t b = 0; b < used_blocks && end > start; ++b) {
      const int64_t block = pb.tables[req * pb.table_stride + b];
      STD_TORCH_CHECK(block >= 0 && block < num_blocks, "request ", req, ": bad block ", block);
    }
    for (int64_t t = start; t < end; t += kQueryTile) {
      const int64_t t_end = std::min(end, t + kQueryTile);
      const int64_t cost = (t_end - t) * (seq - (end - t_end));
      for (int h = 0; h < pb.hkv; ++h) items.push_back({req, t, t_end, cost, h});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

template <typename KV, int D>
void run_all(const Problem& pb, const std::vector<Item>& items, int threads) {
  const int max_rows_pad = (kQueryTile * pb.group + kLanes - 1) / kLanes * kLanes;
  const int64_t num_items = int64_t(items.size());
#pragma omp parallel num_threads(threads)
  {
    Scratch sc(max_rows_pad, D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) run_item<KV, D>(pb, items[i], sc);
  }
}

template <typename KV>
void run_dim(const Problem& pb, const std::vector<Item>& items, int threads) {
  switch (pb.head_dim) {
    case 32: return run_all<KV, 32>(pb, items, threads);
    case 64: return run_all<KV, 64>(pb, items, threads);
    case 96: return run_all<KV, 96>(pb, items, threads);
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

}  // namespace

// out[t, h] = softmax(q[t, h] . K^T * scale, causal) . V over the request's paged context.
void paged_attention(Tensor out, Tensor query, Tensor kv_cache, Tensor block_tables,
                     Tensor query_start_loc, Tensor seq_lens, double scale, int64_t num_threads) {
  check_inputs(out, query, kv_cache, block_tables, query_start_loc, seq_lens);
  const int64_t num_blocks = kv_cache.size(1), hkv = kv_cache.size(3), d = kv_cache.size(4);
  const bool kv_bf16 = kv_cache.scalar_type() == ScalarType::BFloat16;
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
  pb.starts = static_cast<const int64_t*>(query_start_loc.const_data_ptr());
  pb.seq_lens = static_cast<const int64_t*>(seq_lens.const_data_ptr());
  pb.hq = int(query.size(1));
  pb.hkv = int(hkv);
  pb.group = int(query.size(1) / hkv);
  pb.block_size = int(kv_cache.size(2));
  pb.head_dim = int(d);
  pb.scale_log2 = float(scale * 1.4426950408889634);
  const std::vector<Item> items = make_items(pb, seq_lens.numel(), num_blocks, block_tables.size(1));
  if (items.empty()) return;
  const int threads = int(std::clamp<int64_t>(num_threads, 1, int64_t(items.size())));
  kv_bf16 ? run_dim<uint16_t>(pb, items, threads) : run_dim<float>(pb, items, threads);
}

}  // namespace conveyor_cpu

STABLE_TORCH_LIBRARY(conveyor_cpu, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor block_tables, "
        "Tensor query_start_loc, Tensor seq_lens, float scale, int num_threads) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("paged_attention", TORCH_BOX(&conveyor_cpu::paged_attention));
}
