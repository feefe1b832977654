// Fused SDE step ops on the CPU: the engine's fast path where Triton cannot run natively.
//
// Same math and the same summation structure as kernels/sde.py (see csrc/step_math.h): the
// latent of each sample is cut into chunks of kChunk = 4096 elements; each chunk is reduced
// by one thread into 16 float lanes (element i of the chunk goes to lane i % 16, lanes added
// in a fixed tree), and the chunk sums of a sample are added in chunk order in double. Which
// thread takes which chunk does not matter, so results are bitwise identical for any thread
// count and batch size, and the rollout and the training forward of one transition agree
// bitwise. Built with -ffp-contract=off so the compiler cannot fuse `a*x + b*v` differently
// in the two ops.
//
// Passes over memory: rollout reads x, v (and noise unless generated) and writes x_next;
// training forward reads x, v, x_next (and v_ref); backward reads the same and writes d/dv.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "../op_args.h"
#include "../step_math.h"

namespace sage_fast {
namespace {

using at::Tensor;
constexpr int kLanes = 16;

template <typename T>
inline float to_f(T value) {
  return static_cast<float>(value);
}

inline float lane_sum(float* acc) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

void check_latent(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU op, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
}

void check_common(const Tensor& x, const Tensor& coef) {
  TORCH_CHECK(x.dim() == 5, "x must have shape [B, C, T, H, W], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "the C++ op takes float32, bfloat16 or float16 latents, got ", x.scalar_type());
  check_latent(x, "x", x);
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 2 && coef.size(0) == 3 && coef.size(1) == x.size(0) &&
                  coef.is_contiguous() && coef.device().is_cpu(),
              "coef must be a contiguous float32 CPU tensor [3, B] (rows a, b, c)");
}

// ---------------------------------------------------------------------------------------------
// per-chunk loops
// ---------------------------------------------------------------------------------------------

template <typename T, typename N, bool kPhilox>
float rollout_chunk(const T* __restrict x, const T* __restrict v, const N* __restrict noise, T* __restrict x_next,
                    int64_t n, float a, float b, float c, uint64_t seed, uint64_t counter0) {
  float acc[kLanes] = {};
  for (int64_t base = 0; base < n; base += kLanes) {
    const int m = static_cast<int>(std::min<int64_t>(kLanes, n - base));
    for (int l = 0; l < m; ++l) {
      const int64_t i = base + l;
      const float mean = a * to_f(x[i]) + b * to_f(v[i]);
      const float eps = kPhilox ? philox_normal(seed, counter0 + static_cast<uint64_t>(i)) : to_f(noise[i]);
      const T stored = static_cast<T>(mean + c * eps);
      x_next[i] = stored;
      const float r = to_f(stored) - mean;
      acc[l] += r * r;
    }
  }
  return lane_sum(acc);
}

template <typename T, bool kRef>
void logprob_chunk(const T* __restrict x, const T* __restrict v, const T* __restrict x_next,
                   const T* __restrict v_ref, int64_t n, float a, float b, float* sumsq_r, float* sumsq_dv) {
  float acc_r[kLanes] = {};
  float acc_dv[kLanes] = {};
  for (int64_t base = 0; base < n; base += kLanes) {
    const int m = static_cast<int>(std::min<int64_t>(kLanes, n - base));
    for (int l = 0; l < m; ++l) {
      const int64_t i = base + l;
      const float vi = to_f(v[i]);
      const float r = to_f(x_next[i]) - (a * to_f(x[i]) + b * vi);
      acc_r[l] += r * r;
      if (kRef) {
        const float dv = vi - to_f(v_ref[i]);
        acc_dv[l] += dv * dv;
      }
    }
  }
  *sumsq_r = lane_sum(acc_r);
  *sumsq_dv = kRef ? lane_sum(acc_dv) : 0.0f;
}

template <typename T, bool kRef>
void backward_chunk(const T* __restrict x, const T* __restrict v, const T* __restrict x_next,
                    const T* __restrict v_ref, T* __restrict dv, int64_t n, float a, float b, float g_r, float g_kl) {
  for (int64_t i = 0; i < n; ++i) {
    const float vi = to_f(v[i]);
    const float r = to_f(x_next[i]) - (a * to_f(x[i]) + b * vi);
    float grad = g_r * r;
    if (kRef) grad += g_kl * (vi - to_f(v_ref[i]));
    dv[i] = static_cast<T>(grad);
  }
}

// Sum of a sample's chunk partials in chunk order, in double.
float sum_partials(const float* partials, int64_t nchunk) {
  double total = 0.0;
  for (int64_t k = 0; k < nchunk; ++k) total += partials[k];
  return static_cast<float>(total);
}

// Runs fn(b, k, begin, count) over every (sample, chunk) pair, in parallel over pairs.
template <typename Fn>
void for_each_chunk(int64_t batch, int64_t numel, Fn fn) {
  const int64_t nchunk = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, batch * nchunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nchunk, k = item % nchunk;
      const int64_t start = k * kChunk;
      fn(b, k, b * numel + start, std::min<int64_t>(kChunk, numel - start));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------

template <typename T, typename N>
void rollout_impl(const Tensor& x, const Tensor& v, const c10::optional<Tensor>& noise, uint64_t seed,
                  uint64_t offset, const Tensor& coef, Tensor& x_next, Tensor& partials) {
  const int64_t batch = x.size(0), numel = x.numel() / batch, nchunk = partials.size(1);
  const T* xp = x.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const N* np = noise.has_value() ? noise->data_ptr<N>() : nullptr;
  T* xnp = x_next.data_ptr<T>();
  const float* cf = coef.data_ptr<float>();
  float* part = partials.data_ptr<float>();
  for_each_chunk(batch, numel, [&](int64_t b, int64_t k, int64_t begin, int64_t count) {
    const float a = cf[b], bb = cf[batch + b], c = cf[2 * batch + b];
    part[b * nchunk + k] =
        np ? rollout_chunk<T, N, false>(xp + begin, vp + begin, np + begin, xnp + begin, count, a, bb, c, 0, 0)
           : rollout_chunk<T, N, true>(xp + begin, vp + begin, nullptr, xnp + begin, count, a, bb, c, seed,
                                       offset + static_cast<uint64_t>(begin));
  });
}

std::tuple<Tensor, Tensor> sde_step_cpu(const Tensor& x, const Tensor& v, const Tensor& coef,
                                        const c10::optional<Tensor>& noise, const c10::optional<Tensor>& rng,
                                        c10::string_view sde_type, c10::string_view reduction) {
  check_common(x, coef);
  check_latent(v, "v", x);
  TORCH_CHECK(v.scalar_type() == x.scalar_type(), "v must have x's dtype");
  const StepFlags flags = parse_flags(sde_type, reduction);
  uint64_t seed = 0, offset = 0;
  if (noise.has_value()) {
    check_latent(*noise, "noise", x);
    TORCH_CHECK(noise->scalar_type() == x.scalar_type() || noise->scalar_type() == at::kFloat,
                "noise must have x's dtype or float32, got ", noise->scalar_type());
  } else {
    TORCH_CHECK(rng.has_value() && rng->scalar_type() == at::kLong && rng->numel() == 2 && rng->device().is_cpu(),
                "rng must be an int64 CPU tensor [2] (seed, offset) when noise is not given");
    const Tensor r = rng->contiguous();
    seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
    offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
  }
  const int64_t batch = x.size(0), numel = x.numel() / batch;
  const int64_t nchunk = (numel + kChunk - 1) / kChunk;
  Tensor x_next = at::empty_like(x);
  Tensor partials = at::empty({batch, nchunk}, x.options().dtype(at::kFloat));
  const bool float_noise = noise.has_value() && noise->scalar_type() == at::kFloat;
  switch (x.scalar_type()) {
    case at::kFloat:
      rollout_impl<float, float>(x, v, noise, seed, offset, coef, x_next, partials);
      break;
    case at::kBFloat16:
      if (float_noise) {
        rollout_impl<c10::BFloat16, float>(x, v, noise, seed, offset, coef, x_next, partials);
      } else {
        rollout_impl<c10::BFloat16, c10::BFloat16>(x, v, noise, seed, offset, coef, x_next, partials);
      }
      break;
    default:
      if (float_noise) {
        rollout_impl<c10::Half, float>(x, v, noise, seed, offset, coef, x_next, partials);
      } else {
        rollout_impl<c10::Half, c10::Half>(x, v, noise, seed, offset, coef, x_next, partials);
      }
  }
  Tensor logp = at::empty({batch}, x.options().dtype(at::kFloat));
  const float* cf = coef.data_ptr<float>();
  const float* part = partials.data_ptr<float>();
  float* lp = logp.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    float unused_norm;
    finish_logp(sum_partials(part + b * nchunk, nchunk), cf[batch + b], cf[2 * batch + b],
                static_cast<float>(numel), flags.gaussian, flags.mean, lp + b, &unused_norm);
  }
  return {x_next, logp};
}

template <typename T>
void logprob_impl(const Tensor& x, const Tensor& v, const Tensor& x_next, const c10::optional<Tensor>& v_ref,
                  const Tensor& coef, Tensor& part_r, Tensor& part_dv) {
  const int64_t batch = x.size(0), numel = x.numel() / batch, nchunk = part_r.size(1);
  const T *xp = x.data_ptr<T>(), *vp = v.data_ptr<T>(), *xnp = x_next.data_ptr<T>();
  const T* rp = v_ref.has_value() ? v_ref->data_ptr<T>() : nullptr;
  const float* cf = coef.data_ptr<float>();
  float *pr = part_r.data_ptr<float>(), *pd = part_dv.data_ptr<float>();
  for_each_chunk(batch, numel, [&](int64_t b, int64_t k, int64_t begin, int64_t count) {
    const float a = cf[b], bb = cf[batch + b];
    const int64_t slot = b * nchunk + k;
    if (rp) {
      logprob_chunk<T, true>(xp + begin, vp + begin, xnp + begin, rp + begin, count, a, bb, pr + slot, pd + slot);
    } else {
      logprob_chunk<T, false>(xp + begin, vp + begin, xnp + begin, nullptr, count, a, bb, pr + slot, pd + slot);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> sde_logprob_cpu(const Tensor& x, const Tensor& v, const Tensor& x_next,
                                                   const Tensor& coef, const c10::optional<Tensor>& v_ref,
                                                   c10::string_view sde_type, c10::string_view reduction) {
  check_common(x, coef);
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&v, "v"}, {&x_next, "x_next"}}) {
    check_latent(*t, name, x);
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), name, " must have x's dtype");
  }
  if (v_ref.has_value()) {
    check_latent(*v_ref, "v_ref", x);
    TORCH_CHECK(v_ref->scalar_type() == x.scalar_type(), "v_ref must have x's dtype");
  }
  const StepFlags flags = parse_flags(sde_type, reduction);
  const int64_t batch = x.size(0), numel = x.numel() / batch;
  const int64_t nchunk = (numel + kChunk - 1) / kChunk;
  Tensor part_r = at::empty({batch, nchunk}, x.options().dtype(at::kFloat));
  Tensor part_dv = at::empty({batch, nchunk}, x.options().dtype(at::kFloat));
  switch (x.scalar_type()) {
    case at::kFloat:
      logprob_impl<float>(x, v, x_next, v_ref, coef, part_r, part_dv);
      break;
    case at::kBFloat16:
      logprob_impl<c10::BFloat16>(x, v, x_next, v_ref, coef, part_r, part_dv);
      break;
    default:
      logprob_impl<c10::Half>(x, v, x_next, v_ref, coef, part_r, part_dv);
  }
  Tensor logp = at::empty({batch}, x.options().dtype(at::kFloat));
  Tensor kl = at::zeros({batch}, x.options().dtype(at::kFloat));
  Tensor grad_norm = at::empty({batch}, x.options().dtype(at::kFloat));
  const float* cf = coef.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    const float bb = cf[batch + b], c = cf[2 * batch + b];
    finish_logp(sum_partials(part_r.data_ptr<float>() + b * nchunk, nchunk), bb, c, static_cast<float>(numel),
                flags.gaussian, flags.mean, logp.data_ptr<float>() + b, grad_norm.data_ptr<float>() + b);
    if (v_ref.has_value()) {
      kl.data_ptr<float>()[b] = finish_kl(sum_partials(part_dv.data_ptr<float>() + b * nchunk, nchunk), bb, c,
                                          static_cast<float>(numel), flags.mean);
    }
  }
  return {logp, kl, grad_norm};
}

template <typename T>
void backward_impl(const Tensor& x, const Tensor& v, const Tensor& x_next, const c10::optional<Tensor>& v_ref,
                   const Tensor& coef, const Tensor& g_logp, const Tensor& g_kl, StepFlags flags, Tensor& dv) {
  const int64_t batch = x.size(0), numel = x.numel() / batch;
  const T *xp = x.data_ptr<T>(), *vp = v.data_ptr<T>(), *xnp = x_next.data_ptr<T>();
  const T* rp = v_ref.has_value() ? v_ref->data_ptr<T>() : nullptr;
  T* dp = dv.data_ptr<T>();
  const float *cf = coef.data_ptr<float>(), *gl = g_logp.data_ptr<float>(), *gk = g_kl.data_ptr<float>();
  for_each_chunk(batch, numel, [&](int64_t b, int64_t /*k*/, int64_t begin, int64_t count) {
    const float a = cf[b], bb = cf[batch + b], c = cf[2 * batch + b];
    const float d = static_cast<float>(numel);
    const float g_r = gl[b] * grad_coef_r(bb, c, d, flags.gaussian, flags.mean);
    if (rp) {
      const float g_k = gk[b] * grad_coef_kl(bb, c, d, flags.mean);
      backward_chunk<T, true>(xp + begin, vp + begin, xnp + begin, rp + begin, dp + begin, count, a, bb, g_r, g_k);
    } else {
      backward_chunk<T, false>(xp + begin, vp + begin, xnp + begin, nullptr, dp + begin, count, a, bb, g_r, 0.0f);
    }
  });
}

Tensor sde_logprob_backward_cpu(const Tensor& x, const Tensor& v, const Tensor& x_next, const Tensor& coef,
                                const c10::optional<Tensor>& v_ref, const Tensor& grad_logp, const Tensor& grad_kl,
                                c10::string_view sde_type, c10::string_view reduction) {
  check_common(x, coef);
  check_latent(v, "v", x);
  check_latent(x_next, "x_next", x);
  if (v_ref.has_value()) check_latent(*v_ref, "v_ref", x);
  const StepFlags flags = parse_flags(sde_type, reduction);
  const Tensor gl = grad_logp.to(at::kFloat).contiguous(), gk = grad_kl.to(at::kFloat).contiguous();
  TORCH_CHECK(gl.numel() == x.size(0) && gk.numel() == x.size(0), "grad_logp and grad_kl must have shape [B]");
  Tensor dv = at::empty_like(v);
  switch (x.scalar_type()) {
    case at::kFloat:
      backward_impl<float>(x, v, x_next, v_ref, coef, gl, gk, flags, dv);
      break;
    case at::kBFloat16:
      backward_impl<c10::BFloat16>(x, v, x_next, v_ref, coef, gl, gk, flags, dv);
      break;
    default:
      backward_impl<c10::Half>(x, v, x_next, v_ref, coef, gl, gk, flags, dv);
  }
  return dv;
}

}  // namespace
}  // namespace sage_fast

TORCH_LIBRARY_IMPL(sage_fast_cpp, CPU, m) {
  m.impl("sde_step", &sage_fast::sde_step_cpu);
  m.impl("sde_logprob", &sage_fast::sde_logprob_cpu);
  m.impl("sde_logprob_backward", &sage_fast::sde_logprob_backward_cpu);
}
