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
    env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
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


@pytest.mark.parametrize("body, code, printed", [
    ("return 3", 3, None), ("return None", 0, None), ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
    ("sys.exit('bad config')", 1, "bad config"), ("sys.exit(4)", 4, None),
    ("raise KeyboardInterrupt", 130, "KeyboardInterrupt")])
def test_exit_worker_keeps_the_exit_code_and_the_output(body, code, printed):
    """exit_worker ends the process with main's code as the interpreter would (an exception: its
    traceback and 1), with buffered stdout and log records written before it leaves."""
    script = ("import logging, sys\nfrom sage_fast.parallel import exit_worker\n"
              "logging.basicConfig(stream=sys.stdout, level=logging.INFO)\n"
              f"def main():\n    print('buffered', end='')\n    logging.info('logged')\n    {body}\n"
              "exit_worker(main)\nprint('never')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.startswith("buffered") and "logged" in proc.stdout and "never" not in proc.stdout
    if printed:
        assert printed in proc.stderr
