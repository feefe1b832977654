"""Model adapters. `hunyuan_video15`: the HunyuanVideo-1.5 transformer (diffusers class
`HunyuanVideo15Transformer3DModel`) behind `VelocityModel.velocity(latents, timestep,
conditioning, cfg_scale)`; `configs`: its architectures by name (`hunyuanvideo15`, `tiny`)."""

from .configs import ARCHITECTURES, architecture
from .hunyuan_video15 import (AUTOCAST_DTYPES, DEFAULT_LORA_TARGETS, FINETUNE_MODES, PREDICTIONS, SAMPLE_SIGMA_MIN,
                              Conditioning, TextEmbeddings,
                              VelocityModel, VelocityModelConfig, adaln_zero_init_, apply_lora, build_transformer,
                              build_velocity_model, forward_batched_text, load_transformer, order_text_tokens,
                              random_conditioning)

__all__ = [
    "ARCHITECTURES", "architecture", "AUTOCAST_DTYPES", "DEFAULT_LORA_TARGETS", "FINETUNE_MODES",
    "PREDICTIONS", "SAMPLE_SIGMA_MIN", "Conditioning", "TextEmbeddings", "VelocityModel", "VelocityModelConfig", "adaln_zero_init_", "apply_lora",
    "build_transformer", "build_velocity_model", "forward_batched_text", "order_text_tokens", "load_transformer", "random_conditioning",
]
