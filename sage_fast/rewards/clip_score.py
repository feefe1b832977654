"""CLIPScore of a video: the cosine between the prompt's CLIP text embedding and each of `frames`
evenly spaced frames' image embeddings, averaged over those frames (Hessel et al. 2021 report
100 x max(cos, 0); we return the cosine itself, a reward needs no rescaling).

Preprocessing is CLIP's (shorter side resized to the model's image size with bicubic
antialiasing, centre crop, OpenAI mean/std) done in torch on the video's device, so a batch
of videos is scored without a round trip through PIL.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["ClipScore", "CLIP_MEAN", "CLIP_STD", "frame_indices", "pooled_features"]

# OpenAI CLIP's normalisation (transformers.image_utils.OPENAI_CLIP_MEAN / _STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def frame_indices(num_frames: int, frames: int) -> torch.Tensor:
    """The scored frames of a video (clip_score's and pickscore's choice): min(frames, num_frames)
    evenly spaced indices, first and last included, as a [k] int64 CPU tensor."""
    return torch.linspace(0, num_frames - 1, min(frames, num_frames)).round().long()


def pooled_features(out) -> torch.Tensor:
    """CLIPModel.get_*_features' [N, D] embeddings: a tensor (transformers 4) or an output holding
    the projected pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScore:
    """`score(video_bcfhw in [-1, 1], prompts) -> {"clip_score": [B]}`."""

    def __init__(self, model, tokenizer, frames: int = 8, device="cpu") -> None:
        if frames < 1:
            raise ValueError(f"clip_score frames must be >= 1, got {frames}")
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.frames, self.device = tokenizer, frames, torch.device(device)
        self.image_size = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings

    @classmethod
    def from_folder(cls, folder: str | Path, device="cpu", frames: int = 8,
                    field: str = "video.reward clip_score") -> "ClipScore":
        from transformers import AutoTokenizer, CLIPModel  # noqa: PLC0415

        path = Path(folder)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{field}={folder}: not a local CLIP model folder "
                                    "(config.json, weights and tokenizer files; nothing is downloaded)")
        model = CLIPModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model, tokenizer, frames=frames, device=device)

    def pixels(self, video_bcfhw: torch.Tensor) -> torch.Tensor:
        """[B * k, 3, S, S] normalised CLIP inputs of k evenly spaced frames per video."""
        B, C, Fr, H, W = video_bcfhw.shape
        if C != 3:
            raise ValueError(f"clip_score needs RGB videos [B, 3, F, H, W], got {tuple(video_bcfhw.shape)}")
        idx = frame_indices(Fr, self.frames).to(video_bcfhw.device)
        k = idx.numel()
        img = video_bcfhw.index_select(2, idx).transpose(1, 2).reshape(B * k, C, H, W).float()
        img = ((img + 1) / 2).clamp(0, 1)
        S = self.image_size
        scale = S / min(H, W)
        h, w = max(S, round(H * scale)), max(S, round(W * scale))
        img = F.interpolate(img, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        top, left = (h - S) // 2, (w - S) // 2
        img = img[:, :, top:top + S, left:left + S]
        mean = torch.tensor(CLIP_MEAN, device=img.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=img.device).view(1, 3, 1, 1)
        return (img - mean) / std

    @torch.no_grad()
    def __call__(self, video_bcfhw: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        B = video_bcfhw.shape[0]
        if len(prompts) != B:
            raise ValueError(f"clip_score: {len(prompts)} prompts for {B} videos")
        pix = self.pixels(video_bcfhw.to(self.device))
        k = pix.shape[0] // B
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)
        t = F.normalize(pooled_features(self.model.get_text_features(**text)).float(), dim=-1)  # [B, D]
        i = F.normalize(pooled_features(self.model.get_image_features(pixel_values=pix)).float(), dim=-1)  # [B k, D]
        cos = (i.view(B, k, -1) * t[:, None]).sum(-1).mean(1)
        return {"clip_score": cos.cpu()}
