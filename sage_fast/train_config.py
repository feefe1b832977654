"""The trainer's configuration tree and its recipes.

    TrainConfig
      run      output folder, steps, seeds, evaluation / checkpoint / log cadence, fault limits
      model    sage_fast.models.VelocityModelConfig: checkpoint or architecture, LoRA/full, autocast
      sampler  sage_fast.grpo.rollout.SamplerConfig: steps, shift, SDE type, eta, window, CFG
      world    the synthetic world (prompts, video size, reward weights)
      grpo     batch and group sizes, trained steps, clip range, equalizer, KL (dual trust region)
      optim    AdamW and gradient clipping
      dist     data parallel strategy and sequence parallel degree

Recipes (`--recipe NAME`): `tiny_world` (the default: the shipped tiny model on the synthetic
world, CPU-sized). Any field can be overridden as `section.field=value`. (A HunyuanVideo-1.5
recipe needs a task with its text encoders, VAE and a reward model: not written yet.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sage_fast.config import recipe
from sage_fast.grpo.equalizer import EQUALIZER_MODES
from sage_fast.grpo.kl_schedule import BETA_SCHEDULES
from sage_fast.grpo.loss import KL_MODES
from sage_fast.grpo.rollout import SamplerConfig
from sage_fast.models import VelocityModelConfig

__all__ = ["RunConfig", "WorldConfig", "GRPOConfig", "OptimConfig", "DistConfig", "TrainConfig",
           "REF_SOURCES", "DP_STRATEGIES", "tiny_world_checkpoint"]

REF_SOURCES = ("training_phase", "rollout_phase")
DP_STRATEGIES = ("ddp", "fsdp2")


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class RunConfig:
    output_dir: str = "runs/tiny_world"
    """Run folder: config.json, metrics.jsonl, TensorBoard events, samples/, checkpoints/."""
    steps: int = 30
    """GRPO iterations (each: one rollout, then `grpo.updates_per_rollout` optimizer steps)."""
    seed: int = 0
    """Base seed: prompt order, rollout noise and trained-step choice all derive from it."""
    resume: bool = False
    """Continue from the run folder's latest checkpoint."""
    overwrite: bool = False
    """Delete an existing run folder first (without it, an existing run is never overwritten)."""
    eval_every: int = 5
    """Evaluate (fixed prompts and noise) every this many iterations, and at the first and last."""
    save_every: int = 10
    """Checkpoint every this many iterations, and at the last."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    max_nonfinite: int = 3
    """Stop after this many consecutive updates skipped for a NaN/inf loss or gradient."""
    tensorboard: bool = True
    """Write TensorBoard events next to metrics.jsonl."""
    save_videos: bool = True
    """Write evaluation samples as GIF and MP4."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    threads: int = 0
    """torch CPU threads per process (0: torch's default)."""

    def __post_init__(self):
        _positive_int("run.steps", self.steps)
        for name in ("eval_every", "save_every", "keep_checkpoints", "max_nonfinite"):
            _positive_int(f"run.{name}", getattr(self, name))
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"run.device must be one of ('auto', 'cpu', 'cuda'), got {self.device!r}")
        _positive_int("run.threads", self.threads, 0)
        if not self.output_dir:
            raise ValueError("run.output_dir must be a folder path")


@dataclass
class WorldConfig:
    frames: int = 5
    """Video frames (4k+1; the shipped base model was trained on 5, see its world.json)."""
    height: int = 32
    """Video height in pixels (a multiple of the codec's patch)."""
    width: int = 32
    """Video width in pixels."""
    prompt_file: str | None = None
    """Training prompts (.txt or .jsonl, see sage_fast.world.prompts); None = sampled from the grammar."""
    num_train_prompts: int = 256
    """Prompts sampled from the grammar when no prompt file is given."""
    num_eval_prompts: int = 8
    """Fixed evaluation prompts (sampled from the grammar with their own seed)."""
    two_object_prob: float = 0.5
    """Share of two-object compositions among sampled prompts."""
    prompt_seed: int = 1234
    """Seed of the sampled prompt sets."""
    text_seed: int = 0
    """Seed of the frozen text encoder's tables (must match the base model's pretraining)."""
    reward_weights: str = "alignment"
    """'alignment' (VQ/MQ/TA = 0.5/0.5/1), 'averaged' (1/1/1), or JSON like {"vq": 1, "ta": 2}."""

    def __post_init__(self):
        _positive_int("world.frames", self.frames)
        if (self.frames - 1) % 4:
            raise ValueError(f"world.frames must be 4k+1 (e.g. 9 or 17), got {self.frames}")
        for name in ("height", "width", "num_train_prompts", "num_eval_prompts"):
            _positive_int(f"world.{name}", getattr(self, name))
        if not 0.0 <= self.two_object_prob <= 1.0:
            raise ValueError(f"world.two_object_prob must be in [0, 1], got {self.two_object_prob}")


@dataclass
class GRPOConfig:
    samples_per_rank: int = 8
    """Rollout samples per data-parallel rank (B)."""
    group_size: int = 4
    """Samples per prompt (G; authors: 4). Must divide the global batch (B x ranks); groups may span ranks."""
    train_steps: int | None = None
    """Steps trained per trajectory (K, a random subset of the SDE window per sample); None = all."""
    micro_batch: int = 8
    """(sample, step) pairs per forward/backward; timesteps mix freely inside one."""
    updates_per_rollout: int = 1
    """Optimizer steps per rollout (authors: 1), each a pass over the chosen pairs."""
    clip_range: float = 1e-4
    """PPO ratio clip eps (1e-4: log-probs are means over ~1e6 elements, SPEC section 5)."""
    adv_clip: float = 5.0
    """|advantage| bound."""
    equalizer: str = "analytic"
    """Temporal gradient equalizer: 'analytic' (authors), 'empirical' (measured norms) or 'none'."""
    equalizer_clamp: tuple[float, float] | None = None
    """(s_min, s_max) of the equalizer scales; None = unclipped (analytic) / (0.1, 10) (empirical)."""
    equalizer_momentum: float = 0.9
    """EMA momentum of the empirical equalizer."""
    kl_mode: str = "dual_moving"
    """none, fixed, moving, stepwise, dual_fixed, dual_moving (SPEC section 6)."""
    ref_source: str = "training_phase"
    """Anchor velocities: 'training_phase' (next to the policy forward) or 'rollout_phase' (stored)."""
    update_ref_every: int = 10
    """Optimizer steps between moving-anchor refreshes (authors: 10)."""
    w_anchor: float = 1.0
    """Weight of the anchor (position) KL."""
    w_step: float = 0.1
    """Weight of the step-wise (velocity) KL."""
    beta_schedule: str = "constant"
    """KL coefficient schedule: constant, two_stage, adaptive (correctly signed)."""
    beta: float = 0.01
    """KL coefficient (the target value for two_stage, the start for adaptive)."""
    beta_warmup: float = 0.0
    """two_stage: the loose coefficient of the first `beta_warmup_steps` optimizer steps."""
    beta_warmup_steps: int = 0
    """two_stage: optimizer steps with `beta_warmup`."""
    kl_target: float = 0.01
    """adaptive: the KL the controller steers to."""

    def __post_init__(self):
        for name in ("samples_per_rank", "group_size", "micro_batch", "updates_per_rollout", "update_ref_every"):
            _positive_int(f"grpo.{name}", getattr(self, name))
        if self.train_steps is not None:
            _positive_int("grpo.train_steps", self.train_steps)
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size must be >= 2 (advantages compare samples of a prompt), got "
                             f"{self.group_size}")
        if not self.clip_range > 0 or not self.adv_clip > 0:
            raise ValueError(f"grpo.clip_range and grpo.adv_clip must be > 0, got {self.clip_range}, {self.adv_clip}")
        if self.equalizer not in EQUALIZER_MODES:
            raise ValueError(f"grpo.equalizer must be one of {EQUALIZER_MODES}, got {self.equalizer!r}")
        if self.kl_mode not in KL_MODES:
            raise ValueError(f"grpo.kl_mode must be one of {KL_MODES}, got {self.kl_mode!r}")
        if self.ref_source not in REF_SOURCES:
            raise ValueError(f"grpo.ref_source must be one of {REF_SOURCES}, got {self.ref_source!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"grpo.beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not self.beta >= 0 or not self.beta_warmup >= 0:
            raise ValueError(f"grpo.beta and grpo.beta_warmup must be >= 0, got {self.beta}, {self.beta_warmup}")
        if self.equalizer_clamp is not None and not 0 < self.equalizer_clamp[0] <= self.equalizer_clamp[1]:
            raise ValueError(f"grpo.equalizer_clamp must be (s_min, s_max) with 0 < s_min <= s_max, got "
                             f"{self.equalizer_clamp}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float | None = 1.0
    """Gradient-norm clip (authors: 1.0); None = off."""

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0 or none, got {self.grad_clip}")


@dataclass
class DistConfig:
    strategy: str = "ddp"
    """Data parallel wrapping with more than one rank: 'ddp' or 'fsdp2'."""
    sp: int = 1
    """Ulysses sequence-parallel degree (must divide the world size and the attention heads)."""

    def __post_init__(self):
        if self.strategy not in DP_STRATEGIES:
            raise ValueError(f"dist.strategy must be one of {DP_STRATEGIES}, got {self.strategy!r}")
        _positive_int("dist.sp", self.sp)


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: VelocityModelConfig = field(default_factory=VelocityModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self):
        if self.grpo.train_steps is not None and self.grpo.train_steps > len(self.sampler.stochastic_steps()):
            raise ValueError(f"grpo.train_steps={self.grpo.train_steps} exceeds the "
                             f"{len(self.sampler.stochastic_steps())} steps of the SDE window")


def tiny_world_checkpoint() -> Path:
    """The shipped base model of the synthetic world (sage_fast/world/assets/base_model)."""
    return Path(__file__).resolve().parent / "world" / "assets" / "base_model"


@recipe("tiny_world")
def tiny_world() -> TrainConfig:
    """The embedded default: the shipped tiny HunyuanVideo-1.5-class model on the synthetic world,
    LoRA, SAGE-GRPO with the dual moving-anchor trust region, sized for a 2-core CPU."""
    return TrainConfig(
        run=RunConfig(output_dir="runs/tiny_world", steps=30, eval_every=5, save_every=10),
        model=VelocityModelConfig(checkpoint=str(tiny_world_checkpoint()), finetune="lora", lora_rank=8,
                                  lora_alpha=8.0, autocast_dtype="none"),
        sampler=SamplerConfig(num_steps=10, shift=3.0, sde_type="sage_grpo", eta=0.5, cfg_scale=3.0),
        world=WorldConfig(),
        grpo=GRPOConfig(samples_per_rank=8, group_size=4, train_steps=4, micro_batch=8, clip_range=1e-3,
                        kl_mode="dual_moving", beta=0.01, update_ref_every=10),
        optim=OptimConfig(lr=3e-4),
    )
