"""Model adapters: the HunyuanVideo-1.5 transformer (diffusers class
`HunyuanVideo15Transformer3DModel`) behind `VelocityModel.velocity(latents, timestep,
conditioning, cfg_scale)`.

    hunyuan_video15   `VelocityModelConfig` and building the policy from it: random init or
                      strict local loading, attention backend, LoRA or full fine-tuning
    velocity          `VelocityModel`: 65-channel input, CFG as one batched forward, autocast,
                      raw output -> velocity ("velocity" or "sample" prediction)
    conditioning      `TextEmbeddings`, `Conditioning` (casts, row selection), random conditioning
    hunyuan_forward   the class's forward with the text tokens ordered for the whole batch
    configs           the architectures by name (`hunyuanvideo15`, `tiny`)
    hunyuan_pipeline  the pipeline's text encoders and VAE; `tiny_pipeline`: a toy pipeline folder
"""

from .conditioning import Conditioning, TextEmbeddings, random_conditioning
from .configs import ARCHITECTURES, architecture
from .hunyuan_forward import forward_batched_text, order_text_tokens
from .hunyuan_video15 import (AUTOCAST_DTYPES, DEFAULT_LORA_TARGETS, FINETUNE_MODES, VelocityModelConfig, apply_lora,
                              build_policy_model, build_transformer, build_velocity_model, load_transformer)
from .velocity import PREDICTIONS, SAMPLE_SIGMA_MIN, VelocityModel

__all__ = [
    "ARCHITECTURES", "architecture", "AUTOCAST_DTYPES", "DEFAULT_LORA_TARGETS", "FINETUNE_MODES",
    "PREDICTIONS", "SAMPLE_SIGMA_MIN", "Conditioning", "TextEmbeddings", "VelocityModel", "VelocityModelConfig",
    "apply_lora", "build_policy_model", "build_transformer", "build_velocity_model", "forward_batched_text",
    "order_text_tokens", "load_transformer", "random_conditioning",
]
