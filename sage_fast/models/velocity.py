"""The velocity model the trainer calls: HunyuanVideo-1.5 (diffusers) behind one function.

Owns: `VelocityModel.velocity(latents, timestep, conditioning, cfg_scale)`: the 65-channel
input, classifier-free guidance as one batched forward, autocast, and the raw output ->
velocity conversion (`PREDICTIONS`, `SAMPLE_SIGMA_MIN`, `PREDICTION_KEY`).

    v = velocity(latents_bcthw [B, 32, T, H, W], timestep_b [B] (= 1000 * sigma, mixed freely),
                 conditioning, cfg_scale)                        -> [B, 32, T, H, W] float32

- Input: the transformer takes 65 channels, [latents (32) | condition latents (32) | mask (1)];
  text-to-video leaves condition and mask at zero (the diffusers pipeline's t2v input).
- Classifier-free guidance (cfg_scale != 1): one forward of batch 2B, rows [0, B) with the
  negative text, rows [B, 2B) with the prompt; row i and row B + i share latents, timestep,
  image embeds and condition, so any B and any mix of timesteps pair correctly (docs/SPEC.md defect 3:
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

The call's contract (input checks, guidance, autocast) is the module's functions
`velocity_inputs`, `is_guided`, `guide`, `autocast`, which `wan.WanVelocityModel` shares.

Leaves to others: building, loading and LoRA (`policy`, `hunyuan_video15`), the conditioning containers
(`conditioning`), the batched-text forward (`hunyuan_forward`), the text encoders and VAE
(cached embeddings come in), the sampler and the GRPO loss, distribution (`sage_fast.parallel`
hooks the transformer; this module never sees a process group).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .conditioning import Conditioning, stack_text
from .hunyuan_forward import forward_batched_text

__all__ = ["PREDICTIONS", "PREDICTION_KEY", "SAMPLE_SIGMA_MIN", "VelocityModel", "autocast", "guide", "is_guided",
           "velocity_inputs"]

#: what the transformer's raw output is: the velocity x1 - x0, or the clean sample x0
PREDICTIONS = ("velocity", "sample")
#: sigma floor of the sample -> velocity conversion (JiT's clip of the 1 / sigma weight): below
#: it a "sample" model's velocity is (x - x0_hat) / SAMPLE_SIGMA_MIN
SAMPLE_SIGMA_MIN = 0.05
#: config.json key holding the prediction mode (leading "_": not a constructor argument)
PREDICTION_KEY = "_sage_fast_prediction"


# ---------------------------------------------------------------------------------------------
# The call's contract, shared by every velocity model (this one and `wan.WanVelocityModel`)


def velocity_inputs(latents_bcthw: torch.Tensor, timestep, latent_channels: int) -> tuple[torch.dtype, torch.Tensor]:
    """(out_dtype, timestep_b) of a call: the latents checked as [B, latent_channels, T, H, W];
    out_dtype float64 for float64 latents (test references stay float64 end to end), else
    float32; `timestep` (a scalar or [B]) as a [B] tensor of out_dtype on the latents' device."""
    if latents_bcthw.dim() != 5 or latents_bcthw.shape[1] != latent_channels:
        raise ValueError(f"latents must be [B, {latent_channels}, T, H, W], got {tuple(latents_bcthw.shape)}")
    B, device = latents_bcthw.shape[0], latents_bcthw.device
    out_dtype = torch.float64 if latents_bcthw.dtype == torch.float64 else torch.float32
    timestep_b = torch.as_tensor(timestep, dtype=out_dtype, device=device)
    if timestep_b.dim() == 0:
        timestep_b = timestep_b.expand(B)
    if timestep_b.shape != (B,):
        raise ValueError(f"timestep must be a scalar or of shape [{B}], got {tuple(timestep_b.shape)}")
    return out_dtype, timestep_b


def is_guided(cfg_scale: float | torch.Tensor) -> bool:
    """False only for the plain number 1 (then only the prompt rows run); any tensor guides."""
    return not (isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0)


def guide(out_2b: torch.Tensor, batch: int, cfg_scale: float | torch.Tensor) -> torch.Tensor:
    """v_uncond + cfg_scale * (v_cond - v_uncond) from one forward of 2B rows (rows [0, B)
    negative, [B, 2B) prompt); cfg_scale a float or a [B] tensor, cast to the output's dtype."""
    v_uncond, v_cond = out_2b[:batch], out_2b[batch:]
    scale = torch.as_tensor(cfg_scale, dtype=out_2b.dtype, device=out_2b.device)
    if scale.dim() == 1:
        if scale.shape != (batch,):
            raise ValueError(f"cfg_scale must be a float or of shape [{batch}], got {tuple(scale.shape)}")
        scale = scale.view(batch, 1, 1, 1, 1)
    return v_uncond + scale * (v_cond - v_uncond)


def autocast(dtype: torch.dtype | None, device: torch.device):
    """torch.autocast(dtype) on the device's type; a null context for dtype None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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

    def trains(self, timestep: float) -> bool:
        """Whether the step at `timestep` trains anything: always (one transformer serves every step)."""
        return True

    def forward(self, latents_bcthw, timestep, conditioning, cfg_scale=1.0):
        return self.velocity(latents_bcthw, timestep, conditioning, cfg_scale)

    def velocity(self, latents_bcthw: torch.Tensor, timestep, conditioning: Conditioning,
                 cfg_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """The (guided) velocity for B samples; see the module docstring for the contract."""
        cfg = self.transformer.config
        out_dtype, timestep_b = velocity_inputs(latents_bcthw, timestep, self.latent_channels)
        B, device = latents_bcthw.shape[0], latents_bcthw.device
        guided = is_guided(cfg_scale)
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
            text = stack_text([conditioning.negative, conditioning.prompt])
            x_in, image, timestep_in = (torch.cat([t, t], dim=0) for t in (x_in, image, timestep_b))
        else:
            text = stack_text([conditioning.prompt])
            timestep_in = timestep_b
        embeds, mask_1, embeds_2, mask_2 = text
        with autocast(self.autocast_dtype, device):
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
            out = guide(out, B, cfg_scale)
        if self.prediction == "sample":
            sigma = (timestep_b / 1000.0).clamp(min=SAMPLE_SIGMA_MIN).view(B, 1, 1, 1, 1)
            out = (latents_bcthw.to(out_dtype) - out) / sigma
        return out
