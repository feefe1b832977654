"""The one timing routine and the one result schema of the benchmarks in bench/ (run.py, rollout.py,
attention.py); what each of them measures stays in the script.

    from harness import environment, time_fn, timing_stats, write_json
    times = time_fn(fn, device, warmup=2, repeats=7)             # seconds per call, one sample a call
    row = dict(provider="eager", **timing_stats(times))          # + median_ms, min_ms, max_ms
    write_json(path, "run", environment(device), setup, rows)    # the schema below
    read_results(path)                                           # a results file of either schema

Timing: `warmup` untimed calls, a device synchronisation, then `repeats` timed calls. On CUDA a
sample is the time between two CUDA events recorded on the current stream around the call, and
the device is synchronised after each call, so no call's queued work lands in the next sample
(events, not the host clock: a step op runs for microseconds, about what one host-side
synchronisation costs). On CPU a sample is time.perf_counter around the call.

Result schema (JSON), schema 2:

    {"schema": 2,
     "bench": "run" | "rollout" | "attention",       the script that wrote the file
     "environment": {device, hardware, torch, triton, cuda, python, commit, command, date},
     "setup": {...},                                  the script's settings (warmup, repeats, shapes)
                                                      and its whole-run measurements (run.py: the
                                                      copy bandwidth; attention.py: the FLOP count
                                                      and the matmul peak)
     "rows": [{...}, ...]}                            one a measurement, every row with the same keys;
                                                      timings as median_ms, min_ms, max_ms

commit is sage_fast.provenance.commit_label() (short sha, "-dirty" with uncommitted changes).
Files written before this module (schema 1, no "schema" key) differ: run.py's had
`copy_bandwidth_gbs` at the top (now in setup) and otherwise the same environment and rows;
rollout.py's were {hardware, torch, batch, steps, shape, results: {mode: {median_s, ...}}};
attention.py's were {meta, results} with the full sha and seconds, a skipped backend a row of
its own keys. read_results() returns a schema-1 run.py file (those committed in bench/results/)
in schema 2's shape; the other two were never committed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sage_fast.provenance import commit_label, cpu_name

__all__ = ["SCHEMA", "synchronize", "time_fn", "timing_stats", "environment", "write_json", "read_results"]

SCHEMA = 2
BENCHES = ("run", "rollout", "attention")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of fn(), `repeats` samples after `warmup` untimed calls (see the module doc)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def timing_stats(times: list[float]) -> dict:
    """The row keys of a timing, in milliseconds: median_ms, min_ms, max_ms."""
    return dict(median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3)


def environment(device: torch.device) -> dict:
    """The machine and provenance header of a results file: hardware, versions, commit, command, date."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = cpu_name()
        hardware += f", {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
    try:
        import triton  # noqa: PLC0415 - optional: absent on some CPU installs

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=str(device), hardware=hardware, torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda, python=platform.python_version(), commit=commit_label(),
                command=" ".join([Path(sys.executable).name] + sys.argv),
                date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_json(path: Path, bench: str, env: dict, setup: dict, rows: list[dict]) -> Path:
    """Write one results file of the schema above; every row must have the same keys."""
    assert bench in BENCHES, bench
    assert rows and all(list(r) == list(rows[0]) for r in rows), "rows with different keys"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(schema=SCHEMA, bench=bench, environment=env, setup=setup, rows=rows), indent=1))
    return path


def read_results(path: Path) -> dict:
    """A results file in schema 2's shape: schema 2 as written, schema-1 bench/run.py files converted."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") == SCHEMA:
        return data
    if "schema" not in data and {"environment", "copy_bandwidth_gbs", "rows"} <= set(data):
        return dict(schema=SCHEMA, bench="run", environment=data["environment"],
                    setup=dict(copy_bandwidth_gbs=data["copy_bandwidth_gbs"]), rows=data["rows"])
    raise ValueError(f"{path}: not a bench results file this module reads (schema {data.get('schema', 1)}, "
                     f"keys {sorted(data)})")
