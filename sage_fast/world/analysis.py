"""Measuring a video against the world's vocabulary: per-colour masks, object tracks, shape fits.

Shared by the rewards (`rewards.py`) and the manifold fit (`manifold.py`); batched torch, no
learned parts. Every pixel p (RGB) is compared with the K palette colours c_k along the segment
from the background bg to c_k:

    alpha_k = <p - bg, c_k - bg> / |c_k - bg|^2                 (how far towards colour k)
    r2_k    = |p - bg - clamp(alpha_k, 0, 1) (c_k - bg)|^2       (distance off that segment)
    w_k     = softmax_k(-r2_k / ASSIGN_TAU2)                     (which colour the pixel mixes)
    mask_k  = w_k * clamp((alpha_k - DEAD) / (1 - 2 DEAD), 0, 1)  (coverage estimate of colour k)

An anti-aliased edge pixel of a clean render (bg and c_k mixed with coverage a) has alpha_k = a,
r2_k = 0, so mask_k ~ a: summing masks recovers object areas. The dead zone DEAD = 0.1 keeps
low-level noise (|alpha| < 0.1, e.g. a sample's residual noise) out of the masses; it is
symmetric around 0.5, so the area of a clean edge ramp is kept on average.

Tracks: mass A_kt = sum_hw mask_k (pixels), centroid c_kt (x, y) = mask-weighted mean pixel
centre, and the least-squares line c_kt ~ c_k + v_k (t - tbar) per colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .render import BACKGROUND, COLOURS, SHAPES, coverage

__all__ = ["ASSIGN_TAU2", "DEAD", "Tracks", "colour_masks", "tracks", "shape_iou", "shift_frames", "check_video"]

ASSIGN_TAU2 = 0.05
DEAD = 0.1


def check_video(video_bcfhw: torch.Tensor) -> None:
    if not isinstance(video_bcfhw, torch.Tensor) or video_bcfhw.dim() != 5 or video_bcfhw.shape[1] != 3:
        shape = tuple(video_bcfhw.shape) if isinstance(video_bcfhw, torch.Tensor) else type(video_bcfhw).__name__
        raise ValueError(f"video must be a tensor [B, 3, F, H, W] (RGB in [-1, 1]), got {shape}")
    if video_bcfhw.shape[2] < 2:
        raise ValueError(f"video must have >= 2 frames to measure motion, got {video_bcfhw.shape[2]}")


def colour_masks(video_bcfhw: torch.Tensor) -> torch.Tensor:
    """Per-colour coverage estimates mask_k in [0, 1]: [B, K, F, H, W] float32 (see module doc)."""
    p = video_bcfhw.float()
    bg = torch.tensor(BACKGROUND, dtype=p.dtype, device=p.device).view(1, 3, 1, 1, 1)
    d_k3 = COLOURS.to(p.device) - bg.view(1, 3)  # [K, 3]
    q = p - bg  # [B, 3, F, H, W]
    alpha = torch.einsum("bcfhw,kc->bkfhw", q, d_k3) / (d_k3 * d_k3).sum(1).view(1, -1, 1, 1, 1)
    a = alpha.clamp(0.0, 1.0)
    # |q - a d|^2 = |q|^2 - 2 a <q, d> + a^2 |d|^2, with <q, d> = alpha |d|^2
    dd = (d_k3 * d_k3).sum(1).view(1, -1, 1, 1, 1)
    r2 = ((q * q).sum(1, keepdim=True) - 2 * a * alpha * dd + a * a * dd).clamp(min=0.0)
    w = torch.softmax(-r2 / ASSIGN_TAU2, dim=1)
    return w * ((alpha - DEAD) / (1.0 - 2.0 * DEAD)).clamp(0.0, 1.0)


@dataclass
class Tracks:
    """Per-colour object tracks of B videos, K colours, F frames (all float32).

    mass_bkf: pixels of colour k at frame t; mean_mass_bk; centre_bkf2: (x, y) centroid;
    vel_bk2: fitted velocity (pixels / frame); start_bk2: fitted centroid at frame 0;
    resid_bk: RMS distance (pixels) of the centroids from the fitted line.
    """

    mass_bkf: torch.Tensor
    mean_mass_bk: torch.Tensor
    centre_bkf2: torch.Tensor
    vel_bk2: torch.Tensor
    start_bk2: torch.Tensor
    resid_bk: torch.Tensor


def tracks(mask_bkfhw: torch.Tensor) -> Tracks:
    B, K, Fr, H, W = mask_bkfhw.shape
    dev = mask_bkfhw.device
    mass = mask_bkfhw.sum(dim=(-1, -2))  # [B, K, F]
    xs = torch.arange(W, dtype=torch.float32, device=dev) + 0.5
    ys = torch.arange(H, dtype=torch.float32, device=dev) + 0.5
    safe = mass.clamp(min=1e-6)
    cx = (mask_bkfhw.sum(-2) * xs).sum(-1) / safe
    cy = (mask_bkfhw.sum(-1) * ys).sum(-1) / safe
    # an empty frame has no centroid: use the frame centre (its weight in the fit below is ~0)
    empty = mass < 1e-3
    cx = torch.where(empty, torch.full_like(cx, W / 2), cx)
    cy = torch.where(empty, torch.full_like(cy, H / 2), cy)
    centre = torch.stack([cx, cy], dim=-1)  # [B, K, F, 2]
    t = torch.arange(Fr, dtype=torch.float32, device=dev)
    tc = (t - t.mean()).view(1, 1, Fr, 1)
    mean_c = centre.mean(dim=2, keepdim=True)
    vel = (tc * (centre - mean_c)).sum(2) / (tc * tc).sum()  # [B, K, 2]
    fit = mean_c + tc * vel[:, :, None]
    resid = ((centre - fit) ** 2).sum(-1).mean(-1).sqrt()
    start = mean_c[:, :, 0] - t.mean() * vel
    return Tracks(mass, mass.mean(-1), centre, vel, start, resid)


def shift_frames(frames_nhw: torch.Tensor, shift_n2: torch.Tensor) -> torch.Tensor:
    """Translate N images by (dx, dy) pixels each, bilinear, zero outside: [N, H, W]."""
    N, H, W = frames_nhw.shape
    theta = torch.zeros(N, 2, 3, dtype=frames_nhw.dtype, device=frames_nhw.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    # output(x) = input(x - shift); normalised coordinates span 2 over W (H) pixels
    theta[:, 0, 2] = -2.0 * shift_n2[:, 0] / W
    theta[:, 1, 2] = -2.0 * shift_n2[:, 1] / H
    grid = F.affine_grid(theta, (N, 1, H, W), align_corners=False)
    return F.grid_sample(frames_nhw[:, None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


def shape_iou(mask_bfhw: torch.Tensor, centre_bf2: torch.Tensor, size_b: torch.Tensor) -> torch.Tensor:
    """Soft IoU, averaged over frames, of a mask with each shape of area pi * size^2 centred at
    the mask's centroids: [B, len(SHAPES)] in [0, 1]."""
    B, Fr, H, W = mask_bfhw.shape
    S = len(SHAPES)
    shape_bs = torch.arange(S, device=mask_bfhw.device).expand(B, S)
    centre = centre_bf2[:, :, None, :].expand(B, Fr, S, 2)
    tmpl = coverage(shape_bs, size_b[:, None].expand(B, S).float(), centre.float(), H, W)  # [B, F, S, H, W]
    m = mask_bfhw[:, :, None]
    inter = torch.minimum(m, tmpl).sum((-1, -2))
    union = torch.maximum(m, tmpl).sum((-1, -2)).clamp(min=1e-6)
    return (inter / union).mean(1)


def size_from_mass(mass: torch.Tensor) -> torch.Tensor:
    """s such that pi * s^2 = mass (every shape has area pi * s^2)."""
    return torch.sqrt(mass.clamp(min=0.0) / math.pi)
