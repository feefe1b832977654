"""What a run records: per-phase timers, per-timestep statistics, the reduction of an
iteration's numbers over the data-parallel ranks, JSONL and TensorBoard.

Owns the formats: `metrics.jsonl` holds one JSON object per iteration (and per evaluation, with
`"kind": "eval"`), flat `section/name` keys plus a `per_step` table {name: {step: mean}};
TensorBoard gets the same scalars (per-step tables as `per_step/<name>/<step>`). Only rank 0
writes. On resume, lines of iterations after the checkpoint are dropped (they will be redone).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

__all__ = ["PhaseTimer", "PerStepStats", "LossTotals", "reward_metrics", "loss_metrics", "timing_metrics",
           "MetricsWriter"]

log = logging.getLogger("sage_fast.metrics")


class PhaseTimer:
    """`with timer("rollout"): ...` accumulates wall seconds per phase (CUDA synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, name: str):
        return _Phase(self, name)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self):
        self.timer._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timer._sync()
        self.timer.seconds[self.name] += time.perf_counter() - self.start
        return False


class PerStepStats:
    """Means of named per-pair quantities grouped by the pair's step index."""

    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(num_steps, dtype=torch.float64)

    def add(self, step_t: torch.Tensor, **values: torch.Tensor) -> None:
        idx = step_t.detach().cpu().long()
        self.counts.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
        for name, value in values.items():
            total = self.sums.setdefault(name, torch.zeros(self.num_steps, dtype=torch.float64))
            total.index_add_(0, idx, value.detach().cpu().double().reshape(-1))

    def summary(self) -> dict[str, dict[int, float]]:
        seen = self.counts > 0
        return {name: {int(t): float(total[t] / self.counts[t]) for t in torch.nonzero(seen).flatten().tolist()}
                for name, total in self.sums.items()}


class LossTotals:
    """Pair-weighted means of one training pass's loss terms (over its valid pairs)."""

    KEYS = ("loss", "policy", "kl_anchor", "kl_step")

    def __init__(self) -> None:
        self.sums = {k: 0.0 for k in self.KEYS + ("clip_frac",)}
        self.pairs = 0

    def add(self, terms, valid: torch.Tensor) -> None:
        """terms: a micro-batch's `LossTerms`; valid: [M] bool, the pairs that entered its loss."""
        n = int(valid.sum())
        self.pairs += n
        for key in self.KEYS:
            self.sums[key] += float(getattr(terms, key).detach()) * n
        self.sums["clip_frac"] += float((terms.clipped_b & valid).sum())

    def mean(self) -> dict[str, float]:
        count = max(self.pairs, 1)
        return {k: v / count for k, v in self.sums.items()}

    def mean_over(self, axis, key: str) -> float:
        """`key`'s mean over the valid pairs of every rank of `axis` (`parallel.DataAxis`)."""
        if axis.size == 1:
            return self.mean()[key]
        t = axis.all_reduce(torch.tensor([self.sums[key], float(self.pairs)], dtype=torch.float64))
        return float(t[0] / t[1].clamp(min=1))


def reward_metrics(reward, axis) -> dict:
    """A batch's reward over the data axis (`parallel.DataAxis`): the mean of the finite totals,
    each dimension's mean over its finite scores, and the failed / timed-out sample counts."""
    total = reward.total_b
    finite = torch.isfinite(total)
    sums = torch.tensor([float(total[finite].sum()), float(finite.sum()), float((~finite).sum()),
                         float(total.numel() if reward.timed_out else 0)], dtype=torch.float64)
    axis.all_reduce(sums)
    # a rank whose reward failed has no dimensions: agree on the union first
    names = sorted(set().union(*axis.gather_objects(sorted(reward.scores))))
    dims = {}
    for name in names:
        score = reward.scores.get(name, torch.empty(0))
        ok = torch.isfinite(score)
        s = axis.all_reduce(torch.tensor([float(score[ok].sum()), float(ok.sum())], dtype=torch.float64))
        dims[f"reward/{name}"] = float(s[0] / s[1].clamp(min=1))
    return {"reward/mean": float(sums[0] / sums[1].clamp(min=1)), **dims, "reward/failed": int(sums[2]),
            "reward/timed_out": int(sums[3])}


def loss_metrics(mean: dict[str, float] | None) -> dict:
    """The last training pass's `LossTotals.mean()`; None (no update this iteration): zeros."""
    m = mean or dict.fromkeys(LossTotals.KEYS + ("clip_frac",), 0.0)
    return {"loss": m["loss"], "policy": m["policy"], "kl/anchor": m["kl_anchor"], "kl/step": m["kl_step"],
            "clip_frac": m["clip_frac"]}


def timing_metrics(timer: PhaseTimer, samples: int) -> dict:
    """Seconds per phase, their total, and the global batch's samples per second of the main phases."""
    out = {f"time/{k}": v for k, v in timer.seconds.items()}
    out["time/total"] = sum(timer.seconds.values())
    for phase in ("rollout", "reward", "train"):
        if timer.seconds.get(phase):
            out[f"samples_per_s/{phase}"] = samples / timer.seconds[phase]
    return out


def _flatten(record: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float, bool)):
            flat[name] = float(value)
    return flat


class MetricsWriter:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
            except ImportError as err:
                log.warning("TensorBoard logging off: %s (pip install tensorboard)", err)
            else:
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, iteration: int) -> None:
        """Drop records of iterations > `iteration` (they are redone after a resume)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:  # a line torn by a kill mid-write: it belongs to an iteration that is redone
                log.warning("metrics.jsonl: dropping a partial line (%d characters) written before a crash", len(line))
                continue
            if record is not None and record.get("iteration", 0) <= iteration:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")  # atomic: a kill now must not lose the file
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("iteration", 0))
            for name, value in _flatten(record).items():
                if name != "iteration":
                    self.tb.add_scalar(f"{kind}/{name}" if kind != "train" else name, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

