"""The model card of a world checkpoint: MODEL_CARD.md, eval.json and its pictures (Pillow).

    write_model_card(DIR)        # what `python -m sage_fast.world.evaluate --checkpoint DIR` runs

A pretrained base model (world.json, train_log.jsonl beside it) gets the base model's card, with
its training recipe and loss curve; a policy exported from a GRPO run (export.json beside it) gets
the export card: the same evaluation and its provenance.

Leaves to others: the evaluation itself (`evaluate.evaluate_checkpoint`), the checkpoint files
(`base_model`, `sage_fast.export`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import codec
from .base_model import DEFAULT_CHECKPOINT
from .evaluate import EVAL_SEED, codec_layout, evaluate_checkpoint

__all__ = ["write_model_card", "save_grid", "save_gif", "save_loss_curve"]


# ---------------------------------------------------------------------------------------------
# Pictures (Pillow)


def _to_image(frame_3hw: torch.Tensor, zoom: int):
    from PIL import Image  # noqa: PLC0415

    arr = ((frame_3hw.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr, "RGB")
    return img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)


def save_grid(path: Path, prompts, renders, samples, rows: int = 8, frames=None, zoom: int = 3) -> None:
    """PNG: one row per prompt, frames of the clean render (left) then of the sample (right);
    frames: indices to show (default: every frame up to 5, else every other one)."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    frames = _grid_frames(renders.shape[2]) if frames is None else frames

    H, W = renders.shape[-2] * zoom, renders.shape[-1] * zoom
    pad, text_h = 4, 14
    cols = 2 * len(frames)
    grid = Image.new("RGB", (cols * (W + pad) + pad * 3, rows * (H + pad + text_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r in range(rows):
        y = pad + r * (H + pad + text_h)
        draw.text((pad, y), f"{prompts[r]}   [render | base model]", fill=(0, 0, 0))
        for j, f in enumerate(frames):
            for side, video in enumerate((renders, samples)):
                x = pad + side * (len(frames) * (W + pad) + 2 * pad) + j * (W + pad)
                grid.paste(_to_image(video[r, :, f], zoom), (x, y + text_h))
    grid.save(path)


def save_gif(path: Path, renders, samples, rows: int = 8, zoom: int = 3) -> None:
    """Animated GIF: top row clean renders, bottom row base-model samples of the same prompts."""
    from PIL import Image  # noqa: PLC0415

    H, W = renders.shape[-2] * zoom, renders.shape[-1] * zoom
    pad = 4
    images = []
    for f in range(renders.shape[2]):
        canvas = Image.new("RGB", (rows * (W + pad) + pad, 2 * (H + pad) + pad), (255, 255, 255))
        for r in range(rows):
            canvas.paste(_to_image(renders[r, :, f], zoom), (pad + r * (W + pad), pad))
            canvas.paste(_to_image(samples[r, :, f], zoom), (pad + r * (W + pad), 2 * pad + H))
        images.append(canvas)
    images[0].save(path, save_all=True, append_images=images[1:], duration=150, loop=0)


def save_loss_curve(path: Path, log_rows: list[dict], size=(480, 240)) -> None:
    """PNG line plot of the logged training loss (log scale) against the step."""
    import math  # noqa: PLC0415

    from PIL import Image, ImageDraw  # noqa: PLC0415

    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    m = 30
    steps = [r["step"] for r in log_rows]
    losses = [math.log10(r["loss"]) for r in log_rows]
    lo, hi = min(losses), max(losses)
    pts = [(m + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (size[0] - 2 * m),
            size[1] - m - (v - lo) / max(1e-9, hi - lo) * (size[1] - 2 * m)) for s, v in zip(steps, losses)]
    draw.rectangle([m, m, size[0] - m, size[1] - m], outline=(160, 160, 160))
    draw.line(pts, fill=(30, 80, 200), width=2)
    draw.text((m, 8), f"train loss (log10) {10 ** hi:.3f} -> {10 ** lo:.3f}, steps {steps[0]}..{steps[-1]}",
              fill=(0, 0, 0))
    img.save(path)


# ---------------------------------------------------------------------------------------------
# Model card


def _row(name, s):
    return f"| {name} | {s['vq']:.3f} | {s['mq']:.3f} | {s['ta']:.3f} | {s['manifold']:.3f} |"


def _prediction_line(config: dict) -> str:
    from sage_fast.models.velocity import PREDICTION_KEY  # noqa: PLC0415

    if config.get(PREDICTION_KEY, "velocity") == "sample":
        return (f"x0 (`{PREDICTION_KEY}: sample` in config.json: the transformer outputs the clean latents, "
                "the adapter returns (x - x0_hat) / max(sigma, 0.05); loss = velocity MSE)")
    return "velocity (the transformer outputs x1 - x0)"


def write_model_card(path: str | Path = DEFAULT_CHECKPOINT, num_prompts: int = 64,
                     cfg_scales: tuple[float, ...] = (1.0, 3.0, 8.0)) -> dict:
    """Evaluate the checkpoint at `path` and write MODEL_CARD.md, eval.json, samples.png,
    samples.gif and loss.png next to it. Returns the evaluation dict (without videos).
    A policy exported from a GRPO run (`sage_fast.export`: export.json, no pretraining log)
    gets the export card instead: the same evaluation, its provenance, no loss curve."""
    path = Path(path)
    t0 = time.time()
    result = evaluate_checkpoint(path, num_prompts, cfg_scales)
    videos = result.pop("_videos")
    prompts = result["prompts"]
    save_grid(path / "samples.png", prompts, videos["render"], videos["sample"])
    save_gif(path / "samples.gif", videos["render"], videos["sample"])
    (path / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    if (path / "export.json").exists():
        (path / "MODEL_CARD.md").write_text(_export_card(path, result, num_prompts, time.time() - t0))
        return result
    world = json.loads((path / "world.json").read_text())
    log_rows = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines() if line.strip()]
    save_loss_curve(path / "loss.png", log_rows)
    config = json.loads((path / "config.json").read_text())
    tr = world["train"]
    h = result["headroom"]
    in_window = h["vq"] >= 0.8 and h["mq"] >= 0.8 and h["ta"] <= 0.7
    every = max(1, len(log_rows) // 12)
    loss_table = "\n".join(f"| {r['step']} | {r['loss']:.4f} | {r['elapsed_s'] / 60:.1f} |"
                           for r in log_rows[::every] + ([log_rows[-1]] if (len(log_rows) - 1) % every else []))
    sweep = "\n".join(f"| {cfg} | {s['vq']:.3f} | {s['mq']:.3f} | {s['ta']:.3f} | {s['manifold']:.3f} |"
                      for cfg, s in result["cfg_sweep"].items())
    smp = result["sampling"]
    r, s, n = result["render"], result["sample"], result["noise"]
    text = f"""# Base model of the synthetic world

A tiny `HunyuanVideo15Transformer3DModel` (diffusers class, same adapter as the trainer:
`sage_fast.models`) pretrained by flow matching on the synthetic video world
(`sage_fast.world`): {world['frames']} frames of {world['height']} x {world['width']} RGB, one or two objects (circle / square / triangle,
6 colours, 2 sizes, moving left / right / up / down) on a grey background. It is the default
base policy of the tiny-world recipe: GRPO starts from here.

- Made by (from the repository root, CPU): `{world['command']}`, then
  `python -m sage_fast.world.evaluate` (this card; {time.time() - t0:.0f} s).
- Training: {_steps_line(tr)} x batch {tr['batch']},
  AdamW lr {tr['lr']} (warm-up {tr['warmup']} steps, cosine to 10% {_schedule_span(tr)}), grad clip 1, EMA {tr['ema']} (the EMA weights are shipped),
  condition dropout {tr['cond_dropout']} (empty prompt = CFG negative), {_sigma_line(tr)}, init {tr.get('init', 'default')},
  prediction {_prediction_line(config)}{_loss_line(tr)},
  data: fresh renders every step (`sample_scenes(batch, seed * 1000003 + step)`), two-object probability {tr['two_object_prob']}.
  Wall time {tr['train_seconds'] / 60:.1f} min on {_machine_line(tr)}; final logged loss {log_rows[-1]['loss']:.4f}.
- Model: {tr['parameters'] / 1e6:.2f}M parameters (4.2M of them are the class's fixed-width 2048 ByT5 projection{_frozen_line(tr)}),
  weights stored as float16 (loaded as float32). Latents: `codec.encode` (space-to-depth {world['patch']}x{world['patch']}, x{world['latent_scale']:g}),
  {_latent_line(world)}. Text: `WorldTextEncoder` (frozen, seed {world['text_encoder_seed']}).
- Sampling used below: Euler ODE, {smp['steps']} steps, shift {smp['shift']}, CFG {smp['cfg_scale']}
  (`evaluate.sample_videos`), seed = row index.

Architecture (config.json): heads {config['num_attention_heads']} x {config['attention_head_dim']}, {config['num_layers']} double-stream
blocks, {config['num_refiner_layers']} refiner block, mlp ratio {config['mlp_ratio']}, RoPE axes {config['rope_axes_dim']},
in/out channels {config['in_channels']}/{config['out_channels']}, text widths {config['text_embed_dim']}/{config['text_embed_2_dim']}.

## Rewards and manifold distance of samples

{num_prompts} evaluation prompts (`sample_prompts({num_prompts}, {EVAL_SEED})`, half two-object compositions).
Rewards in [0, 1] (`WorldReward`, see `rewards.py`); manifold = RMS distance to the best re-rendering
(`manifold.py`, RGB units of [-1, 1]); means over prompts.

| videos | VQ | MQ | TA | manifold distance |
|---|---|---|---|---|
{_row('clean renders', r)}
{_row('base-model samples', s)}
{_row('pure noise', n)}
{_row('samples, one object', {**s['one_object']})}
{_row('samples, two objects', {**s['two_objects']})}
{_row('renders, two objects', {**r['two_objects']})}

Sample std over prompts: VQ {s['vq_std']:.3f}, MQ {s['mq_std']:.3f}, TA {s['ta_std']:.3f}; median manifold distance {s['manifold_median']:.3f}.

## Headroom for RL

Samples / clean renders: **VQ {h['vq']:.1%}, MQ {h['mq']:.1%}, TA {h['ta']:.1%}**
(target: VQ and MQ >= 80%, TA <= 70%): {'inside the window' if in_window else 'OUTSIDE the window (see Notes)'}.

CFG sweep (same prompts and seeds, same ODE):

| CFG | VQ | MQ | TA | manifold |
|---|---|---|---|---|
{sweep}

## Loss curve

![loss](loss.png)

| step | loss (mean since last log) | minutes |
|---|---|---|
{loss_table}

## Samples

Each row: frames {", ".join(map(str, _grid_frames(world['frames'])))} of the clean render of the prompt (left) and of the base
model's sample (right). The GIF plays all {world['frames']} frames (top: renders, bottom: samples).

![grid](samples.png)

![gif](samples.gif)
{_notes(path)}"""
    (path / "MODEL_CARD.md").write_text(text)
    return result


def _export_card(path: Path, result: dict, num_prompts: int, seconds: float) -> str:
    """MODEL_CARD.md of a policy exported from a GRPO run (export.json beside it): where it came
    from, and the base model's evaluation protocol's numbers, next to the base model's own samples
    when its eval.json was made with the same prompts and sampler."""
    manifest = json.loads((path / "export.json").read_text())
    base = manifest.get("base_checkpoint")
    if manifest.get("finetune") == "lora":
        lora = manifest.get("lora") or {}
        how = (f"LoRA rank {lora.get('rank')}, alpha {lora.get('alpha')}, merged into the weights; the adapter "
               f"alone in `{manifest.get('adapter')}/`, peft format")
    else:
        how = "full fine-tuning"
    base_line = f"`{base}`" if base else f"a random init ({manifest.get('base_random_init')})"
    s, r, n = result["sample"], result["render"], result["noise"]
    rows = [_row("clean renders", r), _row("policy samples", s)]
    base_eval = Path(base) / "eval.json" if base else None
    if base_eval is not None and base_eval.is_file():
        before = json.loads(base_eval.read_text())
        if before.get("prompts") == result["prompts"] and before.get("sampling") == result["sampling"]:
            rows.append(_row("base-model samples (its eval.json)", before["sample"]))
    rows += [_row("pure noise", n), _row("policy samples, one object", s["one_object"]),
             _row("policy samples, two objects", s["two_objects"])]
    sweep = "\n".join(f"| {cfg} | {v['vq']:.3f} | {v['mq']:.3f} | {v['ta']:.3f} | {v['manifold']:.3f} |"
                      for cfg, v in result["cfg_sweep"].items())
    smp, h = result["sampling"], result["headroom"]
    rows_text = "\n".join(rows)
    return f"""# GRPO policy of the synthetic world

Exported by `sage_fast.export` from run `{manifest.get('source_run')}` at iteration {manifest.get('iteration')}
({how}); base model {base_line}; weights {manifest.get('dtype')}.
Evaluated with the base model's protocol (`python -m sage_fast.world.evaluate`, {seconds:.0f} s):
{num_prompts} prompts `sample_prompts({num_prompts}, {EVAL_SEED})`, Euler ODE, {smp['steps']} steps,
shift {smp['shift']}, CFG {smp['cfg_scale']}, seed = row index.

| videos | VQ | MQ | TA | manifold distance |
|---|---|---|---|---|
{rows_text}

Samples / clean renders: VQ {h['vq']:.1%}, MQ {h['mq']:.1%}, TA {h['ta']:.1%}.

CFG sweep (same prompts and seeds, same ODE):

| CFG | VQ | MQ | TA | manifold |
|---|---|---|---|---|
{sweep}

## Samples

Each row: the clean render of the prompt (left) and the policy's sample (right).

![grid](samples.png)

![gif](samples.gif)
"""


def _steps_line(tr: dict) -> str:
    if tr.get("lr_schedule", "steps") == "time":
        return f"{tr['steps_done']} steps (as many as the time budget allowed)"
    return f"{tr['steps_done']} steps (planned {tr['steps_planned']}{', stopped by the time budget' if tr['stopped_early'] else ''})"


def _schedule_span(tr: dict) -> str:
    return "over the time budget" if tr.get("lr_schedule", "steps") == "time" else "over the planned steps"


def _loss_line(tr: dict) -> str:
    floor = tr.get("x0_weight_floor", 0.0)
    return f", the x0 error weighted by 1 / max(sigma, {floor:g})^2 (`--x0-weight-floor`)" if floor > 0 else ""


def _machine_line(tr: dict) -> str:
    device = tr.get("device", "cpu")
    return f"{tr['threads']} CPU threads" if device == "cpu" else f"{device} ({tr.get('autocast', 'none')} autocast)"


def _frozen_line(tr: dict) -> str:
    return "; its norm and 2048-wide layers kept at their random init" if tr.get("freeze_byt5_hidden") else ""


def _sigma_line(tr: dict) -> str:
    """The training sigma distribution as pretrain.py drew it (older checkpoints: unshifted, 10% uniform)."""
    shift, uniform = tr.get("sigma_shift", 1.0), tr.get("uniform_frac", 0.1)
    return (f"sigma = shift_{shift:g}(u), u ~ logit-normal(0, 1) ({1 - uniform:.0%}) / uniform ({uniform:.0%})"
            if shift != 1.0 else f"sigma ~ logit-normal(0, 1) ({1 - uniform:.0%}) / uniform ({uniform:.0%})")


def _grid_frames(n: int) -> tuple[int, ...]:
    """Frames the grid shows of an n-frame clip: all up to 5, else every other one."""
    return tuple(range(n)) if n <= 5 else tuple(range(0, n, 2))


def _latent_line(world: dict) -> str:
    patch, temporal = codec_layout(world)
    C, T, Hp, Wp = codec.latent_shape(world["frames"], world["height"], world["width"], patch, temporal)
    return (f"time compressed {temporal}x (frame 0 alone, then groups of {temporal}), " if temporal > 1 else "") + \
        f"{C} channels x {T} x {Hp} x {Wp} = {T * Hp * Wp} tokens"


def _notes(path: Path) -> str:
    """The hand-written NOTES.md of the checkpoint folder (history, known limits), if any."""
    notes = path / "NOTES.md"
    return "\n## Notes\n\n" + notes.read_text().strip() + "\n" if notes.exists() else ""
