"""The evaluation of a run: fixed prompts, fixed noise, the deterministic (eta = 0) sampler.

Owns: what an evaluation records (every reward dimension's mean and per-prompt values, and the
exact manifold distance where the task has one) and its fingerprint `eval_key`: evaluations
with the same key sampled the same prompts from the same noise, so they pair prompt by prompt
(`report.learning_summary` reads the per-prompt values).

Leaves to others: when to evaluate and where the record goes (train.py), the verdict (report.py).
"""

from __future__ import annotations

import hashlib

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
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


@torch.no_grad()
def evaluate(engine, task, reward, *, seed: int, device) -> tuple[dict, torch.Tensor]:
    """Sample the task's evaluation prompts with `engine` (deterministic) from noise `seed` and
    score them with `reward(video, prompts)`. Returns (record, video): the record holds
    "eval/<dimension>" means and their per-prompt values under "per_prompt"."""
    prompts = task.eval_prompts
    traj = engine.sample(task.conditioning(prompts), (len(prompts),) + tuple(task.latent_shape), seed=seed,
                         device=device)
    video = task.decode(traj.final)
    result = reward(video, prompts)
    out = {"eval/reward": float(result.total_b.nanmean())}
    out.update({f"eval/{k}": float(v.nanmean()) for k, v in result.scores.items()})
    # per prompt (the same prompts and noise every time): the paired verdict reads these
    per_prompt = {"eval/reward": result.total_b}
    per_prompt.update({f"eval/{k}": v for k, v in result.scores.items()})
    dist_m = task.manifold_distance(video)
    if dist_m is not None:
        out["eval/manifold_distance"] = float(dist_m.float().mean())
        per_prompt["eval/manifold_distance"] = dist_m
    out["per_prompt"] = {k: [float(x) for x in v.detach().float().cpu()] for k, v in per_prompt.items()}
    return out, video
