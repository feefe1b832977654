"""The policy as the trainer builds it, for either family: `VelocityModelConfig` (model family,
checkpoint or architecture, fine-tuning mode, LoRA, attention backend, autocast, prediction
mode, Wan's experts and low-noise guidance) and building from it: HunyuanVideo-1.5's transformer
(`hunyuan_video15`) with its attention backend, LoRA (`lora.apply_lora`) or full fine-tuning,
activation checkpointing, and the `VelocityModel` around it (`build_velocity_model`); family
'wan' by `wan.build_wan_velocity_model`; `build_policy_model` for the policy a run's seed starts
from.

Leaves to others: the velocity call itself (`velocity`, `wan`), the conditioning (`conditioning`),
the transformer classes' loading (`hunyuan_video15`, `wan`), distribution (`sage_fast.parallel`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sage_fast.attention import install_attention
from sage_fast.grpo.data import derive_seed

from .configs import architecture
from .hunyuan_video15 import build_transformer, load_transformer
from .lora import DEFAULT_LORA_TARGETS, WAN_LORA_TARGETS, apply_lora
from .velocity import PREDICTION_KEY, PREDICTIONS, VelocityModel
from .wan import WAN_EXPERTS, WanVelocityModel, build_wan_velocity_model

__all__ = ["AUTOCAST_DTYPES", "FAMILIES", "FINETUNE_MODES", "VelocityModelConfig", "build_policy_model",
           "build_velocity_model"]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}
FINETUNE_MODES = ("lora", "full")
#: model families (`VelocityModelConfig.family`): the diffusers transformer class behind the policy
FAMILIES = ("hunyuanvideo15", "wan")


@dataclass
class VelocityModelConfig:
    family: str = "hunyuanvideo15"
    """The model family: 'hunyuanvideo15' (HunyuanVideo15Transformer3DModel, `VelocityModel`) or
    'wan' (Wan 2.1 / 2.2 text-to-video, WanTransformer3DModel, `wan.WanVelocityModel`)."""
    architecture: str = "tiny"
    """Architecture name in `configs.ARCHITECTURES` (random init) when no checkpoint is given
    (family 'hunyuanvideo15' only: a Wan policy always comes from a checkpoint)."""
    checkpoint: str | None = None
    """hunyuanvideo15: a local diffusers folder (config.json + diffusion_pytorch_model*.safetensors,
    or a pipeline folder with `transformer/`) or one .safetensors file; None = random init of
    `architecture`. wan: the local WanPipeline folder (required; its `transformer/`, and
    `transformer_2/` with model_index.json's boundary_ratio for Wan 2.2 A14B). Never a hub id:
    nothing is downloaded."""
    experts: str = "both"
    """family 'wan': which expert of a two-expert (Wan 2.2 A14B) folder trains: 'both', 'high'
    (`transformer`, the steps t >= boundary) or 'low' (`transformer_2`); each trained expert gets
    its own LoRA (or all its weights with finetune='full'), the others stay frozen and take no
    LoRA. A one-expert folder allows 'both' and 'high' (its one transformer). Must stay 'both'
    for 'hunyuanvideo15'."""
    low_noise_cfg_scale: float | None = None
    """family 'wan', two-expert folder: the guidance scale of the steps `transformer_2` serves
    (diffusers' `guidance_scale_2`; the Wan 2.2 release samples T2V-A14B with 4.0 high, 3.0
    low), used whenever sampler.cfg_scale guides (!= 1); None: sampler.cfg_scale on both."""
    checkpoint_config: str | None = None
    """config.json for a bare .safetensors checkpoint (default: the config.json next to it)."""
    autocast_dtype: str = "bfloat16"
    """Forward compute dtype under autocast: 'bfloat16', 'float16' or 'none' (float32)."""
    gradient_checkpointing: bool = False
    """Recompute each double-stream block in backward (activation checkpointing per block)."""
    finetune: str = "lora"
    """'lora' (base frozen, peft LoRA trainable) or 'full' (every parameter trainable)."""
    lora_rank: int = 32
    """LoRA rank r."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: delta = (alpha / r) * B A."""
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Module names relative to a block that get LoRA: for 'hunyuanvideo15' a double-stream block
    (`transformer_blocks.<i>.`, e.g. 'attn.to_q' or 'ff.net.0.proj'), for 'wan' a Wan block
    (`blocks.<i>.`, e.g. 'attn1.to_q' or 'ffn.net.2'). Each family's default: __post_init__
    replaces a value equal to the other family's default by this family's (DEFAULT_LORA_TARGETS
    <-> WAN_LORA_TARGETS; no name of either exists in the other's blocks, so nothing a user could
    mean is lost), so the default given with family 'wan', or a recipe's targets after a
    `model.family=` override, name modules that exist."""
    attention_backend: str = "auto"
    """'auto', 'fa3', 'fa2', 'xformers', 'sdpa' or 'sdpa_math' (see sage_fast.attention).
    family 'wan': 'auto' or 'sdpa' only, both meaning diffusers' own Wan attention processor
    (SDPA); sage_fast's backends are installed on HunyuanVideo-1.5's joint attention only."""
    architecture_overrides: dict = field(default_factory=dict)
    """Config fields overriding the named architecture (random init only)."""
    prediction: str | None = None
    """What the raw output is, 'velocity' or 'sample' (x0; see the module doc). None: 'velocity'
    for a random init, the checkpoint's own for a loaded one (a value given with a checkpoint
    must match the checkpoint's)."""

    def __post_init__(self):
        from sage_fast.attention.backends import CHOICES  # noqa: PLC0415

        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        if self.experts not in WAN_EXPERTS:
            raise ValueError(f"model.experts must be one of {WAN_EXPERTS}, got {self.experts!r}")
        if self.family == "wan":
            self._check_wan()
        else:
            if self.experts != "both":
                raise ValueError(f"model.experts={self.experts!r} applies to family 'wan' (two-expert Wan 2.2); "
                                 "family 'hunyuanvideo15' has one transformer: leave it 'both'")
            if self.low_noise_cfg_scale is not None:
                raise ValueError(f"model.low_noise_cfg_scale={self.low_noise_cfg_scale!r} applies to family 'wan' "
                                 "(two-expert Wan 2.2); family 'hunyuanvideo15' has one transformer: leave it None")
            if tuple(self.lora_target_modules) == WAN_LORA_TARGETS:
                self.lora_target_modules = DEFAULT_LORA_TARGETS  # the family's default (see the field's doc)
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be one of {tuple(AUTOCAST_DTYPES)}, got {self.autocast_dtype!r}")
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be an int >= 1, got {self.lora_rank!r}")
        if not float(self.lora_alpha) > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if self.attention_backend not in CHOICES:
            raise ValueError(f"attention_backend must be one of {CHOICES}, got {self.attention_backend!r}")
        if self.prediction is not None and self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS} or None, got {self.prediction!r}")
        if self.checkpoint is None:
            architecture(self.architecture, **self.architecture_overrides)  # validates both
        elif self.architecture_overrides:
            raise ValueError("architecture_overrides apply to a random init only; the checkpoint's "
                             "config.json defines the architecture")

    def _check_wan(self) -> None:
        if self.checkpoint is None:
            raise ValueError("model.checkpoint is required for model.family='wan': the local WanPipeline folder "
                             "(there is no random-init Wan architecture by name)")
        if self.checkpoint_config is not None:
            raise ValueError("model.checkpoint_config applies to family 'hunyuanvideo15'; a Wan checkpoint is "
                             "a pipeline folder whose transformer/config.json defines the architecture")
        if self.prediction not in (None, "velocity"):
            raise ValueError(f"model.prediction must be None or 'velocity' for model.family='wan' (Wan predicts "
                             f"the velocity), got {self.prediction!r}")
        scale = self.low_noise_cfg_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
            raise ValueError(f"model.low_noise_cfg_scale must be None or a finite number, got {scale!r}")
        if tuple(self.lora_target_modules) == DEFAULT_LORA_TARGETS:
            self.lora_target_modules = WAN_LORA_TARGETS  # the family's default (see the field's doc)


def build_velocity_model(config: VelocityModelConfig | None = None, device="cpu",
                         seed: int | None = 0) -> VelocityModel | WanVelocityModel:
    """Transformer (loaded or random), attention backend (chosen and logged once), LoRA or full
    fine-tuning, activation checkpointing, autocast: the policy the trainer drives. Family
    'wan': `wan.build_wan_velocity_model` on the checkpoint folder (`seed` unused: no random init)."""
    config = config or VelocityModelConfig()
    if config.family == "wan":
        return build_wan_velocity_model(config.checkpoint, finetune=config.finetune, experts=config.experts,
                                        lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                                        lora_targets=config.lora_target_modules,
                                        gradient_checkpointing=config.gradient_checkpointing,
                                        autocast_dtype=AUTOCAST_DTYPES[config.autocast_dtype], device=device,
                                        attention_backend=config.attention_backend,
                                        low_noise_cfg_scale=config.low_noise_cfg_scale)
    if config.checkpoint is not None:
        transformer = load_transformer(config.checkpoint, config.checkpoint_config, device=device)
    else:
        transformer = build_transformer(config.architecture, seed=seed, device=device,
                                        **config.architecture_overrides)
        transformer.register_to_config(**{PREDICTION_KEY: config.prediction or "velocity"})
    stored = transformer.config.get(PREDICTION_KEY, "velocity")
    if config.prediction is not None and config.prediction != stored:
        raise ValueError(f"prediction={config.prediction!r} does not match the checkpoint's {stored!r} "
                         f"({PREDICTION_KEY} in its config.json)")
    install_attention(transformer, config.attention_backend)
    if config.finetune == "lora":
        apply_lora(transformer, config.lora_rank, config.lora_alpha, config.lora_target_modules)
    else:
        transformer.requires_grad_(True)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return VelocityModel(transformer, AUTOCAST_DTYPES[config.autocast_dtype])


def build_policy_model(model_cfg: VelocityModelConfig, run_seed: int,
                       device="cpu") -> VelocityModel | WanVelocityModel:
    """The policy a run with `run.seed` starts from. LoRA's initialisation draws from the global
    RNG: seed it, so every run (and rank, and an export rebuilding the run) with the same
    run.seed starts from the same policy."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(run_seed, "init") % (2**31))
        return build_velocity_model(model_cfg, device=device, seed=run_seed)
