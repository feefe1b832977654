"""sage_fast.export: a run's policy out as a plain diffusers folder (LoRA merged) plus the adapter,
read back by load_base_model, the evaluator, diffusers, peft and the trainer (CPU, tiny)."""

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from tiny_run import nudge_lora
from tolerance import assert_within_baseline

from sage_fast import config as C
from sage_fast import train_config
from sage_fast.export import export_policy, export_run, load_policy, main
from sage_fast.models import VelocityModel, load_transformer, random_conditioning
from sage_fast.train import prepare_run_dir
from sage_fast.trainer import Trainer
from sage_fast.world import load_base_model

BASE = train_config.tiny_world_checkpoint()
# the shipped base model, LoRA, at a few seconds a test: 4 samples, 4 sampler steps, 2 eval prompts
WORLD = ["world.num_eval_prompts=2", "world.num_train_prompts=8", "grpo.samples_per_rank=4", "grpo.group_size=2",
         "sampler.num_steps=4", "grpo.train_steps=2", "grpo.micro_batch=4", "optim.lr=0.01", "run.tensorboard=false",
         "run.save_videos=false", "run.device=cpu"]
TIMESTEPS = torch.tensor([40.0, 300.0, 650.0, 1000.0])  # mixed, one below the x-prediction sigma floor (50)


def _world_cfg(out, *extra):
    return C.apply_overrides(C.get_recipe("tiny_world"), WORLD + [f"run.output_dir={out}", *extra])


def _inputs(trainer, seed=0):
    prompts = trainer.task.eval_prompts + trainer.task.train_prompts[:2]
    cond = trainer.task.conditioning(prompts)
    x = torch.randn((len(prompts),) + tuple(trainer.task.latent_shape), generator=torch.Generator().manual_seed(seed))
    return x, cond


@torch.no_grad()
def _velocity(model, x, cond, cfg_scale=3.0):
    return model.velocity(x, TIMESTEPS, cond, cfg_scale)


@torch.no_grad()
def _probe(model, x, cond, cfg_scale=3.0):
    """(the policy's float32 velocity, its float64 reference) on fixed inputs."""
    model64 = VelocityModel(copy.deepcopy(model.transformer).double(), autocast_dtype=None)
    return _velocity(model, x, cond, cfg_scale), model64.velocity(x.double(), TIMESTEPS, cond.to(torch.float64),
                                                                  cfg_scale)


def _weights(folder):
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A LoRA run on the shipped base model, checkpoints at iterations 1 and 2 (the LoRA B weights
    perturbed in between, so the merged deltas are far above float32 rounding)."""
    root = tmp_path_factory.mktemp("world")
    cfg = _world_cfg(root / "run", "run.steps=2")
    run = prepare_run_dir(cfg)  # config.json, as python -m sage_fast.train writes it
    trainer = Trainer(cfg)
    x, cond = _inputs(trainer)
    trainer.step()
    trainer.save()
    probes = {1: _probe(trainer.model, x, cond)}
    states = {1: {n: p.detach().clone() for n, p in trainer.trainable}}
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in trainer.trainable:
            if "lora_B" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    trainer.step()
    trainer.save()
    probes[2] = _probe(trainer.model, x, cond)
    states[2] = {n: p.detach().clone() for n, p in trainer.trainable}
    return {"run": run, "trainer": trainer, "x": x, "cond": cond, "probes": probes, "states": states, "root": root}


@pytest.fixture(scope="module")
def world_export(world_run):
    return export_run(world_run["run"], world_run["root"] / "export")


def test_merged_export_velocity_equals_the_trained_policy_and_not_the_base(world_run, world_export):
    x, cond = world_run["x"], world_run["cond"]
    v_policy, ref64 = world_run["probes"][2]
    model, _, _ = load_base_model(world_export)
    v_export = _velocity(model, x, cond)
    assert_within_baseline("merged export", v_export, v_policy, ref64, torch.float32)
    base, _, _ = load_base_model(BASE)
    v_base = _velocity(base, x, cond)
    # the test can fail: the trained deltas move the velocity far beyond the merge's rounding
    assert float((v_policy - v_base).abs().max()) > 1000 * float((v_export - v_policy).abs().max())
    assert float((v_policy - v_base).abs().max()) > 1e-2 * float(v_policy.abs().max())
    weights = _weights(world_export)
    assert not [k for k in weights if "lora" in k or "base_layer" in k]  # a plain diffusers state dict
    assert set(weights) == set(load_transformer(BASE).state_dict())
    assert all(t.dtype == torch.float32 for t in weights.values())
    manifest = json.loads((world_export / "export.json").read_text())
    assert manifest["iteration"] == 2 and manifest["merged"] and manifest["finetune"] == "lora"
    assert manifest["base_checkpoint"] == str(BASE.resolve())
    assert manifest["source_run"] == str(world_run["run"].resolve())


def test_diffusers_from_pretrained_reads_the_export(world_run, world_export):
    from diffusers import HunyuanVideo15Transformer3DModel

    transformer = HunyuanVideo15Transformer3DModel.from_pretrained(world_export)
    v_policy, ref64 = world_run["probes"][2]
    v = _velocity(VelocityModel(transformer, autocast_dtype=None), world_run["x"], world_run["cond"])
    assert_within_baseline("from_pretrained", v, v_policy, ref64, torch.float32)  # prediction key kept


def test_adapter_reloads_through_peft_onto_the_base(world_run, world_export):
    from peft import PeftModel

    adapter = world_export / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 8.0, "LORA")
    assert config["base_model_name_or_path"] == str(BASE) and config["inference_mode"] is True
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    trained = world_run["states"][2]
    # PeftModel.save_pretrained's names: "base_model.model.<module>.lora_A.weight", the adapter name dropped
    assert set(saved) == {"base_model.model." + n.removeprefix("transformer.").replace(".default.", ".")
                          for n in trained}
    for n, value in trained.items():
        assert torch.equal(saved["base_model.model." + n.removeprefix("transformer.").replace(".default.", ".")], value)
    peft_model = PeftModel.from_pretrained(load_transformer(BASE), adapter)
    v = _velocity(VelocityModel(peft_model.get_base_model(), autocast_dtype=None), world_run["x"], world_run["cond"])
    v_policy, ref64 = world_run["probes"][2]
    assert_within_baseline("peft adapter", v, v_policy, ref64, torch.float32)


def test_load_base_model_and_the_evaluator_read_the_export(world_run, world_export, tmp_path, monkeypatch):
    import functools

    from sage_fast.world import evaluate, model_card

    _, encoder, world = load_base_model(world_export)
    assert (world_export / "world.json").read_bytes() == (BASE / "world.json").read_bytes()
    prompts = world_run["trainer"].task.eval_prompts
    want = world_run["trainer"].task.conditioning(prompts).prompt.embeds_bld
    assert torch.equal(encoder.conditioning(prompts).prompt.embeds_bld, want)
    folder = shutil.copytree(world_export, tmp_path / "export")  # the evaluator writes its card into the folder
    # 8 prompts: the picture grid shows 8 rows
    # the CLI as it is, less its CFG sweep (3 more sampling passes: 9 s instead of 3 on one thread)
    monkeypatch.setattr(model_card, "write_model_card", functools.partial(model_card.write_model_card, cfg_scales=()))
    threads = torch.get_num_threads()
    try:
        evaluate.main(["--checkpoint", str(folder), "--prompts", "8", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    card = (folder / "MODEL_CARD.md").read_text()
    assert "GRPO policy" in card and "iteration 2" in card and str(world_run["run"].resolve()) in card
    assert set(json.loads((folder / "eval.json").read_text())["headroom"]) == {"vq", "mq", "ta"}


def test_the_export_is_the_base_model_of_a_new_run(world_run, world_export, tmp_path):
    cfg = _world_cfg(tmp_path / "run2", f"model.checkpoint={world_export}")
    train_config.check_paths(cfg)
    trainer = Trainer(cfg)  # WorldTask checks the copied world.json against world.*
    v_policy, ref64 = world_run["probes"][2]
    v = _velocity(trainer.model, world_run["x"], world_run["cond"])  # fresh LoRA (B = 0): the exported policy
    assert_within_baseline("new run", v, v_policy, ref64, torch.float32)


def test_step_selects_the_checkpoint(world_run, world_export, tmp_path):
    out = export_run(world_run["run"], tmp_path / "step1", step=1)
    assert json.loads((out / "export.json").read_text())["iteration"] == 1
    loaded = load_policy(world_run["run"], step=1)
    assert loaded.iteration == 1 and loaded.checkpoint.name == "step_00000001"
    for n, p in loaded.model.named_parameters():
        if p.dtype.is_floating_point and n in world_run["states"][1]:
            assert torch.equal(p, world_run["states"][1][n]), n
    model, _, _ = load_base_model(out)
    v = _velocity(model, world_run["x"], world_run["cond"])
    v1, ref1 = world_run["probes"][1]
    assert_within_baseline("step 1", v, v1, ref1, torch.float32)
    v2, _ = world_run["probes"][2]
    assert float((v - v2).abs().max()) > 1e-2 * float(v2.abs().max())  # not the latest
    assert load_policy(world_run["run"]).iteration == 2


def test_sharded_and_half_precision_exports_load(world_run, world_export, tmp_path):
    full = _weights(world_export)
    out = export_run(world_run["run"], tmp_path / "sharded", max_shard_bytes=4_000_000)  # 25 MB -> ~7 shards
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(full)
    loaded = load_transformer(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in full.items())
    out = export_run(world_run["run"], tmp_path / "bf16", dtype="bfloat16")
    half = _weights(out)
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert all(torch.equal(half[k], v.to(torch.bfloat16)) for k, v in full.items())
    assert json.loads((out / "export.json").read_text())["dtype"] == "bfloat16"


def test_cli_exports_and_names_every_problem(world_run, tmp_path, capsys):
    run = world_run["run"]
    out = tmp_path / "out"
    assert main([str(run), str(out)]) == 0
    assert json.loads((out / "export.json").read_text())["iteration"] == 2  # the latest by default
    capsys.readouterr()
    assert main([str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert main([str(run), "--step", "1", str(out), "--overwrite"]) == 0
    assert json.loads((out / "export.json").read_text())["iteration"] == 1
    capsys.readouterr()
    assert main([str(run), str(tmp_path / "bad"), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "step 7" in err and "[1, 2]" in err and not (tmp_path / "bad").exists()
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(run / "config.json", empty / "config.json")
    assert main([str(empty), str(tmp_path / "o3")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "o4")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main([str(run), str(run / "export")]) == 2  # never inside the run (--overwrite would delete it)
    assert "overlaps" in capsys.readouterr().err
    assert main([str(run), str(BASE), "--overwrite"]) == 2  # never over the base model
    assert "overlaps" in capsys.readouterr().err and (BASE / "world.json").exists()


def test_full_fine_tuning_of_a_random_init_exports_the_weights_and_a_world_json(tmp_path):
    from test_trainer import TINY

    cfg = C.apply_overrides(C.get_recipe("tiny_world"),
                            TINY + [f"run.output_dir={tmp_path}/run", "model.finetune=full", "run.steps=1"])
    prepare_run_dir(cfg)
    trainer = Trainer(cfg)
    trainer.step()
    trainer.save()
    out = export_run(tmp_path / "run", tmp_path / "out")
    assert not (out / "adapter").exists()
    manifest = json.loads((out / "export.json").read_text())
    assert (manifest["finetune"], manifest["merged"], manifest["adapter"], manifest["base_checkpoint"]) == \
        ("full", False, None, None)
    weights = _weights(out)
    trained = {n.removeprefix("transformer."): p for n, p in trainer.trainable}
    assert set(weights) == set(trained) and all(torch.equal(weights[n], p) for n, p in trained.items())
    model, encoder, world = load_base_model(out)  # world.json written from the run config
    assert (world["frames"], world["height"], world["width"], world["text_encoder_seed"]) == (5, 16, 16, 0)
    prompts = trainer.task.eval_prompts
    assert torch.equal(encoder.conditioning(prompts).prompt.embeds_bld,
                       trainer.task.conditioning(prompts).prompt.embeds_bld)
    x, cond = _inputs(trainer)
    v_policy, ref64 = _probe(trainer.model, x, cond, 2.0)
    assert_within_baseline("full export", _velocity(model, x, cond, 2.0), v_policy, ref64, torch.float32)
    # the in-memory path (a Trainer) writes the same weights
    same = export_policy(trainer, tmp_path / "from_trainer")
    assert all(torch.equal(v, weights[k]) for k, v in _weights(same).items())
    assert json.loads((same / "export.json").read_text())["iteration"] == 1


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from sage_fast.models.tiny_pipeline import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_hv15"))


def test_hunyuanvideo15_run_exports_a_transformer_folder_diffusers_loads(tiny_pipeline, tmp_path):
    from diffusers import HunyuanVideo15Transformer3DModel
    from peft import PeftModel
    from test_video_task import _overrides

    cfg = C.apply_overrides(C.get_recipe("hunyuanvideo15_480p"), _overrides(tiny_pipeline, tmp_path) + [
        "model.finetune=lora", "model.lora_rank=4", "model.lora_alpha=8", "model.gradient_checkpointing=false"])
    run = prepare_run_dir(cfg)
    trainer = Trainer(cfg)
    nudge_lora(trainer)
    trainer.save()  # iteration 0
    out = export_run(run, tmp_path / "out")
    assert not (out / "world.json").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["task"] == "hunyuanvideo15" and manifest["pipeline"] == str(tiny_pipeline)
    transformer = HunyuanVideo15Transformer3DModel.from_pretrained(out)
    cond = random_conditioning(transformer.config, 2, generator=torch.Generator().manual_seed(0))
    x = torch.randn((2,) + tuple(trainer.task.latent_shape), generator=torch.Generator().manual_seed(1))
    timesteps, scale = TIMESTEPS[:2], 6.0
    with torch.no_grad():
        model64 = VelocityModel(copy.deepcopy(trainer.model.transformer).double(), autocast_dtype=None)
        ref64 = model64.velocity(x.double(), timesteps, cond.to(torch.float64), scale)
        v_policy = trainer.model.velocity(x, timesteps, cond, scale)
        v_export = VelocityModel(transformer, autocast_dtype=None).velocity(x, timesteps, cond, scale)
        base = VelocityModel(load_transformer(tiny_pipeline), autocast_dtype=None)
        v_base = base.velocity(x, timesteps, cond, scale)
        peft_model = PeftModel.from_pretrained(load_transformer(tiny_pipeline), out / "adapter")
        v_adapter = VelocityModel(peft_model.get_base_model(), autocast_dtype=None).velocity(x, timesteps, cond, scale)
    assert_within_baseline("hv15 merged", v_export, v_policy, ref64, torch.float32)
    assert_within_baseline("hv15 adapter", v_adapter, v_policy, ref64, torch.float32)
    assert float((v_policy - v_base).abs().max()) > 1e-2 * float(v_policy.abs().max())
