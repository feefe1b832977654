"""Wan 2.1 / 2.2 text-to-video (diffusers `WanPipeline`) in the seam HunyuanVideo-1.5 uses:
prompt encoder, video decoder and a velocity model with the trainer's call.

    check_wan_pipeline_folder(folder, field)   every path of a local pipeline folder, checked
                                               before any work; errors name `field`
    WanPromptEncoder(folder)    UMT5 (`text_encoder/`, `tokenizer/`) -> `WanTextEmbeddings`
                                [B, L, 4096], L = max_sequence_length (512), cached per prompt
    WanVideoDecoder(folder)     `vae/` (AutoencoderKLWan): latents [B, 16, T, H, W] -> video
                                [B, 3, 4(T-1)+1, 8H, 8W] in [-1, 1], one sample at a time
    WanVelocityModel            v = velocity(latents_bcthw, timestep_b (= 1000 sigma),
                                             conditioning, cfg_scale)  -> [B, C, T, H, W] float32
    load_wan_transformer, build_wan_velocity_model (LoRA: `lora.apply_lora` with WAN_BLOCKS)

Text. `WanPipeline._get_t5_prompt_embeds` tokenizes with padding="max_length", truncation,
the EOS token, then zeroes every embedding after a prompt's own tokens: the transformer gets
[B, 512, 4096] and **no mask** (its cross-attention attends to all 512 positions, the zero rows
included: they pass through the text projection's biases and take a share of the softmax). So
the padding is part of the input and cannot be trimmed the way HunyuanVideo-1.5's is: the
velocity model zero-pads text to `text_length` (= the pipeline's max_sequence_length) and
refuses longer text. The encoder caches only the real tokens and re-pads on `encode`.
`TextEmbeddings` (conditioning.py) requires the second (ByT5) stream that Wan has not, so the
single stream lives in `WanTextEmbeddings` (same `to` / `index_select`, its own `check`);
`Conditioning` holds it unchanged (it only calls `to` / `index_select` on its text).

Velocity. Wan predicts the flow velocity (noise - data) directly; the pipeline's Euler step is
x <- x + (sigma' - sigma) v with timestep = 1000 sigma, the project's ODE step. Guidance as
`VelocityModel`: one forward of 2B rows ([0, B) negative, [B, 2B) prompt),
v = v_uncond + s (v_cond - v_uncond), s a float or [B]; cfg_scale == 1 runs the prompt rows
only. Precision as `VelocityModel`: float32 parameters, forward under
torch.autocast(autocast_dtype), float32 out (float64 for float64 latents and transformer).
Input checks, guidance and autocast are `velocity`'s shared functions, so the two models'
contract is one piece of code.

Two experts (Wan 2.2 A14B). `transformer` serves the high-noise steps, `transformer_2` the
others, chosen per call exactly as `WanPipeline.__call__` does: `t >= boundary_timestep` ->
`transformer` (boundary_timestep = boundary_ratio * num_train_timesteps = 875 for
T2V-A14B). A call may mix timesteps of both sides (the trainer's micro-batches mix (sample,
step) pairs): each expert then runs one batched forward (CFG as above) on its own rows, picked
with index_select, and the outputs are put back in the input's row order; a row's velocity is
the same as in a call of that expert's rows alone, bitwise. The choice is made on the host, so
a two-expert call cannot be captured in a CUDA graph (it says so when asked to be). The
pipeline's separate `guidance_scale_2` for the low-noise expert is not modelled: the caller's
cfg_scale serves both (the pipeline's default when guidance_scale_2 is None).

Not covered: image-to-video (Wan 2.1 I2V's image embeds, 36 input channels) and Wan 2.2
TI2V-5B (`expand_timesteps`: per-token timesteps); both are refused by the folder check or
the velocity model's constructor. Local folders only: nothing is downloaded.

Leaves to others: the sampler and its schedule (`sage_fast.grpo`), rewards, distribution
(`sage_fast.parallel` hooks `self.transformer`; a second expert is not hooked by it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .conditioning import Conditioning
from .lora import WAN_BLOCKS, WAN_LORA_TARGETS, apply_lora
from .prompt_cache import CachedPromptEncoder
from .velocity import autocast, guide, is_guided, velocity_inputs

__all__ = [
    "WAN_EXPERTS",
    "WAN_LORA_TARGETS",
    "WAN_PIPELINE_PARTS",
    "WAN_TEXT_LENGTH",
    "WanPromptEncoder",
    "WanTextEmbeddings",
    "WanVelocityModel",
    "WanVideoDecoder",
    "build_wan_velocity_model",
    "check_wan_pipeline_folder",
    "load_wan_transformer",
    "wan_boundary_timestep",
    "wan_scheduler_shift",
]

log = logging.getLogger("sage_fast.models.wan")

WAN_PIPELINE_PARTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")
#: the pipeline's max_sequence_length (WanPipeline.__call__'s default; encode_prompt's own is 226)
WAN_TEXT_LENGTH = 512
#: which experts train (`VelocityModelConfig.experts`): both, the high-noise `transformer`, or
#: the low-noise `transformer_2`
WAN_EXPERTS = ("both", "high", "low")


# ---------------------------------------------------------------------------------------------
# The folder


def _model_index(path: Path, field: str) -> dict:
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r} has no model_index.json (a local diffusers WanPipeline "
                                "folder; hub ids are never downloaded)")
    try:
        config = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{field}={str(path)!r}: cannot read model_index.json: {e}") from e
    if config.get("_class_name") != "WanPipeline":
        raise ValueError(f"{field}={str(path)!r}: model_index.json is for {config.get('_class_name')!r}, expected "
                         "'WanPipeline' (Wan 2.1 / 2.2 text-to-video)")
    if config.get("expand_timesteps"):
        raise ValueError(f"{field}={str(path)!r}: expand_timesteps=true (Wan 2.2 TI2V-5B, per-token timesteps) is "
                         "not supported; Wan 2.1 T2V and Wan 2.2 T2V-A14B are")
    return config


def _two_experts(config: dict) -> bool:
    second = config.get("transformer_2") or [None, None]
    return config.get("boundary_ratio") is not None or second[0] is not None


def check_wan_pipeline_folder(folder: str | Path, field: str = "video.pipeline",
                              parts=WAN_PIPELINE_PARTS) -> Path:
    """The folder as a Path after checking model_index.json (a WanPipeline; a boundary_ratio
    and a `transformer_2` together or neither) and the subfolders `parts` (+ `transformer_2/`
    when `transformer` is asked for and the folder has two experts). FileNotFoundError or
    ValueError naming `field` and what is missing."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{field}={str(folder)!r} is not a folder (a local diffusers WanPipeline with "
                                f"{', '.join(WAN_PIPELINE_PARTS)}; hub ids are never downloaded)")
    config = _model_index(path, field)
    parts = list(parts)
    if _two_experts(config):
        second = config.get("transformer_2") or [None, None]
        if config.get("boundary_ratio") is None or second[0] is None:
            raise ValueError(f"{field}={str(folder)!r}: model_index.json sets boundary_ratio="
                             f"{config.get('boundary_ratio')!r} and transformer_2={second!r}; two experts "
                             "(Wan 2.2 A14B) need both, one transformer (Wan 2.1) neither")
        if not 0 < float(config["boundary_ratio"]) < 1:
            raise ValueError(f"{field}={str(folder)!r}: boundary_ratio must lie in (0, 1), "
                             f"got {config['boundary_ratio']!r}")
        if "transformer" in parts:
            parts.append("transformer_2")
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{field}={str(folder)!r} lacks the subfolders {missing} (a diffusers WanPipeline "
                                f"has {', '.join(WAN_PIPELINE_PARTS)}, and transformer_2 for Wan 2.2 A14B)")
    return path


def wan_boundary_timestep(folder: str | Path, field: str = "video.pipeline") -> float | None:
    """boundary_ratio * the scheduler's num_train_timesteps, as WanPipeline.__call__ computes it;
    None for a one-transformer folder."""
    path = check_wan_pipeline_folder(folder, field, parts=("scheduler",))
    ratio = _model_index(path, field).get("boundary_ratio")
    if ratio is None:
        return None
    return float(ratio) * _scheduler_config(path, field).get("num_train_timesteps", 1000)


def _scheduler_config(path: Path, field: str) -> dict:
    file = path / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{field}={str(path)!r}: cannot read scheduler/scheduler_config.json: {e}") from e


def wan_scheduler_shift(folder: str | Path, field: str = "video.pipeline") -> float:
    """The folder's flow shift (sampler.shift): `shift` of a FlowMatchEulerDiscreteScheduler,
    `flow_shift` of the UniPCMultistepScheduler the published Wan folders ship (use_flow_sigmas)."""
    path = check_wan_pipeline_folder(folder, field, parts=("scheduler",))
    config = _scheduler_config(path, field)
    name = config.get("_class_name")
    if config.get("num_train_timesteps", 1000) != 1000:
        raise ValueError(f"{field}: scheduler num_train_timesteps={config['num_train_timesteps']} (the velocity "
                         "model's timestep is 1000 * sigma)")
    if name == "FlowMatchEulerDiscreteScheduler" and not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0))
    if name == "UniPCMultistepScheduler" and config.get("use_flow_sigmas"):
        return float(config.get("flow_shift", 1.0))
    raise ValueError(f"{field}: scheduler {name!r} ({path / 'scheduler'}) has no static flow shift; expected "
                     "FlowMatchEulerDiscreteScheduler(shift=...) or UniPCMultistepScheduler(use_flow_sigmas=true)")


# ---------------------------------------------------------------------------------------------
# Text


@dataclass
class WanTextEmbeddings:
    """UMT5 outputs for B prompts: embeds zero after each prompt's tokens (as the pipeline's),
    mask 1 = real token (informational: the Wan transformer takes no text mask)."""

    embeds_bld: torch.Tensor  # [B, L, text_dim]  (umt5-xxl: 4096)
    mask_bl: torch.Tensor  # [B, L] int64

    def to(self, dtype: torch.dtype | None = None, device=None) -> "WanTextEmbeddings":
        """A copy with the embeddings cast to `dtype` (the mask keeps its own) and moved to `device`."""
        embeds = self.embeds_bld.to(device=device, dtype=dtype if dtype is not None else self.embeds_bld.dtype)
        return WanTextEmbeddings(embeds, self.mask_bl.to(device=device))

    def index_select(self, idx: torch.Tensor) -> "WanTextEmbeddings":
        """The rows `idx` ([K] long, on the tensors' device; rows may repeat)."""
        return WanTextEmbeddings(self.embeds_bld.index_select(0, idx), self.mask_bl.index_select(0, idx))

    def check(self, name: str, batch: int, text_dim: int, text_length: int) -> None:
        e, m = self.embeds_bld, self.mask_bl
        if e.dim() != 3 or e.shape[0] != batch or e.shape[2] != text_dim:
            raise ValueError(f"conditioning.{name}.embeds_bld must be [{batch}, L, {text_dim}] (transformer "
                             f"text_dim), got {tuple(e.shape)}")
        if m.shape != e.shape[:2]:
            raise ValueError(f"conditioning.{name}.mask_bl must be {tuple(e.shape[:2])}, got {tuple(m.shape)}")
        if e.shape[1] > text_length:
            raise ValueError(f"conditioning.{name}: {e.shape[1]} text tokens > text_length={text_length} (the "
                             "pipeline's max_sequence_length; the transformer sees exactly that many)")


def _pad_text(embeds_bld: torch.Tensor, length: int) -> torch.Tensor:
    """Zero rows up to `length` tokens: the pipeline's padding, part of the transformer's input."""
    return nn.functional.pad(embeds_bld, (0, 0, 0, length - embeds_bld.shape[1]))


def _prompt_clean():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # noqa: PLC0415

    return prompt_clean


class WanPromptEncoder(CachedPromptEncoder):
    """The pipeline's UMT5 encoder; `encode(prompts)` -> WanTextEmbeddings [B, L, D] float32, CPU.

    Equal to `WanPipeline.encode_prompt(..., max_sequence_length=L)` (its prompt cleaning,
    tokenizer settings and zero padding; bitwise for the same batch and dtype). The cache keeps
    each prompt's real tokens in the encoder's dtype (bf16 by default) on the host;
    `encode_all`, `released` and `release` come from `CachedPromptEncoder`.
    """

    log = log

    def __init__(self, folder: str | Path, device="cpu", dtype: torch.dtype = torch.bfloat16,
                 max_sequence_length: int = WAN_TEXT_LENGTH, field: str = "video.pipeline") -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel  # noqa: PLC0415

        path = check_wan_pipeline_folder(folder, field, ("tokenizer", "text_encoder"))
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be an int >= 1, got {max_sequence_length!r}")
        self.device, self.dtype, self.max_sequence_length = torch.device(device), dtype, max_sequence_length
        self.tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        self.text_encoder = UMT5EncoderModel.from_pretrained(path / "text_encoder", dtype=dtype,
                                                             local_files_only=True).to(self.device).eval()
        self._clean = _prompt_clean()
        super().__init__()  # the cache: prompt -> [n, D] embeddings of its real tokens

    @torch.no_grad()
    def _encode_batch(self, prompts: list[str]) -> list[torch.Tensor]:
        inputs = self.tokenizer([self._clean(p) for p in prompts], padding="max_length",
                                max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
        embeds = self.text_encoder(ids, mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [embeds[i, :n].cpu().clone() for i, n in enumerate(lengths)]  # [n_i, D]: real tokens only

    def encode(self, prompts: list[str]) -> WanTextEmbeddings:
        """[B, max_sequence_length, D] float32 with zeros after each prompt's tokens, and the mask."""
        self.encode_all(prompts)
        rows = [self._cache[p] for p in prompts]
        embeds = torch.stack([_pad_text(r[None].float(), self.max_sequence_length)[0] for r in rows])
        mask = (torch.arange(self.max_sequence_length)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
        return WanTextEmbeddings(embeds, mask)


# ---------------------------------------------------------------------------------------------
# Video


class WanVideoDecoder:
    """The pipeline's VAE: `decode(latents)` -> video in [-1, 1], float32, on the latents' device.

    The latents are de-normalised as WanPipeline does before decoding (z * latents_std +
    latents_mean per channel, written as the pipeline writes it), then decoded one sample at a
    time (bounded memory; the pipeline decodes the batch at once: equal up to float rounding).
    `tiling` (default off, as the pipeline) trades exactness for memory on large frames.
    """

    def __init__(self, folder: str | Path, device="cpu", dtype: torch.dtype = torch.bfloat16,
                 tiling: bool = False, field: str = "video.pipeline") -> None:
        from diffusers import AutoencoderKLWan  # noqa: PLC0415

        path = check_wan_pipeline_folder(folder, field, ("vae",))
        self.device, self.dtype = torch.device(device), dtype
        self.vae = AutoencoderKLWan.from_pretrained(path / "vae", dtype=dtype,
                                                    local_files_only=True).to(self.device).eval()
        self.vae.requires_grad_(False)
        if tiling:
            self.vae.enable_tiling()
        cfg = self.vae.config
        self.latent_channels = cfg.z_dim
        self.spatial, self.temporal = cfg.scale_factor_spatial, cfg.scale_factor_temporal
        self.latents_mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        self.latents_std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)

    def latent_shape(self, frames: int, height: int, width: int, patch: int = 2) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents; errors name the video field and the allowed values
        (height and width: multiples of spatial * patch, 16 for Wan's 2x2 patches)."""
        if frames < 1 or (frames - 1) % self.temporal:
            raise ValueError(f"video.frames must be {self.temporal}k+1 (the VAE compresses time "
                             f"{self.temporal}x), got {frames}")
        step = self.spatial * patch
        for name, value in (("height", height), ("width", width)):
            if value < step or value % step:
                raise ValueError(f"video.{name} must be a positive multiple of {step} (the VAE compresses space "
                                 f"{self.spatial}x, the transformer patches {patch}x{patch}), got {value}")
        return (self.latent_channels, (frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial)

    @torch.no_grad()
    def decode(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        mean = self.latents_mean.to(self.device, self.dtype)
        inv_std = 1.0 / self.latents_std.to(self.device, self.dtype)
        out = []
        for z in latents_bcthw.split(1):
            z = z.to(device=self.device, dtype=self.dtype) / inv_std + mean
            out.append(self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1))
        return torch.cat(out).to(latents_bcthw.device)


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
                 text_length: int = WAN_TEXT_LENGTH) -> None:
        super().__init__()
        if (transformer_2 is None) != (boundary_timestep is None):
            raise ValueError("transformer_2 and boundary_timestep go together (Wan 2.2 A14B) or not at all (Wan 2.1)")
        if boundary_timestep is not None and not 0 < float(boundary_timestep) < 1000:
            raise ValueError(f"boundary_timestep must lie in (0, 1000), got {boundary_timestep!r}")
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_timestep = None if boundary_timestep is None else float(boundary_timestep)
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
        if n_high in (0, B):
            expert = self.transformer if n_high == B else self.transformer_2
            return self._expert_velocity(expert, latents_bcthw, timestep_b, conditioning, cfg_scale, guided, out_dtype)
        # mixed batch: each expert one forward on its rows, the outputs put back in row order
        per_row_scale = isinstance(cfg_scale, torch.Tensor) and cfg_scale.dim() == 1
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
        """One forward of `expert` on B rows (2B with guidance), text checked by the caller."""
        B, device = latents_bcthw.shape[0], latents_bcthw.device
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


def build_wan_velocity_model(folder: str | Path, *, finetune: str = "lora", experts: str = "both",
                             lora_rank: int = 32, lora_alpha: float = 32.0, lora_targets=WAN_LORA_TARGETS,
                             gradient_checkpointing: bool = False, autocast_dtype: torch.dtype | None = torch.bfloat16,
                             text_length: int = WAN_TEXT_LENGTH, device="cpu",
                             field: str = "model.checkpoint") -> WanVelocityModel:
    """The policy from a pipeline folder: its transformer(s) (both experts and the boundary for
    Wan 2.2 A14B). `experts` ('both', 'high', 'low'; a one-expert folder: 'both' or 'high')
    chooses which train: each trained expert gets its own LoRA (or all its weights trainable
    with finetune='full') and activation checkpointing per block when asked (diffusers'
    `enable_gradient_checkpointing`); the others are frozen, without LoRA. LoRA's A matrices
    draw from the global RNG, `transformer`'s first (`build_policy_model` seeds it)."""
    if finetune not in ("lora", "full"):
        raise ValueError(f"finetune must be one of ('lora', 'full'), got {finetune!r}")
    if experts not in WAN_EXPERTS:
        raise ValueError(f"model.experts must be one of {WAN_EXPERTS}, got {experts!r}")
    check_wan_pipeline_folder(folder, field, parts=("transformer", "scheduler"))
    boundary = wan_boundary_timestep(folder, field)
    if boundary is None and experts == "low":
        raise ValueError(f"model.experts='low' needs a two-expert (Wan 2.2 A14B) folder; {field}={str(folder)!r} "
                         "has one transformer: use 'both' or 'high'")
    models = [load_wan_transformer(folder, "transformer", device, field)]
    if boundary is not None:
        models.append(load_wan_transformer(folder, "transformer_2", device, field))
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
                            autocast_dtype=autocast_dtype, text_length=text_length)
