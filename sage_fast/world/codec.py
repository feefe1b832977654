"""The world's "VAE": a fixed linear map between videos and model latents, exact on videos.

    latents_bcthw = encode(video_bcfhw)   # [B, 3*p*p*tau, 1 + (F-1)/tau, H/p, W/p]
    video_bcfhw   = decode(latents_bcthw) # [B, 3, F, H, W]

Like the HunyuanVideo-1.5 VAE it compresses time by TEMPORAL = tau = 4 with the first frame
alone (4k+1 frames -> k+1 latent frames: 5 -> 2, 81 -> 21) and space by the patch
p = PATCH = 4 (space-to-depth, pixel unshuffle), times a fixed scale LATENT_SCALE:

- latent frame 0 holds frame 0 in its first 3 p^2 channels and zeros in the other
  3 p^2 (tau - 1) (the padding, which `decode` ignores);
- latent frame j >= 1 holds frames 4j-3 .. 4j, channel c = i * 3 p^2 + (colour * p^2 + dy * p + dx)
  for frame 4j-3+i of the group.

So `decode(encode(v)) == v` bit for bit (a permutation and a power-of-two scale), and every
latent decodes to some video; `encode(decode(z)) == z` up to z's padding channels (zeroed).
Default sizes: video [B, 3, 5, 32, 32] <-> latents [B, 192, 2, 8, 8] = 128 tokens per sample.
`temporal=1` is the earlier per-frame codec (48 channels, one latent frame per video frame).
Why time is packed: a token then carries the same 4 x 4 pixels over 4 frames, so an object's
motion and shape across those frames come out of one hidden vector instead of having to be
agreed between 4 tokens; at equal CPU time it sampled far more coherent motion than the
per-frame codec (docs/LOG.md, 2026-11-24), and it has 2.5x fewer tokens.

LATENT_SCALE = 2: videos are mostly background 0 with saturated +-1 objects (per-element std
~0.35), scaling by 2 brings the data's std closer to the unit noise of flow matching.

Leaves to others: what the latents mean to the model (the trainer only sees the latent shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PATCH", "TEMPORAL", "LATENT_SCALE", "latent_channels", "latent_shape", "encode", "decode"]

PATCH = 4
TEMPORAL = 4
LATENT_SCALE = 2.0


def _check(patch: int, temporal: int) -> None:
    for name, value in (("patch", patch), ("temporal", temporal)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"codec {name} must be an int >= 1, got {value!r}")


def latent_channels(patch: int = PATCH, temporal: int = TEMPORAL) -> int:
    """Channels of the latent: 3 * patch^2 * temporal (192 at the defaults)."""
    _check(patch, temporal)
    return 3 * patch * patch * temporal


def latent_shape(frames: int, height: int, width: int, patch: int = PATCH,
                 temporal: int = TEMPORAL) -> tuple[int, int, int, int]:
    """(C, T, H', W') of the latent of a [3, frames, height, width] video."""
    _check(patch, temporal)
    if height % patch or width % patch:
        raise ValueError(f"height and width must be multiples of patch={patch}, got {height}x{width}")
    if frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"frames must be 1 + k * temporal = 1 + k * {temporal} (k >= 0), got {frames}")
    return latent_channels(patch, temporal), 1 + (frames - 1) // temporal, height // patch, width // patch


def encode(video_bcfhw: torch.Tensor, patch: int = PATCH, temporal: int = TEMPORAL) -> torch.Tensor:
    """Video [B, 3, F, H, W] -> latents [B, 3 p^2 tau, 1 + (F-1)/tau, H/p, W/p] (same dtype), exact."""
    if video_bcfhw.dim() != 5 or video_bcfhw.shape[1] != 3:
        raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video_bcfhw.shape)}")
    B, _, Fr, H, W = video_bcfhw.shape
    C, T, Hp, Wp = latent_shape(Fr, H, W, patch, temporal)
    c = C // temporal  # channels of one frame
    frames_bf3hw = video_bcfhw.transpose(1, 2).reshape(B * Fr, 3, H, W)
    z = F.pixel_unshuffle(frames_bf3hw, patch).reshape(B, Fr, c, Hp, Wp)  # [B, F, c, H', W']
    first = torch.cat([z[:, :1], z.new_zeros(B, 1, C - c, Hp, Wp)], dim=2)  # [B, 1, C, H', W']
    rest = z[:, 1:].reshape(B, T - 1, C, Hp, Wp)  # frames 4j-3..4j side by side in channels
    return (torch.cat([first, rest], dim=1).transpose(1, 2) * LATENT_SCALE).contiguous()


def decode(latents_bcthw: torch.Tensor, patch: int = PATCH, temporal: int = TEMPORAL) -> torch.Tensor:
    """Latents [B, 3 p^2 tau, T, H', W'] -> video [B, 3, 1 + (T-1) tau, H'p, W'p] (same dtype);
    the exact inverse of `encode` (the padding channels of latent frame 0 are ignored)."""
    C = latent_channels(patch, temporal)
    if latents_bcthw.dim() != 5 or latents_bcthw.shape[1] != C:
        raise ValueError(f"latents must be [B, {C}, T, H', W'] for patch={patch}, temporal={temporal}, "
                         f"got {tuple(latents_bcthw.shape)}")
    B, _, T, Hp, Wp = latents_bcthw.shape
    c = C // temporal
    z = (latents_bcthw / LATENT_SCALE).transpose(1, 2)  # [B, T, C, H', W']
    frames = torch.cat([z[:, :1, :c], z[:, 1:].reshape(B, (T - 1) * temporal, c, Hp, Wp)], dim=1)
    Fr = frames.shape[1]
    video = F.pixel_shuffle(frames.reshape(B * Fr, c, Hp, Wp), patch)  # [B*F, 3, H, W]
    return video.reshape(B, Fr, 3, Hp * patch, Wp * patch).transpose(1, 2).contiguous()
