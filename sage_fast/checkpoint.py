"""Exact, atomic checkpoints of a training run.

Owns: the on-disk layout and its crash safety, and capturing/restoring RNG states.

    RUN/checkpoints/step_00000120/state.pt   everything to resume: policy, optimizer, anchor,
                                             equalizer, KL controller, data position, ...
                                  rng.pt     RNG states of every rank (python, numpy, torch CPU/CUDA)
                                  meta.json  written last: its presence marks a complete checkpoint
    RUN/checkpoints/latest                   the name of the newest complete checkpoint

A checkpoint is written into a temporary folder, flushed to disk, then renamed into place, and
`latest` is replaced atomically afterwards, so a crash at any moment leaves the previous
checkpoint intact and `latest` pointing at a complete one (POSIX rename is atomic within a
file system). Loading uses `torch.load(weights_only=True)`: a checkpoint holds tensors and
plain Python values only, never pickled code.

Leaves to others: what goes into the state (the trainer), gathering sharded (FSDP) state and
other ranks' RNG states to the writer (the trainer, before `save`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["CheckpointManager", "capture_rng_state", "restore_rng_state"]

_PREFIX = "step_"


def capture_rng_state() -> dict:
    """This process's RNG states as tensors and plain values (safe for weights_only loading)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class CheckpointManager:
    """Writes and finds checkpoints under `run_dir/checkpoints` (call `save` on one rank)."""

    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints kept on disk), got {keep}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def _name(self, step: int) -> str:
        return f"{_PREFIX}{step:08d}"

    def save(self, step: int, state: dict, rng_states: list[dict] | None = None, meta: dict | None = None) -> Path:
        """Write checkpoint `step` atomically and point `latest` at it; returns its folder.

        state: tensors / plain values (model, optimizer, anchor, equalizer, KL, data position).
        rng_states: one `capture_rng_state()` per rank, in rank order.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / self._name(step)
        tmp = self.dir / f".tmp-{self._name(step)}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _save_file(state, tmp / "state.pt")
        _save_file(rng_states or [], tmp / "rng.pt")
        with open(tmp / "meta.json", "w") as f:
            json.dump({"step": step, "time": time.time(), **(meta or {})}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace the old copy
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest_tmp = self.dir / f".latest-{os.getpid()}"
        latest_tmp.write_text(final.name)
        with open(latest_tmp) as f:
            os.fsync(f.fileno())
        os.replace(latest_tmp, self.dir / "latest")
        _fsync_dir(self.dir)
        self._prune(keep_name=final.name)
        return final

    def _complete(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted(p for p in self.dir.iterdir()
                      if p.is_dir() and p.name.startswith(_PREFIX) and (p / "meta.json").exists())

    def by_step(self) -> dict[int, Path]:
        """The complete checkpoints by the step their meta.json names, ascending."""
        found = {int(json.loads((p / "meta.json").read_text())["step"]): p for p in self._complete()}
        return dict(sorted(found.items()))

    def _prune(self, keep_name: str) -> None:
        for stale in self.dir.glob(".tmp-*"):  # leftovers of crashed writers
            shutil.rmtree(stale, ignore_errors=True)
        complete = self._complete()
        for old in complete[:-self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: `latest` if it names one, else the newest on disk."""
        pointer = self.dir / "latest"
        if pointer.exists():
            candidate = self.dir / pointer.read_text().strip()
            if (candidate / "meta.json").exists():
                return candidate
        complete = self._complete()
        return complete[-1] if complete else None

    def load(self, path: Path | None = None, map_location="cpu") -> tuple[int, dict, list[dict]] | None:
        """(step, state, rng_states) of `path` or of the latest checkpoint; None if there is none."""
        path = path or self.latest()
        if path is None:
            return None
        meta = json.loads((path / "meta.json").read_text())
        state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
        return int(meta["step"]), state, rng
