"""The synthetic video world: the embedded default of sage_fast (no GPU, no checkpoint download,
no reward model needed), and the place where "off the data manifold" is a number.

Owns: the renderer (`render`), the exact latent codec (`codec`), the prompt grammar, prompt
files and frozen text encoder (`prompts`), the VQ / MQ / TA rewards (`rewards`), the manifold
distance (`manifold`), the base model's architecture, initialisation and checkpoint files
(`base_model`), its pretraining (`pretrain`), its evaluation (`evaluate`) and model card (`model_card`).
The shipped base model lives in `assets/base_model/` (see its MODEL_CARD.md).

What the GRPO trainer uses (through `sage_fast.task.WorldTask`):

    prompts, scene = sample_prompts(n, seed)                    # or read_prompts(path)
    model, encoder, world = load_base_model()                   # or VelocityModelConfig(checkpoint=str(DEFAULT_CHECKPOINT))
    cond = encoder.conditioning(prompts)                        # Conditioning (prompt + empty negative)
    latents_bcthw: [B, 192, 2, 8, 8]; video_bcfhw = codec.decode(latents_bcthw)  # exact, [B, 3, 5, 32, 32]
    out = WorldReward("alignment")(video_bcfhw, prompts)        # out.scores[vq|mq|ta], out.total_b [B], NaN = failed
    d_b = manifold_distance(video_bcfhw)                        # [B] RMS distance to the best re-rendering
"""

from . import codec
from .base_model import DEFAULT_CHECKPOINT
from .evaluate import load_base_model, sample_videos
from .manifold import ManifoldFit, fit_scene, manifold_distance
from .prompts import (VOCABULARY, ObjectSpec, WorldTextEncoder, describe_scenes, parse_prompt, read_prompts,
                      sample_prompts, write_prompts)
from .render import FRAMES, HEIGHT, WIDTH, Scene, render, sample_scenes
from .rewards import DIMENSIONS, WEIGHTS, WorldReward, resolve_weights

__all__ = [
    "codec", "DEFAULT_CHECKPOINT", "load_base_model", "sample_videos", "ManifoldFit", "fit_scene",
    "manifold_distance", "VOCABULARY", "ObjectSpec", "WorldTextEncoder", "describe_scenes", "parse_prompt",
    "read_prompts", "sample_prompts", "write_prompts", "FRAMES", "HEIGHT", "WIDTH", "Scene", "render",
    "sample_scenes", "DIMENSIONS", "WEIGHTS", "WorldReward", "resolve_weights",
]
