"""Fused Triton kernels of the SDE step: rollout (step + log-prob) and training (log-prob + KL).

Math (docs/SPEC.md sections 2, 3, 6; a, b, c per sample, D = C*T*H*W, red = mean (default) or sum):

    rollout    mean = a*x + b*v;  x_next = mean + c*eps;  r = x_next - mean (x_next as stored)
               logp = red(-r^2/(2c^2) - log c - log(2pi)/2)   (cps: red(-r^2); c == 0: logp = 0)
    training   same logp from a stored (x, v, x_next); kl = b^2/(2(c^2+1e-6)) * red((v-v_ref)^2)
               grad_norm = |d logp/d v| = |coef_r| * sqrt(sum r^2)
    backward   d/dv = g_logp * coef_r * r + g_kl * coef_kl * (v - v_ref)
               coef_r = b/c^2 (cps: 2b), coef_kl = b^2/(c^2+1e-6), each / D for `mean`

Memory traffic per element: rollout reads x, v (and noise when given) and writes x_next;
training forward reads x, v, x_next (and v_ref); backward reads the same and writes d/dv. The
mean and the residual are never written: the backward recomputes them.

Determinism: each program reduces one chunk of CHUNK elements of one sample to a partial sum,
then one program per sample adds that sample's partials in a fixed order. The order depends
on D only, never on the batch size, and the rollout and the training forward share the
partial-sum code and the finishing kernel, so a rollout's log-prob and the training
recompute of the same transition agree bitwise. `mean = fma(a, x, b*v)` is written out so the
compiler cannot contract the two kernels differently.

Noise: `eps` is either read from a tensor or generated in the kernel by the Philox stream
defined in `philox.py` (counter offset + linear index, key seed), with seed and offset read
from a device tensor so that a CUDA graph can replay the step with fresh noise.

Leaves to others: argument checks (`validate.py`), op registration and backend choice
(`ops.py`, `dispatch.py`), the coefficients (`sage_fast.grpo.schedule`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import CHUNK

__all__ = ["KERNEL_DTYPES", "sde_step_packed", "sde_logprob_packed", "sde_logprob_backward_packed"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NUM_WARPS = 8  # 4096 elements per program: 16 per thread, 32-byte bf16 loads per tensor
_FIN_BLOCK_MAX = 1024
# Globals read inside @triton.jit functions must be tl.constexpr (Triton refuses other globals).
_HALF_LOG_2PI = tl.constexpr(0.9189385332046727)  # 0.5 * log(2 pi)
_KL_EPS = tl.constexpr(1e-6)

# -------------------------------------------------------------------------------------------
# device helpers
# -------------------------------------------------------------------------------------------


@triton.jit
def _philox_normal(seed, counter):
    """Stream philox-v1 (see philox.py): one standard normal per int64 counter."""
    x0, x1, _, _ = tl.randint4x(seed, counter)
    u1 = ((x0 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    u2 = ((x1 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _load_coef(coef_ptr, pid_b, B):
    a = tl.load(coef_ptr + pid_b)
    b = tl.load(coef_ptr + B + pid_b)
    c = tl.load(coef_ptr + 2 * B + pid_b)
    return a, b, c


@triton.jit
def _residual_sumsq(r, mask):
    r = tl.where(mask, r, 0.0)
    return tl.sum(r * r, axis=0)


# -------------------------------------------------------------------------------------------
# kernels
# -------------------------------------------------------------------------------------------


@triton.jit
def _sde_step_fwd_kernel(x_ptr, v_ptr, noise_ptr, rng_ptr, coef_ptr, xn_ptr, part_ptr,
                         B, D, NCHUNK, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs = pid_c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    idx = pid_b.to(tl.int64) * D + offs  # linear index in the batch (int64: B*D may pass 2^31)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    a, b, c = _load_coef(coef_ptr, pid_b, B)
    mean = tl.fma(a, x, b * v)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        seed = tl.load(rng_ptr)
        offset = tl.load(rng_ptr + 1)
        eps = _philox_normal(seed, offset + idx)
    x_next = tl.fma(c, eps, mean).to(xn_ptr.dtype.element_ty)
    tl.store(xn_ptr + idx, x_next, mask=mask)
    r = x_next.to(tl.float32) - mean
    tl.store(part_ptr + pid_b * NCHUNK + pid_c, _residual_sumsq(r, mask))


@triton.jit
def _sde_logprob_fwd_kernel(x_ptr, v_ptr, xn_ptr, vref_ptr, coef_ptr, part_ptr, kl_part_ptr,
                            B, D, NCHUNK, HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs = pid_c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    idx = pid_b.to(tl.int64) * D + offs
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    x_next = tl.load(xn_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    a, b, c = _load_coef(coef_ptr, pid_b, B)
    mean = tl.fma(a, x, b * v)
    r = x_next - mean
    tl.store(part_ptr + pid_b * NCHUNK + pid_c, _residual_sumsq(r, mask))
    if HAS_REF:
        v_ref = tl.load(vref_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(kl_part_ptr + pid_b * NCHUNK + pid_c, _residual_sumsq(v - v_ref, mask))


@triton.jit
def _sum_partials(part_ptr, pid_b, NCHUNK, FIN_BLOCK: tl.constexpr):
    acc = 0.0
    for start in range(0, NCHUNK, FIN_BLOCK):
        offs = start + tl.arange(0, FIN_BLOCK)
        acc += tl.sum(tl.load(part_ptr + pid_b * NCHUNK + offs, mask=offs < NCHUNK, other=0.0), axis=0)
    return acc


@triton.jit
def _grad_coef_r(b, c, D, GAUSSIAN: tl.constexpr, MEAN: tl.constexpr):
    if GAUSSIAN:
        coef = b / (c * c)
    else:
        coef = 2.0 * b
    if MEAN:
        coef = coef / D
    return coef


@triton.jit
def _logp_finish_kernel(part_ptr, coef_ptr, logp_ptr, norm_ptr, B, D, NCHUNK,
                        GAUSSIAN: tl.constexpr, MEAN: tl.constexpr, FIN_BLOCK: tl.constexpr):
    """One program per sample: logp and |d logp / d v| from the partial sums of r^2."""
    pid_b = tl.program_id(0)
    sumsq = _sum_partials(part_ptr, pid_b, NCHUNK, FIN_BLOCK)
    _, b, c = _load_coef(coef_ptr, pid_b, B)
    stochastic = c > 0.0
    c_safe = tl.where(stochastic, c, 1.0)
    d = D * 1.0  # int scalar -> float32 (works whether Triton specialised D or not)
    if GAUSSIAN:
        quad = sumsq / (2.0 * c_safe * c_safe)
        const = tl.log(c_safe) + _HALF_LOG_2PI
        if MEAN:
            logp = -quad / d - const
        else:
            logp = -quad - d * const
    else:
        if MEAN:
            logp = -sumsq / d
        else:
            logp = -sumsq
    tl.store(logp_ptr + pid_b, tl.where(stochastic, logp, 0.0))
    coef_r = _grad_coef_r(b, c_safe, d, GAUSSIAN, MEAN)
    tl.store(norm_ptr + pid_b, tl.where(stochastic, tl.abs(coef_r) * tl.sqrt(sumsq), 0.0))


@triton.jit
def _kl_finish_kernel(kl_part_ptr, coef_ptr, kl_ptr, B, D, NCHUNK,
                      MEAN: tl.constexpr, FIN_BLOCK: tl.constexpr):
    pid_b = tl.program_id(0)
    total = _sum_partials(kl_part_ptr, pid_b, NCHUNK, FIN_BLOCK)
    _, b, c = _load_coef(coef_ptr, pid_b, B)
    if MEAN:
        total = total / (D * 1.0)
    tl.store(kl_ptr + pid_b, b * b / (2.0 * (c * c + _KL_EPS)) * total)


@triton.jit
def _sde_logprob_bwd_kernel(x_ptr, v_ptr, xn_ptr, vref_ptr, coef_ptr, glogp_ptr, gkl_ptr, dv_ptr,
                            B, D, HAS_REF: tl.constexpr, GAUSSIAN: tl.constexpr,
                            MEAN: tl.constexpr, BLOCK: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs = pid_c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    idx = pid_b.to(tl.int64) * D + offs
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    x_next = tl.load(xn_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    a, b, c = _load_coef(coef_ptr, pid_b, B)
    d = D * 1.0  # int scalar -> float32 (works whether Triton specialised D or not)
    r = x_next - tl.fma(a, x, b * v)
    dv = (tl.load(glogp_ptr + pid_b) * _grad_coef_r(b, c, d, GAUSSIAN, MEAN)) * r
    if HAS_REF:
        v_ref = tl.load(vref_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        coef_kl = b * b / (c * c + _KL_EPS)
        if MEAN:
            coef_kl = coef_kl / d
        dv += (tl.load(gkl_ptr + pid_b) * coef_kl) * (v - v_ref)
    tl.store(dv_ptr + idx, dv.to(dv_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------
# host launchers (packed arguments; checks of user input live in validate.py / ops.py)
# -------------------------------------------------------------------------------------------


def _check_packed(x: torch.Tensor, coef: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernels take latents in {KERNEL_DTYPES}, got {x.dtype}")
    if coef.dtype != torch.float32 or coef.shape != (3, x.shape[0]) or coef.device != x.device \
            or not coef.is_contiguous():
        raise ValueError(
            f"coef must be a contiguous float32 [3, B] tensor (rows a, b, c) on {x.device}, "
            f"got {coef.dtype} {tuple(coef.shape)} on {coef.device}"
        )


def _fin_block(nchunk: int) -> int:
    return min(_FIN_BLOCK_MAX, triton.next_power_of_2(nchunk))


def _finish_logp(part, coef, batch, numel, nchunk, sde_type, reduction):
    logp = torch.empty(batch, device=part.device, dtype=torch.float32)
    norm = torch.empty_like(logp)
    _logp_finish_kernel[(batch,)](
        part, coef, logp, norm, batch, numel, nchunk,
        GAUSSIAN=sde_type != "cps", MEAN=reduction == "mean", FIN_BLOCK=_fin_block(nchunk),
        num_warps=4,
    )
    return logp, norm


def sde_step_packed(x, v, coef, noise, rng, sde_type: str, reduction: str, *, block: int = CHUNK):
    """Rollout step on packed arguments: coef [3, B] float32, rng [2] int64 (seed, offset).

    `block` is a test hook: the noise stream does not depend on it, the summation order does.
    """
    _check_packed(x, coef)
    batch, numel = x.shape[0], x[0].numel()
    nchunk = triton.cdiv(numel, block)
    x_next = torch.empty_like(x)
    part = torch.empty(batch, nchunk, device=x.device, dtype=torch.float32)
    has_noise = noise is not None
    _sde_step_fwd_kernel[(nchunk, batch)](
        x, v, noise if has_noise else x, rng if rng is not None else coef, coef, x_next, part,
        batch, numel, nchunk, HAS_NOISE=has_noise, BLOCK=block, num_warps=_NUM_WARPS,
    )
    logp, _ = _finish_logp(part, coef, batch, numel, nchunk, sde_type, reduction)
    return x_next, logp


def sde_logprob_packed(x, v, x_next, coef, v_ref, sde_type: str, reduction: str):
    """Training forward: (logp, kl, grad_norm), each [B] float32."""
    _check_packed(x, coef)
    batch, numel = x.shape[0], x[0].numel()
    nchunk = triton.cdiv(numel, CHUNK)
    part = torch.empty(batch, nchunk, device=x.device, dtype=torch.float32)
    has_ref = v_ref is not None
    kl_part = torch.empty_like(part) if has_ref else part
    _sde_logprob_fwd_kernel[(nchunk, batch)](
        x, v, x_next, v_ref if has_ref else x, coef, part, kl_part, batch, numel, nchunk,
        HAS_REF=has_ref, BLOCK=CHUNK, num_warps=_NUM_WARPS,
    )
    logp, grad_norm = _finish_logp(part, coef, batch, numel, nchunk, sde_type, reduction)
    kl = torch.zeros_like(logp)
    if has_ref:
        _kl_finish_kernel[(batch,)](
            kl_part, coef, kl, batch, numel, nchunk,
            MEAN=reduction == "mean", FIN_BLOCK=_fin_block(nchunk), num_warps=4,
        )
    return logp, kl, grad_norm


def sde_logprob_backward_packed(x, v, x_next, coef, v_ref, grad_logp, grad_kl, sde_type: str,
                                reduction: str):
    """d(loss)/dv in v.dtype, one pass; grad_logp, grad_kl: [B] float32."""
    _check_packed(x, coef)
    batch, numel = x.shape[0], x[0].numel()
    dv = torch.empty_like(v)
    has_ref = v_ref is not None
    grad_logp = grad_logp.to(torch.float32).contiguous()
    grad_kl = grad_kl.to(torch.float32).contiguous()
    _sde_logprob_bwd_kernel[(triton.cdiv(numel, CHUNK), batch)](
        x, v, x_next, v_ref if has_ref else x, coef, grad_logp, grad_kl, dv, batch, numel,
        HAS_REF=has_ref, GAUSSIAN=sde_type != "cps", MEAN=reduction == "mean", BLOCK=CHUNK,
        num_warps=_NUM_WARPS,
    )
    return dv
