"""The Wan recipes (wan21_t2v_1.3b_480p, wan22_a14b_t2v_480p) through the trainer, on tiny random
Wan pipelines built offline: a few iterations end to end, the policy moves (both experts'
LoRA under Wan 2.2), an evaluation, and a resume that continues exactly; the recipes' settings;
config mistakes that name the field; on 2 ranks (tests/dist/wan_parallel.py), Ulysses and FSDP2
equal one process, one expert and two."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sage_fast import config as C
from sage_fast import train_config
from sage_fast.models.tiny_wan_pipeline import save_tiny_wan_pipeline

REWARD = '''import torch

def brightness(video, prompts):
    return {"brightness": video.float().mean(dim=(1, 2, 3, 4))}
'''


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("wan21"))


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("wan22"), two_experts=True)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """The reward `python=wan_test_reward:brightness`, importable from tmp_path."""
    (tmp_path / "wan_test_reward.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("wan_test_reward", None)
    return "python=wan_test_reward:brightness"


def _cfg(recipe, folder, out, reward, *extra):
    return C.apply_overrides(C.get_recipe(recipe), [
        f"video.pipeline={folder}", f"model.checkpoint={folder}", f"video.prompt_file={folder / 'prompts.txt'}",
        f"video.reward={reward}", "video.frames=5", "video.height=32", "video.width=32", "video.dtype=float32",
        "video.num_eval_prompts=2", "model.autocast_dtype=none", "model.gradient_checkpointing=false",
        "model.lora_rank=4", "model.lora_alpha=4", "sampler.num_steps=4", "grpo.samples_per_rank=4",
        "grpo.group_size=2", "grpo.train_steps=3", "grpo.micro_batch=3", "grpo.clip_range=0.01", "optim.lr=0.01",
        "dist.strategy=ddp", "run.eval_every=100", "run.save_every=100", "run.tensorboard=false",
        "run.save_videos=false", "run.device=cpu", f"run.output_dir={out}", *extra])


def test_wan_recipes_hold_the_published_settings():
    a = C.get_recipe("wan21_t2v_1.3b_480p")
    assert (a.video.frames, a.video.height, a.video.width) == (81, 480, 832)
    assert (a.sampler.shift, a.sampler.cfg_scale, a.grpo.group_size) == (3.0, 5.0, 8)
    assert a.task.kind == "wan" and a.model.family == "wan" and a.sampler.sde_type == "sage_grpo"
    b = C.get_recipe("wan22_a14b_t2v_480p")
    assert (b.sampler.shift, b.sampler.cfg_scale, b.model.low_noise_cfg_scale, b.model.experts) == (
        12.0, 4.0, 3.0, "both")
    assert a.model.low_noise_cfg_scale is None  # one expert
    assert a.run.export_final and b.run.export_final
    assert (a.video.dtype, a.video.vae_dtype) == (b.video.dtype, b.video.vae_dtype) == ("bfloat16", "float32")
    assert b.task.kind == "wan" and b.grpo.kl_mode == "dual_moving"


def test_wan_task_needs_the_wan_family(wan21, tmp_path, reward_module):
    with pytest.raises(ValueError, match="model.family"):
        _cfg("wan21_t2v_1.3b_480p", wan21, tmp_path, reward_module, "model.family=hunyuanvideo15")
    # DeepSpeed ZeRO-2 is not wired for Wan: refused, never half-run; FSDP2 and Ulysses are
    with pytest.raises(ValueError, match="model.family='wan' runs with dist.strategy='ddp' or 'fsdp2'"):
        _cfg("wan21_t2v_1.3b_480p", wan21, tmp_path, reward_module, "dist.strategy=deepspeed_zero2")
    cfg = _cfg("wan21_t2v_1.3b_480p", wan21, tmp_path, reward_module, "dist.strategy=fsdp2", "dist.sp=2")
    assert (cfg.dist.strategy, cfg.dist.sp) == ("fsdp2", 2)
    clip = tmp_path / "clip"
    clip.mkdir()
    with pytest.raises(ValueError, match=r"video.eval_metrics repeats the reward's \['clip_score'\]"):
        train_config.check_paths(_cfg("wan21_t2v_1.3b_480p", wan21, tmp_path, f"clip_score={clip}",
                                      f"video.eval_metrics=clip_score={clip}"))
    with pytest.raises(ValueError, match="video.pipeline"):
        train_config.check_paths(_cfg("wan21_t2v_1.3b_480p", wan21, tmp_path, reward_module,
                                      f"video.pipeline={tmp_path / 'nowhere'}"))
    with pytest.raises(ValueError, match=r"model\.low_noise_cfg_scale=3\.0 has no effect with sampler\.cfg_scale=1"):
        _cfg("wan22_a14b_t2v_480p", wan21, tmp_path, reward_module, "sampler.cfg_scale=1")


def test_the_vae_runs_in_its_own_dtype(wan21, tmp_path, reward_module):
    """video.vae_dtype: the VAE in float32 beside a bf16 text encoder (diffusers' Wan examples);
    None keeps video.dtype for both; a dtype outside the list is refused, naming the field."""
    from sage_fast.models import load_wan_transformer
    from sage_fast.task import WanTask

    config = load_wan_transformer(wan21).config
    for vae_dtype, want in (("float32", torch.float32), ("none", torch.bfloat16)):
        cfg = _cfg("wan21_t2v_1.3b_480p", wan21, tmp_path, reward_module, "video.dtype=bfloat16",
                   f"video.vae_dtype={vae_dtype}")
        task = WanTask(cfg.video, config)
        assert task.decoder.dtype == want and next(task.decoder.vae.parameters()).dtype == want
        assert task.encoder.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"video\.vae_dtype must be one of .*, got 'float8'"):
        _cfg("wan21_t2v_1.3b_480p", wan21, tmp_path, reward_module, "video.vae_dtype=float8")


def _run(cfg, iterations):
    from sage_fast.trainer import Trainer

    trainer = Trainer(cfg)
    return trainer, [trainer.step() for _ in range(iterations)]


@pytest.mark.parametrize("recipe", ["wan21_t2v_1.3b_480p", "wan22_a14b_t2v_480p"])
def test_trainer_runs_the_wan_recipe_and_resumes_exactly(recipe, wan21, wan22, tmp_path, reward_module):
    folder = wan22 if recipe.startswith("wan22") else wan21
    cfg = _cfg(recipe, folder, tmp_path / "straight", reward_module)
    train_config.check_paths(cfg)
    from sage_fast.trainer import Trainer

    trainer = Trainer(cfg)
    assert tuple(trainer.task.latent_shape) == (trainer.model.transformer.config.in_channels, 2, 4, 4)
    assert trainer.task.encoder.released
    before = {n: p.detach().clone() for n, p in trainer.trainable}
    straight = [trainer.step() for _ in range(2)]
    for m in straight:
        assert torch.isfinite(torch.tensor([m["loss"], m["reward/mean"], m["grad_norm"]])).all(), m
        assert not m["update_skipped"]
    moved = {n for n, p in trainer.trainable if not torch.equal(p.detach(), before[n])}
    assert moved
    if recipe.startswith("wan22"):  # each expert has its own LoRA and both are trained
        assert any(n.startswith("transformer_2.") for n in moved), sorted(moved)[:4]
        assert any(n.startswith("transformer.") for n in moved), sorted(moved)[:4]
    ev = trainer.evaluate()
    assert "eval/brightness" in ev and "eval/manifold_distance" not in ev

    first = Trainer(_cfg(recipe, folder, tmp_path / "resumed", reward_module))
    first.step()
    first.save()
    second = Trainer(_cfg(recipe, folder, tmp_path / "resumed", reward_module))
    assert second.resume() and second.iteration == 1
    m = second.step()
    assert m["loss"] == straight[1]["loss"] and m["reward/mean"] == straight[1]["reward/mean"]
    for (name, a), (_, b) in zip(trainer.trainable, second.trainable):
        assert torch.equal(a.detach(), b.detach()), name


@pytest.mark.dist
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_ranks_ulysses_and_fsdp2_equal_one_process_for_wan(wan21, wan22, tmp_path, reward_module):
    """Ulysses sp=2 (velocity, LoRA gradients; one expert and two), FSDP2 with two experts whose
    rows differ per rank, FSDP2 over Ulysses, and the Wan 2.1 / 2.2 trainers under fsdp2 (2 x 2
    samples == 1 x 4, and 1 + 1 iterations == 2 bitwise): tests/dist/wan_parallel.py."""
    root = Path(__file__).resolve().parents[1]
    modes = ("sp", "fsdp_experts", "fsdp_sp", "trainer", "trainer_experts")
    env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(root / "tests" / "dist" / "wan_parallel.py"), str(wan21), str(wan22),
                           str(tmp_path / "runs"), *modes], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    report = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "OK" in line or "FAIL" in line
                       or "  " in line and ("err" in line or "diff" in line))
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{report or proc.stderr[-4000:]}"
    for mode in modes:
        assert f"OK {mode}:" in proc.stdout, f"no OK line for {mode}:\n{proc.stdout[-2000:]}"


@pytest.mark.parametrize("experts", ["high", "low"])
def test_one_trained_expert_trains_only_its_steps(experts, wan22, tmp_path, reward_module):
    """model.experts=high|low: the frozen expert's steps are never trained pairs (a micro-batch of
    them alone would have nothing to differentiate), and only the trained expert's LoRA moves."""
    from sage_fast.trainer import Trainer

    trainer = Trainer(_cfg("wan22_a14b_t2v_480p", wan22, tmp_path, reward_module, f"model.experts={experts}",
                           "grpo.micro_batch=1", "grpo.train_steps=1"))
    model, sig = trainer.model, trainer.engine.sigmas
    high = [t for t in trainer.trainable_steps if float((1000.0 * sig[t]).float()) >= model.boundary_timestep]
    assert trainer.trainable_steps and len(high) == (len(trainer.trainable_steps) if experts == "high" else 0)
    trained = "transformer." if experts == "high" else "transformer_2."
    assert all(n.startswith(trained) for n, _ in trainer.trainable)
    before = {n: p.detach().clone() for n, p in trainer.trainable}
    for _ in range(2):
        m = trainer.step()
        assert not m["update_skipped"] and set(m["per_step"]["ratio"]) <= set(trainer.trainable_steps)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.trainable)


@pytest.mark.parametrize("experts", ["both", "high", "low"])
def test_export_writes_each_trained_expert_as_its_pipeline_part(experts, wan22, tmp_path, reward_module):
    """export_run of a Wan 2.2 run: OUT/transformer and / or OUT/transformer_2, the experts that
    trained, each a WanTransformer3DModel folder with the LoRA merged that diffusers reads, and
    its peft adapter (for the base's expert); with the base's frozen expert beside them they
    give the trained policy's velocity on both sides of the boundary, within the tolerance rule
    of float32 (the base does not); the export of the policy in memory (the run's final
    export), with its config or without, has the same experts and weights, bitwise."""
    import copy
    import json

    from diffusers import WanTransformer3DModel
    from peft import PeftModel
    from safetensors.torch import load_file
    from tiny_run import nudge_lora
    from tolerance import assert_within_baseline

    from sage_fast.export import export_policy, export_run
    from sage_fast.models import WanVelocityModel, load_wan_transformer
    from sage_fast.train import prepare_run_dir
    from sage_fast.trainer import Trainer

    cfg = _cfg("wan22_a14b_t2v_480p", wan22, tmp_path / "run", reward_module, f"model.experts={experts}")
    run = prepare_run_dir(cfg)
    trainer = Trainer(cfg)
    nudge_lora(trainer)
    trainer.save()  # iteration 0
    out = export_run(run, tmp_path / "out")
    written = {"both": ["transformer", "transformer_2"], "high": ["transformer"], "low": ["transformer_2"]}[experts]
    base = [sub for sub in ("transformer", "transformer_2") if sub not in written]
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["experts"] == {"written": written, "base": base}
    assert manifest["task"] == "wan" and manifest["pipeline"] == str(wan22) and manifest["merged"]
    assert manifest["guidance"] == {"cfg_scale": 4.0, "low_noise_cfg_scale": 3.0}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == written
    for sub in written:
        adapter_cfg = json.loads((out / sub / "adapter" / "adapter_config.json").read_text())
        assert adapter_cfg["base_model_name_or_path"] == str(wan22 / sub)
    parts = {sub: WanTransformer3DModel.from_pretrained(out / sub) for sub in written}
    adapters = {sub: PeftModel.from_pretrained(load_wan_transformer(wan22, sub), out / sub / "adapter").get_base_model()
                for sub in written}

    policy = trainer.model
    x = torch.randn((4,) + tuple(trainer.task.latent_shape), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999.0, 900.0, 500.0, 100.0])  # both sides of the boundary (875)
    prompts = trainer.task.eval_prompts + trainer.task.train_prompts[:2]
    cond, scale = trainer.task.conditioning(prompts), 4.0

    def wan(high, low):
        return WanVelocityModel(high, low, policy.boundary_timestep, autocast_dtype=None,
                                text_length=policy.text_length, low_noise_cfg_scale=policy.low_noise_cfg_scale)

    with torch.no_grad():
        ref64 = wan(copy.deepcopy(policy.transformer).double(), copy.deepcopy(policy.transformer_2).double()).velocity(
            x.double(), t.double(), cond.to(torch.float64), scale)
        v_policy = policy.velocity(x, t, cond, scale)
        for name, experts_out in (("merged", parts), ("adapter", adapters)):
            high = experts_out.get("transformer") or load_wan_transformer(wan22, "transformer")
            low = experts_out.get("transformer_2") or load_wan_transformer(wan22, "transformer_2")
            assert_within_baseline(f"wan export {name}", wan(high, low).velocity(x, t, cond, scale), v_policy, ref64,
                                   torch.float32)
        v_base = wan(load_wan_transformer(wan22), load_wan_transformer(wan22, "transformer_2")).velocity(
            x, t, cond, scale)
    assert float((v_policy - v_base).abs().max()) > 1e-2 * float(v_policy.abs().max())

    memory = export_policy(trainer, tmp_path / "memory")
    bare = export_policy(trainer.model, tmp_path / "bare")  # no cfg: the experts with LoRA are the trained ones
    assert json.loads((bare / "export.json").read_text())["experts"] == {"written": written, "base": base}
    for folder in (memory, bare):
        for sub in written:
            a = load_file(out / sub / "diffusion_pytorch_model.safetensors")
            b = load_file(folder / sub / "diffusion_pytorch_model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (folder, sub)
