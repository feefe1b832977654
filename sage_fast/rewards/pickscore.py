"""PickScore of a video (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences
for Text-to-Image Generation"): a CLIP-H fine-tuned on human preferences between generated images.
One frame f against its prompt p scores

    pickscore(f, p) = exp(logit_scale) * <e_f / |e_f|, e_p / |e_p|>

with e_f = CLIPModel.get_image_features(f), e_p = get_text_features(p) (the towers' pooled outputs
through the projection heads), as the authors' inference example computes it (README of
github.com/yuvalkirstain/PickScore, "Inference with PickScore"; the same example is the model card
of yuvalkirstain/PickScore_v1): the prompt tokenised with padding and truncation to 77 tokens,
the image through the CLIP processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K. A video scores the
mean over `frames` evenly spaced frames (the frames clip_score scores), as video papers report it.
Unlike clip_score (the bare cosine), the learned scale is kept: PickScore is reported on it.

The folder is one local CLIP model in transformers' format holding the processor's files too
(config.json, weights, preprocessor_config.json or processor_config.json, tokenizer files); nothing
is downloaded. Preprocessing is the folder's image processor (resize with its filter, centre crop,
rescale, its mean and std, all read from its config) done in torch on the scorer's device; see
`PickScore.pixels` for how it differs from the processor's PIL path.

Owns: one reward part (`{"pickscore": [B]}`); NaN for a video with a non-finite value in any
frame. Leaves to sage_fast.rewards: parsing `video.reward` and weighting the dimensions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .clip_score import frame_indices, pooled_features

__all__ = ["PickScore", "PICKSCORE_MAX_TOKENS"]

PICKSCORE_MAX_TOKENS = 77  # the authors' example truncates prompts to CLIP's 77 positions

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_PROCESSOR = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER = ("tokenizer.json", "vocab.json")
# PIL filter name -> torch mode; the antialiased torch kernels are PIL's (bicubic a = -0.5)
_RESAMPLE = {"BICUBIC": "bicubic", "BILINEAR": "bilinear", "NEAREST": "nearest-exact"}


def _size_field(size, key: str):
    """A field of a processor's size (a dict, or transformers' SizeDict); None when unset."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _check_folder(path: Path, field: str) -> None:
    """Every file a local PickScore folder needs; one error listing all that is missing."""
    where = (f"{field}={path}: a local PickScore folder in transformers' format (config.json, weights, "
             "preprocessor_config.json and tokenizer files; the processor's files are those of "
             "laion/CLIP-ViT-H-14-laion2B-s32B-b79K; nothing is downloaded)")
    if not path.is_dir():
        raise FileNotFoundError(f"{where}: no such folder")
    missing = [name for name, options in (("config.json", ("config.json",)), ("weights", _WEIGHTS),
                                          ("processor config", _PROCESSOR), ("tokenizer", _TOKENIZER))
               if not any((path / o).exists() for o in options)]
    if missing:
        raise FileNotFoundError(f"{where}: missing {', '.join(missing)}")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: config.json is not a JSON object: {e}") from e
    if model_type != "clip":
        raise ValueError(f"{where}: config.json is a {model_type!r} model, PickScore is a 'clip' CLIPModel")


class PickScore:
    """`score(video_bcfhw in [-1, 1], prompts) -> {"pickscore": [B] float32 on the CPU}`."""

    def __init__(self, folder: str | Path, frames: int = 8, device="cpu", dtype=torch.float32,
                 field: str = "video.reward pickscore") -> None:
        from transformers import CLIPModel, CLIPProcessor  # noqa: PLC0415

        if frames < 1:
            raise ValueError(f"{field}: frames must be >= 1, got {frames}")
        path = Path(folder)
        _check_folder(path, field)
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype)
            processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:  # a config of another model, a broken file
            raise ValueError(f"{field}={folder}: not a CLIP model and processor in transformers' format: {e}") from e
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        self.frames, self.device, self.dtype, self.field = frames, torch.device(device), dtype, field
        self.max_length = min(PICKSCORE_MAX_TOKENS, model.config.text_config.max_position_embeddings)
        ip = self.image_processor
        resample = ip.resample if isinstance(ip.resample, str) else getattr(ip.resample, "name", None)
        if resample is None:  # a plain int in an older config: PIL's enumeration
            from PIL import Image  # noqa: PLC0415

            resample = Image.Resampling(int(ip.resample)).name
        if ip.do_resize and resample.upper() not in _RESAMPLE:
            raise ValueError(f"{field}={folder}: the processor resizes with {resample}; supported: {sorted(_RESAMPLE)}")
        self.resize_mode = _RESAMPLE.get(resample.upper())

    def _resized_hw(self, H: int, W: int) -> tuple[int, int]:
        """The processor's output size: the shorter side to shortest_edge, the longer int()-truncated."""
        size = self.image_processor.size
        short = _size_field(size, "shortest_edge")
        if short is not None:
            if W <= H:
                return int(short * H / W), short
            return short, int(short * W / H)
        h, w = _size_field(size, "height"), _size_field(size, "width")
        if h is None or w is None:
            raise ValueError(f"{self.field}: the processor's size {size} has neither shortest_edge nor height/width")
        return h, w

    def pixels(self, video_bcfhw: torch.Tensor) -> torch.Tensor:
        """[B * k, 3, S, S] float32 model inputs of k = min(frames, F) evenly spaced frames per video.

        The processor's steps on 0..255 values: resize (two passes, width then height, each
        clipped to 0..255, as PIL resizes), centre crop ((size - crop) // 2 from the top left),
        x rescale_factor, (x - mean) / std. The processor quantises frames to uint8 and PIL rounds
        each pass to uint8 with fixed-point weights; here values stay float, so pixels differ
        from the processor's by about one uint8 step (over std in normalised units)."""
        B, C, Fr, H, W = video_bcfhw.shape
        if C != 3:
            raise ValueError(f"pickscore needs RGB videos [B, 3, F, H, W], got {tuple(video_bcfhw.shape)}")
        idx = frame_indices(Fr, self.frames).to(video_bcfhw.device)
        k = idx.numel()
        img = video_bcfhw.index_select(2, idx).transpose(1, 2).reshape(B * k, C, H, W).float()  # [B k, 3, H, W]
        img = ((img + 1) * 127.5).clamp(0, 255)
        ip = self.image_processor
        if ip.do_resize:
            h, w = self._resized_hw(H, W)
            if self.resize_mode == "nearest-exact":
                img = F.interpolate(img, size=(h, w), mode="nearest-exact")
            else:  # PIL's order: width, then height, each pass clipped to 0..255
                for size in ((H, w), (h, w)):
                    img = F.interpolate(img, size=size, mode=self.resize_mode, antialias=True,
                                        align_corners=False).clamp(0, 255)
        if ip.do_center_crop:
            ch, cw = _size_field(ip.crop_size, "height"), _size_field(ip.crop_size, "width")
            h, w = img.shape[-2:]
            if ch > h or cw > w:
                raise ValueError(f"{self.field}: the processor crops {ch}x{cw} from a {h}x{w} resized frame")
            top, left = (h - ch) // 2, (w - cw) // 2
            img = img[:, :, top:top + ch, left:left + cw]
        if ip.do_rescale:
            img = img * ip.rescale_factor
        if ip.do_normalize:
            mean = torch.tensor(ip.image_mean, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
            std = torch.tensor(ip.image_std, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
            img = (img - mean) / std
        return img

    @torch.no_grad()
    def __call__(self, video_bcfhw: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        B = video_bcfhw.shape[0]
        if len(prompts) != B:
            raise ValueError(f"pickscore: {len(prompts)} prompts for {B} videos")
        video = video_bcfhw.to(self.device)
        keep = torch.isfinite(video.flatten(1)).all(1).nonzero().squeeze(1)  # videos that can be scored
        out = torch.full((B,), math.nan)
        n = keep.numel()
        if n == 0:
            return {"pickscore": out}
        pix = self.pixels(video.index_select(0, keep)).to(self.dtype)  # [n k, 3, S, S]
        k = pix.shape[0] // n
        text = self.tokenizer([prompts[i] for i in keep.tolist()], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt").to(self.device)
        t = F.normalize(pooled_features(self.model.get_text_features(**text)).float(), dim=-1)  # [n, D]
        i = F.normalize(pooled_features(self.model.get_image_features(pixel_values=pix)).float(), dim=-1)  # [n k, D]
        score_nk = self.model.logit_scale.float().exp() * (i.view(n, k, -1) * t[:, None]).sum(-1)
        out[keep.cpu()] = score_nk.mean(1).cpu()
        return {"pickscore": out}
