// Launchers of the CUDA twin's kernels: raw pointers and a stream, no torch types, so this
// file and sde_kernels.cu compile with nvcc alone (the compile-only check of the tests).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sage_fast {
namespace cuda {

enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// x_next and per-chunk sums of r^2 ([B, nchunk]); noise (same dtype as x, or float32 when
// noise_is_float) or, when noise == nullptr, Philox noise from rng = device int64 [2].
cudaError_t launch_rollout(Dtype dtype, const void* x, const void* v, const void* noise, bool noise_is_float,
                           const int64_t* rng, const float* coef, void* x_next, float* partials, int64_t batch,
                           int64_t numel, cudaStream_t stream);

// per-chunk sums of r^2 and (if v_ref) of (v - v_ref)^2.
cudaError_t launch_logprob(Dtype dtype, const void* x, const void* v, const void* x_next, const void* v_ref,
                           const float* coef, float* part_r, float* part_dv, int64_t batch, int64_t numel,
                           cudaStream_t stream);

// logp / grad_norm (and kl when part_dv != nullptr) per sample from the partial sums.
cudaError_t launch_finish(const float* part_r, const float* part_dv, const float* coef, float* logp, float* kl,
                          float* grad_norm, int64_t batch, int64_t numel, bool gaussian, bool mean,
                          cudaStream_t stream);

cudaError_t launch_backward(Dtype dtype, const void* x, const void* v, const void* x_next, const void* v_ref,
                            const float* coef, const float* grad_logp, const float* grad_kl, void* dv, int64_t batch,
                            int64_t numel, bool gaussian, bool mean, cudaStream_t stream);

}  // namespace cuda
}  // namespace sage_fast
