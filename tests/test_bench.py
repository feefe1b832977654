"""The benchmarks in bench/: the shared harness (timing routine, result schema), and run.py,
rollout.py and attention.py end to end at their smallest sizes on CPU, one schema for all three."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402  (bench/harness.py)

from sage_fast.provenance import commit_label  # noqa: E402

# the smallest run of each script (seconds on CPU); the run.py one is what `--quick` is for
SMOKE = {
    "run": ["--quick", "--device", "cpu", "--types", "sage_grpo,cps", "--tag", "smoke"],
    "rollout": ["--device", "cpu", "--batch", "2", "--steps", "2", "--repeats", "2"],
    "attention": ["--arch", "tiny", "--device", "cpu", "--latent", "2", "2", "2", "--text-len", "4", "--text2-len", "4",
                  "--warmup", "1", "--iters", "2", "--backends", "fa2", "sdpa"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """bench name -> (its results file as written, that file's folder)."""
    out = {}
    for name, args in SMOKE.items():
        folder = tmp_path_factory.mktemp(name)
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args, "--out", str(folder)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        (path,) = folder.glob("*.json")
        out[name] = (json.loads(path.read_text()), folder)
    return out


def test_time_fn_counts_calls_and_times_each():
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.002)

    times = harness.time_fn(fn, torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7 and len(times) == 5
    assert all(0.002 <= t < 1.0 for t in times)  # sleep(2 ms) sleeps at least 2 ms
    stats = harness.timing_stats(times)
    assert list(stats) == ["median_ms", "min_ms", "max_ms"]
    assert 2.0 <= stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]


def test_timing_stats_in_milliseconds_and_repeats_checked():
    assert harness.timing_stats([0.003, 0.001, 0.002]) == pytest.approx(dict(median_ms=2.0, min_ms=1.0, max_ms=3.0))
    with pytest.raises(ValueError, match="repeats"):
        harness.time_fn(lambda: None, torch.device("cpu"), warmup=0, repeats=0)


def test_every_bench_writes_one_schema(results):
    env_keys = set(harness.environment(torch.device("cpu")))
    for name, (data, _) in results.items():
        assert list(data) == ["schema", "bench", "environment", "setup", "rows"], name
        assert data["schema"] == harness.SCHEMA and data["bench"] == name
        assert set(data["environment"]) == env_keys, name
        for key in ("device", "hardware", "torch", "commit", "command", "date"):
            assert data["environment"][key], (name, key)
        assert data["environment"]["device"] == "cpu"
        assert data["setup"]["warmup"] >= 1 and data["setup"]["repeats"] >= 1, name
        rows = data["rows"]
        assert rows and all(list(r) == list(rows[0]) for r in rows), name
        timed = [r for r in rows if r["median_ms"] is not None]
        assert timed, name
        for r in timed:
            assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"], name
        assert harness.read_results(next(results[name][1].glob("*.json"))) == data


def test_rollout_and_attention_rows(results):
    (rollout,) = results["rollout"][0]["rows"]
    assert rollout["mode"] == "eager" and rollout["speedup_vs_eager"] == 1.0 and rollout["samples_per_s"] > 0
    assert results["rollout"][0]["setup"]["shape"] == [2, 48, 9, 8, 8]
    fa2, sdpa = results["attention"][0]["rows"]
    assert fa2["backend"] == "fa2" and "CUDA" in fa2["skipped"] and fa2["median_ms"] is None
    assert sdpa["skipped"] is None and sdpa["tflops"] > 0
    assert results["attention"][0]["setup"]["flops_per_forward"] > 0


def test_bench_quick_writes_json_csv_markdown(results):
    data, folder = results["run"]
    assert data["setup"]["copy_bandwidth_gbs"] > 0
    rows = data["rows"]
    assert {(r["sde_type"], r["op"], r["provider"]) for r in rows} == {
        (t, op, "eager") for t in ("sage_grpo", "cps") for op in ("rollout", "train")
    }
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["gbs"] > 0 and r["pct_copy"] > 0
    assert (folder / "smoke.csv").read_text().startswith("size,batch,dtype,sde_type,op,provider")
    assert "| sage_grpo | rollout | eager |" in (folder / "smoke.md").read_text()


def test_committed_results_read_in_the_current_schema(results, tmp_path):
    committed = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert committed
    new_row_keys = list(results["run"][0]["rows"][0])
    for path in committed:
        data = harness.read_results(path)
        assert data["bench"] == "run" and data["setup"]["copy_bandwidth_gbs"] > 0, path
        assert set(data["environment"]) == set(results["run"][0]["environment"]), path
        assert all(list(r) == new_row_keys for r in data["rows"]), path
    old_attention = tmp_path / "attention.json"  # schema 1 of attention.py: never committed, not read
    old_attention.write_text(json.dumps({"meta": {"arch": "tiny"}, "results": []}))
    with pytest.raises(ValueError, match="not a bench results file"):
        harness.read_results(old_attention)


def test_commit_label_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("SAGE_FAST_COMMIT", raising=False)
    assert commit_label(tmp_path) == "unknown"
    monkeypatch.setenv("SAGE_FAST_COMMIT", "4606992")
    assert commit_label(tmp_path) == "4606992"


def test_bench_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--types", "sde",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown SDE type 'sde'" in proc.stderr
