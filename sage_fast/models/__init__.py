"""Model adapters: the HunyuanVideo-1.5 transformer (diffusers class
`HunyuanVideo15Transformer3DModel`) and Wan 2.1 / 2.2 text-to-video (`WanTransformer3DModel`,
one or two experts) behind `velocity(latents, timestep, conditioning, cfg_scale)`.

    policy            `VelocityModelConfig` (model family 'hunyuanvideo15' or 'wan') and building
                      the policy from it: attention backend, LoRA or full fine-tuning, activation
                      checkpointing; family 'wan' dispatched to `wan`
    hunyuan_video15   HunyuanVideo-1.5's transformer: random init by architecture, strict local loading
    velocity          `VelocityModel`: 65-channel input, CFG as one batched forward, autocast,
                      raw output -> velocity ("velocity" or "sample" prediction); the call's
                      shared input checks and guidance
    wan_pipeline      Wan's pipeline folder check, UMT5 prompt encoder, VAE decoder
    wan               `WanVelocityModel` (two experts switched at the boundary timestep, mixed
                      batches split by expert, experts kept in step across FSDP2 ranks)
    lora              `apply_lora` on the blocks of either family, and each family's targets
    conditioning      `TextEmbeddings`, `Conditioning` (casts, row selection), random conditioning
    prompt_cache      `CachedPromptEncoder`: encode a fixed prompt set once, then release
    hunyuan_forward   the class's forward with the text tokens ordered for the whole batch
    configs           the architectures by name (`hunyuanvideo15`, `tiny`)
    hunyuan_pipeline  the pipeline's text encoders and VAE; `tiny_pipeline`: a toy pipeline folder
    tiny_wan_pipeline a toy WanPipeline folder of the real classes (one or two experts)
"""

from .conditioning import Conditioning, TextEmbeddings, random_conditioning
from .configs import ARCHITECTURES, architecture
from .hunyuan_forward import forward_batched_text, order_text_tokens
from .hunyuan_video15 import build_transformer, load_transformer
from .lora import DEFAULT_LORA_TARGETS, WAN_LORA_TARGETS, apply_lora
from .policy import (AUTOCAST_DTYPES, FAMILIES, FINETUNE_MODES, VelocityModelConfig, build_policy_model,
                     build_velocity_model)
from .velocity import PREDICTIONS, SAMPLE_SIGMA_MIN, VelocityModel
from .wan import (WAN_EXPERTS, WanPromptEncoder, WanTextEmbeddings, WanVelocityModel, WanVideoDecoder,
                  build_wan_velocity_model, check_wan_pipeline_folder, load_wan_transformer, wan_boundary_timestep,
                  wan_scheduler_shift)

__all__ = [
    "ARCHITECTURES", "architecture", "AUTOCAST_DTYPES", "DEFAULT_LORA_TARGETS", "FAMILIES", "FINETUNE_MODES",
    "PREDICTIONS", "SAMPLE_SIGMA_MIN", "Conditioning", "TextEmbeddings", "VelocityModel", "VelocityModelConfig",
    "apply_lora", "build_policy_model", "build_transformer", "build_velocity_model", "forward_batched_text",
    "order_text_tokens", "load_transformer", "random_conditioning",
    "WAN_EXPERTS", "WAN_LORA_TARGETS", "WanPromptEncoder", "WanTextEmbeddings", "WanVelocityModel",
    "WanVideoDecoder", "build_wan_velocity_model", "check_wan_pipeline_folder", "load_wan_transformer",
    "wan_boundary_timestep", "wan_scheduler_shift",
]
