"""Wan 2.1 / 2.2 pipeline parts (diffusers `WanPipeline` folders): the folder checks, the prompt
encoder and the video decoder that `task.WanTask` uses; the policy is `wan.py`.

    check_wan_pipeline_folder(folder, field)   every path of a local pipeline folder, checked
                                               before any work; errors name `field`
    WanPromptEncoder(folder)    UMT5 (`text_encoder/`, `tokenizer/`) -> `WanTextEmbeddings`
                                [B, L, 4096], L = max_sequence_length (512), cached per prompt
    WanVideoDecoder(folder)     `vae/` (AutoencoderKLWan): latents [B, 16, T, H, W] -> video
                                [B, 3, 4(T-1)+1, 8H, 8W] in [-1, 1], one sample at a time
    wan_scheduler_shift, wan_boundary_timestep   what the folder's scheduler and model_index say

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

Local folders only: nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .prompt_cache import CachedPromptEncoder

__all__ = ["WAN_EXPERTS", "WAN_PIPELINE_PARTS", "WAN_TEXT_LENGTH", "WanPromptEncoder", "WanTextEmbeddings",
           "WanVideoDecoder", "check_wan_pipeline_folder", "wan_boundary_timestep", "wan_scheduler_shift"]

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
