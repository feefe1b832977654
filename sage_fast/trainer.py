"""The GRPO trainer: `Trainer.step()` is one iteration in named, timed phases.

    rollout    the global batch's prompts (epoch-shuffled, seeded), G samples each, sampled with
               the SDE sampler and the fused step op (no grad)
    decode     latents -> videos
    reward     weighted reward dimensions; failures NaN (excluded, never zeroed)
    advantages group-normalised across data-parallel ranks
    reference  anchor velocities of the trained (sample, step) pairs, when ref_source=rollout_phase
    train      micro-batches of (sample, step) pairs, timesteps mixed; fused training op; backward
    update     gradient clip, optimizer step (skipped on NaN/inf), KL controller, moving anchor

Everything random derives from (run.seed, iteration, global sample index) (`grpo/data.py`), so a
resumed run continues exactly, and a 2-rank run draws the data of a 1-rank run with the same
global batch. How gradients cross ranks is the strategy's (`parallel/strategy.py`): no branch on
it here.

Leaves to others: the entry point and run-folder policy (train.py), the math (sage_fast.grpo,
sage_fast.kernels), the policy (sage_fast.models), the task (task.py), metrics (metrics.py),
evaluation (evaluation.py), the checkpoint layout (checkpoint.py).
"""

from __future__ import annotations

import logging
import math
import weakref
from pathlib import Path

import torch

from sage_fast.checkpoint import CheckpointManager, seed_process_rngs
from sage_fast.evaluation import eval_key, eval_seed, evaluate
from sage_fast.grpo.advantages import group_advantages
from sage_fast.grpo.anchor import Anchor
from sage_fast.grpo.data import BatchLayout, RolloutBatch, TrainedPairs, derive_seed, epoch_seed, prompt_order, \
    trained_pairs
from sage_fast.grpo.equalizer import TemporalEqualizer
from sage_fast.grpo.guard import SkipGuard
from sage_fast.grpo.kl_schedule import KLController
from sage_fast.grpo.loss import grpo_loss, uses_anchor
from sage_fast.grpo.rollout import RolloutEngine, SamplerConfig
from sage_fast.kernels import sde_logprob
from sage_fast.metrics import LossTotals, MetricsWriter, PerStepStats, PhaseTimer, loss_metrics, reward_metrics, \
    timing_metrics
from sage_fast.models import build_policy_model
from sage_fast.parallel import DataAxis, parallelize
from sage_fast.reward_worker import TaskReward, TimedReward
from sage_fast.rewards import RewardResult, build_metrics
from sage_fast.task import build_task

__all__ = ["Trainer"]

log = logging.getLogger("sage_fast.trainer")


class Trainer:
    def __init__(self, cfg, *, rank: int = 0, world_size: int = 1, group=None, device: str | torch.device = "cpu",
                 writer: MetricsWriter | None = None) -> None:
        """rank, world_size, group: this process among all training ranks (group: their process
        group, default WORLD). With `dist.sp` = S > 1 the ranks form a (dp, sp) mesh, r = d * S + s:
        the S ranks of an sp group share their samples (Ulysses splits each video's tokens), the
        data axis has world_size / S ranks, and gradients are averaged over all ranks."""
        import torch.distributed as dist  # noqa: PLC0415

        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.group = group if group is not None or world_size == 1 else dist.group.WORLD
        self.ranks = DataAxis(rank, world_size, self.group)  # all ranks (the data axis is self.axis)
        # the process-wide RNGs start from the run's seed (per rank): every random draw of the process,
        # not only the explicitly seeded ones, is then reproducible, and a resume restores them exactly
        seed_process_rngs(derive_seed(cfg.run.seed, "process", rank))
        self.device = torch.device(device)
        g, o = cfg.grpo, cfg.optim
        self.model = build_policy_model(cfg.model, cfg.run.seed, device=self.device)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the policy has no trainable parameters")
        self.strategy, self.axis = parallelize(self.model, strategy=cfg.dist.strategy, sp=cfg.dist.sp, rank=rank,
                                               world_size=world_size, group=self.group, device=self.device,
                                               grad_clip=o.grad_clip)
        if (g.samples_per_rank * self.axis.size) % g.group_size:
            raise ValueError(f"grpo.group_size={g.group_size} must divide the global batch grpo.samples_per_rank x "
                             f"data-parallel ranks = {g.samples_per_rank} x {self.axis.size} = "
                             f"{g.samples_per_rank * self.axis.size}")
        self.layout = BatchLayout.of_rank(self.axis.rank, self.axis.size, g.samples_per_rank, g.group_size)
        self.prompts_per_iter = self.layout.total // g.group_size
        self.task = build_task(cfg, self.model.transformer.config, device=self.device)
        self.eval_metrics = build_metrics(cfg.video.eval_metrics, device=self.device)  # beside the reward
        self.trainable = self.strategy.trainable
        self.optimizer = self.strategy.make_optimizer(lambda params: torch.optim.AdamW(
            params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay))
        s, graphs = cfg.sampler, self.strategy.cuda_graphs
        self.engine = RolloutEngine(self.model.velocity, s, cuda_graph=graphs)
        self.eval_engine = RolloutEngine(self.model.velocity, SamplerConfig(  # deterministic: eta = 0
            num_steps=s.num_steps, shift=s.shift, sde_type=s.sde_type, eta=0.0, cfg_scale=s.cfg_scale),
            cuda_graph=graphs)
        coef = self.engine.coefficients(1)
        self.trainable_steps = [t for t in s.stochastic_steps() if float(coef[t, 2, 0]) > 0 and self.model.trains(
            float((1000.0 * self.engine.sigmas[t]).to(torch.float32)))]  # noise, and a trained expert (Wan 2.2)
        if not self.trainable_steps:
            raise ValueError("no stochastic step to train: the SDE window is empty, eta = 0, or model.experts "
                             "freezes the expert of every step in the window (sampler.sde_window)")
        self.k_steps = min(g.train_steps or len(self.trainable_steps), len(self.trainable_steps))
        self.equalizer = TemporalEqualizer(g.equalizer, self.engine.sigmas, s.sde_type, s.eta,
                                           clamp=g.equalizer_clamp, momentum=g.equalizer_momentum, device=self.device)
        self.anchor = None
        if uses_anchor(g.kl_mode):
            self.anchor = Anchor(self.model, "moving" if g.kl_mode in ("moving", "dual_moving") else "fixed",
                                 g.update_ref_every)
        self.kl = KLController(g.beta_schedule, g.beta, warmup_beta=g.beta_warmup, warmup_steps=g.beta_warmup_steps,
                               target=g.kl_target)
        # the task's reward, in a worker process with a time limit when task.reward_timeout_s > 0
        self.timed_reward = TimedReward(TaskReward(self.task), cfg.task.reward_timeout_s) \
            if cfg.task.reward_timeout_s else None
        self.writer, self.iteration = writer, 0
        self.skips = SkipGuard(cfg.run.max_nonfinite)
        self.history: list[dict] = []  # evaluation results, for the end-of-run plot
        self.ckpt = CheckpointManager(cfg.run.output_dir, keep=cfg.run.keep_checkpoints)
        self._register_checkpoint_parts()

    # ---- one iteration ---------------------------------------------------------------------------

    def prompts_for(self, iteration: int) -> list[str]:
        """The global batch's prompts of `iteration` (P = global batch / G)."""
        return prompt_order(self.cfg.run.seed, self.task.train_prompts, iteration, self.prompts_per_iter)

    def rollout(self, it: int, timer: PhaseTimer | None = None) -> RolloutBatch:
        """This rank's samples of iteration `it` under the current policy, rewarded, with advantages."""
        g, lay = self.cfg.grpo, self.layout
        timer = timer or PhaseTimer(self.device)
        with timer("rollout"):
            prompts = self.prompts_for(it)
            local_prompts = [prompts[i] for i in lay.group_b]  # the sp ranks of a group render the same samples
            cond = self.task.conditioning(local_prompts)
            traj = self.engine.sample(cond, (lay.samples,) + tuple(self.task.latent_shape),
                                      seed=epoch_seed(self.cfg.run.seed, it), first_sample=lay.first,
                                      total_samples=lay.total, device=self.device,
                                      noise_index=lay.shared_noise_index() if g.group_noise == "shared" else None)
        with timer("decode"):
            video = self.task.decode(traj.final)
        with timer("reward"):
            reward = self.reward(video, local_prompts)
        with timer("advantages"):
            adv = group_advantages(reward.total_b, lay.group_ids(), clip=g.adv_clip, std_scope=g.adv_std,
                                   process_group=self.axis.group if self.axis.size > 1 else None)
        return RolloutBatch(lay, local_prompts, cond, traj, reward, adv)

    def step(self) -> dict:
        """One iteration: rollout, then (unless no sample of the global batch has a finite reward)
        `updates_per_rollout` passes over the trained pairs, each followed by an update."""
        g, it = self.cfg.grpo, self.iteration
        timer, stats = PhaseTimer(self.device), PerStepStats(self.cfg.sampler.num_steps)
        batch = self.rollout(it, timer)
        loss, update = None, {"grad_norm": 0.0, "skipped": True}
        if float(self.axis.all_reduce(batch.adv.valid_b.sum().to(torch.float64).reshape(1))) == 0:
            # nothing to learn from, and an optimizer step on zero gradients would still move Adam's momentum
            self.skips.skipped(self.iteration, f"batch without a finite reward ({batch.reward.error or 'every reward NaN'})")
        else:
            pairs = trained_pairs(self.cfg.run.seed, it, self.layout, self.trainable_steps, self.k_steps)
            v_ref = None
            if g.ref_source == "rollout_phase" and self._needs_reference():
                with timer("reference"):
                    v_ref = self._reference_velocities(batch, pairs)
            for _ in range(g.updates_per_rollout):
                with timer("train"):
                    totals = self._train_pass(batch, pairs, v_ref, stats)
                    loss = totals.mean()
                with timer("update"):
                    update = self._update(loss, totals)
        metrics = {"iteration": it + 1, **reward_metrics(batch.reward, self.axis),
                   "adv/abs_mean": float(batch.adv.adv_b.abs().mean()), **loss_metrics(loss),
                   "grad_norm": update["grad_norm"], "update_skipped": update["skipped"], "beta": self.kl.beta,
                   "nonfinite_total": self.skips.total, **timing_metrics(timer, self.layout.total),
                   "per_step": stats.summary()}
        self.iteration += 1
        return metrics

    def _needs_reference(self) -> bool:
        return self.anchor is not None and not self.anchor.equals_policy

    def _reference(self, x, timestep, cond) -> torch.Tensor:
        return self.anchor.forward(self.model, x, timestep, cond, self.cfg.sampler.cfg_scale).to(x.dtype).contiguous()

    @torch.no_grad()
    def _reference_velocities(self, batch: RolloutBatch, pairs: TrainedPairs) -> list[torch.Tensor]:
        """The anchor's velocity of every micro-batch, computed once before the passes."""
        out = []
        for mb in pairs.micro_batches(self.cfg.grpo.micro_batch, batch.adv.valid_b):
            x, _, _, timestep, c = batch.pair_inputs(mb, self.engine.sigmas, self.device)
            out.append(self._reference(x, timestep, c))
        return out

    def _train_pass(self, batch: RolloutBatch, pairs: TrainedPairs, v_ref_store, stats: PerStepStats) -> LossTotals:
        """Gradients of the loss over every trained pair; returns the pass's loss terms."""
        g, s = self.cfg.grpo, self.cfg.sampler
        self.optimizer.zero_grad(set_to_none=True)
        batches = pairs.micro_batches(g.micro_batch, batch.adv.valid_b)
        n_valid = self.axis.all_reduce(batch.adv.valid_b[pairs.sample_b].sum().to(torch.float64)).clamp(min=1.0)
        totals = LossTotals()
        for i, mb in enumerate(batches):
            x, x_next, coef, timestep, c = batch.pair_inputs(mb, self.engine.sigmas, self.device)
            with self.strategy.micro_batch(last=i == len(batches) - 1):
                v = self.strategy.policy(x, timestep, c, s.cfg_scale).to(x.dtype).contiguous()
                v_ref = None
                if self._needs_reference():
                    v_ref = v_ref_store[i] if v_ref_store is not None else self._reference(x, timestep, c)
                logp, kl_a, grad_norm = sde_logprob(x, v, x_next, coef[:, 0], coef[:, 1], coef[:, 2],
                                                    sde_type=s.sde_type, v_ref=v_ref)
                scale = self.equalizer.scales_across(mb.step_t.to(self.device), grad_norm, self.axis)
                valid = mb.valid.to(self.device)
                terms = grpo_loss(logp, batch.traj.logp_old[mb.step_t, mb.sample_b],
                                  batch.adv.adv_b[mb.sample_b].to(self.device), clip_range=g.clip_range, scale=scale,
                                  kl_anchor=kl_a, mode=g.kl_mode, beta=self.kl.beta, w_anchor=g.w_anchor,
                                  w_step=g.w_step, valid=valid)
                # mean over the global valid pairs: every strategy averages over all ranks and the sp
                # ranks of a group hold the same pairs (their average is the group's gradient), so
                # scale by the number of data-parallel ranks
                self.strategy.backward(terms.loss * (float(valid.sum()) * self.axis.size / float(n_valid)))
            totals.add(terms, valid)
            stats.add(mb.step_t, ratio=terms.ratio_b, clipped=terms.clipped_b.float(), kl=kl_a.detach(),
                      grad_norm=grad_norm, scale=scale)
        return totals

    def _update(self, loss: dict, totals: LossTotals) -> dict:
        loss_finite = not self.ranks.any(not math.isfinite(loss["loss"]))  # every rank decides alike
        norm, applied = self.strategy.step(self.cfg.optim.grad_clip, loss_finite=loss_finite)
        if not (applied and bool(torch.isfinite(norm)) and loss_finite):
            if applied:  # only a strategy that decides itself (ZeRO-2); its overflow check makes this unexpected
                log.error("iteration %d: the update was applied with a non-finite loss", self.iteration)
            self.optimizer.zero_grad(set_to_none=True)
            self.skips.skipped(self.iteration, f"non-finite loss or gradient (loss {loss['loss']}, grad norm {float(norm)})")
            return {"grad_norm": float(norm), "skipped": True}
        self.skips.applied()
        key = "kl_anchor" if self.anchor is not None else "kl_step"
        # adaptive beta follows the global batch's KL, so every rank keeps the same beta
        self.kl.update(totals.mean_over(self.axis, key) if self.kl.schedule == "adaptive" else loss[key])
        refreshed = self.anchor.after_optimizer_step(self.model) if self.anchor is not None else False
        return {"grad_norm": float(norm), "skipped": False, "anchor_refreshed": refreshed}

    # ---- evaluation, rewards --------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Fixed prompts and fixed noise, deterministic sampler: comparable across iterations."""
        out, self.last_eval_video = evaluate(self.eval_engine, self.task, self.reward,
                                             seed=eval_seed(self.cfg.run.seed), device=self.device,
                                             metrics=self.eval_metrics)
        out = {"iteration": self.iteration, "eval_key": eval_key(self.cfg, self.task), **out}
        self.history.append(out)
        return out

    def reward(self, video_bcfhw: torch.Tensor, prompts: list[str]) -> RewardResult:
        """The task's reward of a batch (failed rows NaN), within task.reward_timeout_s."""
        if self.timed_reward is None:
            return self.task.reward(video_bcfhw, prompts)
        return self.timed_reward(video_bcfhw, prompts)

    def close(self) -> None:
        """Stop helper processes (the reward worker)."""
        if self.timed_reward is not None:
            self.timed_reward.close()

    # ---- checkpoints: full tensors, so a run resumes under any strategy and rank count ----------

    def _register_checkpoint_parts(self) -> None:
        st, part = self.strategy, self.ckpt.register

        me = weakref.ref(self)  # no trainer <-> manager cycle: a trainer is freed (its DDP too) when dropped
        part("iteration", lambda: me().iteration, lambda v: setattr(me(), "iteration", int(v)))
        part("model", st.model_state, st.load_model_state)
        part("optimizer", st.optimizer_state, st.load_optimizer_state)  # after the model: ZeRO-2 reads it
        part("equalizer", self.equalizer.state_dict, self.equalizer.load_state_dict)
        part("kl", self.kl.state_dict, self.kl.load_state_dict)
        part("nonfinite", self.skips.state_dict, self.skips.load_state_dict)
        part("history", lambda: [dict(h) for h in me().history], lambda v: setattr(me(), "history", list(v)))
        if self.anchor is not None:  # its parameter copies as full tensors, like the policy's
            a = self.anchor
            part("anchor", lambda: {**a.state_dict(), "params": st.full_tensors(a.state_dict()["params"])},
                 lambda v: a.load_state_dict({**v, "params": st.local_tensors(v["params"])}))

    def state_dict(self) -> dict:
        """The full training state (a collective under FSDP2 and ZeRO-2: every rank calls it)."""
        return self.ckpt.state()

    def load_state_dict(self, state: dict) -> None:
        self.ckpt.restore(state)

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a collective: every rank calls it)."""
        return self.ranks.any(flag)

    def save(self) -> Path:
        """Checkpoint the current iteration (every rank calls it; CheckpointManager.save_on_ranks)."""
        return self.ckpt.save_on_ranks(self.iteration, self.ranks, collective=self.strategy.collective_state,
                                       meta={"world_size": self.world, "strategy": self.cfg.dist.strategy})

    def resume(self) -> bool:
        """Load the latest good checkpoint (run.resume_fallback: skipping a corrupt latest one)."""
        if not self.ckpt.resume(self.ranks, map_location=self.device, fallback=self.cfg.run.resume_fallback):
            return False
        log.info("resumed from iteration %d (%s)", self.iteration, self.ckpt.last_loaded)
        return True
