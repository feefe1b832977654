"""Input checks shared by every implementation of the step ops (reference, Triton, C++).

Owns: the contract of the public arguments and the `ValueError`s that name the argument and
what is allowed. Checks read only metadata (shape, dtype, device, strides) except where a
coefficient tensor lives on the CPU (the schedule's float64 output), where reading its values
is free; device-resident coefficients (CUDA-graph and compile paths) are trusted, because
checking them would cost a device-to-host sync per step.
"""

from __future__ import annotations

import torch

from sage_fast.grpo.schedule import check_sde_type

__all__ = [
    "LATENT_DTYPES",
    "REDUCTIONS",
    "check_latent",
    "check_like",
    "check_coefficients",
    "check_step_args",
    "check_reduction",
    "check_seed_offset",
]

LATENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum")


def check_latent(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 5:
        raise ValueError(f"{name} must have shape [B, C, T, H, W], got {tuple(t.shape)}")
    if t.dtype not in LATENT_DTYPES:
        raise ValueError(f"{name} must be one of {LATENT_DTYPES}, got {t.dtype}")
    if t.shape[0] < 1 or t[0].numel() < 1:
        raise ValueError(f"{name} must hold at least one sample and one element, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    return t


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    check_latent(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")
    return t


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_coefficients(batch: int, device: torch.device, need_noise: bool, **coeffs: torch.Tensor) -> None:
    """a, b, c: floating tensors [B], on the CPU or on the latents' device.

    need_noise: the caller takes a log-prob of every sample, so c must be > 0 (checked when c
    is on the CPU).
    """
    for name, t in coeffs.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor [B] (from step_coefficients), got {t!r}")
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(t.shape)}")
        if t.device.type != "cpu" and t.device != device:
            raise ValueError(f"{name} must be on the CPU or on the latents' device {device}, got {t.device}")
        if t.device.type == "cpu" and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite, got {t.tolist()}")
    c = coeffs.get("c")
    if c is not None and c.device.type == "cpu":
        if bool((c < 0).any()):
            raise ValueError(f"c must be >= 0 (it is a standard deviation), got {c.tolist()}")
        if need_noise and bool((c == 0).any()):
            bad = torch.nonzero(c == 0).flatten().tolist()
            raise ValueError(
                "c must be > 0 for a log-prob: samples "
                f"{bad} are at deterministic steps (c = 0: ode, eta = 0 or the last cps step), "
                "which have no log-prob and are never trained"
            )


def check_seed_offset(seed, offset) -> None:
    for name, val in (("seed", seed), ("offset", offset)):
        if isinstance(val, torch.Tensor):
            if val.dtype != torch.int64 or val.numel() != 1:
                raise ValueError(f"{name} as a tensor must be a single int64 value, got {val.dtype} {tuple(val.shape)}")
            if val.device.type == "cpu" and int(val) < 0:
                raise ValueError(f"{name} must be >= 0, got {int(val)}")
        elif isinstance(val, bool) or not isinstance(val, int):
            raise ValueError(f"{name} must be an int >= 0 or a one-element int64 tensor, got {val!r}")
        elif val < 0 or val >= 2**63:
            raise ValueError(f"{name} must be in [0, 2^63), got {val}")


def check_step_args(x, v, a, b, c, sde_type, reduction, *, x_next=None, v_ref=None, noise=None,
                    seed=None, offset=0, need_logprob: bool) -> None:
    """All checks of `sde_step` (need_logprob False) and `sde_logprob` (need_logprob True)."""
    check_latent("x", x)
    check_like("v", v, "x", x)
    if v.dtype != x.dtype:
        raise ValueError(f"v must have x's dtype {x.dtype}, got {v.dtype}")
    for name, t in (("x_next", x_next), ("v_ref", v_ref), ("noise", noise)):
        if t is not None:
            check_like(name, t, "x", x)
    if x_next is not None and x_next.dtype != x.dtype:
        raise ValueError(f"x_next must have x's dtype {x.dtype}, got {x_next.dtype}")
    if v_ref is not None and v_ref.dtype != v.dtype:
        raise ValueError(f"v_ref must have v's dtype {v.dtype}, got {v_ref.dtype}")
    check_sde_type(sde_type)  # the step types are sage_fast.grpo.schedule.SDE_TYPES
    check_reduction(reduction)
    if need_logprob and sde_type == "ode":
        raise ValueError("sde_type 'ode' is deterministic (c = 0): it has no log-prob to compute")
    check_coefficients(x.shape[0], x.device, need_logprob, a=a, b=b, c=c)
    if not need_logprob:
        if noise is not None and seed is not None:
            raise ValueError("give either noise or seed, not both")
        if noise is None and seed is None:
            raise ValueError("sde_step needs noise (a tensor like x) or seed (for in-kernel Philox noise)")
        if seed is not None:
            check_seed_offset(seed, offset)
