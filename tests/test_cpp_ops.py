"""The C++ op sage_fast._C against the torch reference, the Triton noise stream and itself.

`make test` builds the extension, so a missing extension fails here unless the install was
made without it on purpose (SAGE_FAST_NO_EXT=1), which skips.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tolerance import assert_training_op_matches_reference, assert_within_baseline

from sage_fast.grpo import schedule
from sage_fast.kernels import dispatch, pack_coefficients, philox_normal, reference

ROOT = Path(__file__).resolve().parent.parent
ALL_TYPES = list(schedule.SDE_TYPES)
LOGPROB_TYPES = ["sage_grpo", "flow_grpo", "dance_grpo", "cps"]
SHAPES = [(3, 5, 21, 7, 13), (1, 3, 5, 4, 6)]
STEPS = {3: [0, 19, 7], 1: [18]}
LP_STEPS = {3: [0, 18, 7], 1: [12]}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def ops():
    if dispatch.cpp_extension() is None:
        if os.environ.get("SAGE_FAST_NO_EXT", "0") not in ("", "0"):
            pytest.skip("installed with SAGE_FAST_NO_EXT=1: no C++ extension")
        pytest.fail("sage_fast._C is not built: `make test` must build it (see README 'Building')")
    return torch.ops.sage_fast_cpp


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(3))


def _coef(sde_type, steps, x):
    abc = schedule.step_coefficients(schedule.sigmas(20, 5.0), torch.tensor(steps), sde_type, 0.5)
    return abc, pack_coefficients(*abc, x)


@pytest.mark.parametrize("shape", SHAPES, ids=["odd3", "batch1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("sde_type", ALL_TYPES)
@pytest.mark.parametrize("given_noise", [True, False], ids=["noise", "philox"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rollout_matches_reference(ops, shape, dtype, sde_type, given_noise, reduction):
    x, v, noise = _inputs(shape, dtype)
    abc, coef = _coef(sde_type, STEPS[shape[0]], x)
    seed, offset = 2**33 + 5, 3 * x.numel()
    rng = torch.tensor([seed, offset])
    x_next, logp = ops.sde_step(x, v, coef, noise if given_noise else None, None if given_noise else rng,
                                sde_type, reduction)
    eps = noise if given_noise else philox_normal(x.numel(), seed, offset).view(shape)
    same = reference.sde_step(x, v, *abc, sde_type=sde_type, noise=eps, reduction=reduction)
    exact = reference.sde_step(x.double(), v.double(), *abc, sde_type=sde_type, noise=eps.double(),
                               reduction=reduction)
    assert x_next.dtype == dtype and logp.dtype == torch.float32
    assert_within_baseline("x_next", x_next, same[0], exact[0], dtype)
    assert_within_baseline("logp", logp, same[1], exact[1], torch.float32)
    assert torch.equal(logp[abc[2] == 0], torch.zeros(int((abc[2] == 0).sum())))


@pytest.mark.parametrize("shape", SHAPES, ids=["odd3", "batch1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("sde_type", LOGPROB_TYPES)
@pytest.mark.parametrize("with_ref", [False, True], ids=["nokl", "kl"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_training_forward_backward_matches_reference(ops, shape, dtype, sde_type, with_ref, reduction):
    batch = shape[0]
    x, v, noise = _inputs(shape, dtype, seed=1)
    abc, coef = _coef(sde_type, LP_STEPS[batch], x)
    x_next, _ = reference.sde_step(x, v, *abc, sde_type=sde_type, noise=noise)
    gen = torch.Generator().manual_seed(2)
    v_new = (v.float() + 0.01 * torch.randn(shape, generator=gen)).to(dtype)
    v_ref = (v.float() - 0.03 * torch.randn(shape, generator=gen)).to(dtype) if with_ref else None
    g_logp, g_kl = torch.linspace(-1.0, 2.0, batch), torch.linspace(0.5, -0.7, batch)

    logp, kl, grad_norm = ops.sde_logprob(x, v_new, x_next, coef, v_ref, sde_type, reduction)
    dv = ops.sde_logprob_backward(x, v_new, x_next, coef, v_ref, g_logp, g_kl, sde_type, reduction)

    assert_training_op_matches_reference((logp, kl, grad_norm, dv), x, v_new, x_next, abc, v_ref, g_logp, g_kl,
                                         sde_type, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_identical_with_one_and_two_threads_and_any_batch_split(ops, dtype):
    shape = (4, 16, 5, 30, 53)  # D = 127,200: 32 chunks and a tail, 124 work items
    x, v, noise = _inputs(shape, dtype, seed=3)
    abc, coef = _coef("sage_grpo", [0, 7, 7, 18], x)
    v_ref = (v.float() + 0.01).to(dtype)
    g = torch.tensor([1.0, -0.5, 2.0, 0.25])
    threads = torch.get_num_threads()
    outs = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x_next, logp_roll = ops.sde_step(x, v, coef, None, torch.tensor([9, 0]), "sage_grpo", "mean")
            logp, kl, norm = ops.sde_logprob(x, v, x_next, coef, v_ref, "sage_grpo", "mean")
            dv = ops.sde_logprob_backward(x, v, x_next, coef, v_ref, g, g, "sage_grpo", "mean")
            outs[n] = (x_next, logp_roll, logp, kl, norm, dv)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(outs[1], outs[2]):
        assert torch.equal(a, b)
    x_next, logp_roll, logp = outs[2][:3]
    assert torch.equal(logp_roll, logp)  # rollout == training recompute, bitwise
    d = x[0].numel()
    singles = [ops.sde_step(x[i:i + 1], v[i:i + 1], coef[:, i:i + 1].contiguous(), None, torch.tensor([9, i * d]),
                            "sage_grpo", "mean") for i in range(4)]
    assert torch.equal(torch.cat([s[0] for s in singles]), x_next)
    assert torch.equal(torch.cat([s[1] for s in singles]), logp_roll)


def test_generated_noise_equals_triton_interpreter_stream(ops):
    """C++ Philox noise vs the Triton kernel's, run under the interpreter in a subprocess."""
    shape = (2, 3, 7, 11, 13)
    seed, offset = 2**40 + 17, 2**32 - 1000
    x = torch.zeros(shape)
    coef = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    got = ops.sde_step(x, x, coef, None, torch.tensor([seed, offset]), "dance_grpo", "mean")[0]
    script = (
        "import sys, torch\n"
        "from sage_fast.kernels import sde\n"
        f"x = torch.zeros({shape})\n"
        "coef = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])\n"
        f"out = sde.sde_step_packed(x, x, coef, None, torch.tensor([{seed}, {offset}]), 'dance_grpo', 'mean')[0]\n"
        "torch.save(out, sys.argv[1])\n"
    )
    out_path = ROOT / "build" / "triton_noise.pt"
    out_path.parent.mkdir(exist_ok=True)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([os.sys.executable, "-c", script, str(out_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    triton_noise = torch.load(out_path)
    # same Philox integers; float32 log/cos of two libraries may differ by an ulp or two
    assert torch.allclose(got, triton_noise, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got, philox_normal(x.numel(), seed, offset).view(shape), rtol=1e-5, atol=1e-6)


def test_public_ops_route_cpu_tensors_to_cpp(ops):
    from sage_fast.kernels import sde_logprob, sde_step

    x, v, _ = _inputs((2, 3, 4, 5, 6), torch.bfloat16)
    abc, coef = _coef("flow_grpo", [3, 9], x)
    with dispatch.use_backend("cpp"):
        x_next, logp = sde_step(x, v, *abc, sde_type="flow_grpo", seed=4)
        vv = v.clone().requires_grad_()
        lp, kl, _ = sde_logprob(x, vv, x_next, *abc, sde_type="flow_grpo", v_ref=v)
        (lp.sum() + kl.sum()).backward()
    direct = ops.sde_step(x, v, coef, None, torch.tensor([4, 0]), "flow_grpo", "mean")
    assert torch.equal(x_next, direct[0]) and torch.equal(logp, direct[1]) and torch.equal(lp, logp)
    want = ops.sde_logprob_backward(x, v, x_next, coef, v, torch.ones(2), torch.ones(2), "flow_grpo", "mean")
    assert torch.equal(vv.grad, want)


def test_cpp_op_rejects_bad_input(ops):
    x, v, noise = _inputs((2, 2, 3, 4, 5), torch.float32)
    _, coef = _coef("cps", [1, 2], x)
    with pytest.raises(RuntimeError, match="coef must be a contiguous float32"):
        ops.sde_step(x, v, coef.double(), noise, None, "cps", "mean")
    with pytest.raises(RuntimeError, match="the C\\+\\+ op takes float32, bfloat16 or float16"):
        ops.sde_step(x.double(), v.double(), coef, noise.double(), None, "cps", "mean")
    with pytest.raises(RuntimeError, match="sde_type must be one of"):
        ops.sde_step(x, v, coef, noise, None, "sde", "mean")
    with pytest.raises(RuntimeError, match="rng must be an int64 CPU tensor"):
        ops.sde_step(x, v, coef, None, None, "cps", "mean")
    with pytest.raises(RuntimeError, match="v must have x's shape"):
        ops.sde_logprob(x, v[:1], x, coef, None, "cps", "mean")


NVCC = shutil.which("nvcc")


def _cuda_include():
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    if NVCC:
        candidates.append(str(Path(NVCC).resolve().parent.parent))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


CUDA_INCLUDE = _cuda_include()


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
def test_cuda_twin_compiles_without_a_gpu(tmp_path):
    """compile-only: the CUDA twin's kernels build for sm_90 with this machine's nvcc, and its
    torch glue passes the host compiler against the installed torch's headers."""
    proc = subprocess.run([NVCC, "-std=c++20", "-O3", "--fmad=false", "-arch=sm_90", "-I", str(ROOT / "csrc"), "-c",
                           str(ROOT / "csrc" / "cuda" / "sde_kernels.cu"), "-o", str(tmp_path / "sde_kernels.o")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "sde_kernels.o").stat().st_size > 0
    torch_include = Path(torch.__file__).parent / "include"
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None or CUDA_INCLUDE is None:
        pytest.skip("no host C++ compiler or no CUDA headers for the glue's syntax check")
    # A CPU torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h; its content only
    # matters for linking, so the syntax check tells c10 not to look for it.
    proc = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type",
                           "-DC10_USING_CUSTOM_GENERATED_MACROS", "-I", str(torch_include),
                           "-I", str(torch_include / "torch" / "csrc" / "api" / "include"), "-I", str(CUDA_INCLUDE),
                           "-I", str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda" / "sde_cuda.cpp")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("sde_type", ["sage_grpo", "cps"])
def test_cuda_twin_matches_triton_and_reference(ops, sde_type):
    if not dispatch._cpp_has_cuda():
        pytest.skip("sage_fast._C was built without its CUDA twin")
    from sage_fast.kernels import sde

    shape = (3, 32, 21, 30, 53)
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(shape, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    abc, coef = _coef(sde_type, [0, 9, 18], x)
    rng = torch.tensor([7, 0], device="cuda")
    for given in (noise, None):
        twin = ops.sde_step(x, v, coef, given, None if given is not None else rng, sde_type, "mean")
        fused = sde.sde_step_packed(x, v, coef, given, None if given is not None else rng, sde_type, "mean")
        eps = given if given is not None else philox_normal(x.numel(), 7, 0, "cuda").view(shape)
        same = reference.sde_step(x, v, *abc, sde_type=sde_type, noise=eps)
        exact = reference.sde_step(x.double(), v.double(), *abc, sde_type=sde_type, noise=eps.double())
        for got in (twin, fused):
            assert_within_baseline("x_next", got[0], same[0], exact[0], torch.bfloat16)
            assert_within_baseline("logp", got[1], same[1], exact[1], torch.float32)
    x_next = twin[0]
    v_ref = (v.float() + 0.01).to(torch.bfloat16)
    lp, kl, norm = ops.sde_logprob(x, v, x_next, coef, v_ref, sde_type, "mean")
    assert torch.equal(lp, twin[1])  # the twin's rollout == its recompute, bitwise
    ones = torch.ones(3, device="cuda")
    dv = ops.sde_logprob_backward(x, v, x_next, coef, v_ref, ones, ones, sde_type, "mean")
    assert_training_op_matches_reference((lp, kl, norm, dv), x, v, x_next, abc, v_ref, ones, ones, sde_type, "mean")
