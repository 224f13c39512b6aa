// 2^f for f in [-0.5, 0.5] by a degree-6 polynomial (relative error ~1e-7), for float or a GCC
// vector of floats. Shared by the attention kernel's softmax (exp2v) and SwiGLU's sigmoid; the
// callers split x into round(x) + f and scale by 2^round(x) through the exponent bits.
#pragma once

template <typename T>
inline T exp2_fraction(T f) {
  T p = f * 1.5403530e-4f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  return p * f + 1.0f;
}
