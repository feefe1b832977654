"""What the trainer needs from a task, and the synthetic world as one.

A task gives the trainer: the training and evaluation prompts, their conditioning for the
policy (with the negative prompt for CFG), the latent shape of one sample, the decoder from
latents to videos, the reward (named dimensions and a weighted total; NaN marks a failed
sample, never 0), and optionally a manifold distance (how far a video is from the data).

Leaves to others: the world itself (sage_fast.world), the policy (sage_fast.models).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

__all__ = ["RewardResult", "WorldTask"]

log = logging.getLogger("sage_fast.task")


@dataclass
class RewardResult:
    total_b: torch.Tensor  # [B] float32, NaN = failed
    scores: dict[str, torch.Tensor]  # name -> [B]
    error: str | None = None  # why the whole batch failed, if it did


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
        self.eval_prompts, _ = prompts.sample_prompts(world_cfg.num_eval_prompts, seed=world_cfg.prompt_seed + 1,
                                                      two_object_prob=world_cfg.two_object_prob)
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
            return RewardResult(total_b=out.total.float(), scores={k: v.float() for k, v in out.scores.items()})
        except Exception as err:  # noqa: BLE001 - a reward model failure must not kill the run
            log.warning("reward failed for the whole batch: %s: %s", type(err).__name__, err)
            nan = torch.full((video_bcfhw.shape[0],), float("nan"))
            return RewardResult(total_b=nan, scores={}, error=f"{type(err).__name__}: {err}")

    def manifold_distance(self, video_bcfhw: torch.Tensor) -> torch.Tensor | None:
        from sage_fast import world  # noqa: PLC0415

        fn = getattr(world, "manifold_distance", None)
        return None if fn is None else fn(video_bcfhw)
