"""sage_fast.evaluation.evaluate on a fake engine, task and reward (tiny tensors, no model): the
record of the reward alone (keys, order, means, per-prompt values), extra metrics written beside
the reward's dimensions, and the errors of a metric that clashes with the reward's record."""

import hashlib
import sys
from types import SimpleNamespace

import pytest
import torch

from sage_fast.evaluation import evaluate
from sage_fast.rewards import RewardResult, build_metrics

PROMPTS = ["a", "bb", "ccc"]


class _Engine:
    """sample(...).final: seeded [B, 3, 2, 4, 4] noise; records what it was asked."""

    def sample(self, cond, shape, *, seed, device):
        self.asked = (cond, shape, seed, device)
        return SimpleNamespace(final=torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


class _Task:
    eval_prompts = PROMPTS
    latent_shape = (3, 2, 4, 4)

    def __init__(self, distance: bool) -> None:
        self.distance = distance

    def conditioning(self, prompts):
        return list(prompts)

    def decode(self, latents):
        return latents * 0.5  # the "video" [B, 3, 2, 4, 4]

    def manifold_distance(self, video):
        return video.abs().amax((1, 2, 3, 4)) if self.distance else None


def _reward(video, prompts):
    vq = video.mean((1, 2, 3, 4))
    ta = torch.tensor([float(len(p)) for p in prompts])
    ta[1] = float("nan")  # a failed row: the means skip it
    return RewardResult(total_b=vq + ta, scores={"vq": vq, "ta": ta})


def _floats(t):
    return [float(x) for x in t]


@pytest.mark.parametrize("distance", [False, True])
def test_without_metrics_the_record_holds_the_reward_alone(distance):
    engine, task = _Engine(), _Task(distance)
    out, video = evaluate(engine, task, _reward, seed=7, device="cpu")
    assert engine.asked == (PROMPTS, (3, 3, 2, 4, 4), 7, "cpu")
    torch.testing.assert_close(video, torch.randn(3, 3, 2, 4, 4, generator=torch.Generator().manual_seed(7)) * 0.5,
                               rtol=0, atol=0)
    r = _reward(video, PROMPTS)
    per_prompt = {"eval/reward": _floats(r.total_b), "eval/vq": _floats(r.scores["vq"]),
                  "eval/ta": _floats(r.scores["ta"])}
    expected = {"eval/reward": float(r.total_b.nanmean()), "eval/vq": float(r.scores["vq"].mean()), "eval/ta": 2.0}
    if distance:
        d = task.manifold_distance(video)
        expected["eval/manifold_distance"] = float(d.mean())
        per_prompt["eval/manifold_distance"] = _floats(d)
    expected["per_prompt"] = per_prompt
    assert list(out) == list(expected) and list(out["per_prompt"]) == list(per_prompt)
    assert _same(out, expected), (out, expected)
    assert out["eval/reward"] == pytest.approx((r.total_b[0] + r.total_b[2]).item() / 2)  # NaN row skipped
    assert _same(evaluate(_Engine(), task, _reward, seed=7, device="cpu", metrics=None)[0], out)


def _same(a, b) -> bool:
    """Equal dicts (nested, same key order), NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def _metrics(video, prompts):
    """{name: [B]} in the shapes a part may return: a [B] tensor, a [B, 1] tensor, a list."""
    assert isinstance(prompts, list) and prompts == PROMPTS
    return {"clip_score": video.std((1, 2, 3, 4)), "pickscore": 20 * video.mean((2, 3, 4))[:, :1],
            "count": [1.0, 2.0, 3.0]}


@pytest.mark.parametrize("distance", [False, True])
def test_metrics_are_written_beside_the_reward(distance):
    task = _Task(distance)
    alone, _ = evaluate(_Engine(), task, _reward, seed=3, device="cpu")
    out, video = evaluate(_Engine(), task, _reward, seed=3, device="cpu", metrics=_metrics)
    m = _metrics(video, PROMPTS)
    keys = ["eval/reward", "eval/vq", "eval/ta", "eval/clip_score", "eval/pickscore", "eval/count"]
    keys += ["eval/manifold_distance"] * distance + ["per_prompt"]
    assert list(out) == keys and list(out["per_prompt"]) == keys[:-1]
    assert out["per_prompt"]["eval/clip_score"] == _floats(m["clip_score"])
    assert out["per_prompt"]["eval/pickscore"] == _floats(m["pickscore"].reshape(-1))
    assert out["per_prompt"]["eval/count"] == [1.0, 2.0, 3.0] and out["eval/count"] == 2.0
    assert out["eval/clip_score"] == float(m["clip_score"].mean())
    # the reward's entries are those of an evaluation without metrics
    assert _same({k: alone[k] for k in alone if k != "per_prompt"}, {k: out[k] for k in alone if k != "per_prompt"})
    assert _same(alone["per_prompt"], {k: out["per_prompt"][k] for k in alone["per_prompt"]})


def test_metrics_built_from_a_spec_record_their_scores_not_their_total(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def sharp(video, prompts):\n"
        "    return {'sharp': video.abs().mean((1, 2, 3, 4)), 'len': video.new_tensor([len(p) for p in prompts])}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_metrics", None)
    assert build_metrics("") is None and build_metrics("  ") is None
    metrics = build_metrics("python=my_metrics:sharp")
    out, video = evaluate(_Engine(), _Task(False), _reward, seed=5, device="cpu", metrics=metrics)
    assert [k for k in out if k != "per_prompt"] == ["eval/reward", "eval/vq", "eval/ta", "eval/sharp", "eval/len"]
    assert out["per_prompt"]["eval/sharp"] == _floats(video.abs().mean((1, 2, 3, 4)))
    assert out["per_prompt"]["eval/len"] == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"video\.eval_metrics: cannot import module 'no_such_module_xyz'"):
        build_metrics("python=no_such_module_xyz:f")
    with pytest.raises(ValueError, match=r"video\.eval_metrics"):
        build_metrics("pickscore=")


@pytest.mark.parametrize("name", ["vq", "reward", "manifold_distance"])
def test_a_metric_named_like_the_rewards_record_raises_naming_both(name):
    def clash(video, prompts):
        return {"clip_score": torch.zeros(3), name: torch.zeros(3)}

    with pytest.raises(ValueError, match=rf"metric '{name}' clashes with the reward's eval/{name}: "
                                         r"the reward returns \['vq', 'ta'\].*the metrics return "
                                         rf"\['clip_score', '{name}'\]"):
        evaluate(_Engine(), _Task(True), _reward, seed=1, device="cpu", metrics=clash)


def test_a_metric_of_the_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"metric 'x' returned shape \(2,\), expected \[3\]"):
        evaluate(_Engine(), _Task(False), _reward, seed=1, device="cpu", metrics=lambda v, p: {"x": torch.zeros(2)})


def test_a_failing_metric_scores_nothing_and_the_evaluation_goes_on(caplog):
    def broken(video, prompts):
        raise RuntimeError("out of memory")

    without = evaluate(_Engine(), _Task(False), _reward, seed=3, device="cpu")[0]
    with caplog.at_level("ERROR", logger="sage_fast.evaluation"):
        out = evaluate(_Engine(), _Task(False), _reward, seed=3, device="cpu", metrics=broken)[0]
    assert _same(out, without) and list(out) == list(without)
    assert "evaluation metrics failed (RuntimeError: out of memory)" in caplog.text


def test_eval_key_pairs_only_evaluations_that_sample_alike():
    """The key changes with what an evaluation samples or decodes (the sampler, the low-noise
    expert's guidance, the VAE's dtype) and stays as it was for a run that sets neither."""
    from sage_fast.evaluation import eval_key, eval_seed

    def cfg(**over):
        sampler = SimpleNamespace(num_steps=10, shift=3.0, sde_type="sage_grpo", cfg_scale=4.0)
        return SimpleNamespace(sampler=sampler, run=SimpleNamespace(seed=0),
                               model=SimpleNamespace(low_noise_cfg_scale=over.get("low")),
                               video=SimpleNamespace(vae_dtype=over.get("vae")))

    task = SimpleNamespace(eval_prompts=["a", "b"], latent_shape=(16, 2, 4, 4))
    plain = eval_key(cfg(), task)
    before = (task.eval_prompts, eval_seed(0), 10, 3.0, "sage_grpo", 4.0, task.latent_shape)  # the key's old parts
    assert plain == hashlib.blake2b(repr(before).encode(), digest_size=8).hexdigest()
    keys = {plain, eval_key(cfg(low=3.0), task), eval_key(cfg(low=2.0), task), eval_key(cfg(vae="float32"), task)}
    assert len(keys) == 4 and eval_key(cfg(low=3.0), task) == eval_key(cfg(low=3.0), task)
