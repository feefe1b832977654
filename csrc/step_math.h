// Scalar math shared by the CPU op, the CUDA twin and (in spirit) the Triton kernels.
//
// Owns: the Philox noise stream "sage_fast/philox-v1" (kernels/philox.py is its definition),
// the per-sample finishing of log-prob / KL / gradient norm from sums of squares, and the
// gradient coefficients. Header-only, usable from host and device code.
//
//   mean = a*x + b*v;  x_next = mean + c*eps;  r = x_next(as stored) - mean
//   logp = red(-r^2/(2c^2) - log c - log(2pi)/2)  (gaussian)  |  red(-r^2)  (cps); 0 if c == 0
//   kl   = b^2 / (2 (c^2 + 1e-6)) * red((v - v_ref)^2)
//   d logp/dv = coef_r * r,  coef_r = b/c^2 (gaussian) | 2b (cps), / D for `mean`
//   d kl/dv   = coef_kl * (v - v_ref),  coef_kl = b^2/(c^2 + 1e-6), / D for `mean`
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline
#endif

namespace sage_fast {

constexpr int64_t kChunk = 4096;  // elements per partial sum: the same as kernels/reference.py
constexpr float kHalfLog2Pi = 0.9189385332046727f;
constexpr float kKlEps = 1e-6f;

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

SF_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

// Philox4x32-10 (Salmon et al., SC'11), counter (c0, c1, c2, c3), key (k0, k1).
SF_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// One standard normal of stream philox-v1 for 64-bit (seed, counter = offset + linear index).
SF_HD float philox_normal(uint64_t seed, uint64_t counter) {
  const Philox4 out = philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float u1 = (static_cast<float>(out.x0 >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
  const float u2 = (static_cast<float>(out.x1 >> 9) + 0.5f) * 1.1920928955078125e-07f;
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

SF_HD float grad_coef_r(float b, float c, float numel, bool gaussian, bool mean) {
  float coef = gaussian ? b / (c * c) : 2.0f * b;
  return mean ? coef / numel : coef;
}

SF_HD float grad_coef_kl(float b, float c, float numel, bool mean) {
  const float coef = b * b / (c * c + kKlEps);
  return mean ? coef / numel : coef;
}

// logp and |d logp/dv| from sum(r^2); c == 0 marks a deterministic step (both 0).
SF_HD void finish_logp(float sumsq, float b, float c, float numel, bool gaussian, bool mean, float* logp,
                       float* grad_norm) {
  if (!(c > 0.0f)) {
    *logp = 0.0f;
    *grad_norm = 0.0f;
    return;
  }
  if (gaussian) {
    const float quad = sumsq / (2.0f * c * c);
    const float cst = logf(c) + kHalfLog2Pi;
    *logp = mean ? -quad / numel - cst : -quad - numel * cst;
  } else {
    *logp = mean ? -sumsq / numel : -sumsq;
  }
  *grad_norm = fabsf(grad_coef_r(b, c, numel, gaussian, mean)) * sqrtf(sumsq);
}

SF_HD float finish_kl(float sumsq_dv, float b, float c, float numel, bool mean) {
  const float red = mean ? sumsq_dv / numel : sumsq_dv;
  return b * b / (2.0f * (c * c + kKlEps)) * red;
}

}  // namespace sage_fast
