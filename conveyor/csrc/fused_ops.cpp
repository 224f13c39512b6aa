// Fused per-layer element-wise ops for CPU: one call where plain PyTorch issues five to fifteen.
//
// Owns the ops (all in place or into a given `out`, fp32 or bf16, fp32 arithmetic inside):
//   rms_norm(out, x, weight, eps)                   out = weight * rmsnorm(x)
//   fused_add_rms_norm(x, residual, weight, eps)    residual += x; x = weight * rmsnorm(residual)
//   rotary_embedding(qkv, positions, cos, sin, hq, hkv)   RoPE ("rotate half") on the q and k
//                                                   heads of a fused qkv row, in place
//   write_kv(kv_cache, qkv, slot_mapping, hq, hkv)  copy the k and v heads of each qkv row to
//                                                   its slot of the paged cache
//   silu_and_mul(out, x)                            out = silu(x[:, :I]) * x[:, I:]
//   quantize_rows_int8(q, scales, offsets, x)       per row, asymmetric uint8 over [min(x, 0),
//                                                   max(x, 0)] with an integer zero point z (0 is
//                                                   exact): scale = range / 255, q = round(x /
//                                                   scale) + z; offsets = scale * (128 - z), what
//                                                   a GEMM run with zero point 128 is owed per unit
//   dequantize_rows(out, y, scales, offsets, colsum)  out[r, c] = y[r, c] * scales[r]
//                                                   + offsets[r] * colsum[c]; y fp32 (the GEMM's
//                                                   exact-ish sums, rounded once, here), out fp32
//                                                   or bf16, may be y itself
//   argmax_rows(tokens, finite, x)                  per row of logits x [R, V]: tokens[r] =
//                                                   torch.argmax (the first maximum; a NaN counts
//                                                   above everything), finite[r] = no NaN or inf;
//                                                   tokens int64 [R], finite bool [R]
//
// Invariants:
//   * Rounding matches the PyTorch reference modules step for step: a bf16 result is rounded
//     where the reference rounds (the normalised x before the weight multiply, the residual sum),
//     so fp32 results equal the reference up to summation order and bf16 ones to one rounding.
//   * Rows are independent; they are split across threads with torch's parallel_for, each row
//     owned by one thread. Row strides may be anything; the innermost dimension is contiguous.
//   * Shapes and dtypes are checked; nothing is read or written out of bounds (slots and
//     positions are range-checked).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "exp2_poly.h"

namespace conveyor_cpu {
namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

// std::bit_cast rather than memcpy: the loops below stay vectorisable.
inline float bf16_to_f32(uint16_t v) { return std::bit_cast<float>(uint32_t(v) << 16); }

inline uint16_t f32_to_bf16(float f) {   // round to nearest even, NaN stays NaN (as torch)
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);   // a select, no branch
}

template <typename T> inline float ld(const T* p, int64_t i);
template <> inline float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float ld<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
template <typename T> inline void st(T* p, int64_t i, float v);
template <> inline void st<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void st<uint16_t>(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
// the value a dtype holds after rounding (identity for fp32)
template <typename T> inline float rnd(float v) { return v; }
template <> inline float rnd<uint16_t>(float v) { return bf16_to_f32(f32_to_bf16(v)); }

bool is_bf16(const Tensor& t) { return t.scalar_type() == ScalarType::BFloat16; }

void check_float(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Float || is_bf16(t), name, ": fp32 or bf16 only");
  STD_TORCH_CHECK(t.stride(t.dim() - 1) == 1, name, ": innermost dimension must be contiguous");
}

template <typename F>
void for_rows(int64_t rows, int64_t cost_per_row, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cost_per_row));
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

// ---------------------------------------------------------------- RMSNorm
template <typename T>
inline void norm_row(T* out, const T* src, const T* w, int64_t h, float eps) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < h; ++i) {
    const float v = ld(src, i);
    ss += v * v;
  }
  const float r = 1.0f / std::sqrt(ss / float(h) + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) st(out, i, ld(w, i) * rnd<T>(ld(src, i) * r));
}

template <typename T>
void rms_norm_impl(Tensor& out, const Tensor& x, const Tensor& w, double eps) {
  const int64_t rows = x.size(0), h = x.size(1);
  T* o = static_cast<T*>(out.mutable_data_ptr());
  const T* xs = static_cast<const T*>(x.const_data_ptr());
  const T* ws = static_cast<const T*>(w.const_data_ptr());
  const int64_t os = out.stride(0), xst = x.stride(0);
  for_rows(rows, h, [&](int64_t r) { norm_row(o + r * os, xs + r * xst, ws, h, float(eps)); });
}

template <typename T>
void fused_add_rms_norm_impl(Tensor& x, Tensor& res, const Tensor& w, double eps) {
  const int64_t rows = x.size(0), h = x.size(1);
  T* xs = static_cast<T*>(x.mutable_data_ptr());
  T* rs = static_cast<T*>(res.mutable_data_ptr());
  const T* ws = static_cast<const T*>(w.const_data_ptr());
  const int64_t xst = x.stride(0), rst = res.stride(0);
  for_rows(rows, 2 * h, [&](int64_t r) {
    T* xr = xs + r * xst;
    T* rr = rs + r * rst;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) st(rr, i, ld(rr, i) + ld(xr, i));
    norm_row(xr, rr, ws, h, float(eps));
  });
}

void check_norm(const Tensor& out, const Tensor& x, const Tensor& w) {
  check_float(out, "out");
  check_float(x, "x");
  STD_TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && w.dim() == 1, "rms_norm: [T, H] and [H]");
  STD_TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1) && w.size(0) == x.size(1),
                  "rms_norm: shape mismatch");
  STD_TORCH_CHECK(out.scalar_type() == x.scalar_type() && w.scalar_type() == x.scalar_type() &&
                  w.is_contiguous(), "rms_norm: one dtype, contiguous weight");
}

void rms_norm(Tensor out, Tensor x, Tensor weight, double eps) {
  check_norm(out, x, weight);
  is_bf16(x) ? rms_norm_impl<uint16_t>(out, x, weight, eps)
             : rms_norm_impl<float>(out, x, weight, eps);
}

void fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, double eps) {
  check_norm(residual, x, weight);
  is_bf16(x) ? fused_add_rms_norm_impl<uint16_t>(x, residual, weight, eps)
             : fused_add_rms_norm_impl<float>(x, residual, weight, eps);
}

// ---------------------------------------------------------------- RoPE
// Head h of a row (q heads then k heads) rotated by the angle table row of its position:
// out[i] = x[i] cos[i] - x[i + D/2] sin[i],  out[i + D/2] = x[i + D/2] cos[i] + x[i] sin[i].
template <typename T>
void rope_impl(Tensor& qkv, const Tensor& pos, const Tensor& cos, const Tensor& sin, int64_t hq,
               int64_t hkv) {
  const int64_t rows = qkv.size(0), d = cos.size(1), half = d / 2, heads = hq + hkv;
  T* base = static_cast<T*>(qkv.mutable_data_ptr());
  const int64_t rs = qkv.stride(0);
  const int64_t* p = static_cast<const int64_t*>(pos.const_data_ptr());
  const float* cs = static_cast<const float*>(cos.const_data_ptr());
  const float* sn = static_cast<const float*>(sin.const_data_ptr());
  const int64_t max_pos = cos.size(0);
  for (int64_t r = 0; r < rows; ++r)
    STD_TORCH_CHECK(p[r] >= 0 && p[r] < max_pos, "rotary_embedding: position out of range");
  for_rows(rows, heads * d, [&](int64_t r) {
    const float* c = cs + p[r] * d;
    const float* s = sn + p[r] * d;
    for (int64_t h = 0; h < heads; ++h) {
      T* x = base + r * rs + h * d;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float a = ld(x, i), b = ld(x, i + half);
        st(x, i, a * c[i] - b * s[i]);
        st(x, i + half, b * c[i + half] + a * s[i + half]);
      }
    }
  });
}

void rotary_embedding(Tensor qkv, Tensor positions, Tensor cos, Tensor sin, int64_t num_heads,
                      int64_t num_kv_heads) {
  check_float(qkv, "qkv");
  STD_TORCH_CHECK(qkv.dim() == 2 && cos.dim() == 2 && sin.dim() == 2, "rotary_embedding: ranks");
  STD_TORCH_CHECK(cos.scalar_type() == ScalarType::Float && sin.scalar_type() == ScalarType::Float
                  && cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == sin.size(0) &&
                  cos.size(1) == sin.size(1) && cos.size(1) % 2 == 0,
                  "rotary_embedding: cos/sin must be contiguous fp32 [P, D]");
  STD_TORCH_CHECK(positions.scalar_type() == ScalarType::Long && positions.is_contiguous() &&
                  positions.numel() == qkv.size(0), "rotary_embedding: positions int64 [T]");
  STD_TORCH_CHECK(qkv.size(1) >= (num_heads + num_kv_heads) * cos.size(1),
                  "rotary_embedding: row too short");
  is_bf16(qkv) ? rope_impl<uint16_t>(qkv, positions, cos, sin, num_heads, num_kv_heads)
               : rope_impl<float>(qkv, positions, cos, sin, num_heads, num_kv_heads);
}

// ---------------------------------------------------------------- KV write
void write_kv(Tensor kv_cache, Tensor qkv, Tensor slot_mapping, int64_t num_heads,
              int64_t num_kv_heads) {
  check_float(qkv, "qkv");
  STD_TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous(), "write_kv: cache layout");
  STD_TORCH_CHECK(kv_cache.scalar_type() == qkv.scalar_type(), "write_kv: dtype mismatch");
  STD_TORCH_CHECK(slot_mapping.scalar_type() == ScalarType::Long && slot_mapping.is_contiguous()
                  && slot_mapping.numel() == qkv.size(0), "write_kv: slot_mapping int64 [T]");
  const int64_t d = kv_cache.size(4), hkv = kv_cache.size(3);
  STD_TORCH_CHECK(hkv == num_kv_heads, "write_kv: num_kv_heads mismatch");
  STD_TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) >= (num_heads + 2 * hkv) * d, "write_kv: row");
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t rows = qkv.size(0), width = hkv * d, elem = kv_cache.element_size();
  const int64_t* slots = static_cast<const int64_t*>(slot_mapping.const_data_ptr());
  for (int64_t r = 0; r < rows; ++r)
    STD_TORCH_CHECK(slots[r] >= 0 && slots[r] < num_slots, "write_kv: slot out of range");
  char* k_cache = static_cast<char*>(kv_cache.mutable_data_ptr());
  char* v_cache = k_cache + kv_cache.stride(0) * elem;
  const char* src = static_cast<const char*>(qkv.const_data_ptr());
  const int64_t row_bytes = qkv.stride(0) * elem, k_off = num_heads * d * elem;
  for_rows(rows, 2 * width, [&](int64_t r) {
    const char* row = src + r * row_bytes + k_off;
    std::memcpy(k_cache + slots[r] * width * elem, row, width * elem);
    std::memcpy(v_cache + slots[r] * width * elem, row + width * elem, width * elem);
  });
}

// ---------------------------------------------------------------- SwiGLU
// x / (1 + e^-x) with a vectorisable exp: e^-x = 2^(-x log2 e) split into integer and fraction
// (exp2_poly.h), clamped so it cannot overflow.
inline float silu(float x) {
  float t = -x * 1.4426950408889634f;
  t = t < -126.0f ? -126.0f : (t > 126.0f ? 126.0f : t);
  const float n = (t + 12582912.0f) - 12582912.0f;   // round to nearest integer
  const float p = exp2_fraction(t - n);
  const float scale = std::bit_cast<float>((int32_t(n) + 127) << 23);
  return x / (1.0f + p * scale);
}

template <typename T>
void silu_and_mul_impl(Tensor& out, const Tensor& x) {
  const int64_t rows = x.size(0), inter = out.size(1);
  T* o = static_cast<T*>(out.mutable_data_ptr());
  const T* xs = static_cast<const T*>(x.const_data_ptr());
  const int64_t os = out.stride(0), xst = x.stride(0);
  for_rows(rows, 2 * inter, [&](int64_t r) {
    const T* g = xs + r * xst;
    const T* u = g + inter;
    T* dst = o + r * os;
    // as torch: silu(gate) is rounded to the dtype before the multiply
#pragma omp simd
    for (int64_t i = 0; i < inter; ++i) st(dst, i, rnd<T>(silu(ld(g, i))) * ld(u, i));
  });
}

// ---------------------------------------------------------------- int8 activations
// Per-row (per-token) asymmetric quantization whose zero point is an integer, so 0 (and the many
// values near it) are represented exactly: that, not the range, is what kept SmolLM2's perplexity
// (scripts/int8_accuracy.py). Round half to even, as torch.round.
template <typename T>
void quantize_rows_impl(Tensor& q, Tensor& scales, Tensor& offsets, const Tensor& x) {
  const int64_t rows = x.size(0), h = x.size(1);
  const T* xs = static_cast<const T*>(x.const_data_ptr());
  uint8_t* qs = static_cast<uint8_t*>(q.mutable_data_ptr());
  float* sc = static_cast<float*>(scales.mutable_data_ptr());
  float* off = static_cast<float*>(offsets.mutable_data_ptr());
  const int64_t xst = x.stride(0), qst = q.stride(0);
  for_rows(rows, h, [&](int64_t r) {
    const T* src = xs + r * xst;
    float hi = 0.0f, lo = 0.0f;
#pragma omp simd reduction(max : hi) reduction(min : lo)
    for (int64_t i = 0; i < h; ++i) {
      hi = std::max(hi, ld(src, i));
      lo = std::min(lo, ld(src, i));
    }
    const float range = (hi - lo) / 255.0f;
    const float scale = range > 0.0f ? range : 1.0f;
    float zero = std::nearbyint(-lo / scale);
    zero = zero < 0.0f ? 0.0f : (zero > 255.0f ? 255.0f : zero);
    const float inv = 1.0f / scale;
    uint8_t* dst = qs + r * qst;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) {
      float v = std::nearbyint(ld(src, i) * inv) + zero;   // the default rounding mode: to even
      v = v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v);
      dst[i] = uint8_t(int32_t(v));
    }
    sc[r] = scale;
    off[r] = scale * (128.0f - zero);
  });
}

template <typename T>
void dequantize_rows_impl(Tensor& out, const Tensor& y, const Tensor& scales, const Tensor& offsets,
                          const Tensor& colsum) {
  const int64_t rows = y.size(0), h = y.size(1), yst = y.stride(0), ost = out.stride(0);
  T* os = static_cast<T*>(out.mutable_data_ptr());
  const float* ys = static_cast<const float*>(y.const_data_ptr());
  const float* sc = static_cast<const float*>(scales.const_data_ptr());
  const float* off = static_cast<const float*>(offsets.const_data_ptr());
  const float* cs = static_cast<const float*>(colsum.const_data_ptr());
  for_rows(rows, h, [&](int64_t r) {
    const float* row = ys + r * yst;
    T* dst = os + r * ost;
    const float s = sc[r], o = off[r];
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) st(dst, i, row[i] * s + o * cs[i]);
  });
}

// ---------------------------------------------------------------- argmax of logits rows
// A finite row takes two vector passes: its maximum (and whether every value is finite: v - v is
// 0 for a finite v and NaN otherwise, and a NaN sum stays NaN), then the first block of 64 that
// holds that maximum. A row with a NaN or inf is rare (it fails its request) and is scanned as
// torch does, so its token matches torch's too.
template <typename T>
int64_t argmax_exact(const T* row, int64_t v) {
  int64_t best = 0;
  float m = ld(row, 0);
  for (int64_t i = 0; i < v; ++i) {
    const float e = ld(row, i);
    if (std::isnan(e)) return i;
    if (e > m) { m = e; best = i; }
  }
  return best;
}

template <typename T>
void argmax_rows_impl(Tensor& tokens, Tensor& finite, const Tensor& x) {
  const int64_t rows = x.size(0), v = x.size(1), xst = x.stride(0);
  const T* xs = static_cast<const T*>(x.const_data_ptr());
  int64_t* tok = static_cast<int64_t*>(tokens.mutable_data_ptr());
  bool* fin = static_cast<bool*>(finite.mutable_data_ptr());
  constexpr int64_t kBlock = 64;
  for_rows(rows, v, [&](int64_t r) {
    const T* row = xs + r * xst;
    float m = -INFINITY, bad = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : bad)
    for (int64_t i = 0; i < v; ++i) {
      const float e = ld(row, i);
      m = e > m ? e : m;
      bad += e - e;
    }
    fin[r] = bad == 0.0f;
    if (!fin[r]) { tok[r] = argmax_exact(row, v); return; }
    int64_t at = 0;
    for (int64_t b = 0; b < v; b += kBlock) {
      const int64_t e = std::min(v, b + kBlock);
      int hit = 0;
#pragma omp simd reduction(| : hit)
      for (int64_t i = b; i < e; ++i) hit |= ld(row, i) == m;
      if (hit) {
        for (at = b; ld(row, at) != m; ++at) {}
        break;
      }
    }
    tok[r] = at;
  });
}

}  // namespace

void argmax_rows(Tensor tokens, Tensor finite, Tensor x) {
  check_float(x, "x");
  STD_TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "argmax_rows: x [R, V] with V > 0");
  STD_TORCH_CHECK(tokens.scalar_type() == ScalarType::Long && tokens.dim() == 1 &&
                  tokens.size(0) == x.size(0) && tokens.stride(0) == 1,
                  "argmax_rows: tokens must be int64 [R], contiguous");
  STD_TORCH_CHECK(finite.scalar_type() == ScalarType::Bool && finite.dim() == 1 &&
                  finite.size(0) == x.size(0) && finite.stride(0) == 1,
                  "argmax_rows: finite must be bool [R], contiguous");
  is_bf16(x) ? argmax_rows_impl<uint16_t>(tokens, finite, x)
             : argmax_rows_impl<float>(tokens, finite, x);
}

void silu_and_mul(Tensor out, Tensor x) {
  check_float(out, "out");
  check_float(x, "x");
  STD_TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0) &&
                  x.size(1) == 2 * out.size(1), "silu_and_mul: x [T, 2I] and out [T, I]");
  STD_TORCH_CHECK(out.scalar_type() == x.scalar_type(), "silu_and_mul: one dtype");
  is_bf16(x) ? silu_and_mul_impl<uint16_t>(out, x) : silu_and_mul_impl<float>(out, x);
}

void quantize_rows_int8(Tensor q, Tensor scales, Tensor offsets, Tensor x) {
  check_float(x, "x");
  STD_TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && q.size(0) == x.size(0) &&
                  q.size(1) == x.size(1) && q.stride(1) == 1,
                  "quantize_rows_int8: x [T, H] and q [T, H] (innermost contiguous)");
  STD_TORCH_CHECK(q.scalar_type() == ScalarType::Byte, "quantize_rows_int8: q must be uint8");
  for (const Tensor* t : {&scales, &offsets})
    STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float && t->dim() == 1 &&
                    t->size(0) == x.size(0) && t->stride(0) == 1,
                    "quantize_rows_int8: scales and offsets must be fp32 [T]");
  is_bf16(x) ? quantize_rows_impl<uint16_t>(q, scales, offsets, x)
             : quantize_rows_impl<float>(q, scales, offsets, x);
}

void dequantize_rows(Tensor out, Tensor y, Tensor scales, Tensor offsets, Tensor colsum) {
  check_float(out, "out");
  STD_TORCH_CHECK(y.scalar_type() == ScalarType::Float && y.dim() == 2 && y.stride(1) == 1 &&
                  out.dim() == 2 && out.size(0) == y.size(0) && out.size(1) == y.size(1),
                  "dequantize_rows: y fp32 [T, H] (innermost contiguous) and out [T, H]");
  for (const Tensor* t : {&scales, &offsets})
    STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float && t->dim() == 1 &&
                    t->size(0) == y.size(0) && t->stride(0) == 1,
                    "dequantize_rows: scales and offsets must be fp32 [T]");
  STD_TORCH_CHECK(colsum.scalar_type() == ScalarType::Float && colsum.dim() == 1 &&
                  colsum.size(0) == y.size(1) && colsum.stride(0) == 1,
                  "dequantize_rows: colsum must be fp32 [H]");
  is_bf16(out) ? dequantize_rows_impl<uint16_t>(out, y, scales, offsets, colsum)
               : dequantize_rows_impl<float>(out, y, scales, offsets, colsum);
}

}  // namespace conveyor_cpu

STABLE_TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, "
        "int num_heads, int num_kv_heads) -> ()");
  m.def("write_kv(Tensor(a!) kv_cache, Tensor qkv, Tensor slot_mapping, int num_heads, "
        "int num_kv_heads) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("quantize_rows_int8(Tensor(a!) q, Tensor(b!) scales, Tensor(c!) offsets, Tensor x) -> ()");
  m.def("dequantize_rows(Tensor(a!) out, Tensor y, Tensor scales, Tensor offsets, "
        "Tensor colsum) -> ()");
  m.def("argmax_rows(Tensor(a!) tokens, Tensor(b!) finite, Tensor x) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("rms_norm", TORCH_BOX(&conveyor_cpu::rms_norm));
  m.impl("fused_add_rms_norm", TORCH_BOX(&conveyor_cpu::fused_add_rms_norm));
  m.impl("rotary_embedding", TORCH_BOX(&conveyor_cpu::rotary_embedding));
  m.impl("write_kv", TORCH_BOX(&conveyor_cpu::write_kv));
  m.impl("silu_and_mul", TORCH_BOX(&conveyor_cpu::silu_and_mul));
  m.impl("quantize_rows_int8", TORCH_BOX(&conveyor_cpu::quantize_rows_int8));
  m.impl("dequantize_rows", TORCH_BOX(&conveyor_cpu::dequantize_rows));
  m.impl("argmax_rows", TORCH_BOX(&conveyor_cpu::argmax_rows));
}
