"""Crash consistency, proven: kill -9 a short CPU run at random moments (some inside a checkpoint
write), resume, repeat; the result must equal an uninterrupted run's bit for bit.

    python tests/crash_soak.py --kills 24 --in-save 4 --out /tmp/soak     # the long soak (docs/LOG.md)
    soak(workdir, kills=3, in_save=1)                                       # the suite's quick version

A kill "inside a save" waits until a checkpoint's temporary folder exists (that start's writer is
slowed by SAGE_FAST_CHECKPOINT_WRITE_DELAY_S so the window is wide) and then sends SIGKILL; the
others (writer at full speed) land at a uniformly random moment of the process's life (start-up, rollout, update, evaluation,
metrics or checkpoint writes). After each kill the run is started again, with `--resume` once a
checkpoint exists. Compared at the end: every tensor and value of the final checkpoint
(`state.pt`, `rng.pt`) and every metrics record except wall-clock timings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_run import TINY as _TINY  # noqa: E402

TINY = _TINY + ["run.export_final=false", "run.threads=1"]  # the tests' tiny run, without the export
SOAK = TINY + ["run.steps=12", "run.eval_every=3", "run.save_every=2", "run.keep_checkpoints=2"]
TIMING = ("time/", "samples_per_s/")


def _command(out: Path, resume: bool, extra=()) -> list[str]:
    return [sys.executable, "-m", "sage_fast.train", *SOAK, *extra, f"run.output_dir={out}",
            "--resume" if resume else "--overwrite"]


def _env(delay: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SAGE_FAST_CHECKPOINT_WRITE_DELAY_S=str(delay))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _has_checkpoint(out: Path) -> bool:
    ckpt = out / "checkpoints"
    return ckpt.exists() and any((p / "meta.json").exists() for p in ckpt.glob("step_*"))


def _saving(out: Path, pid: int) -> bool:
    """Process `pid` is writing a checkpoint (its temporary folder exists; a killed writer's stale
    folder has another pid)."""
    ckpt = out / "checkpoints"
    return ckpt.exists() and any(ckpt.glob(f".tmp-*-{pid}"))


def metrics_without_timings(out: Path) -> list[dict]:
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rows.append({k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)})
    return rows


def _equal(a, b, where="") -> list[str]:
    """Every difference between two nested checkpoint values, bitwise for tensors."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b)):
            return [where or "<root>"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b), key=str)[:4]}"]
        return [d for k in a for d in _equal(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _equal(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # NaN == NaN here
        return []
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def compare_runs(ref: Path, got: Path) -> list[str]:
    """Differences between two finished runs: final checkpoint (state, rng) and metrics."""
    diffs = []
    steps = []
    for run in (ref, got):
        latest = (run / "checkpoints" / "latest").read_text().strip()
        steps.append(run / "checkpoints" / latest)
    if steps[0].name != steps[1].name:
        diffs.append(f"final checkpoints differ: {steps[0].name} vs {steps[1].name}")
    for name in ("state.pt", "rng.pt"):
        a = torch.load(steps[0] / name, weights_only=True)
        b = torch.load(steps[1] / name, weights_only=True)
        diffs += [f"{name}{d}" for d in _equal(a, b)]
    ma, mb = metrics_without_timings(ref), metrics_without_timings(got)
    if ma != mb:
        bad = next((i for i, (x, y) in enumerate(zip(ma, mb)) if x != y), min(len(ma), len(mb)))
        diffs.append(f"metrics.jsonl differs from record {bad} ({len(ma)} vs {len(mb)} records)")
    return diffs


def soak(workdir: Path, kills: int, in_save: int, seed: int = 0, delay: float = 0.3, log=print) -> dict:
    """Run the reference, then the killed runs; returns counts, failures and differences.

    A kill's moment is uniform over (0.2 s, 0.9 x the uninterrupted run's wall time). A run that
    finishes before its planned kill closes its chain: it is compared with the reference, and the
    kills left start a new chain from scratch."""
    if in_save > kills:
        raise ValueError(f"in_save ({in_save}) cannot exceed kills ({kills})")
    workdir = Path(workdir)
    rng = random.Random(seed)
    ref = workdir / "reference"
    t0 = time.time()
    done = subprocess.run(_command(ref, resume=False), env=_env(0.0), cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    ref_seconds = time.time() - t0
    plan = ["save"] * in_save + ["random"] * (kills - in_save)
    rng.shuffle(plan)
    events, failures, diffs, chains, starts, resumes = [], [], [], 0, 0, 0
    out = workdir / f"killed_{chains}"
    while True:
        starts += 1
        resume = _has_checkpoint(out)
        resumes += resume
        mode = plan.pop() if plan else None
        # only a start meant to die inside a save has its writer slowed: the others run at full speed, so
        # their random kills fall on every phase in proportion to its time
        proc = subprocess.Popen(_command(out, resume), env=_env(delay if mode == "save" else 0.0), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed_in_save = False
        if mode == "save":
            deadline = time.time() + 120
            while proc.poll() is None and not _saving(out, proc.pid) and time.time() < deadline:
                time.sleep(0.005)
            if proc.poll() is None and _saving(out, proc.pid):
                killed_in_save = True
                proc.send_signal(signal.SIGKILL)
        elif mode == "random":
            try:
                proc.wait(timeout=rng.uniform(0.2, 0.9 * ref_seconds))
            except subprocess.TimeoutExpired:
                killed_in_save = _saving(out, proc.pid)
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        rc = proc.returncode
        if rc == -signal.SIGKILL:
            events.append({"start": starts, "mode": mode, "in_save": killed_in_save, "resumed": resume,
                           "chain": chains})
            log(f"kill {len(events)} at {time.time() - t0:.0f} s: {mode}{' (inside a save)' if killed_in_save else ''}, start {starts}, "
                f"{'resumed' if resume else 'fresh'}")
            continue
        if rc != 0:
            failures.append({"start": starts, "rc": rc, "resumed": resume, "stderr": err[-2000:]})
            log(f"start {starts} failed with exit {rc}")
            if len(failures) > 3:
                break
            continue
        # the run finished: compare this chain with the reference
        chains += 1
        diffs += [f"chain {chains}: {d}" for d in compare_runs(ref, out)]
        if mode is None and not plan:
            break
        if mode is not None:
            plan.append(mode)  # its kill did not land: spend it on the next chain
        out = workdir / f"killed_{chains}"
    return {"kills": len(events), "in_save": sum(e["in_save"] for e in events), "starts": starts,
            "chains": chains, "resumes": resumes, "failed_starts": len(failures),
            "failures": failures, "differences": diffs, "reference_seconds": round(ref_seconds, 1),
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--in-save", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/sage_fast_soak")
    args = parser.parse_args(argv)
    result = soak(Path(args.out), args.kills, args.in_save, seed=args.seed)
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=1))
    for f in result["failures"]:
        print(f"start {f['start']} exit {f['rc']}:\n{f['stderr']}")
    return 0 if not result["failures"] and not result["differences"] else 1


if __name__ == "__main__":
    sys.exit(main())
