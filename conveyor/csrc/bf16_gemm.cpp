// bf16 linear layers for CPUs with AVX512_BF16: y = x W^T (+ bias), x and y bf16, fp32 sums.
//
// Why not oneDNN: a decode step multiplies a handful of rows by every weight of the model, so
// it is bound by how fast the weights stream from memory, not by arithmetic. oneDNN's prepacked
// bf16 GEMM streamed SmolLM2's 212 MB of layer weights at about 30 GB/s on a 2-core Zen 5
// (7.3 ms a step at 1 row), and its cost stepped up every 6 rows; this kernel streams them at
// about 45 GB/s (4.7 ms), and 6 rows cost about what one does (BENCHMARKS.md, "A bf16 GEMM
// for small batches"). At hundreds of rows the multiply itself bounds both, and they are level
// (0.99 at 512 and 2,000 rows).
//
// Owns the ops:
//   pack_bf16_weight(w [N, K] bf16) -> packed [G, K/2, 32, 2] bf16    G = ceil(N / 32); N is
//       padded with zero columns, K must be even. Group g holds output columns 32g..32g+31; for
//       each pair of input features p it stores 2 vectors of [16 columns][2 features] (128 bytes),
//       so a group is one contiguous stream and one vdpbf16ps multiplies a pair of features of a
//       row by 16 columns.
//   bf16_linear(out [M, N] bf16, x [M, K] bf16, packed, bias [N] fp32|bf16 or empty) -> ()
//   has_bf16_gemm(probe: any CPU tensor) -> bool  whether this build has the kernel (AVX512_BF16)
//
// Invariants:
//   * Sums are fp32 over pairs of exact bf16 products (vdpbf16ps, round to nearest even,
//     denormal inputs read as zero), the bias is added in fp32, and each output is rounded to
//     bf16 once: the result equals an fp32 GEMM of the same bf16 inputs up to summation order
//     and that one rounding (tested against torch). Every path sums a row's pairs in the same
//     order, so a row's output does not depend on the other rows of the call (batch-invariant,
//     bitwise; tested).
//   * Work splits over threads by group (up to 12 rows) or by (pair of groups, 6-row chunk),
//     never two threads on one output, over row tiles whose x slice stays in a core's L2 while
//     the groups stream by: up to 12 rows every weight is read from memory once.
//   * Shapes, dtypes and strides are checked; rows may have any stride, features must be
//     contiguous. Nothing is loaded past x's rows or the packed weight (prefetch hints run 16
//     pairs ahead of a stream and may name addresses past its end; a prefetch never faults).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define CONVEYOR_BF16_GEMM 1
#else
#define CONVEYOR_BF16_GEMM 0
#endif

namespace conveyor_cpu {
namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

constexpr int64_t kGroup = 32;       // output columns of one packed group (2 vectors of 16)
constexpr int64_t kPairElems = kGroup * 2;   // bf16 values per feature pair of a group

#if CONVEYOR_BF16_GEMM
struct Args {
  const uint16_t* x;
  int64_t ldx;          // x row stride (elements)
  const uint16_t* w;    // packed
  int64_t pairs;        // K / 2
  uint16_t* y;
  int64_t ldy;
  int64_t n;            // valid output columns
  const float* bias_f;  // one of the two, or neither
  const uint16_t* bias_h;
};

// Rows row0.. of groups g.. from their fp32 sums: + bias, rounded to bf16 once, stored; columns
// past n are neither read nor stored.
template <int MR, int NB>
inline void store(const Args& a, const __m512 (&acc)[MR][NB], int64_t row0, int64_t g) {
  for (int b = 0; b < NB; ++b) {
    const int64_t c = g * kGroup + b * 16;
    if (c >= a.n) break;
    const int valid = int(std::min<int64_t>(16, a.n - c));
    const __mmask16 mask = valid == 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
    const __m512 bias =
        a.bias_f ? _mm512_maskz_loadu_ps(mask, a.bias_f + c)
        : a.bias_h ? _mm512_castsi512_ps(_mm512_slli_epi32(
                         _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, a.bias_h + c)), 16))
        : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][b], bias));
      _mm256_mask_storeu_epi16(a.y + (row0 + m) * a.ldy + c, mask, (__m256i)h);
    }
  }
}

// MR rows (from row0) x NS groups (from g): 2 * NS vectors of 16 columns, one weight stream per
// group.
template <int MR, int NS, bool PREFETCH>
inline void micro(const Args& a, int64_t row0, int64_t g) {
  constexpr int NB = 2 * NS;
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const uint16_t* ws[NS];
  for (int s = 0; s < NS; ++s) ws[s] = a.w + (g + s) * a.pairs * kPairElems;
  const int32_t* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = reinterpret_cast<const int32_t*>(a.x + (row0 + m) * a.ldx);
  for (int64_t p = 0; p < a.pairs; ++p) {
    __m512bh wv[NB];
    for (int s = 0; s < NS; ++s) {
      const uint16_t* wp = ws[s] + p * kPairElems;
      // the stream ahead (the hardware prefetcher alone lags at 1 row)
      if (PREFETCH)
        _mm_prefetch(reinterpret_cast<const char*>(wp + 16 * kPairElems), _MM_HINT_T0);
      wv[2 * s] = (__m512bh)_mm512_loadu_si512(wp);
      wv[2 * s + 1] = (__m512bh)_mm512_loadu_si512(wp + 32);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xr[m][p]);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], xb, wv[b]);
    }
  }
  store(a, acc, row0, g);
}

// MR rows of x interleaved by feature pair (xp[p * MR + m]) x one group: one pointer for
// every row's broadcast, so 7-12 rows keep their addresses out of general registers.
template <int MR>
inline void micro_xp(const Args& a, const int32_t* xp, int64_t row0, int64_t g) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const uint16_t* w = a.w + g * a.pairs * kPairElems;
  for (int64_t p = 0; p < a.pairs; ++p) {
    const uint16_t* wp = w + p * kPairElems;
    _mm_prefetch(reinterpret_cast<const char*>(wp + 16 * kPairElems), _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
    const int32_t* xq = xp + p * MR;
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xq[m]);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
    }
  }
  store(a, acc, row0, g);
}

void rows_xp(const Args& a, const int32_t* xp, int64_t row0, int64_t count, int64_t g) {
  switch (count) {   // 7..12
    case 7: micro_xp<7>(a, xp, row0, g); break;
    case 8: micro_xp<8>(a, xp, row0, g); break;
    case 9: micro_xp<9>(a, xp, row0, g); break;
    case 10: micro_xp<10>(a, xp, row0, g); break;
    case 11: micro_xp<11>(a, xp, row0, g); break;
    default: micro_xp<12>(a, xp, row0, g); break;
  }
}

// PREFETCH: the weights come from memory (a group's first chunk), not from L2
template <int NS, bool PREFETCH>
inline void rows(const Args& a, int64_t row0, int64_t count, int64_t g) {
  switch (count) {   // 1..6
    case 1: micro<1, NS, PREFETCH>(a, row0, g); break;
    case 2: micro<2, NS, PREFETCH>(a, row0, g); break;
    case 3: micro<3, NS, PREFETCH>(a, row0, g); break;
    case 4: micro<4, NS, PREFETCH>(a, row0, g); break;
    case 5: micro<5, NS, PREFETCH>(a, row0, g); break;
    default: micro<6, NS, PREFETCH>(a, row0, g); break;
  }
}

// Row tiles whose x slice stays in a core's L2 (<= 384 KB). A tile of up to 12 rows splits by
// group (32 columns: fine enough to balance the threads; every weight read once): up to 6 rows
// with one x pointer per row, 7-12 from a copy of x interleaved by feature pair (too many rows
// for a pointer each in general registers). A larger tile splits by (pair of groups, 6-row
// chunk), pair-major, so a pair streams from memory once per tile and its later chunks find it
// in L2.
void run(const Args& a, int64_t M, int64_t groups) {
  const int64_t k = 2 * a.pairs;
  const int64_t tile = std::max<int64_t>(6, (384 * 1024 / (2 * k)) / 6 * 6);
  for (int64_t m0 = 0; m0 < M; m0 += tile) {
    const int64_t m1 = std::min(M, m0 + tile), chunks = (m1 - m0 + 5) / 6;
    if (chunks == 2) {   // 7-12 rows: one pass over the weights, x interleaved by pair
      const int64_t mr = m1 - m0;
      std::vector<int32_t> xp(a.pairs * mr);
      for (int64_t m = 0; m < mr; ++m) {
        const int32_t* xr = reinterpret_cast<const int32_t*>(a.x + (m0 + m) * a.ldx);
        for (int64_t p = 0; p < a.pairs; ++p) xp[p * mr + m] = xr[p];
      }
      torch::stable::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) rows_xp(a, xp.data(), m0, mr, g);
      });
      continue;
    }
    if (chunks == 1) {
      torch::stable::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) rows<1, true>(a, m0, m1 - m0, g);
      });
      continue;
    }
    const int64_t pairs = (groups + 1) / 2;
    torch::stable::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t g = 2 * (u / chunks), r = m0 + (u % chunks) * 6;
        const int64_t count = std::min<int64_t>(6, m1 - r);
        const bool first = u == begin || u % chunks == 0;
        if (g + 1 < groups) first ? rows<2, true>(a, r, count, g) : rows<2, false>(a, r, count, g);
        else first ? rows<1, true>(a, r, count, g) : rows<1, false>(a, r, count, g);
      }
    });
  }
}
#endif

bool is_bf16(const Tensor& t) { return t.scalar_type() == ScalarType::BFloat16; }

}  // namespace

bool has_bf16_gemm(Tensor probe) { (void)probe; return CONVEYOR_BF16_GEMM != 0; }

Tensor pack_bf16_weight(Tensor w) {
  STD_TORCH_CHECK(is_bf16(w) && w.dim() == 2, "pack_bf16_weight: w must be bf16 [N, K]");
  const int64_t n = w.size(0), k = w.size(1);
  STD_TORCH_CHECK(k % 2 == 0 && k > 0 && n > 0, "pack_bf16_weight: K must be even and positive");
  const int64_t groups = (n + kGroup - 1) / kGroup, pairs = k / 2;
  Tensor out = torch::stable::new_zeros(w, {groups, pairs, kGroup, 2});   // padding columns: 0
  uint16_t* dst = static_cast<uint16_t*>(out.mutable_data_ptr());
  const uint16_t* src = static_cast<const uint16_t*>(w.const_data_ptr());
  const int64_t s0 = w.stride(0), s1 = w.stride(1);
  torch::stable::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      uint16_t* col = dst + (c / kGroup) * pairs * kPairElems + (c % kGroup) * 2;
      for (int64_t i = 0; i < k; ++i) col[(i / 2) * kPairElems + (i & 1)] = src[c * s0 + i * s1];
    }
  });
  return out;
}

void bf16_linear(Tensor out, Tensor x, Tensor packed, Tensor bias) {
#if CONVEYOR_BF16_GEMM
  STD_TORCH_CHECK(is_bf16(x) && is_bf16(out) && is_bf16(packed),
                  "bf16_linear: x, out and packed must be bf16");
  STD_TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && packed.dim() == 4 && packed.size(2) == kGroup &&
                  packed.size(3) == 2 && packed.is_contiguous(),
                  "bf16_linear: x [M, K], out [M, N], packed [G, K/2, 32, 2] (pack_bf16_weight)");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), groups = packed.size(0);
  STD_TORCH_CHECK(out.size(0) == M && K == 2 * packed.size(1) && N <= groups * kGroup &&
                  N > (groups - 1) * kGroup, "bf16_linear: shapes do not match the packed weight");
  STD_TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1 && x.stride(0) % 2 == 0,
                  "bf16_linear: x and out need contiguous features (and x an even row stride)");
  Args a{static_cast<const uint16_t*>(x.const_data_ptr()), x.stride(0),
         static_cast<const uint16_t*>(packed.const_data_ptr()), packed.size(1),
         static_cast<uint16_t*>(out.mutable_data_ptr()), out.stride(0), N, nullptr, nullptr};
  if (bias.numel() > 0) {
    STD_TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N && bias.stride(0) == 1 &&
                    (is_bf16(bias) || bias.scalar_type() == ScalarType::Float),
                    "bf16_linear: bias must be fp32 or bf16 [N], contiguous");
    if (is_bf16(bias)) a.bias_h = static_cast<const uint16_t*>(bias.const_data_ptr());
    else a.bias_f = static_cast<const float*>(bias.const_data_ptr());
  }
  if (M > 0) run(a, M, groups);
#else
  (void)out; (void)x; (void)packed; (void)bias;
  STD_TORCH_CHECK(false, "bf16_linear: this build has no AVX512_BF16 kernel (has_bf16_gemm)");
#endif
}

}  // namespace conveyor_cpu

STABLE_TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("has_bf16_gemm(Tensor probe) -> bool");
  m.def("pack_bf16_weight(Tensor w) -> Tensor");
  m.def("bf16_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor bias) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("has_bf16_gemm", TORCH_BOX(&conveyor_cpu::has_bf16_gemm));
  m.impl("pack_bf16_weight", TORCH_BOX(&conveyor_cpu::pack_bf16_weight));
  m.impl("bf16_linear", TORCH_BOX(&conveyor_cpu::bf16_linear));
}
