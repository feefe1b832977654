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


def assert_training_op_matches_reference(got, x, v_new, x_next, abc, v_ref, g_logp, g_kl, sde_type, reduction):
    """got = (logp, kl, grad_norm, dv) of an implementation of the training op, for upstream
    gradients g_logp, g_kl; each is held to the rule above against kernels/reference.py."""
    from sage_fast.kernels import reference

    logp, kl, grad_norm, dv = got

    def run_reference(cast):
        vv = cast(v_new).detach().requires_grad_()
        outs = reference.sde_logprob(cast(x), vv, cast(x_next), *abc, sde_type=sde_type,
                                     v_ref=None if v_ref is None else cast(v_ref), reduction=reduction)
        ((g_logp.to(outs[0].dtype) * outs[0]).sum() + (g_kl.to(outs[1].dtype) * outs[1]).sum()).backward()
        return outs, vv.grad

    (s_logp, s_kl, s_norm), s_dv = run_reference(lambda t: t)
    (r_logp, r_kl, r_norm), r_dv = run_reference(lambda t: t.double())
    assert_within_baseline("logp", logp, s_logp, r_logp, torch.float32)
    assert_within_baseline("kl", kl, s_kl, r_kl, torch.float32)
    assert_within_baseline("grad_norm", grad_norm, s_norm, r_norm, torch.float32)
    assert dv.dtype == v_new.dtype
    if v_ref is None:
        assert torch.equal(kl.cpu(), torch.zeros(kl.shape[0])), "kl must be exactly 0 without v_ref"
    # gradients are tiny for `mean` (1/D): compare relative to their own scale
    scale = float(r_dv.abs().max())
    assert_within_baseline("dv", dv / scale, s_dv / scale, r_dv / scale, v_new.dtype)
