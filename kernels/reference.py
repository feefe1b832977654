"""Plain-torch reference of every fused op: the test oracle, the CPU fallback, the bench baseline.

Written straight from docs/SPEC.md sections 2, 3, 4 and 6, with no fusion and no cleverness, so that it
can be read against the math:

    mean   = a * x + b * v                       a, b, c: per-sample scalars [B]
    x_next = mean + c * eps
    r      = x_next - mean                       (x_next as stored, i.e. rounded to x.dtype)
    logp   = red_d( -r^2 / (2 c^2) - log c - 0.5 log(2 pi) )     gaussian types
    logp   = red_d( -r^2 )                                       cps (its authors' convention)
    kl     = b^2 / (2 (c^2 + 1e-6)) * red_d( (v - v_ref)^2 )     anchor KL, equal variances
    |d logp / d v| = |b| / (c^2 D) * sqrt(sum r^2)  (gaussian, mean);  2 |b| / D * sqrt(...) (cps)

with red = mean over the D = C*T*H*W elements of a sample (default) or sum. A sample with
c = 0 (deterministic step) has logp = 0 in the rollout; the training op refuses it.

Precision: math in float32 whatever the latent dtype (float64 when the latents are float64,
which the tests use as the exact baseline). Per-sample sums run over fixed chunks of
`CHUNK` elements and then over the chunk sums, so the order of additions depends on D only,
never on the batch size or the thread count: a rollout's log-prob and the training recompute
of the same transition agree bitwise on this path too.
"""

from __future__ import annotations

import math

import torch

from sage_fast.grpo.schedule import GAUSSIAN_TYPES

from . import validate
from .philox import philox_normal

__all__ = [
    "CHUNK",
    "sde_step",
    "step_math",
    "sde_logprob",
    "logprob_math",
    "sde_logprob_backward",
    "equalizer_update",
    "per_sample_sum",
]

#: Elements per partial sum (the Triton kernels use the same chunking).
CHUNK = 4096
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_KL_EPS = 1e-6


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B] coefficient -> [B, 1, 1, 1, 1] on x's device in the compute dtype."""
    return t.to(device=x.device, dtype=dtype).view(-1, 1, 1, 1, 1)


def per_sample_sum(t_bd: torch.Tensor) -> torch.Tensor:
    """Sum of each row of a [B, ...] tensor in a batch-size-independent order, [B].

    Chunks of CHUNK elements are summed first, then the chunk sums: with at least one output
    per chunk, torch's CPU reduction gives each output to one thread, and a single output never
    spans more than CHUNK < 32768 (its parallel grain) elements, so no row is ever split.
    """
    batch = t_bd.shape[0]
    flat = t_bd.reshape(batch, -1)
    d = flat.shape[1]
    n_full = d // CHUNK
    parts = []
    if n_full:
        parts.append(flat[:, : n_full * CHUNK].reshape(batch, n_full, CHUNK).sum(-1))
    if d % CHUNK:
        parts.append(flat[:, n_full * CHUNK:].sum(-1, keepdim=True))
    return torch.cat(parts, 1).sum(1)


def _finish_logp(sumsq: torch.Tensor, c: torch.Tensor, numel: int, sde_type: str,
                 reduction: str) -> torch.Tensor:
    """Per-sample log-prob from sum(r^2), [B]; 0 where c == 0 (deterministic step)."""
    stochastic = c > 0
    c_safe = torch.where(stochastic, c, torch.ones_like(c))
    if sde_type in GAUSSIAN_TYPES:
        quad = sumsq / (2.0 * c_safe * c_safe)
        const = torch.log(c_safe) + _HALF_LOG_2PI
        logp = -quad / numel - const if reduction == "mean" else -quad - numel * const
    else:  # cps: -red(r^2), no variance and no constants
        logp = -sumsq / numel if reduction == "mean" else -sumsq
    return torch.where(stochastic, logp, torch.zeros_like(logp))


def _grad_coefficients(b, c, numel: int, sde_type: str, reduction: str):
    """d logp / d v = coef_r * r and d kl / d v = coef_kl * (v - v_ref), per sample [B]."""
    norm = numel if reduction == "mean" else 1
    if sde_type in GAUSSIAN_TYPES:
        coef_r = b / (c * c) / norm
    else:
        coef_r = 2.0 * b / norm
    coef_kl = b * b / (c * c + _KL_EPS) / norm
    return coef_r, coef_kl


def sde_step(x, v, a, b, c, *, sde_type, noise=None, seed=None, offset=0, reduction="mean"):
    """One rollout step: (x_next [B,C,T,H,W] in x.dtype, logp [B] float32).

    Noise is `noise` (a tensor like x) or generated from (seed, offset) with the engine's
    Philox stream (`philox.py`), element j of the batch at counter offset + j.
    """
    validate.check_step_args(x, v, a, b, c, sde_type, reduction, noise=noise, seed=seed,
                             offset=offset, need_logprob=False)
    with torch.no_grad():
        if noise is None:
            noise = philox_normal(x.numel(), int(seed), int(offset), x.device).view_as(x)
        return step_math(x, v, a, b, c, noise, sde_type, reduction)


def step_math(x, v, a, b, c, noise, sde_type: str, reduction: str):
    """The rollout step's arithmetic, unchecked (what the bench compiles)."""
    cd = _compute_dtype(x)
    a_, b_, c_ = (_per_sample(t, x, cd) for t in (a, b, c))
    mean = a_ * x.to(cd) + b_ * v.to(cd)
    x_next = (mean + c_ * noise.to(cd)).to(x.dtype)
    r = x_next.to(cd) - mean
    logp = _finish_logp(per_sample_sum(r * r), c_.view(-1), x[0].numel(), sde_type, reduction)
    return x_next, logp


def sde_logprob(x, v, x_next, a, b, c, *, sde_type, v_ref=None, reduction="mean"):
    """Training log-prob of a stored transition: (logp, kl, grad_norm), each [B] float32.

    Differentiable w.r.t. v through torch autograd (logp and kl); grad_norm = |d logp / d v|
    per sample, a detached diagnostic. kl is zeros when v_ref is None.
    """
    validate.check_step_args(x, v, a, b, c, sde_type, reduction, x_next=x_next, v_ref=v_ref,
                             need_logprob=True)
    return logprob_math(x, v, x_next, a, b, c, v_ref, sde_type, reduction)


def logprob_math(x, v, x_next, a, b, c, v_ref, sde_type: str, reduction: str):
    """The training op's arithmetic, unchecked (what the bench compiles)."""
    cd = _compute_dtype(x)
    numel = x[0].numel()
    a_, b_, c_ = (_per_sample(t, x, cd) for t in (a, b, c))
    b1, c1 = b_.view(-1), c_.view(-1)
    vf = v.to(cd)
    r = x_next.to(cd) - (a_ * x.to(cd) + b_ * vf)
    sumsq = per_sample_sum(r * r)
    logp = _finish_logp(sumsq, c1, numel, sde_type, reduction)
    if v_ref is None:
        kl = torch.zeros_like(logp)
    else:
        dv = vf - v_ref.to(cd)
        kl_sum = per_sample_sum(dv * dv)
        kl = b1 * b1 / (2.0 * (c1 * c1 + _KL_EPS)) * (kl_sum / numel if reduction == "mean" else kl_sum)
    coef_r, _ = _grad_coefficients(b1, c1, numel, sde_type, reduction)
    grad_norm = (coef_r.abs() * torch.sqrt(sumsq)).detach()
    return logp, kl, grad_norm


def sde_logprob_backward(x, v, x_next, a, b, c, v_ref, grad_logp, grad_kl, *, sde_type,
                         reduction="mean") -> torch.Tensor:
    """d(loss)/dv given d(loss)/d logp and d(loss)/d kl ([B] each), in v.dtype.

    The explicit formula of docs/SPEC.md section 3, used as the backward of the registered op on the
    torch backend; tests check it against autograd of `sde_logprob`.
    """
    cd = _compute_dtype(x)
    numel = x[0].numel()
    a_, b_, c_ = (_per_sample(t, x, cd) for t in (a, b, c))
    coef_r, coef_kl = _grad_coefficients(b_, c_, numel, sde_type, reduction)
    vf = v.to(cd)
    r = x_next.to(cd) - (a_ * x.to(cd) + b_ * vf)
    dv = _per_sample(grad_logp, x, cd) * coef_r * r
    if v_ref is not None:
        dv = dv + _per_sample(grad_kl, x, cd) * coef_kl * (vf - v_ref.to(cd))
    return dv.to(v.dtype)


def equalizer_update(grad_norm, step_index, ema, count, *, momentum=0.9, clamp=(0.1, 10.0)):
    """Empirical temporal equalizer (docs/SPEC.md section 4): update per-step EMAs, return scales [B].

    Args:
        grad_norm: [B] per-sample |d logp / d v| (the training op's third output).
        step_index: [B] int64 step of each sample, in [0, N).
        ema: [N] float32 running mean of the norm per step, updated in place.
        count: [N] int64 observations per step, updated in place (0 = no estimate yet).
        momentum: EMA momentum in [0, 1): ema = m * ema + (1 - m) * batch_mean; a step's first
            observation sets its EMA to the batch mean.
        clamp: (s_min, s_max) bounds of the scales.

    Non-finite or non-positive norms are ignored (a NaN must not poison the statistics). The
    per-step batch mean is taken over the valid samples at that step. Scale of sample i:
    clamp(lower_median(ema over observed steps) / ema[step_i]); 1 where its step has no
    estimate.
    """
    n_steps = ema.numel()
    with torch.no_grad():
        norm = grad_norm.to(torch.float32)
        valid = torch.isfinite(norm) & (norm > 0)
        onehot = (step_index.view(1, -1) == torch.arange(n_steps, device=ema.device).view(-1, 1))
        onehot = onehot & valid.view(1, -1)
        hits = onehot.sum(1)
        sums = torch.where(onehot, norm.view(1, -1), torch.zeros_like(norm).view(1, -1)).sum(1)
        batch_mean = sums / hits.clamp(min=1).to(torch.float32)
        seen_now = hits > 0
        blended = momentum * ema + (1.0 - momentum) * batch_mean
        new_ema = torch.where(seen_now, torch.where(count > 0, blended, batch_mean), ema)
        ema.copy_(new_ema)
        count.add_(hits.to(count.dtype))
        observed = count > 0
        if not bool(observed.any()):
            return torch.ones_like(norm)
        vals = torch.sort(ema[observed]).values
        median = vals[(vals.numel() - 1) // 2]
        ema_i = ema[step_index]
        scale = torch.where(count[step_index] > 0, median / ema_i, torch.ones_like(ema_i))
        return scale.clamp(float(clamp[0]), float(clamp[1]))
