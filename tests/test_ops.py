"""Public ops: registration (opcheck, compile, CUDA graphs), backend dispatch, bad input."""

import logging

import pytest
import torch
from conftest import KERNEL_DEVICE
from tolerance import assert_within_baseline

import sage_fast.kernels as K
from sage_fast.grpo import schedule
from sage_fast.kernels import dispatch, reference

SHAPE = (3, 2, 5, 4, 7)


def _setup(sde_type="sage_grpo", steps=(0, 9, 17), dtype=torch.float32, device="cpu", shape=SHAPE):
    a, b, c = schedule.step_coefficients(schedule.sigmas(20, 5.0), torch.tensor(steps), sde_type, 0.5)
    g = torch.Generator().manual_seed(0)
    x, v = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    return x, v, a, b, c


def test_cpu_default_backend_is_the_cpp_op_when_built(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    want = "cpp" if dispatch.cpp_extension() is not None else "torch"
    assert dispatch._choose("cpu").name == want


def test_backend_choice_env_override_and_log(monkeypatch, caplog):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    with caplog.at_level(logging.INFO, logger="sage_fast.kernels"):
        assert dispatch._choose("cuda").name == "torch"
    assert "cuda tensors -> torch backend" in caplog.text
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"SAGE_FAST_KERNEL_BACKEND must be one of \('auto', 'triton', 'cpp', 'torch'\)"):
        dispatch._choose("cpu")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend 'triton' cannot run cpu tensors"):
        dispatch._choose("cpu")


def test_public_ops_equal_reference_on_each_backend(triton):
    x, v, a, b, c = _setup(device=KERNEL_DEVICE)
    v_ref = v + 0.1
    want_x, want_lp = reference.sde_step(x, v, a, b, c, sde_type="sage_grpo", seed=4, offset=9)
    for name in dispatch.available_backends(KERNEL_DEVICE):
        with dispatch.use_backend(name, KERNEL_DEVICE):
            x_next, logp = K.sde_step(x, v, a, b, c, sde_type="sage_grpo", seed=4, offset=9)
            vv = v.clone().requires_grad_()
            lp, kl, norm = K.sde_logprob(x, vv, x_next, a, b, c, sde_type="sage_grpo", v_ref=v_ref)
            (lp.sum() + 2 * kl.sum()).backward()
        assert torch.equal(lp, logp)  # rollout == recompute within a backend
        assert not norm.requires_grad
        assert torch.allclose(x_next, want_x, atol=1e-5) and torch.allclose(logp, want_lp, atol=1e-5)
        vr = v.clone().requires_grad_()
        r_lp, r_kl, _ = reference.sde_logprob(x, vr, x_next, a, b, c, sde_type="sage_grpo", v_ref=v_ref)
        (r_lp.sum() + 2 * r_kl.sum()).backward()
        assert torch.allclose(vv.grad, vr.grad, rtol=1e-4, atol=1e-9), name


@pytest.mark.parametrize("sde_type", ["sage_grpo", "cps"])
def test_opcheck_registered_ops(sde_type):
    x, v, a, b, c = _setup(sde_type, steps=(2, 5, 11))
    coef = K.pack_coefficients(a, b, c, x)
    rng = K.pack_rng(3, 0, x.device)
    torch.library.opcheck(torch.ops.sage_fast.sde_step, (x, v, coef, None, rng, sde_type, "mean"))
    torch.library.opcheck(torch.ops.sage_fast.sde_step, (x, v, coef, torch.randn_like(x), None, sde_type, "sum"))
    x_next, _ = K.sde_step(x, v, a, b, c, sde_type=sde_type, seed=1)
    vv = v.clone().requires_grad_()
    torch.library.opcheck(torch.ops.sage_fast.sde_logprob, (x, vv, x_next, coef, v + 0.1, sde_type, "mean"))
    torch.library.opcheck(torch.ops.sage_fast.sde_logprob, (x, vv, x_next, coef, None, sde_type, "sum"))
    ema, count = torch.zeros(20), torch.zeros(20, dtype=torch.int64)
    torch.library.opcheck(torch.ops.sage_fast.equalizer_update,
                          (torch.rand(3) + 0.1, torch.tensor([1, 2, 2]), ema, count, 0.9, 0.1, 10.0))


def test_ops_trace_under_torch_compile():
    """aot_eager runs dynamo + AOTAutograd over the ops (fake tensors, registered autograd)."""
    x, v, a, b, c = _setup()
    coef = K.pack_coefficients(a, b, c, x)
    x_next, _ = K.sde_step(x, v, a, b, c, sde_type="sage_grpo", seed=2)
    v_ref = v - 0.2

    def loss_fn(v_):
        logp, kl, _ = torch.ops.sage_fast.sde_logprob(x, v_, x_next, coef, v_ref, "sage_grpo", "mean")
        return (logp * torch.tensor([1.0, -2.0, 0.5])).sum() + kl.sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    v1, v2 = v.clone().requires_grad_(), v.clone().requires_grad_()
    eager, traced = loss_fn(v1), compiled(v2)
    eager.backward()
    traced.backward()
    assert torch.equal(eager, traced) and torch.equal(v1.grad, v2.grad)


@pytest.mark.slow
def test_reference_and_ops_under_inductor():
    x, v, a, b, c = _setup(steps=(0, 9), shape=(2, 4, 5, 6, 7))
    noise = torch.randn_like(x)
    step = torch.compile(reference.step_math, fullgraph=True)
    got = step(x, v, a, b, c, noise, "flow_grpo", "mean")
    want = reference.step_math(x, v, a, b, c, noise, "flow_grpo", "mean")
    exact = reference.step_math(x.double(), v.double(), a, b, c, noise.double(), "flow_grpo", "mean")
    assert_within_baseline("x_next", got[0], want[0], exact[0], torch.float32)
    assert_within_baseline("logp", got[1], want[1], exact[1], torch.float32)


# ------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument and what is allowed
# ------------------------------------------------------------------------------------------


def _call_step(**override):
    x, v, a, b, c = _setup()
    args = dict(x=x, v=v, a=a, b=b, c=c, sde_type="sage_grpo", seed=0)
    args.update(override)
    return K.sde_step(args.pop("x"), args.pop("v"), args.pop("a"), args.pop("b"), args.pop("c"), **args)


def _call_logprob(**override):
    x, v, a, b, c = _setup()
    args = dict(x=x, v=v, x_next=x.clone(), a=a, b=b, c=c, sde_type="sage_grpo")
    args.update(override)
    return K.sde_logprob(args.pop("x"), args.pop("v"), args.pop("x_next"), args.pop("a"), args.pop("b"),
                         args.pop("c"), **args)


X, V, A, B, C = _setup()


@pytest.mark.parametrize("call, match", [
    (lambda: _call_step(x=X[0]), r"x must have shape \[B, C, T, H, W\]"),
    (lambda: _call_step(v=V[:2]), "v must have the shape of x"),
    (lambda: _call_step(x=X.int()), "x must be one of"),
    (lambda: _call_step(v=V.half()), "v must have x's dtype"),
    (lambda: _call_step(x=X.transpose(3, 4)), "must have the shape of x|x must be contiguous"),
    (lambda: _call_step(x=X.transpose(3, 4).contiguous().transpose(3, 4), v=V.transpose(3, 4).contiguous()
                        .transpose(3, 4)), "x must be contiguous"),
    (lambda: _call_step(v=torch.empty(SHAPE, device="meta")), "v must be on x's device"),
    (lambda: _call_step(sde_type="flowgrpo"), r"sde_type must be one of \('sage_grpo'"),
    (lambda: _call_step(reduction="max"), r"reduction must be one of \('mean', 'sum'\)"),
    (lambda: _call_step(a=A[:2]), r"a must have shape \[B\] = \[3\]"),
    (lambda: _call_step(c=-C), "c must be >= 0"),
    (lambda: _call_step(b=B.clone().fill_(float("nan"))), "b must be finite"),
    (lambda: _call_step(seed=None), "needs noise .* or seed"),
    (lambda: _call_step(noise=torch.randn(SHAPE)), "either noise or seed, not both"),
    (lambda: _call_step(seed=-3), r"seed must be in \[0, 2\^63\)"),
    (lambda: _call_step(offset=1.5), "offset must be an int"),
    (lambda: _call_logprob(c=torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64)), r"c must be > 0 .* samples \[1\]"),
    (lambda: _call_logprob(sde_type="ode"), "'ode' is deterministic"),
    (lambda: _call_logprob(x_next=X[:1]), "x_next must have the shape of x"),
    (lambda: _call_logprob(v_ref=V.double()), "v_ref must have v's dtype"),
    (lambda: _call_logprob(x=X.clone().requires_grad_()), "x must not require grad"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_step_index_out_of_range_is_reported_by_the_schedule():
    with pytest.raises(ValueError, match=r"step_index must lie in \[0, 19\]"):
        schedule.step_coefficients(schedule.sigmas(20, 5.0), torch.tensor([3, 20]), "sage_grpo", 0.5)


# ------------------------------------------------------------------------------------------
# GPU: native dispatch, CUDA-graph capture with device-side seed/offset, torch.compile
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_dispatch_picks_triton():
    assert dispatch._choose("cuda").name == "triton"


@pytest.mark.gpu
def test_triton_sde_step_graph_replays_equal_eager_bitwise_with_fresh_noise():
    x, v, a, b, c = _setup(steps=(0, 9), device="cuda", dtype=torch.bfloat16, shape=(2, 32, 21, 30, 53))
    coef = K.pack_coefficients(a, b, c, x)
    rng = torch.tensor([11, 0], dtype=torch.int64, device="cuda")
    static_x = x.clone()
    with dispatch.use_backend("triton", "cuda"):
        torch.ops.sage_fast.sde_step(static_x, v, coef, None, rng, "sage_grpo", "mean")  # warm up / compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_x, out_lp = torch.ops.sage_fast.sde_step(static_x, v, coef, None, rng, "sage_grpo", "mean")
        results = []
        for step in range(3):
            rng[1] = step * x.numel()  # fresh noise per replay, read from device memory
            graph.replay()
            results.append((out_x.clone(), out_lp.clone()))
        for step in range(3):
            ex, elp = K.sde_step(x, v, a, b, c, sde_type="sage_grpo", seed=11, offset=step * x.numel())
            assert torch.equal(results[step][0], ex) and torch.equal(results[step][1], elp)
        assert not torch.equal(results[0][0], results[1][0])


@pytest.mark.gpu
def test_compiled_training_step_on_gpu_matches_eager():
    x, v, a, b, c = _setup(steps=(0, 9), device="cuda", dtype=torch.bfloat16, shape=(2, 32, 21, 30, 53))
    coef = K.pack_coefficients(a, b, c, x)
    x_next, _ = K.sde_step(x, v, a, b, c, sde_type="sage_grpo", seed=1)

    def loss_fn(v_):
        logp, kl, _ = torch.ops.sage_fast.sde_logprob(x, v_, x_next, coef, v - 0.01, "sage_grpo", "mean")
        return logp.sum() + kl.sum()

    v1, v2 = v.clone().requires_grad_(), v.clone().requires_grad_()
    eager = loss_fn(v1)
    eager.backward()
    traced = torch.compile(loss_fn, fullgraph=True)(v2)
    traced.backward()
    assert torch.equal(eager, traced) and torch.equal(v1.grad, v2.grad)
