"""Ulysses sequence parallelism for the HunyuanVideo-1.5 and Wan transformers.

Owns: splitting the video tokens over the ranks of the `sp` axis, the all-to-alls around the
attention, and the gather of the output; the model code never sees a process group.
`apply_sequence_parallel` dispatches on the transformer's class (HunyuanVideo-1.5 below, Wan
after it).

HunyuanVideo-1.5 (`HunyuanVideo15Transformer3DModel`):

Data layout with W ranks and S video tokens (S = T*H*W after 1x1x1 patching; 33,390 at
480p, 81 frames), padded to S_pad = W * ceil(S / W):

    x_embedder output [B, S, C]            -> pad with zero tokens, keep rank r's contiguous
                                              chunk [B, S_pad/W, C]  (`shard_tokens`)
    rope (cos, sin) [S, D]                 -> the same padding and chunk: `ShardedRope`
    attention (processor)  q/k/v [B, S_pad/W, H, D]
                           -> all-to-all: heads scattered, tokens gathered [B, S_pad, H/W, D]
                           -> padding tokens dropped: [B, S, H/W, D]; the text tokens
                              (replicated on every rank) keep this rank's heads [B, L, H/W, D]
                           -> attention over [video S | text L] for H/W heads
                           -> video output re-padded, all-to-all back [B, S_pad/W, H, D];
                              text output all-gathered over heads [B, L, H, D]
    proj_out output [B, S_pad/W, C_out]    -> all-gather of the tokens, padding dropped [B, S, C_out]

Everything between x_embedder and proj_out works per token except attention, so padding
tokens never mix into real ones (they are dropped before attention) and carry no gradient.
Gradients follow `collectives.py`: every rank of an sp group computes the loss on the
gathered output, and parameter gradients averaged over the group (FSDP2 / DDP over the
flattened dp x sp mesh) equal the single-process gradients (tested: tests/test_parallel.py).

Wan (`WanTransformer3DModel`, text-to-video, each expert on its own; the same padding and
gradients; tested: tests/dist/wan_parallel.py):

    patch_embedding output [B, C, T', H', W'] -> tokens [B, C, S] padded, rank r's chunk,
                                              returned as [B, C, S_pad/W, 1, 1] so the forward's
                                              flatten(2).transpose(1, 2) gives [B, S_pad/W, C]
    rope (cos, sin) [1, S, 1, D]           -> the same padding and chunk (`ShardedRope`)
    self-attention attn1 (`WanUlyssesSelfAttnProcessor`): q/k/v of the local tokens (RMS norm
                                              across all heads and RoPE are per token), then
                                              all-to-all [B, S_pad/W, H, D] -> [B, S, H/W, D],
                                              attention, and back, as above
    cross-attention attn2                  -> unchanged (diffusers' processor): the query shard
                                              against the full text K/V, computed on every rank
                                              from the replicated text
    proj_out output [B, S_pad/W, C_out]    -> all-gather, padding dropped, then unpatchify

Cross-attention keeps the query shard rather than all-to-all'ing it: each video token attends
to the text alone, so its output needs no other token: exact, the same attention FLOPs per
rank (S/W queries x H heads = S queries x H/W heads) and no communication. The price is the
text K/V projections computed in full on each rank (L = 512 tokens against S ~ 33k video
tokens at 480p). Padding tokens do pass through cross-attention as queries; their outputs are
dropped at the gather and carry no gradient. Image-to-video (attn2's image K/V) is refused.

Hooks, not wrappers: the three modules are hooked in place, so parameter names (checkpoints,
FSDP, LoRA) do not change. Apply sequence parallelism after LoRA: a LoRA layer on proj_out
would add its delta after the gather. Requires heads divisible by W.

Leaves to others: the attention kernel (`sage_fast.attention`), the mesh (`mesh.py`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .collectives import all_gather, all_to_all

__all__ = ["ShardedRope", "UlyssesGroup", "WanUlyssesSelfAttnProcessor", "apply_sequence_parallel",
           "remove_sequence_parallel"]


class ShardedRope(NamedTuple):
    """This rank's chunk of the RoPE tables plus the true (unpadded) number of video tokens.

    The transformer passes its rope output to every attention call untouched, so the
    processor learns S from here without any shared state (safe under activation
    checkpointing, which re-runs blocks during backward).
    """

    cos: torch.Tensor  # [S_pad / W, D] (Wan: [1, S_pad / W, 1, D])
    sin: torch.Tensor  # [S_pad / W, D] (Wan: [1, S_pad / W, 1, D])
    num_video_tokens: int  # S, before padding


class UlyssesGroup:
    """The sp process group and the token/head layout operations over it (see module doc)."""

    def __init__(self, group) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def padded(self, num_tokens: int) -> int:
        return self.world * math.ceil(num_tokens / self.world)

    def shard_tokens(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Zero-pad `dim` to a multiple of W and keep this rank's contiguous chunk."""
        n = x.shape[dim]
        pad = self.padded(n) - n
        if pad:
            widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]  # F.pad counts from the last dim
            x = F.pad(x, widths)
        return x.chunk(self.world, dim=dim)[self.rank]

    def gather_tokens(self, x: torch.Tensor, num_tokens: int, dim: int) -> torch.Tensor:
        """All-gather the chunks along `dim` (backward: reduce-scatter) and drop the padding."""
        return all_gather(x, self.group, dim).narrow(dim, 0, num_tokens)

    def tokens_to_heads(self, x_bshd: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[B, S_pad/W, H, D] -> [B, S, H/W, D]: heads scattered, tokens gathered, padding dropped."""
        if x_bshd.shape[2] % self.world:
            raise ValueError(f"sequence parallel needs heads divisible by sp={self.world}, "
                             f"got {x_bshd.shape[2]} heads")
        return all_to_all(x_bshd, self.group, scatter_dim=2, gather_dim=1)[:, :num_tokens]

    def heads_to_tokens(self, x_bshd: torch.Tensor) -> torch.Tensor:
        """[B, S, H/W, D] -> [B, S_pad/W, H, D]: re-padded, tokens scattered, heads gathered."""
        pad = self.padded(x_bshd.shape[1]) - x_bshd.shape[1]
        if pad:
            x_bshd = F.pad(x_bshd, (0, 0, 0, 0, 0, pad))
        return all_to_all(x_bshd, self.group, scatter_dim=1, gather_dim=2)

    def local_heads(self, x_bshd: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a replicated [B, L, H, D] (no communication)."""
        return x_bshd.chunk(self.world, dim=2)[self.rank]

    def gather_heads(self, x_bshd: torch.Tensor) -> torch.Tensor:
        """[B, L, H/W, D] -> [B, L, H, D] replicated (backward: reduce-scatter)."""
        return all_gather(x_bshd, self.group, dim=2)


def _is_wan(transformer: torch.nn.Module) -> bool:
    from diffusers import WanTransformer3DModel  # noqa: PLC0415

    return isinstance(transformer, WanTransformer3DModel)


def apply_sequence_parallel(transformer: torch.nn.Module, group, backend=None) -> UlyssesGroup:
    """Make `transformer` (a diffusers HunyuanVideo15Transformer3DModel or WanTransformer3DModel)
    sequence parallel.

    group: the sp process group (e.g. `mesh["sp"].get_group()`). backend: HunyuanVideo-1.5's
    attention backend; None keeps the one already installed by
    `sage_fast.attention.install_attention` (or picks `auto`); Wan keeps its processors'
    diffusers backend and takes none. Every rank of the group must then get the same inputs;
    each returns the full output. A group of size 1 changes nothing but the processor.
    """
    if getattr(transformer, "_sage_fast_sp_handles", None):
        raise ValueError("apply_sequence_parallel: this transformer is already sequence parallel")
    sp = UlyssesGroup(group)
    heads = transformer.config.num_attention_heads
    if heads % sp.world:
        raise ValueError(f"sequence parallel size {sp.world} must divide num_attention_heads={heads}")
    if _is_wan(transformer):
        if backend is not None:
            raise ValueError("apply_sequence_parallel: a Wan transformer keeps its diffusers attention backend "
                             f"(backend must be None, got {backend!r})")
        _apply_wan(transformer, sp)
        return sp
    from sage_fast.attention import processor as attn_proc  # noqa: PLC0415 (no import cycle at load)

    state = {}

    def shard_embed(module, args, out_bsc):
        state["num_video_tokens"] = out_bsc.shape[1]  # read by gather_out in the same forward
        return sp.shard_tokens(out_bsc, dim=1)

    def shard_rope(module, args, out):
        cos_sd, sin_sd = out
        return ShardedRope(sp.shard_tokens(cos_sd, 0), sp.shard_tokens(sin_sd, 0), cos_sd.shape[0])

    def gather_out(module, args, out_bsc):
        return sp.gather_tokens(out_bsc, state["num_video_tokens"], dim=1)

    transformer._sage_fast_sp_handles = [
        transformer.x_embedder.register_forward_hook(shard_embed),
        transformer.rope.register_forward_hook(shard_rope),
        transformer.proj_out.register_forward_hook(gather_out),
    ]
    attn_proc.install_attention(transformer, backend=backend, sequence_parallel=sp)
    return sp


def remove_sequence_parallel(transformer: torch.nn.Module) -> None:
    """Undo `apply_sequence_parallel` (hooks removed, processors back to single-rank)."""
    from sage_fast.attention import processor as attn_proc  # noqa: PLC0415

    for handle in getattr(transformer, "_sage_fast_sp_handles", None) or ():
        handle.remove()
    transformer._sage_fast_sp_handles = None
    if _is_wan(transformer):
        for block in transformer.blocks:
            if isinstance(block.attn1.processor, WanUlyssesSelfAttnProcessor):
                block.attn1.set_processor(block.attn1.processor.original)
        return
    attn_proc.install_attention(transformer, backend=None, sequence_parallel=None)


# ---------------------------------------------------------------------------------------------
# Wan


def _apply_wan(transformer: torch.nn.Module, sp: UlyssesGroup) -> None:
    if transformer.config.image_dim is not None or transformer.config.added_kv_proj_dim is not None:
        raise ValueError("sequence parallel Wan is text-to-video only (image_dim / added_kv_proj_dim set: "
                         "image-to-video cross-attention is not wired)")
    state = {}

    def shard_patches(module, args, out_bcthw):
        tokens_bcs = out_bcthw.flatten(2)
        state["num_video_tokens"] = tokens_bcs.shape[2]  # read by gather_out in the same forward
        return sp.shard_tokens(tokens_bcs, dim=2)[..., None, None]  # [B, C, S_pad/W, 1, 1]

    def shard_rope(module, args, out):
        cos, sin = out  # [1, S, 1, D]
        return ShardedRope(sp.shard_tokens(cos, 1), sp.shard_tokens(sin, 1), cos.shape[1])

    def gather_out(module, args, out_bsc):
        return sp.gather_tokens(out_bsc, state["num_video_tokens"], dim=1)

    transformer._sage_fast_sp_handles = [
        transformer.patch_embedding.register_forward_hook(shard_patches),
        transformer.rope.register_forward_hook(shard_rope),
        transformer.proj_out.register_forward_hook(gather_out),
    ]
    for block in transformer.blocks:
        block.attn1.set_processor(WanUlyssesSelfAttnProcessor(sp, block.attn1.processor))


def _rotate(x_bshd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), as
    diffusers' WanAttnProcessor applies it (the tables repeat each frequency twice)."""
    x0, x1 = x_bshd.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x_bshd)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out.type_as(x_bshd)


class WanUlyssesSelfAttnProcessor:
    """Wan's self-attention (diffusers' `WanAttnProcessor` without image K/V) with the Ulysses
    all-to-alls around the attention; `original` is the processor it replaced (its diffusers
    attention backend is kept, and `remove_sequence_parallel` puts it back)."""

    def __init__(self, sp: UlyssesGroup, original) -> None:
        self.sp, self.original = sp, original
        self.backend = getattr(original, "_attention_backend", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn  # noqa: PLC0415

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanUlyssesSelfAttnProcessor is for self-attention (attn1) without a mask")
        if not hasattr(rotary_emb, "num_video_tokens"):
            raise ValueError("sequence-parallel attention needs the sharded RoPE of "
                             "sage_fast.parallel.apply_sequence_parallel")
        if getattr(attn, "fused_projections", False):
            raise ValueError("sequence-parallel Wan attention needs unfused projections (to_q, to_k, to_v)")
        # this rank's tokens [B, S_pad/W, H, D]: norms across heads and RoPE are per token
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        q, k = _rotate(q, rotary_emb.cos, rotary_emb.sin), _rotate(k, rotary_emb.cos, rotary_emb.sin)
        n = rotary_emb.num_video_tokens
        q_all, k_all, v_all = (self.sp.tokens_to_heads(t, n) for t in (q, k, v))  # [B, S, H/W, D]
        out = dispatch_attention_fn(q_all, k_all, v_all, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=self.backend, parallel_config=None)
        out = self.sp.heads_to_tokens(out).flatten(2, 3).type_as(q)  # [B, S_pad/W, H*D]
        return attn.to_out[1](attn.to_out[0](out))
