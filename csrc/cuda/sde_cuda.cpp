// Torch glue of the CUDA twin: checks, allocation, stream, and the CUDA registrations of the
// `sage_fast_cpp` ops (schemas in csrc/ops.cpp). Built only with a CUDA torch (CMakeLists.txt).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../op_args.h"
#include "../step_math.h"
#include "sde_kernels.h"

namespace sage_fast {
namespace {

using at::Tensor;

cuda::Dtype to_dtype(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return cuda::Dtype::kFloat32;
    case at::kBFloat16:
      return cuda::Dtype::kBFloat16;
    case at::kHalf:
      return cuda::Dtype::kFloat16;
    default:
      TORCH_CHECK(false, "the CUDA op takes float32, bfloat16 or float16 latents, got ", x.scalar_type());
  }
}

void check_latent(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
}

void check_common(const Tensor& x, const Tensor& coef) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 5 && x.is_contiguous(), "x must be a contiguous CUDA tensor [B, C, T, H, W]");
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 2 && coef.size(0) == 3 && coef.size(1) == x.size(0) &&
                  coef.is_contiguous() && coef.device() == x.device(),
              "coef must be a contiguous float32 [3, B] tensor (rows a, b, c) on x's device");
}

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "CUDA launch failed: ", cudaGetErrorString(err)); }

std::tuple<Tensor, Tensor> sde_step_cuda(const Tensor& x, const Tensor& v, const Tensor& coef,
                                         const c10::optional<Tensor>& noise, const c10::optional<Tensor>& rng,
                                         c10::string_view sde_type, c10::string_view reduction) {
  check_common(x, coef);
  check_latent(v, "v", x);
  const auto [gaussian, mean] = parse_flags(sde_type, reduction);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), numel = x.numel() / batch, nchunk = (numel + kChunk - 1) / kChunk;
  bool noise_is_float = false;
  if (noise.has_value()) {
    check_latent(*noise, "noise", x);
    TORCH_CHECK(noise->scalar_type() == x.scalar_type() || noise->scalar_type() == at::kFloat,
                "noise must have x's dtype or float32");
    noise_is_float = noise->scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  } else {
    TORCH_CHECK(rng.has_value() && rng->scalar_type() == at::kLong && rng->numel() == 2 && rng->device() == x.device() &&
                    rng->is_contiguous(),
                "rng must be a contiguous int64 [2] tensor (seed, offset) on x's device when noise is not given");
  }
  Tensor x_next = at::empty_like(x);
  Tensor partials = at::empty({batch, nchunk}, x.options().dtype(at::kFloat));
  Tensor logp = at::empty({batch}, x.options().dtype(at::kFloat));
  Tensor scratch = at::empty({batch}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::launch_rollout(to_dtype(x), x.data_ptr(), v.data_ptr(),
                                    noise.has_value() ? noise->data_ptr() : nullptr, noise_is_float,
                                    noise.has_value() ? nullptr : rng->data_ptr<int64_t>(), coef.data_ptr<float>(),
                                    x_next.data_ptr(), partials.data_ptr<float>(), batch, numel, stream));
  check_launch(cuda::launch_finish(partials.data_ptr<float>(), nullptr, coef.data_ptr<float>(), logp.data_ptr<float>(),
                                   nullptr, scratch.data_ptr<float>(), batch, numel, gaussian, mean, stream));
  return {x_next, logp};
}

std::tuple<Tensor, Tensor, Tensor> sde_logprob_cuda(const Tensor& x, const Tensor& v, const Tensor& x_next,
                                                    const Tensor& coef, const c10::optional<Tensor>& v_ref,
                                                    c10::string_view sde_type, c10::string_view reduction) {
  check_common(x, coef);
  check_latent(v, "v", x);
  check_latent(x_next, "x_next", x);
  if (v_ref.has_value()) check_latent(*v_ref, "v_ref", x);
  const auto [gaussian, mean] = parse_flags(sde_type, reduction);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), numel = x.numel() / batch, nchunk = (numel + kChunk - 1) / kChunk;
  Tensor part_r = at::empty({batch, nchunk}, x.options().dtype(at::kFloat));
  Tensor part_dv = v_ref.has_value() ? at::empty({batch, nchunk}, x.options().dtype(at::kFloat)) : Tensor();
  Tensor logp = at::empty({batch}, x.options().dtype(at::kFloat));
  Tensor kl = at::zeros({batch}, x.options().dtype(at::kFloat));
  Tensor grad_norm = at::empty({batch}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* dv_parts = v_ref.has_value() ? part_dv.data_ptr<float>() : nullptr;
  check_launch(cuda::launch_logprob(to_dtype(x), x.data_ptr(), v.data_ptr(), x_next.data_ptr(),
                                    v_ref.has_value() ? v_ref->data_ptr() : nullptr, coef.data_ptr<float>(),
                                    part_r.data_ptr<float>(), dv_parts, batch, numel, stream));
  check_launch(cuda::launch_finish(part_r.data_ptr<float>(), dv_parts, coef.data_ptr<float>(), logp.data_ptr<float>(),
                                   kl.data_ptr<float>(), grad_norm.data_ptr<float>(), batch, numel, gaussian, mean,
                                   stream));
  return {logp, kl, grad_norm};
}

Tensor sde_logprob_backward_cuda(const Tensor& x, const Tensor& v, const Tensor& x_next, const Tensor& coef,
                                 const c10::optional<Tensor>& v_ref, const Tensor& grad_logp, const Tensor& grad_kl,
                                 c10::string_view sde_type, c10::string_view reduction) {
  check_common(x, coef);
  check_latent(v, "v", x);
  check_latent(x_next, "x_next", x);
  if (v_ref.has_value()) check_latent(*v_ref, "v_ref", x);
  const auto [gaussian, mean] = parse_flags(sde_type, reduction);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor gl = grad_logp.to(at::kFloat).contiguous(), gk = grad_kl.to(at::kFloat).contiguous();
  const int64_t batch = x.size(0), numel = x.numel() / batch;
  Tensor dv = at::empty_like(v);
  check_launch(cuda::launch_backward(to_dtype(x), x.data_ptr(), v.data_ptr(), x_next.data_ptr(),
                                     v_ref.has_value() ? v_ref->data_ptr() : nullptr, coef.data_ptr<float>(),
                                     gl.data_ptr<float>(), gk.data_ptr<float>(), dv.data_ptr(), batch, numel, gaussian,
                                     mean, c10::cuda::getCurrentCUDAStream()));
  return dv;
}

}  // namespace
}  // namespace sage_fast

TORCH_LIBRARY_IMPL(sage_fast_cpp, CUDA, m) {
  m.impl("sde_step", &sage_fast::sde_step_cuda);
  m.impl("sde_logprob", &sage_fast::sde_logprob_cuda);
  m.impl("sde_logprob_backward", &sage_fast::sde_logprob_backward_cuda);
}
