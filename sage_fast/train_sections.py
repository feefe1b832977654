"""The sections of the trainer's config tree: typed dataclasses, each validated in `__post_init__`.

`TrainConfig` holds one of each (run, model, sampler, task, world, video, grpo, optim, dist); the
section of the model is `sage_fast.models.VelocityModelConfig` and that of the sampler
`sage_fast.grpo.rollout.SamplerConfig`. Public through `sage_fast.train_config`, which also holds
the recipes and the path checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sage_fast.grpo.advantages import STD_SCOPES
from sage_fast.grpo.equalizer import EQUALIZER_MODES
from sage_fast.grpo.kl_schedule import BETA_SCHEDULES
from sage_fast.grpo.loss import KL_MODES
from sage_fast.grpo.rollout import SamplerConfig
from sage_fast.models import VelocityModelConfig
from sage_fast.parallel.strategy import STRATEGIES

__all__ = ["RunConfig", "TaskConfig", "WorldConfig", "VideoConfig", "GRPOConfig", "OptimConfig", "DistConfig",
           "TrainConfig", "REF_SOURCES", "GROUP_NOISE", "TASK_KINDS", "PIPELINE_DTYPES", "ON_SAVE_ERROR",
           "preempt_signal_numbers"]

REF_SOURCES = ("training_phase", "rollout_phase")
TASK_KINDS = ("world", "hunyuanvideo15", "wan")
GROUP_NOISE = ("independent", "shared")
PIPELINE_DTYPES = ("bfloat16", "float16", "float32")


ON_SAVE_ERROR = ("stop", "continue")


def preempt_signal_numbers(text: str) -> list[int]:
    """run.preempt_signals ('SIGTERM,SIGUSR1') as signal numbers; an unknown or uncatchable name is an error."""
    import signal  # noqa: PLC0415

    out = []
    for name in (n.strip().upper() for n in text.split(",") if n.strip()):
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal, name, None)
        if not isinstance(sig, signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"run.preempt_signals: {name!r} is not a signal a process can catch (e.g. SIGTERM, "
                             "SIGUSR1, SIGUSR2, SIGINT; '' for none)")
        out.append(int(sig))
    return out


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


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
    export_final: bool = True
    """At the end, export the trained policy to <run>/final_model (LoRA merged, plus the adapter; sage_fast.export)."""
    preempt_signals: str = "SIGTERM,SIGUSR1"
    """Signals that stop the run after the current iteration with a checkpoint, exit code 75 (comma-separated; '' = none)."""
    resume_fallback: bool = True
    """On resume, a corrupt or incomplete latest checkpoint is reported and the newest good older one used (false: stop)."""
    on_save_error: str = "stop"
    """A checkpoint that cannot be written (disk full, unwritable): 'stop' (exit code 5) or 'continue' (retry at the next save)."""

    def __post_init__(self):
        _positive_int("run.steps", self.steps)
        preempt_signal_numbers(self.preempt_signals)  # validates the names
        _one_of("run.on_save_error", self.on_save_error, ON_SAVE_ERROR)
        for name in ("eval_every", "save_every", "keep_checkpoints", "max_nonfinite"):
            _positive_int(f"run.{name}", getattr(self, name))
        _one_of("run.device", self.device, ("auto", "cpu", "cuda"))
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
    """Fixed evaluation prompts: distinct, held out (never training prompts), sampled from the grammar with their own seed."""
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
class TaskConfig:
    kind: str = "world"
    """'world' (the synthetic world, section `world`), or a real pipeline (section `video`): 'hunyuanvideo15'
    or 'wan' (Wan 2.1 / 2.2 text-to-video; needs model.family='wan')."""
    reward_timeout_s: float = 0.0
    """Seconds a batch's reward may take; > 0 runs the reward in a worker process that is killed past it
    (the batch's samples then count as failed rewards and the run goes on). 0 = in process, no limit."""

    def __post_init__(self):
        _one_of("task.kind", self.kind, TASK_KINDS)
        if not (isinstance(self.reward_timeout_s, (int, float)) and math.isfinite(self.reward_timeout_s)
                and self.reward_timeout_s >= 0):
            raise ValueError(f"task.reward_timeout_s must be a number of seconds >= 0 (0 = no limit), "
                             f"got {self.reward_timeout_s!r}")


@dataclass
class VideoConfig:
    pipeline: str | None = None
    """Local diffusers pipeline folder: HunyuanVideo-1.5 (text_encoder, tokenizer, text_encoder_2, tokenizer_2, vae)
    or Wan (tokenizer, text_encoder, vae, scheduler, transformer[, transformer_2]), as task.kind says."""
    prompt_file: str | None = None
    """Training prompts, .txt (one per line) or .jsonl (objects with 'prompt')."""
    eval_prompt_file: str | None = None
    """Evaluation prompts; None = the first `num_eval_prompts` prompts of the prompt file, held out from training."""
    num_eval_prompts: int = 8
    """Evaluation prompts held out from the prompt file when no eval file is given."""
    negative_prompt: str = ""
    """The CFG negative prompt (diffusers' pipeline default: empty)."""
    frames: int = 81
    """Video frames (4k+1; 81 -> 21 latent frames)."""
    height: int = 480
    """Video height in pixels (a multiple of 16)."""
    width: int = 848
    """Video width in pixels (a multiple of 16)."""
    reward: str = "clip_score=checkpoints/clip-vit-large-patch14"
    """Reward parts, comma-separated kind=argument: clip_score=<CLIP folder>, pickscore=<PickScore folder>,
    python=<module>:<function> (sage_fast.rewards)."""
    eval_metrics: str = ""
    """Metrics scored beside the reward at evaluation (eval/<name>), the kinds of video.reward, e.g.
    clip_score=<CLIP folder>,pickscore=<PickScore folder> (the paper's Table 2); empty = none."""
    reward_weights: str = ""
    """JSON {dimension: weight}; empty = weight 1 for every returned dimension."""
    dtype: str = "bfloat16"
    """Text encoders' dtype, and the VAE's unless video.vae_dtype: bfloat16, float16 or float32."""
    vae_dtype: str | None = None
    """The VAE's own dtype when it differs (bfloat16, float16 or float32; None = video.dtype):
    diffusers' Wan examples load the VAE in float32 beside a bf16 pipeline."""
    vae_tiling: bool = True
    """Decode in spatial tiles (diffusers' VAE tiling) to bound decode memory."""
    text_batch: int = 8
    """Prompts per text-encoder forward (encoded once at start, then the encoders are freed)."""

    def __post_init__(self):
        _one_of("video.dtype", self.dtype, PIPELINE_DTYPES)
        if self.vae_dtype is not None:
            _one_of("video.vae_dtype", self.vae_dtype, PIPELINE_DTYPES)
        _positive_int("video.frames", self.frames)
        if (self.frames - 1) % 4:
            raise ValueError(f"video.frames must be 4k+1 (e.g. 33, 61, 81), got {self.frames}")
        for name in ("height", "width"):
            value = getattr(self, name)
            _positive_int(f"video.{name}", value)
            if value % 16:
                raise ValueError(f"video.{name} must be a multiple of 16 (the VAE's spatial compression), got {value}")
        _positive_int("video.num_eval_prompts", self.num_eval_prompts)
        _positive_int("video.text_batch", self.text_batch)
        from sage_fast.rewards import parse_reward_spec, parse_weights  # noqa: PLC0415

        parse_reward_spec(self.reward)
        if self.eval_metrics.strip():
            parse_reward_spec(self.eval_metrics, "video.eval_metrics")
        parse_weights(self.reward_weights)


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
    """PPO ratio clip eps (1e-4: log-probs are means over ~1e6 elements, docs/SPEC.md section 5)."""
    adv_clip: float = 5.0
    """|advantage| bound."""
    adv_std: str = "group"
    """Advantage denominator: 'group' (each group's std, the authors'), 'batch' (pooled within-group std of the global batch) or 'none' (raw differences: adv_clip is then in reward units)."""
    group_noise: str = "independent"
    """Initial noise: 'independent' (each sample its own) or 'shared' (a group's samples start from one noise; with an SDE window after step 0 they share the ODE prefix and branch at the window)."""
    equalizer: str = "analytic"
    """Temporal gradient equalizer: 'analytic' (authors), 'empirical' (measured norms) or 'none'."""
    equalizer_clamp: tuple[float, float] | None = None
    """(s_min, s_max) of the equalizer scales; None = unclipped (analytic) / (0.1, 10) (empirical)."""
    equalizer_momentum: float = 0.9
    """EMA momentum of the empirical equalizer."""
    kl_mode: str = "dual_moving"
    """none, fixed, moving, stepwise, dual_fixed, dual_moving (docs/SPEC.md section 6)."""
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
        _one_of("grpo.adv_std", self.adv_std, STD_SCOPES)
        _one_of("grpo.group_noise", self.group_noise, GROUP_NOISE)
        _one_of("grpo.equalizer", self.equalizer, EQUALIZER_MODES)
        _one_of("grpo.kl_mode", self.kl_mode, KL_MODES)
        _one_of("grpo.ref_source", self.ref_source, REF_SOURCES)
        _one_of("grpo.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
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
    """Data parallel wrapping with more than one rank: 'ddp', 'fsdp2' or 'deepspeed_zero2' (needs the deepspeed package)."""
    sp: int = 1
    """Ulysses sequence-parallel degree (must divide the world size and the attention heads)."""

    def __post_init__(self):
        _one_of("dist.strategy", self.strategy, STRATEGIES)
        _positive_int("dist.sp", self.sp)
        if self.strategy == "deepspeed_zero2" and self.sp != 1:
            raise ValueError(f"dist.strategy='deepspeed_zero2' runs with dist.sp=1 only (Ulysses is wired for ddp "
                             f"and fsdp2), got dist.sp={self.sp}")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: VelocityModelConfig = field(default_factory=VelocityModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self):
        family = self.model.family
        if (self.task.kind == "wan") != (family == "wan"):
            raise ValueError(f"task.kind={self.task.kind!r} and model.family={family!r} do not fit: task.kind='wan' "
                             "goes with model.family='wan' (and only it)")
        if self.model.low_noise_cfg_scale is not None and self.sampler.cfg_scale == 1:
            raise ValueError(f"model.low_noise_cfg_scale={self.model.low_noise_cfg_scale} has no effect with "
                             "sampler.cfg_scale=1 (no guidance on either expert, as in diffusers): set "
                             "sampler.cfg_scale != 1, or model.low_noise_cfg_scale=none")
        if family == "wan" and self.dist.strategy not in ("ddp", "fsdp2"):
            raise ValueError(f"model.family='wan' runs with dist.strategy='ddp' or 'fsdp2' (got "
                             f"{self.dist.strategy!r}): DeepSpeed ZeRO-2 is wired for HunyuanVideo-1.5 only")
        if self.grpo.train_steps is not None and self.grpo.train_steps > len(self.sampler.stochastic_steps()):
            raise ValueError(f"grpo.train_steps={self.grpo.train_steps} exceeds the "
                             f"{len(self.sampler.stochastic_steps())} steps of the SDE window")
