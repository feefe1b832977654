"""Distance of a video from the world's data manifold (the set of all renders).

    d_b = manifold_distance(video_bcfhw)      # [B] float32, RMS in RGB units of [-1, 1]
    fit = fit_scene(video_bcfhw)              # the best re-rendering: fit.scene, fit.render_bcfhw

Fit (batched, deterministic, no randomness):
1. Initialise from measurements (`analysis.py`): the (up to MAX_OBJECTS) palette colours with
   the largest mean mass >= MIN_MASS become objects; each gets size s = sqrt(mass / pi) (every
   shape has area pi s^2), start and velocity from the least-squares line through its centroids,
   and the shape whose template best overlaps its mask (IoU).
2. Refine the continuous parameters (size, start, velocity of every object) by `iters` Adam
   steps on the mean squared error between the video and the render (the renderer is piecewise
   linear in them, see `render.py`); the discrete ones (colour, shape, count) stay.
3. distance = sqrt(mean over C, F, H, W of (video - render)^2).

A render of the world comes back at ~0 (< 0.02: the fit recovers its parameters to a small
fraction of a pixel); i.i.d. noise of std sigma added to a render gives ~sigma (noise cannot be
re-rendered); pure N(0, 1) noise ~1. A video with no object is fitted by the background alone.
A row with non-finite values gets NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .analysis import check_video, colour_masks, shape_iou, size_from_mass, tracks
from .render import MAX_OBJECTS, Scene, render
from .rewards import MIN_MASS

__all__ = ["ManifoldFit", "fit_scene", "manifold_distance"]


@dataclass
class ManifoldFit:
    """scene: fitted parameters [B, MAX_OBJECTS]; render_bcfhw: its render; distance_b: [B] RMS."""

    scene: Scene
    render_bcfhw: torch.Tensor
    distance_b: torch.Tensor


def _initial_scene(video_bcfhw: torch.Tensor) -> Scene:
    B, _, Fr, H, W = video_bcfhw.shape
    mask = colour_masks(video_bcfhw)
    trk = tracks(mask)
    scale2 = (min(H, W) / 32.0) ** 2
    mass = torch.nan_to_num(trk.mean_mass_bk, nan=0.0)
    top_mass, top_k = mass.topk(MAX_OBJECTS, dim=1)  # [B, O]
    present = top_mass >= MIN_MASS * scale2
    bi = torch.arange(B)[:, None].expand(B, MAX_OBJECTS)
    size = size_from_mass(top_mass).clamp(min=0.5)
    centre = trk.centre_bkf2[bi, top_k]  # [B, O, F, 2]
    iou = shape_iou(mask[bi, top_k].reshape(B * MAX_OBJECTS, Fr, H, W), centre.reshape(B * MAX_OBJECTS, Fr, 2),
                    size.reshape(-1))
    shape = iou.argmax(-1).view(B, MAX_OBJECTS)
    return Scene(shape_bo=shape, colour_bo=top_k, size_bo=size, pos_bo2=trk.start_bk2[bi, top_k],
                 vel_bo2=trk.vel_bk2[bi, top_k], present_bo=present)


def fit_scene(video_bcfhw: torch.Tensor, iters: int = 40, lr: float = 0.05) -> ManifoldFit:
    """Best re-rendering of each video (see module doc); float32 throughout."""
    check_video(video_bcfhw)
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    B, _, Fr, H, W = video_bcfhw.shape
    video = torch.nan_to_num(video_bcfhw.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    with torch.no_grad():
        scene = _initial_scene(video)
    params = [scene.size_bo.clone().requires_grad_(True), scene.pos_bo2.clone().requires_grad_(True),
              scene.vel_bo2.clone().requires_grad_(True)]
    if iters:
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(iters):
                s = Scene(scene.shape_bo, scene.colour_bo, params[0], params[1], params[2], scene.present_bo)
                # sum over videos of each video's MSE: videos do not interact, Adam is per element
                loss = (render(s, Fr, H, W) - video).square().mean((1, 2, 3, 4)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    params[0].clamp_(min=0.5)
    fitted = Scene(scene.shape_bo, scene.colour_bo, params[0].detach(), params[1].detach(), params[2].detach(),
                   scene.present_bo)
    with torch.no_grad():
        rendered = render(fitted, Fr, H, W)
        distance = (rendered - video).square().mean((1, 2, 3, 4)).sqrt()
        bad = ~torch.isfinite(video_bcfhw.flatten(1)).all(1)
        distance = torch.where(bad, torch.full_like(distance, float("nan")), distance)
    return ManifoldFit(fitted, rendered, distance)


def manifold_distance(video_bcfhw: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """[B] float32: RMS distance of each video from its best re-rendering (see module doc)."""
    return fit_scene(video_bcfhw, iters=iters).distance_b
