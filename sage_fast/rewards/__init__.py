"""Reward models for real videos: a protocol, a registry and a weighted sum.

A reward part is called as `part(video_bcfhw, prompts) -> {dimension: [B] float tensor}` with
the decoded video in [-1, 1]; NaN marks a sample the model could not score (the trainer drops
it from its group's advantages, never treats it as 0). Parts are named in one string,
`video.reward` of the trainer's config, as comma-separated `kind=argument` items:

    clip_score=/models/clip-vit-large-patch14   CLIPScore: cosine of frame and prompt embeddings
                                                (transformers CLIPModel from a local folder)
    pickscore=/models/PickScore_v1              PickScore: exp(logit_scale) x cosine, mean over frames
                                                (a CLIPModel + CLIP processor folder, local)
    python=my_pkg.videoalign:score              any importable function with the same call;
                                                how VideoAlign (VQ/MQ/TA, the paper's reward)
                                                plugs in, since its model code ships with it

The total is the weighted sum of the dimensions (`video.reward_weights`, JSON; default 1 for
each): for VideoAlign the paper's averaged setting is {"vq": 1, "mq": 1, "ta": 1}.

The same parts score an evaluation's videos beside the reward without weighting it
(`build_metrics`, `video.eval_metrics`): the paper reports CLIPScore and PickScore next to VQ/MQ/TA.

The synthetic world has its own rewards (sage_fast.world.rewards) with the same shape of call.
Both return a `RewardResult`, the one shape of a reward batch the trainer consumes; a part's
dict (or tensor) is converted to it in `RewardParts` only.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["REWARD_KINDS", "RewardResult", "RewardConfigError", "RewardParts", "parse_reward_spec", "build_reward",
           "build_metrics", "parse_weights", "check_python_parts"]

REWARD_KINDS = ("clip_score", "pickscore", "python")


@dataclass
class RewardResult:
    """One batch's reward: what every reward returns and the trainer consumes."""

    total_b: torch.Tensor  # [B] weighted sum of the scores, NaN = failed
    scores: dict[str, torch.Tensor]  # dimension -> [B]
    error: str | None = None  # why the whole batch failed, if it did
    timed_out: bool = False  # the batch exceeded task.reward_timeout_s (sage_fast.reward_worker)


class RewardConfigError(ValueError):
    """A mistake in the reward's configuration (weights naming dimensions no part returns, a part
    returning the wrong shape, two parts returning one name): the run must stop, not score NaN."""


RewardPart = Callable[[torch.Tensor, list], "dict[str, torch.Tensor] | torch.Tensor"]


def parse_reward_spec(spec: str, field: str = "video.reward") -> list[tuple[str, str]]:
    """'kind=arg,kind=arg' -> [(kind, arg)]; errors name the field and the allowed kinds."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError(f"{field} must name at least one reward as kind=argument with kind in {REWARD_KINDS}, "
                         f"got {spec!r}")
    out = []
    for item in items:
        kind, sep, arg = item.partition("=")
        kind, arg = kind.strip(), arg.strip()
        if not sep or kind not in REWARD_KINDS or not arg:
            raise ValueError(f"{field}: each item must be kind=argument with kind in {REWARD_KINDS}, got {item!r}")
        if kind == "python" and (":" not in arg or not all(arg.partition(":")[::2])):
            raise ValueError(f"{field}: python=module:function, got {item!r}")
        out.append((kind, arg))
    return out


def parse_weights(text: str, field: str = "video.reward_weights") -> dict[str, float] | None:
    """JSON {dimension: weight} or '' (None: weight 1 for every dimension)."""
    if not text.strip():
        return None
    try:
        weights = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{field} must be JSON like {{\"vq\": 1, \"mq\": 1, \"ta\": 1}} or empty, got {text!r}") from e
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{field} must map at least one dimension name to a number, got {text!r}")
    for k, v in weights.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{field}: the weight of {k!r} must be a finite number, got {v!r}")
    return {str(k): float(v) for k, v in weights.items()}


def _python_part(target: str, field: str = "video.reward") -> RewardPart:
    module_name, _, fn_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{field}: cannot import module {module_name!r} for python={target}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{field}: {module_name!r} has no callable {fn_name!r} (python={target})")

    def part(video, prompts):
        out = fn(video, prompts)
        return out if isinstance(out, dict) else {fn_name: out}

    return part


class RewardParts:
    """The configured parts and weights: `(video, prompts) -> RewardResult` (float32 [B] total and scores)."""

    def __init__(self, parts: list[RewardPart], weights: dict[str, float] | None = None,
                 field: str = "video.reward") -> None:
        self.parts, self.weights, self.field = parts, weights, field

    def __call__(self, video_bcfhw: torch.Tensor, prompts: list[str]) -> RewardResult:
        B = video_bcfhw.shape[0]
        scores: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for part in self.parts:
                for name, value in part(video_bcfhw, list(prompts)).items():
                    value = torch.as_tensor(value).float().reshape(-1).cpu()
                    if value.shape != (B,):
                        raise RewardConfigError(f"reward dimension {name!r} returned shape {tuple(value.shape)}, "
                                         f"expected [{B}] (one score per video)")
                    if name in scores:
                        raise RewardConfigError(f"reward dimension {name!r} is returned by two parts of {self.field}")
                    scores[name] = value
        weights = self.weights if self.weights is not None else {k: 1.0 for k in scores}
        unknown = sorted(set(weights) - set(scores))
        if unknown:
            raise RewardConfigError(f"video.reward_weights names {unknown}, but the rewards return {sorted(scores)}")
        total = sum(w * scores[k] for k, w in weights.items())
        return RewardResult(total_b=torch.as_tensor(total, dtype=torch.float32).expand(B).clone(), scores=scores)


def check_python_parts(spec: str, field: str = "video.reward") -> None:
    """Before any work: every python=module:function module can be found (not imported yet)."""
    for kind, arg in parse_reward_spec(spec, field):
        if kind == "python":
            module = arg.partition(":")[0]
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise ValueError(f"{field}: module {module!r} of python={arg} cannot be found on the Python path")


def build_reward(spec: str, weights: str = "", device="cpu", field: str = "video.reward") -> RewardParts:
    """The reward of `video.reward` / `video.reward_weights` (see the module doc); errors name `field`."""
    parts: list[RewardPart] = []
    for kind, arg in parse_reward_spec(spec, field):
        if kind == "clip_score":
            from .clip_score import ClipScore  # noqa: PLC0415

            parts.append(ClipScore.from_folder(arg, device=device, field=f"{field} clip_score"))
        elif kind == "pickscore":
            from .pickscore import PickScore  # noqa: PLC0415

            parts.append(PickScore(arg, device=device, field=f"{field} pickscore"))
        else:
            parts.append(_python_part(arg, field))
    return RewardParts(parts, parse_weights(weights), field=field)


def build_metrics(spec: str, device="cpu", field: str = "video.eval_metrics") -> RewardParts | None:
    """The evaluation's extra metrics: the parts of `spec` (the kinds of `video.reward`),
    unweighted; '' = none (None). Not `build_reward` itself: an empty spec is valid here, and
    errors name `field`, not video.reward. `evaluate(..., metrics=...)` reads their scores only."""
    return build_reward(spec, device=device, field=field) if spec.strip() else None
