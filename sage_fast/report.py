"""What a person looks at: sample videos (GIF, MP4) and the end-of-run plot.

Owns file naming under the run folder: every name written from a prompt goes through
`safe_name`, and `run_path` refuses any path that would land outside the run folder, so a
prompt like "../../etc/passwd" cannot write there.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

__all__ = ["safe_name", "run_path", "video_frames", "save_gif", "save_mp4", "plot_history", "learning_summary"]

log = logging.getLogger("sage_fast.report")


def safe_name(text: str, limit: int = 60) -> str:
    """A file-name slug of `text`: lower-case letters, digits and '-' only, never empty."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:limit].strip("-")
    return slug or "unnamed"


def run_path(run_dir: str | Path, *parts: str) -> Path:
    """run_dir / parts, refusing a result outside run_dir."""
    root = Path(run_dir).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"refusing to write {path}: outside the run folder {root}")
    return path


def video_frames(video_bcfhw: torch.Tensor, scale: int = 4) -> list[np.ndarray]:
    """[B, 3, F, H, W] in [-1, 1] -> F uint8 RGB frames of the B videos side by side, upscaled."""
    v = ((video_bcfhw.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, _, f, h, w = v.shape
    grid = v.permute(2, 3, 0, 4, 1).reshape(f, h, b * w, 3)  # [F, H, B*W, 3]
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return [frame.numpy() for frame in grid]


def save_gif(video_bcfhw: torch.Tensor, path: Path, fps: int = 4) -> Path:
    from PIL import Image  # noqa: PLC0415

    frames = [Image.fromarray(f) for f in video_frames(video_bcfhw)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


def save_mp4(video_bcfhw: torch.Tensor, path: Path, fps: int = 4) -> Path | None:
    """MP4 through imageio's ffmpeg (imageio-ffmpeg ships the binary); None if unavailable."""
    try:
        import imageio.v2 as imageio  # noqa: PLC0415
    except ImportError as err:
        log.warning("MP4 samples off: %s (pip install imageio imageio-ffmpeg)", err)
        return None
    frames = video_frames(video_bcfhw)
    h, w = frames[0].shape[:2]
    pad_h, pad_w = (-h) % 16, (-w) % 16  # H.264 encoders want multiples of 16 (macro blocks)
    frames = [np.pad(f, ((0, pad_h), (0, pad_w), (0, 0))) for f in frames]
    try:
        imageio.mimwrite(path, frames, fps=fps, codec="libx264", quality=8, macro_block_size=16)
    except Exception as err:  # noqa: BLE001 - a missing codec must not stop training
        log.warning("MP4 sample not written (%s: %s)", type(err).__name__, err)
        return None
    return path


def plot_history(history: list[dict], path: Path) -> Path | None:
    """PNG of the evaluation reward dimensions and the manifold distance over iterations."""
    if not history:
        return None
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    its = [h["iteration"] for h in history]
    # keys of every evaluation (a first evaluation whose reward failed has no dimensions)
    keys = set().union(*history)
    reward_keys = sorted(k for k in keys if k.startswith("eval/") and k != "eval/manifold_distance")
    has_dist = "eval/manifold_distance" in keys
    fig, axes = plt.subplots(1, 2 if has_dist else 1, figsize=(11 if has_dist else 6, 4), squeeze=False)
    for key in reward_keys:
        axes[0, 0].plot(its, [h.get(key, float("nan")) for h in history], marker="o", label=key.split("/", 1)[1])
    axes[0, 0].set(xlabel="iteration", ylabel="evaluation reward", title="reward dimensions (fixed prompts, ODE)")
    axes[0, 0].legend()
    axes[0, 0].grid(alpha=0.3)
    if has_dist:
        axes[0, 1].plot(its, [h.get("eval/manifold_distance", float("nan")) for h in history], marker="o",
                        color="tab:red")
        axes[0, 1].set(xlabel="iteration", ylabel="distance to best re-rendering", title="manifold distance")
        axes[0, 1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_summary(history: list[dict], key: str = "eval/reward", guard: str = "eval/vq") -> dict:
    """Did the run learn? The mean of the last 3 evaluations against the first one.

    rise = mean(last 3) - first; spread = max - min of the last 3; `learned` when rise > spread.
    guard_drift = relative change of `guard` (visual quality) from the first evaluation to the
    mean of the last 3: alignment must not be bought with broken frames.
    """
    values = [h[key] for h in history if key in h]
    if len(values) < 4:
        return {"evaluations": len(values)}
    last = values[-3:]
    rise = sum(last) / 3 - values[0]
    spread = max(last) - min(last)
    out = {"evaluations": len(values), "first": values[0], "last3_mean": sum(last) / 3, "rise": rise,
           "last3_spread": spread, "learned": rise > spread}
    guards = [h[guard] for h in history if guard in h]
    if len(guards) >= 4 and guards[0] != 0:
        out["guard"] = guard
        out["guard_drift"] = (sum(guards[-3:]) / 3 - guards[0]) / abs(guards[0])
    return out
