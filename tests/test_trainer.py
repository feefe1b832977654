"""The GRPO trainer end to end on a tiny random model and a small synthetic world (CPU)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sage_fast import config as C
from sage_fast import train_config  # noqa: F401 (recipes)
from sage_fast.train import main, prepare_run_dir
from sage_fast.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
from tiny_run import TINY  # noqa: E402
from tolerance import FLOOR  # noqa: E402


def tiny_cfg(tmp_path, *extra):
    return C.apply_overrides(C.get_recipe("tiny_world"), TINY + [f"run.output_dir={tmp_path}/run", *extra])


def trainable_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.trainable}


def test_two_plus_two_with_resume_equals_four_bitwise(tmp_path):
    cfg4 = tiny_cfg(tmp_path / "a", "run.steps=4")
    straight = Trainer(cfg4)
    metrics4 = [straight.step() for _ in range(4)]
    first = Trainer(tiny_cfg(tmp_path / "b", "run.steps=2"))
    for _ in range(2):
        first.step()
    first.save()
    resumed = Trainer(tiny_cfg(tmp_path / "b", "run.steps=4", "run.resume=true"))
    assert resumed.resume() and resumed.iteration == 2
    metrics_resumed = [resumed.step() for _ in range(2)]
    for name, value in trainable_state(straight).items():
        assert torch.equal(value, trainable_state(resumed)[name]), name
    for a, b in zip(metrics4[2:], metrics_resumed):
        assert a["reward/mean"] == b["reward/mean"] and a["loss"] == b["loss"]
    assert any(m["kl/anchor"] > 0 for m in metrics4[1:])  # the anchor KL is live once the policy moved


def test_first_update_ratio_is_one_and_improves_the_objective(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "grpo.kl_mode=none"))
    metrics = trainer.step()
    ratios = metrics["per_step"]["ratio"]
    assert all(r == 1.0 for r in ratios.values()), ratios  # rollout log-prob == training recompute, bitwise
    assert metrics["clip_frac"] == 0.0


def test_update_raises_logprob_of_positive_advantage_samples(tmp_path):
    """After one update, sum_i A_i (logp_new - logp_old) > 0 over the trained pairs."""
    from sage_fast.grpo.advantages import group_advantages
    from sage_fast.grpo.data import epoch_seed

    trainer = Trainer(tiny_cfg(tmp_path, "grpo.kl_mode=none", "grpo.clip_range=10.0", "optim.lr=0.003"))
    prompts = trainer.prompts_for(0)
    local = [prompts[b // 2] for b in range(4)]
    cond = trainer.task.conditioning(local)
    shape = (4,) + tuple(trainer.task.latent_shape)
    traj = trainer.engine.sample(cond, shape, seed=epoch_seed(trainer.cfg.run.seed, 0))
    reward = trainer.task.reward(trainer.task.decode(traj.final), local)
    adv = group_advantages(reward.total_b, torch.tensor([0, 0, 1, 1]))
    assert adv.adv_b.abs().sum() > 0
    trainer.step()  # the same iteration 0: same prompts, noise and trained steps
    gain = 0.0
    with torch.no_grad():
        for t in trainer.trainable_steps:
            ts = torch.full((4,), 1000 * float(trainer.engine.sigmas[t]))
            v = trainer.model.velocity(traj.latents[t], ts, cond, trainer.cfg.sampler.cfg_scale)
            logp, _, _ = trainer.engine.recompute_logprob(traj, t, v)
            gain += float((adv.adv_b * (logp - traj.logp_old[t])).sum())
    assert gain > 0


def test_anchor_kl_is_zero_right_after_a_refresh(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "grpo.kl_mode=dual_moving", "grpo.update_ref_every=1", "grpo.beta=0.1"))
    for _ in range(3):
        m = trainer.step()
        assert m["kl/anchor"] == 0.0  # refreshed after every update: anchor == policy at each rollout
    trainer = Trainer(tiny_cfg(tmp_path / "fixed", "grpo.kl_mode=dual_fixed", "grpo.beta=0.1"))
    trainer.step()
    assert trainer.step()["kl/anchor"] > 0.0


KL_MODE_TERMS = {  # mode: (anchor KL in the loss, step KL in the loss), as sage_fast/grpo/loss.py has them
    "none": (False, False), "fixed": (True, False), "moving": (True, False), "stepwise": (False, True),
    "dual_fixed": (True, True), "dual_moving": (True, True)}


@pytest.mark.parametrize("kl_mode", list(KL_MODE_TERMS))
def test_every_kl_mode_logs_the_terms_its_loss_is_made_of(tmp_path, kl_mode):
    """loss == policy + beta (w_anchor kl_anchor [anchor modes] + w_step kl_step [step modes]).

    Two updates per rollout: on the first the policy is the rollout's (kl_step is exactly 0) and
    the anchor (refreshed at the start) is the policy; on the second both KL terms are live.
    Two iterations: the second is the first whose anchor velocities come from the rollout phase.
    Weights 10 and 20, not 1 and 0.1, and lr 0.03, so that a dropped, swapped or extra term moves
    the loss by far more than the float32 rounding of the means (a heavy anchor term holds the
    policy near the anchor: its KL shrinks as its weight grows, the larger step moves it away)."""
    with_anchor, with_step = KL_MODE_TERMS[kl_mode]
    beta, w_anchor, w_step = 1.0, 10.0, 20.0
    trainer = Trainer(tiny_cfg(tmp_path, f"grpo.kl_mode={kl_mode}", f"grpo.beta={beta}", f"grpo.w_anchor={w_anchor}",
                               f"grpo.w_step={w_step}", "grpo.updates_per_rollout=2",
                               "grpo.ref_source=rollout_phase", "optim.lr=0.03"))
    trainer.step()
    m = trainer.step()
    assert m["update_skipped"] is False and m["beta"] == beta  # constant schedule: the beta the loss used
    # kl/step (logp_old - logp_new) is logged in every mode, a diagnostic; it enters the loss in the step modes
    assert m["kl/step"] != 0.0
    if with_anchor:
        assert m["kl/anchor"] > 0.0
    else:
        assert m["kl/anchor"] == 0.0  # no anchor: the term is an exact zero
    want = m["policy"] + beta * ((w_anchor * m["kl/anchor"] if with_anchor else 0.0)
                                 + (w_step * m["kl/step"] if with_step else 0.0))
    if kl_mode == "none":
        assert m["loss"] == m["policy"]  # the per-pair loss is the policy term itself: the same means
    # Each logged term is a mean of float32 per-pair values of size up to |A| s_t rho (|A| = 1 in
    # two-sample groups, s_t the equalizer scale), so the identity holds to a few float32
    # roundings of that size: tests/tolerance.py's float32 floor relative to it.
    size = max(1.0, *m["per_step"]["scale"].values())
    tol = FLOOR[torch.float32] * size
    assert abs(m["loss"] - want) <= tol, (m["loss"], want)
    # teeth: every term the loss holds, or would wrongly hold, is far above the tolerance
    assert beta * w_step * abs(m["kl/step"]) > 10 * tol
    if with_anchor:
        assert beta * w_anchor * m["kl/anchor"] > 10 * tol


@pytest.mark.parametrize("sde_type", ["sage_grpo", "flow_grpo", "dance_grpo", "cps"])
@pytest.mark.parametrize("equalizer", ["analytic", "empirical"])
def test_every_sde_type_trains_exactly_its_window_on_a_first_update_of_ratio_one(tmp_path, sde_type, equalizer):
    """SDE window [1, 4) of 4 steps, all its stochastic steps trained per sample (train_steps=3):
    steps 1, 2, 3 (cps: 1, 2; its last step, to sigma = 0, is deterministic and has no log-prob)."""
    trainer = Trainer(tiny_cfg(tmp_path, f"sampler.sde_type={sde_type}", f"grpo.equalizer={equalizer}",
                               "sampler.sde_window=1,4", "grpo.train_steps=3"))
    m = trainer.step()
    trained = {1, 2} if sde_type == "cps" else {1, 2, 3}
    stats = m["per_step"]
    assert set(stats) == {"ratio", "clipped", "kl", "grad_norm", "scale"}
    for name, per_step in stats.items():
        assert set(per_step) == trained, (name, per_step)  # steps outside the window never appear
        assert all(math.isfinite(v) for v in per_step.values()), (name, per_step)
    # the first update's policy is the rollout's: each ratio is exactly 1 (rollout log-prob ==
    # training recompute, bitwise; a non-finite log-prob would make it NaN), nothing is clipped,
    # and logp_old - logp_new is an exact zero; the anchor is the policy: no KL
    assert all(r == 1.0 for r in stats["ratio"].values()), stats["ratio"]
    assert all(c == 0.0 for c in stats["clipped"].values()) and m["clip_frac"] == 0.0
    assert m["kl/step"] == 0.0 and m["kl/anchor"] == 0.0 and all(k == 0.0 for k in stats["kl"].values())
    assert all(g > 0.0 for g in stats["grad_norm"].values()), stats["grad_norm"]  # every trained step has a signal
    assert all(s > 0.0 for s in stats["scale"].values()), stats["scale"]
    assert m["update_skipped"] is False and math.isfinite(m["loss"]) and m["loss"] == m["policy"]
    assert math.isfinite(m["reward/mean"]) and 0.0 < m["grad_norm"] < float("inf")


def test_failed_rewards_are_excluded_and_nan_updates_skipped(tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg(tmp_path, "run.max_nonfinite=2"))
    real = trainer.task.reward

    def flaky(video, prompts):
        out = real(video, prompts)
        out.total_b[0] = float("nan")
        return out

    monkeypatch.setattr(trainer.task, "reward", flaky)
    m = trainer.step()
    assert m["reward/failed"] == 1 and m["update_skipped"] is False
    real_velocity = trainer.model.velocity
    monkeypatch.setattr(trainer.model, "forward", lambda *a, **k: real_velocity(*a, **k) * float("nan"))
    before = trainable_state(trainer)
    assert trainer.step()["update_skipped"] is True
    for name, value in trainable_state(trainer).items():
        assert torch.equal(value, before[name])
    with pytest.raises(FloatingPointError, match="2 consecutive updates"):
        trainer.step()


def test_a_batch_without_any_finite_reward_skips_the_update_and_counts(tmp_path, monkeypatch):
    from sage_fast.task import RewardResult

    trainer = Trainer(tiny_cfg(tmp_path, "run.max_nonfinite=2"))
    trainer.step()  # Adam has momentum now: a step on zero gradients would still move the policy
    monkeypatch.setattr(trainer.task, "reward", lambda video, prompts: RewardResult(
        total_b=torch.full((video.shape[0],), float("nan")), scores={}, error="RuntimeError: reward server down"))
    before = trainable_state(trainer)
    m = trainer.step()
    assert m["update_skipped"] is True and m["reward/failed"] == 4 and trainer.skips.total == 1
    for name, value in trainable_state(trainer).items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(FloatingPointError, match="reward server down"):
        trainer.step()


@pytest.mark.parametrize("override, match", [
    (["grpo.group_size=3"], "grpo.group_size=3 must divide the global batch"),
    (["grpo.kl_mode=kl"], "grpo.kl_mode must be one of"),
    (["sampler.eta=-1"], "sampler.eta must be >= 0"),
    (["sampler.sde_type=ddim"], "sampler.sde_type must be one of"),
    (["grpo.train_steps=9"], "exceeds the 4 steps of the SDE window"),
    (["model.architecture_overrides={}", "model.checkpoint=/nonexistent/tiny_world"], "does not exist"),
    (["dist.sp=3"], "dist.sp"),
    (["grpo.adv_std=global"], "grpo.adv_std must be one of"),
    (["grpo.group_noise=same"], "grpo.group_noise must be one of"),
])
def test_bad_configs_fail_before_any_work(tmp_path, override, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        Trainer(tiny_cfg(tmp_path, *override))


def test_too_many_evaluation_prompts_fail_in_the_config_check(tmp_path, capsys):
    # the grammar has 144 one-object prompts; 256 training prompts leave far fewer than 200 of them
    assert main(TINY + [f"run.output_dir={tmp_path}/run", "world.num_train_prompts=256",
                        "world.num_eval_prompts=400"]) == 2
    assert "world.num_eval_prompts=400" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_slow_rank_does_not_take_rank_zeros_new_folder_for_an_old_run(tmp_path):
    """Every rank checks the folder before rank 0 creates it (a barrier between): rank 1, slower
    here by 0.3 s, must not find rank 0's fresh config.json and refuse to start."""
    import threading
    import time

    cfg = tiny_cfg(tmp_path)
    barrier, errors = threading.Barrier(2), []

    def rank(r):
        try:
            if r == 1:
                time.sleep(0.3)
            prepare_run_dir(cfg, r, barrier=barrier.wait)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert (Path(cfg.run.output_dir) / "config.json").exists()


def test_run_folder_is_never_overwritten_silently(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    prepare_run_dir(cfg)
    (Path(cfg.run.output_dir) / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        prepare_run_dir(cfg)
    with pytest.raises(ValueError, match="no checkpoint .* to resume from"):
        prepare_run_dir(C.apply_overrides(cfg, ["run.resume=true"]))
    assert main(TINY + [f"run.output_dir={cfg.run.output_dir}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (Path(cfg.run.output_dir) / "keep.txt").exists()


def test_names_cannot_escape_the_run_folder(tmp_path):
    from sage_fast.report import run_path

    assert run_path(tmp_path, "samples", "x").parent == (tmp_path / "samples").resolve()
    with pytest.raises(ValueError, match="outside the run folder"):
        run_path(tmp_path, "..", "x")


def test_cli_runs_evaluates_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "cli"
    args = TINY + [f"run.output_dir={out}", "run.steps=2", "run.eval_every=1", "run.save_every=1",
                   "run.save_videos=true"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2]
    assert [r["iteration"] for r in records if r["kind"] == "eval"] == [0, 1, 2]
    assert (out / "summary.png").stat().st_size > 0 and (out / "samples" / "eval_00002.gif").exists()
    assert json.loads((out / "config.json").read_text())["grpo"]["group_size"] == 2
    assert main(args[:-4] + ["run.steps=3", "run.eval_every=1", "run.save_every=1", "--resume"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    # the end of a run: the paired verdict over the whole (resumed) run, the before/after picture
    # from the first evaluation kept on disk, and the exported policy
    summary = json.loads((out / "summary.json").read_text())
    assert summary["learning"]["first_iteration"] == 0 and summary["learning"]["last_iteration"] == 3
    assert summary["learning"]["dimensions"]["eval/reward"]["prompts"] == 2
    assert (out / "samples" / "compare.png").stat().st_size > 0 and summary["compare"]
    assert (out / "final_model" / "config.json").exists() and (out / "final_model" / "adapter").is_dir()


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.dist
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "sp", "sp_fsdp2", "ddp_shared", pytest.param(
    "deepspeed_zero2", marks=pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed"))])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(tmp_path, strategy):
    """2 ranks (data parallel, or one Ulysses sp=2 group) == 1 rank (gradients), and 1 + 1
    iterations with a resume == 2 on both ranks."""
    script = ROOT / "tests" / "dist" / "trainer.py"
    env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), strategy], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"OK trainer {strategy}") == 2, proc.stdout[-2000:]
    assert proc.stdout.count(f"OK resume {strategy}") == 2, proc.stdout[-2000:]


@pytest.mark.dist
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_cli_on_two_ranks_evaluates_on_every_rank_under_fsdp2_and_sp(tmp_path):
    """The evaluation forward is a collective under FSDP2 and Ulysses: every rank must run it
    (rank 0 alone used to leave the other rank in the rollout: a collective mismatch)."""
    env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1")
    args = TINY + [f"run.output_dir={tmp_path}/run", "run.steps=2", "run.eval_every=1", "dist.strategy=fsdp2",
                   "dist.sp=2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sage_fast.train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r.get("kind") == "eval"] == [0, 1, 2]


def _hist(*rows):
    return [{"iteration": i, "eval/reward": sum(r) / len(r), "per_prompt": {"eval/reward": list(r), "eval/vq": list(q),
                                                                          "eval/mq": list(q)}}
            for i, (r, q) in enumerate(rows)]


def test_learning_summary_is_a_paired_test():
    from sage_fast.report import learning_summary

    base = [0.1 * i for i in range(16)]
    same_q = [0.9] * 16
    rise = learning_summary(_hist((base, same_q), ([b + 0.05 + 0.001 * (i % 3) for i, b in enumerate(base)], same_q)))
    d = rise["dimensions"]["eval/reward"]
    assert rise["learned"] and d["prompts"] == 16 and abs(d["diff"] - (0.05 + 0.001 * 15 / 16)) < 1e-9
    assert d["z"] > 5
    # the same mean rise, but as noise across prompts: not significant
    noisy = learning_summary(_hist((base, same_q), ([b + (0.6 if i % 2 else -0.5) for i, b in enumerate(base)],
                                                     same_q)))
    assert not noisy["learned"] and "z =" in noisy["why"]
    # a rise bought with visual quality: the guard fails
    broken = learning_summary(_hist((base, same_q), ([b + 0.05 + 0.001 * (i % 3) for i, b in enumerate(base)],
                                                      [0.8 + 0.001 * (i % 3) for i in range(16)])))
    assert not broken["learned"] and "guard eval/vq" in broken["why"]
    # a failed (NaN) prompt drops out of the pairs
    nan = learning_summary(_hist((base, same_q), ([float("nan")] + [b + 0.05 for b in base[1:]], same_q)))
    assert nan["dimensions"]["eval/reward"]["prompts"] == 15
    assert learning_summary(_hist((base, same_q)))["learned"] is None
    # a guard the task has but the last evaluation lacks is unknown, not held
    gone = _hist((base, same_q), ([b + 0.05 + 0.001 * (i % 3) for i, b in enumerate(base)], same_q))
    del gone[-1]["per_prompt"]["eval/mq"]
    assert not learning_summary(gone)["learned"] and "guard eval/mq unknown" in learning_summary(gone)["why"]
    # evaluations of other prompts or noise (a resumed run with a changed config) are not paired
    keyed = _hist((base, same_q), (base, same_q), ([b + 0.05 + 0.001 * (i % 3) for i, b in enumerate(base)], same_q))
    keyed[0]["eval_key"] = "old"
    assert learning_summary(keyed)["first_iteration"] == 1


def test_plot_and_compare_pictures(tmp_path):
    from sage_fast.report import plot_history, save_compare

    hist = _hist(([0.1, 0.2, 0.3], [0.9] * 3), ([0.2, 0.2, 0.5], [0.8] * 3))
    assert plot_history(hist, tmp_path / "s.png").stat().st_size > 0
    video = torch.rand(3, 3, 5, 8, 8) * 2 - 1
    path = save_compare(video, -video, ["a red square moving left"] * 3, tmp_path / "c.png", scores=([1, 2, 3], [3, 2, 1]))
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="one shape"):
        save_compare(video, video[:2], ["p"] * 3, tmp_path / "d.png")


def test_world_evaluation_prompts_are_held_out(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "world.num_eval_prompts=64", "world.num_train_prompts=256"))
    ev = trainer.task.eval_prompts
    assert len(ev) == len(set(ev)) == 64 and not set(ev) & set(trainer.task.train_prompts)
    assert sum(" and " in p for p in ev) == 32  # the two-object share of world.two_object_prob = 0.5


def test_shared_group_noise_starts_a_group_from_one_noise(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "grpo.group_noise=shared", "grpo.adv_std=batch"))
    batch = trainer.rollout(0)
    traj, adv = batch.traj, batch.adv
    x0, final = traj.latents[0], traj.final
    G = trainer.cfg.grpo.group_size
    own = trainer.engine.initial_noise(x0.shape, traj.seed, 0, x0.shape[0], "cpu")
    for b in range(x0.shape[0]):
        assert torch.equal(x0[b], own[b // G * G])  # the group's first member's noise
    assert not torch.equal(final[0], final[1])  # the SDE steps' noise is each sample's own
    independent = Trainer(tiny_cfg(tmp_path / "i")).rollout(0).traj
    assert torch.equal(independent.latents[0], own) and not torch.equal(independent.latents[0][1], own[0])
    assert adv.adv_b.abs().sum() > 0 and torch.allclose(adv.group_std_b, adv.group_std_b[0].expand(4))


def test_deepspeed_strategy_errors_name_the_field(monkeypatch):
    from sage_fast.parallel.strategy import _deepspeed_zero2

    with pytest.raises(ValueError, match="dist.sp"):
        C.apply_overrides(C.get_recipe("tiny_world"), ["dist.strategy=deepspeed_zero2", "dist.sp=2"])
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # restored afterwards (the call sets it on CPU)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed: import raises ImportError
    with pytest.raises(ValueError, match="dist.strategy='deepspeed_zero2' needs the deepspeed package"):
        _deepspeed_zero2(torch.nn.Linear(2, 2), None, 1.0, torch.device("cpu"))
