"""The schedule against the independent tables of docs/SPEC.md sections 2 and 4, and its own algebra."""

import math

import pytest
import torch

from sage_fast.grpo import schedule

TABLE_STEPS = [0, 1, 2, 5, 9, 14, 17, 18, 19]
# docs/SPEC.md section 2: per-step std c at N=20, shift 5, eta 0.5
SPEC_SIGMA = [1.000, .990, .978, .938, .859, .682, .469, .357, .208]
SPEC_STD = {
    "dance_grpo": [.051, .053, .056, .064, .081, .119, .167, .193, .228],
    "flow_grpo": [.500, .519, .373, .248, .199, .174, .157, .144, .117],
    "sage_grpo": [.556, .426, .331, .233, .190, .164, .141, .122, .080],
    "cps": [.700, .692, .683, .651, .589, .442, .253, .147, 0.0],
}
# docs/SPEC.md section 4: analytic equalizer scales, lower median
EQ_STEPS = [0, 5, 9, 14, 18, 19]
SPEC_EQ = {
    "dance_grpo": [1.613, 1.273, 1.000, 0.653, 0.348, 0.245],
    "flow_grpo": [7.050, 1.971, 1.000, 0.401, 0.126, 0.073],
    "sage_grpo": [8.151, 1.951, 1.000, 0.397, 0.115, 0.055],
}


def _round3(t):
    return [round(float(x), 3) for x in t]


def test_sigmas_shape_endpoints_and_formula():
    s = schedule.sigmas(20, 5.0)
    assert s.dtype == torch.float64 and s.shape == (21,)
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0
    assert bool(torch.all(s[1:] < s[:-1]))
    u = 1 - 7 / 20
    assert float(s[7]) == pytest.approx(5 * u / (1 + 4 * u), abs=1e-15)
    assert _round3(s[TABLE_STEPS]) == SPEC_SIGMA
    # shift 1 is the linear schedule
    assert torch.allclose(schedule.sigmas(4, 1.0), torch.tensor([1, .75, .5, .25, 0], dtype=torch.float64))


@pytest.mark.parametrize("sde_type", sorted(SPEC_STD))
def test_step_std_matches_spec_table(sde_type):
    s = schedule.sigmas(20, 5.0)
    _, _, c = schedule.step_coefficients(s, torch.tensor(TABLE_STEPS), sde_type, 0.5)
    assert c.dtype == torch.float64
    assert _round3(c) == SPEC_STD[sde_type]


@pytest.mark.parametrize("sde_type", sorted(SPEC_EQ))
def test_analytic_equalizer_matches_spec_table(sde_type):
    scales = schedule.equalizer_scales(schedule.sigmas(20, 5.0), sde_type, 0.5)
    assert scales.shape == (20,) and scales.dtype == torch.float64
    assert _round3(scales[EQ_STEPS]) == SPEC_EQ[sde_type]


def test_equalizer_clamp_and_cps_last_step():
    s = schedule.sigmas(20, 5.0)
    clamped = schedule.equalizer_scales(s, "sage_grpo", 0.5, clamp=(0.2, 5.0))
    assert float(clamped.max()) == 5.0 and float(clamped.min()) == 0.2
    cps = schedule.equalizer_scales(s, "cps", 0.5)
    assert float(cps[-1]) == 1.0 and bool(torch.isfinite(cps).all())  # deterministic last step
    assert torch.equal(schedule.equalizer_scales(s, "ode"), torch.ones(20, dtype=torch.float64))


def _template_coefficients(sigma, sigma_next, var):
    """a, b from expanding mean = x + v*dt + 0.5*V*score(x), score = -(x + (1-sigma) v)/sigma,
    evaluated by applying the template to x = e1, v = 0 and x = 0, v = e1."""
    dt = sigma_next - sigma

    def mean(x, v):
        score = -(x + (1 - sigma) * v) / sigma
        return x + v * dt + 0.5 * var * score

    return mean(1.0, 0.0), mean(0.0, 1.0)


@pytest.mark.parametrize("sde_type", ["sage_grpo", "flow_grpo", "dance_grpo"])
def test_coefficients_follow_the_score_template(sde_type):
    s = schedule.sigmas(20, 5.0)
    steps = torch.arange(20)
    a, b, c = schedule.step_coefficients(s, steps, sde_type, 0.7)
    for i in range(20):
        a_ref, b_ref = _template_coefficients(float(s[i]), float(s[i + 1]), float(c[i]) ** 2)
        assert float(a[i]) == pytest.approx(a_ref, rel=1e-12, abs=1e-14)
        assert float(b[i]) == pytest.approx(b_ref, rel=1e-12, abs=1e-14)


def test_sage_variance_is_the_midpoint_integral_at_one_step():
    # V = eta^2 * int_{sigma'}^{sigma} s / (1 - s) ds, checked by numerical quadrature (step 5).
    s = schedule.sigmas(20, 5.0)
    hi, lo = float(s[5]), float(s[6])
    n = 20000
    h = (hi - lo) / n
    integral = sum((lo + (k + 0.5) * h) / (1 - (lo + (k + 0.5) * h)) for k in range(n)) * h
    _, _, c = schedule.step_coefficients(s, torch.tensor([5]), "sage_grpo", 0.5)
    assert float(c[0]) ** 2 == pytest.approx(0.25 * integral, rel=1e-7)


def test_cps_coefficients_preserve_the_noise_coefficient():
    # cps: mean = (1 - s') x0_hat + sqrt(s'^2 - c^2) x1_hat; with c^2 the total noise power
    # at sigma' is s'^2 (coefficient preserving).
    s = schedule.sigmas(10, 3.0)
    a, b, c = schedule.step_coefficients(s, torch.arange(10), "cps", 0.5)
    sigma, sigma_next = s[:-1], s[1:]
    r = torch.sqrt(sigma_next**2 - c**2)
    x, v = 0.3, -1.1
    mean = (1 - sigma_next) * (x - sigma * v) + r * (x + (1 - sigma) * v)
    assert torch.allclose(a * x + b * v, mean, atol=1e-14)
    assert torch.allclose(r**2 + c**2, sigma_next**2, atol=1e-14)
    assert float(c[-1]) == 0.0


def test_ode_and_eta_zero_are_euler():
    s = schedule.sigmas(20, 5.0)
    steps = torch.arange(20)
    for sde_type, eta in (("ode", 0.5), ("sage_grpo", 0.0), ("cps", 0.0)):
        a, b, c = schedule.step_coefficients(s, steps, sde_type, eta)
        assert torch.equal(a, torch.ones(20, dtype=torch.float64))
        assert torch.equal(b, s[1:] - s[:-1]) and torch.equal(c, torch.zeros(20, dtype=torch.float64))


def test_mixed_steps_in_one_batch_equal_per_step_calls():
    s = schedule.sigmas(20, 5.0)
    steps = torch.tensor([19, 0, 7, 7, 3])
    for sde_type in schedule.SDE_TYPES:
        batched = schedule.step_coefficients(s, steps, sde_type, 0.5)
        for k, i in enumerate(steps.tolist()):
            single = schedule.step_coefficients(s, torch.tensor([i]), sde_type, 0.5)
            for got, want in zip(batched, single):
                assert float(got[k]) == float(want[0])


def test_sage_clamp_stays_finite_where_the_authors_give_nan():
    # docs/SPEC.md defect 9: shift 9 with 40 steps puts sigma_1 above 0.997.
    s = schedule.sigmas(40, 9.0)
    assert float(s[1]) > 0.997
    a, b, c = schedule.step_coefficients(s, torch.arange(40), "sage_grpo", 0.5)
    assert bool(torch.isfinite(c).all() & (c > 0).all())
    # the authors' fixed clamp would take log of a ratio < 1 minus delta: negative variance
    fixed = math.log((1 - float(s[1])) / 3e-3) - (1 - float(s[1]))
    assert fixed < 0
    # and at the defaults the two clamps agree (1 - sigma_1 >= 6e-3)
    s20 = schedule.sigmas(20, 5.0)
    _, _, c20 = schedule.step_coefficients(s20, torch.tensor([0]), "sage_grpo", 0.5)
    authors = 0.5 * math.sqrt(math.log((1 - float(s20[1])) / 3e-3) - (1 - float(s20[1])))
    assert float(c20[0]) == pytest.approx(authors, rel=1e-14)


def test_stochastic_types_are_the_types_that_inject_noise():
    s = schedule.sigmas(10, 3.0)
    for sde_type in schedule.SDE_TYPES:
        _, _, c = schedule.step_coefficients(s, torch.arange(9), sde_type, 0.5)  # cps's last step has c = 0
        assert bool((torch.as_tensor(c) > 0).all()) == (sde_type in schedule.STOCHASTIC_TYPES), sde_type
    assert set(schedule.GAUSSIAN_TYPES) < set(schedule.STOCHASTIC_TYPES)
    assert schedule.STOCHASTIC_TYPES == ("sage_grpo", "flow_grpo", "dance_grpo", "cps")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: schedule.step_coefficients(s, torch.tensor([0]), "sde", 0.5), "sde_type must be one of"),
        (lambda s: schedule.step_coefficients(s, torch.tensor([0]), "sage_grpo", -0.1), "eta must be"),
        (lambda s: schedule.step_coefficients(s, torch.tensor([20]), "sage_grpo", 0.5), r"step_index must lie in \[0, 19\]"),
        (lambda s: schedule.step_coefficients(s, torch.tensor([-1]), "cps", 0.5), "step_index must lie"),
        (lambda s: schedule.step_coefficients(s, torch.tensor([0.5]), "cps", 0.5), "step_index must be an integer"),
        (lambda s: schedule.step_coefficients(s.flip(0), torch.tensor([0]), "cps", 0.5), "sigmas must decrease"),
        (lambda s: schedule.sigmas(0, 5.0), "num_steps must be"),
        (lambda s: schedule.sigmas(20, 0.0), "shift must be"),
        (lambda s: schedule.equalizer_scales(s, "sage_grpo", 0.5, clamp=(2.0, 1.0)), "clamp must be"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(schedule.sigmas(20, 5.0))
