"""The synthetic world: renderer, codec, prompts and encoder, rewards, manifold distance, pretraining."""

import dataclasses
import json
import math

import pytest
import torch

from sage_fast.world import codec
from sage_fast.world.manifold import fit_scene, manifold_distance
from sage_fast.world.prompts import (VOCABULARY, WorldTextEncoder, describe_scenes, parse_prompt, read_prompts,
                                     sample_prompts, write_prompts)
from sage_fast.world.render import COLOUR_NAMES, COLOURS, DIRECTIONS, FRAMES, SHAPES, SIZES, coverage, render, sample_scenes
from sage_fast.world.rewards import WEIGHTS, WorldReward, motion_quality, text_alignment, visual_quality

N = 48  # videos per ranking test: means over many seeds


# ------------------------------------------------------------------------------------------- renderer


def test_renderer_is_deterministic_and_independent_of_global_rng():
    torch.manual_seed(0)
    a = sample_scenes(16, seed=3)
    torch.manual_seed(123)
    b = sample_scenes(16, seed=3)
    for f in a.__dataclass_fields__:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert torch.equal(render(a), render(b))
    assert not torch.equal(render(a), render(sample_scenes(16, seed=4)))


def test_render_shape_range_and_objects_inside_and_apart():
    scene = sample_scenes(64, seed=0, two_object_prob=1.0)
    video = render(scene)
    assert video.shape == (64, 3, FRAMES, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    t = torch.arange(float(FRAMES)).view(1, FRAMES, 1, 1)
    cov = coverage(scene.shape_bo, scene.size_bo, scene.pos_bo2[:, None] + t * scene.vel_bo2[:, None], 32, 32)
    two = scene.present_bo[:, 1]
    assert two.float().mean() > 0.9  # the placement fallback (one object) is rare
    overlap = (cov[:, :, 0] * cov[:, :, 1]).sum((1, 2, 3))
    assert torch.all(overlap[two] == 0)
    # every object is fully inside the frame: its area (pi s^2 up to edge rasterisation) is all there
    area = cov.sum((-1, -2))[:, :, 0]  # [B, F]
    assert torch.allclose(area, torch.pi * scene.size_bo[:, None, 0] ** 2, rtol=0.06)


# ------------------------------------------------------------------------------------------- codec


def test_codec_is_exact_both_ways():
    video = render(sample_scenes(4, seed=1))
    z = codec.encode(video)
    # 4x time compression with the first frame alone, like the HunyuanVideo-1.5 VAE: 5 -> 2
    assert codec.TEMPORAL == 4 and z.shape == (4, codec.latent_channels(), 1 + (FRAMES - 1) // 4,
                                               32 // codec.PATCH, 32 // codec.PATCH)
    assert torch.equal(codec.decode(z), video)
    c = 3 * codec.PATCH**2
    assert (z[:, c:, 0] == 0).all()  # latent frame 0: frame 0, then zero padding
    # latent frame 1 = frames 1..4 side by side in channels, each the per-frame codec's latent
    per_frame = codec.encode(video, temporal=1)
    assert per_frame.shape[1:3] == (c, FRAMES)
    assert torch.equal(z[:, :c, 0], per_frame[:, :, 0])
    for i in range(4):
        assert torch.equal(z[:, i * c:(i + 1) * c, 1], per_frame[:, :, 1 + i])
    noise = torch.randn(2, codec.latent_channels(), 3, 3, 7, dtype=torch.float64)  # 9 frames
    back = codec.encode(codec.decode(noise))
    noise[:, c:, 0] = 0  # decode ignores the padding; everything else round-trips exactly
    assert torch.equal(back, noise)
    assert codec.decode(noise).shape == (2, 3, 9, 12, 28)
    # a permutation up to LATENT_SCALE: norms scale exactly
    assert torch.allclose(z.norm(), video.norm() * codec.LATENT_SCALE)
    for temporal in (1, 2):
        assert torch.equal(codec.decode(codec.encode(video, temporal=temporal), temporal=temporal), video)
    with pytest.raises(ValueError, match="multiples of patch"):
        codec.encode(torch.zeros(1, 3, 9, 30, 32))
    with pytest.raises(ValueError, match=r"frames must be 1 \+ k \* temporal = 1 \+ k \* 4"):
        codec.encode(torch.zeros(1, 3, 7, 32, 32))
    with pytest.raises(ValueError, match="codec temporal must be an int >= 1"):
        codec.latent_channels(temporal=0)


# ------------------------------------------------------------------------------------------- prompts


def test_prompt_grammar_roundtrip_and_errors():
    prompts, scene = sample_prompts(64, seed=2)
    assert any(" and " in p for p in prompts) and any(" and " not in p for p in prompts)
    for p, b in zip(prompts, range(64)):
        objs = parse_prompt(p)
        present = scene.present_bo[b].nonzero().flatten().tolist()
        assert [o.colour for o in objs] == scene.colour_bo[b, present].tolist()
        assert [o.shape for o in objs] == scene.shape_bo[b, present].tolist()
    assert parse_prompt("") == ()
    assert parse_prompt("a red circle moving left")[0].size == -1
    with pytest.raises(ValueError, match="colour must be one of"):
        parse_prompt("a purple circle moving left")
    with pytest.raises(ValueError, match="direction must be one of"):
        parse_prompt("a red circle moving sideways")
    with pytest.raises(ValueError, match="distinct colours"):
        parse_prompt("a red circle moving left and a red square moving up")
    with pytest.raises(ValueError, match="at most 2"):
        parse_prompt(" and ".join(["a red circle moving left"] * 3))


def test_prompt_files(tmp_path):
    prompts, _ = sample_prompts(5, seed=0)
    write_prompts(tmp_path / "p.txt", prompts)
    assert [r["prompt"] for r in read_prompts(tmp_path / "p.txt")] == prompts
    write_prompts(tmp_path / "p.jsonl", [{"prompt": p, "seed": i} for i, p in enumerate(prompts)])
    rows = read_prompts(tmp_path / "p.jsonl")
    assert [r["seed"] for r in rows] == list(range(5))
    (tmp_path / "bad.txt").write_text("# comment\na red circle moving left\na red blob moving left\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: .*shape must be one of"):
        read_prompts(tmp_path / "bad.txt")


def test_text_encoder_conditioning_drives_the_model():
    from sage_fast.models import VelocityModelConfig, build_velocity_model
    from sage_fast.world.base_model import model_overrides

    enc = WorldTextEncoder(32, 24, seed=0)
    prompts = ["a red circle moving left", "a small blue square moving up and a large green triangle moving down"]
    e = enc.encode(prompts)
    assert e.embeds_bld.shape == (2, 14, 32) and e.embeds_2_bld.shape == (2, 14, 24)
    assert e.mask_bl.sum(1).tolist() == [6, 14]
    assert torch.all(e.embeds_bld[0, 6:] == 0)
    assert torch.equal(WorldTextEncoder(32, 24, seed=0).encode(prompts).embeds_bld, e.embeds_bld)
    empty = enc.encode([""])
    assert empty.mask_bl.tolist() == [[1]]  # <bos>: never a fully masked prompt
    # word order matters (position table): the model sees the tokens as a set, and the same
    # words bound differently must give a different set
    swapped = enc.encode(["a red square moving left and a blue circle moving up",
                          "a blue square moving left and a red circle moving up"])
    assert torch.cdist(swapped.embeds_bld[0], swapped.embeds_bld[1]).min(1).values.max() > 0.1
    assert len(VOCABULARY) == len(set(VOCABULARY))

    cfg = VelocityModelConfig(finetune="full", autocast_dtype="none",
                              architecture_overrides=model_overrides(2, 16, 1, 2.0))
    model = build_velocity_model(cfg)
    enc = WorldTextEncoder.for_model(model.transformer.config)
    z = codec.encode(render(sample_scenes(2, seed=0)))
    v = model.velocity(z, torch.tensor([500.0, 900.0]), enc.conditioning(prompts), cfg_scale=4.0)
    assert v.shape == z.shape and torch.isfinite(v).all()


# ------------------------------------------------------------------------------------------- rewards


@pytest.fixture(scope="module")
def ranked():
    """Mean scores of clean on-prompt renders, the same renders with other prompts, the renders
    plus N(0, 0.3^2) noise, and pure N(0, 1) noise, over N seeds."""
    prompts, scene = sample_prompts(N, seed=10)
    off_prompts, _ = sample_prompts(N, seed=11)
    video = render(scene)
    g = torch.Generator().manual_seed(0)
    noisy = video + 0.3 * torch.randn(video.shape, generator=g)
    noise = torch.randn(video.shape, generator=g)
    reward = WorldReward("averaged")
    sets = {"clean": (video, prompts), "off": (video, off_prompts), "noisy": (noisy, prompts), "noise": (noise, prompts)}
    return {name: {k: float(s.mean()) for k, s in reward(v, p).scores.items()} for name, (v, p) in sets.items()}


@pytest.mark.parametrize("dim", ["vq", "mq"])
def test_prompt_blind_rewards_rank_clean_over_noisy_over_noise(ranked, dim):
    r = {k: v[dim] for k, v in ranked.items()}
    assert r["clean"] == r["off"]  # VQ and MQ do not read the prompt
    assert r["clean"] > 0.9
    assert r["off"] > r["noisy"] + 0.3 and r["noisy"] > r["noise"]
    assert r["noise"] < 0.05


def test_text_alignment_ranks_on_prompt_over_off_prompt_over_noise(ranked):
    r = {k: v["ta"] for k, v in ranked.items()}
    assert r["clean"] > 0.95
    assert r["clean"] > r["off"] + 0.5
    assert r["clean"] > r["noisy"] + 0.3 and r["noisy"] > r["noise"]
    assert r["off"] > r["noise"] + 0.05
    # not asserted: off-prompt > noisy. At noise std 0.3 the two are close (~0.11 vs ~0.14):
    # TA is meant to measure the prompt, and heavy noise also breaks the objects it looks for.


def test_text_alignment_sees_each_attribute():
    base = "a large red circle moving right"
    scene = sample_scenes(1, seed=0, two_object_prob=0.0)
    scene.colour_bo[:] = 0
    scene.shape_bo[:] = 0
    scene.size_word_bo[:] = 1
    scene.size_bo[:] = 5.0
    scene.direction_bo[:] = 1
    scene.vel_bo2[:] = torch.tensor([1.25, 0.0])
    scene.pos_bo2[:] = torch.tensor([8.0, 16.0])
    video = render(scene)
    assert describe_scenes(scene) == [base]
    variants = [base, "a large blue circle moving right", "a large red square moving right",
                "a large red circle moving left", "a small red circle moving right"]
    ta = text_alignment(video.expand(5, -1, -1, -1, -1), variants)
    assert ta[0] > 0.95
    assert ta[1] == 0  # wrong colour: the object is absent
    assert torch.all(ta[2:] < ta[0] - 0.15)


def test_reward_failures_are_nan_or_errors_never_zero():
    prompts, scene = sample_prompts(3, seed=0)
    video = render(scene)
    video[1, 0, 4, 5, 5] = float("nan")
    out = WorldReward("alignment")(video, prompts)
    assert (~torch.isfinite(out.total_b)).tolist() == [False, True, False]
    for k in ("vq", "mq", "ta"):
        assert torch.isnan(out.scores[k][1]) and torch.isfinite(out.scores[k][[0, 2]]).all()
    with pytest.raises(ValueError, match="name at least one object"):
        text_alignment(render(scene), ["", prompts[1], prompts[2]])
    with pytest.raises(ValueError, match="list of 3 strings"):
        text_alignment(render(scene), prompts[:2])
    with pytest.raises(ValueError, match="must be a tensor"):
        visual_quality(torch.zeros(3, 9, 32, 32))


def test_reward_weights():
    prompts, scene = sample_prompts(4, seed=0)
    video = render(scene) + 0.1 * torch.randn(4, 3, FRAMES, 32, 32, generator=torch.Generator().manual_seed(0))
    out = WorldReward("alignment")(video, prompts)
    s = out.scores
    assert torch.allclose(out.total_b, 0.5 * s["vq"] + 0.5 * s["mq"] + 1.0 * s["ta"])
    assert WEIGHTS["averaged"] == {"vq": 1.0, "mq": 1.0, "ta": 1.0}
    custom = WorldReward({"ta": 2.0})(video, prompts)
    assert torch.allclose(custom.total_b, 2.0 * s["ta"])
    with pytest.raises(ValueError, match="one of"):
        WorldReward("balanced")
    with pytest.raises(ValueError, match="keys must be among"):
        WorldReward({"aesthetics": 1.0})


def test_motion_quality_sees_jitter_and_size_change():
    scene = sample_scenes(8, seed=5, two_object_prob=0.0)
    clean = motion_quality(render(scene))
    # an object that jumps: frame-wise renders with a random 2-pixel offset per frame
    frames = []
    g = torch.Generator().manual_seed(0)
    for t in range(9):
        s = dataclasses.replace(scene)
        s.pos_bo2 = scene.pos_bo2 + t * scene.vel_bo2 + 2.0 * (torch.rand(scene.pos_bo2.shape, generator=g) - 0.5) * 2
        s.vel_bo2 = torch.zeros_like(scene.vel_bo2)
        frames.append(render(s, frames=1))
    jumpy = torch.cat(frames, dim=2)
    grow = []
    for t in range(9):
        s = dataclasses.replace(scene)
        s.pos_bo2 = scene.pos_bo2 + t * scene.vel_bo2
        s.vel_bo2 = torch.zeros_like(scene.vel_bo2)
        s.size_bo = scene.size_bo * (0.7 + 0.05 * t)
        grow.append(render(s, frames=1))
    growing = torch.cat(grow, dim=2)
    assert motion_quality(jumpy).mean() < clean.mean() - 0.3
    assert motion_quality(growing).mean() < clean.mean() - 0.3


# ------------------------------------------------------------------------------------------- manifold


def test_manifold_distance_is_zero_on_renders_and_grows_with_noise():
    _, scene = sample_prompts(16, seed=20)
    video = render(scene)
    g = torch.Generator().manual_seed(1)
    fit = fit_scene(video)
    assert fit.distance_b.max() < 0.02
    assert torch.equal(fit.scene.colour_bo[fit.scene.present_bo].sort().values,
                       scene.colour_bo[scene.present_bo].sort().values)
    means = [float(fit.distance_b.mean())]
    for sigma in (0.05, 0.1, 0.3):
        d = manifold_distance(video + sigma * torch.randn(video.shape, generator=g))
        assert abs(float(d.mean()) - sigma) < 0.25 * sigma  # noise cannot be re-rendered
        means.append(float(d.mean()))
    means.append(float(manifold_distance(torch.randn(video.shape, generator=g)).mean()))
    assert means == sorted(means) and means[-1] > 0.8
    bad = video.clone()
    bad[0, 0, 0, 0, 0] = float("inf")
    d = manifold_distance(bad, iters=0)
    assert torch.isnan(d[0]) and torch.isfinite(d[1:]).all()


# ------------------------------------------------------------------------------------------- pretraining


def test_pretrain_writes_a_loadable_checkpoint(tmp_path):
    from sage_fast.models import VelocityModelConfig, build_velocity_model, load_transformer
    from sage_fast.world.evaluate import load_base_model, sample_videos
    from sage_fast.world.pretrain import main

    out = tmp_path / "ckpt"
    main(["--out", str(out), "--steps", "3", "--batch", "2", "--heads", "2", "--head-dim", "16",
          "--layers", "1", "--log-every", "1", "--threads", "1", "--skip-eval"])
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    world = json.loads((out / "world.json").read_text())
    assert world["train"]["steps_done"] == 3 and "--steps 3" in world["command"]
    transformer = load_transformer(out)
    assert transformer.config.out_channels == codec.latent_channels()
    policy = build_velocity_model(VelocityModelConfig(checkpoint=str(out), finetune="lora", lora_rank=4))
    assert any(p.requires_grad for p in policy.parameters())
    model, enc, _ = load_base_model(out)
    video = sample_videos(model, enc, ["a red circle moving left"], steps=2)
    assert video.shape == (1, 3, FRAMES, 32, 32) and torch.isfinite(video).all()
    with pytest.raises(ValueError, match="cond-dropout"):
        main(["--out", str(out), "--cond-dropout", "1.5"])
    assert world["temporal"] == codec.TEMPORAL and world["train"]["prediction"] == "sample"
    assert model.prediction == "sample"
    for bad, match in ((["--frames", "6"], "--frames must be 4k\\+1"), (["--sigma-shift", "0"], "--sigma-shift"),
                       (["--temporal", "3"], "--temporal must be >= 1 and divide frames - 1 = 4"),
                       (["--patch", "5"], "--patch must divide the 32x32 frame"),
                       (["--uniform-frac", "1.5"], "--uniform-frac"), (["--x0-weight-floor", "1"], "--x0-weight-floor")):
        with pytest.raises(ValueError, match=match):
            main(["--out", str(out), *bad])
    # continued pretraining starts from the checkpoint's weights and keeps its architecture
    more = tmp_path / "more"
    main(["--out", str(more), "--init-from", str(out), "--steps", "1", "--batch", "2", "--threads", "1", "--skip-eval"])
    w2 = json.loads((more / "world.json").read_text())
    assert w2["train"]["init_from"] == str(out) and w2["train"]["architecture_overrides"]["num_layers"] == 1
    assert load_transformer(more).config.num_attention_heads == 2


def test_pretrain_workers_and_frozen_byt5_layers(tmp_path, monkeypatch):
    """Data-loading workers hand the loop the batches it would build itself (same weights, bit for
    bit); --freeze-byt5-hidden leaves exactly the ByT5 projection's hidden layers untouched; the
    time-based schedule and the periodic checkpoint write what they say."""
    from safetensors.torch import load_file

    from sage_fast.models import build_transformer
    from sage_fast.world.base_model import model_overrides
    from sage_fast.world.pretrain import main

    common = ["--steps", "4", "--batch", "2", "--heads", "2", "--head-dim", "16", "--layers", "1", "--log-every", "2",
              "--threads", "1", "--skip-eval", "--cond-dropout", "0.5"]
    main(["--out", str(tmp_path / "w0"), *common])
    main(["--out", str(tmp_path / "w2"), "--workers", "2", *common])
    a, b = (load_file(str(tmp_path / d / "diffusion_pytorch_model.safetensors")) for d in ("w0", "w2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    import sage_fast.world.pretrain as pretrain

    saves = []
    real_save = pretrain.save_checkpoint
    monkeypatch.setattr(pretrain, "save_checkpoint", lambda *a: (saves.append(a[2]["train"]["finished"]), real_save(*a)))
    main(["--out", str(tmp_path / "fz"), "--freeze-byt5-hidden", "--lr-schedule", "time", "--save-every-min", "1e-9",
          *common])
    assert saves == [False, False, True]  # at the two logged steps (every 2 of 4), then the final one
    monkeypatch.setattr(pretrain, "save_checkpoint", real_save)
    init = build_transformer("tiny", seed=0, **model_overrides(2, 16, 1, 2.0)).state_dict()
    trained = load_file(str(tmp_path / "fz" / "diffusion_pytorch_model.safetensors"))
    frozen = {k for k in trained if k.startswith(("context_embedder_2.norm", "context_embedder_2.linear_1",
                                                   "context_embedder_2.linear_2"))}
    assert len(frozen) == 6
    for k in frozen:  # stored as float16: equal to the init rounded the same way
        assert torch.equal(trained[k], init[k].half()), k
    assert not torch.equal(trained["context_embedder_2.linear_3.weight"], init["context_embedder_2.linear_3.weight"].half())
    world = json.loads((tmp_path / "fz" / "world.json").read_text())
    tr = world["train"]
    assert tr["freeze_byt5_hidden"] and tr["lr_schedule"] == "time" and tr["finished"] and tr["device"] == "cpu"
    assert tr["trained_parameters"] < tr["parameters"] - 4_000_000
    for bad, match in ((["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
                       (["--device", "cudax"], "--device must be cpu, cuda or cuda:N"), (["--workers", "-1"], "--workers"),
                       (["--time-budget-min", "0"], "--time-budget-min"), (["--save-every-min", "-1"], "--save-every-min")):
        with pytest.raises(ValueError, match=match):
            main(["--out", str(tmp_path / "bad"), *bad])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="allowed here: cpu"):
            main(["--out", str(tmp_path / "bad"), "--device", "cuda", *common])


def test_check_device_compares_the_training_path_with_the_cpu_reference(capsys):
    """--check-device: the batched-text training forward on the same CPU in float32 is the class's
    forward exactly; bf16 autocast moves it by about a percent, inside its tolerance."""
    from sage_fast.world.base_model import CHECK_TOLERANCE, check_device
    from sage_fast.world.pretrain import main

    assert check_device("cpu", "none", batch=4) == 0.0
    assert 1e-4 < check_device("cpu", "bfloat16", batch=4) < CHECK_TOLERANCE["bfloat16"]
    main(["--check-device", "--threads", "1"])
    assert "ok" in capsys.readouterr().out


@pytest.mark.gpu
def test_pretrain_on_cuda_runs_and_computes_what_the_cpu_does(tmp_path):
    """The GPU path of pretraining (bench/gpu_pretrain_world.sh): velocities within tolerance of
    the CPU's float32 (float32 and bf16 autocast), and a few steps with workers write a checkpoint."""
    from sage_fast.models import load_transformer
    from sage_fast.world.base_model import CHECK_TOLERANCE, check_device
    from sage_fast.world.pretrain import main

    for autocast in ("none", "bfloat16"):
        assert check_device("cuda", autocast) <= CHECK_TOLERANCE[autocast], autocast
    out = tmp_path / "cuda"
    main(["--out", str(out), "--device", "cuda", "--autocast", "bfloat16", "--workers", "2", "--steps", "6",
          "--batch", "16", "--heads", "2", "--head-dim", "16", "--layers", "1", "--log-every", "3", "--skip-eval",
          "--freeze-byt5-hidden"])
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads((out / "world.json").read_text())["train"]["device"] != "cpu"
    assert load_transformer(out).config.num_layers == 1


def test_time_based_lr_schedule_warms_up_by_step_then_follows_the_clock():
    from sage_fast.world.pretrain import _progress_lr, parse_args

    args = parse_args(["--lr-schedule", "time", "--time-budget-min", "10", "--warmup", "4", "--lr", "1e-3"])
    assert _progress_lr(args, 0, 500.0) == pytest.approx(2.5e-4)  # warm-up counts steps, not time
    assert _progress_lr(args, 10, 0.0) == pytest.approx(1e-3)
    assert _progress_lr(args, 10, 300.0) == pytest.approx(0.55e-3)  # half the budget: halfway down the cosine
    assert _progress_lr(args, 10, 600.0) == pytest.approx(1e-4) == _progress_lr(args, 10, 900.0)
    with pytest.raises(SystemExit):
        parse_args(["--autocast", "float16"])


def test_condition_dropout_on_token_ids_equals_encoding_the_empty_prompt():
    from sage_fast.world.pretrain import drop_prompts

    enc = WorldTextEncoder(32, 24)
    prompts = ["a small red circle moving left and a large blue square moving up", "a green triangle moving down",
               "a large cyan circle moving right"]
    ids, mask = enc.token_ids(prompts)
    for drop in ([False, False, False], [True, False, True], [True, True, True], [False, True, False]):
        got = drop_prompts(ids, mask, torch.tensor(drop))
        want = enc.token_ids(["" if d else p for p, d in zip(prompts, drop)])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), drop
    assert torch.equal(ids, enc.token_ids(prompts)[0])  # the input is left as it was
    e = enc.embed(ids, mask)
    ref = enc.encode(prompts)
    assert torch.equal(e.embeds_bld, ref.embeds_bld) and torch.equal(e.embeds_2_bld, ref.embeds_2_bld)


def test_scene_to_and_describe_scenes_agree_with_elementwise_reading():
    scene = sample_scenes(32, 3)
    moved = scene.to("cpu")
    assert all(torch.equal(getattr(scene, f), getattr(moved, f)) for f in scene.__dataclass_fields__)
    # the prompt of each scene, read attribute by attribute
    words = [[(tuple(SIZES)[int(scene.size_word_bo[b, o])], COLOUR_NAMES[int(scene.colour_bo[b, o])],
               SHAPES[int(scene.shape_bo[b, o])], tuple(DIRECTIONS)[int(scene.direction_bo[b, o])])
              for o in range(2) if bool(scene.present_bo[b, o])] for b in range(32)]
    want = [" and ".join(f"a {s} {c} {sh} moving {d}" for s, c, sh, d in row) for row in words]
    assert describe_scenes(scene) == want


def test_x0_weight_floor_reweights_only_below_the_floor():
    from sage_fast.world.pretrain import loss_weights

    sigma = torch.tensor([0.01, 0.05, 0.1, 0.3, 0.7, 1.0])
    assert torch.equal(loss_weights(sigma, 0.0), torch.ones(6))
    # x0-error weight 1/max(sigma, 0.05)^2 times the factor == 1/max(sigma, 0.3)^2
    torch.testing.assert_close(loss_weights(sigma, 0.3) / sigma.clamp(min=0.05) ** 2, 1 / sigma.clamp(min=0.3) ** 2)
    assert torch.equal(loss_weights(sigma, 0.3)[3:], torch.ones(3))


def test_shapes_and_palette_sizes():
    assert COLOURS.shape == (6, 3) and len(SHAPES) == 3


def test_world_task_follows_the_checkpoints_world_json(tmp_path):
    """The task takes the codec layout from the checkpoint's world.json and refuses a video size
    the base model was not trained for (error names the field and the value to use)."""
    import json

    from sage_fast.models import build_transformer
    from sage_fast.task import WorldTask
    from sage_fast.train_config import WorldConfig

    cfg = build_transformer("tiny", in_channels=97, out_channels=48).config  # per-frame codec, patch 4
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "world.json").write_text(json.dumps({"frames": 5, "height": 32, "width": 32, "patch": 4}))
    task = WorldTask(WorldConfig(), cfg, checkpoint=str(ckpt))  # no "temporal": an old checkpoint's 1
    assert (task.patch, task.temporal, task.latent_shape) == (4, 1, (48, 5, 8, 8))
    with pytest.raises(ValueError, match=r"world.frames=9 but the base model .* was trained with 5 \(world.json\): use 5"):
        WorldTask(WorldConfig(frames=9), cfg, checkpoint=str(ckpt))
    with pytest.raises(ValueError, match=r"codec patch 4, temporal 4\) have 192 channels but the model has out_channels=48"):
        WorldTask(WorldConfig(), cfg)  # no checkpoint: the codec's defaults
