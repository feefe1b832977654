"""The HunyuanVideo-1.5 velocity adapter on the tiny config: CFG as one batched forward,
mixed timesteps, LoRA, activation checkpointing, autocast, loading and bad input.

Oracles are independent of the adapter's batching: plain calls of the diffusers transformer
(one per text branch, one per sample) in float64, with the STYLE rule-5 tolerance."""

import copy
import json

import pytest
import torch
from tolerance import assert_within_baseline

from sage_fast.attention import install_attention
from sage_fast.models import (Conditioning, TextEmbeddings, VelocityModel, VelocityModelConfig, apply_lora,
                              architecture, build_policy_model, build_transformer, build_velocity_model,
                              load_transformer, random_conditioning)

LATENT = (21, 3, 5)  # 21 latent frames (81 video frames), odd spatial size


@pytest.fixture(scope="module")
def tiny():
    model = build_transformer("tiny", seed=0)
    install_attention(model, "sdpa")
    return model


def _inputs(cfg, batch, seed=0, latent=LATENT):
    g = torch.Generator().manual_seed(seed)
    # prompt and negative of different lengths and per-sample padding
    cond = random_conditioning(cfg, batch, generator=g, text_len=(7, 3), text_len_2=(5, 2))
    cond.negative = random_conditioning(cfg, batch, generator=g, text_len=(4, 1), text_len_2=(6, 2)).prompt
    latents = torch.randn((batch, 32) + latent, generator=g)
    return latents, cond


def _plain_forward(transformer, latents, t, text, dtype):
    """One direct diffusers call (no adapter): t2v input [latents | 0 | 0], zero image embeds."""
    B = latents.shape[0]
    x = torch.cat([latents, torch.zeros_like(latents), torch.zeros_like(latents[:, :1])], 1).to(dtype)
    text = text.to(dtype)
    return transformer.to(dtype)(x, t.to(dtype), text.embeds_bld, text.mask_bl,
                                 encoder_hidden_states_2=text.embeds_2_bld, encoder_attention_mask_2=text.mask_2_bl,
                                 image_embeds=torch.zeros(B, 1, transformer.config.image_embed_dim, dtype=dtype),
                                 return_dict=False)[0]


def _guided(transformer, latents, t, cond, scale, dtype):
    v_c = _plain_forward(transformer, latents, t, cond.prompt, dtype)
    v_u = _plain_forward(transformer, latents, t, cond.negative, dtype)
    return v_u + scale * (v_c - v_u)


@pytest.mark.parametrize("batch", [1, 3])
def test_cfg_is_one_batched_forward_equal_to_two_forwards(tiny, batch):
    latents, cond = _inputs(tiny.config, batch)
    t = torch.tensor([990.0, 431.0, 12.0][:batch])  # mixed timesteps
    scale = 6.0
    model64 = copy.deepcopy(tiny)
    want64 = _guided(model64, latents, t, cond, scale, torch.float64)
    want32 = _guided(copy.deepcopy(tiny), latents, t, cond, scale, torch.float32)
    calls = []
    handle = tiny.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["hidden_states"].shape[0]),
                                            with_kwargs=True)
    try:
        got = VelocityModel(tiny, autocast_dtype=None).velocity(latents, t, cond, scale)
    finally:
        handle.remove()
    assert calls == [2 * batch]  # one forward, both branches
    assert got.dtype == torch.float32
    assert_within_baseline("cfg velocity", got, want32, want64, torch.float32)


def test_cfg_scale_per_sample_tensor(tiny):
    latents, cond = _inputs(tiny.config, 2, seed=1)
    t = torch.tensor([700.0, 300.0])
    vm = VelocityModel(tiny, autocast_dtype=None)
    both = vm.velocity(latents, t, cond, torch.tensor([1.0, 4.0]))
    uncond_free = vm.velocity(latents[:1], t[:1], _select(cond, 0), 1.0)
    guided = vm.velocity(latents[1:], t[1:], _select(cond, 1), 4.0)
    torch.testing.assert_close(both, torch.cat([uncond_free, guided]), rtol=1e-5, atol=1e-5)


def _select(cond, i):
    def text(te):
        return TextEmbeddings(*(x[i:i + 1] for x in (te.embeds_bld, te.mask_bl, te.embeds_2_bld, te.mask_2_bl)))

    return Conditioning(prompt=text(cond.prompt), negative=text(cond.negative))


def test_mixed_timesteps_in_one_batch_equal_per_sample_calls(tiny):
    latents, cond = _inputs(tiny.config, 3, seed=2)
    t = torch.tensor([1000.0, 500.0, 3.0])
    vm32 = VelocityModel(tiny, autocast_dtype=None)
    vm64 = VelocityModel(copy.deepcopy(tiny).double(), autocast_dtype=None)
    got = vm32.velocity(latents, t, cond, 5.0)
    want64 = torch.cat([vm64.velocity(latents[i:i + 1].double(), t[i:i + 1], _select(cond, i).to(torch.float64), 5.0)
                        for i in range(3)])
    want32 = torch.cat([vm32.velocity(latents[i:i + 1], t[i:i + 1], _select(cond, i), 5.0) for i in range(3)])
    assert_within_baseline("mixed timesteps", got, want32, want64, torch.float32)
    # and the timestep matters (a model that ignored it would pass the check above)
    assert (vm32.velocity(latents[:1], t[1:2], _select(cond, 0), 5.0) - want32[:1]).abs().max() > 1e-2


def test_lora_zero_init_changes_nothing_then_trains_only_lora(tiny):
    latents, cond = _inputs(tiny.config, 2, seed=3)
    t = torch.tensor([800.0, 200.0])
    model = copy.deepcopy(tiny)
    before = VelocityModel(model, autocast_dtype=None).velocity(latents, t, cond, 4.0).detach()
    names = apply_lora(model, rank=4, alpha=8.0)
    vm = VelocityModel(model, autocast_dtype=None)
    after = vm.velocity(latents, t, cond, 4.0)
    assert torch.equal(after, before)  # B = 0: exactly the base model
    assert names and all("lora_" in n for n in names)
    # 8 projections x 2 blocks x (A, B)
    assert len(names) == 8 * tiny.config.num_layers * 2
    after.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) <= set(names) and any(g.abs().max() > 0 for g in grads.values())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.grad is not None:
                p -= 10.0 * p.grad
    assert (vm.velocity(latents, t, cond, 4.0) - before).abs().max() > 1e-4  # the adapter is live


def test_activation_checkpointing_changes_no_output_or_gradient(tiny):
    latents, cond = _inputs(tiny.config, 2, seed=4)
    t = torch.tensor([600.0, 90.0])
    plain, ckpt = copy.deepcopy(tiny), copy.deepcopy(tiny)
    ckpt.enable_gradient_checkpointing()
    recomputed = []
    # a pre-hook: non-reentrant recomputation stops early, before a block's forward hook would fire
    handle = ckpt.transformer_blocks[0].register_forward_pre_hook(lambda *a: recomputed.append(1))
    outs = []
    for model in (plain, ckpt):
        v = VelocityModel(model, autocast_dtype=None).velocity(latents, t, cond, 3.0)
        (v * latents).sum().backward()
        outs.append(v.detach())
    handle.remove()
    assert len(recomputed) == 2  # block 0 ran again in backward: checkpointing is on
    assert torch.equal(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_autocast_keeps_fp32_master_weights(tiny):
    latents, cond = _inputs(tiny.config, 2, seed=5)
    t = torch.tensor([900.0, 100.0])
    model = copy.deepcopy(tiny)
    ref64 = VelocityModel(copy.deepcopy(tiny).double(), None).velocity(latents.double(), t, cond.to(torch.float64), 4.0)
    v = VelocityModel(model, torch.bfloat16).velocity(latents, t, cond, 4.0)
    v.sum().backward()
    assert v.dtype == torch.float32
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in model.parameters())
    err = float((v.detach().double() - ref64.detach()).abs().max())
    scale = float(ref64.detach().abs().max())
    assert 1e-4 * scale < err < 0.05 * scale, (err, scale)  # bf16 rounding really happened, and only that


def test_adaln_zero_init_makes_every_block_the_identity_and_the_velocity_zero():
    from sage_fast.world.base_model import adaln_zero_init_

    model = adaln_zero_init_(build_transformer("tiny", seed=0))
    install_attention(model, "sdpa")
    latents, cond = _inputs(model.config, 2, latent=(3, 2, 3))
    policy = VelocityModel(model, autocast_dtype=None)
    v = policy.velocity(latents, torch.tensor([900.0, 50.0]), cond, cfg_scale=3.0)
    assert torch.equal(v, torch.zeros_like(v))
    # the blocks are the identity on both streams: hooks see their inputs come out unchanged
    seen = []

    def same_out_as_in(module, args, kwargs, out):
        video = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        seen.append(torch.equal(out[0], video) and torch.equal(out[1], text))

    hooks = [b.register_forward_hook(same_out_as_in, with_kwargs=True) for b in model.transformer_blocks]
    policy.velocity(latents, torch.tensor([900.0, 50.0]), cond)
    for h in hooks:
        h.remove()
    assert len(seen) >= len(model.transformer_blocks) and all(seen)
    # and it still trains: the gates get gradients
    policy.velocity(latents, torch.tensor([500.0, 500.0]), cond).sum().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="HunyuanVideo-1.5 transformer"):
        adaln_zero_init_(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_build_velocity_model_full_and_lora():
    full = build_velocity_model(VelocityModelConfig(finetune="full", gradient_checkpointing=True,
                                                    attention_backend="sdpa"))
    assert all(p.requires_grad for p in full.parameters())
    assert full.transformer.gradient_checkpointing
    assert full.transformer.transformer_blocks[0].attn.processor.backend.name == "sdpa"
    assert full.autocast_dtype is torch.bfloat16
    lora = build_velocity_model(VelocityModelConfig(lora_rank=2))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_policy_model_is_a_function_of_the_run_seed_alone():
    """LoRA's A matrices draw from the global RNG: `build_policy_model` seeds it from run.seed (and
    restores it), so two builds with one seed are the same policy whatever the RNG held before."""
    cfg = VelocityModelConfig(attention_backend="sdpa", lora_rank=4)
    torch.manual_seed(123)
    a = build_policy_model(cfg, run_seed=7)
    after_a = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(5)  # another global RNG state before the build
    b = build_policy_model(cfg, run_seed=7)
    c = build_policy_model(cfg, run_seed=8)
    lora = [n for n, p in a.named_parameters() if p.requires_grad and "lora_A" in n]
    assert lora
    params_a, params_b, params_c = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(params_a[n], params_b[n]) for n in params_a)
    assert not all(torch.equal(params_a[n], params_c[n]) for n in lora)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_a)  # the build left the global RNG where it was


def _text(batch, seed, length=(5, 3)):
    g = torch.Generator().manual_seed(seed)
    return TextEmbeddings(torch.randn(batch, length[0], 6, generator=g), torch.randint(0, 2, (batch, length[0])),
                          torch.randn(batch, length[1], 4, generator=g), torch.randint(0, 2, (batch, length[1])).bool())


@pytest.mark.parametrize("full", [True, False])
def test_conditioning_index_select_is_the_rows_of_every_field(full):
    """`index_select(idx)`: every tensor field's rows `idx` (repeats allowed) on dim 0, dtypes
    kept, None fields None: the same tensors as selecting field by field."""
    B = 4
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(prompt=_text(B, 1), negative=_text(B, 2, (2, 6)) if full else None)
    if full:
        cond.image_embeds_bnd = torch.randn(B, 3, 5, generator=g)
        cond.cond_latents_bcthw = torch.randn(B, 2, 1, 3, 2, generator=g)
        cond.cond_mask_b1thw = torch.randn(B, 1, 1, 3, 2, generator=g)
    idx = torch.tensor([2, 0, 2, 3, 3])
    got = cond.index_select(idx)
    assert isinstance(got, Conditioning) and isinstance(got.prompt, TextEmbeddings)
    texts = [("prompt", cond.prompt, got.prompt)] + ([("negative", cond.negative, got.negative)] if full else [])
    if not full:
        assert got.negative is None
    for name, src, out in texts:
        for attr in ("embeds_bld", "mask_bl", "embeds_2_bld", "mask_2_bl"):
            want = getattr(src, attr).index_select(0, idx)
            have = getattr(out, attr)
            assert have.dtype == want.dtype and torch.equal(have, want), (name, attr)
        assert torch.equal(out.embeds_bld[0], src.embeds_bld[2]) and torch.equal(out.mask_2_bl[4], src.mask_2_bl[3])
    for attr in ("image_embeds_bnd", "cond_latents_bcthw", "cond_mask_b1thw"):
        if full:
            assert torch.equal(getattr(got, attr), getattr(cond, attr).index_select(0, idx)), attr
            assert getattr(got, attr).shape[0] == len(idx)
        else:
            assert getattr(got, attr) is None, attr
    assert cond.prompt.embeds_bld.shape[0] == B  # the source is left as it was


def test_velocity_model_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"finetune must be one of \('lora', 'full'\), got 'half'"):
        VelocityModelConfig(finetune="half")
    with pytest.raises(ValueError, match=r"autocast_dtype must be one of \('bfloat16', 'float16', 'none'\)"):
        VelocityModelConfig(autocast_dtype="fp8")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        VelocityModelConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="lora_rank must be an int >= 1"):
        VelocityModelConfig(lora_rank=0)
    with pytest.raises(ValueError, match="architecture must be one of"):
        VelocityModelConfig(architecture="huge")
    with pytest.raises(ValueError, match="rope_axes_dim"):
        architecture("tiny", attention_head_dim=32)


def test_bad_inputs_are_value_errors(tiny):
    latents, cond = _inputs(tiny.config, 2)
    vm = VelocityModel(tiny, autocast_dtype=None)
    with pytest.raises(ValueError, match=r"latents must be \[B, 32, T, H, W\]"):
        vm.velocity(latents[:, :16], 500.0, cond, 1.0)
    with pytest.raises(ValueError, match=r"timestep must be a scalar or of shape \[2\]"):
        vm.velocity(latents, torch.ones(3), cond, 1.0)
    with pytest.raises(ValueError, match="conditioning.negative is required when cfg_scale != 1"):
        vm.velocity(latents, 500.0, Conditioning(prompt=cond.prompt), 5.0)
    with pytest.raises(ValueError, match="conditioning.prompt: embedding width"):
        bad = copy.copy(cond.prompt)
        bad.embeds_bld = bad.embeds_bld[..., :8]
        vm.velocity(latents, 500.0, Conditioning(prompt=bad), 1.0)


def test_full_size_architecture_is_the_8_3b_dit():
    from diffusers import HunyuanVideo15Transformer3DModel

    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel(**architecture("hunyuanvideo15"))
    n = sum(p.numel() for p in model.parameters())
    assert 8.2e9 < n < 8.4e9, n  # docs/SPEC.md section 7: 8.3B
    assert len(model.transformer_blocks) == 54 and model.config.num_attention_heads * model.config.attention_head_dim == 2048


# ---------------------------------------------------------------------------------------------
# Loading


def _outputs_equal(a, b):
    """Same tensors by name bit for bit, and the same velocity (up to float32 rounding: loaded
    tensors sit at other addresses, and CPU matmul kernels may block differently)."""
    sa, sb = a.state_dict(), b.state_dict()
    if set(sa) != set(sb) or any(not torch.equal(sa[k], sb[k]) for k in sa):
        return False
    install_attention(a, "sdpa")
    install_attention(b, "sdpa")
    latents, cond = _inputs(a.config, 1, latent=(2, 3, 3))
    va = VelocityModel(a, None).velocity(latents, 300.0, cond, 1.0)
    vb = VelocityModel(b, None).velocity(latents, 300.0, cond, 1.0)
    return torch.allclose(va, vb, rtol=1e-5, atol=1e-5)


def test_load_folder_pipeline_folder_and_file(tiny, tmp_path):
    folder = tmp_path / "ckpt"
    tiny.save_pretrained(folder, safe_serialization=True)
    assert _outputs_equal(load_transformer(folder), tiny)
    pipe = tmp_path / "pipe"
    tiny.save_pretrained(pipe / "transformer", safe_serialization=True)
    assert _outputs_equal(load_transformer(pipe), tiny)
    weights = folder / "diffusion_pytorch_model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    bare = tmp_path / "bare" / "w.safetensors"
    bare.parent.mkdir()
    bare.write_bytes(weights.read_bytes())
    assert _outputs_equal(load_transformer(bare, config=config), tiny)
    vm = build_velocity_model(VelocityModelConfig(checkpoint=str(folder), finetune="full", autocast_dtype="none"))
    assert _outputs_equal(vm.transformer, tiny)


def test_load_errors_are_clear(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist .*hub ids are never downloaded"):
        load_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no diffusion_pytorch_model.safetensors"):
        load_transformer(tmp_path / "empty")
    folder = tmp_path / "ckpt"
    tiny.save_pretrained(folder, safe_serialization=True)
    bare = tmp_path / "bare" / "w.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="bare .safetensors file: pass its config"):
        load_transformer(bare)
    config = json.loads((folder / "config.json").read_text())
    wider = dict(config, attention_head_dim=32, rope_axes_dim=[8, 12, 12])
    with pytest.raises(ValueError, match=r"does not match its config: .*shape mismatches [1-9]\d* \['cond_type_embed.weight: checkpoint \(3, 64\) vs model \(3, 128\)"):
        load_transformer(bare, config=wider)
    deeper = dict(config, num_layers=3)
    with pytest.raises(ValueError, match=r"missing \d+ \['transformer_blocks.2"):
        load_transformer(bare, config=deeper)
    with pytest.raises(ValueError, match="expected 'HunyuanVideo15Transformer3DModel'"):
        load_transformer(bare, config=dict(config, _class_name="WanTransformer3DModel"))


def test_text_to_video_image_tokens_are_masked_out(tiny):
    """t2v passes one zero image token instead of the pipeline's 729: the class masks them all,
    so their number must not change the velocity."""
    latents, cond = _inputs(tiny.config, 2, seed=6)
    t = torch.tensor([500.0, 50.0])
    vm = VelocityModel(tiny, autocast_dtype=None)
    one = vm.velocity(latents, t, cond, 3.0)
    many = vm.velocity(latents, t, Conditioning(cond.prompt, cond.negative,
                                                image_embeds_bnd=torch.zeros(2, 29, tiny.config.image_embed_dim)), 3.0)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)
    live = vm.velocity(latents, t, Conditioning(cond.prompt, cond.negative,
                                                image_embeds_bnd=torch.ones(2, 3, tiny.config.image_embed_dim)), 3.0)
    assert (live - one).abs().max() > 1e-3  # non-zero image embeds do condition (i2v)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_batched_text_forward_equals_the_class_forward_bit_for_bit(tiny, checkpointing):
    """`forward_batched_text` orders the text tokens for the whole batch at once (no per-sample
    loop): velocity and every gradient equal the class's forward, bit for bit, for t2v with
    per-sample padding (guided and not), i2v and all-zero image embeds (t2v by the class's rule)."""
    latents, cond = _inputs(tiny.config, 3, seed=8)
    t = torch.tensor([700.0, 300.0, 20.0])
    g = torch.Generator().manual_seed(1)
    dim = tiny.config.image_embed_dim
    cases = ((cond, 3.0), (Conditioning(cond.prompt), 1.0),
             (Conditioning(cond.prompt, cond.negative, image_embeds_bnd=torch.randn(3, 4, dim, generator=g)), 2.0),
             (Conditioning(cond.prompt, cond.negative, image_embeds_bnd=torch.zeros(3, 2, dim)), 3.0))
    for case, (c, scale) in enumerate(cases):
        outs, grads = [], []
        for batched in (False, True):
            model = copy.deepcopy(tiny)
            if checkpointing:
                model.enable_gradient_checkpointing()
            v = VelocityModel(model, autocast_dtype=None, batched_text=batched).velocity(latents, t, c, scale)
            (v * latents).sum().backward()
            outs.append(v.detach())
            grads.append([(n, p.grad) for n, p in model.named_parameters()])
        assert torch.equal(outs[0], outs[1]), case
        for (name, a), (_, b) in zip(*grads):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (case, name)


def test_batched_text_forward_equal_under_bf16_autocast_and_with_spatial_patches():
    """The same equality (bit for bit) under bf16 autocast, and with patch 2 (the output reshape)."""
    patched = build_transformer("tiny", seed=1, patch_size=2)
    install_attention(patched, "sdpa")
    for model, latent, autocast in ((build_transformer("tiny", seed=0), LATENT, torch.bfloat16),
                                    (patched, (3, 4, 6), None)):
        latents, cond = _inputs(model.config, 2, seed=9, latent=latent)
        t = torch.tensor([400.0, 60.0])
        outs = [VelocityModel(model, autocast_dtype=autocast, batched_text=b).velocity(latents, t, cond, 3.0)
                for b in (False, True)]
        assert torch.equal(outs[0], outs[1]), (latent, autocast)


def test_order_text_tokens_puts_real_tokens_first_in_stream_order():
    from sage_fast.models import order_text_tokens

    a = torch.arange(1.0, 4.0).view(1, 3, 1).repeat(2, 1, 1)        # image stream, padding kept
    b = 10 + torch.arange(1.0, 3.0).view(1, 2, 1).repeat(2, 1, 1)  # a stream whose padding is zeroed
    ma = torch.tensor([[True, False, True], [False, False, False]])
    mb = torch.tensor([[False, True], [True, True]])
    tokens, mask = order_text_tokens([(a, ma, False), (b, mb, True)])
    assert tokens[..., 0].tolist() == [[1, 3, 12, 2, 0], [11, 12, 1, 2, 3]]
    assert mask.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    with pytest.raises(ValueError, match="stream 1 mask must be bool"):
        order_text_tokens([(a, ma, False), (b, mb.long(), True)])


def test_sample_prediction_velocity_is_derived_from_x0_and_travels_with_the_checkpoint(tiny, tmp_path):
    """x-prediction: v = (x - x0_hat) / max(sigma, SAMPLE_SIGMA_MIN), guided on the raw outputs;
    the mode is saved in config.json and read back; bad or mismatched modes are ValueErrors."""
    from sage_fast.models import SAMPLE_SIGMA_MIN

    latents, cond = _inputs(tiny.config, 3, seed=5, latent=(3, 3, 5))
    t = torch.tensor([900.0, 250.0, 10.0])  # the last below the sigma floor (0.01 < 0.05)
    scale = 4.0
    raw = _guided(copy.deepcopy(tiny), latents, t, cond, scale, torch.float64)  # the guided x0_hat
    sigma = (t.double() / 1000).clamp(min=SAMPLE_SIGMA_MIN).view(-1, 1, 1, 1, 1)
    want = (latents.double() - raw) / sigma
    sample_model = copy.deepcopy(tiny)
    sample_model.register_to_config(_sage_fast_prediction="sample")
    vm = VelocityModel(sample_model, autocast_dtype=None)
    assert vm.prediction == "sample"
    got = vm.velocity(latents, t, cond, scale)
    assert_within_baseline("x-prediction velocity", got, VelocityModel(copy.deepcopy(sample_model), None).velocity(
        latents, t, cond, scale), want, torch.float32)
    # the same weights read as a velocity model give the raw output: the mode changes the velocity
    assert (VelocityModel(tiny, autocast_dtype=None).velocity(latents, t, cond, scale) - got).abs().max() > 1e-2

    folder = tmp_path / "x0"
    sample_model.save_pretrained(folder, safe_serialization=True)
    assert json.loads((folder / "config.json").read_text())["_sage_fast_prediction"] == "sample"
    loaded = build_velocity_model(VelocityModelConfig(checkpoint=str(folder), finetune="full", autocast_dtype="none"))
    assert loaded.prediction == "sample"
    torch.testing.assert_close(loaded.velocity(latents, t, cond, scale), got, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"prediction='velocity' does not match the checkpoint's 'sample'"):
        build_velocity_model(VelocityModelConfig(checkpoint=str(folder), prediction="velocity"))
    with pytest.raises(ValueError, match=r"prediction must be one of \('velocity', 'sample'\) or None, got 'eps'"):
        VelocityModelConfig(prediction="eps")
    fresh = build_velocity_model(VelocityModelConfig(prediction="sample", finetune="full"))
    assert fresh.prediction == "sample" and build_velocity_model(VelocityModelConfig()).prediction == "velocity"
    bad = copy.deepcopy(tiny)
    bad.register_to_config(_sage_fast_prediction="eps")
    with pytest.raises(ValueError, match=r"_sage_fast_prediction must be one of \('velocity', 'sample'\), got 'eps'"):
        VelocityModel(bad)
