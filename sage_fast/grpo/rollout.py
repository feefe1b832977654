"""Rollouts: sample trajectories with the stochastic sampler and record what training needs.

Owns: the denoising loop of one rollout batch, its noise addressing, and the record
(`Trajectory`): the latent before every step and the log-prob of every transition.

    x_0 = initial noise;  for t in 0..N-1:  v = policy(x_t, 1000 sigma_t, cond, cfg)
                                            x_{t+1}, logp_t = sde_step(x_t, v, a_t, b_t, c_t)

Steps inside the SDE window are stochastic (`sde_type`), the others deterministic (`ode`,
logp = 0, never trained), MixGRPO-style.

Noise addressing (reproducible, and independent of how the global batch is split over ranks
or micro-batches): one Philox seed per epoch (`grpo.data.epoch_seed(base_seed, epoch)`), and the
element d of global sample g at step t (t = N for the initial noise) sits at counter

    ((t * total_samples) + g) * D + d            D = elements per sample

so the rollout of a sample depends only on (base seed, epoch, its global index), never on its
neighbours: 2 ranks of B samples draw exactly the noise of 1 rank of 2B. Every prompt's G
samples are distinct global indices, so they explore differently (the authors' seeds repeated
across prompts and epochs: docs/SPEC.md defect 6). `noise_index` may point a sample's *initial* noise
at another global index (the trainer's `grpo.group_noise=shared`: every sample of a group
starts from its first member's noise, DanceGRPO's same-noise groups); the SDE steps' noise
always stays the sample's own. With shared initial noise and an SDE window that starts after
step 0, the samples of a group run the same ODE prefix and branch at the window.

CUDA graphs: on CUDA (`cuda_graph=True`, the default) the step body, policy forward plus the
fused step, is captured once per rollout into a graph with static buffers and replayed N
times: the state, timestep, coefficients and Philox offset are copied into device buffers
before each replay (the step op reads seed and offset from device memory), so replays draw
fresh noise. If capture fails (a policy with host syncs or dynamic shapes), the engine logs
why once and runs eagerly. Elsewhere the loop is eager.

Leaves to others: the policy (sage_fast.models), rewards, which steps are trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sage_fast.grpo import schedule
from sage_fast.kernels import philox_normal, sde_logprob

__all__ = ["SamplerConfig", "Trajectory", "RolloutEngine"]

log = logging.getLogger("sage_fast.rollout")


@dataclass
class SamplerConfig:
    num_steps: int = 20
    """Denoising steps N (HunyuanVideo-1.5 480p t2v: 20 for GRPO rollouts, docs/SPEC.md section 1)."""
    shift: float = 5.0
    """Schedule shift s (480p: 5, 720p: 9)."""
    sde_type: str = "sage_grpo"
    """Step type inside the SDE window: sage_grpo, flow_grpo, dance_grpo or cps."""
    eta: float = 0.5
    """Noise level of the SDE steps (>= 0)."""
    sde_window: tuple[int, int] | None = None
    """Stochastic steps [start, end); None = all N. Steps outside are deterministic (ode)."""
    cfg_scale: float = 6.0
    """Classifier-free guidance scale of the rollout (authors: 6.0; 1 = no guidance)."""

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be an int >= 1, got {self.num_steps!r}")
        if self.sde_type not in schedule.STOCHASTIC_TYPES:
            raise ValueError(f"sampler.sde_type must be one of {schedule.STOCHASTIC_TYPES}, got {self.sde_type!r}")
        if not self.eta >= 0:
            raise ValueError(f"sampler.eta must be >= 0, got {self.eta}")
        if not self.shift > 0:
            raise ValueError(f"sampler.shift must be > 0, got {self.shift}")
        if self.sde_window is not None:
            start, end = self.sde_window
            if not 0 <= start < end <= self.num_steps:
                raise ValueError(f"sampler.sde_window must be [start, end) with 0 <= start < end <= num_steps="
                                 f"{self.num_steps}, got {self.sde_window}")
            self.sde_window = (int(start), int(end))

    def stochastic_steps(self) -> list[int]:
        start, end = self.sde_window or (0, self.num_steps)
        return list(range(start, end))

    def step_types(self) -> list[str]:
        sto = set(self.stochastic_steps())
        return [self.sde_type if t in sto else "ode" for t in range(self.num_steps)]


@dataclass
class Trajectory:
    """One rollout batch. Index t = step (0 = pure noise)."""

    latents: torch.Tensor  # [N + 1, B, C, T, H, W] in the latent dtype: state before step t (t = N: final)
    logp_old: torch.Tensor  # [N, B] float32; 0 at deterministic steps
    coef: torch.Tensor  # [N, 3, B] float64 (a, b, c) of every step
    step_types: list[str]  # [N]
    first_sample: int  # global index of sample 0
    seed: int  # the Philox seed the noise came from

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


class RolloutEngine:
    """Samples trajectories of `policy(latents, timestep, conditioning, cfg_scale) -> velocity`."""

    def __init__(self, policy, sampler: SamplerConfig, *, latent_dtype: torch.dtype = torch.float32,
                 cuda_graph: bool = True) -> None:
        self.policy, self.cfg, self.latent_dtype = policy, sampler, latent_dtype
        self.sigmas = schedule.sigmas(sampler.num_steps, sampler.shift)
        self.types = sampler.step_types()
        self.cuda_graph = cuda_graph
        self.graph_error: str | None = None  # why capture failed, once it has

    def coefficients(self, batch: int) -> torch.Tensor:
        """[N, 3, B] float64 (a, b, c) of every step for a batch (every sample at the same step)."""
        rows = []
        for t, sde_type in enumerate(self.types):
            a, b, c = schedule.step_coefficients(self.sigmas, torch.full((batch,), t, dtype=torch.int64), sde_type,
                                                 self.cfg.eta)
            rows.append(torch.stack([a, b, c]))
        return torch.stack(rows)

    def initial_noise(self, shape, seed: int, first_sample: int, total_samples: int, device,
                      noise_index=None) -> torch.Tensor:
        """x_0 of samples [first_sample, first_sample + B); with `noise_index` ([B] global indices in
        [0, total_samples)) sample b draws the initial noise of global sample noise_index[b]."""
        per_sample = int(torch.Size(shape[1:]).numel())
        base = self.cfg.num_steps * total_samples
        if noise_index is None:
            offset = (base + first_sample) * per_sample
            return philox_normal(int(torch.Size(shape).numel()), seed, offset, device).view(shape).to(self.latent_dtype)
        index = [int(i) for i in noise_index]
        if len(index) != shape[0] or not all(0 <= i < total_samples for i in index):
            raise ValueError(f"noise_index must hold {shape[0]} global sample indices in [0, {total_samples}), "
                             f"got {index}")
        drawn = {i: philox_normal(per_sample, seed, (base + i) * per_sample, device) for i in sorted(set(index))}
        return torch.stack([drawn[i] for i in index]).view(shape).to(self.latent_dtype)

    @torch.no_grad()
    def sample(self, conditioning, shape, *, seed: int, first_sample: int = 0, total_samples: int | None = None,
               device="cpu", noise_index=None) -> Trajectory:
        """Roll out B = shape[0] samples with global indices [first_sample, first_sample + B).

        total_samples: the global number of samples of this rollout (all ranks); default B.
        noise_index: [B] global indices whose initial noise each sample starts from (default: its own).
        """
        batch = shape[0]
        total = batch if total_samples is None else total_samples
        if first_sample < 0 or first_sample + batch > total:
            raise ValueError(f"samples [{first_sample}, {first_sample + batch}) must lie in [0, {total})")
        n = self.cfg.num_steps
        per_sample = int(torch.Size(shape[1:]).numel())
        coef = self.coefficients(batch)
        coef_dev = coef.to(device=device, dtype=torch.float32)
        latents = torch.empty((n + 1,) + tuple(shape), dtype=self.latent_dtype, device=device)
        latents[0] = self.initial_noise(shape, seed, first_sample, total, device, noise_index)
        logp = torch.zeros(n, batch, dtype=torch.float32, device=device)
        rng = torch.tensor([seed, 0], dtype=torch.int64, device=device)
        timesteps = (1000.0 * self.sigmas[:-1]).to(torch.float32).view(-1, 1).expand(n, batch).contiguous().to(device)
        offsets = [(t * total + first_sample) * per_sample for t in range(n)]
        use_graph = self.cuda_graph and torch.device(device).type == "cuda" and self.graph_error is None
        if not (use_graph and self._graph_loop(conditioning, latents, logp, coef_dev, timesteps, rng, offsets)):
            for t in range(n):
                rng[1] = offsets[t]
                v = self.policy(latents[t], timesteps[t], conditioning, self.cfg.cfg_scale).to(self.latent_dtype)
                x_next, lp = torch.ops.sage_fast.sde_step(latents[t], v.contiguous(), coef_dev[t].contiguous(), None,
                                                          rng, self.types[t], "mean")
                latents[t + 1] = x_next
                logp[t] = lp
        return Trajectory(latents=latents, logp_old=logp, coef=coef, step_types=list(self.types),
                          first_sample=first_sample, seed=seed)

    def _graph_loop(self, conditioning, latents, logp, coef_dev, timesteps, rng, offsets) -> bool:
        """The denoising loop as one captured CUDA graph replayed per step; False if capture failed.

        One graph serves every step: outside the SDE window c = 0, which makes the step
        deterministic (logp = 0) whatever the step type the graph was captured with.
        """
        sde_type = self.cfg.sde_type
        static_x, static_t = latents[0].clone(), timesteps[0].clone()
        static_coef = coef_dev[0].contiguous().clone()

        def body():
            v = self.policy(static_x, static_t, conditioning, self.cfg.cfg_scale).to(self.latent_dtype)
            return torch.ops.sage_fast.sde_step(static_x, v.contiguous(), static_coef, None, rng, sde_type, "mean")

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm up: lazy initialisation, autotuning, allocator
                    body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_x, out_lp = body()
        except Exception as err:  # noqa: BLE001 - any capture failure means: run eagerly
            self.graph_error = f"{type(err).__name__}: {err}"
            log.warning("rollout: CUDA-graph capture failed, running eagerly from now on (%s)", self.graph_error)
            return False
        for t in range(len(offsets)):
            static_x.copy_(latents[t])
            static_t.copy_(timesteps[t])
            static_coef.copy_(coef_dev[t])
            rng[1] = offsets[t]
            graph.replay()
            latents[t + 1].copy_(out_x)
            logp[t].copy_(out_lp)
        return True

    def recompute_logprob(self, traj: Trajectory, t: int, velocity: torch.Tensor, v_ref=None):
        """Training-time (logp, kl, grad_norm) of step t of `traj` under `velocity` ([B, ...])."""
        if self.types[t] == "ode":
            raise ValueError(f"step {t} is deterministic (outside the SDE window): it has no log-prob")
        a, b, c = traj.coef[t]
        velocity = velocity.to(traj.latents.dtype).contiguous()
        return sde_logprob(traj.latents[t], velocity, traj.latents[t + 1], a, b, c, sde_type=self.types[t], v_ref=v_ref)
