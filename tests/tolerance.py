"""The tolerance rule of STYLE.md rule 5 (flash-attention's): an implementation may be off the
float64 reference by at most twice what plain torch in the same dtype is off, plus a floor."""

import torch

# Floors relative to the reference's magnitude: one float32 rounding of a sum of a few terms,
# one float16 rounding, one bfloat16 rounding.
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def max_err(got: torch.Tensor, ref64: torch.Tensor) -> float:
    got, ref64 = got.detach(), ref64.detach()
    return float((got.double() - ref64.double()).abs().max())


def assert_within_baseline(name, got, same_dtype, ref64, dtype):
    """|got - ref64|_max <= 2 |same_dtype - ref64|_max + FLOOR[dtype] * max(1, |ref64|_max)."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(1.0, float(ref64.detach().double().abs().max()))
    baseline = max_err(same_dtype, ref64)
    err = max_err(got, ref64)
    bound = 2 * baseline + FLOOR[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (torch {dtype} error {baseline:.3e})"
