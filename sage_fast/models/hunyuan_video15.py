"""The velocity model the trainer calls: HunyuanVideo-1.5 (diffusers) behind one function.

Owns: `VelocityModel.velocity(latents, timestep, conditioning, cfg_scale)`, building the
transformer (random init by architecture name, or loaded from a local checkpoint), its
attention backend, LoRA or full fine-tuning, activation checkpointing and autocast.

    v = velocity(latents_bcthw [B, 32, T, H, W], timestep_b [B] (= 1000 * sigma, mixed freely),
                 conditioning, cfg_scale)                        -> [B, 32, T, H, W] float32

- Input: the transformer takes 65 channels, [latents (32) | condition latents (32) | mask (1)];
  text-to-video leaves condition and mask at zero (the diffusers pipeline's t2v input).
- Classifier-free guidance (cfg_scale != 1): one forward of batch 2B, rows [0, B) with the
  negative text, rows [B, 2B) with the prompt; row i and row B + i share latents, timestep,
  image embeds and condition, so any B and any mix of timesteps pair correctly (SPEC defect 3:
  the authors' code mis-pairs halves for B > 1 and loops over mixed timesteps).
  `v = v_uncond + cfg_scale * (v_cond - v_uncond)`, cfg_scale a float or a [B] tensor.
  With cfg_scale == 1 only the prompt rows run and the negative text may be None.
- Precision: parameters stay float32 (master weights); the forward runs under
  `torch.autocast(dtype=autocast_dtype)` (bf16 by default, `None` for fp32); the velocity is
  returned in float32 (float64 when the latents and the transformer are float64: test oracles).
- Text: two streams as the class expects (Qwen2.5-VL embeds [B, L1, 3584] with mask, ByT5
  embeds [B, L2, 1472] with mask); prompt and negative may have different lengths (they are
  zero-padded with mask 0, which changes no output). Image embeds [B, N, 1152] (SigLIP) for
  image-to-video; None = text-to-video, for which the class zeroes and masks them, so one
  token is passed instead of the pipeline's 729 (same output, less padding).
- Prediction: the transformer's raw output is the velocity (`prediction == "velocity"`, every
  HunyuanVideo-1.5 checkpoint) or the clean latents x0 (`"sample"`, x-prediction; Li & He 2025,
  "Back to Basics: Let Denoising Generative Models Denoise"), which the world's base model uses.
  A "sample" model's velocity is `v = (x - x0_hat) / max(sigma, SAMPLE_SIGMA_MIN)` with
  sigma = timestep / 1000, so everything downstream sees a velocity either way. The mode is read
  from the checkpoint's config.json key `_sage_fast_prediction` (absent = "velocity").
- Determinism: the same inputs give the same velocity bit for bit on CPU.

Leaves to others: the text encoders and VAE (cached embeddings come in), the sampler and the
GRPO loss, distribution (`sage_fast.parallel` hooks the transformer; this module never sees a
process group).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sage_fast.attention import install_attention

from .configs import architecture

__all__ = [
    "AUTOCAST_DTYPES",
    "FINETUNE_MODES",
    "PREDICTIONS",
    "SAMPLE_SIGMA_MIN",
    "DEFAULT_LORA_TARGETS",
    "Conditioning",
    "TextEmbeddings",
    "VelocityModel",
    "VelocityModelConfig",
    "adaln_zero_init_",
    "apply_lora",
    "build_transformer",
    "forward_batched_text",
    "order_text_tokens",
    "build_velocity_model",
    "load_transformer",
    "random_conditioning",
]

log = logging.getLogger("sage_fast.models")

CLASS_NAME = "HunyuanVideo15Transformer3DModel"
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}
FINETUNE_MODES = ("lora", "full")
#: what the transformer's raw output is: the velocity x1 - x0, or the clean sample x0
PREDICTIONS = ("velocity", "sample")
#: sigma floor of the sample -> velocity conversion (JiT's clip of the 1 / sigma weight): below
#: it a "sample" model's velocity is (x - x0_hat) / SAMPLE_SIGMA_MIN
SAMPLE_SIGMA_MIN = 0.05
#: config.json key holding the prediction mode (leading "_": not a constructor argument)
PREDICTION_KEY = "_sage_fast_prediction"
#: module names inside each double-stream block that get LoRA: the joint attention's projections
#: (video and text streams). The token refiner's attention is not targeted.
DEFAULT_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                        "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


def _transformer_class():
    from diffusers import HunyuanVideo15Transformer3DModel  # noqa: PLC0415 (heavy import, on use)

    return HunyuanVideo15Transformer3DModel


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class VelocityModelConfig:
    architecture: str = "tiny"
    """Architecture name in `configs.ARCHITECTURES` (random init) when no checkpoint is given."""
    checkpoint: str | None = None
    """Local diffusers folder (config.json + diffusion_pytorch_model*.safetensors, or a pipeline
    folder with `transformer/`) or one .safetensors file. Never a hub id: nothing is downloaded."""
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
    """Module names relative to a double-stream block (`transformer_blocks.<i>.`) that get LoRA,
    e.g. 'attn.to_q' or 'ff.net.0.proj'."""
    attention_backend: str = "auto"
    """'auto', 'fa3', 'fa2', 'xformers', 'sdpa' or 'sdpa_math' (see sage_fast.attention)."""
    architecture_overrides: dict = field(default_factory=dict)
    """Config fields overriding the named architecture (random init only)."""
    prediction: str | None = None
    """What the raw output is, 'velocity' or 'sample' (x0; see the module doc). None: 'velocity'
    for a random init, the checkpoint's own for a loaded one (a value given with a checkpoint
    must match the checkpoint's)."""

    def __post_init__(self):
        from sage_fast.attention.backends import CHOICES  # noqa: PLC0415

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


# ---------------------------------------------------------------------------------------------
# Conditioning


@dataclass
class TextEmbeddings:
    """Cached text-encoder outputs for B prompts (masks: 1/True = real token)."""

    embeds_bld: torch.Tensor  # [B, L1, text_embed_dim]    (Qwen2.5-VL, 3584)
    mask_bl: torch.Tensor  # [B, L1]
    embeds_2_bld: torch.Tensor  # [B, L2, text_embed_2_dim]  (ByT5 glyph encoder, 1472)
    mask_2_bl: torch.Tensor  # [B, L2]

    def to(self, dtype: torch.dtype | None = None, device=None) -> "TextEmbeddings":
        """A copy with the embeddings cast to `dtype` (masks keep theirs) and moved to `device`."""
        return TextEmbeddings(*(_cast(t, dtype, device) for t in (self.embeds_bld, self.mask_bl,
                                                                    self.embeds_2_bld, self.mask_2_bl)))

    def check(self, name: str, batch: int, config) -> None:
        for field_name, t, rank in (("embeds_bld", self.embeds_bld, 3), ("mask_bl", self.mask_bl, 2),
                                    ("embeds_2_bld", self.embeds_2_bld, 3), ("mask_2_bl", self.mask_2_bl, 2)):
            if t.dim() != rank or t.shape[0] != batch:
                raise ValueError(f"conditioning.{name}.{field_name} must have {rank} dims and batch {batch}, "
                                 f"got shape {tuple(t.shape)}")
        for emb, mask, dim_name in ((self.embeds_bld, self.mask_bl, "text_embed_dim"),
                                    (self.embeds_2_bld, self.mask_2_bl, "text_embed_2_dim")):
            if emb.shape[2] != config[dim_name]:
                raise ValueError(f"conditioning.{name}: embedding width {emb.shape[2]} != model {dim_name}="
                                 f"{config[dim_name]}")
            if mask.shape[1] != emb.shape[1]:
                raise ValueError(f"conditioning.{name}: mask length {mask.shape[1]} != embedding length "
                                 f"{emb.shape[1]}")


@dataclass
class Conditioning:
    """Everything but the noisy latents and the timestep, for a batch of B samples.

    prompt: the text; negative: the CFG negative text (needed when cfg_scale != 1).
    image_embeds_bnd: [B, N, image_embed_dim] image-to-video embeds; None = text-to-video.
    cond_latents_bcthw, cond_mask_b1thw: the 32-channel condition and 1-channel mask of the
    65-channel input; None = zeros (text-to-video).
    """

    prompt: TextEmbeddings
    negative: TextEmbeddings | None = None
    image_embeds_bnd: torch.Tensor | None = None
    cond_latents_bcthw: torch.Tensor | None = None
    cond_mask_b1thw: torch.Tensor | None = None

    def to(self, dtype: torch.dtype | None = None, device=None) -> "Conditioning":
        """A copy with floating tensors cast to `dtype` (masks keep theirs) and moved to `device`."""
        return Conditioning(
            prompt=self.prompt.to(dtype, device),
            negative=None if self.negative is None else self.negative.to(dtype, device),
            image_embeds_bnd=_cast(self.image_embeds_bnd, dtype, device),
            cond_latents_bcthw=_cast(self.cond_latents_bcthw, dtype, device),
            cond_mask_b1thw=_cast(self.cond_mask_b1thw, dtype, device),
        )


def _cast(t, dtype, device):
    if t is None:
        return None
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 (tokens) of [B, L] or [B, L, D] to `length`."""
    pad = length - t.shape[1]
    if pad == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, 0, pad) if t.dim() == 3 else (0, pad))


def _stack_text(parts: list[TextEmbeddings]) -> tuple[torch.Tensor, ...]:
    """Concatenate along the batch, zero-padding every stream to the longest (mask 0)."""
    out = []
    for attr in ("embeds_bld", "mask_bl", "embeds_2_bld", "mask_2_bl"):
        tensors = [getattr(p, attr) for p in parts]
        length = max(t.shape[1] for t in tensors)
        out.append(torch.cat([_pad_tokens(t, length) for t in tensors], dim=0))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# The model


def order_text_tokens(streams: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The class's text layout, for the whole batch at once: per sample, the real tokens of every
    stream in stream order, then the padding tokens in stream order, padding zeroed where the
    stream says so. streams: (tokens [B, L_i, D], mask [B, L_i] bool, zero_padding). Returns
    (tokens [B, sum L_i, D], mask [B, sum L_i] bool). A stable sort on "is padding" gives exactly
    the order of diffusers' per-sample loop, which costs a host sync per sample and mask on a
    GPU (12 per sample: ~6,000 a forward at batch 512)."""
    for i, (t, m, _) in enumerate(streams):
        if m.dtype != torch.bool or m.shape != t.shape[:2]:
            raise ValueError(f"order_text_tokens: stream {i} mask must be bool of shape {tuple(t.shape[:2])}, "
                             f"got {m.dtype} {tuple(m.shape)}")
    tokens = torch.cat([t for t, _, _ in streams], dim=1)
    mask = torch.cat([m for _, m, _ in streams], dim=1)
    keep = torch.cat([m | (not zero) for _, m, zero in streams], dim=1)
    tokens = torch.where(keep[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
    order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)
    tokens = tokens.gather(1, order[..., None].expand_as(tokens))
    return tokens, mask.gather(1, order)


def forward_batched_text(transformer: nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
                         encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                         encoder_hidden_states_2: torch.Tensor, encoder_attention_mask_2: torch.Tensor,
                         image_embeds: torch.Tensor, text_to_video: bool | None = None) -> torch.Tensor:
    """`HunyuanVideo15Transformer3DModel.forward` (diffusers 0.42; return_dict=False, no
    timestep_r, no LoRA scale) on the same submodules, with the text tokens ordered by
    `order_text_tokens` instead of a per-sample loop: the same output bit for bit on the CPU
    (`tests/test_models.py`) and no host sync per sample on a GPU. `text_to_video` None decides
    as the class does (all image embeds zero); the adapter passes it when it knows.

    Only for a plain module: it calls the submodules directly, so hooks on the root module's
    forward (FSDP2's unsharding, sequence-parallel wrappers) do not run; `VelocityModel` uses it
    when `batched_text` is set (pretraining, evaluation), never in the distributed trainer."""
    tr, cfg = transformer, transformer.config
    B, _, T, H, W = hidden_states.shape
    pt, p = cfg.patch_size_t, cfg.patch_size
    rotary = tr.rope(hidden_states)
    temb = tr.time_embed(timestep, timestep_r=None)
    x = tr.x_embedder(hidden_states)
    mllm = tr.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    mllm = mllm + tr.cond_type_embed(torch.zeros_like(mllm[:, :, 0], dtype=torch.long))
    byt5 = tr.context_embedder_2(encoder_hidden_states_2)
    byt5 = byt5 + tr.cond_type_embed(torch.ones_like(byt5[:, :, 0], dtype=torch.long))
    image = tr.image_embedder(image_embeds)
    if text_to_video is None:
        text_to_video = bool(torch.all(image_embeds == 0))
    if text_to_video:
        image = image * 0.0
    image_mask = torch.full(image.shape[:2], bool(not text_to_video), device=image.device)
    image = image + tr.cond_type_embed(2 * torch.ones_like(image[:, :, 0], dtype=torch.long))
    text, text_mask = order_text_tokens([(image, image_mask, False),
                                         (byt5, encoder_attention_mask_2.bool(), True),
                                         (mllm, encoder_attention_mask.bool(), True)])
    checkpointed = torch.is_grad_enabled() and tr.gradient_checkpointing
    for block in tr.transformer_blocks:
        if checkpointed:
            x, text = tr._gradient_checkpointing_func(block, x, text, temb, text_mask, rotary)
        else:
            x, text = block(x, text, temb, text_mask, rotary)
    x = tr.proj_out(tr.norm_out(x, temb))
    x = x.reshape(B, T // pt, H // p, W // p, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


class VelocityModel(nn.Module):
    """HunyuanVideo-1.5 transformer with the trainer's `velocity` call (see module doc).

    `batched_text` (default False): run `forward_batched_text` instead of the class's forward
    (same output, no per-sample host syncs); only for a transformer no wrapper hooks."""

    def __init__(self, transformer: nn.Module, autocast_dtype: torch.dtype | None = torch.bfloat16,
                 batched_text: bool = False) -> None:
        super().__init__()
        self.transformer = transformer
        self.autocast_dtype = autocast_dtype
        self.batched_text = batched_text
        cfg = transformer.config
        self.latent_channels = cfg.out_channels
        self.prediction = cfg.get(PREDICTION_KEY, "velocity")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"transformer config {PREDICTION_KEY} must be one of {PREDICTIONS}, "
                             f"got {self.prediction!r}")
        if cfg.in_channels != 2 * cfg.out_channels + 1:
            raise ValueError(f"in_channels={cfg.in_channels} must be 2 * out_channels + 1 = "
                             f"{2 * cfg.out_channels + 1} (latent | condition | mask)")

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def forward(self, latents_bcthw, timestep, conditioning, cfg_scale=1.0):
        return self.velocity(latents_bcthw, timestep, conditioning, cfg_scale)

    def velocity(self, latents_bcthw: torch.Tensor, timestep, conditioning: Conditioning,
                 cfg_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """The (guided) velocity for B samples; see the module docstring for the contract."""
        cfg = self.transformer.config
        if latents_bcthw.dim() != 5 or latents_bcthw.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, T, H, W], got {tuple(latents_bcthw.shape)}")
        B, device = latents_bcthw.shape[0], latents_bcthw.device
        # float64 runs (test references) stay float64 end to end; everything else returns float32
        out_dtype = torch.float64 if latents_bcthw.dtype == torch.float64 else torch.float32
        timestep_b = torch.as_tensor(timestep, dtype=out_dtype, device=device)
        if timestep_b.dim() == 0:
            timestep_b = timestep_b.expand(B)
        if timestep_b.shape != (B,):
            raise ValueError(f"timestep must be a scalar or of shape [{B}], got {tuple(timestep_b.shape)}")
        guided = not (isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0)
        conditioning.prompt.check("prompt", B, cfg)
        if guided:
            if conditioning.negative is None:
                raise ValueError("conditioning.negative is required when cfg_scale != 1")
            conditioning.negative.check("negative", B, cfg)

        # the 65-channel input [latents | condition | mask]
        cond = conditioning.cond_latents_bcthw
        mask = conditioning.cond_mask_b1thw
        if cond is None:
            cond = torch.zeros_like(latents_bcthw)
        if mask is None:
            mask = latents_bcthw.new_zeros((B, 1) + latents_bcthw.shape[2:])
        if cond.shape != latents_bcthw.shape or mask.shape != (B, 1) + latents_bcthw.shape[2:]:
            raise ValueError(f"cond_latents_bcthw {tuple(cond.shape)} / cond_mask_b1thw {tuple(mask.shape)} must "
                             f"match latents {tuple(latents_bcthw.shape)} with 32 / 1 channels")
        x_in = torch.cat([latents_bcthw, cond.to(latents_bcthw.dtype), mask.to(latents_bcthw.dtype)], dim=1)
        image = conditioning.image_embeds_bnd
        if image is None:
            image = latents_bcthw.new_zeros(B, 1, cfg.image_embed_dim)  # t2v: zeroed and masked by the class
        elif image.dim() != 3 or image.shape[0] != B or image.shape[2] != cfg.image_embed_dim:
            raise ValueError(f"image_embeds_bnd must be [{B}, N, {cfg.image_embed_dim}], got {tuple(image.shape)}")

        if guided:
            # rows [0, B): negative text; rows [B, 2B): prompt; row i <-> row B + i
            text = _stack_text([conditioning.negative, conditioning.prompt])
            x_in, image, timestep_in = (torch.cat([t, t], dim=0) for t in (x_in, image, timestep_b))
        else:
            text = _stack_text([conditioning.prompt])
            timestep_in = timestep_b
        embeds, mask_1, embeds_2, mask_2 = text
        with self._autocast(device):
            if self.batched_text:
                out = forward_batched_text(self.transformer, x_in, timestep_in, embeds, mask_1, embeds_2, mask_2,
                                           image, text_to_video=True if conditioning.image_embeds_bnd is None else None)
            else:
                out = self.transformer(
                    hidden_states=x_in, timestep=timestep_in, encoder_hidden_states=embeds,
                    encoder_attention_mask=mask_1, encoder_hidden_states_2=embeds_2,
                    encoder_attention_mask_2=mask_2, image_embeds=image, return_dict=False,
                )[0]
        out = out.to(out_dtype)
        if guided:
            # guidance is linear and the sample -> velocity map affine in the raw output with the
            # same x and sigma for both halves: guiding the raw outputs guides the velocities
            v_uncond, v_cond = out[:B], out[B:]
            scale = torch.as_tensor(cfg_scale, dtype=out_dtype, device=device)
            if scale.dim() == 1:
                if scale.shape != (B,):
                    raise ValueError(f"cfg_scale must be a float or of shape [{B}], got {tuple(scale.shape)}")
                scale = scale.view(B, 1, 1, 1, 1)
            out = v_uncond + scale * (v_cond - v_uncond)
        if self.prediction == "sample":
            sigma = (timestep_b / 1000.0).clamp(min=SAMPLE_SIGMA_MIN).view(B, 1, 1, 1, 1)
            out = (latents_bcthw.to(out_dtype) - out) / sigma
        return out


# ---------------------------------------------------------------------------------------------
# Building and loading


def build_transformer(name: str = "tiny", *, seed: int | None = 0, device="cpu", **overrides) -> nn.Module:
    """A randomly initialised transformer of architecture `name` (float32, fixed `seed`).

    Note: the class zero-initialises nothing; with random weights the output is O(1).
    """
    config = architecture(name, **overrides)
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        model = _transformer_class()(**config)
    return model.to(device)  # float32: the class builds its parameters in the default dtype


def adaln_zero_init_(transformer: nn.Module) -> nn.Module:
    """DiT's adaLN-Zero initialisation, in place, for training from scratch (Peebles & Xie 2023).

    Zeroes the weight and bias of every modulation layer that produces a residual gate (the
    double-stream blocks' `norm1` / `norm1_context`, the token refiner's `norm_out`), the final
    modulation `norm_out` and `proj_out`: every block starts as the identity and the velocity
    as 0, so early updates shape one residual path at a time instead of fighting O(1) random
    outputs. The class itself zero-initialises nothing (it expects pretrained weights). Loaded
    checkpoints must not be passed through this.
    """
    names = []
    for name, module in transformer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_modulation = leaf == "linear" and name.rsplit(".", 2)[-2:-1] in (["norm1"], ["norm1_context"], ["norm_out"])
        if is_modulation or name == "proj_out":
            if not isinstance(module, nn.Linear):
                raise TypeError(f"adaln_zero_init_: expected nn.Linear at {name}, got {type(module).__name__}")
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
            names.append(name)
    if "proj_out" not in names or not any(n.endswith("norm1.linear") for n in names):
        raise ValueError("adaln_zero_init_ expects a HunyuanVideo-1.5 transformer (proj_out, blocks' norm1.linear)")
    return transformer


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from e


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    single = folder / "diffusion_pytorch_model.safetensors"
    if index.exists():
        shards = sorted(set(_read_json(index, "checkpoint index")["weight_map"].values()))
        files = [folder / s for s in shards]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"checkpoint {folder}: shards named in {index.name} are missing: {missing}")
        return files
    if single.exists():
        return [single]
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"checkpoint folder {folder} has no diffusion_pytorch_model.safetensors "
                            f"(or its .index.json); it holds {found}")


def load_transformer(path: str | Path, config: dict | str | Path | None = None, device="cpu") -> nn.Module:
    """Load a HunyuanVideo-1.5 transformer from local files only, strictly, as float32.

    path: a diffusers model folder (config.json + diffusion_pytorch_model.safetensors or a
    sharded index), a pipeline folder holding `transformer/`, or one .safetensors file
    (then `config`, a dict or a config.json path, defaults to the config.json beside it).
    Raises FileNotFoundError for a missing path or weights, ValueError for a config of another
    class, and ValueError listing missing, unexpected and mis-shaped tensors when the weights
    do not match the config. Nothing is downloaded: hub ids are not accepted.
    """
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (local folders and .safetensors files "
                                "only; hub ids are never downloaded)")
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
            path = path / "transformer"
        files = _weight_files(path)
        config = path / "config.json" if config is None else config
    else:
        if path.suffix != ".safetensors":
            raise ValueError(f"checkpoint file must be .safetensors, got {path.name!r}")
        files = [path]
        if config is None:
            config = path.parent / "config.json"
            if not config.exists():
                raise FileNotFoundError(f"checkpoint {path} is a bare .safetensors file: pass its config "
                                        f"(dict or config.json path); none found at {config}")
    if not isinstance(config, dict):
        config = _read_json(Path(config), "checkpoint config")
    class_name = config.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise ValueError(f"checkpoint config is for {class_name!r}, expected {CLASS_NAME!r}")
    cls = _transformer_class()
    init_config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(init_config)
    expected = model.state_dict()

    state = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        def head(items):
            return f"{len(items)} {items[:5]}{' ...' if len(items) > 5 else ''}"
        raise ValueError(f"checkpoint {path} does not match its config: missing {head(missing)}; "
                         f"unexpected {head(unexpected)}; shape mismatches {head(mismatched)}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
    if PREDICTION_KEY in config:
        model.register_to_config(**{PREDICTION_KEY: config[PREDICTION_KEY]})  # VelocityModel validates it
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftover, f"tensors not loaded: {leftover}"
    log.info("loaded %s from %s (%d tensors)", CLASS_NAME, path, len(state))
    return model.to(device)


def apply_lora(transformer: nn.Module, rank: int = 32, alpha: float = 32.0,
               target_modules=DEFAULT_LORA_TARGETS) -> list[str]:
    """Freeze the base weights and add a peft LoRA adapter to `target_modules` of every
    double-stream block (B initialised to zero, so the output is unchanged until training).
    Returns the names of the trainable parameters."""
    from peft import LoraConfig  # noqa: PLC0415

    # peft full-matches a string target as a regex against every module name
    pattern = r"transformer_blocks\.\d+\.(" + "|".join(re.escape(t) for t in target_modules) + ")"
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, init_lora_weights=True))
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    if not names or any("lora_" not in n for n in names):
        raise ValueError(f"LoRA targets {list(target_modules)} matched no module (or left base weights trainable)")
    return names


def build_velocity_model(config: VelocityModelConfig | None = None, device="cpu", seed: int | None = 0) -> VelocityModel:
    """Transformer (loaded or random), attention backend (chosen and logged once), LoRA or full
    fine-tuning, activation checkpointing, autocast: the policy the trainer drives."""
    config = config or VelocityModelConfig()
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


def random_conditioning(transformer_config, batch: int, *, text_len=(7, 5), text_len_2=(5, 3),
                        generator: torch.Generator | None = None, negative: bool = True,
                        device="cpu") -> Conditioning:
    """Random text embeddings with per-sample padding (tests, synthetic world, benchmarks).

    text_len / text_len_2: (max length, min real length); sample i gets a real length that
    cycles between the min and the max, so a batch mixes padding amounts.
    """
    def text(seed_shift):
        def stream(width, lengths):
            L, lo = lengths
            emb = torch.randn(batch, L, width, generator=generator)
            real = torch.tensor([lo + (i + seed_shift) % (L - lo + 1) for i in range(batch)])
            mask = (torch.arange(L)[None, :] < real[:, None]).long()
            return emb.to(device), mask.to(device)

        e1, m1 = stream(transformer_config.text_embed_dim, text_len)
        e2, m2 = stream(transformer_config.text_embed_2_dim, text_len_2)
        return TextEmbeddings(e1, m1, e2, m2)

    return Conditioning(prompt=text(0), negative=text(1) if negative else None)
