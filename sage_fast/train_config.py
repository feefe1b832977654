"""The trainer's configuration tree (its sections: `train_sections.py`, re-exported here), its
recipes and the check that the files a run reads exist.

    TrainConfig
      run      output folder, steps, seeds, evaluation / checkpoint / log cadence, fault limits
      model    sage_fast.models.VelocityModelConfig: checkpoint or architecture, LoRA/full, autocast
      sampler  sage_fast.grpo.rollout.SamplerConfig: steps, shift, SDE type, eta, window, CFG
      task     which task: 'world' (the synthetic world), 'hunyuanvideo15' or 'wan' (a real pipeline)
      world    the synthetic world (prompts, video size, reward weights)
      video    a local pipeline's text encoders and VAE, prompt files, reward
      grpo     batch and group sizes, trained steps, clip range, equalizer, KL (dual trust region)
      optim    AdamW and gradient clipping
      dist     data parallel strategy and sequence parallel degree

Recipes (`--recipe NAME`): `tiny_world` (the default: the shipped tiny model on the synthetic
world, CPU-sized), `hunyuanvideo15_480p` (a local diffusers HunyuanVideo-1.5 480p t2v pipeline,
the paper's settings), `wan21_t2v_1.3b_480p` and `wan22_a14b_t2v_480p` (local diffusers Wan
pipelines), the last three for GPU clusters. Any field can be overridden as `section.field=value`.
"""

from __future__ import annotations

from pathlib import Path

from sage_fast.config import recipe
from sage_fast.grpo.rollout import SamplerConfig
from sage_fast.models import VelocityModelConfig
from sage_fast.train_sections import (DistConfig, GRPOConfig, OptimConfig, RunConfig, TaskConfig, TrainConfig,
                                      VideoConfig, WorldConfig, preempt_signal_numbers)

__all__ = ["RunConfig", "TaskConfig", "WorldConfig", "VideoConfig", "GRPOConfig", "OptimConfig", "DistConfig",
           "TrainConfig", "preempt_signal_numbers", "tiny_world_checkpoint", "check_paths"]


def tiny_world_checkpoint() -> Path:
    """The shipped base model of the synthetic world (`sage_fast.world.base_model.DEFAULT_CHECKPOINT`), resolved."""
    from sage_fast.world.base_model import DEFAULT_CHECKPOINT  # noqa: PLC0415

    return DEFAULT_CHECKPOINT.resolve()


@recipe("tiny_world")
def tiny_world() -> TrainConfig:
    """The embedded default: the shipped tiny HunyuanVideo-1.5-class model on the synthetic world,
    LoRA, SAGE-GRPO with the dual moving-anchor trust region, sized for a 2-core CPU."""
    return TrainConfig(
        run=RunConfig(output_dir="runs/tiny_world", steps=30, eval_every=5, save_every=10),
        model=VelocityModelConfig(checkpoint=str(tiny_world_checkpoint()), finetune="lora", lora_rank=8,
                                  lora_alpha=8.0, autocast_dtype="none"),
        sampler=SamplerConfig(num_steps=10, shift=3.0, sde_type="sage_grpo", eta=0.5, cfg_scale=3.0),
        world=WorldConfig(num_eval_prompts=64),
        grpo=GRPOConfig(samples_per_rank=8, group_size=4, train_steps=4, micro_batch=8, clip_range=1e-3,
                        kl_mode="dual_moving", beta=0.01, update_ref_every=10),
        optim=OptimConfig(lr=3e-4),
    )


def hunyuanvideo15_root() -> str:
    """Where the 480p recipe looks for the pipeline: $SAGE_FAST_HUNYUANVIDEO15, else a local folder
    named like the diffusers conversion (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v)."""
    import os  # noqa: PLC0415

    return os.environ.get("SAGE_FAST_HUNYUANVIDEO15", "checkpoints/HunyuanVideo-1.5-Diffusers-480p_t2v")


@recipe("hunyuanvideo15_480p")
def hunyuanvideo15_480p() -> TrainConfig:
    """HunyuanVideo-1.5 480p text-to-video at the paper's scale (docs/SPEC.md section 7): 81 x 480 x 848
    (32 x 21 x 30 x 53 latents), 20 steps at shift 5, CFG 6 in rollout and training, G = 4,
    2 samples per rank, full fine-tuning with bf16 autocast and per-block activation
    checkpointing, FSDP2 and Ulysses sp = 2. Point `video.pipeline` (or $SAGE_FAST_HUNYUANVIDEO15)
    at a local diffusers pipeline, `video.prompt_file` at the prompts and `video.reward` at the
    reward (the paper: VideoAlign through python=module:function)."""
    root = hunyuanvideo15_root()
    return TrainConfig(
        run=RunConfig(output_dir="runs/hunyuanvideo15_480p", steps=200, eval_every=20, save_every=10,
                      save_videos=True),
        model=VelocityModelConfig(checkpoint=root, finetune="full", autocast_dtype="bfloat16",
                                  gradient_checkpointing=True, attention_backend="auto"),
        sampler=SamplerConfig(num_steps=20, shift=5.0, sde_type="sage_grpo", eta=0.5, cfg_scale=6.0),
        task=TaskConfig(kind="hunyuanvideo15"),
        video=VideoConfig(pipeline=root, prompt_file="prompts/train.txt", frames=81, height=480, width=848),
        grpo=GRPOConfig(samples_per_rank=2, group_size=4, micro_batch=1, clip_range=1e-4,
                        kl_mode="dual_moving", beta=0.01, update_ref_every=10),
        optim=OptimConfig(lr=1e-5),
        dist=DistConfig(strategy="fsdp2", sp=2),
    )


def wan_root(name: str, env: str) -> str:
    """Where a Wan recipe looks for its pipeline: $env, else a local folder named like the
    diffusers conversion on the hub (Wan-AI/<name>)."""
    import os  # noqa: PLC0415

    return os.environ.get(env, f"checkpoints/{name}")


@recipe("wan21_t2v_1.3b_480p")
def wan21_t2v_1_3b_480p() -> TrainConfig:
    """Wan 2.1 text-to-video 1.3B at 480p: 81 x 480 x 832 (16 x 21 x 60 x 104 latents), flow shift 3
    and CFG 5 (diffusers' Wan 2.1 480p example; Pref-GRPO's Wan 2.1 GRPO script also uses shift 3
    and CFG 5), 20 rollout steps, G = 8 (Pref-GRPO's group size), LoRA on every attention and FFN
    linear layer, bf16 autocast and activation checkpointing, DDP (1.3B fits every GPU, and CUDA
    graphs replay the rollouts; dist.strategy=fsdp2 and dist.sp also run). SAGE-GRPO with the dual
    moving-anchor KL; every SDE type and KL mode can be chosen. The final export writes the trained
    `transformer/` (sage_fast.export). The negative prompt is empty, the pipeline's default
    (Wan's release configs use a fixed one, `sample_neg_prompt`: set video.negative_prompt to it);
    the text encoder runs in bf16 and the VAE in float32 (video.vae_dtype), as diffusers' Wan
    examples load them. Point `video.pipeline` and `model.checkpoint` (or
    $SAGE_FAST_WAN21) at a local Wan2.1-T2V-1.3B-Diffusers folder."""
    root = wan_root("Wan2.1-T2V-1.3B-Diffusers", "SAGE_FAST_WAN21")
    return TrainConfig(
        run=RunConfig(output_dir="runs/wan21_t2v_1.3b_480p", steps=200, eval_every=20, save_every=10,
                      save_videos=True),
        model=VelocityModelConfig(family="wan", checkpoint=root, finetune="lora", lora_rank=32, lora_alpha=32.0,
                                  autocast_dtype="bfloat16", gradient_checkpointing=True),
        sampler=SamplerConfig(num_steps=20, shift=3.0, sde_type="sage_grpo", eta=0.5, cfg_scale=5.0),
        task=TaskConfig(kind="wan"),
        video=VideoConfig(pipeline=root, prompt_file="prompts/train.txt", frames=81, height=480, width=832,
                          vae_dtype="float32", vae_tiling=False),
        grpo=GRPOConfig(samples_per_rank=2, group_size=8, micro_batch=1, clip_range=1e-4,
                        kl_mode="dual_moving", beta=0.01, update_ref_every=10),
        optim=OptimConfig(lr=1e-5),
        dist=DistConfig(strategy="ddp", sp=1),
    )


@recipe("wan22_a14b_t2v_480p")
def wan22_a14b_t2v_480p() -> TrainConfig:
    """Wan 2.2 text-to-video A14B (two 14B experts: `transformer` above the boundary timestep, i.e.
    high noise, `transformer_2` below it) at 480p: 81 x 480 x 832, flow shift 12 and the boundary
    0.875 of the Wan 2.2 release's T2V-A14B config (the boundary is read from the folder's
    model_index.json), CFG 4 on the high-noise expert's steps and 3 on the low-noise expert's
    (that config's `sample_guide_scale`; model.low_noise_cfg_scale), 20 rollout steps, G = 8, LoRA on both experts (model.experts), bf16,
    activation checkpointing, FSDP2 (both experts sharded; every rank runs both each call). Point
    `video.pipeline` and `model.checkpoint` (or $SAGE_FAST_WAN22) at a local
    Wan2.2-T2V-A14B-Diffusers folder."""
    root = wan_root("Wan2.2-T2V-A14B-Diffusers", "SAGE_FAST_WAN22")
    cfg = wan21_t2v_1_3b_480p()
    return TrainConfig(
        run=RunConfig(output_dir="runs/wan22_a14b_t2v_480p", steps=200, eval_every=20, save_every=10,
                      save_videos=True),
        model=VelocityModelConfig(family="wan", checkpoint=root, finetune="lora", lora_rank=32, lora_alpha=32.0,
                                  autocast_dtype="bfloat16", gradient_checkpointing=True, experts="both",
                                  low_noise_cfg_scale=3.0),
        sampler=SamplerConfig(num_steps=20, shift=12.0, sde_type="sage_grpo", eta=0.5, cfg_scale=4.0),
        task=cfg.task, video=VideoConfig(pipeline=root, prompt_file="prompts/train.txt", frames=81, height=480,
                                         width=832, vae_dtype="float32", vae_tiling=False),
        grpo=cfg.grpo, optim=cfg.optim, dist=DistConfig(strategy="fsdp2", sp=1),
    )


def check_paths(cfg: TrainConfig) -> None:
    """Before any work: every file the run will read exists (ValueErrors name the field)."""
    if cfg.model.checkpoint is not None and not Path(cfg.model.checkpoint).exists():
        raise ValueError(f"model.checkpoint={cfg.model.checkpoint!r} does not exist (a local diffusers model or "
                         "pipeline folder, or a .safetensors file)")
    _check_reward_folders(cfg)
    if cfg.task.kind == "world":
        if cfg.world.prompt_file is not None and not Path(cfg.world.prompt_file).is_file():
            raise ValueError(f"world.prompt_file={cfg.world.prompt_file!r} is not a file")
        if cfg.world.prompt_file is None:  # the held-out evaluation set exists (cheap: the grammar only)
            from sage_fast.task import held_out_prompts  # noqa: PLC0415
            from sage_fast.world.prompts import sample_prompts  # noqa: PLC0415

            w = cfg.world
            train, _ = sample_prompts(w.num_train_prompts, seed=w.prompt_seed, two_object_prob=w.two_object_prob)
            held_out_prompts(w.num_eval_prompts, set(train), seed=w.prompt_seed + 1, two_object_prob=w.two_object_prob)
        return
    v = cfg.video
    if v.pipeline is None:
        raise ValueError(f"video.pipeline must name a local diffusers pipeline folder when task.kind={cfg.task.kind!r}")
    if cfg.task.kind == "wan":
        from sage_fast.models.wan import check_wan_pipeline_folder  # noqa: PLC0415

        check = check_wan_pipeline_folder
    else:
        from sage_fast.models.hunyuan_pipeline import check_pipeline_folder as check  # noqa: PLC0415
    try:
        check(v.pipeline)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e
    if cfg.model.checkpoint is None:
        raise ValueError(f"model.checkpoint must name the transformer (or the pipeline folder) when "
                         f"task.kind={cfg.task.kind!r}")
    for name in ("prompt_file", "eval_prompt_file"):
        value = getattr(v, name)
        if name == "prompt_file" and value is None:
            raise ValueError("video.prompt_file must name a .txt or .jsonl prompt file")
        if value is not None and not Path(value).is_file():
            raise ValueError(f"video.{name}={value!r} is not a file")
    if v.eval_prompt_file is None:
        from sage_fast.world.prompts import read_prompts  # noqa: PLC0415

        count = len(read_prompts(v.prompt_file, grammar=False))
        if count <= v.num_eval_prompts:
            raise ValueError(f"video.prompt_file={v.prompt_file!r} holds {count} prompts: with no "
                             f"video.eval_prompt_file its first video.num_eval_prompts={v.num_eval_prompts} are held "
                             "out for evaluation, leaving none to train on")


def _check_reward_folders(cfg: TrainConfig) -> None:
    """The reward's (real-video tasks) and the evaluation metrics' (any task) model folders and
    python modules exist, and no metric repeats a reward part of the same kind (its eval/<name>
    would clash with the reward's)."""
    from sage_fast.rewards import check_python_parts, parse_reward_spec  # noqa: PLC0415

    v = cfg.video
    specs = [("video.eval_metrics", v.eval_metrics)] + ([("video.reward", v.reward)] if cfg.task.kind != "world" else [])
    kinds = {}
    for field, spec in specs:
        if not spec.strip():
            continue
        check_python_parts(spec, field)
        kinds[field] = [kind for kind, _ in parse_reward_spec(spec, field)]
        for kind, arg in parse_reward_spec(spec, field):
            if kind in ("clip_score", "pickscore") and not Path(arg).is_dir():
                raise ValueError(f"{field}: {kind}={arg!r} is not a folder (a local CLIP model)")
    both = set(kinds.get("video.eval_metrics", ())) & set(kinds.get("video.reward", ())) - {"python"}
    if both:
        raise ValueError(f"video.eval_metrics repeats the reward's {sorted(both)}: the reward already records "
                         f"eval/{' and eval/'.join(sorted(both))}; drop it from video.eval_metrics")
