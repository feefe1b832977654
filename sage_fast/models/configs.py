"""Architectures of the diffusers class `HunyuanVideo15Transformer3DModel`, by name.

`hunyuanvideo15` is the released 8.3B DiT (docs/SPEC.md section 7: hidden 2048 = 16 heads x 128,
54 double-stream blocks, patch 1x1x1, 65 input channels = 32 latent + 32 condition + 1
mask, 32 output channels, 3-D RoPE over (16, 56, 56) of each head's 128 channels).

`tiny` is the same class at toy size for CPU tests and the synthetic world: 4 heads x 16,
2 blocks, 1 refiner block (4.7M parameters, most of them in the ByT5 projection whose 2048
hidden width the class hard-codes). Its forward on 21 x 3 x 5 latents (315 tokens) takes
~50 ms on one CPU core. Four heads allow sequence parallel sizes 1, 2 and 4.
"""

from __future__ import annotations

__all__ = ["ARCHITECTURES", "architecture"]

ARCHITECTURES: dict[str, dict] = {
    # the class defaults of diffusers 0.42, spelled out so a diffusers change cannot move them
    "hunyuanvideo15": dict(
        in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128,
        num_layers=54, num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
        qk_norm="rms_norm", text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152,
        rope_theta=256.0, rope_axes_dim=(16, 56, 56), target_size=640, task_type="t2v",
        use_meanflow=False,
    ),
    "tiny": dict(
        in_channels=65, out_channels=32, num_attention_heads=4, attention_head_dim=16,
        num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        qk_norm="rms_norm", text_embed_dim=32, text_embed_2_dim=24, image_embed_dim=16,
        rope_theta=256.0, rope_axes_dim=(4, 6, 6), target_size=640, task_type="t2v",
        use_meanflow=False,
    ),
}


def architecture(name: str, **overrides) -> dict:
    """A copy of architecture `name` with `overrides` applied (keys must be config fields)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {tuple(ARCHITECTURES)}, got {name!r}")
    config = dict(ARCHITECTURES[name])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"architecture overrides {unknown} are not fields of "
                         f"HunyuanVideo15Transformer3DModel; fields: {sorted(config)}")
    config.update(overrides)
    head_dim, rope = config["attention_head_dim"], tuple(config["rope_axes_dim"])
    if sum(rope) != head_dim or any(d % 2 for d in rope):
        raise ValueError(f"rope_axes_dim {rope} must be even sizes summing to attention_head_dim={head_dim}")
    return config
