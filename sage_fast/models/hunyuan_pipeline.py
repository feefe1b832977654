"""The rest of a HunyuanVideo-1.5 pipeline around the transformer: its two text encoders and its VAE.

    PromptEncoder(folder)   Qwen2.5-VL text model (`text_encoder/`, `tokenizer/`) and the ByT5
                            glyph encoder (`text_encoder_2/`, `tokenizer_2/`) of a local diffusers
                            pipeline folder -> `TextEmbeddings` per prompt, computed once and cached.
    VideoDecoder(folder)    its `vae/` (AutoencoderKLHunyuanVideo15): latents [B, 32, T, H, W] ->
                            video [B, 3, 4(T-1)+1, 16H, 16W] in [-1, 1], one sample at a time.

Prompts are encoded exactly as diffusers' `HunyuanVideo15Pipeline.encode_prompt` does (its own
static helpers, chat template, system message, crop and lengths), then each prompt's padding is
cut to its own length: the transformer masks padded text tokens (diffusers' forward moves the
valid tokens first), and a 1000-token padded Qwen embedding costs 7 MB per prompt in bf16 where
a 120-token prompt needs 0.86 MB. The cache keeps the encoders' dtype (bf16 by default) on the
host; batches come out float32. GRPO encodes a fixed prompt set, so `encode_all` runs the 7B
encoder once and `release` frees it. Every rank encodes every prompt (simple, but the encoding
time and the host cache are repeated per rank: sharding it over ranks is not done).

Local folders only: nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .conditioning import TextEmbeddings, stack_text
from .prompt_cache import CachedPromptEncoder

__all__ = ["PIPELINE_PARTS", "PromptEncoder", "VideoDecoder", "check_pipeline_folder"]

log = logging.getLogger("sage_fast.models.hunyuan_pipeline")

PIPELINE_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")


def check_pipeline_folder(folder: str | Path, parts=PIPELINE_PARTS, field: str = "video.pipeline") -> Path:
    """The folder as a Path, or a FileNotFoundError naming `field` and what is missing."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{field}={str(folder)!r} is not a folder (a local diffusers HunyuanVideo-1.5 "
                                f"pipeline with {', '.join(parts)}; hub ids are never downloaded)")
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"{field}={str(folder)!r} lacks the subfolders {missing} (a diffusers "
                                f"HunyuanVideo-1.5 pipeline has {', '.join(PIPELINE_PARTS)})")
    return path


def _pipeline_class():
    from diffusers import HunyuanVideo15Pipeline  # noqa: PLC0415

    return HunyuanVideo15Pipeline


class PromptEncoder(CachedPromptEncoder):
    """Both text encoders of a pipeline folder; `encode(prompts)` -> TextEmbeddings (cached, CPU).
    `encode_all`, `released` and `release` (both encoders) come from `CachedPromptEncoder`."""

    ENCODERS = ("text_encoder", "text_encoder_2")
    log = log

    # diffusers' HunyuanVideo15Pipeline constants (see its __init__)
    MAX_LENGTH, MAX_LENGTH_2, CROP_START = 1000, 256, 108

    def __init__(self, folder: str | Path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> None:
        from transformers import AutoTokenizer, ByT5Tokenizer, Qwen2_5_VLTextModel, T5EncoderModel  # noqa: PLC0415

        path = check_pipeline_folder(folder, ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        self.device, self.dtype = torch.device(device), dtype
        self.tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        self.text_encoder = Qwen2_5_VLTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype,
                                                                local_files_only=True).to(self.device).eval()
        self.tokenizer_2 = ByT5Tokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)
        self.text_encoder_2 = T5EncoderModel.from_pretrained(path / "text_encoder_2", torch_dtype=dtype,
                                                             local_files_only=True).to(self.device).eval()
        self.system_message = _system_message()
        super().__init__()  # the cache: prompt -> TextEmbeddings [1, n, D] in the encoders' dtype

    @torch.no_grad()
    def _encode_batch(self, prompts: list[str]) -> list[TextEmbeddings]:
        pipe = _pipeline_class()
        emb, mask = pipe._get_mllm_prompt_embeds(self.text_encoder, self.tokenizer, prompts, self.device,
                                                 tokenizer_max_length=self.MAX_LENGTH,
                                                 system_message=self.system_message, crop_start=self.CROP_START)
        emb_2, mask_2 = pipe._get_byt5_prompt_embeds(self.tokenizer_2, self.text_encoder_2, prompts, self.device,
                                                     tokenizer_max_length=self.MAX_LENGTH_2)
        out = []
        for i in range(len(prompts)):
            n1 = max(int(mask[i].sum()), 1)  # keep one (masked) token for an all-padding stream
            n2 = max(int(mask_2[i].sum()), 1)
            # right padding: the real tokens come first (checked, not assumed)
            if mask[i, :n1].sum() != mask[i].sum() or mask_2[i, :n2].sum() != mask_2[i].sum():
                raise ValueError("text encoder masks are not right-padded; cannot trim the padding")
            # kept in the encoders' dtype (bf16 by default): half the host memory of float32
            out.append(TextEmbeddings(emb[i:i + 1, :n1].cpu().clone(), mask[i:i + 1, :n1].cpu().clone(),
                                      emb_2[i:i + 1, :n2].cpu().clone(), mask_2[i:i + 1, :n2].cpu().clone()))
        return out

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        """The batch [B, L, D] (padded to the longest prompt of the batch, mask 0), on CPU, float32."""
        self.encode_all(prompts)
        return TextEmbeddings(*stack_text([self._cache[p] for p in prompts])).to(dtype=torch.float32)


def _system_message() -> str:
    """The pipeline's system message (the default of its prompt helper, the same text its __init__ sets)."""
    import inspect  # noqa: PLC0415

    return inspect.signature(_pipeline_class()._get_mllm_prompt_embeds).parameters["system_message"].default


class VideoDecoder:
    """The pipeline's VAE: `decode(latents)` -> video in [-1, 1], float32, on the latents' device."""

    def __init__(self, folder: str | Path, device="cpu", dtype: torch.dtype = torch.bfloat16,
                 tiling: bool = True) -> None:
        from diffusers import AutoencoderKLHunyuanVideo15  # noqa: PLC0415

        path = check_pipeline_folder(folder, ("vae",))
        self.device, self.dtype = torch.device(device), dtype
        self.vae = AutoencoderKLHunyuanVideo15.from_pretrained(path / "vae", torch_dtype=dtype,
                                                                local_files_only=True).to(self.device).eval()
        self.vae.requires_grad_(False)
        if tiling:
            self.vae.enable_tiling()
        cfg = self.vae.config
        self.latent_channels = cfg.latent_channels
        self.spatial, self.temporal = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
        self.scaling_factor = cfg.scaling_factor

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents; errors name the video field and the allowed values."""
        if frames < 1 or (frames - 1) % self.temporal:
            raise ValueError(f"video.frames must be {self.temporal}k+1 (the VAE compresses time "
                             f"{self.temporal}x), got {frames}")
        for name, value in (("height", height), ("width", width)):
            if value < self.spatial or value % self.spatial:
                raise ValueError(f"video.{name} must be a positive multiple of {self.spatial} (the VAE "
                                 f"compresses space {self.spatial}x), got {value}")
        return (self.latent_channels, (frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial)

    @torch.no_grad()
    def decode(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        out = []
        for z in latents_bcthw.split(1):
            z = z.to(device=self.device, dtype=self.dtype) / self.scaling_factor
            out.append(self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1))
        return torch.cat(out).to(latents_bcthw.device)
