"""The micro report's measurements: the noise budget against an independent integral, and every
measurement of `python -m sage_fast.paper micro` at tiny sizes."""

from __future__ import annotations

import math

import pytest
import torch

from sage_fast.grpo import schedule
from sage_fast.paper.micro import MicroConfig, matched_exploration
from sage_fast.paper.noise import exact_variance, noise_budget


def _simpson(f, lo: float, hi: float, n: int = 20000) -> float:
    """Composite Simpson rule in float64 (n even), written here independently of the module."""
    h = (hi - lo) / n
    total = f(lo) + f(hi)
    for k in range(1, n):
        total += (4 if k % 2 else 2) * f(lo + k * h)
    return total * h / 3


def _coefficient(u: float) -> float:  # the marginal-preserving diffusion coefficient / eta^2
    return u / (1.0 - u)


SCHEDULES = [(10, 3.0, 0.5), (20, 5.0, 0.5), (16, 1.0, 0.8)]


@pytest.mark.parametrize("num_steps,shift,eta", SCHEDULES)
def test_sage_variance_is_the_simpson_integral_on_every_step(num_steps, shift, eta):
    sig = schedule.sigmas(num_steps, shift)
    _, _, c = schedule.step_coefficients(sig, torch.arange(num_steps), "sage_grpo", eta)
    for i in range(1, num_steps):  # step 0: the integral diverges at sigma = 1
        s, s_next = float(sig[i]), float(sig[i + 1])
        quad = eta**2 * _simpson(_coefficient, s_next, s)
        assert float(c[i]) ** 2 == pytest.approx(quad, rel=1e-9)
        assert exact_variance(s, s_next, eta) == pytest.approx(quad, rel=1e-9)
    # step 0: sigma is clamped to 1 - e (e = min(3e-3, (1 - sigma_1) / 2)) in the log term only, the
    # linear term keeps the full delta: the integral up to 1 - e, less eta^2 e
    e = min(3e-3, (1.0 - float(sig[1])) / 2)
    quad0 = eta**2 * (_simpson(_coefficient, float(sig[1]), 1.0 - e) - e)
    assert float(c[0]) ** 2 == pytest.approx(quad0, rel=1e-7)
    assert math.isinf(exact_variance(1.0, float(sig[1]), eta))


@pytest.mark.parametrize("num_steps,shift,eta", SCHEDULES)
def test_flow_variance_carries_the_left_point_error(num_steps, shift, eta):
    """flow_grpo = the left-point (Euler) area; its error f'(xi) delta^2 / 2 lies between the
    endpoint values of f'(u) = 1 / (1 - u)^2 (f increasing and convex)."""
    sig = schedule.sigmas(num_steps, shift)
    _, _, c = schedule.step_coefficients(sig, torch.arange(num_steps), "flow_grpo", eta)
    for i in range(1, num_steps):
        s, s_next = float(sig[i]), float(sig[i + 1])
        delta = s - s_next
        assert float(c[i]) ** 2 == pytest.approx(eta**2 * _coefficient(s) * delta, rel=1e-12)
        error = float(c[i]) ** 2 - eta**2 * _simpson(_coefficient, s_next, s)
        lo = eta**2 * delta**2 / (2 * (1 - s_next) ** 2)
        hi = eta**2 * delta**2 / (2 * (1 - s) ** 2)
        assert lo * (1 - 1e-9) <= error <= hi * (1 + 1e-9), (i, lo, error, hi)
    # step 0: the denominator at sigma_1 (finite where the exact integral is not)
    assert float(c[0]) ** 2 == pytest.approx(eta**2 / (1 - float(sig[1])) * (1 - float(sig[1])), rel=1e-12)


@pytest.mark.parametrize("num_steps,shift,eta", SCHEDULES)
def test_dance_integrates_a_constant_coefficient(num_steps, shift, eta):
    sig = schedule.sigmas(num_steps, shift)
    _, _, c = schedule.step_coefficients(sig, torch.arange(num_steps), "dance_grpo", eta)
    for i in range(1, num_steps):
        s, s_next = float(sig[i]), float(sig[i + 1])
        assert float(c[i]) ** 2 == pytest.approx(eta**2 * _simpson(lambda u: 1.0, s_next, s), rel=1e-12)
        # against the marginal-preserving reference: eta^2 * integral of (u / (1 - u) - 1)
        gap = eta**2 * _simpson(lambda u: _coefficient(u) - 1.0, s_next, s)
        assert exact_variance(s, s_next, eta) - float(c[i]) ** 2 == pytest.approx(gap, rel=1e-8, abs=1e-14)


def test_noise_budget_totals():
    b = noise_budget(10, 3.0, 0.5)
    assert len(b["steps"]) == 10 and math.isinf(b["steps"][0]["exact"])
    tot = b["totals"]
    assert tot["steps_counted"] == list(range(1, 10))
    assert tot["exact"] == pytest.approx(sum(r["exact"] for r in b["steps"][1:]))
    assert tot["excess"]["sage_grpo"] == pytest.approx(0.0, abs=1e-12)
    assert tot["ratio"]["flow_grpo"] > 1.0  # Euler over-injects
    assert b["steps"][-1]["variance"]["cps"] == 0.0  # cps's last step is deterministic
    for r in b["steps"][1:]:
        assert r["excess"]["flow_grpo"] > 0


def test_matched_exploration_interpolates_per_prompt():
    ode = {"eta": 0.0, "exploration": [0.0, 0.0], "manifold": [0.1, 0.2], "step_distance": [0.0, 0.0]}
    cells = [ode, {"eta": 0.5, "exploration": [0.2, 0.2], "manifold": [0.3, 0.4], "step_distance": [0.0, 2.0]},
             {"eta": 1.0, "exploration": [0.4, 0.4], "manifold": [0.5, 1.0], "step_distance": [0.0, 4.0]}]
    got = matched_exploration(cells, 0.3)
    assert got["eta"] == pytest.approx(0.75)
    assert got["values"] == pytest.approx([0.4, 0.7])
    assert got["step_distance"] == pytest.approx([0.0, 3.0])
    assert matched_exploration(cells, 0.1)["values"] == pytest.approx([0.2, 0.3])
    assert matched_exploration(cells, 0.5) is None  # beyond the curve


@pytest.mark.parametrize("kwargs,field", [({"group": 1}, "group"), ({"prompts": 0}, "prompts"),
                                          ({"etas": (0.5, 1.5)}, "cps"), ({"etas": (-0.1,)}, "etas"),
                                          ({"types": ("ode",)}, "types"), ({"grad_group": 9}, "grad_prompts")])
def test_micro_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MicroConfig(**kwargs)


def test_cli_rejects_bad_input(capsys):
    from sage_fast.paper.__main__ import main

    with pytest.raises(SystemExit):
        main(["micro", "--group", "1"])
    assert "group must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["micro", "--etas", "0.1,x"])


@pytest.fixture(scope="module")
def setup():
    from sage_fast.paper.micro import load_setup

    return load_setup(num_prompts=2)


def test_ode_cell_has_no_exploration(setup):
    from sage_fast.paper.micro import ode_reference, rollout_cell

    prompts = setup.eval_prompts[:2]
    ode = ode_reference(setup, prompts, group=2, seed=0)
    cell = rollout_cell(setup, "sage_grpo", 0.0, prompts, group=2, seed=0, ode=ode)
    assert max(cell["exploration"]) < 1e-6
    assert max(cell["step_distance"]) < 1e-5
    assert cell["stochastic_steps"] == []
    sde = rollout_cell(setup, "sage_grpo", 0.5, prompts, group=2, seed=0, ode=ode)
    assert min(sde["exploration"]) > 1e-3  # the SDE explores from the same noise
    assert sde["step_distance"][0] < 1e-6 < sde["step_distance"][1]  # shared initial noise, then apart


def test_run_micro_and_report_at_tiny_sizes(setup, tmp_path):
    from sage_fast.paper.micro import run_micro
    from sage_fast.paper.report import write_micro_report

    cfg = MicroConfig(prompts=2, group=2, etas=(0.25, 0.5), types=("sage_grpo", "cps"), grad_prompts=1,
                      grad_group=2)
    result = run_micro(cfg, setup=setup, show_progress=False)
    n = setup.sampler.num_steps
    assert len(result["cells"]) == 4
    for cell in [result["ode"]] + result["cells"]:
        for key in ("exploration", "manifold", "reward", "vq", "mq", "ta"):
            assert len(cell[key]) == 2 and all(math.isfinite(v) for v in cell[key]), key
        assert len(cell["step_distance"]) == n + 1 and all(math.isfinite(v) for v in cell["step_distance"])
        assert len(cell["c"]) == n and len(cell["grad_norm"]) == n
    cps = next(c for c in result["cells"] if c["sde_type"] == "cps")
    assert cps["stochastic_steps"] == list(range(n - 1))  # the last cps step is deterministic
    for g in result["parameter_gradients"]:
        assert len(g["mean"]) == len(g["steps"]) and all(math.isfinite(v) and v > 0 for v in g["mean"])
    for cell in result["cells"]:  # the fused op's norm is the analytic one up to |eps| / sqrt(D)
        for t in cell["stochastic_steps"]:
            assert cell["grad_norm"][t] == pytest.approx(cell["grad_norm_analytic"][t], rel=0.02)
    path = write_micro_report(result, tmp_path, command="test")
    text = path.read_text()
    assert "## 1. Rollout geometry" in text and "## 3. Gradient norm" in text
    for name in ("micro.json", "micro_geometry.png", "micro_steps.png", "micro_budget.png", "micro_gradients.png"):
        assert (tmp_path / name).stat().st_size > 0, name
