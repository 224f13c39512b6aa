// fp32 linear layers for AVX2 CPUs: y = x W^T (+ bias), x, W and y fp32.
//
// Why not oneDNN: on an AVX2 CPU (Zen 1-3, Intel client parts) the default dtype is fp32, and a
// decode step streams SmolLM2's 425 MB of fp32 layer weights for a handful of rows. oneDNN's
// prepacked fp32 GEMM (capped at AVX2 on a Zen 5) took 17 ms for them at 1 row and 21 ms at 6;
// this kernel 12 and 13 ms: up to 6 rows share one pass over the weights at the memory's pace.
// From 7 rows the multiply-adds bound both, and they are level from 32 rows on (0.99-1.05;
// BENCHMARKS.md, "An fp32 GEMM for AVX2 CPUs"). With AVX-512 oneDNN's wider FMAs win beyond 6
// rows, so ``platform`` keeps oneDNN there.
//
// Owns the ops:
//   pack_fp32_weight(w [N, K] fp32) -> packed [G, K, 16] fp32    G = ceil(N / 16); N is padded
//       with zero columns. Group g holds output columns 16g..16g+15 for every input feature in
//       order: one contiguous stream of 64 bytes per feature.
//   fp32_linear(out [M, N] fp32, x [M, K] fp32, packed, bias [N] fp32 or empty) -> ()
//   has_fp32_gemm(probe: any CPU tensor) -> bool   whether this build has the kernel (AVX2+FMA)
//
// Invariants:
//   * Each output is one fp32 sum over the features in order (fused multiply-adds), plus the
//     bias: equal to an fp32 GEMM up to summation order (tested against torch). Every path sums
//     a row in the same order, so a row's output does not depend on the call's other rows
//     (batch-invariant, bitwise; tested).
//   * Micro-tile: up to 6 rows x 16 columns, 12 accumulators of 8 floats, so it fits AVX2's 16
//     vector registers with the two weight vectors and a broadcast.
//   * Work splits over threads by group, over row tiles whose x slice stays in a core's L2; a
//     group runs in blocks of 256 features (16 KB of weights) through each 6-row chunk of the
//     tile, so its later chunks find the block in L1. Never two threads on one output.
//   * Shapes, dtypes and strides are checked; rows may have any stride, features must be
//     contiguous. Nothing is loaded past x's rows or the packed weight (prefetch hints may name
//     addresses past a stream's end; a prefetch never faults).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CONVEYOR_FP32_GEMM 1
#else
#define CONVEYOR_FP32_GEMM 0
#endif

namespace conveyor_cpu {
namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

constexpr int64_t kCols = 16;   // output columns of one packed group (2 vectors of 8)
constexpr int64_t kChunk = 6;   // rows of one micro-tile
constexpr int64_t kBlock = 256; // features per block of a group (16 KB of weights: in L1)

#if CONVEYOR_FP32_GEMM
struct Args {
  const float* x;
  int64_t ldx;         // x row stride (elements)
  const float* w;      // packed
  int64_t k;
  float* y;
  int64_t ldy;
  int64_t n;           // valid output columns
  const float* bias;   // or null
};

// The tile's rows row0.. x group g over features [k0, k1): sums start from 0 at k0 == 0, else
// from the partial sums left in y; at k1 == K the bias is added. Storing an fp32 partial sum and
// loading it back is exact, so a row's sum is the same as in one pass. The row loops are
// unrolled by pragma: without it GCC keeps `acc` in memory and stores it every feature.
template <int MR, bool PREFETCH>
inline void micro(const Args& a, int64_t row0, int64_t g, int64_t k0, int64_t k1) {
  const int64_t c = g * kCols, valid = std::min<int64_t>(kCols, a.n - c);
  alignas(32) float tmp[kCols] = {};
  __m256 acc[MR][2];
  _Pragma("GCC unroll 16") for (int m = 0; m < MR; ++m) {
    float* dst = a.y + (row0 + m) * a.ldy + c;
    if (k0 == 0) {
      acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    } else if (valid == kCols) {
      acc[m][0] = _mm256_loadu_ps(dst);
      acc[m][1] = _mm256_loadu_ps(dst + 8);
    } else {   // the last group: only its valid columns exist in y
      std::memcpy(tmp, dst, sizeof(float) * valid);
      acc[m][0] = _mm256_load_ps(tmp);
      acc[m][1] = _mm256_load_ps(tmp + 8);
    }
  }
  const float* w = a.w + g * a.k * kCols;
  const float* xr[MR];
  _Pragma("GCC unroll 16") for (int m = 0; m < MR; ++m) xr[m] = a.x + (row0 + m) * a.ldx;
  for (int64_t i = k0; i < k1; ++i) {
    const float* wp = w + i * kCols;
    if (PREFETCH) _mm_prefetch(reinterpret_cast<const char*>(wp + 16 * kCols), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(wp), w1 = _mm256_loadu_ps(wp + 8);
    _Pragma("GCC unroll 16") for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_broadcast_ss(xr[m] + i);
      acc[m][0] = _mm256_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(xb, w1, acc[m][1]);
    }
  }
  alignas(32) float bias[kCols] = {};
  if (a.bias && k1 == a.k) std::memcpy(bias, a.bias + c, sizeof(float) * valid);
  const __m256 b0 = _mm256_load_ps(bias), b1 = _mm256_load_ps(bias + 8);
  _Pragma("GCC unroll 16") for (int m = 0; m < MR; ++m) {
    float* dst = a.y + (row0 + m) * a.ldy + c;
    const __m256 v0 = k1 == a.k ? _mm256_add_ps(acc[m][0], b0) : acc[m][0];
    const __m256 v1 = k1 == a.k ? _mm256_add_ps(acc[m][1], b1) : acc[m][1];
    if (valid == kCols) {
      _mm256_storeu_ps(dst, v0);
      _mm256_storeu_ps(dst + 8, v1);
    } else {
      _mm256_store_ps(tmp, v0);
      _mm256_store_ps(tmp + 8, v1);
      std::memcpy(dst, tmp, sizeof(float) * valid);
    }
  }
}

template <bool PREFETCH>
void rows(const Args& a, int64_t row0, int64_t count, int64_t g, int64_t k0, int64_t k1) {
  switch (count) {   // 1..6
    case 1: micro<1, PREFETCH>(a, row0, g, k0, k1); break;
    case 2: micro<2, PREFETCH>(a, row0, g, k0, k1); break;
    case 3: micro<3, PREFETCH>(a, row0, g, k0, k1); break;
    case 4: micro<4, PREFETCH>(a, row0, g, k0, k1); break;
    case 5: micro<5, PREFETCH>(a, row0, g, k0, k1); break;
    default: micro<6, PREFETCH>(a, row0, g, k0, k1); break;
  }
}

// Row tiles whose x slice stays in a core's L2 (<= 256 KB). Threads split a tile by group; a
// group runs block by block of kBlock features (16 KB of its weights, which stay in L1), each
// block through every 6-row chunk of the tile: the first chunk streams the block from memory
// (prefetching), the others find it in L1.
void run(const Args& a, int64_t M, int64_t groups) {
  const int64_t tile = std::max<int64_t>(kChunk, (256 * 1024 / (4 * a.k)) / kChunk * kChunk);
  for (int64_t m0 = 0; m0 < M; m0 += tile) {
    const int64_t m1 = std::min(M, m0 + tile);
    torch::stable::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g)
        for (int64_t k0 = 0; k0 < a.k; k0 += kBlock) {
          const int64_t k1 = std::min(a.k, k0 + kBlock);
          for (int64_t r = m0; r < m1; r += kChunk) {
            const int64_t count = std::min<int64_t>(kChunk, m1 - r);
            if (r == m0) rows<true>(a, r, count, g, k0, k1);
            else rows<false>(a, r, count, g, k0, k1);
          }
        }
    });
  }
}
#endif

bool is_fp32(const Tensor& t) { return t.scalar_type() == ScalarType::Float; }

}  // namespace

bool has_fp32_gemm(Tensor probe) { (void)probe; return CONVEYOR_FP32_GEMM != 0; }

Tensor pack_fp32_weight(Tensor w) {
  STD_TORCH_CHECK(is_fp32(w) && w.dim() == 2, "pack_fp32_weight: w must be fp32 [N, K]");
  const int64_t n = w.size(0), k = w.size(1);
  STD_TORCH_CHECK(k > 0 && n > 0, "pack_fp32_weight: N and K must be positive");
  const int64_t groups = (n + kCols - 1) / kCols;
  Tensor out = torch::stable::new_zeros(w, {groups, k, kCols});   // padding columns: 0
  float* dst = static_cast<float*>(out.mutable_data_ptr());
  const float* src = static_cast<const float*>(w.const_data_ptr());
  const int64_t s0 = w.stride(0), s1 = w.stride(1);
  torch::stable::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float* col = dst + (c / kCols) * k * kCols + (c % kCols);
      for (int64_t i = 0; i < k; ++i) col[i * kCols] = src[c * s0 + i * s1];
    }
  });
  return out;
}

void fp32_linear(Tensor out, Tensor x, Tensor packed, Tensor bias) {
#if CONVEYOR_FP32_GEMM
  STD_TORCH_CHECK(is_fp32(x) && is_fp32(out) && is_fp32(packed),
                  "fp32_linear: x, out and packed must be fp32");
  STD_TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && packed.dim() == 3 &&
                  packed.size(2) == kCols && packed.is_contiguous(),
                  "fp32_linear: x [M, K], out [M, N], packed [G, K, 16] (pack_fp32_weight)");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), groups = packed.size(0);
  STD_TORCH_CHECK(out.size(0) == M && K == packed.size(1) && N <= groups * kCols &&
                  N > (groups - 1) * kCols, "fp32_linear: shapes do not match the packed weight");
  STD_TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1,
                  "fp32_linear: x and out need contiguous features");
  Args a{static_cast<const float*>(x.const_data_ptr()), x.stride(0),
         static_cast<const float*>(packed.const_data_ptr()), K,
         static_cast<float*>(out.mutable_data_ptr()), out.stride(0), N, nullptr};
  if (bias.numel() > 0) {
    STD_TORCH_CHECK(is_fp32(bias) && bias.dim() == 1 && bias.size(0) == N && bias.stride(0) == 1,
                    "fp32_linear: bias must be fp32 [N], contiguous");
    a.bias = static_cast<const float*>(bias.const_data_ptr());
  }
  if (M > 0) run(a, M, groups);
#else
  (void)out; (void)x; (void)packed; (void)bias;
  STD_TORCH_CHECK(false, "fp32_linear: this build has no AVX2+FMA kernel (has_fp32_gemm)");
#endif
}

}  // namespace conveyor_cpu

STABLE_TORCH_LIBRARY_FRAGMENT(conveyor_cpu, m) {
  m.def("has_fp32_gemm(Tensor probe) -> bool");
  m.def("pack_fp32_weight(Tensor w) -> Tensor");
  m.def("fp32_linear(Tensor(a!) out, Tensor x, Tensor packed, Tensor bias) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(conveyor_cpu, CPU, m) {
  m.impl("has_fp32_gemm", TORCH_BOX(&conveyor_cpu::has_fp32_gemm));
  m.impl("pack_fp32_weight", TORCH_BOX(&conveyor_cpu::pack_fp32_weight));
  m.impl("fp32_linear", TORCH_BOX(&conveyor_cpu::fp32_linear));
}
