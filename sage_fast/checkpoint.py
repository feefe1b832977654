"""Exact, atomic, verified checkpoints of a training run.

Owns: the on-disk layout and its crash safety, verification at load, and capturing/restoring
RNG states.

    RUN/checkpoints/step_00000120/state.pt   everything to resume: policy, optimizer, anchor,
                                             equalizer, KL controller, iteration, skip counts,
                                             evaluation history (the data follow from the seeds)
                                  rng.pt     RNG states of every rank (python, numpy, torch CPU/CUDA)
                                  meta.json  written last: its presence marks a complete checkpoint;
                                             it holds the size and SHA-256 of every other file
    RUN/checkpoints/latest                   the name of the newest complete checkpoint

Writing: into a temporary folder, flushed to disk, then renamed into place; `latest` is
replaced atomically afterwards. A crash at any moment (kill -9 included) leaves the previous
checkpoint intact and `latest` naming a complete one (POSIX rename is atomic within a file
system). A save that fails (disk full, unwritable folder) removes its temporary folder and
raises `CheckpointSaveError`; `latest` is untouched. Re-saving a step moves the old copy aside
(one rename) before deleting it, so no half-deleted folder ever looks complete.

Loading: `load()` verifies a checkpoint before reading it (meta.json parses, every file is
there with its recorded size and hash, the tensors load). With `fallback=True` (the default) a
bad latest checkpoint is reported, naming the file and the fault, and the newest older one that
verifies is used; never a silent partial load. `torch.load(weights_only=True)`: a checkpoint
holds tensors and plain Python values only, never pickled code.

For the crash-consistency soak: `SAGE_FAST_CHECKPOINT_WRITE_DELAY_S` (seconds, default 0) sleeps
after each file written into the temporary folder, so that a kill lands inside a save on purpose.

The state's parts are registered by their owners (`register(name, get, put)`: the trainer
registers the policy, optimizer, equalizer, KL controller, anchor and its own progress).

With several ranks, `save_on_ranks` and `resume` are called by every rank: rank 0 writes, every
rank learns whether it could, and each rank restores its own RNG states.

Leaves to others: what each part holds and how it is gathered from shards (its owner).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["CheckpointManager", "CheckpointError", "CheckpointSaveError", "capture_rng_state", "restore_rng_state",
           "seed_process_rngs", "file_digest"]

log = logging.getLogger("sage_fast.checkpoint")

_PREFIX = "step_"
_FILES = ("state.pt", "rng.pt")
_DELAY_ENV = "SAGE_FAST_CHECKPOINT_WRITE_DELAY_S"


class CheckpointError(ValueError):
    """A checkpoint on disk is incomplete, corrupt or does not fit the run (the message names the file)."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the previous one and `latest` are intact."""


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


def seed_process_rngs(seed: int) -> None:
    """Seed python's, numpy's and torch's process-wide generators (CUDA's too) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**63)


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


def _save_file(obj, path: Path) -> dict:
    """Write `obj` with torch.save, flushed to disk; returns its {"bytes", "sha256"}."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    record = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    return record


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class CheckpointManager:
    """Writes and finds checkpoints under `run_dir/checkpoints` (call `save` on one rank)."""

    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints kept on disk), got {keep}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.last_loaded: Path | None = None  # the folder the last successful load() read
        self._parts: dict[str, tuple] = {}

    def register(self, name: str, get, put) -> None:
        """A part of the training state: `get()` returns it, `put(value)` restores it. `state()`
        holds every part under its name; `restore()` puts them back in registration order."""
        if name in self._parts:
            raise ValueError(f"checkpoint part {name!r} registered twice")
        self._parts[name] = (get, put)

    def state(self) -> dict:
        """The registered parts' current values (what `save` writes as state.pt)."""
        return {name: get() for name, (get, _) in self._parts.items()}

    def restore(self, state: dict) -> None:
        """Put every registered part back from `state` (a KeyError names a missing part)."""
        for name, (_, put) in self._parts.items():
            put(state[name])

    def save_on_ranks(self, step: int, ranks, *, collective: bool = False, meta: dict | None = None) -> Path:
        """Every rank calls it: the registered state (built on every rank when `collective`, e.g.
        gathering FSDP2 shards; else on rank 0) and every rank's RNG states, written by rank 0.
        ranks: all ranks (`parallel.DataAxis`). Raises CheckpointSaveError on every rank when rank 0
        could not write; the previous checkpoint stays the latest."""
        rng = capture_rng_state()
        state = self.state() if (collective or ranks.rank == 0) else None
        rngs = ranks.gather_objects(rng)
        error, path = None, self.dir / self._name(step)
        if ranks.rank == 0:
            try:
                path = self.save(step, state, rngs, meta=meta)
            except CheckpointSaveError as err:
                error = err
        if ranks.any(error is not None):  # every rank learns that rank 0's write failed
            raise error or CheckpointSaveError(f"checkpoint {path} not written on rank 0 (see its log)")
        return path

    def resume(self, ranks, *, map_location="cpu", fallback: bool = True) -> bool:
        """Restore the registered parts and this rank's RNG states from the latest good checkpoint
        (`fallback`: skipping corrupt ones); False when there is none. A checkpoint that does not
        fit the registered parts raises CheckpointError naming its state.pt."""
        loaded = self.load(map_location=map_location, fallback=fallback)
        if loaded is None:
            return False
        _, state, rngs = loaded
        try:
            self.restore(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{self.last_loaded / 'state.pt'} does not fit this run's model and config "
                                  f"({type(err).__name__}: {err}); resume with the config it was written with "
                                  "(the run folder's config.json)") from err
        if len(rngs) == ranks.size:
            restore_rng_state(rngs[ranks.rank])
        return True

    def _name(self, step: int) -> str:
        return f"{_PREFIX}{step:08d}"

    def save(self, step: int, state: dict, rng_states: list[dict] | None = None, meta: dict | None = None) -> Path:
        """Write checkpoint `step` atomically and point `latest` at it; returns its folder.

        state: tensors / plain values (model, optimizer, anchor, equalizer, KL, data position).
        rng_states: one `capture_rng_state()` per rank, in rank order.
        Raises CheckpointSaveError (the previous checkpoint and `latest` intact) if writing fails.
        """
        final = self.dir / self._name(step)
        tmp = self.dir / f".tmp-{self._name(step)}-{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            files = {"state.pt": _save_file(state, tmp / "state.pt"),
                     "rng.pt": _save_file(rng_states or [], tmp / "rng.pt")}
            with open(tmp / "meta.json", "w") as f:
                json.dump({"step": step, "time": time.time(), **(meta or {}), "files": files}, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSaveError(f"checkpoint {final} not written ({type(err).__name__}: {err}); the previous "
                                      f"checkpoint and {self.dir / 'latest'} are unchanged") from err
        if final.exists():  # re-saving a step (e.g. after a resume): move the old copy aside in one rename
            trash = self.dir / f".trash-{final.name}-{os.getpid()}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        latest_tmp = self.dir / f".latest-{os.getpid()}"
        try:
            latest_tmp.write_text(final.name)
            with open(latest_tmp) as f:
                os.fsync(f.fileno())
            os.replace(latest_tmp, self.dir / "latest")
            _fsync_dir(self.dir)
        except OSError as err:  # the checkpoint is complete; `latest` still names the previous one
            latest_tmp.unlink(missing_ok=True)
            raise CheckpointSaveError(f"checkpoint {final} written but {self.dir / 'latest'} not updated "
                                      f"({type(err).__name__}: {err})") from err
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

    def pick(self, step: int | None) -> tuple[int, Path]:
        """(iteration, folder) of the complete checkpoint of iteration `step`, or of the latest
        (None); ValueError naming the run and the iterations on disk otherwise."""
        run, available = self.dir.parent, self.by_step()
        if not available:
            raise ValueError(f"run {run} has no checkpoint ({self.dir} holds no complete step_* folder; the trainer "
                             "writes one every run.save_every iterations and at the last)")
        if step is None:  # the `latest` pointer, else the newest on disk (by_step's own when two share a step)
            latest = self.latest()
            return next(((it, path) for it, path in available.items() if path.name == latest.name),
                        list(available.items())[-1])
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0 (a checkpoint's iteration) or None (the latest), got {step!r}")
        if step not in available:
            raise ValueError(f"step {step} is not a checkpoint of run {run}: available iterations {list(available)} "
                             "(run.keep_checkpoints keeps only the newest)")
        return step, available[step]

    def _prune(self, keep_name: str) -> None:
        for pattern in (".tmp-*", ".trash-*"):  # leftovers of crashed writers
            for stale in self.dir.glob(pattern):
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

    def verify(self, path: Path) -> dict:
        """meta.json of `path` if every file is there with its recorded size and SHA-256; raises
        CheckpointError naming the first bad file otherwise. Checkpoints written before hashes
        were recorded are checked for presence only."""
        meta_path = Path(path) / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
            int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{meta_path}: missing or unreadable ({type(err).__name__}: {err})") from err
        records = meta.get("files") or {name: None for name in _FILES}
        for name, record in records.items():
            file = Path(path) / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing")
            if record is None:
                continue
            size = file.stat().st_size
            if size != record["bytes"]:
                raise CheckpointError(f"{file}: {size} bytes, meta.json records {record['bytes']} (truncated?)")
            if file_digest(file) != record["sha256"]:
                raise CheckpointError(f"{file}: SHA-256 does not match meta.json (corrupted)")
        return meta

    def _read(self, path: Path, map_location) -> tuple[int, dict, list[dict]]:
        meta = self.verify(path)
        loaded = []
        for name, where in (("state.pt", map_location), ("rng.pt", "cpu")):
            try:
                loaded.append(torch.load(path / name, map_location=where, weights_only=True))
            except Exception as err:  # noqa: BLE001 - any unreadable file is a bad checkpoint
                raise CheckpointError(f"{path / name}: cannot be loaded ({type(err).__name__}: {err})") from err
        self.last_loaded = Path(path)
        return int(meta["step"]), loaded[0], loaded[1]

    def load(self, path: Path | None = None, map_location="cpu",
             fallback: bool = True) -> tuple[int, dict, list[dict]] | None:
        """(step, state, rng_states) of `path`, or of the latest checkpoint; None if there is none.

        The checkpoint is verified first (see `verify`). A bad explicit `path` raises
        CheckpointError. A bad latest checkpoint raises too unless `fallback`: then the newest
        older checkpoint that verifies is loaded, with a warning naming what was wrong."""
        if path is not None:
            return self._read(Path(path), map_location)
        first = self.latest()
        if first is None:
            return None
        candidates = [first] + [p for p in reversed(self._complete()) if p != first and p.name < first.name]
        faults = []
        for candidate in candidates:
            try:
                loaded = self._read(candidate, map_location)
            except CheckpointError as err:
                if not fallback:
                    raise CheckpointError(f"{err} (run.resume_fallback=false: not falling back to an older "
                                          "checkpoint)") from err
                faults.append(str(err))
                log.warning("checkpoint %s is unusable: %s", candidate.name, err)
                continue
            if faults:
                log.warning("resuming from the older checkpoint %s instead", candidate.name)
            return loaded
        raise CheckpointError("no usable checkpoint in " + str(self.dir) + ": " + "; ".join(faults))
