"""What the velocity model is conditioned on, for a batch of B samples: the cached text
embeddings (`TextEmbeddings`, two streams with masks) and everything else but the noisy latents
and the timestep (`Conditioning`: prompt, CFG negative, image embeds, condition latents).

Owns: the containers, their dtype/device casts (`to`) and row selection (`index_select`), the
batch concatenation of text with zero padding (`stack_text`), and random conditioning for
tests and benchmarks (`random_conditioning`).

Leaves to others: encoding text (`hunyuan_pipeline.PromptEncoder`, `sage_fast.world.prompts`)
and what the transformer does with it (`velocity`, `hunyuan_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Conditioning", "TextEmbeddings", "random_conditioning", "stack_text"]


@dataclass
class TextEmbeddings:
    """Cached text-encoder outputs for B prompts (masks: 1/True = real token)."""

    embeds_bld: torch.Tensor  # [B, L1, text_embed_dim]    (Qwen2.5-VL, 3584)
    mask_bl: torch.Tensor  # [B, L1]
    embeds_2_bld: torch.Tensor  # [B, L2, text_embed_2_dim]  (ByT5 glyph encoder, 1472)
    mask_2_bl: torch.Tensor  # [B, L2]

    def to(self, dtype: torch.dtype | None = None, device=None) -> "TextEmbeddings":
        """A copy with the embeddings cast to `dtype` (masks keep theirs) and moved to `device`."""
        return TextEmbeddings(*(_cast(t, dtype, device) for t in (self.embeds_bld, self.mask_bl,
                                                                    self.embeds_2_bld, self.mask_2_bl)))

    def index_select(self, idx: torch.Tensor) -> "TextEmbeddings":
        """The rows `idx` ([K] long, on the tensors' device; rows may repeat) of every field."""
        return TextEmbeddings(*(t.index_select(0, idx) for t in (self.embeds_bld, self.mask_bl,
                                                                   self.embeds_2_bld, self.mask_2_bl)))

    def check(self, name: str, batch: int, config) -> None:
        for field_name, t, rank in (("embeds_bld", self.embeds_bld, 3), ("mask_bl", self.mask_bl, 2),
                                    ("embeds_2_bld", self.embeds_2_bld, 3), ("mask_2_bl", self.mask_2_bl, 2)):
            if t.dim() != rank or t.shape[0] != batch:
                raise ValueError(f"conditioning.{name}.{field_name} must have {rank} dims and batch {batch}, "
                                 f"got shape {tuple(t.shape)}")
        for emb, mask, dim_name in ((self.embeds_bld, self.mask_bl, "text_embed_dim"),
                                    (self.embeds_2_bld, self.mask_2_bl, "text_embed_2_dim")):
            if emb.shape[2] != config[dim_name]:
                raise ValueError(f"conditioning.{name}: embedding width {emb.shape[2]} != model {dim_name}="
                                 f"{config[dim_name]}")
            if mask.shape[1] != emb.shape[1]:
                raise ValueError(f"conditioning.{name}: mask length {mask.shape[1]} != embedding length "
                                 f"{emb.shape[1]}")


@dataclass
class Conditioning:
    """Everything but the noisy latents and the timestep, for a batch of B samples.

    prompt: the text; negative: the CFG negative text (needed when cfg_scale != 1).
    image_embeds_bnd: [B, N, image_embed_dim] image-to-video embeds; None = text-to-video.
    cond_latents_bcthw, cond_mask_b1thw: the 32-channel condition and 1-channel mask of the
    65-channel input; None = zeros (text-to-video).
    """

    prompt: TextEmbeddings
    negative: TextEmbeddings | None = None
    image_embeds_bnd: torch.Tensor | None = None
    cond_latents_bcthw: torch.Tensor | None = None
    cond_mask_b1thw: torch.Tensor | None = None

    def to(self, dtype: torch.dtype | None = None, device=None) -> "Conditioning":
        """A copy with floating tensors cast to `dtype` (masks keep theirs) and moved to `device`."""
        return Conditioning(
            prompt=self.prompt.to(dtype, device),
            negative=None if self.negative is None else self.negative.to(dtype, device),
            image_embeds_bnd=_cast(self.image_embeds_bnd, dtype, device),
            cond_latents_bcthw=_cast(self.cond_latents_bcthw, dtype, device),
            cond_mask_b1thw=_cast(self.cond_mask_b1thw, dtype, device),
        )

    def index_select(self, idx: torch.Tensor) -> "Conditioning":
        """The rows `idx` ([K] long, on the tensors' device; rows may repeat: the pairs of a
        micro-batch) of every tensor field, on dim 0; None fields stay None."""
        def pick(t):
            return None if t is None else t.index_select(0, idx)

        return Conditioning(prompt=self.prompt.index_select(idx),
                            negative=None if self.negative is None else self.negative.index_select(idx),
                            image_embeds_bnd=pick(self.image_embeds_bnd),
                            cond_latents_bcthw=pick(self.cond_latents_bcthw),
                            cond_mask_b1thw=pick(self.cond_mask_b1thw))


def _cast(t, dtype, device):
    if t is None:
        return None
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 (tokens) of [B, L] or [B, L, D] to `length`."""
    pad = length - t.shape[1]
    if pad == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, 0, pad) if t.dim() == 3 else (0, pad))


def stack_text(parts: list[TextEmbeddings]) -> tuple[torch.Tensor, ...]:
    """Concatenate along the batch, zero-padding every stream to the longest (mask 0)."""
    out = []
    for attr in ("embeds_bld", "mask_bl", "embeds_2_bld", "mask_2_bl"):
        tensors = [getattr(p, attr) for p in parts]
        length = max(t.shape[1] for t in tensors)
        out.append(torch.cat([_pad_tokens(t, length) for t in tensors], dim=0))
    return tuple(out)


def random_conditioning(transformer_config, batch: int, *, text_len=(7, 5), text_len_2=(5, 3),
                        generator: torch.Generator | None = None, negative: bool = True,
                        device="cpu") -> Conditioning:
    """Random text embeddings with per-sample padding (tests and benchmarks).

    text_len / text_len_2: (max length, min real length); sample i gets a real length that
    cycles between the min and the max, so a batch mixes padding amounts.
    """
    def text(seed_shift):
        def stream(width, lengths):
            L, lo = lengths
            emb = torch.randn(batch, L, width, generator=generator)
            real = torch.tensor([lo + (i + seed_shift) % (L - lo + 1) for i in range(batch)])
            mask = (torch.arange(L)[None, :] < real[:, None]).long()
            return emb.to(device), mask.to(device)

        e1, m1 = stream(transformer_config.text_embed_dim, text_len)
        e2, m2 = stream(transformer_config.text_embed_2_dim, text_len_2)
        return TextEmbeddings(e1, m1, e2, m2)

    return Conditioning(prompt=text(0), negative=text(1) if negative else None)
