"""A randomly initialised, tiny Wan 2.1 / 2.2 text-to-video pipeline folder in the diffusers
layout (`WanPipeline`), built offline: the real classes (UMT5 encoder, Wan VAE, Wan transformer)
at toy widths, so loading, prompt encoding, sampling and decoding run in seconds on a CPU:

    python -m sage_fast.models.tiny_wan_pipeline /tmp/tiny_wan                 # Wan 2.1 style
    python -m sage_fast.models.tiny_wan_pipeline /tmp/tiny_wan22 --two-experts # Wan 2.2 A14B style

    model_index.json   WanPipeline; boundary_ratio (two experts only), expand_timesteps=false
    tokenizer/         ByT5Tokenizer: byte-level, no vocabulary file to download; T5-family
                       conventions as umt5-xxl's (pad id 0, "</s>" appended), other ids
    text_encoder/      UMT5EncoderModel, d_model TINY_WAN_TEXT_DIM (umt5-xxl: 4096)
    vae/               AutoencoderKLWan, z_dim TINY_WAN_LATENT_CHANNELS, 4x time / 8x space as
                       Wan 2.1's, with non-trivial latents_mean / latents_std (de-normalisation
                       is exercised)
    scheduler/         FlowMatchEulerDiscreteScheduler(shift=TINY_WAN_SHIFT = 3.0): the Euler
                       solver the project samples with, at the flow shift the Wan 2.1 pipeline
                       recommends for 480p (its example: 3.0 for 480p, 5.0 for 720p). The
                       published Wan folders ship UniPCMultistepScheduler(flow_shift=...) instead:
                       the same flow ODE, another solver.
    transformer/       WanTransformer3DModel (2 blocks, 2 heads of 12)
    transformer_2/     (--two-experts) a second, differently seeded transformer: Wan 2.2 A14B's
                       low-noise expert; `transformer` serves timesteps >= boundary_ratio * 1000
                       (TINY_WAN_BOUNDARY_RATIO = 0.875, the Wan 2.2 T2V-A14B value)
    prompts.txt

Numbers it produces mean nothing; shapes, dtypes and plumbing are what it tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

__all__ = ["save_tiny_wan_pipeline", "TINY_WAN_TEXT_DIM", "TINY_WAN_LATENT_CHANNELS", "TINY_WAN_SHIFT",
           "TINY_WAN_BOUNDARY_RATIO"]

TINY_WAN_TEXT_DIM, TINY_WAN_LATENT_CHANNELS = 16, 4
TINY_WAN_SHIFT, TINY_WAN_BOUNDARY_RATIO = 3.0, 0.875
# per-channel latent statistics of the toy VAE (Wan's are 16 measured values each)
_LATENTS_MEAN = [0.25, -0.5, 0.125, -0.75]
_LATENTS_STD = [2.0, 1.5, 0.5, 1.25]

PROMPTS = ["a red ball rolling across a wooden table", "a cat jumping onto a sofa",
           "waves breaking on a rocky shore at sunset", "a person walking a dog in the park"]


def _tiny_transformer(seed: int):
    from diffusers import WanTransformer3DModel  # noqa: PLC0415

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                     in_channels=TINY_WAN_LATENT_CHANNELS, out_channels=TINY_WAN_LATENT_CHANNELS,
                                     text_dim=TINY_WAN_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2,
                                     cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def save_tiny_wan_pipeline(folder: str | Path, *, two_experts: bool = False, seed: int = 0) -> Path:
    """Write the tiny Wan pipeline (+ prompts.txt) to `folder`; returns it. `two_experts`: Wan 2.2
    A14B style (`transformer_2/` and `boundary_ratio`); otherwise Wan 2.1 style (one transformer)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline  # noqa: PLC0415
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel  # noqa: PLC0415

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = ByT5Tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=TINY_WAN_TEXT_DIM, d_kv=8,
                                                   d_ff=32, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu"))
        vae = AutoencoderKLWan(base_dim=8, z_dim=TINY_WAN_LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               attn_scales=[], temperal_downsample=[False, True, True], latents_mean=_LATENTS_MEAN,
                               latents_std=_LATENTS_STD)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=TINY_WAN_SHIFT),
                       transformer=_tiny_transformer(seed + 1),
                       transformer_2=_tiny_transformer(seed + 2) if two_experts else None,
                       boundary_ratio=TINY_WAN_BOUNDARY_RATIO if two_experts else None)
    pipe.save_pretrained(out)
    (out / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sage_fast.models.tiny_wan_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--two-experts", action="store_true", help="Wan 2.2 A14B style: transformer_2 and boundary_ratio")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(save_tiny_wan_pipeline(args.folder, two_experts=args.two_experts, seed=args.seed))


if __name__ == "__main__":
    main()
