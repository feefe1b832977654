// The CUDA twin of the fused step ops: the same math, chunking and noise stream as the Triton
// kernels (kernels/sde.py), written in CUDA C++ to compare the two on a GPU.
//
// Grid (nchunk, B); one block of 256 threads per chunk of kChunk = 4096 elements (16 per
// thread, strided so that a warp's loads coalesce); a fixed warp-shuffle + shared-memory tree
// reduces the chunk to one partial sum, and one block per sample adds its partials in a fixed
// order: results depend on D only, never on the batch size. Compiled with --fmad=false: the
// only fused multiply-adds are the explicit fmaf() calls, which mirror tl.fma in Triton.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../step_math.h"
#include "sde_kernels.h"

namespace sage_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = static_cast<int>(kChunk) / kThreads;  // 16

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Conv<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

// Deterministic block sum (fixed tree for a fixed kThreads).
__device__ __forceinline__ float block_sum(float value, float* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : 0.0f;
  if (warp == 0) {
    for (int offset = 4; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;  // valid in thread 0
}

template <typename T, typename N>
__global__ void rollout_kernel(const T* __restrict__ x, const T* __restrict__ v, const N* __restrict__ noise,
                               const int64_t* __restrict__ rng, const float* __restrict__ coef,
                               T* __restrict__ x_next, float* __restrict__ partials, int64_t batch, int64_t numel) {
  __shared__ float shared[kThreads / 32];
  const int64_t chunk = blockIdx.x, b = blockIdx.y, nchunk = gridDim.x;
  const float a = coef[b], bb = coef[batch + b], c = coef[2 * batch + b];
  uint64_t seed = 0, offset = 0;
  if (noise == nullptr) {
    seed = static_cast<uint64_t>(rng[0]);
    offset = static_cast<uint64_t>(rng[1]);
  }
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t d = chunk * kChunk + j * kThreads + threadIdx.x;
    if (d < numel) {
      const int64_t i = b * numel + d;
      const float mean = fmaf(a, Conv<T>::load(x[i]), __fmul_rn(bb, Conv<T>::load(v[i])));
      const float eps = noise != nullptr ? Conv<N>::load(noise[i]) : philox_normal(seed, offset + static_cast<uint64_t>(i));
      const T stored = Conv<T>::store(fmaf(c, eps, mean));
      x_next[i] = stored;
      const float r = Conv<T>::load(stored) - mean;
      acc += r * r;
    }
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partials[b * nchunk + chunk] = acc;
}

template <typename T>
__global__ void logprob_kernel(const T* __restrict__ x, const T* __restrict__ v, const T* __restrict__ x_next,
                               const T* __restrict__ v_ref, const float* __restrict__ coef, float* __restrict__ part_r,
                               float* __restrict__ part_dv, int64_t batch, int64_t numel) {
  __shared__ float shared[kThreads / 32];
  const int64_t chunk = blockIdx.x, b = blockIdx.y, nchunk = gridDim.x;
  const float a = coef[b], bb = coef[batch + b];
  float acc_r = 0.0f, acc_dv = 0.0f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t d = chunk * kChunk + j * kThreads + threadIdx.x;
    if (d < numel) {
      const int64_t i = b * numel + d;
      const float vi = Conv<T>::load(v[i]);
      const float r = Conv<T>::load(x_next[i]) - fmaf(a, Conv<T>::load(x[i]), __fmul_rn(bb, vi));
      acc_r += r * r;
      if (v_ref != nullptr) {
        const float dv = vi - Conv<T>::load(v_ref[i]);
        acc_dv += dv * dv;
      }
    }
  }
  acc_r = block_sum(acc_r, shared);
  if (threadIdx.x == 0) part_r[b * nchunk + chunk] = acc_r;
  if (v_ref != nullptr) {
    __syncthreads();
    acc_dv = block_sum(acc_dv, shared);
    if (threadIdx.x == 0) part_dv[b * nchunk + chunk] = acc_dv;
  }
}

__global__ void finish_kernel(const float* __restrict__ part_r, const float* __restrict__ part_dv,
                              const float* __restrict__ coef, float* __restrict__ logp, float* __restrict__ kl,
                              float* __restrict__ grad_norm, int64_t batch, int64_t numel, int64_t nchunk,
                              bool gaussian, bool mean) {
  __shared__ float shared[kThreads / 32];
  const int64_t b = blockIdx.x;
  float acc = 0.0f;
  for (int64_t k = threadIdx.x; k < nchunk; k += kThreads) acc += part_r[b * nchunk + k];
  const float sumsq = block_sum(acc, shared);
  const float bb = coef[batch + b], c = coef[2 * batch + b], d = static_cast<float>(numel);
  if (threadIdx.x == 0) finish_logp(sumsq, bb, c, d, gaussian, mean, logp + b, grad_norm + b);
  if (part_dv != nullptr) {
    __syncthreads();
    acc = 0.0f;
    for (int64_t k = threadIdx.x; k < nchunk; k += kThreads) acc += part_dv[b * nchunk + k];
    const float sumsq_dv = block_sum(acc, shared);
    if (threadIdx.x == 0) kl[b] = finish_kl(sumsq_dv, bb, c, d, mean);
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ x, const T* __restrict__ v, const T* __restrict__ x_next,
                                const T* __restrict__ v_ref, const float* __restrict__ coef,
                                const float* __restrict__ grad_logp, const float* __restrict__ grad_kl,
                                T* __restrict__ dv, int64_t batch, int64_t numel, bool gaussian, bool mean) {
  const int64_t chunk = blockIdx.x, b = blockIdx.y;
  const float a = coef[b], bb = coef[batch + b], c = coef[2 * batch + b], d = static_cast<float>(numel);
  const float g_r = grad_logp[b] * grad_coef_r(bb, c, d, gaussian, mean);
  const float g_k = v_ref != nullptr ? grad_kl[b] * grad_coef_kl(bb, c, d, mean) : 0.0f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t e = chunk * kChunk + j * kThreads + threadIdx.x;
    if (e < numel) {
      const int64_t i = b * numel + e;
      const float vi = Conv<T>::load(v[i]);
      const float r = Conv<T>::load(x_next[i]) - fmaf(a, Conv<T>::load(x[i]), __fmul_rn(bb, vi));
      float grad = g_r * r;
      if (v_ref != nullptr) grad += g_k * (vi - Conv<T>::load(v_ref[i]));
      dv[i] = Conv<T>::store(grad);
    }
  }
}

dim3 chunk_grid(int64_t batch, int64_t numel) { return dim3(static_cast<unsigned>((numel + kChunk - 1) / kChunk), static_cast<unsigned>(batch)); }

template <typename T>
cudaError_t rollout_typed(const void* x, const void* v, const void* noise, bool noise_is_float, const int64_t* rng,
                          const float* coef, void* x_next, float* partials, int64_t batch, int64_t numel,
                          cudaStream_t stream) {
  const dim3 grid = chunk_grid(batch, numel);
  if (noise != nullptr && noise_is_float) {
    rollout_kernel<T, float><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(v),
                                                            static_cast<const float*>(noise), rng, coef,
                                                            static_cast<T*>(x_next), partials, batch, numel);
  } else {
    rollout_kernel<T, T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(v),
                                                        static_cast<const T*>(noise), rng, coef,
                                                        static_cast<T*>(x_next), partials, batch, numel);
  }
  return cudaGetLastError();
}

}  // namespace

#define SF_DISPATCH(dtype, FN, ...)                                   \
  switch (dtype) {                                                    \
    case Dtype::kFloat32:                                             \
      return FN<float>(__VA_ARGS__);                                  \
    case Dtype::kBFloat16:                                            \
      return FN<__nv_bfloat16>(__VA_ARGS__);                          \
    default:                                                          \
      return FN<__half>(__VA_ARGS__);                                 \
  }

cudaError_t launch_rollout(Dtype dtype, const void* x, const void* v, const void* noise, bool noise_is_float,
                           const int64_t* rng, const float* coef, void* x_next, float* partials, int64_t batch,
                           int64_t numel, cudaStream_t stream) {
  SF_DISPATCH(dtype, rollout_typed, x, v, noise, noise_is_float, rng, coef, x_next, partials, batch, numel, stream)
}

namespace {
template <typename T>
cudaError_t logprob_typed(const void* x, const void* v, const void* x_next, const void* v_ref, const float* coef,
                          float* part_r, float* part_dv, int64_t batch, int64_t numel, cudaStream_t stream) {
  logprob_kernel<T><<<chunk_grid(batch, numel), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(v), static_cast<const T*>(x_next), static_cast<const T*>(v_ref),
      coef, part_r, part_dv, batch, numel);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const void* x, const void* v, const void* x_next, const void* v_ref, const float* coef,
                           const float* grad_logp, const float* grad_kl, void* dv, int64_t batch, int64_t numel,
                           bool gaussian, bool mean, cudaStream_t stream) {
  backward_kernel<T><<<chunk_grid(batch, numel), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(v), static_cast<const T*>(x_next), static_cast<const T*>(v_ref),
      coef, grad_logp, grad_kl, static_cast<T*>(dv), batch, numel, gaussian, mean);
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_logprob(Dtype dtype, const void* x, const void* v, const void* x_next, const void* v_ref,
                           const float* coef, float* part_r, float* part_dv, int64_t batch, int64_t numel,
                           cudaStream_t stream) {
  SF_DISPATCH(dtype, logprob_typed, x, v, x_next, v_ref, coef, part_r, part_dv, batch, numel, stream)
}

cudaError_t launch_finish(const float* part_r, const float* part_dv, const float* coef, float* logp, float* kl,
                          float* grad_norm, int64_t batch, int64_t numel, bool gaussian, bool mean,
                          cudaStream_t stream) {
  const int64_t nchunk = (numel + kChunk - 1) / kChunk;
  finish_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(part_r, part_dv, coef, logp, kl, grad_norm,
                                                                       batch, numel, nchunk, gaussian, mean);
  return cudaGetLastError();
}

cudaError_t launch_backward(Dtype dtype, const void* x, const void* v, const void* x_next, const void* v_ref,
                            const float* coef, const float* grad_logp, const float* grad_kl, void* dv, int64_t batch,
                            int64_t numel, bool gaussian, bool mean, cudaStream_t stream) {
  SF_DISPATCH(dtype, backward_typed, x, v, x_next, v_ref, coef, grad_logp, grad_kl, dv, batch, numel, gaussian, mean,
              stream)
}

}  // namespace cuda
}  // namespace sage_fast
