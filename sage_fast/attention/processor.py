"""The joint text+video attention processor of HunyuanVideo-1.5, on a chosen backend.

Owns: what one double-stream block's attention computes, for the diffusers class
`HunyuanVideo15Transformer3DModel` (its `HunyuanVideo15AttnProcessor2_0` is the reference
this must equal):

    q, k, v     = to_q/k/v(video)   [B, S, H, D];  RMS-norm q, k;  RoPE on q, k (video only)
    eq, ek, ev  = add_q/k/v_proj(text) [B, L, H, D];  RMS-norm eq, ek
    out         = attention([q | eq], [k | ek], [v | ev], key mask = [all video | text mask])
    video, text = to_out(out[:, :S]), to_add_out(out[:, S:])

The text mask arrives as the transformer's reordered encoder mask [B, L] (real tokens first);
masked text tokens are neither keys nor (non-zero) outputs, as in the reference's dense mask.

With a `UlyssesGroup` the processor does the sequence-parallel communication (see
`sage_fast.parallel.ulysses`): video q/k/v arrive as this rank's token chunk and leave it the
same way, the text stream stays replicated. The model code is unchanged.

dtype: q and k come out of the fp32-weight RMS norm in fp32 even under bf16 autocast; they
are cast to v's dtype (the autocast compute dtype) so every backend sees one dtype, as the
reference's SDPA call does under autocast.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .backends import AttentionBackend, choose_backend

__all__ = ["HunyuanVideo15JointAttnProcessor", "install_attention", "joint_attention_processors"]


class HunyuanVideo15JointAttnProcessor:
    """Drop-in for diffusers' `HunyuanVideo15AttnProcessor2_0` with a chosen backend and SP."""

    def __init__(self, backend: AttentionBackend, sequence_parallel=None) -> None:
        self.backend = backend
        self.sequence_parallel = sequence_parallel

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("HunyuanVideo15JointAttnProcessor is for the joint (double-stream) "
                             "attention: encoder_hidden_states must be given")
        sp = self.sequence_parallel
        heads = attn.heads
        # video stream [B, S_local, H, D] (S_local = S_pad / W under sequence parallel)
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (heads, -1)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(2, (heads, -1)))
        v = attn.to_v(hidden_states).unflatten(2, (heads, -1))
        num_video = hidden_states.shape[1]
        if image_rotary_emb is not None:
            freqs = (image_rotary_emb[0], image_rotary_emb[1])
            q = apply_rotary_emb(q, freqs, sequence_dim=1)
            k = apply_rotary_emb(k, freqs, sequence_dim=1)
            num_video = getattr(image_rotary_emb, "num_video_tokens", num_video)
        # text stream [B, L, H, D]
        eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        dtype = v.dtype
        q, k, eq, ek, ev = (t.to(dtype) for t in (q, k, eq, ek, ev))

        if sp is not None:
            if not hasattr(image_rotary_emb, "num_video_tokens"):
                raise ValueError("sequence-parallel attention needs the sharded RoPE of "
                                 "sage_fast.parallel.apply_sequence_parallel")
            # [B, S_pad/W, H, D] -> [B, S, H/W, D];  text [B, L, H, D] -> [B, L, H/W, D]
            q, k, v = (sp.tokens_to_heads(t, num_video) for t in (q, k, v))
            eq, ek, ev = (sp.local_heads(t) for t in (eq, ek, ev))

        q_all, k_all, v_all = (torch.cat(pair, dim=1) for pair in ((q, eq), (k, ek), (v, ev)))  # [B, S+L, h, D]
        key_mask = None
        if attention_mask is not None:
            text_mask = attention_mask.to(device=q.device, dtype=torch.bool)  # [B, L]
            video_mask = text_mask.new_ones(text_mask.shape[0], num_video)
            key_mask = torch.cat([video_mask, text_mask], dim=1)  # [B, S+L]
        out = self.backend(q_all, k_all, v_all, key_mask).to(dtype)
        out_video, out_text = out[:, :num_video], out[:, num_video:]

        if sp is not None:
            out_video = sp.heads_to_tokens(out_video)  # [B, S_pad/W, H, D]
            out_text = sp.gather_heads(out_text)  # [B, L, H, D]
        out_video = attn.to_out[1](attn.to_out[0](out_video.flatten(2, 3)))
        out_text = attn.to_add_out(out_text.flatten(2, 3))
        return out_video, out_text


def joint_attention_processors(transformer) -> list[HunyuanVideo15JointAttnProcessor]:
    return [block.attn.processor for block in transformer.transformer_blocks]


def install_attention(transformer, backend: AttentionBackend | str | None = "auto", sequence_parallel=None):
    """Install the joint processor on every double-stream block of `transformer`.

    backend: an `AttentionBackend`, a name for `choose_backend` (`auto`, `sdpa`, ...), or None
    to keep the backend already installed (else `auto`). The choice is made and logged here,
    once. The token refiner's small text-only attention keeps diffusers' SDPA processor.
    Returns the backend.
    """
    if backend is None:
        current = transformer.transformer_blocks[0].attn.processor
        backend = current.backend if isinstance(current, HunyuanVideo15JointAttnProcessor) else "auto"
    if isinstance(backend, str):
        device = next(transformer.parameters()).device
        backend = choose_backend(backend, device)
    for block in transformer.transformer_blocks:
        block.attn.set_processor(HunyuanVideo15JointAttnProcessor(backend, sequence_parallel))
    return backend
