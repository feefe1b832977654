"""The world's "VAE": a fixed, exactly invertible map between videos and model latents.

    latents_bcthw = encode(video_bcfhw)   # [B, 3*p*p, F, H/p, W/p]
    video_bcfhw   = decode(latents_bcthw) # [B, 3, F, H, W]

Space-to-depth (pixel unshuffle) by the patch p = PATCH = 4 in each spatial direction, no
temporal compression, times a fixed scale LATENT_SCALE. Space-to-depth is a permutation, so the
map is orthogonal up to the scale: `decode(encode(v)) == v` bit for bit when LATENT_SCALE is a
power of two (it is: 2.0), and any latent decodes to some video (the map is a bijection).
Default sizes: video [B, 3, 5, 32, 32] <-> latents [B, 48, 5, 8, 8] = 320 tokens per sample
(patch 1x1x1 in the transformer). Patch 8 (144 tokens of 192 channels) was tried and learns
slower per second on the CPU: the velocity must carry each token's 192-d noise through the
128-wide model (docs/LOG.md, 2026-11-22).

Channel order of the latent: c = colour * p * p + dy * p + dx (torch.nn.functional.pixel_unshuffle).

LATENT_SCALE = 2: videos are mostly background 0 with saturated +-1 objects (per-element std
~0.35), scaling by 2 brings the data's std closer to the unit noise of flow matching.

Leaves to others: what the latents mean to the model (the trainer only sees `latent_channels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PATCH", "LATENT_SCALE", "latent_channels", "latent_shape", "encode", "decode"]

PATCH = 4
LATENT_SCALE = 2.0


def latent_channels(patch: int = PATCH) -> int:
    """Channels of the latent: 3 * patch^2 (48 at the default patch 4)."""
    return 3 * patch * patch


def latent_shape(frames: int, height: int, width: int, patch: int = PATCH) -> tuple[int, int, int, int]:
    """(C, T, H', W') of the latent of a [3, frames, height, width] video."""
    if height % patch or width % patch:
        raise ValueError(f"height and width must be multiples of patch={patch}, got {height}x{width}")
    return latent_channels(patch), frames, height // patch, width // patch


def encode(video_bcfhw: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """Video [B, 3, F, H, W] -> latents [B, 3*p*p, F, H/p, W/p] (same dtype), exact."""
    if video_bcfhw.dim() != 5 or video_bcfhw.shape[1] != 3:
        raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video_bcfhw.shape)}")
    B, _, Fr, H, W = video_bcfhw.shape
    C, T, Hp, Wp = latent_shape(Fr, H, W, patch)
    frames_bf3hw = video_bcfhw.transpose(1, 2).reshape(B * Fr, 3, H, W)  # [B*F, 3, H, W]
    z = F.pixel_unshuffle(frames_bf3hw, patch)  # [B*F, 3*p*p, H/p, W/p]
    return (z.reshape(B, Fr, C, Hp, Wp).transpose(1, 2) * LATENT_SCALE).contiguous()


def decode(latents_bcthw: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """Latents [B, 3*p*p, T, H', W'] -> video [B, 3, T, H'*p, W'*p] (same dtype), exact inverse."""
    C = latent_channels(patch)
    if latents_bcthw.dim() != 5 or latents_bcthw.shape[1] != C:
        raise ValueError(f"latents must be [B, {C}, T, H', W'] for patch={patch}, got {tuple(latents_bcthw.shape)}")
    B, _, T, Hp, Wp = latents_bcthw.shape
    z = (latents_bcthw / LATENT_SCALE).transpose(1, 2).reshape(B * T, C, Hp, Wp)  # [B*T, C, H', W']
    frames = F.pixel_shuffle(z, patch)  # [B*T, 3, H, W]
    return frames.reshape(B, T, 3, Hp * patch, Wp * patch).transpose(1, 2).contiguous()
