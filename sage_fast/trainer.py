"""The GRPO trainer: `Trainer.step()` is one iteration in named, timed phases.

    prompts    the global batch's prompts for this iteration (epoch-shuffled, seeded), G samples each
    rollout    sample trajectories with the SDE sampler and the fused step op (no grad)
    reference  anchor velocities of the trained (sample, step) pairs, when ref_source=rollout_phase
    decode     latents -> videos
    reward     weighted reward dimensions; failures become NaN (excluded, never zeroed)
    advantages group-normalised across data-parallel ranks
    train      micro-batches of (sample, step) pairs, timesteps mixed; fused training op; loss backward
    update     gradient clip, optimizer step (skipped on NaN/inf), KL controller, moving anchor

Everything random derives from (run.seed, iteration, global sample index): the prompt order, the
rollout noise (rollout.py) and the trained steps, so a run resumed from a checkpoint continues
exactly as the uninterrupted run, and a 2-rank run draws the data of a 1-rank run with the same
global batch.

Leaves to others: the entry point and run-folder policy (train.py), the math (sage_fast.grpo,
sage_fast.kernels), the policy (sage_fast.models), the task (task.py), metrics files (metrics.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from sage_fast.checkpoint import (CheckpointError, CheckpointManager, CheckpointSaveError, capture_rng_state,
                                  restore_rng_state, seed_process_rngs)
from sage_fast.grpo.advantages import group_advantages
from sage_fast.grpo.anchor import Anchor
from sage_fast.grpo.equalizer import TemporalEqualizer
from sage_fast.grpo.kl_schedule import KLController
from sage_fast.grpo.loss import grpo_loss, uses_anchor
from sage_fast.grpo.rollout import RolloutEngine, SamplerConfig, epoch_seed
from sage_fast.kernels import sde_logprob
from sage_fast.metrics import MetricsWriter, PhaseTimer, PerStepStats
from sage_fast.models import Conditioning, TextEmbeddings, build_velocity_model
from sage_fast.reward_worker import TimedReward
from sage_fast.task import build_task

__all__ = ["Trainer", "select_conditioning", "derive_seed", "build_policy_model"]

log = logging.getLogger("sage_fast.trainer")


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (distinct parts, unrelated seeds)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def build_policy_model(model_cfg, run_seed: int, device="cpu"):
    """The policy a run with `run.seed` starts from. LoRA's initialisation draws from the global
    RNG: seed it, so every run (and rank, and an export rebuilding the run) with the same
    run.seed starts from the same policy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(run_seed, "init") % (2**31))
        return build_velocity_model(model_cfg, device=device, seed=run_seed)


def _select_text(text: TextEmbeddings, idx: torch.Tensor) -> TextEmbeddings:
    return TextEmbeddings(*(t.index_select(0, idx) for t in (text.embeds_bld, text.mask_bl, text.embeds_2_bld,
                                                               text.mask_2_bl)))


def select_conditioning(cond: Conditioning, idx: torch.Tensor) -> Conditioning:
    """The rows `idx` of a batch's conditioning (pairs of a micro-batch may repeat samples)."""
    def pick(t):
        return None if t is None else t.index_select(0, idx)

    return Conditioning(prompt=_select_text(cond.prompt, idx),
                        negative=None if cond.negative is None else _select_text(cond.negative, idx),
                        image_embeds_bnd=pick(cond.image_embeds_bnd), cond_latents_bcthw=pick(cond.cond_latents_bcthw),
                        cond_mask_b1thw=pick(cond.cond_mask_b1thw))


@dataclass
class _Pairs:
    sample_b: torch.Tensor  # [P] local sample index of each trained pair
    step_t: torch.Tensor  # [P] step index


class Trainer:
    def __init__(self, cfg, *, rank: int = 0, world_size: int = 1, group=None, device: str | torch.device = "cpu",
                 writer: MetricsWriter | None = None) -> None:
        """rank, world_size, group: this process among all training ranks (group: their process
        group, default WORLD). With `dist.sp` = S > 1 the ranks form a (dp, sp) mesh, r = d * S + s:
        the S ranks of an sp group share their samples (Ulysses splits each video's tokens), the
        data axis has world_size / S ranks, and gradients are averaged over all ranks."""
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.group = group if group is not None or world_size == 1 else dist.group.WORLD
        # the process-wide RNGs start from the run's seed (per rank): every random draw of the process,
        # not only the explicitly seeded ones, is then reproducible, and a resume restores them exactly
        seed_process_rngs(derive_seed(cfg.run.seed, "process", rank))
        self.device = torch.device(device)
        g, sp = cfg.grpo, cfg.dist.sp
        if world_size % sp:
            raise ValueError(f"dist.sp={sp} must divide the number of ranks ({world_size})")
        self.dp_rank, self.dp_size = rank // sp, world_size // sp
        global_batch = g.samples_per_rank * self.dp_size
        if global_batch % g.group_size:
            raise ValueError(f"grpo.group_size={g.group_size} must divide the global batch grpo.samples_per_rank x "
                             f"data-parallel ranks = {g.samples_per_rank} x {self.dp_size} = {global_batch}")
        self.prompts_per_iter = global_batch // g.group_size

        self.model = build_policy_model(cfg.model, cfg.run.seed, device=self.device)
        heads = self.model.transformer.config.num_attention_heads
        if heads % sp:
            raise ValueError(f"dist.sp={sp} must divide the attention heads ({heads})")
        # the data axis (advantages, metrics, equalizer statistics) and the flattened all-ranks
        # mesh the gradients are averaged over
        self.dp_group, grad_mesh = self.group, None
        if sp > 1:
            from sage_fast.parallel import apply_sequence_parallel, build_mesh, flat_mesh  # noqa: PLC0415

            mesh = build_mesh(sp=sp, device_type=self.device.type)
            self.dp_group = mesh["dp"].get_group() if self.dp_size > 1 else None
            grad_mesh = flat_mesh(mesh)
            # after LoRA (built above): a LoRA delta on proj_out must come before the gather
            apply_sequence_parallel(self.model.transformer, mesh["sp"].get_group())
        self.task = build_task(cfg, self.model.transformer.config, device=self.device)
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the policy has no trainable parameters")
        self.policy = self.model
        self.fsdp = world_size > 1 and cfg.dist.strategy == "fsdp2"
        if self.fsdp:
            from torch.distributed.device_mesh import DeviceMesh  # noqa: PLC0415

            from sage_fast.parallel.wrap import wrap_fsdp2  # noqa: PLC0415

            # one FSDP unit per double-stream block, then the root; gradients are reduce-scattered
            # (averaged over ranks, like DDP) on the last micro-batch's backward
            if grad_mesh is None:
                grad_mesh = DeviceMesh.from_group(self.group, self.device.type)
            wrap_fsdp2(self.model.transformer, grad_mesh)
            # fully_shard replaced every parameter with a sharded DTensor: collect them again
            self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        elif world_size > 1:
            from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

            # find_unused_parameters: the last double-stream block's text branch (and its LoRA) feeds
            # nothing, and DDP without it silently skips the gradient all-reduce of any bucket
            # holding an unused parameter (seen here: rank gradients differed after "sync")
            self.policy = DistributedDataParallel(self.model, process_group=self.group, find_unused_parameters=True,
                                                  device_ids=[self.device.index] if self.device.type == "cuda" else None)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW([p for _, p in self.trainable], lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.ds = None  # the DeepSpeed engine under dist.strategy='deepspeed_zero2' with > 1 rank
        if world_size > 1 and cfg.dist.strategy == "deepspeed_zero2":
            self.ds = _deepspeed_zero2(self.model, self.optimizer, o.grad_clip, self.device)
            self.policy, self.optimizer = self.ds, self.ds.optimizer
        # CUDA graphs do not hold FSDP2's per-block all-gathers or Ulysses' all-to-alls here: eager
        self.engine = RolloutEngine(self.model.velocity, cfg.sampler, cuda_graph=not self.fsdp and sp == 1)
        self.eval_engine = RolloutEngine(self.model.velocity, SamplerConfig(
            num_steps=cfg.sampler.num_steps, shift=cfg.sampler.shift, sde_type=cfg.sampler.sde_type, eta=0.0,
            cfg_scale=cfg.sampler.cfg_scale), cuda_graph=not self.fsdp and sp == 1)  # as the rollout engine
        coef = self.engine.coefficients(1)
        self.trainable_steps = [t for t in cfg.sampler.stochastic_steps() if float(coef[t, 2, 0]) > 0]
        if not self.trainable_steps:
            raise ValueError("no stochastic step to train: the SDE window is empty or eta = 0")
        self.k_steps = min(g.train_steps or len(self.trainable_steps), len(self.trainable_steps))
        self.equalizer = TemporalEqualizer(g.equalizer, self.engine.sigmas, cfg.sampler.sde_type, cfg.sampler.eta,
                                           clamp=g.equalizer_clamp, momentum=g.equalizer_momentum, device=self.device)
        self.anchor = None
        if uses_anchor(g.kl_mode):
            mode = "moving" if g.kl_mode in ("moving", "dual_moving") else "fixed"
            self.anchor = Anchor(self.model, mode, g.update_ref_every)
        self.kl = KLController(g.beta_schedule, g.beta, warmup_beta=g.beta_warmup, warmup_steps=g.beta_warmup_steps,
                               target=g.kl_target)
        self.ckpt = CheckpointManager(cfg.run.output_dir, keep=cfg.run.keep_checkpoints)
        # the task's reward, in a worker process with a time limit when task.reward_timeout_s > 0
        self.timed_reward = TimedReward(_TaskReward(self.task), cfg.task.reward_timeout_s) \
            if cfg.task.reward_timeout_s else None
        self.writer = writer
        self.iteration = 0
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.history: list[dict] = []  # evaluation results, for the end-of-run plot

    # ------------------------------------------------------------------------------------------
    # data

    def prompts_for(self, iteration: int) -> list[str]:
        """The global batch's prompts of `iteration` (P = global batch / G, epoch-shuffled)."""
        n = len(self.task.train_prompts)
        start = iteration * self.prompts_per_iter
        out = []
        for pos in range(start, start + self.prompts_per_iter):
            epoch, i = divmod(pos, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "epoch",
                                                                                          epoch)))
            out.append(self.task.train_prompts[int(order[i])])
        return out

    def _choose_pairs(self, iteration: int, valid_b: torch.Tensor) -> _Pairs:
        """K trained steps per local sample (seeded per global sample), all pairs shuffled."""
        b_local = self.cfg.grpo.samples_per_rank
        steps = torch.tensor(self.trainable_steps)
        sample_b, step_t = [], []
        for b in range(b_local):
            g = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "steps", iteration,
                                                          self.dp_rank * b_local + b))
            chosen = steps[torch.randperm(len(steps), generator=g)[: self.k_steps]]
            sample_b += [b] * len(chosen)
            step_t += chosen.tolist()
        order = torch.randperm(len(sample_b), generator=torch.Generator().manual_seed(
            derive_seed(self.cfg.run.seed, "order", iteration, self.dp_rank)))
        return _Pairs(torch.tensor(sample_b)[order], torch.tensor(step_t)[order])

    # ------------------------------------------------------------------------------------------
    # one iteration

    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.dp_size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.dp_group)
        return t

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.dp_size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.dp_size)]
        dist.all_gather(parts, t.contiguous(), group=self.dp_group)
        return torch.cat(parts)

    def rollout(self, it: int, timer: PhaseTimer | None = None):
        """The data of iteration `it`: (trajectory, conditioning, reward, advantages) of this rank's
        samples, under the current policy (prompts, rollout, decode, reward, advantages)."""
        cfg, g = self.cfg, self.cfg.grpo
        timer = timer or PhaseTimer(self.device)
        b_local, G = g.samples_per_rank, g.group_size
        with timer("rollout"):
            prompts = self.prompts_for(it)
            first = self.dp_rank * b_local  # the sp ranks of a group sample the same videos
            local_prompts = [prompts[(first + b) // G] for b in range(b_local)]
            group_ids = torch.tensor([(first + b) // G for b in range(b_local)], dtype=torch.int64)
            cond = self.task.conditioning(local_prompts)
            shape = (b_local,) + tuple(self.task.latent_shape)
            # shared: every sample starts from its group's first member's initial noise
            noise_index = [(first + b) // G * G for b in range(b_local)] if g.group_noise == "shared" else None
            traj = self.engine.sample(cond, shape, seed=epoch_seed(cfg.run.seed, it), first_sample=first,
                                      total_samples=b_local * self.dp_size, device=self.device,
                                      noise_index=noise_index)
        with timer("decode"):
            video = self.task.decode(traj.final)
        with timer("reward"):
            reward = self.reward(video, local_prompts)
        with timer("advantages"):
            adv = group_advantages(reward.total_b, group_ids, clip=g.adv_clip, std_scope=g.adv_std,
                                   process_group=self.dp_group if self.dp_size > 1 else None)
        return traj, cond, reward, adv

    def step(self) -> dict:
        cfg, g = self.cfg, self.cfg.grpo
        it = self.iteration
        timer = PhaseTimer(self.device)
        traj, cond, reward, adv = self.rollout(it, timer)
        if float(self._all_reduce(adv.valid_b.sum().to(torch.float64).reshape(1))) == 0:
            # no sample of the global batch has a finite reward: nothing to learn from, and an
            # optimizer step on zero gradients would still move Adam's momentum
            self._skip_update(f"batch without a finite reward ({reward.error or 'every reward NaN'})")
            idle = {"loss": 0.0, "policy": 0.0, "kl_anchor": 0.0, "kl_step": 0.0, "clip_frac": 0.0}
            metrics = self._iteration_metrics(it, reward, adv, [idle], {"grad_norm": 0.0, "skipped": True},
                                              PerStepStats(cfg.sampler.num_steps), timer)
            self.iteration += 1
            return metrics
        pairs = self._choose_pairs(it, adv.valid_b)
        v_ref_store = None
        need_ref = self.anchor is not None and not self.anchor.equals_policy
        if need_ref and g.ref_source == "rollout_phase":
            with timer("reference"):
                v_ref_store = self._anchor_velocities(traj, cond, pairs)
        stats = PerStepStats(cfg.sampler.num_steps)
        losses = []
        for update in range(g.updates_per_rollout):
            with timer("train"):
                terms = self._train_pass(traj, cond, adv, pairs, v_ref_store, stats, update)
                losses.append(terms)
            with timer("update"):
                update_info = self._optimizer_step(terms)
        metrics = self._iteration_metrics(it, reward, adv, losses, update_info, stats, timer)
        self.iteration += 1
        return metrics

    def _micro_batches(self, pairs: _Pairs):
        m = self.cfg.grpo.micro_batch
        for start in range(0, pairs.sample_b.numel(), m):
            yield pairs.sample_b[start:start + m], pairs.step_t[start:start + m]

    def _pair_inputs(self, traj, cond, sample_b, step_t):
        x = traj.latents[step_t, sample_b]  # [M, C, T, H, W]
        x_next = traj.latents[step_t + 1, sample_b]
        coef = traj.coef[step_t, :, sample_b]  # [M, 3]
        timestep = (1000.0 * self.engine.sigmas[step_t]).to(torch.float32).to(self.device)
        return x, x_next, coef, timestep, select_conditioning(cond, sample_b.to(self.device))

    @torch.no_grad()
    def _anchor_velocities(self, traj, cond, pairs: _Pairs) -> list[torch.Tensor]:
        out = []
        for sample_b, step_t in self._micro_batches(pairs):
            x, _, _, timestep, c = self._pair_inputs(traj, cond, sample_b, step_t)
            out.append(self.anchor.forward(self.model, x, timestep, c, self.cfg.sampler.cfg_scale).to(x.dtype).contiguous())
        return out

    def _train_pass(self, traj, cond, adv, pairs: _Pairs, v_ref_store, stats, update: int):
        g = self.cfg.grpo
        self.optimizer.zero_grad(set_to_none=True)
        valid_pairs = adv.valid_b[pairs.sample_b]
        n_valid = self._all_reduce(valid_pairs.sum().to(torch.float64)).clamp(min=1.0)
        batches = list(self._micro_batches(pairs))
        need_ref = self.anchor is not None and not self.anchor.equals_policy
        totals = {"loss": 0.0, "policy": 0.0, "kl_anchor": 0.0, "kl_step": 0.0, "clip_frac": 0.0, "pairs": 0}
        sync_ctx = getattr(self.policy, "no_sync", None) if self.ds is None else None
        for i, (sample_b, step_t) in enumerate(batches):
            x, x_next, coef, timestep, c = self._pair_inputs(traj, cond, sample_b, step_t)
            last = i == len(batches) - 1
            ctx = sync_ctx() if (sync_ctx is not None and not last) else _null()
            if self.fsdp:  # accumulate unsharded gradients; reduce-scatter once, on the last micro-batch
                self.model.transformer.set_requires_gradient_sync(last)
            if self.ds is not None:  # ZeRO-2 reduce-scatters every micro-batch into its partitions
                self.ds.set_gradient_accumulation_boundary(last)
            with ctx:
                v = self.policy(x, timestep, c, self.cfg.sampler.cfg_scale).to(x.dtype).contiguous()
                v_ref = None
                if need_ref:
                    v_ref = v_ref_store[i] if v_ref_store is not None else \
                        self.anchor.forward(self.model, x, timestep, c, self.cfg.sampler.cfg_scale).to(x.dtype).contiguous()
                logp, kl_a, grad_norm = sde_logprob(x, v, x_next, coef[:, 0], coef[:, 1], coef[:, 2],
                                                    sde_type=self.cfg.sampler.sde_type, v_ref=v_ref)
                scale = self._scales(step_t, grad_norm)
                valid = valid_pairs[i * g.micro_batch: i * g.micro_batch + sample_b.numel()].to(self.device)
                terms = grpo_loss(logp, traj.logp_old[step_t, sample_b], adv.adv_b[sample_b].to(self.device),
                                  clip_range=g.clip_range, scale=scale, kl_anchor=kl_a, mode=g.kl_mode,
                                  beta=self.kl.beta, w_anchor=g.w_anchor, w_step=g.w_step, valid=valid)
                # mean over the global valid pairs: DDP / FSDP2 average over all ranks and the sp
                # ranks of a group hold the same pairs (their average is the group's gradient),
                # so scale by the number of data-parallel ranks
                weight = float(valid.sum()) * self.dp_size / float(n_valid)
                if self.ds is not None:  # our weights already average: no 1/accumulation-steps scaling
                    self.ds.backward(terms.loss * weight, scale_wrt_gas=False)
                else:
                    (terms.loss * weight).backward()
            n = int(valid.sum())
            totals["pairs"] += n
            for key in ("loss", "policy", "kl_anchor", "kl_step"):
                totals[key] += float(getattr(terms, key).detach()) * n
            totals["clip_frac"] += float((terms.clipped_b & valid).sum())
            stats.add(step_t, ratio=terms.ratio_b, clipped=terms.clipped_b.float(), kl=kl_a.detach(),
                      grad_norm=grad_norm, scale=scale)
        count = max(totals.pop("pairs"), 1)
        return {k: v / count for k, v in totals.items()}

    def _scales(self, step_t: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        step_t = step_t.to(self.device)
        if self.equalizer.mode != "empirical" or self.dp_size == 1:
            return self.equalizer.scales(step_t, grad_norm)
        # every rank updates its statistics with the same (gathered) norms: identical state everywhere
        all_norms, all_steps = self._gather(grad_norm.detach()), self._gather(step_t)
        scales = self.equalizer.scales(all_steps, all_norms)
        m = step_t.numel()
        return scales[self.dp_rank * m:(self.dp_rank + 1) * m]

    def _optimizer_step(self, terms: dict) -> dict:
        params = [p for _, p in self.trainable]
        clip = self.cfg.optim.grad_clip
        if self.ds is not None:
            # DeepSpeed clips (gradient_clipping) and skips the step itself when the global
            # gradient norm is not finite (its overflow check, on in fp32 too)
            self.ds.step()
            norm = self.ds.get_global_grad_norm()
            norm = torch.tensor(float("inf") if norm is None else float(norm))
            applied = self.ds.was_step_applied()
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
            applied = True
        finite = bool(torch.isfinite(norm)) and math.isfinite(terms["loss"]) and applied
        if not finite:
            if applied and self.ds is not None:  # cannot happen with a NaN/inf loss (its gradient is NaN too)
                log.error("iteration %d: DeepSpeed applied an update with a non-finite loss", self.iteration)
            self.optimizer.zero_grad(set_to_none=True)
            self._skip_update(f"non-finite loss or gradient (loss {terms['loss']}, grad norm {float(norm)})")
            return {"grad_norm": float(norm), "skipped": True}
        if self.ds is None:
            self.optimizer.step()
        self.nonfinite_streak = 0
        kl_measure = terms["kl_anchor"] if self.anchor is not None else terms["kl_step"]
        self.kl.update(kl_measure)
        refreshed = self.anchor.after_optimizer_step(self.model) if self.anchor is not None else False
        return {"grad_norm": float(norm), "skipped": False, "anchor_refreshed": refreshed}

    def _skip_update(self, why: str) -> None:
        """Count a skipped update; stop the run after run.max_nonfinite in a row."""
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        log.warning("iteration %d: %s: update skipped (%d in a row)", self.iteration, why, self.nonfinite_streak)
        if self.nonfinite_streak >= self.cfg.run.max_nonfinite:
            raise FloatingPointError(f"{self.nonfinite_streak} consecutive updates skipped, the last for a {why} "
                                     f"(run.max_nonfinite={self.cfg.run.max_nonfinite}): stopping")

    def _iteration_metrics(self, it, reward, adv, losses, update_info, stats, timer) -> dict:
        total = reward.total_b
        finite = torch.isfinite(total)
        sums = torch.tensor([float(total[finite].sum()), float(finite.sum()), float((~finite).sum()),
                             float(total.numel() if reward.timed_out else 0)], dtype=torch.float64)
        self._all_reduce(sums)
        dims = {}
        names = sorted(reward.scores)
        if self.dp_size > 1:  # a rank whose reward failed has no dimensions: agree on the union first
            gathered = [None] * self.dp_size
            dist.all_gather_object(gathered, names, group=self.dp_group)
            names = sorted(set().union(*gathered))
        for name in names:
            score = reward.scores.get(name, torch.empty(0))
            ok = torch.isfinite(score)
            s = self._all_reduce(torch.tensor([float(score[ok].sum()), float(ok.sum())], dtype=torch.float64))
            dims[f"reward/{name}"] = float(s[0] / s[1].clamp(min=1))
        samples = self.cfg.grpo.samples_per_rank * self.dp_size
        out = {
            "iteration": it + 1,
            "reward/mean": float(sums[0] / sums[1].clamp(min=1)),
            **dims,
            "reward/failed": int(sums[2]),
            "reward/timed_out": int(sums[3]),
            "adv/abs_mean": float(adv.adv_b.abs().mean()),
            "loss": losses[-1]["loss"], "policy": losses[-1]["policy"], "kl/anchor": losses[-1]["kl_anchor"],
            "kl/step": losses[-1]["kl_step"], "clip_frac": losses[-1]["clip_frac"],
            "grad_norm": update_info["grad_norm"], "update_skipped": update_info["skipped"],
            "beta": self.kl.beta, "nonfinite_total": self.nonfinite_total,
        }
        out.update({f"time/{k}": v for k, v in timer.seconds.items()})
        out["time/total"] = sum(timer.seconds.values())
        for phase in ("rollout", "reward", "train"):
            if timer.seconds.get(phase):
                out[f"samples_per_s/{phase}"] = samples / timer.seconds[phase]
        out["per_step"] = stats.summary()
        return out

    # ------------------------------------------------------------------------------------------
    # evaluation, checkpoints, the loop

    def eval_key(self) -> str:
        """A fingerprint of what an evaluation samples (prompts, noise seed, sampler, latent shape):
        only evaluations with the same key are paired (a resumed run may have changed them)."""
        s = self.cfg.sampler
        parts = (self.task.eval_prompts, derive_seed(self.cfg.run.seed, "eval"), s.num_steps, s.shift, s.sde_type,
                 s.cfg_scale, tuple(self.task.latent_shape))
        return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Fixed prompts and fixed noise, deterministic (eta = 0) sampler: comparable across iterations."""
        prompts = self.task.eval_prompts
        cond = self.task.conditioning(prompts)
        shape = (len(prompts),) + tuple(self.task.latent_shape)
        traj = self.eval_engine.sample(cond, shape, seed=derive_seed(self.cfg.run.seed, "eval"), device=self.device)
        video = self.task.decode(traj.final)
        reward = self.reward(video, prompts)
        out = {"iteration": self.iteration, "eval_key": self.eval_key(), "eval/reward": float(reward.total_b.nanmean())}
        out.update({f"eval/{k}": float(v.nanmean()) for k, v in reward.scores.items()})
        # per prompt (the same prompts and noise every time): the paired verdict reads these
        per_prompt = {"eval/reward": reward.total_b}
        per_prompt.update({f"eval/{k}": v for k, v in reward.scores.items()})
        dist_m = self.task.manifold_distance(video)
        if dist_m is not None:
            out["eval/manifold_distance"] = float(dist_m.float().mean())
            per_prompt["eval/manifold_distance"] = dist_m
        out["per_prompt"] = {k: [float(x) for x in v.detach().float().cpu()] for k, v in per_prompt.items()}
        self.history.append(out)
        self.last_eval_video = video
        return out

    def state_dict(self) -> dict:
        """The full training state. Under FSDP2 every rank must call it (sharded tensors are
        gathered): the checkpoint holds full tensors, so it resumes under any strategy and rank count."""
        state = {
            "iteration": self.iteration,
            "model": {n: _full(p.detach()).clone() for n, p in self.trainable},
            "optimizer": self._optimizer_state(),
            "equalizer": self.equalizer.state_dict(),
            "kl": self.kl.state_dict(),
            "nonfinite": {"streak": self.nonfinite_streak, "total": self.nonfinite_total},
            "history": [{k: v for k, v in h.items()} for h in self.history],
        }
        if self.anchor is not None:
            anchor = self.anchor.state_dict()
            anchor["params"] = {n: _full(v) for n, v in anchor["params"].items()}
            state["anchor"] = anchor
        return state

    def load_state_dict(self, state: dict) -> None:
        names = {n for n, _ in self.trainable}
        if set(state["model"]) != names:
            raise ValueError("checkpoint parameters do not match the model's trainable ones "
                             f"(e.g. {sorted(set(state['model']) ^ names)[:3]}): same model config needed to resume")
        with torch.no_grad():
            for n, p in self.trainable:
                p.copy_(_like(state["model"][n].to(self.device), p))
        if self.ds is not None:
            _load_zero2_optimizer(self.ds.optimizer, state["optimizer"], self.rank, self.world)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.fsdp:  # the loaded moments are full tensors: shard them like their parameters
            for p in self.optimizer.state:
                for k, v in self.optimizer.state[p].items():
                    if torch.is_tensor(v) and v.dim() > 0 and not isinstance(v, DTensor):
                        self.optimizer.state[p][k] = _like(v.to(self.device), p)
        self.equalizer.load_state_dict(state["equalizer"])
        self.kl.load_state_dict(state["kl"])
        if self.anchor is not None:
            anchor = dict(state["anchor"])
            params = dict(self.trainable)
            anchor["params"] = {n: _like(v.to(self.device), params[n]) if n in params else v
                                for n, v in anchor["params"].items()}
            self.anchor.load_state_dict(anchor)
        self.iteration = int(state["iteration"])
        self.nonfinite_streak = int(state["nonfinite"]["streak"])
        self.nonfinite_total = int(state["nonfinite"]["total"])
        self.history = list(state["history"])

    def _optimizer_state(self) -> dict:
        if self.ds is not None:  # every rank's partition (a collective: every rank calls it)
            local = {"base_optimizer_state": self.ds.optimizer.optimizer.state_dict()}
            gathered = [None] * self.world
            dist.all_gather_object(gathered, local, group=self.group)
            return {"deepspeed_zero2": gathered}
        state = self.optimizer.state_dict()
        if self.fsdp:
            state["state"] = {i: {k: _full(v) for k, v in s.items()} for i, s in state["state"].items()}
        return state

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a collective: every rank calls it)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def save(self) -> Path:
        """Checkpoint the current iteration (every rank calls it). Raises CheckpointSaveError on every
        rank when rank 0 could not write it; the previous checkpoint stays the latest."""
        rng = capture_rng_state()
        # a collective under FSDP2 (full tensors) and DeepSpeed (optimizer partitions)
        state = self.state_dict() if (self.fsdp or self.ds is not None or self.rank == 0) else None
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, rng, group=self.group)
        else:
            gathered = [rng]
        error, path = None, self.ckpt.dir / f"step_{self.iteration:08d}"
        if self.rank == 0:
            try:
                path = self.ckpt.save(self.iteration, state, gathered,
                                      meta={"world_size": self.world, "strategy": self.cfg.dist.strategy})
            except CheckpointSaveError as err:
                error = err
        if self.any_rank(error is not None):  # every rank learns that rank 0's write failed
            raise error or CheckpointSaveError(f"checkpoint {path} not written on rank 0 (see its log)")
        return path

    def resume(self) -> bool:
        """Load the latest good checkpoint (run.resume_fallback: skipping a corrupt latest one)."""
        loaded = self.ckpt.load(map_location=self.device, fallback=self.cfg.run.resume_fallback)
        if loaded is None:
            return False
        _, state, rngs = loaded
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{self.ckpt.last_loaded / 'state.pt'} does not fit this run's model and config "
                                  f"({type(err).__name__}: {err}); resume with the config it was written with "
                                  "(the run folder's config.json)") from err
        if len(rngs) == self.world:
            restore_rng_state(rngs[self.rank])
        log.info("resumed from iteration %d (%s)", self.iteration, self.ckpt.last_loaded)
        return True

    def reward(self, video_bcfhw: torch.Tensor, prompts: list[str]):
        """The task's reward of a batch (a RewardResult; failed rows NaN), within task.reward_timeout_s."""
        if self.timed_reward is None:
            return self.task.reward(video_bcfhw, prompts)
        return self.timed_reward(video_bcfhw, prompts)

    def close(self) -> None:
        """Stop helper processes (the reward worker)."""
        if self.timed_reward is not None:
            self.timed_reward.close()


class _TaskReward:
    """`task.reward` looked up at call time (picklable when the task is, for a spawned worker)."""

    def __init__(self, task) -> None:
        self.task = task

    def __call__(self, video_bcfhw, prompts):
        return self.task.reward(video_bcfhw, prompts)


def _deepspeed_zero2(model, optimizer, grad_clip, device):
    """The DeepSpeed ZeRO-2 engine around the policy and its AdamW: optimizer states and
    gradients partitioned over the ranks, parameters replicated (the rollout runs the plain
    module). The process group must exist (train.py starts it)."""
    import os  # noqa: PLC0415

    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    try:
        import deepspeed  # noqa: PLC0415
    except ImportError as err:
        raise ValueError("dist.strategy='deepspeed_zero2' needs the deepspeed package (pip install deepspeed); "
                         "or use dist.strategy='ddp' or 'fsdp2'") from err
    config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "gradient_clipping": float(grad_clip) if grad_clip is not None else 0.0,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def _load_zero2_optimizer(zero_opt, saved: dict, rank: int, world: int) -> None:
    """Restore this rank's ZeRO-2 partition: AdamW moments and step from the checkpoint, the fp32
    master partition from the (already loaded) float32 parameters, which equal it exactly."""
    parts = saved.get("deepspeed_zero2") if isinstance(saved, dict) else None
    if parts is None:
        raise ValueError("checkpoint optimizer state was not written under dist.strategy='deepspeed_zero2': "
                         "resume with the strategy that wrote it")
    if len(parts) != world:
        raise ValueError(f"checkpoint holds {len(parts)} ZeRO-2 partitions but this run has {world} ranks: resume a "
                         "deepspeed_zero2 run with the same number of ranks")
    zero_opt.optimizer.load_state_dict(parts[rank]["base_optimizer_state"])
    zero_opt._restore_from_bit16_weights()


def _full(t):
    """A DTensor's full value (a collective: every rank calls it); other values as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `ref`: sharded the same way when `ref` is a DTensor."""
    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.dtype), ref.device_mesh, ref.placements)
    return full


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
