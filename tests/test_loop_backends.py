"""The training loop is the same whichever backend runs the fused SDE op.

A few tiny_world iterations with the op forced to the torch reference and to another backend
(the C++ op on the CPU; Triton on a CUDA GPU) must log the same metrics: reward, loss, policy
term, both KL terms and gradient norm, iteration after iteration. The op's own outputs are
checked against the float64 reference in test_cpp_ops.py / test_kernels_sde.py; this test sees
what reaches the loop: the rollout's samples and log-probs, the recompute, the backward and the
optimizer steps that follow from them.

Tolerance (tests/tolerance.py): the trainer's latents are float32 whatever the model does, so no
float64 run of the loop exists to measure a baseline error against; the torch backend itself is
the reference (baseline 0), which leaves the rule's float32 floor relative to the metric's size:
max(1, |ref|) as the rule takes it for the reward, the loss terms and the KL terms (kl/step is a
difference of two O(1) log-probs), and the gradient norm's own size, as tolerance.py does for the
op's gradients (they are ~1e-4 here: an absolute 2e-6 would be a 1% check). Observed gaps, CPU:
< 1e-7 absolute, gradient norm < 2e-7 relative.
"""

import sys
from pathlib import Path

import pytest
import torch
from tiny_run import TINY
from tolerance import FLOOR

from sage_fast import config as C
from sage_fast import train_config  # noqa: F401 (recipes)
from sage_fast.kernels import dispatch
from sage_fast.trainer import Trainer

ITERATIONS = 3
METRICS = ("reward/mean", "loss", "policy", "kl/anchor", "kl/step", "grad_norm")
# two updates per rollout: the second update's step KL (logp_old - logp_new) is live; the anchor
# (dual_moving, refreshed every 10 steps) differs from the policy from the second update on;
# lr 0.03 moves the policy enough for an anchor KL of ~1e-3, well above the floor
LOOP = ["grpo.kl_mode=dual_moving", "grpo.beta=0.05", "grpo.updates_per_rollout=2", "optim.lr=0.03", "run.steps=3"]


def run_loop(tmp_path, monkeypatch, backend: str, device: str) -> list[dict]:
    cfg = C.apply_overrides(C.get_recipe("tiny_world"), TINY + LOOP + [f"run.output_dir={tmp_path}/{backend}"])
    calls = {"step": 0, "logprob": 0, "logprob_backward": 0}
    with dispatch.use_backend(backend, device) as forced:
        for name in calls:
            def counted(*args, _name=name, _real=getattr(forced, name)):
                calls[_name] += 1
                return _real(*args)

            monkeypatch.setattr(forced, name, counted)
        trainer = Trainer(cfg, device=device)
        metrics = [trainer.step() for _ in range(ITERATIONS)]
    # every op of the loop ran on the forced backend: the repository root on sys.path makes
    # diffusers import this folder as a second, top-level `kernels`, whose ops route around it
    assert all(calls.values()), f"{backend}: ops not routed to the forced backend: {calls}"
    return metrics


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.gpu)])
def test_training_loop_metrics_equal_the_torch_reference_backend(tmp_path, monkeypatch, backend):
    device = "cuda" if backend == "triton" else "cpu"
    if backend == "cpp" and dispatch.cpp_extension() is None:
        pytest.skip("the C++ extension sage_fast._C is not built")
    ref = run_loop(tmp_path, monkeypatch, "torch", device)
    got = run_loop(tmp_path, monkeypatch, backend, device)
    for it, (r, g) in enumerate(zip(ref, got), start=1):
        assert g["update_skipped"] is False and r["update_skipped"] is False, it
        for key in METRICS:
            size = abs(r[key]) if key == "grad_norm" else max(1.0, abs(r[key]))
            bound = FLOOR[torch.float32] * size
            assert abs(g[key] - r[key]) <= bound, \
                f"iteration {it} {key}: {g[key]!r} vs torch {r[key]!r} (bound {bound:.1e})"
    # the compared terms are live: the policy moved, both KL terms and the gradient are non-zero
    last = ref[-1]
    assert last["kl/anchor"] > 100 * FLOOR[torch.float32] and last["kl/step"] != 0.0 and last["grad_norm"] > 0.0
    assert len({m["reward/mean"] for m in ref}) == ITERATIONS


def test_a_top_level_kernels_import_is_the_package_itself():
    """With the repository root on sys.path (python -m pytest, python -m sage_fast.train), a probe
    that imports `kernels` (transformers' package check) must get `sage_fast.kernels`, not a second
    copy that registers the ops again with its own dispatch (use_backend would then steer nothing)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = ("import sage_fast.kernels as k, kernels, transformers; import kernels.dispatch, kernels.ops; "
            "assert kernels is k and kernels.dispatch is k.dispatch and k.dispatch is "
            "__import__('sys').modules['sage_fast.kernels.dispatch'] and kernels.ops is k.ops; print('same')")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "same", out.stderr[-2000:]
