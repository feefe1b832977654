"""The evaluation of a run: fixed prompts, fixed noise, the deterministic (eta = 0) sampler.

Owns: what an evaluation records (every reward dimension's mean and per-prompt values, those of
the optional extra metrics scored beside the reward (e.g. CLIPScore and PickScore, built by
sage_fast.rewards.build_metrics), and the exact manifold distance where the task has one) and
its fingerprint `eval_key`: evaluations
with the same key sampled the same prompts from the same noise, so they pair prompt by prompt
(`report.learning_summary` reads the per-prompt values).

Leaves to others: when to evaluate and where the record goes (train.py), the verdict (report.py).
"""

from __future__ import annotations

import hashlib
import logging

import torch

from sage_fast.grpo.data import derive_seed

__all__ = ["eval_key", "eval_seed", "evaluate"]


def eval_seed(run_seed: int) -> int:
    """The noise seed of every evaluation of a run."""
    return derive_seed(run_seed, "eval")


def eval_key(cfg, task) -> str:
    """A fingerprint of what an evaluation samples (prompts, noise seed, sampler, latent shape):
    only evaluations with the same key are paired (a resumed run may have changed them)."""
    s = cfg.sampler
    parts = (task.eval_prompts, eval_seed(cfg.run.seed), s.num_steps, s.shift, s.sde_type, s.cfg_scale,
             tuple(task.latent_shape))
    # settings that change what is sampled or decoded, only where set: the keys of runs without them stay as they were
    extra = tuple((name, v) for name, v in (("low_noise_cfg_scale", cfg.model.low_noise_cfg_scale),
                                            ("vae_dtype", cfg.video.vae_dtype)) if v is not None)
    return hashlib.blake2b(repr(parts + extra if extra else parts).encode(), digest_size=8).hexdigest()


log = logging.getLogger("sage_fast.evaluation")

_RESERVED = ("reward", "manifold_distance")  # eval/ keys of the record that are no reward dimension


def _metric_scores(metrics, video: torch.Tensor, prompts: list[str], reward_dims: list[str]) -> dict[str, torch.Tensor]:
    """The metrics' {name: [B] float32 CPU} of one evaluation; a name the reward's record holds
    (its dimensions, reward, manifold_distance) or a wrong shape raises ValueError (a
    configuration mistake, also refused before any work by train_config.check_paths); a metric
    that fails scores nothing this evaluation (logged), as a failed reward does not stop a run."""
    B = video.shape[0]
    try:
        result = metrics(video, list(prompts))
    except Exception as err:  # noqa: BLE001 - as a reward model's failure: NaN rows, the run goes on
        log.error("evaluation metrics failed (%s: %s): scored NaN", type(err).__name__, err)
        return {}
    scores = result if isinstance(result, dict) else result.scores  # a RewardResult: its total is not a metric
    out = {}
    for name, value in scores.items():
        value = torch.as_tensor(value).detach().float().reshape(-1).cpu()
        if value.shape != (B,):
            raise ValueError(f"evaluation metric {name!r} returned shape {tuple(value.shape)}, expected [{B}]")
        if name in reward_dims or name in _RESERVED:
            raise ValueError(f"evaluation metric {name!r} clashes with the reward's eval/{name}: the reward returns "
                             f"{reward_dims} (and eval/{' and eval/'.join(_RESERVED)} are taken), the metrics "
                             f"return {list(scores)}; drop the metric or rename one of them")
        out[name] = value
    return out


@torch.no_grad()
def evaluate(engine, task, reward, *, seed: int, device, metrics=None) -> tuple[dict, torch.Tensor]:
    """Sample the task's evaluation prompts with `engine` (deterministic) from noise `seed` and
    score them with `reward(video, prompts)`, and with `metrics(video, prompts)` when given (a
    RewardResult, whose scores are read, or {name: [B]}; e.g. RewardParts of build_metrics).
    Returns (record, video): the record holds "eval/<dimension>" means of the reward's
    dimensions, then the metrics', and their per-prompt values under "per_prompt". A metric
    named like a key of the reward's record raises ValueError. metrics=None: the record
    holds the reward's keys only."""
    prompts = task.eval_prompts
    traj = engine.sample(task.conditioning(prompts), (len(prompts),) + tuple(task.latent_shape), seed=seed,
                         device=device)
    video = task.decode(traj.final)
    result = reward(video, prompts)
    scores = dict(result.scores)
    if metrics is not None:
        scores.update(_metric_scores(metrics, video, prompts, list(result.scores)))
    out = {"eval/reward": float(result.total_b.nanmean())}
    out.update({f"eval/{k}": float(v.nanmean()) for k, v in scores.items()})
    # per prompt (the same prompts and noise every time): the paired verdict reads these
    per_prompt = {"eval/reward": result.total_b}
    per_prompt.update({f"eval/{k}": v for k, v in scores.items()})
    dist_m = task.manifold_distance(video)
    if dist_m is not None:
        out["eval/manifold_distance"] = float(dist_m.float().mean())
        per_prompt["eval/manifold_distance"] = dist_m
    out["per_prompt"] = {k: [float(x) for x in v.detach().float().cpu()] for k, v in per_prompt.items()}
    return out, video
