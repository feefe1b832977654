"""The world's rewards: VQ, MQ, TA (the roles of VideoAlign's three heads), batched torch.

    out = WorldReward("alignment")(video_bcfhw, prompts)      # video [B, 3, F, H, W], B prompts
    out.scores["vq"], out.scores["mq"], out.scores["ta"]      # each [B] float32 in [0, 1]
    out.total_b                                               # [B] = sum_d weight_d * score_d
                                                              # (a sage_fast.rewards.RewardResult)

Each dimension is in [0, 1] (1 = what a clean render of the prompt scores, up to edge effects)
and measures one thing (masks and tracks: `analysis.py`):

- **VQ, visual quality** (prompt-blind): each frame is a clean rendering. Per pixel,
  `exp(-d^2 / VQ_TAU^2)` with d the RGB distance to the nearest "pure" colour (the background or a
  palette colour), averaged over pixels and frames. Noise on the background (not uniform), a
  desaturated, textured or off-palette object (not solid) and blurred edges (many mixed pixels)
  all lower it; a clean render loses only its 1-pixel anti-aliased rim (VQ ~0.95).
- **MQ, motion quality** (prompt-blind): each object (one track per palette colour whose mean mass
  is >= MIN_MASS) moves smoothly: the product of three factors,
  constant size `exp(-(cv / MQ_CV)^2)` (cv = std/mean of the mass over frames), linear trajectory
  `exp(-(resid / MQ_RESID)^2)` (RMS pixels of the centroid off its fitted line) and no flicker
  `exp(-(mismatch / MQ_FLICKER)^2)` (fraction of the mask that differs between frame t+1 and
  frame t moved by the fitted velocity); averaged over tracks weighted by mass. A video with no
  object scores 0 (a real score: nothing moves).
- **TA, text alignment**: the prompt's objects are there with their attributes. For each object
  of the prompt (looked up by its colour): presence `clamp(mass / (0.5 * expected area), 0, 1)`,
  shape `softmax(IoU / TA_SHAPE_T)[prompted shape]` (IoU of the mask with each shape of the same
  area), direction `exp(-|v - v_prompt|^2 / (2 (0.5 SPEED)^2))`, size `exp(-((s - s_prompt) / 1 px)^2)`
  (1 when the prompt gives no size), objectness `clamp(max_shape IoU / TA_OBJECT_IOU, 0, 1)` (the
  colour forms one solid shape, not scattered pixels); the object scores
  `presence * objectness * (1 + shape + direction + size) / 4`.
  TA = mean over the prompt's objects, times composition exclusivity = (mass of the prompted colours)
  / (mass of all colours), so extra or wrong-colour objects cost.

Weights: `WEIGHTS["averaged"] = (1, 1, 1)`, `WEIGHTS["alignment"] = (0.5, 0.5, 1.0)` (the paper's
"alignment-focused"; the authors' default), or any dict {"vq": w, "mq": w, "ta": w}.

Failure: a reward never fails silently to 0. A video row with a non-finite value scores NaN in
every dimension (and in total) for that row; a malformed video or a prompt outside the grammar
(or the empty prompt, which names nothing to align with) raises ValueError. The trainer must
exclude NaN rows (docs/SPEC.md section 5).

Scales (VQ_TAU, MQ_*, TA_*) are tolerances in pixels / RGB units of the 32 x 32 world, chosen
before training the base model; sizes and speeds scale with min(H, W) / 32.
"""

from __future__ import annotations

import math

import torch

from sage_fast.rewards import RewardResult

from .analysis import check_video, colour_masks, shape_iou, shift_frames, size_from_mass, tracks
from .prompts import parse_prompt
from .render import BACKGROUND, COLOURS, DIRECTIONS, SIZES, SPEED

__all__ = ["DIMENSIONS", "WEIGHTS", "WorldReward", "resolve_weights",
           "visual_quality", "motion_quality", "text_alignment", "VQ_TAU", "MIN_MASS"]

DIMENSIONS = ("vq", "mq", "ta")
WEIGHTS = {"averaged": {"vq": 1.0, "mq": 1.0, "ta": 1.0}, "alignment": {"vq": 0.5, "mq": 0.5, "ta": 1.0}}

VQ_TAU = 0.25          # RGB distance: a pixel within ~0.25 of a pure colour is clean
MIN_MASS = 10.0        # pixels (at 32 x 32): a colour with less mean mass is not an object (small object: 28)
MQ_CV = 0.1            # 10% size change across frames costs a factor e
MQ_RESID = 0.5         # pixels off a straight line
MQ_FLICKER = 0.25      # fraction of the mask not explained by moving the previous frame
TA_SHAPE_T = 0.05      # IoU temperature of the shape vote
TA_SIZE_TOL = 1.0      # pixels of s (small 3, large 5)
TA_OBJECT_IOU = 0.8    # best shape IoU at which a colour's mask counts fully as one solid object


def _scale(video) -> float:
    return min(video.shape[-1], video.shape[-2]) / 32.0


def _nan_rows(video_bcfhw: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
    bad = ~torch.isfinite(video_bcfhw.flatten(1)).all(1)
    return torch.where(bad, torch.full_like(score_b, float("nan")), score_b)


def visual_quality(video_bcfhw: torch.Tensor) -> torch.Tensor:
    """VQ [B] float32 in [0, 1] (see module doc)."""
    check_video(video_bcfhw)
    p = video_bcfhw.float()
    pure = torch.cat([torch.tensor([BACKGROUND]), COLOURS]).to(p.device)  # [K+1, 3]
    d2 = ((p[:, None] - pure.view(1, -1, 3, 1, 1, 1)) ** 2).sum(2).amin(1)  # [B, F, H, W]
    return _nan_rows(video_bcfhw, torch.exp(-d2 / VQ_TAU**2).mean((1, 2, 3)))


def _motion_terms(mask_bkfhw: torch.Tensor, trk) -> tuple[torch.Tensor, ...]:
    """Per-track factors [B, K]: size constancy, linearity, no flicker."""
    B, K, Fr, H, W = mask_bkfhw.shape
    cv = trk.mass_bkf.std(-1, unbiased=False) / trk.mean_mass_bk.clamp(min=1e-6)
    prev = mask_bkfhw[:, :, :-1].reshape(-1, H, W)  # [B*K*(F-1), H, W]
    shift = trk.vel_bk2[:, :, None].expand(B, K, Fr - 1, 2).reshape(-1, 2)
    moved = shift_frames(prev, shift).view(B, K, Fr - 1, H, W)
    nxt = mask_bkfhw[:, :, 1:]
    mismatch = (nxt - moved).abs().sum((-1, -2, -3)) / (nxt.sum((-1, -2, -3)) + moved.sum((-1, -2, -3))).clamp(min=1e-6)
    return (torch.exp(-(cv / MQ_CV) ** 2), torch.exp(-(trk.resid_bk / MQ_RESID) ** 2),
            torch.exp(-(mismatch / MQ_FLICKER) ** 2))


def motion_quality(video_bcfhw: torch.Tensor) -> torch.Tensor:
    """MQ [B] float32 in [0, 1] (see module doc)."""
    check_video(video_bcfhw)
    mask = colour_masks(video_bcfhw)
    trk = tracks(mask)
    size_c, lin_c, flick_c = _motion_terms(mask, trk)
    per_track = size_c * lin_c * flick_c  # [B, K]
    weight = trk.mean_mass_bk * (trk.mean_mass_bk >= MIN_MASS * _scale(video_bcfhw) ** 2)
    score = (weight * per_track).sum(1) / weight.sum(1).clamp(min=1e-6)  # 0 when no object
    return _nan_rows(video_bcfhw, score)


def text_alignment(video_bcfhw: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """TA [B] float32 in [0, 1] (see module doc); prompts: B strings of the grammar."""
    check_video(video_bcfhw)
    B, _, Fr, H, W = video_bcfhw.shape
    if isinstance(prompts, str) or len(prompts) != B:
        raise ValueError(f"prompts must be a list of {B} strings (one per video), got "
                         f"{'a str' if isinstance(prompts, str) else len(prompts)}")
    specs = [parse_prompt(p) for p in prompts]
    for p, s in zip(prompts, specs):
        if not s:
            raise ValueError(f"prompts must name at least one object for TA, got {p!r}")
    scale = _scale(video_bcfhw)
    mask = colour_masks(video_bcfhw)
    trk = tracks(mask)
    dev = mask.device
    # one row per (video, prompted object)
    rows = [(b, o) for b in range(B) for o in range(len(specs[b]))]
    bi = torch.tensor([b for b, _ in rows], device=dev)
    k = torch.tensor([specs[b][o].colour for b, o in rows], device=dev)
    shape_t = torch.tensor([specs[b][o].shape for b, o in rows], device=dev)
    dirs = torch.tensor(list(DIRECTIONS.values()), device=dev)
    v_target = dirs[torch.tensor([specs[b][o].direction for b, o in rows], device=dev)] * (SPEED * scale)
    size_idx = torch.tensor([specs[b][o].size for b, o in rows], device=dev)
    size_vals = torch.tensor(list(SIZES.values()), device=dev) * scale
    size_free = size_idx < 0
    s_target = torch.where(size_free, size_vals.mean(), size_vals[size_idx.clamp(min=0)])

    mass = trk.mean_mass_bk[bi, k]
    presence = (mass / (0.5 * math.pi * s_target**2)).clamp(0.0, 1.0)
    s_hat = size_from_mass(mass)
    size_score = torch.where(size_free, torch.ones_like(s_hat), torch.exp(-((s_hat - s_target) / (TA_SIZE_TOL * scale)) ** 2))
    v = trk.vel_bk2[bi, k]
    dir_score = torch.exp(-((v - v_target) ** 2).sum(-1) / (2 * (0.5 * SPEED * scale) ** 2))
    iou = shape_iou(mask[bi, k], trk.centre_bkf2[bi, k], s_hat.clamp(min=0.5))
    shape_score = torch.softmax(iou / TA_SHAPE_T, dim=-1).gather(1, shape_t[:, None])[:, 0]
    objectness = (iou.amax(-1) / TA_OBJECT_IOU).clamp(0.0, 1.0)
    obj = presence * objectness * (1.0 + shape_score + dir_score + size_score) / 4.0
    per_video = torch.zeros(B, device=dev).index_add_(0, bi, obj)
    n_obj = torch.tensor([len(s) for s in specs], device=dev, dtype=torch.float32)
    prompted = torch.zeros(B, device=dev).index_add_(0, bi, mass)
    exclusivity = prompted / trk.mean_mass_bk.sum(1).clamp(min=1e-6)
    return _nan_rows(video_bcfhw, per_video / n_obj * exclusivity.clamp(0.0, 1.0))


def resolve_weights(weights: str | dict) -> dict[str, float]:
    """A named setting of WEIGHTS or a dict over DIMENSIONS (missing dimensions weigh 0)."""
    if isinstance(weights, str):
        if weights not in WEIGHTS:
            raise ValueError(f"reward weights must be one of {tuple(WEIGHTS)} or a dict over {DIMENSIONS}, "
                             f"got {weights!r}")
        return dict(WEIGHTS[weights])
    unknown = sorted(set(weights) - set(DIMENSIONS))
    if unknown:
        raise ValueError(f"reward weights keys must be among {DIMENSIONS}, got {unknown}")
    out = {d: float(weights.get(d, 0.0)) for d in DIMENSIONS}
    if not all(math.isfinite(w) for w in out.values()):
        raise ValueError(f"reward weights must be finite, got {out}")
    return out


class WorldReward:
    """Weighted VQ/MQ/TA reward of the world (see module doc); call with (video, prompts)."""

    def __init__(self, weights: str | dict = "alignment") -> None:
        self.weights = resolve_weights(weights)

    def __call__(self, video_bcfhw: torch.Tensor, prompts: list[str]) -> RewardResult:
        """scores: {"vq", "mq", "ta"} -> [B]; total_b: [B] weighted sum; NaN marks a failed row."""
        with torch.no_grad():
            scores = {"vq": visual_quality(video_bcfhw), "mq": motion_quality(video_bcfhw),
                      "ta": text_alignment(video_bcfhw, prompts)}
        total = sum(self.weights[d] * scores[d] for d in DIMENSIONS)
        return RewardResult(total_b=total, scores=scores)
