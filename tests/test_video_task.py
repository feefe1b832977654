"""The real-model path (recipe hunyuanvideo15_480p) on a tiny random pipeline built offline:
prompt encoding equals diffusers' pipeline, trimming the text padding leaves the velocity
unchanged, VAE decoding, rewards (CLIPScore against CLIPModel's own logits, python plug-ins,
weights), path checks that name the field, and the trainer running the recipe end to end."""

import json
import sys

import pytest
import torch

from sage_fast import config as C
from sage_fast import train_config
from sage_fast.models.tiny_pipeline import PROMPTS, TINY_LATENT_CHANNELS, save_tiny_pipeline
from sage_fast.rewards import RewardParts, build_reward, parse_reward_spec, parse_weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_hv15"))


@pytest.fixture(scope="module")
def encoder(tiny):
    from sage_fast.models.hunyuan_pipeline import PromptEncoder

    return PromptEncoder(tiny, dtype=torch.float32)


def test_prompt_encoder_equals_the_diffusers_pipeline_and_trims_only_padding(tiny, encoder):
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline

    from sage_fast.models import load_transformer
    from sage_fast.models.hunyuan_pipeline import VideoDecoder

    pipe = HunyuanVideo15Pipeline(text_encoder=encoder.text_encoder, tokenizer=encoder.tokenizer,
                                  transformer=load_transformer(tiny), vae=VideoDecoder(tiny, dtype=torch.float32).vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=encoder.text_encoder_2,
                                  tokenizer_2=encoder.tokenizer_2, guider=ClassifierFreeGuidance())
    prompts = [PROMPTS[0], 'a sign that reads "OPEN" above a door', ""]
    with torch.no_grad():  # as the encoder runs (no_grad and grad may pick different SDPA kernels)
        emb, mask, emb_2, mask_2 = pipe.encode_prompt(prompts, device=torch.device("cpu"), dtype=torch.float32,
                                                      batch_size=len(prompts))
    ours = encoder.encode(prompts)
    assert mask.shape[1] == encoder.MAX_LENGTH
    assert ours.mask_bl.shape[1] == int(mask.sum(1).max()) < encoder.MAX_LENGTH  # trimmed to the longest prompt
    for i in range(len(prompts)):
        n, n2 = int(ours.mask_bl[i].sum()), int(ours.mask_2_bl[i].sum())
        assert n == int(mask[i].sum()) and n2 == int(mask_2[i].sum())
        assert torch.equal(ours.embeds_bld[i, :n], emb[i, :n])
        if n2:
            assert torch.equal(ours.embeds_2_bld[i, :n2], emb_2[i, :n2])
    assert int(mask_2[0].sum()) == 0 and int(mask_2[1].sum()) > 0  # glyph text only for the quoted word


def test_trimmed_text_padding_leaves_the_velocity_unchanged(tiny, encoder):
    from sage_fast.models import Conditioning, TextEmbeddings, VelocityModelConfig, build_velocity_model

    model = build_velocity_model(VelocityModelConfig(checkpoint=str(tiny), finetune="full", autocast_dtype="none"))
    trimmed = encoder.encode(PROMPTS[:2])
    padded = TextEmbeddings(*(torch.nn.functional.pad(t, (0, 0, 0, 40) if t.dim() == 3 else (0, 40))
                              for t in (trimmed.embeds_bld, trimmed.mask_bl, trimmed.embeds_2_bld, trimmed.mask_2_bl)))
    x = torch.randn(2, TINY_LATENT_CHANNELS, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    negative = encoder.encode(["", ""])  # shorter than the prompts: CFG stacks streams of two lengths
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        a = model.velocity(x, t, Conditioning(prompt=trimmed))
        b = model.velocity(x, t, Conditioning(prompt=padded))
        a_cfg = model.velocity(x, t, Conditioning(prompt=trimmed, negative=negative), cfg_scale=4.0)
        b_cfg = model.velocity(x, t, Conditioning(prompt=padded, negative=negative), cfg_scale=4.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_cfg, b_cfg, rtol=1e-5, atol=1e-5)
    assert negative.mask_bl.shape[1] < trimmed.mask_bl.shape[1] and not torch.allclose(a, a_cfg)


def test_released_encoder_serves_the_cache_and_refuses_new_prompts(tiny):
    from sage_fast.models.hunyuan_pipeline import PromptEncoder

    enc = PromptEncoder(tiny, dtype=torch.float32)
    enc.encode_all(PROMPTS[:2])
    before = enc.encode(PROMPTS[:2])
    enc.release()
    after = enc.encode(PROMPTS[:2])
    assert torch.equal(before.embeds_bld, after.embeds_bld)
    with pytest.raises(RuntimeError, match="released"):
        enc.encode(["a prompt never seen"])


def test_video_decoder_shapes_range_and_errors(tiny):
    from diffusers import AutoencoderKLHunyuanVideo15

    from sage_fast.models.hunyuan_pipeline import VideoDecoder

    dec = VideoDecoder(tiny, dtype=torch.float32, tiling=False)
    assert dec.latent_shape(5, 32, 48) == (TINY_LATENT_CHANNELS, 2, 2, 3)
    z = torch.randn(2, TINY_LATENT_CHANNELS, 2, 2, 3, generator=torch.Generator().manual_seed(1))
    video = dec.decode(z)
    assert video.shape == (2, 3, 5, 32, 48) and video.dtype == torch.float32
    assert video.abs().max() <= 1.0
    vae = AutoencoderKLHunyuanVideo15.from_pretrained(tiny / "vae")
    with torch.no_grad():
        direct = vae.decode(z[1:] / vae.config.scaling_factor, return_dict=False)[0].clamp(-1, 1)
    torch.testing.assert_close(video[1:], direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="video.frames"):
        dec.latent_shape(6, 32, 32)
    with pytest.raises(ValueError, match="video.height"):
        dec.latent_shape(5, 40, 32)


def test_clip_score_equals_clip_models_own_similarity(tiny):
    from transformers import AutoTokenizer, CLIPModel

    from sage_fast.rewards.clip_score import ClipScore

    scorer = ClipScore.from_folder(tiny / "clip", frames=1)
    video = torch.rand(2, 3, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    got = scorer(video, PROMPTS[:2])["clip_score"]
    model, tok = CLIPModel.from_pretrained(tiny / "clip"), AutoTokenizer.from_pretrained(tiny / "clip")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = ((video[:, :, 0] + 1) / 2 - mean) / std  # 32 x 32 is the model's size: no resize
    with torch.no_grad():
        out = model(**tok(PROMPTS[:2], padding=True, return_tensors="pt"), pixel_values=pixels)
    expected = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert ClipScore(scorer.model, scorer.tokenizer, frames=8).pixels(torch.zeros(1, 3, 4, 48, 64)).shape == \
        (4, 3, 32, 32)  # every frame (4 < 8)


def test_clip_preprocessing_matches_transformers_image_processor(tiny):
    """Resize (shorter side), centre crop and normalisation against CLIP's own processor on a
    non-symmetric pattern. Tolerances: the processor rounds to uint8 and resizes with PIL's
    bicubic filter, ours with torch's antialiased bicubic (edge pixels differ by up to ~0.08 in
    normalised units); a misplaced crop or swapped axes is off by > 1."""
    from transformers import CLIPImageProcessor

    from sage_fast.rewards.clip_score import ClipScore

    scorer = ClipScore.from_folder(tiny / "clip", frames=1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 64), indexing="ij")
    frame = torch.stack([xx, yy, xx * yy])  # [3, 48, 64]
    img = ((frame + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = torch.tensor(proc(images=img, return_tensors="np")["pixel_values"])[0]
    video = (torch.tensor(img).permute(2, 0, 1).float() / 255 * 2 - 1)[None, :, None]
    diff = (scorer.pixels(video)[0] - ref).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.15, (float(diff.mean()), float(diff.max()))
    assert (scorer.pixels(video.flip(-1))[0] - ref).abs().max() > 1.0  # the check can tell a mirrored crop


def test_reward_spec_weights_and_python_parts(tmp_path, monkeypatch):
    assert parse_reward_spec("clip_score=/a, python=m.n:f") == [("clip_score", "/a"), ("python", "m.n:f")]
    for bad in ("", "videoalign=/x", "clip_score=", "python=nomodule"):
        with pytest.raises(ValueError, match="video.reward"):
            parse_reward_spec(bad)
    assert parse_weights("") is None and parse_weights('{"vq": 2}') == {"vq": 2.0}
    for bad in ("vq=2", "{}", '{"vq": NaN}', '{"vq": true}', "[1]"):
        with pytest.raises(ValueError, match="video.reward_weights"):
            parse_weights(bad)
    (tmp_path / "my_reward.py").write_text(
        "import torch\n"
        "def three(video, prompts):\n"
        "    m = video.mean((1, 2, 3, 4))\n"
        "    return {'vq': m, 'mq': 2 * m, 'ta': torch.tensor([float(len(p)) for p in prompts])}\n"
        "def one(video, prompts):\n"
        "    return video.amax((1, 2, 3, 4))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_reward", None)
    video = torch.rand(2, 3, 5, 8, 8)
    out = build_reward("python=my_reward:three,python=my_reward:one", '{"vq": 1, "ta": 0.5, "one": 2}')(
        video, ["ab", "abcd"])
    total, scores = out.total_b, out.scores
    assert set(scores) == {"vq", "mq", "ta", "one"}
    torch.testing.assert_close(total, scores["vq"] + 0.5 * scores["ta"] + 2 * scores["one"])
    total_default = build_reward("python=my_reward:three")(video, ["ab", "abcd"]).total_b
    torch.testing.assert_close(total_default, video.mean((1, 2, 3, 4)) * 3 + torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match="reward_weights names"):
        build_reward("python=my_reward:one", '{"vq": 1}')(video, ["a", "b"])
    with pytest.raises(ValueError, match="cannot import"):
        build_reward("python=no_such_module_xyz:f")
    with pytest.raises(ValueError, match="shape"):
        RewardParts([lambda v, p: {"x": torch.zeros(3)}])(video, ["a", "b"])


def _overrides(tiny, tmp_path):
    return [f"video.pipeline={tiny}", f"model.checkpoint={tiny}", f"video.prompt_file={tiny / 'prompts.txt'}",
            f"video.reward=clip_score={tiny / 'clip'}", "video.frames=5", "video.height=32", "video.width=32",
            "video.dtype=float32", "video.num_eval_prompts=2", "model.autocast_dtype=none",
            "model.attention_backend=sdpa", "sampler.num_steps=4", "grpo.samples_per_rank=4", "grpo.group_size=2",
            "grpo.train_steps=2", "grpo.micro_batch=2", "dist.sp=1", "dist.strategy=ddp", "run.eval_every=1",
            "run.save_every=100", "run.tensorboard=false", "run.save_videos=false", "run.device=cpu",
            f"run.output_dir={tmp_path}/run"]


def _recipe(tiny, tmp_path, *extra):
    return C.apply_overrides(C.get_recipe("hunyuanvideo15_480p"), _overrides(tiny, tmp_path) + list(extra))


def test_hunyuanvideo15_recipe_matches_the_paper_scale():
    cfg = C.get_recipe("hunyuanvideo15_480p")
    assert (cfg.video.frames, cfg.video.height, cfg.video.width) == (81, 480, 848)
    assert (cfg.sampler.num_steps, cfg.sampler.shift, cfg.sampler.cfg_scale) == (20, 5.0, 6.0)
    assert (cfg.grpo.samples_per_rank, cfg.grpo.group_size, cfg.dist.sp, cfg.dist.strategy) == (2, 4, 2, "fsdp2")
    assert cfg.task.kind == "hunyuanvideo15" and cfg.model.gradient_checkpointing


def test_trainer_runs_the_hunyuanvideo15_recipe_on_the_tiny_pipeline(tiny, tmp_path):
    from sage_fast.trainer import Trainer

    cfg = _recipe(tiny, tmp_path, "run.steps=2")
    train_config.check_paths(cfg)
    trainer = Trainer(cfg)
    assert tuple(trainer.task.latent_shape) == (TINY_LATENT_CHANNELS, 2, 2, 2)
    assert trainer.task.encoder.released
    before = {n: p.detach().clone() for n, p in trainer.trainable}
    metrics = [trainer.step() for _ in range(2)]
    for m in metrics:
        assert torch.isfinite(torch.tensor([m["loss"], m["reward/mean"]])).all()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.trainable)  # the policy moved
    ev = trainer.evaluate()
    assert set(ev) >= {"eval/reward", "eval/clip_score"} and "eval/manifold_distance" not in ev


def test_cli_runs_the_recipe_and_writes_the_run_folder(tiny, tmp_path):
    from sage_fast.train import main

    argv = ["--recipe", "hunyuanvideo15_480p"] + [a for a in _overrides(tiny, tmp_path) if a]
    assert main(argv + ["run.steps=2", "run.eval_every=1"]) == 0
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["task"]["kind"] == "hunyuanvideo15" and saved["video"]["frames"] == 5
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/clip_score" in json.dumps(r) for r in rows)
    assert (run / "summary.json").exists() and (run / "summary.png").exists()


def test_reward_configuration_mistakes_stop_the_run_model_failures_do_not(tiny, tmp_path):
    from sage_fast.rewards import RewardConfigError
    from sage_fast.task import HunyuanVideo15Task

    cfg = _recipe(tiny, tmp_path, 'video.reward_weights={"VQ": 1}')  # the CLIP part returns clip_score
    from sage_fast.models import load_transformer

    task = HunyuanVideo15Task(cfg.video, load_transformer(tiny).config)
    video = torch.zeros(2, 3, 5, 32, 32)
    with pytest.raises(RewardConfigError, match="reward_weights names"):
        task.reward(video, PROMPTS[:2])
    task.reward_fn.weights = None
    assert torch.isfinite(task.reward(video, PROMPTS[:2]).total_b).all()
    task.reward_fn.parts[0].model = None  # a broken reward model: NaN rows and the error, no crash
    out = task.reward(video, PROMPTS[:2])
    assert torch.isnan(out.total_b).all() and "AttributeError" in out.error


@pytest.mark.parametrize("override, field", [
    ("video.reward=python=no_such_reward_module_xyz:score", "no_such_reward_module_xyz"),
    ("video.pipeline={missing}", "video.pipeline"),
    ("model.checkpoint={missing}", "model.checkpoint"),
    ("video.prompt_file={missing}", "video.prompt_file"),
    ("video.reward=clip_score={missing}", "clip_score"),
])
def test_missing_paths_fail_before_any_work_naming_the_field(tiny, tmp_path, override, field):
    from sage_fast.train import main

    missing = tmp_path / "nope"
    cfg = _recipe(tiny, tmp_path, override.format(missing=missing))
    with pytest.raises(ValueError, match=field):
        train_config.check_paths(cfg)
    argv = ["--recipe", "hunyuanvideo15_480p", f"video.pipeline={tiny}", f"model.checkpoint={tiny}",
            f"video.prompt_file={tiny / 'prompts.txt'}", f"video.reward=clip_score={tiny / 'clip'}",
            f"run.output_dir={tmp_path}/cli", override.format(missing=missing)]
    assert main(argv) == 2
    assert not (tmp_path / "cli").exists()  # nothing written


def test_task_kind_and_video_fields_are_validated():
    with pytest.raises(ValueError, match="task.kind"):
        C.apply_overrides(C.get_recipe("tiny_world"), ["task.kind=sora"])
    with pytest.raises(ValueError, match="video.height"):
        C.apply_overrides(C.get_recipe("hunyuanvideo15_480p"), ["video.height=500"])
    with pytest.raises(ValueError, match="video.dtype"):
        C.apply_overrides(C.get_recipe("hunyuanvideo15_480p"), ["video.dtype=int8"])
