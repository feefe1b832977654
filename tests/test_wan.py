"""Wan 2.1 / 2.2 text-to-video on tiny random pipelines built offline: prompt encoding, the
guided velocity, a full ODE rollout of our sampler (one and two experts) and the VAE decode
against diffusers' own WanPipeline, LoRA and activation checkpointing, batches whose timesteps
straddle the two experts' boundary, the model config's family 'wan' (experts, LoRA targets,
dispatch), and folder and config checks that name the field.

Float references: `WanPipeline.__call__` casts latents to float32 every step, so the float64
oracle is the same loop written here in float64 (the transformer's FP32LayerNorms stay float32
inside; that error is in the baseline both float32 paths are measured against)."""

import copy
import dataclasses
import functools
import json

import pytest
import torch

from sage_fast.grpo import schedule
from sage_fast.grpo.rollout import RolloutEngine, SamplerConfig
from sage_fast.models import (DEFAULT_LORA_TARGETS, WAN_LORA_TARGETS, Conditioning, VelocityModelConfig,
                              WanPromptEncoder, WanTextEmbeddings, WanVelocityModel, WanVideoDecoder, apply_lora,
                              build_policy_model, build_velocity_model, build_wan_velocity_model,
                              check_wan_pipeline_folder, load_wan_transformer, wan_boundary_timestep,
                              wan_scheduler_shift)
from sage_fast.models.lora import WAN_BLOCKS
from sage_fast.models.tiny_wan_pipeline import (PROMPTS, TINY_WAN_BOUNDARY_RATIO, TINY_WAN_LATENT_CHANNELS,
                                                TINY_WAN_SHIFT, TINY_WAN_TEXT_DIM, save_tiny_wan_pipeline)
from tolerance import assert_within_baseline

L = 32  # max_sequence_length of these tests (the pipeline's is 512): PROMPTS[0] (40 bytes) is truncated
SHAPE = (2, TINY_WAN_LATENT_CHANNELS, 3, 4, 4)  # 9 frames of 32 x 32
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan"))


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    return save_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan22"), two_experts=True)


@pytest.fixture(scope="module")
def encoder(tiny):
    return WanPromptEncoder(tiny, dtype=torch.float32, max_sequence_length=L)


def _pipeline(folder):
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)


def _guided(transformer, x, t, emb_cond, emb_uncond, scale):
    """The pipeline's guided prediction: two calls (cond, uncond), as WanPipeline.__call__."""
    v_c = transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb_cond, return_dict=False)[0]
    v_u = transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb_uncond, return_dict=False)[0]
    return v_u + scale * (v_c - v_u)


def test_prompt_encoder_equals_the_pipeline_bitwise(tiny, encoder):
    """Same tokenizer call, same UMT5 batch, same zero padding: bitwise (float32 encoder)."""
    pipe = _pipeline(tiny)
    prompts = [PROMPTS[0], "  a cat &amp; a   dog ", ""]  # truncated; cleaned (html, spaces); EOS only
    with torch.no_grad():
        emb, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=L, device=CPU,
                                    dtype=torch.float32)
    ours = encoder.encode(prompts)
    assert ours.embeds_bld.dtype == torch.float32 and ours.embeds_bld.shape == emb.shape == (3, L, 16)
    assert torch.equal(ours.embeds_bld, emb)
    lengths = ours.mask_bl.sum(1).tolist()
    assert lengths[0] == L and lengths[1] == len("a cat & a dog") + 1 and lengths[2] == 1  # + EOS
    for i, n in enumerate(lengths):
        assert bool((emb[i, n:] == 0).all()) and bool((emb[i, :n].abs().sum(-1) > 0).all())
    sel = ours.index_select(torch.tensor([2, 0, 0]))
    assert torch.equal(sel.embeds_bld[1], ours.embeds_bld[0])
    cast = sel.to(torch.float64)
    assert cast.embeds_bld.dtype == torch.float64 and cast.mask_bl.dtype == torch.int64


def test_released_encoder_serves_the_cache_and_refuses_new_prompts(tiny):
    enc = WanPromptEncoder(tiny, dtype=torch.float32, max_sequence_length=L)
    before = enc.encode(PROMPTS[:2])
    enc.release()
    assert enc.released and torch.equal(enc.encode(PROMPTS[1::-1]).embeds_bld, before.embeds_bld.flip(0))
    with pytest.raises(RuntimeError, match="released; 1 prompts are not cached"):
        enc.encode([PROMPTS[3]])


def test_guided_velocity_equals_the_pipeline_prediction(tiny, encoder):
    """One forward of 2B rows vs the pipeline's two forwards of B: within the tolerance rule of
    float32 (batch size may change the matmul blocking); mixed timesteps and a [B] scale."""
    pipe = _pipeline(tiny)
    model = WanVelocityModel(load_wan_transformer(tiny), autocast_dtype=None, text_length=L)
    prompt, negative = encoder.encode([PROMPTS[1], "a dog"]), encoder.encode(["", "blurry, static"])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([937.5, 250.0])
    for scale in (5.0, torch.tensor([5.0, 2.5])):
        with torch.no_grad():
            ours = model.velocity(x, t, Conditioning(prompt=prompt, negative=negative), scale)
            s = scale.view(-1, 1, 1, 1, 1) if isinstance(scale, torch.Tensor) else scale
            theirs = _guided(pipe.transformer, x, t, prompt.embeds_bld, negative.embeds_bld, s)
            t64 = copy.deepcopy(pipe.transformer).double()
            ref = _guided(t64, x.double(), t.double(), prompt.embeds_bld.double(), negative.embeds_bld.double(),
                          s.double() if isinstance(s, torch.Tensor) else s)
        assert_within_baseline("guided velocity", ours, theirs, ref, torch.float32)
    with torch.no_grad():  # cfg 1: the prompt rows only; the padding is part of the input
        plain = model.velocity(x, t, Conditioning(prompt=prompt))
        n = int(prompt.mask_bl.sum(1).max())
        assert n < L
        cut = WanTextEmbeddings(prompt.embeds_bld[:, :n], prompt.mask_bl[:, :n])  # the real tokens only
        assert torch.equal(model.velocity(x, t, Conditioning(prompt=cut)), plain)  # re-padded to L
        assert not torch.allclose(pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cut.embeds_bld,
                                                   return_dict=False)[0], plain)  # unpadded text differs
    with pytest.raises(ValueError, match="negative is required"):
        model.velocity(x, t, Conditioning(prompt=prompt), 5.0)
    long = WanTextEmbeddings(torch.zeros(2, L + 1, 16), torch.ones(2, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="text_length=32"):
        model.velocity(x, t, Conditioning(prompt=long))


def test_schedule_sigmas_equal_the_scheduler_on_the_same_grid(tiny):
    """The scheduler shifts the grid u it is given in float32: within the tolerance rule of
    float32 of our float64 schedule. Its default grid (what WanPipeline.__call__ asks for) is
    another one, u = linspace(1, shift(1/1000), N): the rollout test passes ours explicitly."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    n, shift = 6, wan_scheduler_shift(tiny)
    assert shift == TINY_WAN_SHIFT
    ours = schedule.sigmas(n, shift)
    u = 1.0 - torch.arange(n + 1, dtype=torch.float64) / n
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny / "scheduler")
    sched.set_timesteps(n, sigmas=u[:-1].tolist())
    assert_within_baseline("sigmas", sched.sigmas, schedule.shift_sigma(u.float(), shift), ours, torch.float32)
    assert_within_baseline("timesteps", sched.timesteps, 1000 * schedule.shift_sigma(u[:-1].float(), shift),
                           1000 * ours[:-1], torch.float32)
    sched.set_timesteps(n)
    default_u = torch.linspace(1.0, float(schedule.shift_sigma(torch.tensor(1e-3, dtype=torch.float64), shift)), n,
                               dtype=torch.float64)
    assert_within_baseline("default sigmas", sched.sigmas[:-1], schedule.shift_sigma(default_u.float(), shift),
                           schedule.shift_sigma(default_u, shift), torch.float32)
    assert float((sched.sigmas.double() - ours).abs().max()) > 1e-2


@pytest.mark.parametrize("two_experts, scale_2", [(False, None), (True, None), (True, 1.5)],
                         ids=["wan21", "wan22_two_experts", "wan22_guidance_scale_2"])
def test_ode_rollout_equals_the_pipeline(tiny, tiny2, two_experts, scale_2, monkeypatch):
    """RolloutEngine (eta = 0: every step is the Euler step) with our velocity vs
    WanPipeline.__call__ on the same grid, shift, steps, guidance (the low-noise expert's own
    scale: the pipeline's guidance_scale_2) and initial latents: the final latents within the
    tolerance rule of float32 against a float64 Euler loop; the expert of every step equal;
    sigmas within float32 rounding of ours."""
    folder = tiny2 if two_experts else tiny
    n, scale = 6, 4.0
    pipe = _pipeline(folder)
    boundary = wan_boundary_timestep(folder)
    assert boundary == (TINY_WAN_BOUNDARY_RATIO * 1000 if two_experts else None)
    model = WanVelocityModel(load_wan_transformer(folder),
                             load_wan_transformer(folder, "transformer_2") if two_experts else None, boundary,
                             autocast_dtype=None, text_length=L, low_noise_cfg_scale=scale_2)
    enc = WanPromptEncoder(folder, dtype=torch.float32, max_sequence_length=L)
    prompts = PROMPTS[1:3]
    cond = Conditioning(prompt=enc.encode(prompts), negative=enc.encode(["", ""]))

    def record(log, name):
        return lambda module, args, kwargs: log.append(name)

    ours_calls, pipe_calls = [], []
    experts = [("high", model.transformer, pipe.transformer)]
    if two_experts:
        experts.append(("low", model.transformer_2, pipe.transformer_2))
    for name, mine, theirs in experts:
        mine.register_forward_pre_hook(record(ours_calls, name), with_kwargs=True)
        theirs.register_forward_pre_hook(record(pipe_calls, name), with_kwargs=True)

    engine = RolloutEngine(model, SamplerConfig(num_steps=n, shift=wan_scheduler_shift(folder), sde_type="sage_grpo",
                                                eta=0.0, cfg_scale=scale), cuda_graph=False)
    traj = engine.sample(cond, SHAPE, seed=11)
    assert bool((traj.coef[:, 2] == 0).all())  # c = 0: deterministic Euler steps

    u = 1.0 - torch.arange(n, dtype=torch.float64) / n  # our grid, through the scheduler's own shift
    monkeypatch.setattr(pipe.scheduler, "set_timesteps",
                        functools.partial(pipe.scheduler.set_timesteps, sigmas=u.tolist()))
    out = pipe(prompt=prompts, height=8 * SHAPE[3], width=8 * SHAPE[4], num_frames=4 * (SHAPE[2] - 1) + 1,
               num_inference_steps=n, guidance_scale=scale, guidance_scale_2=scale_2,
               generator=torch.Generator().manual_seed(0),
               latents=traj.latents[0].clone(), output_type="latent", max_sequence_length=L).frames
    assert_within_baseline("sigmas", pipe.scheduler.sigmas, engine.sigmas.float(), engine.sigmas, torch.float32)

    assert pipe_calls[0::2] == pipe_calls[1::2]  # cond and uncond of a step: one expert
    assert ours_calls == pipe_calls[0::2] and len(ours_calls) == n
    if two_experts:  # sigma_2 = shift(2/3) = 0.857 < 0.875 <= sigma_1 = 0.9375
        assert ours_calls == ["high"] * 2 + ["low"] * (n - 2)

    with torch.no_grad():
        emb, neg = pipe.encode_prompt(prompts, max_sequence_length=L, device=CPU, dtype=torch.float32)
        t64 = {name: copy.deepcopy(theirs).double() for name, _, theirs in experts}
        x = traj.latents[0].double()
        for i in range(n):
            sigma, sigma_next = engine.sigmas[i], engine.sigmas[i + 1]
            timestep = torch.full((SHAPE[0],), 1000.0, dtype=torch.float64) * sigma
            high = boundary is None or 1000 * sigma >= boundary
            s_i = scale if high or scale_2 is None else scale_2
            x = x + (sigma_next - sigma) * _guided(t64["high" if high else "low"], x, timestep, emb.double(),
                                                    neg.double(), s_i)
    assert_within_baseline("rollout", traj.final, out, x, torch.float32)


def test_two_experts_pick_by_timestep(tiny2):
    high, low = load_wan_transformer(tiny2), load_wan_transformer(tiny2, "transformer_2")
    model = WanVelocityModel(high, low, 875.0, autocast_dtype=None, text_length=L)
    assert model.expert(torch.tensor([875.0, 999.0])) is high and model.expert(torch.tensor([874.9, 10.0])) is low
    with pytest.raises(ValueError, match="both sides of boundary_timestep=875.0"):
        model.expert(torch.tensor([900.0, 800.0]))  # no one expert: `velocity` splits such a batch
    with pytest.raises(ValueError, match="together"):
        WanVelocityModel(high, low)


def _lora_two_experts(folder, experts="both"):
    """A two-expert policy whose LoRA B matrices are non-zero (B = 0 would hide a wrong expert's LoRA)."""
    torch.manual_seed(0)
    model = build_wan_velocity_model(folder, experts=experts, lora_rank=4, autocast_dtype=None, text_length=L)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(generator=torch.Generator().manual_seed(len(n)))
    return model


def _mixed_inputs(batch=5):
    g = torch.Generator().manual_seed(5)
    x = torch.randn((batch,) + SHAPE[1:], generator=g)
    cond = Conditioning(prompt=WanTextEmbeddings(torch.randn(batch, 7, 16, generator=g),
                                                 torch.ones(batch, 7, dtype=torch.long)),
                        negative=WanTextEmbeddings(torch.randn(batch, 3, 16, generator=g),
                                                   torch.ones(batch, 3, dtype=torch.long)))
    return x, cond


@pytest.mark.parametrize("scale", [1.0, 4.0, "per_row"])
def test_mixed_timesteps_run_each_expert_on_its_rows(tiny2, scale):
    """Timesteps on both sides of the boundary in one batch (rows interleaved; 875 and 874.9
    straddle it): bitwise the two experts' sub-batch calls put back in row order; within the
    tolerance rule of float32 of calling the model row by row (float64 oracle: row by row in
    float64; a batch of 1 and of 3 may block the matmuls differently, so not bitwise); and
    the loss's gradient reaches both experts' LoRA."""
    model = _lora_two_experts(tiny2)
    x, cond = _mixed_inputs()
    t = torch.tensor([500.0, 950.0, 874.9, 875.0, 999.0])  # row order -> expert order is no involution
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]) if scale == "per_row" else scale
    high, low = torch.tensor([1, 3, 4]), torch.tensor([0, 2])

    def rows(m, idx, dtype=torch.float32):
        si = s.index_select(0, idx).to(dtype) if isinstance(s, torch.Tensor) else s
        return m.velocity(x.index_select(0, idx).to(dtype), t.index_select(0, idx).to(dtype),
                          cond.index_select(idx).to(dtype), si)

    v = model.velocity(x, t, cond, s)
    with torch.no_grad():
        want = torch.empty_like(v)
        want[high], want[low] = rows(model, high), rows(model, low)
        assert torch.equal(v.detach(), want)
        by_row = torch.cat([rows(model, torch.tensor([i])) for i in range(5)])
        model64 = copy.deepcopy(model).double()
        by_row64 = torch.cat([rows(model64, torch.tensor([i]), torch.float64) for i in range(5)])
    assert_within_baseline("mixed batch", v, by_row, by_row64, torch.float32)
    assert model.expert(t[high]) is model.transformer and model.expert(t[low]) is model.transformer_2
    assert (want[high] - rows(WanVelocityModel(model.transformer_2, autocast_dtype=None, text_length=L), high)
            ).abs().max() > 1e-2  # the experts differ: a wrong pick would show

    v.square().mean().backward()
    for name in ("transformer", "transformer_2"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name + ".") and "lora_" in n]
        assert grads and all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    with pytest.raises(ValueError, match=r"cfg_scale must be a float or of shape \[5\]"):
        model.velocity(x, t, cond, torch.ones(3))


def test_low_noise_expert_guides_with_its_own_scale(tiny, tiny2):
    """low_noise_cfg_scale (the pipeline's guidance_scale_2): in a mixed batch the low-noise
    expert's rows equal, bitwise, a call of those rows at that scale, and the high-noise rows
    keep the caller's; cfg_scale 1 guides neither expert (the pipeline decides guidance by
    guidance_scale alone); a one-expert model or folder refuses it."""
    model = _lora_two_experts(tiny2)
    x, cond = _mixed_inputs()
    t = torch.tensor([500.0, 950.0, 874.9, 875.0, 999.0])
    high, low = torch.tensor([1, 3, 4]), torch.tensor([0, 2])
    low_cond = cond.index_select(low)
    with torch.no_grad():
        plain, unguided = model.velocity(x, t, cond, 4.0), model.velocity(x, t, cond, 1.0)
        at_2 = model.velocity(x[low], t[low], low_cond, 2.0)
        model.low_noise_cfg_scale = 2.0
        v = model.velocity(x, t, cond, 4.0)
        assert torch.equal(v[high], plain[high]) and torch.equal(v[low], at_2)
        assert torch.equal(model.velocity(x[low], t[low], low_cond, 4.0), at_2)  # one expert's call alike
        assert (v[low] - plain[low]).abs().max() > 1e-3  # the scale does change them
        assert torch.equal(model.velocity(x, t, cond, 1.0), unguided)
    with pytest.raises(ValueError, match="a per-row cfg_scale tensor with low_noise_cfg_scale set"):
        model.velocity(x, t, cond, torch.full((5,), 4.0))
    with pytest.raises(ValueError, match="low_noise_cfg_scale is the low-noise expert's guidance"):
        WanVelocityModel(model.transformer, low_noise_cfg_scale=2.0)
    with pytest.raises(ValueError, match="model.low_noise_cfg_scale needs a two-expert"):
        build_wan_velocity_model(tiny, low_noise_cfg_scale=2.0, text_length=L)


def test_decoder_equals_the_pipeline_decode(tiny):
    """Per-sample decode of de-normalised latents vs the pipeline's batched decode
    (output_type="pt", [0, 1]): within the tolerance rule of float32 against a float64 VAE."""
    pipe = _pipeline(tiny)
    final = {}

    def keep_latents(pipeline, i, t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    video = pipe(prompt=PROMPTS[:2], height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
                 latents=latents, output_type="pt", max_sequence_length=L, callback_on_step_end=keep_latents).frames
    decoder = WanVideoDecoder(tiny, dtype=torch.float32)
    assert decoder.latent_shape(9, 32, 32) == SHAPE[1:]
    ours = decoder.decode(final["latents"])
    assert ours.shape == (2, 3, 9, 32, 32) and ours.dtype == torch.float32
    with torch.no_grad():
        vae64 = copy.deepcopy(decoder.vae).double()
        stats = [torch.tensor(getattr(pipe.vae.config, k), dtype=torch.float64).view(1, -1, 1, 1, 1)
                 for k in ("latents_std", "latents_mean")]
        z = final["latents"].double() * stats[0] + stats[1]
        ref = vae64.decode(z, return_dict=False)[0]

    def to_unit(v):  # the pipeline's postprocess: [B, 3, F, H, W] in [-1, 1] -> [B, F, 3, H, W] in [0, 1]
        return (v / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    assert_within_baseline("video", to_unit(ours), video, to_unit(ref), torch.float32)
    with pytest.raises(ValueError, match="video.height must be a positive multiple of 16"):
        decoder.latent_shape(9, 24, 32)


def test_lora_targets_and_activation_checkpointing(tiny):
    """LoRA starts as the identity (B = 0: bitwise); checkpointed blocks give the same
    gradients bitwise (the same float32 ops recomputed on CPU)."""
    torch.manual_seed(0)
    model = build_wan_velocity_model(tiny, finetune="lora", lora_rank=4, autocast_dtype=None, text_length=L)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * len(WAN_LORA_TARGETS) * 2 and all("lora_" in n for n in names)
    cond = Conditioning(prompt=WanTextEmbeddings(torch.randn(2, 7, 16), torch.ones(2, 7, dtype=torch.long)))
    x, t = torch.randn(SHAPE), torch.tensor([600.0, 300.0])
    base = WanVelocityModel(load_wan_transformer(tiny), autocast_dtype=None, text_length=L)
    with torch.no_grad():
        assert torch.equal(model.velocity(x, t, cond), base.velocity(x, t, cond))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(generator=torch.Generator().manual_seed(len(n)))

    def grads():
        model.zero_grad()
        model.velocity(x, t, cond).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.transformer.enable_gradient_checkpointing()
    assert model.transformer.gradient_checkpointing
    again = grads()
    assert all(torch.equal(a, b) for a, b in zip(plain, again)) and any(bool(g.abs().sum() > 0) for g in plain)
    with pytest.raises(ValueError, match=r"attn3.*not found"):  # peft refuses an unmatched target
        apply_lora(load_wan_transformer(tiny), target_modules=("attn3.to_q",), block_prefix=WAN_BLOCKS)


def _fake_folder(root, parts, **index):
    root.mkdir(parents=True)
    for p in parts:
        (root / p).mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", **index}))
    return root


def test_folder_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"video\.pipeline='/nonexistent/wan' is not a folder"):
        check_wan_pipeline_folder("/nonexistent/wan")
    no_vae = _fake_folder(tmp_path / "a", ["tokenizer", "text_encoder", "scheduler", "transformer"])
    with pytest.raises(FileNotFoundError, match=r"video\.pipeline=.* lacks the subfolders \['vae'\]"):
        WanVideoDecoder(no_vae)
    with pytest.raises(FileNotFoundError, match=r"reward\.pipeline=.* lacks the subfolders \['text_encoder'\]"):
        WanPromptEncoder(_fake_folder(tmp_path / "b", ["tokenizer"]), field="reward.pipeline")
    moe = _fake_folder(tmp_path / "c", ["tokenizer", "text_encoder", "vae", "scheduler", "transformer"],
                       boundary_ratio=0.875, transformer_2=["diffusers", "WanTransformer3DModel"])
    with pytest.raises(FileNotFoundError, match=r"model\.checkpoint=.* lacks the subfolders \['transformer_2'\]"):
        build_wan_velocity_model(moe)
    half = _fake_folder(tmp_path / "d", ["transformer"], boundary_ratio=0.875, transformer_2=[None, None])
    with pytest.raises(ValueError, match="boundary_ratio=0.875 and transformer_2=.*need both"):
        check_wan_pipeline_folder(half)
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match=r"video\.pipeline=.* has no model_index\.json"):
        check_wan_pipeline_folder(tmp_path / "e")
    other = _fake_folder(tmp_path / "f", [])
    (other / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideo15Pipeline"}))
    with pytest.raises(ValueError, match="is for 'HunyuanVideo15Pipeline', expected 'WanPipeline'"):
        check_wan_pipeline_folder(other)
    ti2v = _fake_folder(tmp_path / "g", [], expand_timesteps=True)
    with pytest.raises(ValueError, match="expand_timesteps=true"):
        check_wan_pipeline_folder(ti2v)
    with pytest.raises(FileNotFoundError, match=r"model\.checkpoint=.*no .*config\.json"):
        load_wan_transformer(no_vae)
    unipc = {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 5.0}
    (no_vae / "scheduler" / "scheduler_config.json").write_text(json.dumps(unipc))
    assert wan_scheduler_shift(no_vae) == 5.0  # the published Wan folders' scheduler
    (no_vae / "scheduler" / "scheduler_config.json").write_text(json.dumps({**unipc, "use_flow_sigmas": False}))
    with pytest.raises(ValueError, match=r"sampler\.shift: scheduler 'UniPCMultistepScheduler' .* no static flow"):
        wan_scheduler_shift(no_vae, field="sampler.shift")


def test_model_config_family_wan_builds_the_two_expert_policy(tiny, tiny2):
    """family='wan': the checkpoint is the pipeline folder, the LoRA targets default to Wan's,
    `experts` chooses which expert trains (its own LoRA; the other frozen, without LoRA), and
    build_policy_model gives the same policy for the same run.seed."""
    cfg = VelocityModelConfig(family="wan", checkpoint=str(tiny2), lora_rank=4, autocast_dtype="none")
    assert cfg.lora_target_modules == WAN_LORA_TARGETS  # the family default replaces the HV1.5 one
    assert VelocityModelConfig().lora_target_modules == DEFAULT_LORA_TARGETS
    back = dataclasses.replace(cfg, family="hunyuanvideo15")  # as a `model.family=` override re-validates
    assert back.lora_target_modules == DEFAULT_LORA_TARGETS
    mine = ("attn1.to_q",)
    assert VelocityModelConfig(family="wan", checkpoint=str(tiny2),
                               lora_target_modules=mine).lora_target_modules == mine
    a, b = build_policy_model(cfg, run_seed=3), build_policy_model(cfg, run_seed=3)
    assert isinstance(a, WanVelocityModel) and a.boundary_timestep == TINY_WAN_BOUNDARY_RATIO * 1000
    assert a.low_noise_cfg_scale is None
    assert build_policy_model(dataclasses.replace(cfg, low_noise_cfg_scale=3), run_seed=3).low_noise_cfg_scale == 3.0
    assert a.transformer.config.num_attention_heads == 2  # what the trainer reads
    assert a.transformer.config.in_channels == TINY_WAN_LATENT_CHANNELS
    trained = {n for n, p in a.named_parameters() if p.requires_grad}
    per_expert = 2 * len(WAN_LORA_TARGETS) * 2  # blocks x targets x (A, B)
    assert all("lora_" in n for n in trained)
    assert sum(n.startswith("transformer.") for n in trained) == sum(n.startswith("transformer_2.") for n in trained)
    assert len(trained) == 2 * per_expert
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    for experts, prefix in (("high", "transformer."), ("low", "transformer_2.")):
        model = build_velocity_model(VelocityModelConfig(family="wan", checkpoint=str(tiny2), experts=experts,
                                                         lora_rank=4, gradient_checkpointing=True))
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert len(trained) == per_expert and all(n.startswith(prefix) for n in trained)
        frozen = model.transformer_2 if experts == "high" else model.transformer
        assert not any("lora_" in n for n, _ in frozen.named_parameters()) and not frozen.gradient_checkpointing
    full = build_velocity_model(VelocityModelConfig(family="wan", checkpoint=str(tiny), finetune="full",
                                                    experts="high"))
    assert full.transformer_2 is None and all(p.requires_grad for p in full.parameters())
    assert full.autocast_dtype is torch.bfloat16


def test_model_config_errors_name_the_field(tiny):
    with pytest.raises(ValueError, match=r"model\.family must be one of \('hunyuanvideo15', 'wan'\), got 'ltx'"):
        VelocityModelConfig(family="ltx")
    with pytest.raises(ValueError, match=r"model\.checkpoint is required for model\.family='wan'"):
        VelocityModelConfig(family="wan")
    with pytest.raises(ValueError, match=r"model\.experts must be one of \('both', 'high', 'low'\), got 'mid'"):
        VelocityModelConfig(family="wan", checkpoint=str(tiny), experts="mid")
    with pytest.raises(ValueError, match=r"model\.experts='high' applies to family 'wan'"):
        VelocityModelConfig(experts="high")
    with pytest.raises(ValueError, match=r"attention backend 'fa2' \(config\) cannot run"):  # no flash-attn here
        build_velocity_model(VelocityModelConfig(family="wan", checkpoint=str(tiny), attention_backend="fa2"))
    with pytest.raises(ValueError, match=r"model\.prediction must be None or 'velocity'"):
        VelocityModelConfig(family="wan", checkpoint=str(tiny), prediction="sample")
    with pytest.raises(ValueError, match=r"model\.experts='low' needs a two-expert .* use 'both' or 'high'"):
        build_velocity_model(VelocityModelConfig(family="wan", checkpoint=str(tiny), experts="low"))
    with pytest.raises(ValueError, match=r"model\.low_noise_cfg_scale=3\.0 applies to family 'wan'"):
        VelocityModelConfig(low_noise_cfg_scale=3.0)
    with pytest.raises(ValueError, match=r"model\.low_noise_cfg_scale must be None or a finite number, got nan"):
        VelocityModelConfig(family="wan", checkpoint=str(tiny), low_noise_cfg_scale=float("nan"))
    with pytest.raises(ValueError, match=r"model\.low_noise_cfg_scale needs a two-expert"):
        build_velocity_model(VelocityModelConfig(family="wan", checkpoint=str(tiny), low_noise_cfg_scale=3.0))


def test_the_attention_backend_is_chosen_once_for_every_expert(tiny2, monkeypatch):
    """model.attention_backend reaches diffusers' Wan processors of both experts (as diffusers
    names it); sdpa and the math kernel agree to float32 rounding, and 'auto' is sdpa on a CPU,
    bitwise the processors' default."""
    monkeypatch.delenv("SAGE_FAST_ATTENTION_BACKEND", raising=False)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900.0, 500.0])  # one row per expert
    text = WanTextEmbeddings(torch.randn(2, L, TINY_WAN_TEXT_DIM, generator=torch.Generator().manual_seed(4)),
                             torch.ones(2, L))
    cond = Conditioning(prompt=text, negative=None)
    out = {}
    for name in ("auto", "sdpa_math"):
        model = build_velocity_model(VelocityModelConfig(family="wan", checkpoint=str(tiny2), attention_backend=name,
                                                         autocast_dtype="none"))
        for expert in (model.transformer, model.transformer_2):
            backends = {m.processor._attention_backend for m in expert.modules() if hasattr(m, "processor")}
            assert backends == {"native" if name == "auto" else "_native_math"}, backends
        with torch.no_grad():
            out[name] = model.velocity(x, t, cond, 1.0)
    default = build_velocity_model(VelocityModelConfig(family="wan", checkpoint=str(tiny2), autocast_dtype="none"))
    for expert in (default.transformer, default.transformer_2):
        for m in expert.modules():
            if hasattr(m, "processor"):
                m.processor._attention_backend = None  # diffusers' own default dispatch
    with torch.no_grad():
        assert torch.equal(default.velocity(x, t, cond, 1.0), out["auto"])
    torch.testing.assert_close(out["sdpa_math"], out["auto"], rtol=1e-5, atol=1e-5)
