"""Wan 2.1 / 2.2 text-to-video (diffusers `WanPipeline`) in the seam HunyuanVideo-1.5 uses: the
velocity model with the trainer's call; the folder checks, prompt encoder and decoder are in
`wan_pipeline.py` (re-exported here).

    WanVelocityModel            v = velocity(latents_bcthw, timestep_b (= 1000 sigma),
                                             conditioning, cfg_scale)  -> [B, C, T, H, W] float32
    load_wan_transformer, build_wan_velocity_model (LoRA: `lora.apply_lora` with WAN_BLOCKS)

Velocity. Wan predicts the flow velocity (noise - data) directly; the pipeline's Euler step is
x <- x + (sigma' - sigma) v with timestep = 1000 sigma, the project's ODE step. Guidance as
`VelocityModel`: one forward of 2B rows ([0, B) negative, [B, 2B) prompt),
v = v_uncond + s (v_cond - v_uncond), s a float or [B]; cfg_scale == 1 runs the prompt rows
only. Precision as `VelocityModel`: float32 parameters, forward under
torch.autocast(autocast_dtype), float32 out (float64 for float64 latents and transformer).
The text is padded as `wan_pipeline.py` describes. Input checks, guidance and autocast are `velocity`'s shared functions, so the two models'
contract is one piece of code.

Two experts (Wan 2.2 A14B). `transformer` serves the high-noise steps, `transformer_2` the
others, chosen per call exactly as `WanPipeline.__call__` does: `t >= boundary_timestep` ->
`transformer` (boundary_timestep = boundary_ratio * num_train_timesteps = 875 for
T2V-A14B). A call may mix timesteps of both sides (the trainer's micro-batches mix (sample,
step) pairs): each expert then runs one batched forward (CFG as above) on its own rows, picked
with index_select, and the outputs are put back in the input's row order; a row's velocity is
the same as in a call of that expert's rows alone, bitwise. The choice is made on the host, so
a two-expert call cannot be captured in a CUDA graph (it says so when asked to be).
Under FSDP2 every forward and backward of an expert is a collective, so every rank must run
the same experts in each call: the strategy sets `sync_experts` (this rank's experts in use
-> those any rank uses, one small all-reduce per call), and an expert another rank needs but
this call has no row for runs on a stand-in (the call's first row) whose output is discarded
and whose backward receives an exact zero gradient (`_StandIn`): the velocity is unchanged
bitwise and the stand-in adds nothing to any gradient. Rollout steps share one timestep on
every rank, so only the training's mixed micro-batches pay a stand-in (one row, two with CFG).
Guidance per expert: `low_noise_cfg_scale` (the pipeline's `guidance_scale_2`; the Wan 2.2
release samples T2V-A14B with 4.0 high, 3.0 low) replaces the caller's cfg_scale on the rows
`transformer_2` serves, whenever the call is guided; None (the pipeline's default) uses the
caller's scale for both. Whether a call is guided is the caller's scale alone (cfg_scale == 1:
no guidance on either expert), as the pipeline decides by `guidance_scale`; with it set, the
caller's scale is one float (a per-row tensor is refused).

Not covered: image-to-video (Wan 2.1 I2V's image embeds, 36 input channels) and Wan 2.2
TI2V-5B (`expand_timesteps`: per-token timesteps); both are refused by the folder check or
the velocity model's constructor. Local folders only: nothing is downloaded.

Leaves to others: the sampler and its schedule (`sage_fast.grpo`), rewards, distribution
(`sage_fast.parallel` shards and hooks each expert and sets `sync_experts`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from sage_fast.attention.backends import choose_backend

from .conditioning import Conditioning
from .lora import WAN_BLOCKS, WAN_LORA_TARGETS, apply_lora
from .velocity import autocast, guide, is_guided, velocity_inputs
from .wan_pipeline import (WAN_EXPERTS, WAN_PIPELINE_PARTS, WAN_TEXT_LENGTH, WanPromptEncoder, WanTextEmbeddings,
                           WanVideoDecoder, _pad_text, check_wan_pipeline_folder, wan_boundary_timestep,
                           wan_scheduler_shift)

__all__ = [
    "WAN_EXPERTS",
    "WAN_LORA_TARGETS",
    "WAN_PIPELINE_PARTS",
    "WAN_TEXT_LENGTH",
    "WanPromptEncoder",
    "WanTextEmbeddings",
    "DIFFUSERS_ATTENTION",
    "WanVelocityModel",
    "WanVideoDecoder",
    "build_wan_velocity_model",
    "check_wan_pipeline_folder",
    "load_wan_transformer",
    "wan_boundary_timestep",
    "wan_scheduler_shift",
]

log = logging.getLogger("sage_fast.models.wan")

#: the project's attention backends (sage_fast.attention) as diffusers' attention dispatcher names them
DIFFUSERS_ATTENTION = {"fa3": "_flash_3", "fa2": "flash", "xformers": "xformers", "sdpa": "native",
                       "sdpa_math": "_native_math"}


# ---------------------------------------------------------------------------------------------
# Transformer


def load_wan_transformer(folder: str | Path, subfolder: str | None = "transformer", device="cpu",
                         field: str = "model.checkpoint") -> nn.Module:
    """A WanTransformer3DModel from local files only, as float32, strictly: ValueError listing
    missing, unexpected and mis-shaped tensors. `folder`: a pipeline folder (`subfolder`
    "transformer" or "transformer_2") or a model folder (`subfolder=None`)."""
    from diffusers import WanTransformer3DModel  # noqa: PLC0415

    path = Path(folder) if subfolder is None else Path(folder) / subfolder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{field}={str(folder)!r}: no {path / 'config.json'} (a local WanTransformer3DModel "
                                "folder; hub ids are never downloaded)")
    class_name = json.loads((path / "config.json").read_text()).get("_class_name")
    if class_name != "WanTransformer3DModel":
        raise ValueError(f"{field}={str(folder)!r}: {path / 'config.json'} is for {class_name!r}, expected "
                         "'WanTransformer3DModel'")
    model, info = WanTransformer3DModel.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                                        output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise ValueError(f"{field}={str(folder)!r}: {path} does not match its config: {bad}")
    log.info("loaded WanTransformer3DModel from %s", path)
    return model.to(device)


class WanVelocityModel(nn.Module):
    """One or two WanTransformer3DModel experts behind the trainer's `velocity` (module doc).

    transformer: the (high-noise) expert; transformer_2 and boundary_timestep (in timestep
    units, 0 < b < 1000): Wan 2.2 A14B's low-noise expert and the switch, both or neither.
    text_length: tokens the transformer sees (the pipeline's max_sequence_length, 512).
    Both experts are submodules: `named_parameters()` / `state_dict()` hold `transformer.*` and
    `transformer_2.*` (each expert's LoRA included).
    """

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module | None = None,
                 boundary_timestep: float | None = None, autocast_dtype: torch.dtype | None = torch.bfloat16,
                 text_length: int = WAN_TEXT_LENGTH, low_noise_cfg_scale: float | None = None) -> None:
        super().__init__()
        if (transformer_2 is None) != (boundary_timestep is None):
            raise ValueError("transformer_2 and boundary_timestep go together (Wan 2.2 A14B) or not at all (Wan 2.1)")
        if boundary_timestep is not None and not 0 < float(boundary_timestep) < 1000:
            raise ValueError(f"boundary_timestep must lie in (0, 1000), got {boundary_timestep!r}")
        if low_noise_cfg_scale is not None and transformer_2 is None:
            raise ValueError("low_noise_cfg_scale is the low-noise expert's guidance: it needs transformer_2 "
                             "(Wan 2.2 A14B)")
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_timestep = None if boundary_timestep is None else float(boundary_timestep)
        self.low_noise_cfg_scale = None if low_noise_cfg_scale is None else float(low_noise_cfg_scale)
        self.autocast_dtype, self.text_length = autocast_dtype, text_length
        cfg = transformer.config
        for name, t in (("transformer", transformer), ("transformer_2", transformer_2)):
            if t is None:
                continue
            c = t.config
            if c.in_channels != c.out_channels or c.image_dim is not None:
                raise ValueError(f"{name}: in_channels={c.in_channels}, out_channels={c.out_channels}, image_dim="
                                 f"{c.image_dim}: only text-to-video (in == out channels, no image embeds) "
                                 "is supported")
            if (c.out_channels, c.text_dim) != (cfg.out_channels, cfg.text_dim):
                raise ValueError(f"transformer_2 (channels {c.out_channels}, text_dim {c.text_dim}) does not match "
                                 f"transformer ({cfg.out_channels}, {cfg.text_dim})")
        self.latent_channels, self.text_dim = cfg.out_channels, cfg.text_dim
        #: None, or `sync(used) -> run`: (high, low) experts this call uses -> those to run, the
        #: union over the ranks (set by the FSDP2 strategy; module doc)
        self.sync_experts = None

    def _high_rows(self, timestep_b: torch.Tensor) -> torch.Tensor:
        """[B] bool, True where `transformer` serves (WanPipeline.__call__'s rule: t >= boundary,
        compared in float32 as its timesteps are). Read on the host: not capturable."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a two-expert model picks its expert on the host per call; it cannot be captured "
                               "in one CUDA graph")
        return timestep_b.float() >= self.boundary_timestep

    def expert(self, timestep_b: torch.Tensor) -> nn.Module:
        """The one transformer serving all of `timestep_b` [B]; ValueError when they lie on both
        sides of the boundary (`velocity` splits such a batch by expert)."""
        if self.transformer_2 is None:
            return self.transformer
        high = self._high_rows(timestep_b)
        n_high = int(high.sum())
        if n_high == high.numel():
            return self.transformer
        if n_high == 0:
            return self.transformer_2
        raise ValueError(f"timesteps {timestep_b.tolist()} lie on both sides of boundary_timestep="
                         f"{self.boundary_timestep} (two experts): no one expert serves them")

    def trains(self, timestep: float) -> bool:
        """Whether the expert serving `timestep` (1000 sigma) has trainable parameters
        (`model.experts`): the trainer trains only the steps of a trained expert."""
        expert = self.transformer
        if self.boundary_timestep is not None and not float(timestep) >= self.boundary_timestep:
            expert = self.transformer_2
        return any(p.requires_grad for p in expert.parameters())

    def forward(self, latents_bcthw, timestep, conditioning, cfg_scale=1.0):
        return self.velocity(latents_bcthw, timestep, conditioning, cfg_scale)

    def velocity(self, latents_bcthw: torch.Tensor, timestep, conditioning: Conditioning,
                 cfg_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """The (guided) velocity for B samples; see the module docstring for the contract."""
        out_dtype, timestep_b = velocity_inputs(latents_bcthw, timestep, self.latent_channels)
        B, device = latents_bcthw.shape[0], latents_bcthw.device
        if conditioning.image_embeds_bnd is not None or conditioning.cond_latents_bcthw is not None:
            raise ValueError("Wan text-to-video takes no image embeds or condition latents")
        guided = is_guided(cfg_scale)
        conditioning.prompt.check("prompt", B, self.text_dim, self.text_length)
        if guided:
            if conditioning.negative is None:
                raise ValueError("conditioning.negative is required when cfg_scale != 1")
            conditioning.negative.check("negative", B, self.text_dim, self.text_length)
        if self.transformer_2 is None:
            return self._expert_velocity(self.transformer, latents_bcthw, timestep_b, conditioning, cfg_scale,
                                         guided, out_dtype)
        high = self._high_rows(timestep_b)
        n_high = int(high.sum())
        per_row_scale = isinstance(cfg_scale, torch.Tensor) and cfg_scale.dim() == 1
        if per_row_scale and self.low_noise_cfg_scale is not None:
            raise ValueError("a per-row cfg_scale tensor with low_noise_cfg_scale set: give one float (the low-noise "
                             "expert's rows use low_noise_cfg_scale), or set low_noise_cfg_scale to None")
        used = (n_high > 0, n_high < B)
        run = used if self.sync_experts is None else tuple(self.sync_experts(used))
        if run == used:
            if n_high in (0, B):
                expert = self.transformer if n_high == B else self.transformer_2
                return self._expert_velocity(expert, latents_bcthw, timestep_b, conditioning, cfg_scale, guided,
                                             out_dtype)
            return self._mixed_velocity(high, latents_bcthw, timestep_b, conditioning, cfg_scale, per_row_scale,
                                        guided, out_dtype)
        # all rows on one side, and another rank runs the other expert: a stand-in forward of it
        # (module doc), in the experts' order on every rank (their collectives must pair up)
        first = torch.zeros(1, dtype=torch.long, device=device)
        first_cond = conditioning.index_select(first.to(conditioning.prompt.embeds_bld.device))
        first_scale = cfg_scale.to(device)[:1] if per_row_scale else cfg_scale
        out, stand_ins = None, []
        for expert, serves in zip((self.transformer, self.transformer_2), used):
            if serves:
                out = self._expert_velocity(expert, latents_bcthw, timestep_b, conditioning, cfg_scale, guided,
                                            out_dtype)
            else:
                stand_ins.append(self._expert_velocity(expert, latents_bcthw[:1], timestep_b[:1], first_cond,
                                                       first_scale, guided, out_dtype))
        return _StandIn.apply(out, *stand_ins)

    def _mixed_velocity(self, high, latents_bcthw, timestep_b, conditioning, cfg_scale, per_row_scale, guided,
                        out_dtype):
        """Rows on both sides of the boundary: each expert one forward on its rows, the outputs
        put back in row order."""
        B, device = latents_bcthw.shape[0], latents_bcthw.device
        if per_row_scale and cfg_scale.shape != (B,):
            raise ValueError(f"cfg_scale must be a float or of shape [{B}], got {tuple(cfg_scale.shape)}")
        parts, rows = [], []
        for expert, mask in ((self.transformer, high), (self.transformer_2, ~high)):
            idx = mask.nonzero().squeeze(1)  # [K] this expert's rows, ascending
            scale = cfg_scale.to(device).index_select(0, idx) if per_row_scale else cfg_scale
            cond = conditioning.index_select(idx.to(conditioning.prompt.embeds_bld.device))
            parts.append(self._expert_velocity(expert, latents_bcthw.index_select(0, idx),
                                               timestep_b.index_select(0, idx), cond, scale, guided, out_dtype))
            rows.append(idx)
        order = torch.cat(rows)  # [B]: the input row behind each row of torch.cat(parts)
        return torch.cat(parts).index_select(0, torch.argsort(order))

    def _expert_velocity(self, expert: nn.Module, latents_bcthw: torch.Tensor, timestep_b: torch.Tensor,
                         conditioning: Conditioning, cfg_scale, guided: bool, out_dtype: torch.dtype) -> torch.Tensor:
        """One forward of `expert` on B rows (2B with guidance), text checked by the caller; the
        low-noise expert guides with its own scale when it has one (module doc)."""
        B, device = latents_bcthw.shape[0], latents_bcthw.device
        if guided and expert is self.transformer_2 and self.low_noise_cfg_scale is not None:
            cfg_scale = self.low_noise_cfg_scale
        text = _pad_text(conditioning.prompt.embeds_bld, self.text_length)
        x_in, timestep_in = latents_bcthw, timestep_b
        if guided:
            # rows [0, B): negative text; rows [B, 2B): prompt; row i <-> row B + i
            text = torch.cat([_pad_text(conditioning.negative.embeds_bld, self.text_length), text])
            x_in, timestep_in = torch.cat([x_in, x_in]), torch.cat([timestep_b, timestep_b])
        with autocast(self.autocast_dtype, device):
            out = expert(hidden_states=x_in, timestep=timestep_in, encoder_hidden_states=text.to(x_in.dtype),
                         return_dict=False)[0]
        out = out.to(out_dtype)
        return guide(out, B, cfg_scale) if guided else out


class _StandIn(torch.autograd.Function):
    """`out` unchanged; the stand-in outputs get an exact zero gradient, so their experts'
    backwards (collectives under FSDP2) run on every rank and add nothing."""

    @staticmethod
    def forward(ctx, out, *stand_ins):
        ctx.shapes = [(s.shape, s.dtype, s.device) for s in stand_ins]
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=dev) for shape, dtype, dev in ctx.shapes))


def build_wan_velocity_model(folder: str | Path, *, finetune: str = "lora", experts: str = "both",
                             lora_rank: int = 32, lora_alpha: float = 32.0, lora_targets=WAN_LORA_TARGETS,
                             gradient_checkpointing: bool = False, autocast_dtype: torch.dtype | None = torch.bfloat16,
                             text_length: int = WAN_TEXT_LENGTH, device="cpu", attention_backend: str = "auto",
                             low_noise_cfg_scale: float | None = None,
                             field: str = "model.checkpoint") -> WanVelocityModel:
    """The policy from a pipeline folder: its transformer(s) (both experts and the boundary for
    Wan 2.2 A14B). `experts` ('both', 'high', 'low'; a one-expert folder: 'both' or 'high')
    chooses which train: each trained expert gets its own LoRA (or all its weights trainable
    with finetune='full') and activation checkpointing per block when asked (diffusers'
    `enable_gradient_checkpointing`); the others are frozen, without LoRA. LoRA's A matrices
    draw from the global RNG, `transformer`'s first (`build_policy_model` seeds it).
    low_noise_cfg_scale: the low-noise expert's guidance (module doc); a two-expert folder only."""
    if finetune not in ("lora", "full"):
        raise ValueError(f"finetune must be one of ('lora', 'full'), got {finetune!r}")
    if experts not in WAN_EXPERTS:
        raise ValueError(f"model.experts must be one of {WAN_EXPERTS}, got {experts!r}")
    check_wan_pipeline_folder(folder, field, parts=("transformer", "scheduler"))
    boundary = wan_boundary_timestep(folder, field)
    if boundary is None and low_noise_cfg_scale is not None:
        raise ValueError(f"model.low_noise_cfg_scale needs a two-expert (Wan 2.2 A14B) folder; {field}="
                         f"{str(folder)!r} has one transformer: leave it None")
    if boundary is None and experts == "low":
        raise ValueError(f"model.experts='low' needs a two-expert (Wan 2.2 A14B) folder; {field}={str(folder)!r} "
                         "has one transformer: use 'both' or 'high'")
    models = [load_wan_transformer(folder, "transformer", device, field)]
    if boundary is not None:
        models.append(load_wan_transformer(folder, "transformer_2", device, field))
    # the attention backend, chosen once and logged as for HunyuanVideo-1.5, run by diffusers' Wan processor
    backend = DIFFUSERS_ATTENTION[choose_backend(attention_backend, device).name]
    for t in models:
        t.set_attention_backend(backend)
    trained = {"both": (True, True), "high": (True, False), "low": (False, True)}[experts]
    for t, train in zip(models, trained):
        if not train:
            t.requires_grad_(False)
        elif finetune == "lora":
            apply_lora(t, lora_rank, lora_alpha, lora_targets, block_prefix=WAN_BLOCKS)
        else:
            t.requires_grad_(True)
        if train and gradient_checkpointing:
            t.enable_gradient_checkpointing()
    return WanVelocityModel(models[0], models[1] if boundary is not None else None, boundary,
                            autocast_dtype=autocast_dtype, text_length=text_length,
                            low_noise_cfg_scale=low_noise_cfg_scale)
