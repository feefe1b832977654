"""Attention backends vs the float64 reference, varlen packing, backend choice, and the joint
processor vs diffusers' own HunyuanVideo-1.5 processor."""

import logging

import pytest
import torch
from tolerance import assert_within_baseline

from sage_fast import attention as A
from sage_fast.attention import backends

# odd shapes: B=3, S=37 (odd), H=3, D=40 (flash kernels need D % 8 == 0)
SHAPE = (3, 37, 3, 40)


def _qkv(dtype=torch.float32, device="cpu", shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _mask(device="cpu"):
    B, S = SHAPE[:2]
    m = torch.ones(B, S, dtype=torch.bool)
    m[0, 30:] = False  # prefix padding (what the transformer's reordered text mask gives)
    m[1, ::4] = False  # scattered holes: the packing must not assume prefixes
    m[1, 5:9] = False
    return m.to(device)  # sample 2: no padding


def _run(fn, q, k, v, mask, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, mask)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in (q, k, v)]


def _check_backend(name, dtype, device, masked):
    q, k, v = _qkv(dtype, device)
    mask = _mask(device) if masked else None
    grad_out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)).to(device)
    ref_out, ref_grads = _run(A.attention_reference, *(t.double() for t in (q, k, v)), mask, grad_out.double())
    base_out, base_grads = _run(backends.get_backend("sdpa_math"), q, k, v, mask, grad_out)
    out, grads = _run(backends.get_backend(name), q, k, v, mask, grad_out)
    assert_within_baseline(f"{name} out", out.float(), base_out.float(), ref_out, dtype)
    for which, g, gb, gr in zip("qkv", grads, base_grads, ref_grads):
        assert_within_baseline(f"{name} d{which}", g.float(), gb.float(), gr, dtype)
    if masked:  # masked query rows are exactly zero, as in the dense-mask reference
        assert (out[~mask] == 0).all()


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", ["sdpa", "sdpa_math"])
def test_cpu_backends_match_float64_reference(name, masked):
    _check_backend(name, torch.float32, "cpu", masked)


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["fa3", "fa2", "xformers", "sdpa"])
def test_gpu_backends_match_float64_reference(name, dtype, masked):
    why = A.missing_reason(name, "cuda")
    if why is not None:
        pytest.skip(why)
    _check_backend(name, dtype, "cuda", masked)


def test_reference_masks_like_the_dense_diffusers_mask():
    """The [B,S] key-mask contract equals SDPA with diffusers' dense mask1 & mask2^T."""
    q, k, v = (t.double() for t in _qkv())
    m = _mask()
    dense = (m[:, None, :, None] & m[:, None, None, :])  # [B, 1, S, S]
    want = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=dense).transpose(1, 2)
    torch.testing.assert_close(A.attention_reference(q, k, v, m), want, rtol=1e-12, atol=1e-12)


def test_varlen_packing_with_a_cpu_varlen_kernel():
    """The packing the flash / xformers backends share, driven by a per-segment SDPA kernel."""
    calls = []

    def varlen_fn(q_thd, k_thd, v_thd, cu, max_len):
        calls.append((cu.tolist(), max_len, cu.dtype))
        outs = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            outs.append(A.attention_reference(q_thd[None, s:e], k_thd[None, s:e], v_thd[None, s:e])[0])
        return torch.cat(outs)

    q, k, v = (t.double() for t in _qkv())
    m = _mask()
    got = A.varlen_attention(q, k, v, m, varlen_fn)
    torch.testing.assert_close(got, A.attention_reference(q, k, v, m), rtol=1e-12, atol=1e-12)
    lens = m.sum(1).tolist()
    assert calls == [([0, lens[0], lens[0] + lens[1], sum(lens)], max(lens), torch.int32)]


def test_choice_auto_on_cpu_is_sdpa_and_logged(monkeypatch, caplog):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    with caplog.at_level(logging.INFO, logger="sage_fast.attention"):
        assert A.choose_backend("auto", "cpu").name == "sdpa"
    assert "cpu tensors -> sdpa backend" in caplog.text


def test_choice_env_override_and_errors(monkeypatch):
    monkeypatch.setenv(A.ENV_VAR, "sdpa_math")
    assert A.choose_backend("auto", "cpu").name == "sdpa_math"
    monkeypatch.setenv(A.ENV_VAR, "flash")
    with pytest.raises(ValueError, match=r"SAGE_FAST_ATTENTION_BACKEND.*must be one of \('auto', 'fa3', 'fa2'"):
        A.choose_backend("auto", "cpu")
    monkeypatch.delenv(A.ENV_VAR)
    with pytest.raises(ValueError, match="'fa2' .*cannot run: fa2 needs a CUDA device"):
        A.choose_backend("fa2", "cpu")
    assert A.available_backends("cpu") == ("sdpa", "sdpa_math")


@pytest.mark.parametrize("batch", [1, 3])
def test_joint_processor_matches_diffusers_processor(batch):
    """Our processor (sdpa) vs diffusers' HunyuanVideo15AttnProcessor2_0 on the same weights:
    the whole tiny transformer, text padding in every sample, mixed timesteps."""
    from sage_fast.models import build_transformer, random_conditioning

    torch.manual_seed(0)
    ours, theirs = build_transformer("tiny", seed=3), build_transformer("tiny", seed=3)
    A.install_attention(ours, "sdpa")
    assert isinstance(ours.transformer_blocks[0].attn.processor, A.HunyuanVideo15JointAttnProcessor)
    assert not isinstance(theirs.transformer_blocks[0].attn.processor, A.HunyuanVideo15JointAttnProcessor)
    g = torch.Generator().manual_seed(5)
    cond = random_conditioning(ours.config, batch, generator=g, negative=False)
    x = torch.randn(batch, 65, 5, 3, 7, generator=g)
    t = torch.linspace(950.0, 30.0, batch)

    def fwd(model, dtype):
        p = cond.prompt.to(dtype)
        return model.to(dtype)(x.to(dtype), t.to(dtype), p.embeds_bld, p.mask_bl, encoder_hidden_states_2=p.embeds_2_bld,
                               encoder_attention_mask_2=p.mask_2_bl,
                               image_embeds=torch.zeros(batch, 1, 16, dtype=dtype), return_dict=False)[0]

    ref64 = fwd(theirs, torch.float64)
    base = fwd(theirs.float(), torch.float32)
    got = fwd(ours, torch.float32)
    assert_within_baseline("processor", got, base, ref64, torch.float32)
