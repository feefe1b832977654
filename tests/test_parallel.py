"""Distribution on 2 CPU ranks (gloo), run by torchrun in a subprocess:

- Ulysses sp=2 == one process: the CFG velocity (mixed timesteps, text padding) and every
  parameter gradient, tiny model, 21 latent frames x 3 x 5 = 315 video tokens (odd: padded to
  316), activation checkpointing on;
- FSDP2 over dp=2 == one process for one SGD step (every gradient and parameter);
- FSDP2 over the flattened (dp=1, sp=2) mesh with Ulysses == one process for one SGD step.

The checks themselves live in tests/dist/equivalence.py (float64 oracle, STYLE rule-5 bound).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist" / "equivalence.py"


def _torchrun(*modes, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), *modes]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.dist
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_ranks_sequence_parallel_and_fsdp2_equal_one_process():
    modes = ("sp", "fsdp", "fsdp_sp")
    proc = _torchrun(*modes)
    report = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                       if "OK" in line or "FAIL" in line or "err" in line or "Error" in line)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{report or proc.stderr[-4000:]}"
    for mode in modes:
        assert f"OK {mode}:" in proc.stdout, f"no OK line for {mode}:\n{proc.stdout[-2000:]}"
