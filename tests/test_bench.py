"""bench/run.py runs end to end and writes its result schema (tiny shapes, eager provider)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_writes_json_csv_markdown(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--device", "cpu", "--types", "sage_grpo,cps",
         "--out", str(tmp_path), "--tag", "smoke"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "smoke.json").read_text())
    env = data["environment"]
    for key in ("hardware", "torch", "commit", "command", "date", "device"):
        assert env[key], key
    assert data["copy_bandwidth_gbs"] > 0
    rows = data["rows"]
    assert {(r["sde_type"], r["op"], r["provider"]) for r in rows} == {
        (t, op, "eager") for t in ("sage_grpo", "cps") for op in ("rollout", "train")
    }
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["gbs"] > 0 and r["pct_copy"] > 0
    assert (tmp_path / "smoke.csv").read_text().startswith("size,batch,dtype,sde_type,op,provider")
    assert "| sage_grpo | rollout | eager |" in (tmp_path / "smoke.md").read_text()


def test_bench_rejects_unknown_arguments(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--types", "sde",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown SDE type 'sde'" in proc.stderr
