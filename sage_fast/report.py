"""What a person looks at: sample videos (GIF, MP4), the end-of-run plot, the before / after
comparison, and the run's verdict (a paired test over the evaluation prompts).

Owns file naming under the run folder: `run_path` refuses any path that would land outside it,
so a name like "../../etc/passwd" cannot write there.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["run_path", "to_uint8", "video_frames", "save_gif", "save_mp4", "plot_history", "save_compare",
           "learning_summary"]

log = logging.getLogger("sage_fast.report")


def run_path(run_dir: str | Path, *parts: str) -> Path:
    """run_dir / parts, refusing a result outside run_dir."""
    root = Path(run_dir).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"refusing to write {path}: outside the run folder {root}")
    return path


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] (clamped) as uint8 0..255 on the CPU, what the pictures show."""
    return ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def video_frames(video_bcfhw: torch.Tensor, scale: int = 4, columns: int = 16) -> list[np.ndarray]:
    """[B, 3, F, H, W] in [-1, 1] -> F uint8 RGB frames of the B videos in a grid (`columns` a
    row, side by side when B <= columns), upscaled."""
    v = to_uint8(video_bcfhw)
    b, _, f, h, w = v.shape
    cols = min(b, columns)
    rows = -(-b // cols)
    if rows * cols > b:  # pad the last row with black videos
        v = torch.cat([v, v.new_zeros((rows * cols - b,) + tuple(v.shape[1:]))])
    grid = v.view(rows, cols, 3, f, h, w).permute(3, 0, 4, 1, 5, 2).reshape(f, rows * h, cols * w, 3)
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


def _comparable(history: list[dict], key: str) -> list[dict]:
    """The evaluations with per-prompt values of `key` and the last one's fingerprint (the same
    prompts, noise and sampler: a resumed run may have changed them), in order."""
    rows = [h for h in history if key in h.get("per_prompt", {})]
    return [h for h in rows if h.get("eval_key") == rows[-1].get("eval_key")] if rows else []


def _difference(before: list[float], after: list[float]) -> dict | None:
    """Paired per-prompt difference after - before over the prompts finite in both: means, the
    difference's mean and standard error (None where undefined), the prompt count; None when the
    two evaluations do not have the same prompts."""
    a = torch.tensor(before, dtype=torch.float64)
    b = torch.tensor(after, dtype=torch.float64)
    if a.shape != b.shape:
        return None
    ok = torch.isfinite(a) & torch.isfinite(b)
    d = (b - a)[ok]
    n = int(d.numel())
    se = float(d.std(unbiased=True) / n ** 0.5) if n > 1 else None
    mean = float(d.mean()) if n else None
    return {"first": float(a[ok].mean()) if n else None, "last": float(b[ok].mean()) if n else None,
            "diff": mean, "se": se, "z": mean / se if se else None, "prompts": n}  # None, not NaN: stays JSON


def _paired(history: list[dict], key: str) -> tuple[list[int], list[float], list[float]] | None:
    """(iterations, mean paired difference vs the first evaluation, its standard error) of `key`
    from the evaluations' per-prompt values; None when they are missing."""
    rows = _comparable(history, key)
    if not rows:
        return None
    its, means, ses = [], [], []
    for h in rows:
        d = _difference(rows[0]["per_prompt"][key], h["per_prompt"][key])
        if d is None or not d["prompts"]:
            continue
        its.append(int(h["iteration"]))
        means.append(d["diff"])
        ses.append(d["se"] if d["se"] is not None else float("nan"))
    return its, means, ses


def plot_history(history: list[dict], path: Path) -> Path | None:
    """PNG of the evaluations: for each reward dimension (and the manifold distance) the paired
    change against the first evaluation, mean over the evaluation prompts with a +-1 standard
    error band; evaluations without per-prompt values are drawn as plain means."""
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
    n_prompts = max((len(v) for h in history for v in h.get("per_prompt", {}).values()), default=0)

    def draw(ax, key, **style):
        paired = _paired(history, key)
        name = key.split("/", 1)[1]
        if paired is None:
            ax.plot(its, [h.get(key, float("nan")) for h in history], marker="o", label=name, **style)
            return False
        x, m, se = paired
        first = next(h[key] for h in history if key in h.get("per_prompt", {}))
        line, = ax.plot(x, m, marker="o", label=f"{name} (first {first:.3f})", **style)
        lo = [a - b for a, b in zip(m, se)]
        hi = [a + b for a, b in zip(m, se)]
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        return True

    paired_any = [draw(axes[0, 0], key) for key in reward_keys]
    what = f"paired change vs first, +-1 SE over {n_prompts} prompts" if any(paired_any) else "evaluation reward"
    axes[0, 0].axhline(0.0, color="grey", lw=0.8)
    axes[0, 0].set(xlabel="iteration", ylabel=what, title="reward dimensions (held-out prompts, ODE)")
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].grid(alpha=0.3)
    if has_dist:
        paired = draw(axes[0, 1], "eval/manifold_distance", color="tab:red")
        axes[0, 1].axhline(0.0, color="grey", lw=0.8)
        axes[0, 1].set(xlabel="iteration", ylabel=what if paired else "distance to best re-rendering",
                       title="manifold distance (lower: closer to the data)")
        axes[0, 1].legend(fontsize=8)
        axes[0, 1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_compare(before_bcfhw: torch.Tensor, after_bcfhw: torch.Tensor, prompts: list[str], path: Path, *,
                 rows: int = 8, before_label: str = "before", after_label: str = "after",
                 scores: tuple[list[float], list[float]] | None = None) -> Path:
    """PNG: one row per prompt (the first `rows`), its frames before | after, the prompt above.
    `scores`: optional (before, after) per-prompt rewards written into the row titles."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if before_bcfhw.shape != after_bcfhw.shape:
        raise ValueError(f"before and after videos must have one shape, got {tuple(before_bcfhw.shape)} and "
                         f"{tuple(after_bcfhw.shape)}")
    n = min(rows, before_bcfhw.shape[0], len(prompts))
    if n < 1:
        raise ValueError("save_compare needs at least one video and prompt")

    def strip(v):  # [3, F, H, W] -> [H, F*W + gaps, 3] uint8
        u = to_uint8(v).permute(1, 2, 3, 0)
        f, h, w, _ = u.shape
        gap = torch.full((h, 1, 3), 255, dtype=torch.uint8)
        return torch.cat([torch.cat([u[i], gap], 1) for i in range(f)], 1)

    rows_img = []
    for r in range(n):
        left, right = strip(before_bcfhw[r]), strip(after_bcfhw[r])
        gap = torch.full((left.shape[0], 6, 3), 255, dtype=torch.uint8)
        rows_img.append(torch.cat([left, gap, right], 1).numpy())
    h, w = rows_img[0].shape[:2]
    width = 9.0
    fig, axes = plt.subplots(n, 1, figsize=(width, n * (width * h / w + 0.55)), squeeze=False)
    for r in range(n):
        ax = axes[r, 0]
        ax.imshow(rows_img[r], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if scores is None:
            sub = f"left: {before_label}   right: {after_label}"
        else:
            sub = f"left: {before_label}, reward {scores[0][r]:.3f}   right: {after_label}, reward {scores[1][r]:.3f}"
        ax.set_title(f"{prompts[r]}\n{sub}", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_summary(history: list[dict], key: str = "eval/reward", guards: tuple[str, ...] = ("eval/vq", "eval/mq"),
                     z_learned: float = 5.0, z_guard: float = 2.0) -> dict:
    """Did the run learn? A paired test, last evaluation against the first, over the same
    held-out prompts and initial noise (the evaluations' per-prompt values).

    For every evaluated dimension (the reward, its parts, the manifold distance): first and last
    means, the per-prompt difference d = last - first (mean, standard error, z = mean / SE).
    Verdict: `learned` when the trained reward rises by >= `z_learned` SE and no guard (visual
    and motion quality) falls by more than `z_guard` SE. Without per-prompt values (a history
    from an older run) there is no verdict.
    """
    rows = _comparable(history, key)
    out: dict = {"evaluations": len(history)}
    if len(rows) < 2:
        out.update({"learned": None, "why": "fewer than two evaluations with per-prompt values"})
        return out
    first, last = rows[0], rows[-1]
    dims = {}
    for k in sorted(set(first["per_prompt"]) & set(last["per_prompt"])):
        d = _difference(first["per_prompt"][k], last["per_prompt"][k])
        if d is not None:
            dims[k] = d
    out.update({"first_iteration": int(first["iteration"]), "last_iteration": int(last["iteration"]),
                "prompts": dims.get(key, {}).get("prompts", 0), "trained": key, "dimensions": dims,
                "rule": f"{key} rises by >= {z_learned} paired SE and no guard {list(guards)} falls by more than "
                        f"{z_guard} paired SE (last vs first evaluation)"})
    def z_of(d):  # z, with every prompt moving by the same amount (SE 0) as +-inf or 0
        if d is None or d["diff"] is None or d["se"] is None:
            return None
        if d["z"] is not None:
            return d["z"]
        return 0.0 if d["diff"] == 0 else math.copysign(math.inf, d["diff"])

    z_trained = z_of(dims.get(key))
    if z_trained is None:
        out.update({"learned": False, "why": f"no paired values of {key}"})
        return out
    fails = []
    if not z_trained >= z_learned:
        fails.append(f"{key} z = {z_trained:.2f} < {z_learned}")
    guards_seen = [g for g in guards if any(g in h.get("per_prompt", {}) for h in history)]
    for g in guards_seen:  # a guard the task has must be measured at both ends to hold
        z = z_of(dims.get(g))
        if z is None:
            fails.append(f"guard {g} unknown (missing at the first or last evaluation)")
        elif z < -z_guard:
            fails.append(f"guard {g} z = {z:.2f} < -{z_guard}")
    trained = dims[key]
    out["learned"] = not fails
    out["why"] = "; ".join(fails) if fails else (f"{key} +{trained['diff']:.4f} +- {trained['se']:.4f} "
                                                  f"(z = {z_trained:.1f}), guards held")
    return out
