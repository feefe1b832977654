"""The paper's micro-level claims, measured on the world (no training).

    setup = load_setup()                                   # the shipped base model, the recipe's sampler
    ode = ode_reference(setup, prompts, seed=0)            # one ODE trajectory per prompt
    cell = rollout_cell(setup, "sage_grpo", 0.5, prompts, group=8, seed=0, ode=ode)
    grads = parameter_gradient_norms(setup, "sage_grpo", 0.5, prompts[:4], group=4, seed=0)
    result = run_micro(MicroConfig())                       # everything the report needs

Rollout geometry. Every prompt gets one initial noise, shared by its G samples and by every SDE
type and noise level, and every step's noise is addressed by (seed, step, sample) as in
training, so all cells see the same random numbers (common random numbers: differences between
cells are paired per prompt). The ODE from that initial noise is the reference: its G samples
coincide, so its exploration is exactly 0. Per cell (type, eta):

- `exploration`: the within-group std of the trained reward (the recipe's weights), per prompt:
  the spread GRPO's advantages are made of;
- `manifold`, `vq`, `mq`, `ta`, `reward`: of the final samples, per prompt (mean over its G);
- `step_distance`: RMS over latent elements of x_t - x_t(ODE) before every step t = 0..N
  (t = N: the final latent), mean over samples;
- `c`: the per-step std of the sampler; `grad_norm`: |d logp / d v| per step from the fused op,
  and `grad_norm_analytic`: what docs/SPEC.md section 3 predicts for it, |b| / (c sqrt(D)) (Gaussian
  types) or 2 |b| c / sqrt(D) (cps), with |eps| = sqrt(D).

`parameter_gradient_norms`: |d logp_t / d theta| over every transformer parameter, per sample
and step, on rollouts of the base model: the quantity the temporal equalizer is meant to even
out (the fused op's |d logp / d v| is the analytic ratio by construction, see the report).

Leaves to others: the report (`report.py`), the schedule math (`sage_fast.grpo.schedule`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch

from sage_fast.grpo import schedule
from sage_fast.grpo.rollout import RolloutEngine, SamplerConfig
from sage_fast.grpo.schedule import STOCHASTIC_TYPES
from sage_fast.kernels import sde_logprob

from .noise import noise_budget

__all__ = ["MicroConfig", "MicroSetup", "load_setup", "ode_reference", "rollout_cell",
           "parameter_gradient_norms", "matched_exploration", "run_micro", "DEFAULT_ETAS"]

DEFAULT_ETAS = (0.03, 0.1, 0.25, 0.5, 1.0)


@dataclass
class MicroConfig:
    prompts: int = 64
    """Held-out prompts (the tiny_world recipe's evaluation prompts, never its training ones)."""
    group: int = 8
    """Samples per prompt (G)."""
    etas: tuple[float, ...] = DEFAULT_ETAS
    """Noise levels of every type (cps's eta must stay <= 1: c = sigma' sin(eta pi / 2))."""
    seed: int = 0
    """Philox seed of the initial and step noise (common to every cell)."""
    grad_prompts: int = 4
    """Prompts of the parameter-gradient measurement (per type, at grad_eta)."""
    grad_group: int = 2
    """Samples per prompt there."""
    grad_eta: float = 0.5
    """Noise level of the gradient measurement (the recipe's)."""
    chunk: int = 64
    """Samples per rollout batch (memory)."""
    checkpoint: str | None = None
    """A world base model folder; None = the tiny_world recipe's (the shipped model)."""
    types: tuple[str, ...] = STOCHASTIC_TYPES

    def __post_init__(self):
        for name in ("prompts", "group", "grad_prompts", "grad_group", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.group < 2:
            raise ValueError(f"group must be >= 2 (a within-group std needs two samples), got {self.group}")
        if self.grad_group > self.group or self.grad_prompts > self.prompts:
            raise ValueError(f"grad_prompts x grad_group ({self.grad_prompts} x {self.grad_group}) must fit in "
                             f"prompts x group ({self.prompts} x {self.group})")
        self.etas = tuple(float(e) for e in self.etas)
        if not self.etas or any(not (math.isfinite(e) and e > 0) for e in self.etas):
            raise ValueError(f"etas must be finite numbers > 0, got {self.etas}")
        if len(set(self.etas)) != len(self.etas):
            raise ValueError(f"etas must be distinct, got {self.etas}")
        self.etas = tuple(sorted(self.etas))
        if "cps" in self.types and max(self.etas) > 1.0:
            raise ValueError(f"cps needs eta <= 1 (c = sigma' sin(eta pi / 2)), got etas {self.etas}")
        for t in self.types:
            if t not in STOCHASTIC_TYPES:
                raise ValueError(f"types must be among {STOCHASTIC_TYPES}, got {t!r}")
        if not (math.isfinite(self.grad_eta) and 0 < self.grad_eta <= (1.0 if "cps" in self.types else math.inf)):
            raise ValueError(f"grad_eta must be > 0 (and <= 1 with cps), got {self.grad_eta}")


@dataclass
class MicroSetup:
    """The base model and the world as the tiny_world recipe sees them."""

    model: object  # VelocityModel
    task: object  # sage_fast.task.WorldTask
    sampler: SamplerConfig  # the recipe's (steps, shift, cfg); type and eta are set per cell
    latent_shape: tuple[int, ...]
    checkpoint: str
    recipe: dict = field(default_factory=dict)

    @property
    def eval_prompts(self) -> list[str]:
        return list(self.task.eval_prompts)

    def engine(self, sde_type: str, eta: float, policy=None) -> RolloutEngine:
        cfg = SamplerConfig(num_steps=self.sampler.num_steps, shift=self.sampler.shift, sde_type=sde_type,
                            eta=eta, cfg_scale=self.sampler.cfg_scale)
        return RolloutEngine(policy or self.model.velocity, cfg, cuda_graph=False)


def load_setup(checkpoint: str | None = None, num_prompts: int = 64) -> MicroSetup:
    """The tiny_world recipe's base model, sampler, reward weights and held-out prompts."""
    from sage_fast.task import WorldTask  # noqa: PLC0415
    import sage_fast.train_config  # noqa: F401, PLC0415 - registers the recipes
    from sage_fast.config import get_recipe  # noqa: PLC0415
    from sage_fast.world.evaluate import load_base_model  # noqa: PLC0415

    cfg = get_recipe("tiny_world")
    cfg.world.num_eval_prompts = num_prompts
    path = checkpoint or cfg.model.checkpoint
    model, _, _ = load_base_model(path)
    task = WorldTask(cfg.world, model.transformer.config, checkpoint=path)
    recipe = {"num_steps": cfg.sampler.num_steps, "shift": cfg.sampler.shift, "cfg_scale": cfg.sampler.cfg_scale,
              "sde_type": cfg.sampler.sde_type, "eta": cfg.sampler.eta, "reward_weights": cfg.world.reward_weights}
    return MicroSetup(model=model, task=task, sampler=cfg.sampler, latent_shape=tuple(task.latent_shape),
                      checkpoint=str(path), recipe=recipe)


def _noise_index(first: int, batch: int, group: int) -> list[int]:
    """Every sample of a group starts from its group's first sample's noise."""
    return [(first + b) // group * group for b in range(batch)]


def _rms(diff: torch.Tensor) -> torch.Tensor:
    return diff.float().square().flatten(1).mean(1).sqrt()


@torch.no_grad()
def ode_reference(setup: MicroSetup, prompts: list[str], group: int, seed: int) -> dict:
    """The ODE trajectory (every step deterministic) of each prompt from its group's initial noise.

    Returns {"latents": [N + 1, P, ...] float32, "video": [P, 3, F, H, W]}."""
    engine = setup.engine("sage_grpo", 0.0)  # eta = 0: c = 0 at every step, the plain Euler ODE
    P, total = len(prompts), len(prompts) * group
    cond = setup.task.conditioning(prompts)
    traj = engine.sample(cond, (P,) + setup.latent_shape, seed=seed, first_sample=0, total_samples=total,
                         noise_index=[p * group for p in range(P)])
    return {"latents": traj.latents.float(), "video": setup.task.decode(traj.final)}


def _analytic_grad_norm(sde_type: str, b: torch.Tensor, c: torch.Tensor, numel: int) -> torch.Tensor:
    """|d logp / d v| of docs/SPEC.md section 3 with |x_next - mean| = c sqrt(D)."""
    if sde_type == "cps":
        return 2.0 * b.abs() * c / math.sqrt(numel)
    return b.abs() / (c * math.sqrt(numel))


@torch.no_grad()
def rollout_cell(setup: MicroSetup, sde_type: str, eta: float, prompts: list[str], group: int, seed: int,
                 ode: dict | None = None, chunk: int = 64, progress=None) -> dict:
    """One (type, eta) cell over G samples of every prompt; see the module doc for the fields.

    Per-prompt lists (length P) for the scores; per-step lists for the trajectory."""
    if chunk % group:
        chunk = max(group, chunk // group * group)
    P, total, n = len(prompts), len(prompts) * group, setup.sampler.num_steps
    velocities: list[torch.Tensor] = []

    def policy(x, t, cond, cfg_scale):
        v = setup.model.velocity(x, t, cond, cfg_scale)
        velocities.append(v)
        return v

    engine = setup.engine(sde_type, eta, policy)
    numel = math.prod(setup.latent_shape)
    coef = engine.coefficients(1)[:, :, 0]  # [N, 3]: every sample at the same step
    stochastic = [t for t in range(n) if float(coef[t, 2]) > 0]
    scores = {k: torch.empty(P, group) for k in ("reward", "vq", "mq", "ta", "manifold")}
    step_dist = torch.zeros(n + 1, dtype=torch.float64)
    grad_norm = torch.zeros(n, dtype=torch.float64)
    for first in range(0, total, chunk):
        batch = min(chunk, total - first)
        rows = [(first + b) // group for b in range(batch)]
        cond = setup.task.conditioning([prompts[p] for p in rows])
        velocities.clear()
        traj = engine.sample(cond, (batch,) + setup.latent_shape, seed=seed, first_sample=first,
                             total_samples=total, noise_index=_noise_index(first, batch, group))
        if ode is not None:
            ref = ode["latents"][:, rows]
            for t in range(n + 1):
                step_dist[t] += _rms(traj.latents[t] - ref[t]).double().sum()
        for t in stochastic:
            a, b, c = (traj.coef[t, k] for k in range(3))
            _, _, gn = sde_logprob(traj.latents[t], velocities[t].contiguous(), traj.latents[t + 1], a, b, c,
                                   sde_type=sde_type)
            grad_norm[t] += gn.double().sum()
        video = setup.task.decode(traj.final)
        out = setup.task.reward(video, [prompts[p] for p in rows])
        if out.error is not None:
            raise RuntimeError(f"the world's reward failed: {out.error}")
        dist = setup.task.manifold_distance(video)
        g = torch.tensor(rows)
        j = torch.tensor([(first + b) % group for b in range(batch)])
        scores["reward"][g, j] = out.total_b
        for k in ("vq", "mq", "ta"):
            scores[k][g, j] = out.scores[k]
        scores["manifold"][g, j] = dist.float()
        if progress is not None:
            progress(batch)
    b_all, c_all = coef[:, 1], coef[:, 2]
    analytic = torch.zeros(n, dtype=torch.float64)
    analytic[stochastic] = _analytic_grad_norm(sde_type, b_all[stochastic], c_all[stochastic], numel)
    cell = {"sde_type": sde_type, "eta": float(eta), "group": group, "prompts": P,
            "exploration": scores["reward"].std(1).tolist(),  # unbiased over G, per prompt
            "step_distance": (step_dist / total).tolist() if ode is not None else None,
            "c": c_all.tolist(), "stochastic_steps": stochastic,
            "grad_norm": (grad_norm / total).tolist(), "grad_norm_analytic": analytic.tolist()}
    for k, v in scores.items():
        cell[k] = v.mean(1).tolist()
    return cell


def parameter_gradient_norms(setup: MicroSetup, sde_type: str, eta: float, prompts: list[str], group: int,
                             seed: int, progress=None) -> dict:
    """|d logp_t / d theta| (every transformer parameter) per stochastic step, mean +- SE over samples.

    One backward pass per sample and step on a rollout of the base model (the same shared initial
    noise per prompt as the cells). Returns {"steps", "mean", "se", "samples"}."""
    engine = setup.engine(sde_type, eta)
    total = len(prompts) * group
    cond = setup.task.conditioning([p for p in prompts for _ in range(group)])
    traj = engine.sample(cond, (total,) + setup.latent_shape, seed=seed, first_sample=0, total_samples=total,
                         noise_index=_noise_index(0, total, group))
    params = [p for p in setup.model.parameters() if p.is_floating_point()]
    was = [p.requires_grad for p in params]
    steps = [t for t in range(setup.sampler.num_steps) if float(traj.coef[t, 2, 0]) > 0]
    norms = torch.zeros(len(steps), total, dtype=torch.float64)
    try:
        for p in params:
            p.requires_grad_(True)
        for k, t in enumerate(steps):
            timestep = (1000.0 * engine.sigmas[t]).to(torch.float32)
            for s in range(total):
                one = setup.task.conditioning([prompts[s // group]])
                v = setup.model.velocity(traj.latents[t, s:s + 1], timestep, one, setup.sampler.cfg_scale)
                a, b, c = (traj.coef[t, i, s:s + 1] for i in range(3))
                logp, _, _ = sde_logprob(traj.latents[t, s:s + 1], v.contiguous(), traj.latents[t + 1, s:s + 1],
                                         a, b, c, sde_type=sde_type)
                grads = torch.autograd.grad(logp.sum(), params, allow_unused=True)
                norms[k, s] = math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
            if progress is not None:
                progress(1)
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    return {"sde_type": sde_type, "eta": float(eta), "steps": steps, "samples": total,
            "mean": norms.mean(1).tolist(), "se": (norms.std(1) / math.sqrt(total)).tolist() if total > 1 else None,
            "parameters": sum(p.numel() for p in params)}


def matched_exploration(cells: list[dict], target: float, key: str = "manifold") -> dict | None:
    """Per-prompt `key` of one type's cells interpolated (linearly in mean exploration, between the
    two noise levels that bracket `target`, the ODE at exploration 0 included) to `target`.

    Returns {"eta": interpolated eta, "values": [P], "step_distance": [N + 1] or None} or None when
    the type's levels do not reach `target`."""
    pts = sorted(cells, key=lambda c: c["eta"])
    means = [sum(c["exploration"]) / len(c["exploration"]) for c in pts]
    for lo, hi, m_lo, m_hi in zip(pts, pts[1:], means, means[1:]):
        if min(m_lo, m_hi) <= target <= max(m_lo, m_hi) and m_hi != m_lo:
            w = (target - m_lo) / (m_hi - m_lo)
            values = [(1 - w) * a + w * b for a, b in zip(lo[key], hi[key])]
            sd = None
            if lo.get("step_distance") is not None and hi.get("step_distance") is not None:
                sd = [(1 - w) * a + w * b for a, b in zip(lo["step_distance"], hi["step_distance"])]
            return {"eta": (1 - w) * lo["eta"] + w * hi["eta"], "values": values, "step_distance": sd}
    return None


class Progress:
    """One line on stderr: what runs, how far, elapsed and left."""

    def __init__(self, total: int, stream=sys.stderr) -> None:
        self.total, self.done, self.t0, self.stream, self.label = max(int(total), 1), 0, time.time(), stream, ""

    def __call__(self, n: int = 1) -> None:
        self.done += n
        el = time.time() - self.t0
        left = el / self.done * (self.total - self.done) if self.done else 0.0
        width = 30
        bar = "#" * int(width * self.done / self.total)
        self.stream.write(f"\r[{bar:<{width}}] {100 * self.done / self.total:5.1f}%  {el:6.0f} s elapsed, "
                          f"~{left:5.0f} s left  {self.label:<28}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def run_micro(cfg: MicroConfig, setup: MicroSetup | None = None, show_progress: bool = True) -> dict:
    """Every measurement of the micro report (see the module doc and `sage_fast.paper.report`)."""
    t0 = time.time()
    setup = setup or load_setup(cfg.checkpoint, cfg.prompts)
    prompts = setup.eval_prompts[:cfg.prompts]
    if len(prompts) < cfg.prompts:
        raise ValueError(f"prompts={cfg.prompts} but the world holds out only {len(prompts)}")
    n = setup.sampler.num_steps
    grad_cost = cfg.grad_prompts * cfg.grad_group  # one backward per sample and step ~ one rollout sample
    work = len(cfg.types) * len(cfg.etas) * cfg.prompts * cfg.group + len(cfg.types) * n * grad_cost
    bar = Progress(work, stream=sys.stderr if show_progress else _Null())
    bar.label = "ODE reference"
    ode = ode_reference(setup, prompts, cfg.group, cfg.seed)
    # the ODE cell: its G samples per prompt are one deterministic path from one noise (equal bit for
    # bit, so exploration 0: tests/test_paper_micro.py rolls them out and checks it), scored once
    video = ode["video"]
    scores = setup.task.reward(video, prompts)
    if scores.error is not None:
        raise RuntimeError(f"the world's reward failed: {scores.error}")
    ode_cell = {"sde_type": "ode", "eta": 0.0, "group": cfg.group, "prompts": cfg.prompts,
                "exploration": [0.0] * cfg.prompts, "reward": scores.total_b.tolist(),
                "manifold": setup.task.manifold_distance(video).float().tolist(), "step_distance": [0.0] * (n + 1),
                "c": [0.0] * n, "stochastic_steps": [], "grad_norm": [0.0] * n, "grad_norm_analytic": [0.0] * n}
    for k in ("vq", "mq", "ta"):
        ode_cell[k] = scores.scores[k].tolist()
    cells = []
    for sde_type in cfg.types:
        for eta in cfg.etas:
            bar.label = f"{sde_type} eta {eta:g}"
            cells.append(rollout_cell(setup, sde_type, eta, prompts, cfg.group, cfg.seed, ode=ode, chunk=cfg.chunk,
                                      progress=bar))
    grads = []
    for sde_type in cfg.types:
        bar.label = f"gradients {sde_type}"
        grads.append(parameter_gradient_norms(setup, sde_type, cfg.grad_eta, prompts[:cfg.grad_prompts],
                                              cfg.grad_group, cfg.seed, progress=lambda k: bar(k * grad_cost)))
    bar.close()
    budgets = {"recipe": noise_budget(n, setup.sampler.shift, setup.sampler.eta),
               "spec_default": noise_budget(20, 5.0, 0.5)}
    equalizer = {t: schedule.equalizer_scales(setup.engine(t, cfg.grad_eta).sigmas, t, cfg.grad_eta).tolist()
                 for t in cfg.types}
    return {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "recipe": setup.recipe,
            "checkpoint": setup.checkpoint, "latent_shape": list(setup.latent_shape), "prompts": prompts,
            "ode": ode_cell, "cells": cells, "parameter_gradients": grads, "noise_budget": budgets,
            "equalizer_analytic": equalizer, "seconds": round(time.time() - t0, 1)}


class _Null:
    def write(self, _):
        pass

    def flush(self):
        pass
