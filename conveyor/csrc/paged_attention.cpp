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

}  // namespace
}  // namespace conveyor_cpu

#include "paged_attention_tile.inc"
