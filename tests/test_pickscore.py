"""PickScore (sage_fast.rewards.pickscore) on a toy CLIP written offline: the score equals the
authors' computation through transformers' own processor and model, the torch preprocessing
matches the processor's PIL path (with the folder's non-default size, crop, mean and std), the
frames are clip_score's, a non-finite video scores NaN, and errors name the config field."""

import json
import math

import pytest
import torch

from sage_fast.models.tiny_pipeline import _clip_tokenizer
from sage_fast.rewards.clip_score import frame_indices
from sage_fast.rewards.pickscore import PickScore

SHORT, CROP = 28, 24  # the processor's shortest_edge and crop; the toy CLIP sees 24 x 24
MEAN, STD = [0.3, 0.5, 0.7], [0.2, 0.25, 0.4]  # not OpenAI's: hard-coded constants would fail
PROMPTS = ["a red ball rolling across a wooden table",
           "a very long prompt about waves breaking on a rocky shore at sunset, seen from a cliff far above, "
           "with gulls, spray and a lighthouse"]  # > 77 byte tokens: truncated


def _save_toy(folder, shortest_edge=SHORT):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tok = _clip_tokenizer()
    cfg = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                                  "bos_token_id": None, "pad_token_id": 1, "eos_token_id": len(tok) - 1},
                     vision_config={"image_size": CROP, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                                    "num_hidden_layers": 1, "num_attention_heads": 2},
                     projection_dim=8, logit_scale_init_value=3.0)  # exp(3) = 20.1, not CLIP's default 14.3
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": shortest_edge}, crop_size={"height": CROP, "width": CROP},
                       image_mean=MEAN, image_std=STD).save_pretrained(folder)  # preprocessor_config.json
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _save_toy(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """The toy with shortest_edge = crop = 24: a 24 x W frame is only cropped, never resampled."""
    return _save_toy(tmp_path_factory.mktemp("pickscore_exact"), shortest_edge=CROP)


def _uint8_video(B, Fr, H, W, seed=0):
    """[B, 3, F, H, W] in [-1, 1] on the 256 levels of uint8 frames, and those frames [B, F, H, W, 3]."""
    u8 = torch.randint(0, 256, (B, Fr, H, W, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return u8.permute(0, 4, 1, 2, 3).double().div(127.5).sub(1).float(), u8


def _direct(folder, frames_bfhwc, prompts, dtype):
    """The authors' example with transformers' own CLIPProcessor and CLIPModel, per frame, averaged."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, dtype=dtype).eval()
    proc = CLIPProcessor.from_pretrained(folder)
    B, k = frames_bfhwc.shape[:2]
    images = [f.numpy() for f in frames_bfhwc.reshape(B * k, *frames_bfhwc.shape[2:])]
    inputs = proc(images=images, text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"].to(dtype))
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = [x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt)]
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        score_bk = model.logit_scale.exp() * (img.view(B, k, -1) * txt[:, None]).sum(-1)
    return score_bk.mean(1), inputs


def test_score_equals_the_authors_computation_through_transformers(exact):
    """Frames already at the processor's size (24 x 32: shortest edge 24, no resampling in PIL
    nor torch; centre crop at column 4), so both paths see the same pixels. Bound: the float32
    score's distance to a float64 reference is at most 2x that of transformers' float32 path plus
    1e-5 (five float32 ulps at a score of 20)."""
    scorer = PickScore(exact, frames=3)
    video, u8 = _uint8_video(2, 5, CROP, 32)
    got = scorer(video, PROMPTS)["pickscore"]
    sel = u8[:, [0, 2, 4]]  # 3 of 5 frames: 0, 2, 4
    ref64, inputs = _direct(exact, sel, PROMPTS, torch.float64)
    direct32, _ = _direct(exact, sel, PROMPTS, torch.float32)
    assert inputs["input_ids"].shape[1] == 77  # the long prompt was truncated
    err, base = (got.double() - ref64).abs(), (direct32.double() - ref64).abs()
    assert (err <= 2 * base + 1e-5).all(), (err, base)
    assert got.abs().min() > 0.1  # a score, not a zero


def test_the_score_uses_the_learned_scale_and_only_the_chosen_frames(toy):
    scorer = PickScore(toy, frames=3)
    video, _ = _uint8_video(1, 5, 30, 40, seed=1)
    base = scorer(video, PROMPTS[:1])["pickscore"]
    other = video.clone()
    other[:, :, [1, 3]] = -other[:, :, [1, 3]]  # frames 1 and 3 are not scored
    torch.testing.assert_close(scorer(other, PROMPTS[:1])["pickscore"], base, rtol=0, atol=0)
    other[:, :, 2] = -other[:, :, 2]
    assert (scorer(other, PROMPTS[:1])["pickscore"] - base).abs() > 1e-4
    with torch.no_grad():
        scorer.model.logit_scale.fill_(0.0)  # exp(0) = 1: the score becomes the mean cosine
    cos = scorer(video, PROMPTS[:1])["pickscore"]
    torch.testing.assert_close(cos * math.exp(3.0), base, rtol=1e-5, atol=1e-5)
    assert cos.abs().max() <= 1


@pytest.mark.parametrize("hw", [(30, 40), (41, 29), (16, 21)])  # down (landscape, portrait), up
def test_preprocessing_matches_the_processors_pixel_values(toy, hw):
    """Our torch path from a [-1, 1] video against CLIPProcessor's PIL path on the same uint8
    frames, a smooth one and a noise one (whose overshoot PIL clips between its two passes).
    PIL rounds each pass to uint8 with fixed-point weights, torch computes the same antialiased
    filter in float: two roundings differ by < 1 uint8 step, |U1 + U2| = 1/3 step on average
    (measured 1.03 and 0.33). Tolerance: 1.5 steps per element, 0.4 on average (x std / 255 in
    normalised units); one resize without PIL's clip is off by 10 steps on noise, a mirror by more."""
    from transformers import CLIPProcessor

    scorer = PickScore(toy, frames=2)
    H, W = hw
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    smooth = torch.stack([xx, yy, (xx * 7).sin() * (yy * 5).cos() * 0.5 + 0.5])  # [3, H, W]
    noise = torch.rand(3, H, W, generator=torch.Generator().manual_seed(3))
    frames = [(smooth * 255).round().to(torch.uint8), (noise * 255).round().to(torch.uint8)]
    video = torch.stack(frames, 1)[None].double().div(127.5).sub(1).float()  # [1, 3, 2, H, W]
    ref = CLIPProcessor.from_pretrained(toy)(images=[f.permute(1, 2, 0).numpy() for f in frames],
                                             return_tensors="pt")["pixel_values"]
    got = scorer.pixels(video)
    assert got.shape == ref.shape == (2, 3, CROP, CROP)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    steps = (got - ref).abs() * std * 255  # the difference in uint8 steps
    assert steps.max() <= 1.5 and steps.mean() <= 0.4, (float(steps.max()), float(steps.mean()))
    assert ((scorer.pixels(video.flip(-1)) - ref).abs() * std * 255).mean() > 5  # the check sees a mirror


def test_frames_are_clip_scores_choice(toy):
    from sage_fast.rewards.clip_score import CLIP_MEAN, CLIP_STD, ClipScore

    assert frame_indices(5, 3).tolist() == [0, 2, 4]
    assert frame_indices(9, 4).tolist() == [0, 3, 5, 8]
    assert frame_indices(4, 8).tolist() == [0, 1, 2, 3]  # fewer frames than asked: every frame
    assert frame_indices(1, 8).tolist() == [0]
    scorer = PickScore(toy, frames=4)
    clip = ClipScore(scorer.model, scorer.tokenizer, frames=4)
    for Fr in (1, 3, 4, 9, 16):
        level = torch.arange(Fr, dtype=torch.float32) / 16 * 2 - 1  # frame f is the constant level f
        video = level.view(1, 1, Fr, 1, 1).expand(1, 3, Fr, 24, 24)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3), torch.tensor(CLIP_STD).view(1, 3)
        chosen = (((clip.pixels(video)[:, :, 0, 0] * std + mean) * 16).round()[:, 0]).long()
        assert chosen.tolist() == frame_indices(Fr, 4).tolist()
        assert scorer.pixels(video).shape[0] == min(Fr, 4)


def test_non_finite_videos_score_nan_and_leave_the_others_unchanged(toy):
    scorer = PickScore(toy, frames=2)
    video, _ = _uint8_video(3, 4, 30, 40, seed=4)
    alone = torch.cat([scorer(video[i:i + 1], [p])["pickscore"] for i, p in enumerate(["a", "b", "c"])])
    bad = video.clone()
    bad[1, 0, 1, 3, 3] = math.nan  # frame 1 is not scored (frames 0 and 3 are): still a failed video
    bad[2, 2, 0, 0, 0] = math.inf
    got = scorer(bad, ["a", "b", "c"])["pickscore"]
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert got[1:].isnan().all() and not got[0].isnan()
    torch.testing.assert_close(got[0], alone[0], rtol=1e-5, atol=1e-5)
    assert scorer(bad[1:], ["b", "c"])["pickscore"].isnan().all()  # nothing to score: no model call fails


def test_errors_name_the_field_and_what_is_missing(toy, tmp_path):
    field = r"video\.reward pickscore="
    with pytest.raises(FileNotFoundError, match=field + ".*no such folder"):
        PickScore(tmp_path / "absent")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(FileNotFoundError, match=field + ".*missing weights, processor config, tokenizer"):
        PickScore(tmp_path / "cfg")
    other = _save_toy(tmp_path / "other")
    (other / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=field + ".*'t5' model"):
        PickScore(other)
    with pytest.raises(ValueError, match="frames must be >= 1"):
        PickScore(toy, frames=0)
    with pytest.raises(ValueError, match="2 prompts for 1 videos"):
        PickScore(toy)(torch.zeros(1, 3, 2, 24, 24), ["a", "b"])
    with pytest.raises(ValueError, match="RGB"):
        PickScore(toy).pixels(torch.zeros(1, 1, 2, 24, 24))


def test_bfloat16_model_scores_close_to_float32(toy):
    """The dtype argument: a bfloat16 model (8 bits of mantissa, ~0.4% per rounding) scores within
    5% of the score scale of float32 on the toy; the result is float32 either way."""
    video, _ = _uint8_video(2, 3, 30, 40, seed=5)
    f32 = PickScore(toy, frames=3)(video, PROMPTS)["pickscore"]
    scorer = PickScore(toy, frames=3, dtype=torch.bfloat16)
    assert next(scorer.model.parameters()).dtype == torch.bfloat16  # the argument reaches the model
    bf16 = scorer(video, PROMPTS)["pickscore"]
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, f32)
    assert (bf16 - f32).abs().max() < 0.05 * math.exp(3.0), (bf16, f32)


def test_build_reward_registers_pickscore_and_errors_name_the_field(toy, tmp_path):
    from sage_fast.rewards import REWARD_KINDS, build_metrics, build_reward, parse_reward_spec

    assert "pickscore" in REWARD_KINDS and parse_reward_spec(f"pickscore={toy}") == [("pickscore", str(toy))]
    reward = build_reward(f"pickscore={toy}")
    assert len(reward.parts) == 1 and isinstance(reward.parts[0], PickScore) and reward.parts[0].frames == 8
    video, _ = _uint8_video(2, 3, 30, 40, seed=6)
    out = reward(video, PROMPTS)
    assert list(out.scores) == ["pickscore"] and out.scores["pickscore"].shape == (2,)
    assert torch.equal(out.scores["pickscore"], PickScore(toy)(video, PROMPTS)["pickscore"])
    assert torch.equal(out.total_b, out.scores["pickscore"])  # weight 1 by default
    with pytest.raises(FileNotFoundError, match=r"video\.reward pickscore=.*no such folder"):
        build_reward(f"pickscore={tmp_path / 'absent'}")
    with pytest.raises(FileNotFoundError, match=r"video\.eval_metrics pickscore=.*no such folder"):
        build_metrics(f"pickscore={tmp_path / 'absent'}")
