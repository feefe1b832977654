"""The rollout engine: noise addressing, SDE windows, and log-probs that the training recompute
reproduces bitwise."""

import pytest
import torch

from sage_fast.grpo import schedule
from sage_fast.grpo.data import epoch_seed
from sage_fast.grpo.rollout import RolloutEngine, SamplerConfig

SHAPE = (4, 3, 5, 4, 6)


def stub_policy(latents, timestep, conditioning, cfg_scale):
    """Elementwise, so a sample's velocity cannot depend on its batch neighbours."""
    return 0.3 * latents.float() + 1e-4 * timestep.view(-1, 1, 1, 1, 1)


def test_split_batches_draw_the_same_trajectories_as_the_full_batch():
    engine = RolloutEngine(stub_policy, SamplerConfig(num_steps=6, sde_type="sage_grpo", cfg_scale=1.0))
    seed = epoch_seed(7, 0)
    full = engine.sample(None, SHAPE, seed=seed)
    first = engine.sample(None, (1,) + SHAPE[1:], seed=seed, first_sample=0, total_samples=4)
    rest = engine.sample(None, (3,) + SHAPE[1:], seed=seed, first_sample=1, total_samples=4)
    assert torch.equal(full.latents, torch.cat([first.latents, rest.latents], dim=1))
    assert torch.equal(full.logp_old, torch.cat([first.logp_old, rest.logp_old], dim=1))
    again = engine.sample(None, SHAPE, seed=seed)
    assert torch.equal(again.latents, full.latents)
    other = engine.sample(None, SHAPE, seed=epoch_seed(7, 1))
    assert not torch.equal(other.latents[0], full.latents[0])
    # samples of one batch are distinct explorations (no seed reuse across prompts/samples)
    assert not torch.equal(full.latents[0, 0], full.latents[0, 1])
    with pytest.raises(ValueError, match=r"samples \[3, 5\) must lie in \[0, 4\)"):
        engine.sample(None, (2,) + SHAPE[1:], seed=seed, first_sample=3, total_samples=4)


def test_sde_window_leaves_other_steps_deterministic():
    cfg = SamplerConfig(num_steps=8, sde_type="flow_grpo", sde_window=(2, 5), cfg_scale=1.0)
    engine = RolloutEngine(stub_policy, cfg)
    traj = engine.sample(None, SHAPE, seed=3)
    sig = schedule.sigmas(8, cfg.shift)
    for t in range(8):
        if 2 <= t < 5:
            assert traj.step_types[t] == "flow_grpo" and bool((traj.logp_old[t] != 0).all())
        else:
            assert traj.step_types[t] == "ode" and bool((traj.logp_old[t] == 0).all())
            v = stub_policy(traj.latents[t], torch.full((4,), 1000 * float(sig[t])), None, 1.0)
            want = traj.latents[t] + float(sig[t + 1] - sig[t]) * v
            assert torch.allclose(traj.latents[t + 1], want, atol=1e-6)
    with pytest.raises(ValueError, match="deterministic"):
        engine.recompute_logprob(traj, 0, torch.zeros(SHAPE))


def test_training_recompute_equals_rollout_logprob_bitwise_with_the_tiny_model():
    from sage_fast.models import VelocityModelConfig, build_velocity_model, random_conditioning

    model = build_velocity_model(VelocityModelConfig(architecture="tiny", finetune="full", autocast_dtype="none"))
    cfg = model.transformer.config
    shape = (2, cfg.out_channels, 3, 4, 6)
    cond = random_conditioning(cfg, 2, generator=torch.Generator().manual_seed(0))
    engine = RolloutEngine(model.velocity, SamplerConfig(num_steps=4, sde_type="sage_grpo", cfg_scale=3.0))
    traj = engine.sample(cond, shape, seed=11)
    sig = schedule.sigmas(4, 5.0)
    for t in range(4):
        v = model.velocity(traj.latents[t], torch.full((2,), 1000 * float(sig[t])), cond, 3.0)
        logp, kl, _ = engine.recompute_logprob(traj, t, v.detach())
        assert torch.equal(logp, traj.logp_old[t]), t  # ratio exactly 1 at the first update
        assert torch.equal(kl, torch.zeros(2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_steps=0), "sampler.num_steps must be"),
    (dict(sde_type="ode"), "sampler.sde_type must be one of"),
    (dict(eta=-0.1), "sampler.eta must be >= 0"),
    (dict(sde_window=(3, 2)), r"sampler.sde_window must be \[start, end\)"),
    (dict(sde_window=(0, 21)), "sampler.sde_window"),
])
def test_sampler_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**kwargs)


@pytest.mark.gpu
def test_graphed_rollout_engine_equals_eager_engine_bitwise():
    from sage_fast.models import VelocityModelConfig, build_velocity_model, random_conditioning

    model = build_velocity_model(VelocityModelConfig(architecture="tiny", finetune="full", autocast_dtype="none"),
                                 device="cuda")
    cfg = model.transformer.config
    shape = (2, cfg.out_channels, 3, 4, 6)
    cond = random_conditioning(cfg, 2, generator=torch.Generator().manual_seed(0), device="cuda")
    sampler = SamplerConfig(num_steps=6, sde_type="sage_grpo", sde_window=(1, 5), cfg_scale=3.0)
    graphed = RolloutEngine(model.velocity, sampler, cuda_graph=True)
    eager = RolloutEngine(model.velocity, sampler, cuda_graph=False)
    a = graphed.sample(cond, shape, seed=5, device="cuda")
    assert graphed.graph_error is None, graphed.graph_error
    b = eager.sample(cond, shape, seed=5, device="cuda")
    assert torch.equal(a.latents, b.latents) and torch.equal(a.logp_old, b.logp_old)
