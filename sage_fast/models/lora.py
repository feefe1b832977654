"""LoRA on the transformer blocks of either model family: which modules get an adapter, and
adding it (peft, through diffusers' `add_adapter`).

Owns: `apply_lora` (base frozen, one adapter, B = 0 at start) and the default targets of each
family: `DEFAULT_LORA_TARGETS` inside HunyuanVideo-1.5's double-stream blocks
(`transformer_blocks.<i>.`), `WAN_LORA_TARGETS` inside Wan's blocks (`blocks.<i>.`).

Leaves to others: choosing the targets from the config (`policy.VelocityModelConfig`),
the models themselves (`velocity`, `wan`), merging and exporting adapters (`sage_fast.policy_files`).
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["DEFAULT_LORA_TARGETS", "HUNYUAN_BLOCKS", "WAN_BLOCKS", "WAN_LORA_TARGETS", "apply_lora"]

#: module names inside each double-stream block that get LoRA: the joint attention's projections
#: (video and text streams). The token refiner's attention is not targeted.
DEFAULT_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                        "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
#: module names inside each `blocks.<i>.` that get LoRA: self-attention (attn1) and text
#: cross-attention (attn2) projections, and the feed-forward's two linears (WanTransformerBlock)
WAN_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                    "ffn.net.0.proj", "ffn.net.2")
#: the ModuleList of blocks the targets are relative to, per family
HUNYUAN_BLOCKS, WAN_BLOCKS = "transformer_blocks", "blocks"


def apply_lora(transformer: nn.Module, rank: int = 32, alpha: float = 32.0,
               target_modules=DEFAULT_LORA_TARGETS, block_prefix: str = HUNYUAN_BLOCKS) -> list[str]:
    """Freeze the base weights and add a peft LoRA adapter to `target_modules` of every block
    `<block_prefix>.<i>.` (B initialised to zero, so the output is unchanged until training).
    Defaults: HunyuanVideo-1.5's double-stream blocks; Wan: `WAN_LORA_TARGETS`, `WAN_BLOCKS`.
    Returns the names of the trainable parameters."""
    from peft import LoraConfig  # noqa: PLC0415

    # peft full-matches a string target as a regex against every module name
    pattern = re.escape(block_prefix) + r"\.\d+\.(" + "|".join(re.escape(t) for t in target_modules) + ")"
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, init_lora_weights=True))
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    if not names or any("lora_" not in n for n in names):
        raise ValueError(f"LoRA targets {list(target_modules)} matched no module (or left base weights trainable)")
    return names
