"""Public entry points of the fused ops and their `torch.library` registration.

Owns: argument checks (via `validate.py`), packing of the per-sample coefficients and of the
Philox state, and the ops `sage_fast::sde_step`, `sage_fast::sde_logprob` (with a registered
autograd formula whose backward is the op `sage_fast::sde_logprob_backward`) and
`sage_fast::equalizer_update`. Registered custom ops are what `torch.compile` traces through
(as opaque nodes with fake-tensor shapes) and what a CUDA graph captures; the registered
autograd formula plays the part of an `autograd.Function` for them, which is the form
`torch.library` asks for.

Fast path for CUDA graphs: call `torch.ops.sage_fast.sde_step(x, v, coef, None, rng, ...)`
directly with `coef` ([3, B] float32) and `rng` ([2] int64: seed, offset) already on the
device; the public wrapper below copies host-side coefficients and integer seeds to the
device, which a graph capture cannot do.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import validate
from .dispatch import backend_for

__all__ = ["sde_step", "sde_logprob", "equalizer_update", "pack_coefficients", "pack_rng"]

_LIB = "sage_fast"


def _coef_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pack_coefficients(a: Tensor, b: Tensor, c: Tensor, x: Tensor) -> Tensor:
    """(a, b, c) [B] each -> one contiguous [3, B] tensor on x's device (float32, or float64
    for float64 latents). One host-to-device copy when they come from the schedule."""
    dtype = _coef_dtype(x)
    if a.device == b.device == c.device:
        return torch.stack([a, b, c]).to(device=x.device, dtype=dtype).contiguous()
    return torch.stack([t.to(device=x.device, dtype=dtype) for t in (a, b, c)])


def pack_rng(seed, offset, device: torch.device) -> Tensor:
    """(seed, offset) as ints or one-element int64 tensors -> int64 [2] on `device`."""
    parts = [t.reshape(1).to(device) if isinstance(t, Tensor) else torch.tensor([t], dtype=torch.int64, device=device)
             for t in (seed, offset)]
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------
# registered ops (packed arguments)
# ------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::sde_step", mutates_args=())
def _sde_step_op(x: Tensor, v: Tensor, coef: Tensor, noise: Optional[Tensor], rng: Optional[Tensor],
                 sde_type: str, reduction: str) -> tuple[Tensor, Tensor]:
    return backend_for(x.device).step(x, v, coef, noise, rng, sde_type, reduction)


@_sde_step_op.register_fake
def _(x, v, coef, noise, rng, sde_type, reduction):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=_coef_dtype(x))


@torch.library.custom_op(f"{_LIB}::sde_logprob", mutates_args=())
def _sde_logprob_op(x: Tensor, v: Tensor, x_next: Tensor, coef: Tensor, v_ref: Optional[Tensor],
                    sde_type: str, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.contiguous() for t in backend_for(x.device).logprob(x, v, x_next, coef, v_ref, sde_type, reduction))


@_sde_logprob_op.register_fake
def _(x, v, x_next, coef, v_ref, sde_type, reduction):
    out = x.new_empty((x.shape[0],), dtype=_coef_dtype(x))
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op(f"{_LIB}::sde_logprob_backward", mutates_args=())
def _sde_logprob_backward_op(x: Tensor, v: Tensor, x_next: Tensor, coef: Tensor, v_ref: Optional[Tensor],
                             grad_logp: Tensor, grad_kl: Tensor, sde_type: str, reduction: str) -> Tensor:
    return backend_for(x.device).logprob_backward(x, v, x_next, coef, v_ref, grad_logp, grad_kl,
                                                  sde_type, reduction)


@_sde_logprob_backward_op.register_fake
def _(x, v, x_next, coef, v_ref, grad_logp, grad_kl, sde_type, reduction):
    return torch.empty_like(v)


def _logprob_setup_context(ctx, inputs, output):
    x, v, x_next, coef, v_ref, sde_type, reduction = inputs
    ctx.save_for_backward(x, v, x_next, coef, v_ref)
    ctx.sde_type, ctx.reduction = sde_type, reduction
    ctx.mark_non_differentiable(output[2])  # grad_norm is a diagnostic


def _logprob_backward(ctx, grad_logp, grad_kl, _grad_norm):
    x, v, x_next, coef, v_ref = ctx.saved_tensors
    zeros = coef.new_zeros(x.shape[0])
    grad_logp = zeros if grad_logp is None else grad_logp
    grad_kl = zeros if grad_kl is None else grad_kl
    dv = torch.ops.sage_fast.sde_logprob_backward(x, v, x_next, coef, v_ref, grad_logp, grad_kl,
                                                  ctx.sde_type, ctx.reduction)
    return None, dv, None, None, None, None, None


_sde_logprob_op.register_autograd(_logprob_backward, setup_context=_logprob_setup_context)


@torch.library.custom_op(f"{_LIB}::equalizer_update", mutates_args=("ema", "count"))
def _equalizer_update_op(grad_norm: Tensor, step_index: Tensor, ema: Tensor, count: Tensor,
                         momentum: float, s_min: float, s_max: float) -> Tensor:
    return backend_for(grad_norm.device).equalizer(grad_norm, step_index, ema, count, momentum, s_min, s_max)


@_equalizer_update_op.register_fake
def _(grad_norm, step_index, ema, count, momentum, s_min, s_max):
    return torch.empty_like(grad_norm, dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------


def sde_step(x: Tensor, v: Tensor, a: Tensor, b: Tensor, c: Tensor, *, sde_type: str,
             noise: Optional[Tensor] = None, seed=None, offset=0, reduction: str = "mean"):
    """One rollout step, fused: `(x_next, logp)`.

    Args:
        x, v: latents and velocity [B, C, T, H, W], same dtype (float32, bfloat16, float16),
            contiguous, same device.
        a, b, c: per-sample coefficients [B] from `schedule.step_coefficients` (float64 on the
            CPU, or float32 on the device); samples may sit at different steps.
        sde_type: a type of `schedule.SDE_TYPES`; only `cps` changes the log-prob formula.
        noise: standard normal noise like x, or None to generate it in the kernel from
            (seed, offset): element j of the batch uses Philox counter offset + j, so the
            next call should advance offset by x.numel(). Ints or one-element int64 tensors.
        reduction: `mean` (default) or `sum` of the per-element log-density.

    Returns:
        x_next in x.dtype, and logp [B] float32 of x_next as stored (0 for c == 0 samples).
        Not differentiable: rollouts run under no_grad.
    """
    validate.check_step_args(x, v, a, b, c, sde_type, reduction, noise=noise, seed=seed,
                             offset=offset, need_logprob=False)
    coef = pack_coefficients(a, b, c, x)
    rng = pack_rng(seed, offset, x.device) if noise is None else None
    return torch.ops.sage_fast.sde_step(x, v, coef, noise, rng, sde_type, reduction)


def sde_logprob(x: Tensor, v: Tensor, x_next: Tensor, a: Tensor, b: Tensor, c: Tensor, *,
                sde_type: str, v_ref: Optional[Tensor] = None, reduction: str = "mean"):
    """Log-prob of stored transitions under velocity v, fused: `(logp, kl, grad_norm)`.

    Args: as `sde_step`, plus x_next (the stored next latents) and v_ref (the anchor's
    velocity on the same inputs, or None). Every sample needs c > 0.

    Returns three [B] float32 tensors: logp and kl (zeros without v_ref) are differentiable
    w.r.t. v; grad_norm = |d logp / d v| per sample is not (it feeds the empirical equalizer).
    x, x_next and v_ref are data: passing one that requires grad is an error rather than a
    silently missing gradient.
    """
    validate.check_step_args(x, v, a, b, c, sde_type, reduction, x_next=x_next, v_ref=v_ref,
                             need_logprob=True)
    for name, t in (("x", x), ("x_next", x_next), ("v_ref", v_ref)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{name} must not require grad: sde_logprob is differentiable "
                             f"w.r.t. v only (detach {name})")
    coef = pack_coefficients(a, b, c, x)
    return torch.ops.sage_fast.sde_logprob(x, v, x_next, coef, v_ref, sde_type, reduction)


def equalizer_update(grad_norm: Tensor, step_index: Tensor, ema: Tensor, count: Tensor, *,
                     momentum: float = 0.9, clamp: tuple[float, float] = (0.1, 10.0)) -> Tensor:
    """Empirical temporal equalizer, fused: update `ema`/`count` in place, return scales [B].

    See `reference.equalizer_update` for the contract. grad_norm: [B] float32; step_index:
    [B] int64; ema: [N] float32; count: [N] int64; all on one device.
    """
    if not (isinstance(grad_norm, Tensor) and grad_norm.dim() == 1 and grad_norm.dtype == torch.float32):
        raise ValueError("grad_norm must be a float32 tensor [B]")
    if not (isinstance(step_index, Tensor) and step_index.shape == grad_norm.shape
            and step_index.dtype == torch.int64):
        raise ValueError(f"step_index must be an int64 tensor of grad_norm's shape {tuple(grad_norm.shape)}")
    if not (isinstance(ema, Tensor) and ema.dim() == 1 and ema.dtype == torch.float32 and ema.numel() >= 1):
        raise ValueError("ema must be a float32 tensor [N], N >= 1")
    if not (isinstance(count, Tensor) and count.shape == ema.shape and count.dtype == torch.int64):
        raise ValueError("count must be an int64 tensor of ema's shape")
    devices = {t.device for t in (grad_norm, step_index, ema, count)}
    if len(devices) != 1:
        raise ValueError(f"grad_norm, step_index, ema and count must share one device, got {devices}")
    if not all(t.is_contiguous() for t in (grad_norm, step_index, ema, count)):
        raise ValueError("grad_norm, step_index, ema and count must be contiguous")
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if len(clamp) != 2 or not 0.0 < float(clamp[0]) <= float(clamp[1]):
        raise ValueError(f"clamp must be (s_min, s_max) with 0 < s_min <= s_max, got {clamp}")
    if step_index.device.type == "cpu" and step_index.numel():
        lo, hi = int(step_index.min()), int(step_index.max())
        if lo < 0 or hi >= ema.numel():
            raise ValueError(f"step_index must lie in [0, {ema.numel() - 1}], got values in [{lo}, {hi}]")
    return torch.ops.sage_fast.equalizer_update(grad_norm, step_index, ema, count, float(momentum),
                                                float(clamp[0]), float(clamp[1]))
