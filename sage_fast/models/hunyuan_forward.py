"""The HunyuanVideo-1.5 transformer's forward with the text tokens ordered for the whole batch.

Owns: `forward_batched_text`, a re-implementation of `HunyuanVideo15Transformer3DModel.forward`
(diffusers 0.42) on the same submodules, and `order_text_tokens`, the batched equivalent of the
class's per-sample text-token loop. Same output bit for bit on the CPU (`tests/test_models.py`);
on a GPU it saves the loop's host syncs (12 per sample and forward).

Leaves to others: the 65-channel input, CFG batching and the velocity conversion (`velocity`),
and the submodules themselves (diffusers).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["forward_batched_text", "order_text_tokens"]


def order_text_tokens(streams: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The class's text layout, for the whole batch at once: per sample, the real tokens of every
    stream in stream order, then the padding tokens in stream order, padding zeroed where the
    stream says so. streams: (tokens [B, L_i, D], mask [B, L_i] bool, zero_padding). Returns
    (tokens [B, sum L_i, D], mask [B, sum L_i] bool). A stable sort on "is padding" gives exactly
    the order of diffusers' per-sample loop, which costs a host sync per sample and mask on a
    GPU (12 per sample: ~6,000 a forward at batch 512)."""
    for i, (t, m, _) in enumerate(streams):
        if m.dtype != torch.bool or m.shape != t.shape[:2]:
            raise ValueError(f"order_text_tokens: stream {i} mask must be bool of shape {tuple(t.shape[:2])}, "
                             f"got {m.dtype} {tuple(m.shape)}")
    tokens = torch.cat([t for t, _, _ in streams], dim=1)
    mask = torch.cat([m for _, m, _ in streams], dim=1)
    keep = torch.cat([m | (not zero) for _, m, zero in streams], dim=1)
    tokens = torch.where(keep[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
    order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)
    tokens = tokens.gather(1, order[..., None].expand_as(tokens))
    return tokens, mask.gather(1, order)


def forward_batched_text(transformer: nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
                         encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                         encoder_hidden_states_2: torch.Tensor, encoder_attention_mask_2: torch.Tensor,
                         image_embeds: torch.Tensor, text_to_video: bool | None = None) -> torch.Tensor:
    """`HunyuanVideo15Transformer3DModel.forward` (diffusers 0.42; return_dict=False, no
    timestep_r, no LoRA scale) on the same submodules, with the text tokens ordered by
    `order_text_tokens` instead of a per-sample loop: the same output bit for bit on the CPU
    (`tests/test_models.py`) and no host sync per sample on a GPU. `text_to_video` None decides
    as the class does (all image embeds zero); the adapter passes it when it knows.

    Only for a plain module: it calls the submodules directly, so hooks on the root module's
    forward (FSDP2's unsharding, sequence-parallel wrappers) do not run; `VelocityModel` uses it
    when `batched_text` is set (pretraining, evaluation), never in the distributed trainer."""
    tr, cfg = transformer, transformer.config
    B, _, T, H, W = hidden_states.shape
    pt, p = cfg.patch_size_t, cfg.patch_size
    rotary = tr.rope(hidden_states)
    temb = tr.time_embed(timestep, timestep_r=None)
    x = tr.x_embedder(hidden_states)
    mllm = tr.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)
    mllm = mllm + tr.cond_type_embed(torch.zeros_like(mllm[:, :, 0], dtype=torch.long))
    byt5 = tr.context_embedder_2(encoder_hidden_states_2)
    byt5 = byt5 + tr.cond_type_embed(torch.ones_like(byt5[:, :, 0], dtype=torch.long))
    image = tr.image_embedder(image_embeds)
    if text_to_video is None:
        text_to_video = bool(torch.all(image_embeds == 0))
    if text_to_video:
        image = image * 0.0
    image_mask = torch.full(image.shape[:2], bool(not text_to_video), device=image.device)
    image = image + tr.cond_type_embed(2 * torch.ones_like(image[:, :, 0], dtype=torch.long))
    text, text_mask = order_text_tokens([(image, image_mask, False),
                                         (byt5, encoder_attention_mask_2.bool(), True),
                                         (mllm, encoder_attention_mask.bool(), True)])
    checkpointed = torch.is_grad_enabled() and tr.gradient_checkpointing
    for block in tr.transformer_blocks:
        if checkpointed:
            x, text = tr._gradient_checkpointing_func(block, x, text, temb, text_mask, rotary)
        else:
            x, text = block(x, text, temb, text_mask, rotary)
    x = tr.proj_out(tr.norm_out(x, temb))
    x = x.reshape(B, T // pt, H // p, W // p, -1, pt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
