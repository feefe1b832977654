"""GRPO math on the host: advantages, loss, KL schedule, equalizer wrapper."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sage_fast.grpo import schedule
from sage_fast.grpo.advantages import group_advantages
from sage_fast.grpo.equalizer import TemporalEqualizer
from sage_fast.grpo.kl_schedule import KLController
from sage_fast.grpo.loss import KL_MODES, grpo_loss, uses_anchor, uses_step_kl
from sage_fast.kernels import reference

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------
# advantages
# ------------------------------------------------------------------------------------------


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    out = group_advantages(rewards, groups)
    std = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    assert torch.allclose(out.adv_b[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std)
    assert torch.equal(out.adv_b[4:], torch.zeros(2))  # equal rewards: no signal
    assert out.valid_b.all() and out.num_failed == 0


def test_failed_rewards_are_excluded_not_zeroed():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 2.0, float("inf"), 7.0, 0.5, 0.6])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    out = group_advantages(rewards, groups)
    assert out.valid_b.tolist() == [True, False, True, True, False, True, True, True]
    assert out.num_failed == 2
    # group 0 normalised over {1, 3, 2} only; a zeroed NaN would have pulled the mean to 1.5
    want = (torch.tensor([1.0, 3.0, 2.0]) - 2.0) / math.sqrt(2 / 3)
    assert torch.allclose(out.adv_b[[0, 2, 3]], want)
    assert float(out.group_mean_b[0]) == pytest.approx(2.0)
    assert float(out.adv_b[1]) == 0.0 and float(out.adv_b[4]) == 0.0
    assert float(out.adv_b[5]) == 0.0  # one valid member left in group 1: no spread
    assert torch.allclose(out.adv_b[6:], torch.tensor([-1.0, 1.0]))


def test_advantage_std_scopes_by_hand():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    groups = torch.tensor([0, 0, 1, 1])
    # residuals -1, 1, -2, 2: pooled within-group std sqrt((1 + 1 + 4 + 4) / 4)
    pooled = math.sqrt(2.5)
    batch = group_advantages(rewards, groups, std_scope="batch")
    assert torch.allclose(batch.adv_b, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / pooled)
    assert torch.allclose(batch.group_std_b, torch.full((4,), pooled))
    none = group_advantages(rewards, groups, std_scope="none")
    assert torch.allclose(none.adv_b, torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    group = group_advantages(rewards, groups)  # the default: each group's own std
    assert torch.allclose(group.adv_b, torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    # a failed reward and a one-member group stay out of the pooled std
    odd = group_advantages(torch.tensor([1.0, 3.0, float("nan"), 14.0, 7.0]), torch.tensor([0, 0, 1, 1, 2]),
                           std_scope="batch")
    assert torch.allclose(odd.adv_b, torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="std_scope must be one of"):
        group_advantages(rewards, groups, std_scope="global")


def test_advantages_are_clamped_and_validated():
    rewards = torch.tensor([0.0] * 99 + [1.0])
    out = group_advantages(rewards, torch.zeros(100, dtype=torch.int64), clip=5.0)
    assert float(out.adv_b[-1]) == 5.0  # (1 - 0.01) / 0.0995 = 9.95 before the clamp
    with pytest.raises(ValueError, match="group_ids_b must be int64"):
        group_advantages(rewards, torch.zeros(100))
    with pytest.raises(ValueError, match="equal shape"):
        group_advantages(rewards, torch.zeros(99, dtype=torch.int64))


@pytest.mark.dist
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_advantages_two_ranks_equal_one_rank():
    """Groups split across 2 gloo ranks give each rank exactly its slice of the 1-rank result."""
    script = ROOT / "tests" / "dist" / "advantages.py"
    env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("OK advantages") == 2, proc.stdout


# ------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------


def test_policy_gradient_sign_clipping_and_scale():
    logp_old = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # ratios: 1, 1, far above 1 + eps, far below 1 - eps
    logp_new = (logp_old + torch.tensor([0.0, 0.0, 0.1, -0.1])).requires_grad_()
    scale = torch.tensor([2.0, 1.0, 1.0, 1.0])
    terms = grpo_loss(logp_new, logp_old, adv, clip_range=1e-4, scale=scale, mode="none")
    terms.loss.backward()
    g = logp_new.grad
    # unclipped: d/dlogp (-A * rho * s) / N = -A * s / 4 at rho = 1
    assert torch.allclose(g[:2], torch.tensor([-0.5, 0.25]))
    # A > 0 above the range and A < 0 below it: the clipped branch wins, no gradient
    assert torch.equal(g[2:], torch.zeros(2))
    assert terms.clipped_b.tolist() == [False, False, True, True]


def test_positive_advantage_update_raises_logprob():
    logp_old = torch.tensor([-2.0, -2.0])
    logp_new = logp_old.clone().requires_grad_()
    opt = torch.optim.SGD([logp_new], lr=1e-5)
    grpo_loss(logp_new, logp_old, torch.tensor([1.0, -1.0]), clip_range=1e-4, mode="none").loss.backward()
    opt.step()
    assert float(logp_new.detach()[0]) > -2.0 > float(logp_new.detach()[1])


@pytest.mark.parametrize("mode", KL_MODES)
def test_kl_modes_select_their_terms(mode):
    n = 3
    logp_old = torch.tensor([-1.0, -1.1, -0.9])
    logp_new = torch.tensor([-1.05, -1.0, -0.9])
    adv = torch.zeros(n)
    kl_anchor = torch.tensor([0.2, 0.4, 0.6])
    terms = grpo_loss(logp_new, logp_old, adv, clip_range=1e-4, kl_anchor=kl_anchor, mode=mode, beta=0.5,
                      w_anchor=1.0, w_step=0.1)
    want = 0.0
    if uses_anchor(mode):
        want += 0.5 * 1.0 * float(kl_anchor.mean())
    if uses_step_kl(mode):
        want += 0.5 * 0.1 * float((logp_old - logp_new).mean())
    assert float(terms.loss) == pytest.approx(want, abs=1e-7)


def test_loss_excludes_invalid_samples_and_checks_input():
    logp = torch.tensor([-1.0, -1.0, -1.0])
    adv = torch.tensor([1.0, 1.0, 100.0])
    terms = grpo_loss(logp, logp, adv, clip_range=0.1, mode="none", valid=torch.tensor([True, True, False]))
    assert float(terms.loss) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="kl mode must be one of"):
        grpo_loss(logp, logp, adv, clip_range=0.1, mode="dual")
    with pytest.raises(ValueError, match="needs kl_anchor"):
        grpo_loss(logp, logp, adv, clip_range=0.1, mode="dual_moving", beta=0.1)
    with pytest.raises(ValueError, match=r"adv must have shape \[3\]"):
        grpo_loss(logp, logp, adv[:2], clip_range=0.1, mode="none")


# ------------------------------------------------------------------------------------------
# KL schedule
# ------------------------------------------------------------------------------------------


def test_beta_schedules():
    const = KLController("constant", 0.05)
    assert [const.update(1.0) for _ in range(3)] == [0.05] * 3
    two = KLController("two_stage", 0.1, warmup_beta=0.01, warmup_steps=2)
    assert two.beta == 0.01 and two.update(0.0) == 0.01 and two.update(0.0) == 0.1
    up = KLController("adaptive", 0.1, target=0.01, rate=0.1)
    assert up.update(0.05) > 0.1  # KL above target raises beta (the authors' controller lowers it)
    down = KLController("adaptive", 0.1, target=0.01, rate=0.1)
    assert down.update(0.001) < 0.1
    capped = KLController("adaptive", 0.1, target=0.01, rate=5.0, beta_max=0.2)
    assert capped.update(1.0) == 0.2
    restored = KLController("adaptive", 0.1, target=0.01, rate=0.1)
    restored.load_state_dict(up.state_dict())
    assert restored.beta == up.beta and restored.step_count == 1
    with pytest.raises(ValueError, match="beta schedule must be one of"):
        KLController("cosine")
    with pytest.raises(ValueError, match="checkpoint KL controller is 'adaptive'"):
        KLController("constant").load_state_dict(up.state_dict())


# ------------------------------------------------------------------------------------------
# equalizer wrapper
# ------------------------------------------------------------------------------------------


def test_equalizer_modes():
    sig = schedule.sigmas(20, 5.0)
    steps = torch.tensor([0, 9, 19, 9])
    analytic = TemporalEqualizer("analytic", sig, "sage_grpo", 0.5)
    table = schedule.equalizer_scales(sig, "sage_grpo", 0.5).float()
    assert torch.equal(analytic.scales(steps), table[steps])
    assert torch.equal(TemporalEqualizer("none", sig, "sage_grpo", 0.5).scales(steps), torch.ones(4))
    emp = TemporalEqualizer("empirical", sig, "sage_grpo", 0.5, clamp=(0.2, 5.0), momentum=0.5)
    norms = torch.tensor([1.0, 2.0, 40.0, 4.0])
    got = emp.scales(steps, norms)
    ema, count = torch.zeros(20), torch.zeros(20, dtype=torch.int64)
    want = reference.equalizer_update(norms, steps, ema, count, momentum=0.5, clamp=(0.2, 5.0))
    assert torch.allclose(got, want) and torch.allclose(emp.ema, ema)
    other = TemporalEqualizer("empirical", sig, "sage_grpo", 0.5, clamp=(0.2, 5.0), momentum=0.5)
    other.load_state_dict(emp.state_dict())
    assert torch.equal(other.ema, emp.ema) and torch.equal(other.count, emp.count)
    with pytest.raises(ValueError, match="needs grad_norm_b"):
        emp.scales(steps)
    with pytest.raises(ValueError, match="equalizer mode must be one of"):
        TemporalEqualizer("median", sig, "sage_grpo", 0.5)


# ------------------------------------------------------------------------------------------
# anchor
# ------------------------------------------------------------------------------------------


def test_moving_anchor_lags_then_refreshes():
    from sage_fast.grpo.anchor import Anchor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen base, like LoRA's
    x = torch.randn(3, 4)
    start = model(x).detach()
    anchor = Anchor(model, "moving", update_every=2)
    assert anchor.equals_policy and set(anchor.params) == {"1.weight", "1.bias"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in (1, 2):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        refreshed = anchor.after_optimizer_step(model)
        if step == 1:
            assert not refreshed and not anchor.equals_policy
            assert torch.equal(anchor.forward(model, x), start)  # still the initial policy
            assert not torch.equal(model(x).detach(), start)
    assert refreshed and anchor.equals_policy
    assert torch.equal(anchor.forward(model, x), model(x).detach())
    fixed = Anchor(model, "fixed")
    before = fixed.forward(model, x)
    for _ in range(3):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        assert not fixed.after_optimizer_step(model)
    assert torch.equal(fixed.forward(model, x), before)
    clone = Anchor(model, "fixed")
    clone.load_state_dict(fixed.state_dict())
    assert torch.equal(clone.forward(model, x), before)
    with pytest.raises(ValueError, match="anchor mode must be one of"):
        Anchor(model, "ema")
