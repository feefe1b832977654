"""The GRPO objective of one (sample, step) micro-batch: clipped policy term x equalizer + dual KL.

docs/SPEC.md sections 5 and 6, per (sample i, step t) pair:

    rho      = exp(logp_new - logp_old)
    policy   = s_t * max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))     s_t: equalizer scale
    kl_step  = logp_old - logp_new          (a one-sample estimate of KL(pi_old || pi_theta);
                                             its mean over the batch is the step-wise KL)
    kl_anch  = b^2 / (2 (c^2 + 1e-6)) * red((v_theta - v_ref)^2)   (from the fused op)
    loss     = policy + beta * (w_anchor * kl_anch + w_step * kl_step)

The equalizer multiplies the policy term only, never the KL. `mode` picks which KL terms
enter: none, fixed / moving (anchor only; fixed or moving is the anchor's business, see
anchor.py), stepwise (step only), dual_fixed / dual_moving (both). Samples with
`valid = False` (failed rewards) contribute nothing. The loss is the mean over valid pairs.

Leaves to others: computing log-probs and the anchor KL (sage_fast.kernels), the scales
(equalizer.py), beta (kl_schedule.py), the backward and the optimizer (the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KL_MODES", "LossTerms", "grpo_loss", "uses_anchor", "uses_step_kl"]

KL_MODES = ("none", "fixed", "moving", "stepwise", "dual_fixed", "dual_moving")


def _check_mode(mode: str) -> str:
    if mode not in KL_MODES:
        raise ValueError(f"kl mode must be one of {KL_MODES}, got {mode!r}")
    return mode


def uses_anchor(mode: str) -> bool:
    """Whether `mode` needs the anchor's velocity (an anchor KL term)."""
    return _check_mode(mode) in ("fixed", "moving", "dual_fixed", "dual_moving")


def uses_step_kl(mode: str) -> bool:
    return _check_mode(mode) in ("stepwise", "dual_fixed", "dual_moving")


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar, differentiable
    policy: torch.Tensor  # scalar, detached: mean policy term
    kl_anchor: torch.Tensor  # scalar, detached: mean anchor KL (0 when unused)
    kl_step: torch.Tensor  # scalar, detached: mean step-wise KL estimate
    ratio_b: torch.Tensor  # [N] detached
    clipped_b: torch.Tensor  # [N] bool: ratio outside [1 - eps, 1 + eps]


def grpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, *, clip_range: float,
              scale: torch.Tensor | None = None, kl_anchor: torch.Tensor | None = None, mode: str = "dual_moving",
              beta: float = 0.0, w_anchor: float = 1.0, w_step: float = 0.1,
              valid: torch.Tensor | None = None) -> LossTerms:
    """Loss of N (sample, step) pairs, each argument [N] (see the module doc)."""
    _check_mode(mode)
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    n = logp_new.shape[0]
    for name, t in (("logp_old", logp_old), ("adv", adv), ("scale", scale), ("kl_anchor", kl_anchor),
                    ("valid", valid)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}] like logp_new, got {tuple(t.shape)}")
    if uses_anchor(mode) and kl_anchor is None:
        raise ValueError(f"kl mode {mode!r} needs kl_anchor (the anchor's velocity was not computed)")
    logp_old, adv = logp_old.detach(), adv.detach()
    ratio = torch.exp(logp_new - logp_old)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    if scale is not None:
        policy = policy * scale.detach()
    kl_step = logp_old - logp_new
    kl_a = kl_anchor if (kl_anchor is not None and uses_anchor(mode)) else torch.zeros_like(policy)
    per_pair = policy
    if mode != "none" and beta != 0.0:
        kl_term = torch.zeros_like(policy)
        if uses_anchor(mode):
            kl_term = kl_term + w_anchor * kl_a
        if uses_step_kl(mode):
            kl_term = kl_term + w_step * kl_step
        per_pair = per_pair + beta * kl_term
    weight = torch.ones_like(policy) if valid is None else valid.to(policy.dtype)
    denom = weight.sum().clamp(min=1.0)

    def mean(t):
        return (t * weight).sum() / denom

    return LossTerms(
        loss=mean(per_pair),
        policy=mean(policy).detach(),
        kl_anchor=mean(kl_a).detach(),
        kl_step=mean(kl_step).detach(),
        ratio_b=ratio.detach(),
        clipped_b=((ratio - 1.0).abs() > clip_range).detach(),
    )
