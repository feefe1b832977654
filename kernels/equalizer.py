"""Fused empirical temporal equalizer: per-step EMA of gradient norms -> per-sample scales.

Math (docs/SPEC.md section 4, "empirical"): for a batch of per-sample norms g_i = |d logp / d v| at
step indices t_i, with per-step running estimates ema[n] and observation counts count[n]:

    m[n]      = mean of the valid g_i with t_i == n          (valid: finite and > 0)
    ema[n]   <- momentum * ema[n] + (1 - momentum) * m[n]    (m[n] itself at a first sighting)
    count[n] <- count[n] + #valid samples at n
    median    = lower median of ema[n] over observed steps (count[n] > 0)
    scale_i   = clamp(median / ema[t_i], s_min, s_max)       (1 if t_i was never observed)

One program does it all (N steps and B samples are small: N <= a few hundred): per-step sums
through a [N, B] match matrix, the median by ranking (value, index) pairs in an [N, N] matrix,
so the result is deterministic and needs no sort and no atomics. `ema` and `count` are
updated in place, which keeps the op capturable in a CUDA graph.

Leaves to others: the norms (the training kernel's third output), the analytic scales
(`sage_fast.grpo.schedule.equalizer_scales`), and where the scale enters the loss.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["equalizer_update_triton", "MAX_STEPS"]

MAX_STEPS = 256  # the [N, N] ranking matrix lives in registers (64k values at 256)
_BLOCK_B = 128
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _equalizer_fwd_kernel(norm_ptr, step_ptr, ema_ptr, count_ptr, scale_ptr, B, N,
                          momentum, s_min, s_max, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    n_idx = tl.arange(0, BLOCK_N)
    n_mask = n_idx < N
    sums = tl.zeros([BLOCK_N], dtype=tl.float32)
    hits = tl.zeros([BLOCK_N], dtype=tl.int32)
    for start in range(0, B, BLOCK_B):
        b_idx = start + tl.arange(0, BLOCK_B)
        b_mask = b_idx < B
        g = tl.load(norm_ptr + b_idx, mask=b_mask, other=0.0).to(tl.float32)
        step = tl.load(step_ptr + b_idx, mask=b_mask, other=-1)
        valid = b_mask & (g > 0.0) & (g <= _FLT_MAX)  # NaN and inf fail: ignored
        match = (step[None, :] == n_idx[:, None]) & valid[None, :]  # [BLOCK_N, BLOCK_B]
        sums += tl.sum(tl.where(match, g[None, :], 0.0), axis=1)
        hits += tl.sum(match.to(tl.int32), axis=1)

    ema = tl.load(ema_ptr + n_idx, mask=n_mask, other=0.0)
    count = tl.load(count_ptr + n_idx, mask=n_mask, other=0)
    batch_mean = sums / tl.maximum(hits, 1).to(tl.float32)
    blended = momentum * ema + (1.0 - momentum) * batch_mean
    ema = tl.where(hits > 0, tl.where(count > 0, blended, batch_mean), ema)
    count = count + hits
    tl.store(ema_ptr + n_idx, ema, mask=n_mask)
    tl.store(count_ptr + n_idx, count, mask=n_mask)

    # lower median over observed steps: the value whose rank among them is (k - 1) // 2
    observed = n_mask & (count > 0)
    k = tl.sum(observed.to(tl.int32), axis=0)
    e_i = ema[:, None]
    e_j = ema[None, :]
    before = observed[None, :] & ((e_j < e_i) | ((e_j == e_i) & (n_idx[None, :] < n_idx[:, None])))
    rank = tl.sum(before.to(tl.int32), axis=1)
    is_median = observed & (rank == (k - 1) // 2)
    median = tl.sum(tl.where(is_median, ema, 0.0), axis=0)

    for start in range(0, B, BLOCK_B):
        b_idx = start + tl.arange(0, BLOCK_B)
        b_mask = b_idx < B
        step = tl.load(step_ptr + b_idx, mask=b_mask, other=-1)
        match = step[None, :] == n_idx[:, None]
        ema_b = tl.sum(tl.where(match, ema[:, None], 0.0), axis=0)
        seen_b = tl.sum(tl.where(match & observed[:, None], 1, 0), axis=0) > 0
        scale = tl.where(seen_b, median / tl.where(seen_b, ema_b, 1.0), 1.0)
        scale = tl.minimum(tl.maximum(scale, s_min), s_max)
        tl.store(scale_ptr + b_idx, scale, mask=b_mask)


def equalizer_update_triton(grad_norm, step_index, ema, count, momentum: float, s_min: float,
                            s_max: float) -> torch.Tensor:
    """Launch on checked arguments (see `sage_fast.kernels.equalizer_update`); returns scales [B]."""
    n_steps = ema.numel()
    if n_steps > MAX_STEPS:
        raise ValueError(f"the equalizer kernel handles at most {MAX_STEPS} steps, got {n_steps}")
    scales = torch.empty(grad_norm.shape[0], device=grad_norm.device, dtype=torch.float32)
    _equalizer_fwd_kernel[(1,)](
        grad_norm, step_index, ema, count, scales, grad_norm.shape[0], n_steps,
        float(momentum), float(s_min), float(s_max),
        BLOCK_B=_BLOCK_B, BLOCK_N=max(16, triton.next_power_of_2(n_steps)), num_warps=4,
    )
    return scales
