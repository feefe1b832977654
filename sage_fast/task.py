"""What the trainer needs from a task, and the synthetic world as one.

A task gives the trainer: the training and evaluation prompts, their conditioning for the
policy (with the negative prompt for CFG), the latent shape of one sample, the decoder from
latents to videos, the reward (named dimensions and a weighted total; NaN marks a failed
sample, never 0), and optionally a manifold distance (how far a video is from the data).

The tasks: `WorldTask` (the synthetic world, the embedded default) and the real-video
`PipelineTask`s, `HunyuanVideo15Task` and `WanTask` (a local diffusers pipeline's text encoders
and VAE, prompts from files, a reward from sage_fast.rewards). `build_task` picks one by
`task.kind`.

Leaves to others: the world itself (sage_fast.world), the policy (sage_fast.models), the pipeline
parts (sage_fast.models.hunyuan_pipeline, sage_fast.models.wan), real reward models (sage_fast.rewards).
"""

from __future__ import annotations

import json
import logging

import torch

from sage_fast.rewards import RewardResult

__all__ = ["RewardResult", "failed_reward", "held_out_prompts", "WorldTask", "PipelineTask", "HunyuanVideo15Task", "WanTask",
           "build_task"]

log = logging.getLogger("sage_fast.task")


def failed_reward(batch: int, err: Exception) -> RewardResult:
    """The whole batch's reward failed: NaN rows (excluded from the advantages) and the error."""
    log.warning("reward failed for the whole batch: %s: %s", type(err).__name__, err)
    return RewardResult(total_b=torch.full((batch,), float("nan")), scores={}, error=f"{type(err).__name__}: {err}")


def held_out_prompts(n: int, exclude: set[str], *, seed: int, two_object_prob: float) -> list[str]:
    """n distinct prompts of the world's grammar, none of them in `exclude` (the training prompts),
    deterministic for `seed`, with round(n * two_object_prob) two-object prompts: the training set
    covers most one-object prompts (144 in the grammar), so drawing from the mixture and dropping
    training prompts would skew the held-out set towards two objects."""
    from sage_fast.world import prompts  # noqa: PLC0415

    n_two = round(n * two_object_prob)
    parts = []
    for count, prob, sub in ((n - n_two, 0.0, 1), (n_two, 1.0, 2)):
        got, draw = [], 4 * count
        while count and draw <= max(64 * count, 4096):  # the grammar is finite: a bounded search
            candidates, _ = prompts.sample_prompts(draw, seed=derive_prompt_seed(seed, sub), two_object_prob=prob)
            got = list(dict.fromkeys(p for p in candidates if p not in exclude))[:count]
            if len(got) == count:
                break
            draw *= 4
        if len(got) < count:
            raise ValueError(f"world.num_eval_prompts={n}: the grammar gives only {len(got)} "
                             f"{'one' if sub == 1 else 'two'}-object prompts outside the {len(exclude)} training "
                             "prompts; ask for fewer evaluation or training prompts")
        parts += got
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # mix the two kinds
    return [parts[int(i)] for i in order]


def derive_prompt_seed(seed: int, sub: int) -> int:
    return (int(seed) * 1000003 + sub) % (2**31)


class WorldTask:
    """The synthetic video world (sage_fast.world) behind the task interface."""

    def __init__(self, world_cfg, transformer_config, device="cpu", checkpoint: str | None = None) -> None:
        from sage_fast.world import codec, prompts, rewards  # noqa: PLC0415
        from sage_fast.world.evaluate import codec_layout  # noqa: PLC0415

        self.cfg, self.device = world_cfg, device
        trained = self._world_json(checkpoint)  # {} without a checkpoint or its world.json
        self._check_world_json(world_cfg, trained, checkpoint)
        self._codec = codec
        if world_cfg.prompt_file is not None:
            self.train_prompts = [row["prompt"] for row in prompts.read_prompts(world_cfg.prompt_file)]
        else:
            self.train_prompts, _ = prompts.sample_prompts(world_cfg.num_train_prompts, seed=world_cfg.prompt_seed,
                                                           two_object_prob=world_cfg.two_object_prob)
        self.eval_prompts = held_out_prompts(world_cfg.num_eval_prompts, set(self.train_prompts),
                                             seed=world_cfg.prompt_seed + 1, two_object_prob=world_cfg.two_object_prob)
        if not self.train_prompts:
            raise ValueError("world: no training prompts")
        self.encoder = prompts.WorldTextEncoder.for_model(transformer_config, seed=world_cfg.text_seed, device=device)
        weights = world_cfg.reward_weights
        if weights.strip().startswith("{"):
            weights = json.loads(weights)
        self.reward_fn = rewards.WorldReward(weights)
        # the codec layout: the checkpoint's (world.json), else the codec's defaults
        self.patch, self.temporal = codec_layout(trained) if trained else (codec.PATCH, codec.TEMPORAL)
        self.latent_shape = codec.latent_shape(world_cfg.frames, world_cfg.height, world_cfg.width,
                                               self.patch, self.temporal)
        channels = transformer_config.out_channels
        if self.latent_shape[0] != channels:
            raise ValueError(f"world latents (codec patch {self.patch}, temporal {self.temporal}) have "
                             f"{self.latent_shape[0]} channels but the model has out_channels={channels}: use the "
                             f"world's base model, or a model with out_channels={self.latent_shape[0]}")

    @staticmethod
    def _world_json(checkpoint: str | None) -> dict:
        """The world.json beside a world base model checkpoint, or {} (no checkpoint, or none there)."""
        from pathlib import Path  # noqa: PLC0415

        if checkpoint is None:
            return {}
        path = Path(checkpoint)
        meta = (path if path.is_dir() else path.parent) / "world.json"
        return json.loads(meta.read_text()) if meta.exists() else {}

    @staticmethod
    def _check_world_json(world_cfg, trained: dict, checkpoint: str | None) -> None:
        """A world base model was trained for one video size and text encoder: insist on them."""
        for field, key in (("frames", "frames"), ("height", "height"), ("width", "width"),
                           ("text_seed", "text_encoder_seed")):
            if key in trained and getattr(world_cfg, field) != trained[key]:
                raise ValueError(f"world.{field}={getattr(world_cfg, field)} but the base model {checkpoint} was "
                                 f"trained with {trained[key]} (world.json): use {trained[key]}")

    def conditioning(self, prompt_list: list[str]):
        return self.encoder.conditioning(list(prompt_list), negative=True)

    def decode(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return self._codec.decode(latents_bcthw.float(), self.patch, self.temporal)

    def reward(self, video_bcfhw: torch.Tensor, prompt_list: list[str]) -> RewardResult:
        """Never raises for a bad sample: a failure becomes NaN rows and is reported."""
        try:
            out = self.reward_fn(video_bcfhw, list(prompt_list))
            return RewardResult(total_b=out.total_b.float(), scores={k: v.float() for k, v in out.scores.items()})
        except Exception as err:  # noqa: BLE001 - a reward model failure must not kill the run
            return failed_reward(video_bcfhw.shape[0], err)

    def manifold_distance(self, video_bcfhw: torch.Tensor) -> torch.Tensor | None:
        from sage_fast import world  # noqa: PLC0415

        fn = getattr(world, "manifold_distance", None)
        return None if fn is None else fn(video_bcfhw)


class PipelineTask:
    """A real text-to-video task: a local diffusers pipeline's text encoder(s) (every prompt encoded
    once at start, then the encoders are freed) and VAE, prompt files, and a reward built from
    `video.reward` (sage_fast.rewards). No manifold distance: the data manifold of real video is
    not known. A model family gives its encoder and decoder classes (`_classes`) and the check that
    its transformer fits the text encoder (`_check_text`)."""

    kind = ""

    def __init__(self, video_cfg, transformer_config, device="cpu") -> None:
        from sage_fast.rewards import build_reward  # noqa: PLC0415

        self.cfg, self.device = video_cfg, torch.device(device)
        if video_cfg.pipeline is None or video_cfg.prompt_file is None:
            raise ValueError(f"video.pipeline and video.prompt_file are required for task.kind={self.kind!r}")
        self.train_prompts, self.eval_prompts = self._prompts(video_cfg)
        dtype, (decoder_class, encoder_class) = getattr(torch, video_cfg.dtype), self._classes()
        vae_dtype = getattr(torch, video_cfg.vae_dtype or video_cfg.dtype)
        self.decoder = decoder_class(video_cfg.pipeline, device=self.device, dtype=vae_dtype,
                                     tiling=video_cfg.vae_tiling)
        self.latent_shape = self.decoder.latent_shape(video_cfg.frames, video_cfg.height, video_cfg.width)
        if self.latent_shape[0] != transformer_config.out_channels:
            raise ValueError(f"the VAE of video.pipeline has {self.latent_shape[0]} latent channels but the model has "
                             f"out_channels={transformer_config.out_channels}")
        self.encoder = encoder_class(video_cfg.pipeline, device=self.device, dtype=dtype)
        self._check_text(self.encoder, transformer_config)
        self.negative_prompt = video_cfg.negative_prompt
        self.encoder.encode_all(self.train_prompts + self.eval_prompts + [self.negative_prompt],
                                batch_size=video_cfg.text_batch)
        self.encoder.release()
        self.reward_fn = build_reward(video_cfg.reward, video_cfg.reward_weights, device=self.device)

    @staticmethod
    def _prompts(video_cfg) -> tuple[list[str], list[str]]:
        from sage_fast.world.prompts import read_prompts  # noqa: PLC0415

        train = [r["prompt"] for r in read_prompts(video_cfg.prompt_file, grammar=False)]
        if not train:
            raise ValueError(f"video.prompt_file={video_cfg.prompt_file!r} holds no prompts")
        if video_cfg.eval_prompt_file is not None:
            evals = [r["prompt"] for r in read_prompts(video_cfg.eval_prompt_file, grammar=False)]
            if not evals:
                raise ValueError(f"video.eval_prompt_file={video_cfg.eval_prompt_file!r} holds no prompts")
        else:  # held out: the first prompts evaluate and are not trained on
            if len(train) <= video_cfg.num_eval_prompts:
                raise ValueError(f"video.prompt_file={video_cfg.prompt_file!r} holds {len(train)} prompts: "
                                 f"with no video.eval_prompt_file its first video.num_eval_prompts="
                                 f"{video_cfg.num_eval_prompts} are held out for evaluation, leaving none to train on")
            evals, train = train[:video_cfg.num_eval_prompts], train[video_cfg.num_eval_prompts:]
        overlap = set(evals) & set(train)
        if overlap:
            log.warning("%d evaluation prompts are also training prompts (e.g. %r): the evaluation is not held out",
                        len(overlap), sorted(overlap)[0])
        return train, evals

    def _classes(self) -> tuple[type, type]:
        """(decoder class, prompt encoder class) of the family: built from (pipeline folder, device, dtype)."""
        raise NotImplementedError

    def _check_text(self, encoder, transformer_config) -> None:
        """The text encoder's width fits the transformer (a ValueError names both)."""
        raise NotImplementedError

    def conditioning(self, prompt_list: list[str]):
        from sage_fast.models import Conditioning  # noqa: PLC0415

        prompts = list(prompt_list)
        return Conditioning(prompt=self.encoder.encode(prompts).to(device=self.device),
                            negative=self.encoder.encode([self.negative_prompt] * len(prompts)).to(device=self.device))

    def decode(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(latents_bcthw)

    def reward(self, video_bcfhw: torch.Tensor, prompt_list: list[str]) -> RewardResult:
        """Never raises for a bad sample: a failure becomes NaN rows and is reported."""
        from sage_fast.rewards import RewardConfigError  # noqa: PLC0415

        try:
            return self.reward_fn(video_bcfhw, list(prompt_list))
        except RewardConfigError:
            raise  # a configuration mistake: stop now rather than score every batch NaN
        except Exception as err:  # noqa: BLE001 - a reward model failure must not kill the run
            return failed_reward(video_bcfhw.shape[0], err)

    def manifold_distance(self, video_bcfhw: torch.Tensor) -> None:
        return None


class HunyuanVideo15Task(PipelineTask):
    """HunyuanVideo-1.5: two text encoders (Qwen2.5-VL, ByT5) and its VAE."""

    kind = "hunyuanvideo15"

    def _classes(self):
        from sage_fast.models.hunyuan_pipeline import PromptEncoder, VideoDecoder  # noqa: PLC0415

        return VideoDecoder, PromptEncoder

    def _check_text(self, encoder, transformer_config) -> None:
        for name, dim in (("text_embed_dim", encoder.text_encoder.config.hidden_size),
                          ("text_embed_2_dim", encoder.text_encoder_2.config.d_model)):
            if transformer_config[name] != dim:
                raise ValueError(f"the text encoders of video.pipeline give width {dim} but the model has "
                                 f"{name}={transformer_config[name]}")


class WanTask(PipelineTask):
    """Wan 2.1 / 2.2 text-to-video: the UMT5 text encoder and the Wan VAE."""

    kind = "wan"

    def _classes(self):
        from sage_fast.models.wan import WanPromptEncoder, WanVideoDecoder  # noqa: PLC0415

        return WanVideoDecoder, WanPromptEncoder

    def _check_text(self, encoder, transformer_config) -> None:
        width = encoder.text_encoder.config.d_model
        if transformer_config["text_dim"] != width:
            raise ValueError(f"the text encoder of video.pipeline gives width {width} but the model has "
                             f"text_dim={transformer_config['text_dim']}")


def build_task(cfg, transformer_config, device="cpu"):
    """The task of `cfg.task.kind` (a TrainConfig)."""
    if cfg.task.kind == "world":
        return WorldTask(cfg.world, transformer_config, device=device, checkpoint=cfg.model.checkpoint)
    tasks = {"hunyuanvideo15": HunyuanVideo15Task, "wan": WanTask}
    if cfg.task.kind not in tasks:
        raise ValueError(f"task.kind must be one of {('world', *tasks)}, got {cfg.task.kind!r}")
    return tasks[cfg.task.kind](cfg.video, transformer_config, device=device)
