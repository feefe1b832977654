"""Load, sample and evaluate the world's base model (its model card: `model_card.py`).

    model, encoder, world = load_base_model()                  # the shipped checkpoint by default
    video_bcfhw = sample_videos(model, encoder, prompts, seed=0)  # ODE (Euler), CFG, world's settings
    python -m sage_fast.world.evaluate [--checkpoint DIR]      # rewrites DIR/MODEL_CARD.md + pictures

Evaluation protocol (`evaluate_checkpoint`): `num_prompts` prompts from `sample_prompts(n,
EVAL_SEED)` (half of them two-object compositions); for each, the clean render of the scene it
was drawn from, one base-model sample (seed = row index) and pure N(0, 1) noise decoded to a
video. Every set is scored by `WorldReward` (VQ, MQ, TA) and `manifold_distance`. Headroom =
mean(sample score) / mean(clean render score), per dimension.

Leaves to others: the GRPO sampler (this one is the plain deterministic Euler ODE of
docs/SPEC.md section 1 with the `ode` coefficients of `sage_fast.grpo.schedule`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sage_fast.grpo.schedule import sigmas as make_sigmas
from sage_fast.grpo.schedule import step_coefficients
from sage_fast.models import VelocityModel, load_transformer

from . import codec
from .base_model import DEFAULT_CHECKPOINT
from .manifold import manifold_distance
from .prompts import WorldTextEncoder, parse_prompt, sample_prompts
from .render import FRAMES, HEIGHT, WIDTH, render
from .rewards import DIMENSIONS, WorldReward

__all__ = ["DEFAULT_CHECKPOINT", "EVAL_SEED", "codec_layout", "load_base_model", "sample_videos",
           "evaluate_checkpoint"]

EVAL_SEED = 1234


def codec_layout(world: dict) -> tuple[int, int]:
    """(patch, temporal) of a checkpoint's codec from its world.json (checkpoints written before
    the temporal codec have no "temporal": theirs is 1)."""
    return int(world.get("patch", codec.PATCH)), int(world.get("temporal", 1))


def load_base_model(path: str | Path = DEFAULT_CHECKPOINT, device="cpu"):
    """(VelocityModel in float32 without autocast, WorldTextEncoder, world dict) of a checkpoint
    folder written by `pretrain.py` or by `sage_fast.export` (config.json, safetensors, world.json)."""
    path = Path(path)
    world_path = path / "world.json"
    if not world_path.exists():
        raise FileNotFoundError(f"{path} is not a world checkpoint: no world.json")
    world = json.loads(world_path.read_text())
    transformer = load_transformer(path, device=device).eval().requires_grad_(False)
    # a plain module: the batched text order gives the class's output bit for bit, without its per-sample loop
    model = VelocityModel(transformer, autocast_dtype=None, batched_text=True)
    encoder = WorldTextEncoder.for_model(transformer.config, seed=world["text_encoder_seed"], device=device)
    return model, encoder, world


@torch.no_grad()
def sample_videos(model: VelocityModel, encoder: WorldTextEncoder, prompts: list[str], seed: int = 0,
                  steps: int = 20, shift: float = 3.0, cfg_scale: float = 5.0,
                  frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, batch: int = 16,
                  patch: int = codec.PATCH, temporal: int = codec.TEMPORAL) -> torch.Tensor:
    """Deterministic Euler ODE samples, [B, 3, F, H, W] float32 (decoded, unclipped).

    Row i starts from noise drawn by `torch.Generator().manual_seed(seed + i)`, so a row's sample
    does not depend on the batch it is computed in."""
    for p in prompts:
        parse_prompt(p)
    C, T, Hp, Wp = codec.latent_shape(frames, height, width, patch, temporal)
    if C != model.latent_channels:
        raise ValueError(f"the codec (patch {patch}, temporal {temporal}) gives {C} latent channels, the model "
                         f"has {model.latent_channels}: pass the checkpoint's world.json patch and temporal")
    sig = make_sigmas(steps, shift)
    outs = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        x = torch.stack([torch.randn(C, T, Hp, Wp, generator=torch.Generator().manual_seed(seed + start + i))
                         for i in range(len(chunk))])
        cond = encoder.conditioning(chunk, negative=cfg_scale != 1.0)
        for i in range(steps):
            a, b, _ = step_coefficients(sig, torch.full((len(chunk),), i), "ode")
            v = model.velocity(x, 1000.0 * float(sig[i]), cond, cfg_scale=cfg_scale)
            x = a.float().view(-1, 1, 1, 1, 1) * x + b.float().view(-1, 1, 1, 1, 1) * v
        outs.append(codec.decode(x, patch, temporal))
    return torch.cat(outs)


def _stats(video, prompts, reward) -> dict:
    out = reward(video, prompts)
    d = manifold_distance(video)
    stats = {k: float(v.mean()) for k, v in out.scores.items()}
    stats.update({f"{k}_std": float(v.std()) for k, v in out.scores.items()})
    stats["manifold"] = float(d.mean())
    stats["manifold_median"] = float(d.median())
    return stats, out, d


def evaluate_checkpoint(path: str | Path = DEFAULT_CHECKPOINT, num_prompts: int = 64,
                        cfg_scales: tuple[float, ...] = ()) -> dict:
    """Scores of renders, samples and noise on the evaluation prompts (see module doc)."""
    model, encoder, world = load_base_model(path)
    smp = world["sampling"]
    size = dict(frames=world["frames"], height=world["height"], width=world["width"])
    prompts, scene = sample_prompts(num_prompts, EVAL_SEED, **size)
    reward = WorldReward("averaged")
    renders = render(scene, **size)
    t0 = time.time()
    lay = codec_layout(world)
    samples = sample_videos(model, encoder, prompts, seed=0, steps=smp["steps"], shift=smp["shift"],
                            cfg_scale=smp["cfg_scale"], patch=lay[0], temporal=lay[1], **size)
    sample_s = time.time() - t0
    noise = codec.decode(torch.randn(codec.encode(renders, *lay).shape, generator=torch.Generator().manual_seed(7)), *lay)
    result = {"prompts": prompts, "sampling": smp, "sample_seconds": round(sample_s, 1)}
    two = torch.tensor([len(parse_prompt(p)) == 2 for p in prompts])
    for name, video in (("render", renders), ("sample", samples), ("noise", noise)):
        stats, out, d = _stats(video, prompts, reward)
        for subset, sel in (("one_object", ~two), ("two_objects", two)):
            stats[subset] = {k: float(v[sel].mean()) for k, v in out.scores.items()}
            stats[subset]["manifold"] = float(d[sel].mean())
        result[name] = stats
    result["headroom"] = {k: result["sample"][k] / result["render"][k] for k in DIMENSIONS}
    result["cfg_sweep"] = {}
    for cfg in cfg_scales:
        video = sample_videos(model, encoder, prompts, seed=0, steps=smp["steps"], shift=smp["shift"], cfg_scale=cfg,
                              patch=lay[0], temporal=lay[1], **size)
        stats, _, _ = _stats(video, prompts, reward)
        result["cfg_sweep"][str(cfg)] = {k: stats[k] for k in (*DIMENSIONS, "manifold")}
    result["_videos"] = {"render": renders, "sample": samples}
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sage_fast.world.evaluate")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from . import model_card  # noqa: PLC0415  (Pillow, only for the card)

    result = model_card.write_model_card(args.checkpoint, args.prompts)
    print(json.dumps({k: result[k] for k in ("headroom", "sample_seconds")}, indent=1))
    for name in ("render", "sample", "noise"):
        print(name, {k: round(result[name][k], 3) for k in (*DIMENSIONS, "manifold")})


if __name__ == "__main__":
    main()
