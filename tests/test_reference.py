"""The torch reference against the closed forms of docs/SPEC.md sections 2, 3 and 6, autograd, and its
own determinism contract."""

import math

import pytest
import torch

from sage_fast.grpo import schedule
from sage_fast.kernels import reference

LOGPROB_TYPES = ["sage_grpo", "flow_grpo", "dance_grpo", "cps"]
SHAPE = (3, 5, 21, 7, 13)


def _coefficients(sde_type, steps, num_steps=20, shift=5.0, eta=0.5):
    return schedule.step_coefficients(schedule.sigmas(num_steps, shift), torch.tensor(steps), sde_type, eta)


def _batch(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    noise = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, v, noise


@pytest.mark.parametrize("sde_type", LOGPROB_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rollout_logprob_matches_closed_form(sde_type, reduction):
    steps = [0, 9, 18]
    a, b, c = _coefficients(sde_type, steps)
    x, v, eps = _batch(SHAPE)
    x_next, logp = reference.sde_step(x, v, a, b, c, sde_type=sde_type, noise=eps, reduction=reduction)
    view = (-1, 1, 1, 1, 1)
    assert torch.allclose(x_next, a.view(view) * x + b.view(view) * v + c.view(view) * eps, atol=1e-12)
    d = x[0].numel()
    sq = (eps**2).flatten(1).sum(1)
    if sde_type == "cps":
        want = -(c**2) * sq
    else:  # r = c * eps exactly: -eps^2/2 - log c - log(2 pi)/2 per element
        want = -0.5 * sq - d * (torch.log(c) + 0.5 * math.log(2 * math.pi))
    if reduction == "mean":
        want = want / d
    assert torch.allclose(logp, want, rtol=1e-10, atol=1e-10)


def test_rollout_deterministic_step_has_zero_logprob():
    a, b, c = _coefficients("cps", [19, 3])
    assert float(c[0]) == 0.0
    x, v, eps = _batch((2, 2, 3, 4, 5))
    x_next, logp = reference.sde_step(x, v, a, b, c, sde_type="cps", noise=eps)
    assert float(logp[0]) == 0.0 and float(logp[1]) != 0.0
    assert torch.equal(x_next[0], a[0] * x[0] + b[0] * v[0])
    a, b, c = _coefficients("ode", [0, 5])
    _, logp = reference.sde_step(x, v, a, b, c, sde_type="ode", noise=eps)
    assert torch.equal(logp, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("sde_type", LOGPROB_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_float64(sde_type, reduction):
    a, b, c = _coefficients(sde_type, [2, 11])
    x, v, _ = _batch((2, 2, 3, 2, 3))
    x_next, _ = reference.sde_step(x, v, a, b, c, sde_type=sde_type, seed=5, reduction=reduction)
    v_ref = v + 0.1 * torch.randn_like(v)

    def f(v_):
        logp, kl, _ = reference.sde_logprob(x, v_, x_next, a, b, c, sde_type=sde_type, v_ref=v_ref,
                                            reduction=reduction)
        return logp, kl

    assert torch.autograd.gradcheck(f, (v.clone().requires_grad_(),))


@pytest.mark.parametrize("sde_type", LOGPROB_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_explicit_backward_and_grad_norm_equal_autograd(sde_type, reduction, with_ref):
    a, b, c = _coefficients(sde_type, [0, 7, 16])
    x, v, _ = _batch((3, 4, 5, 3, 7), seed=1)
    x_next, _ = reference.sde_step(x, v, a, b, c, sde_type=sde_type, seed=11)
    v_ref = v + 0.05 * torch.randn_like(v) if with_ref else None
    w_logp, w_kl = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64), torch.tensor([0.7, 0.1, -0.4], dtype=torch.float64)

    v_ = v.clone().requires_grad_()
    logp, kl, grad_norm = reference.sde_logprob(x, v_, x_next, a, b, c, sde_type=sde_type, v_ref=v_ref,
                                                reduction=reduction)
    assert not grad_norm.requires_grad
    ((w_logp * logp).sum() + (w_kl * kl).sum()).backward()
    explicit = reference.sde_logprob_backward(x, v, x_next, a, b, c, v_ref, w_logp, w_kl,
                                              sde_type=sde_type, reduction=reduction)
    assert torch.allclose(explicit, v_.grad, rtol=1e-10, atol=1e-14)

    # grad_norm is |d logp_i / d v_i|, from autograd of logp alone
    v2 = v.clone().requires_grad_()
    logp2, _, _ = reference.sde_logprob(x, v2, x_next, a, b, c, sde_type=sde_type, reduction=reduction)
    (g,) = torch.autograd.grad(logp2.sum(), v2)
    assert torch.allclose(grad_norm, g.flatten(1).norm(dim=1), rtol=1e-10)


def test_anchor_kl_is_the_gaussian_kl_of_the_two_means():
    a, b, c = _coefficients("sage_grpo", [1, 10])
    x, v, _ = _batch((2, 3, 4, 5, 6), seed=3)
    x_next, _ = reference.sde_step(x, v, a, b, c, sde_type="sage_grpo", seed=1)
    v_ref = v + 0.2 * torch.randn_like(v)
    _, kl, _ = reference.sde_logprob(x, v, x_next, a, b, c, sde_type="sage_grpo", v_ref=v_ref)
    view = (-1, 1, 1, 1, 1)
    mu, mu_ref = a.view(view) * x + b.view(view) * v, a.view(view) * x + b.view(view) * v_ref
    # KL(N(mu, c^2) || N(mu_ref, c^2)) per element, mean over elements; docs/SPEC.md section 6 adds 1e-6 to c^2
    want = ((mu - mu_ref) ** 2).flatten(1).mean(1) / (2 * (c**2 + 1e-6))
    assert torch.allclose(kl, want, rtol=1e-12)
    _, kl_self, _ = reference.sde_logprob(x, v, x_next, a, b, c, sde_type="sage_grpo", v_ref=v.clone())
    assert torch.equal(kl_self, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_logprob_equals_training_recompute_bitwise(dtype):
    """docs/SPEC.md section 2: the order of additions depends on D only, never on the batch size or threads."""
    shape = (4, 16, 5, 30, 53)  # D = 127,200: 32 chunks of 4096 and a tail
    steps = [0, 7, 7, 19]
    a, b, c = _coefficients("sage_grpo", steps)
    x, v, _ = _batch(shape, dtype, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        x_next, logp_roll = reference.sde_step(x, v, a, b, c, sde_type="sage_grpo", seed=9, offset=123)
        torch.set_num_threads(2)
        logp_full, _, _ = reference.sde_logprob(x, v, x_next, a, b, c, sde_type="sage_grpo")
        # a plain .sum() over a single row splits it across the 2 threads: a different order
        singles = [reference.sde_logprob(x[i:i + 1], v[i:i + 1], x_next[i:i + 1], a[i:i + 1], b[i:i + 1],
                                         c[i:i + 1], sde_type="sage_grpo")[0] for i in range(4)]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(logp_roll, logp_full)
    assert torch.equal(logp_full, torch.cat(singles))


def test_generated_noise_equals_given_philox_noise():
    from sage_fast.kernels import philox_normal

    a, b, c = _coefficients("flow_grpo", [3, 4])
    x, v, _ = _batch((2, 3, 4, 5, 6), torch.float32)
    eps = philox_normal(x.numel(), 77, 1000).view_as(x)
    got = reference.sde_step(x, v, a, b, c, sde_type="flow_grpo", seed=77, offset=1000)
    want = reference.sde_step(x, v, a, b, c, sde_type="flow_grpo", noise=eps)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_equalizer_reference_by_hand():
    ema = torch.zeros(4)
    count = torch.zeros(4, dtype=torch.int64)
    norms = torch.tensor([1.0, 3.0, 2.0, float("nan"), 8.0])
    steps = torch.tensor([0, 0, 1, 2, 3])
    scales = reference.equalizer_update(norms, steps, ema, count, momentum=0.5, clamp=(0.1, 10.0))
    # first sightings: ema = batch means [2, 2, -, 8]; step 2's only norm is NaN: unobserved
    assert ema.tolist() == [2.0, 2.0, 0.0, 8.0] and count.tolist() == [2, 1, 0, 1]
    # lower median of [2, 2, 8] = 2; scale = 2 / ema[step]; unobserved step -> 1
    assert scales.tolist() == [1.0, 1.0, 1.0, 1.0, 0.25]
    scales = reference.equalizer_update(torch.tensor([6.0, 1.0]), torch.tensor([1, 2]), ema, count,
                                        momentum=0.5, clamp=(0.5, 10.0))
    # ema[1] = 0.5*2 + 0.5*6 = 4; ema[2] = 1 (first); observed [2, 4, 1, 8] -> lower median 2
    assert ema.tolist() == [2.0, 4.0, 1.0, 8.0] and count.tolist() == [2, 2, 1, 1]
    assert scales.tolist() == [0.5, 2.0]
