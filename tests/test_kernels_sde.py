"""Fused Triton step kernels against the torch reference (STYLE rules 5-7).

Without a GPU these run under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors, in
float32 and float16; bfloat16 and native compilation carry the `gpu` marker.
"""

import pytest
import torch
from conftest import KERNEL_DEVICE
from tolerance import assert_training_op_matches_reference, assert_within_baseline

from sage_fast.grpo import schedule
from sage_fast.kernels import reference

ALL_TYPES = list(schedule.SDE_TYPES)
LOGPROB_TYPES = ["sage_grpo", "flow_grpo", "dance_grpo", "cps"]
SHAPES = [(3, 5, 21, 7, 13), (1, 3, 5, 4, 6)]  # odd sizes, D = 9555 (2 chunks + tail); batch 1
STEPS = {3: [0, 19, 7], 1: [18]}  # mixed timesteps in one batch (19: cps's deterministic step)
LP_STEPS = {3: [0, 18, 7], 1: [12]}


@pytest.fixture(scope="module")
def sde():
    from sage_fast.kernels import sde as sde_module

    return sde_module


def _inputs(shape, dtype, seed=0, device=KERNEL_DEVICE):
    g = torch.Generator().manual_seed(seed)
    x, v, noise = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    return x, v, noise


def _coef(sde_type, steps, device=KERNEL_DEVICE):
    a, b, c = schedule.step_coefficients(schedule.sigmas(20, 5.0), torch.tensor(steps), sde_type, 0.5)
    packed = torch.stack([a, b, c]).to(device=device, dtype=torch.float32)
    return (a, b, c), packed


def _rng(seed, offset, device=KERNEL_DEVICE):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def _ref_step(x, v, abc, noise, seed, offset, sde_type, reduction):
    """(same-dtype reference, float64 reference) of the rollout step."""
    if noise is None:
        from sage_fast.kernels import philox_normal

        noise = philox_normal(x.numel(), seed, offset, x.device).view_as(x)
    same = reference.sde_step(x, v, *abc, sde_type=sde_type, noise=noise, reduction=reduction)
    exact = reference.sde_step(x.double(), v.double(), *abc, sde_type=sde_type, noise=noise.double(),
                               reduction=reduction)
    return same, exact


@pytest.mark.parametrize("shape", SHAPES, ids=["odd3", "batch1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("sde_type", ALL_TYPES)
@pytest.mark.parametrize("given_noise", [True, False], ids=["noise", "philox"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rollout_step_matches_reference(triton, sde, shape, dtype, sde_type, given_noise, reduction):
    abc, coef = _coef(sde_type, STEPS[shape[0]])
    x, v, noise = _inputs(shape, dtype)
    seed, offset = 1234, 5 * x.numel()
    x_next, logp = sde.sde_step_packed(x, v, coef, noise if given_noise else None,
                                       None if given_noise else _rng(seed, offset), sde_type, reduction)
    (same_x, same_lp), (ref_x, ref_lp) = _ref_step(x, v, abc, noise if given_noise else None, seed, offset,
                                                   sde_type, reduction)
    assert x_next.dtype == dtype and logp.dtype == torch.float32 and logp.shape == (shape[0],)
    assert_within_baseline("x_next", x_next, same_x, ref_x, dtype)
    # logp is float32 from float32 sums whatever the latent dtype
    assert_within_baseline("logp", logp, same_lp, ref_lp, torch.float32)
    zero = abc[2] == 0
    assert torch.equal(logp.cpu()[zero], torch.zeros(int(zero.sum())))


@pytest.mark.parametrize("shape", SHAPES, ids=["odd3", "batch1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("sde_type", LOGPROB_TYPES)
@pytest.mark.parametrize("with_ref", [False, True], ids=["nokl", "kl"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_training_logprob_forward_backward_matches_reference(triton, sde, shape, dtype, sde_type, with_ref,
                                                              reduction):
    batch = shape[0]
    abc, coef = _coef(sde_type, LP_STEPS[batch])
    x, v, noise = _inputs(shape, dtype, seed=1)
    x_next, _ = reference.sde_step(x, v, *abc, sde_type=sde_type, noise=noise)
    # the policy moved a little since the rollout, the anchor a little more
    v_new = (v.float() + 0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(v.device)).to(dtype)
    v_ref = (v.float() - 0.03 * torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(v.device)).to(dtype) \
        if with_ref else None
    g_logp = torch.linspace(-1.0, 2.0, batch, device=x.device)
    g_kl = torch.linspace(0.5, -0.7, batch, device=x.device)

    logp, kl, grad_norm = sde.sde_logprob_packed(x, v_new, x_next, coef, v_ref, sde_type, reduction)
    dv = sde.sde_logprob_backward_packed(x, v_new, x_next, coef, v_ref, g_logp, g_kl, sde_type, reduction)

    assert_training_op_matches_reference((logp, kl, grad_norm, dv), x, v_new, x_next, abc, v_ref, g_logp, g_kl,
                                         sde_type, reduction)
    if not with_ref:
        assert torch.equal(kl.cpu(), torch.zeros(batch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("given_noise", [True, False], ids=["noise", "philox"])
def test_triton_rollout_logprob_equals_training_recompute_bitwise(triton, sde, dtype, given_noise):
    shape = (3, 5, 21, 7, 13)
    abc, coef = _coef("sage_grpo", [0, 7, 7])
    x, v, noise = _inputs(shape, dtype, seed=5)
    x_next, logp_roll = sde.sde_step_packed(x, v, coef, noise if given_noise else None,
                                            None if given_noise else _rng(3, 0), "sage_grpo", "mean")
    logp_full, _, _ = sde.sde_logprob_packed(x, v, x_next, coef, None, "sage_grpo", "mean")
    v_ref = v.clone()
    logp_kl, kl, _ = sde.sde_logprob_packed(x, v, x_next, coef, v_ref, "sage_grpo", "mean")
    singles = [sde.sde_logprob_packed(x[i:i + 1], v[i:i + 1], x_next[i:i + 1], coef[:, i:i + 1].contiguous(),
                                      None, "sage_grpo", "mean")[0] for i in range(3)]
    assert torch.equal(logp_roll, logp_full)
    assert torch.equal(logp_roll, logp_kl)
    assert torch.equal(logp_roll, torch.cat(singles))
    assert torch.equal(kl, torch.zeros_like(kl))


def test_backward_is_the_gradient_of_the_forward(triton, sde):
    """d/dv from the kernel's backward against central differences of the kernel's forward."""
    shape = (2, 3, 5, 4, 7)
    abc, coef = _coef("flow_grpo", [4, 13])
    x, v, noise = _inputs(shape, torch.float32, seed=7)
    x_next, _ = reference.sde_step(x, v, *abc, sde_type="flow_grpo", noise=noise, reduction="sum")
    v_ref = v + 0.1
    dv = sde.sde_logprob_backward_packed(x, v, x_next, coef, v_ref, torch.ones(2, device=x.device),
                                         torch.ones(2, device=x.device), "flow_grpo", "sum")
    h = 1e-2
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        i = tuple(int(torch.randint(0, n, (1,), generator=gen)) for n in shape)
        vp, vm = v.clone(), v.clone()
        vp[i] += h
        vm[i] -= h
        fp = sum(t.sum() for t in sde.sde_logprob_packed(x, vp, x_next, coef, v_ref, "flow_grpo", "sum")[:2])
        fm = sum(t.sum() for t in sde.sde_logprob_packed(x, vm, x_next, coef, v_ref, "flow_grpo", "sum")[:2])
        numeric = float(fp - fm) / (2 * h)
        assert float(dv[i]) == pytest.approx(numeric, rel=2e-2, abs=2e-3)


def test_packed_argument_errors(triton, sde):
    x, v, noise = _inputs((2, 2, 3, 4, 5), torch.float32)
    _, coef = _coef("cps", [1, 2])
    with pytest.raises(ValueError, match="coef must be a contiguous float32"):
        sde.sde_step_packed(x, v, coef.double(), noise, None, "cps", "mean")
    with pytest.raises(ValueError, match="Triton kernels take latents in"):
        sde.sde_logprob_packed(x.double(), v.double(), x.double(), coef, None, "cps", "mean")


# ------------------------------------------------------------------------------------------
# GPU: bfloat16 (the interpreter computes bf16 wrongly) and native compilation
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("sde_type", ALL_TYPES)
@pytest.mark.parametrize("given_noise", [True, False], ids=["noise", "philox"])
def test_rollout_bf16_on_gpu(sde, sde_type, given_noise):
    abc, coef = _coef(sde_type, [0, 19, 7], "cuda")
    x, v, noise = _inputs((3, 32, 21, 30, 53), torch.bfloat16, device="cuda")
    x_next, logp = sde.sde_step_packed(x, v, coef, noise if given_noise else None,
                                       None if given_noise else _rng(5, 0, "cuda"), sde_type, "mean")
    (same_x, same_lp), (ref_x, ref_lp) = _ref_step(x, v, abc, noise if given_noise else None, 5, 0,
                                                   sde_type, "mean")
    assert_within_baseline("x_next", x_next, same_x, ref_x, torch.bfloat16)
    assert_within_baseline("logp", logp, same_lp, ref_lp, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("sde_type", LOGPROB_TYPES)
def test_training_bf16_on_gpu(sde, sde_type):
    shape = (3, 32, 21, 30, 53)
    abc, coef = _coef(sde_type, [0, 18, 7], "cuda")
    x, v, noise = _inputs(shape, torch.bfloat16, device="cuda")
    x_next, logp_roll = sde.sde_step_packed(x, v, coef, noise, None, sde_type, "mean")
    v_ref = (v.float() + 0.01).to(torch.bfloat16)
    logp, kl, norm = sde.sde_logprob_packed(x, v, x_next, coef, v_ref, sde_type, "mean")
    assert torch.equal(logp, logp_roll)  # bitwise, natively compiled
    g = torch.ones(3, device="cuda")
    dv = sde.sde_logprob_backward_packed(x, v, x_next, coef, v_ref, g, g, sde_type, "mean")
    vv = v.double().requires_grad_()
    r_logp, r_kl, _ = reference.sde_logprob(x.double(), vv, x_next.double(), *abc, sde_type=sde_type,
                                            v_ref=v_ref.double())
    (r_logp.sum() + r_kl.sum()).backward()
    vs = v.detach().requires_grad_()
    s_logp, s_kl, _ = reference.sde_logprob(x, vs, x_next, *abc, sde_type=sde_type, v_ref=v_ref)
    (s_logp.sum() + s_kl.sum()).backward()
    assert_within_baseline("logp", logp, s_logp, r_logp, torch.float32)
    assert_within_baseline("kl", kl, s_kl, r_kl, torch.float32)
    scale = float(vv.grad.abs().max())
    assert_within_baseline("dv", dv / scale, vs.grad / scale, vv.grad / scale, torch.bfloat16)


@pytest.mark.gpu
def test_training_op_extra_memory_is_at_most_one_latent_on_gpu(sde):
    shape = (8, 32, 21, 30, 53)  # 8.5M elements, bf16
    _, coef = _coef("sage_grpo", [0, 3, 5, 7, 9, 11, 13, 15], "cuda")
    x, v, noise = _inputs(shape, torch.bfloat16, device="cuda")
    x_next, _ = sde.sde_step_packed(x, v, coef, noise, None, "sage_grpo", "mean")
    v_ref = v.clone()
    g = torch.ones(8, device="cuda")
    latent_bytes = x.numel() * x.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sde.sde_logprob_packed(x, v, x_next, coef, v_ref, "sage_grpo", "mean")
    dv = sde.sde_logprob_backward_packed(x, v, x_next, coef, v_ref, g, g, "sage_grpo", "mean")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert dv.shape == shape
    # d/dv itself plus per-sample partial sums (a few KB)
    assert extra <= latent_bytes + (1 << 20), extra / latent_bytes
