"""Pretrain the world's base model: `python -m sage_fast.world.pretrain`.

Trains a tiny HunyuanVideo-1.5-class transformer (`sage_fast.models`, the adapter the trainer
uses) by flow matching on freshly rendered videos of the world (docs/SPEC.md section 1):

    x0 = encode(render(scene)),  x1 ~ N(0, I),  x_sigma = (1 - sigma) x0 + sigma x1
    loss = mean (v_theta(x_sigma, 1000 sigma, text) - (x1 - x0))^2

with sigma = shift_s(u), u ~ logit-normal(0, 1) (70%) or uniform (30%, `--uniform-frac`), where
shift_s(u) = s u / (1 + (s - 1) u) is the sampling schedule's shift (docs/SPEC.md section 1; s = 3 by
default, the world's sampling shift), so training spends its steps where the sampler does (a
shift-3, 20-step ODE takes 5 of its 20 steps above sigma 0.9, where unshifted logit-normal
training puts 2% of its samples; docs/LOG.md, 2026-11-24).

With `--prediction sample` (the default) the transformer outputs the clean latents and
v_theta = (x_sigma - x0_theta) / max(sigma, 0.05) (x-prediction with the velocity loss, JiT: Li &
He 2025); the mode is saved in config.json, so the trainer's `velocity` is the same function.
At equal CPU time it denoised better than velocity prediction in every measured respect
(docs/LOG.md, 2026-11-24: x-prediction for the world's base model).

Condition dropout: with probability `cond_dropout` the prompt is replaced by the empty prompt ""
(the CFG negative), so one model gives both halves of classifier-free guidance. The data are infinite: step i renders
`sample_scenes(batch, seed + i)`; nothing is read from disk.

Writes to `--out` (default `sage_fast/world/assets/base_model`):
    config.json + diffusion_pytorch_model.safetensors  (diffusers folder, float16 weights of the
        EMA model; `sage_fast.models.load_transformer` loads it as float32)
    world.json      the world and sampling settings the checkpoint was trained for
    train_log.jsonl one line per logged step (loss, lr, elapsed seconds)
and then runs the evaluation (`evaluate.py`, `model_card.py`), which writes MODEL_CARD.md and its pictures.

Determinism: model init, data, noise and dropout all come from `--seed`; the run is repeatable
on the same machine and thread count (CPU kernels may differ in the last bits elsewhere), with
or without data-loading workers (`--workers`). `--lr-schedule time` ties the cosine to the
clock, so such a run depends on the machine's speed.

On a GPU (`--device cuda --autocast bfloat16`; `bench/gpu_pretrain_world.sh` runs it in one
call): scenes and token ids are built on the host (by `--workers` processes), rendering,
noise (a CUDA generator: not the CPU's numbers) and the model run on the device, host draws
arrive through pinned memory without a sync, and the forward orders the text tokens without
the class's per-sample loop (`sage_fast.models.forward_batched_text`). `--check-device` compares
one batch's velocity there with the CPU's float32 first.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from sage_fast.grpo.schedule import shift_sigma
from sage_fast.models import PREDICTIONS, SAMPLE_SIGMA_MIN, Conditioning, VelocityModelConfig, build_velocity_model

from . import codec
from .base_model import (CHECK_TOLERANCE, DEFAULT_CHECKPOINT, adaln_zero_init_, check_device, freeze_byt5_hidden_,
                         model_overrides, save_checkpoint)
from .prompts import WorldTextEncoder, describe_scenes
from .render import FRAMES, HEIGHT, WIDTH, render, sample_scenes

__all__ = ["StepData", "drop_prompts", "loss_weights", "main"]



def loss_weights(sigma_b: torch.Tensor, floor: float) -> torch.Tensor:
    """Per-sample factors on the velocity MSE. The velocity loss weighs the x0 error by
    1 / max(sigma, 0.05)^2; with `floor` > 0 the weight becomes 1 / max(sigma, floor)^2, which
    down-weights the low-noise samples (fine detail) against the high-noise ones (layout,
    motion). floor = 0: all ones (the plain velocity loss)."""
    if floor <= 0:
        return torch.ones_like(sigma_b)
    return (sigma_b.clamp(min=SAMPLE_SIGMA_MIN) / sigma_b.clamp(min=floor)) ** 2


def _lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sage_fast.world.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--two-object-prob", type=float, default=0.5)
    p.add_argument("--frames", type=int, default=FRAMES, help="video frames (4k+1); recorded in world.json")
    p.add_argument("--patch", type=int, default=codec.PATCH,
                   help="codec space-to-depth patch (tokens of 3 * patch^2 * temporal channels); recorded in world.json")
    p.add_argument("--temporal", type=int, default=codec.TEMPORAL,
                   help="codec time compression (frames 4j-3..4j in one latent frame at 4; 1 = per frame); in world.json")
    p.add_argument("--prediction", choices=PREDICTIONS, default="sample",
                   help="what the transformer outputs: 'sample' (x0, x-prediction; the velocity is derived "
                        "from it) or 'velocity'; the loss is the velocity MSE either way (sage_fast.models)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--x0-weight-floor", type=float, default=0.0,
                   help="weigh the x0 error by 1/max(sigma, floor)^2 instead of 1/max(sigma, 0.05)^2 (0: off)")
    p.add_argument("--freeze-byt5-hidden", action="store_true",
                   help="keep the ByT5 text projection's 2048-wide layers (context_embedder_2 norm, linear_1, linear_2: "
                        "4.2M of the 6.4M parameters) at their random init; its output layer trains. ~13%% faster "
                        "steps on the CPU box (docs/LOG.md, 2026-11-30)")
    p.add_argument("--uniform-frac", type=float, default=0.3,
                   help="share of training sigmas drawn uniformly in u (before the shift) instead of logit-normal")
    p.add_argument("--sampling-cfg", type=float, default=3.0,
                   help="CFG scale recorded in world.json for sampling (evaluation; the trainer's rollouts use their own)")
    p.add_argument("--sigma-shift", type=float, default=3.0,
                   help="shift applied to the logit-normal training sigmas (1 = unshifted); match the sampling shift")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from the weights of this world checkpoint folder (continued pretraining)")
    p.add_argument("--init", choices=("adaln_zero", "default"), default="adaln_zero",
                   help="adaln_zero: DiT's zero-initialised gates and output "
                        "(sage_fast.world.base_model.adaln_zero_init_); default: the class's own random init")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="where to train: cpu (the shipped recipe) or cuda (render, noise and model on the GPU; the "
                        "noise then comes from a CUDA generator, so runs differ from the CPU's)")
    p.add_argument("--autocast", choices=("none", "bfloat16"), default="none",
                   help="forward compute dtype under autocast: none (float32), bfloat16 (GPU; slower on the CPU box); "
                        "no float16 (it would need loss scaling)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading worker processes for scenes, prompts and token ids (0: in the main process); "
                        "the batches are the same either way")
    p.add_argument("--lr-schedule", choices=("steps", "time"), default="steps",
                   help="cosine over the planned --steps, or over --time-budget-min (for a machine whose step "
                        "time is not known in advance; the run then depends on its speed)")
    p.add_argument("--save-every-min", type=float, default=0.0,
                   help="also write the EMA checkpoint every this many minutes (0: only at the end)")
    p.add_argument("--check-device", action="store_true",
                   help="only compare one batch's velocity on --device under --autocast with the CPU's float32 "
                        "(relative difference; exit 1 above CHECK_TOLERANCE) and stop")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-budget-min", type=float, default=40.0,
                   help="stop early (and say so in the log) if training exceeds this many minutes")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--eval-prompts", type=int, default=64)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device != "cpu" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA build of torch and a visible GPU; allowed here: cpu")
    if args.save_every_min < 0:
        raise ValueError(f"--save-every-min must be >= 0 (0: only at the end), got {args.save_every_min}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if not args.time_budget_min > 0:
        raise ValueError(f"--time-budget-min must be > 0, got {args.time_budget_min}")
    for name in ("steps", "batch", "warmup", "heads", "layers", "threads", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.patch < 1 or HEIGHT % args.patch or WIDTH % args.patch:
        raise ValueError(f"--patch must divide the {HEIGHT}x{WIDTH} frame, got {args.patch}")
    if args.frames < 5 or (args.frames - 1) % 4:
        raise ValueError(f"--frames must be 4k+1 with k >= 1 (5, 9, 17, ...), got {args.frames}")
    if args.temporal < 1 or (args.frames - 1) % args.temporal:
        raise ValueError(f"--temporal must be >= 1 and divide frames - 1 = {args.frames - 1}, got {args.temporal}")
    if not 0.0 <= args.uniform_frac <= 1.0:
        raise ValueError(f"--uniform-frac must be in [0, 1], got {args.uniform_frac}")
    if not 0.0 <= args.x0_weight_floor < 1.0:
        raise ValueError(f"--x0-weight-floor must be in [0, 1), got {args.x0_weight_floor}")
    if not args.sigma_shift > 0:
        raise ValueError(f"--sigma-shift must be > 0, got {args.sigma_shift}")
    if not 0.0 <= args.cond_dropout < 1.0:
        raise ValueError(f"--cond-dropout must be in [0, 1), got {args.cond_dropout}")
    return args


class StepData(torch.utils.data.Dataset):
    """Step i's training batch before it reaches the device: `sample_scenes(batch, seed * 1000003 + i)`,
    their prompts and the prompts' token ids (CPU). Indexed by step, so data-loading workers
    (`--workers`) hand the main process exactly what it would have built itself."""

    def __init__(self, args, encoder: WorldTextEncoder) -> None:
        self.batch, self.seed, self.frames = args.batch, args.seed, args.frames
        self.two_object_prob, self.encoder = args.two_object_prob, encoder

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int):
        scene = sample_scenes(self.batch, self.seed * 1_000_003 + step, two_object_prob=self.two_object_prob,
                              frames=self.frames)
        prompts = describe_scenes(scene)
        return (scene, *self.encoder.token_ids(prompts))


def _as_is(item):
    return item


def _batches(data: StepData, first: int, steps: int, workers: int):
    """Steps first..steps-1 of `data`, in order, built here (workers = 0) or by worker processes
    (started here: call before CUDA is initialised, so the workers fork from a process without it)."""
    if workers == 0:
        return (data[i] for i in range(first, steps))
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(first, steps), num_workers=workers,
                                         collate_fn=_as_is, prefetch_factor=4, persistent_workers=False)
    return iter(loader)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a host sync on a GPU (through pinned memory, non-blocking)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def drop_prompts(ids_bl: torch.Tensor, mask_bl: torch.Tensor, drop_b: torch.Tensor):
    """Condition dropout on token ids: rows in `drop_b` become the empty prompt "" (its one start
    token), and the length is trimmed to the longest row left, so the result equals
    `token_ids` of the prompts with the dropped ones replaced by ""."""
    if not bool(drop_b.any()):
        return ids_bl, mask_bl
    ids_bl, mask_bl = ids_bl.clone(), mask_bl.clone()
    ids_bl[drop_b] = 0
    mask_bl[drop_b] = 0
    mask_bl[drop_b, 0] = 1
    L = int(mask_bl.sum(1).max())
    return ids_bl[:, :L].contiguous(), mask_bl[:, :L].contiguous()


def _progress_lr(args, step: int, elapsed_s: float) -> float:
    """The learning rate of `step`: linear warm-up over `--warmup` steps, then a cosine to 10%
    over the planned steps (`--lr-schedule steps`) or over the time budget (`time`)."""
    if args.lr_schedule == "steps" or step < args.warmup:
        return _lr(step, args.steps, args.lr, args.warmup)
    frac = min(1.0, elapsed_s / (60.0 * args.time_budget_min))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    overrides = model_overrides(args.heads, args.head_dim, args.layers, args.mlp_ratio, args.patch, args.temporal)
    cfg = VelocityModelConfig(architecture="tiny", finetune="full", autocast_dtype=args.autocast,
                              attention_backend="sdpa", architecture_overrides=overrides,
                              prediction=args.prediction)
    if args.init_from is not None:
        cfg = VelocityModelConfig(checkpoint=str(args.init_from), finetune="full", autocast_dtype=args.autocast,
                                  attention_backend="sdpa", prediction=args.prediction)
    model = build_velocity_model(cfg, seed=args.seed)
    # the class's forward orders the text tokens in a per-sample loop (a host sync per sample and
    # mask on a GPU); the batched equivalent gives the same output bit for bit (tests/test_models.py)
    model.batched_text = True
    if args.init_from is not None:
        overrides = {k: model.transformer.config[k] for k in overrides}
    elif args.init == "adaln_zero":
        adaln_zero_init_(model.transformer)
    if args.freeze_byt5_hidden:
        freeze_byt5_hidden_(model.transformer)
    # token ids are built on the host (here or in workers, which start before the model is moved)
    batches = _batches(StepData(args, WorldTextEncoder.for_model(model.transformer.config)), 0, args.steps,
                       args.workers)
    model.to(device).train()
    ema = copy.deepcopy(model.transformer).requires_grad_(False)
    encoder = WorldTextEncoder.for_model(model.transformer.config, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.transformer.parameters())
    n_trainable = sum(p.numel() for p in params)
    # fused AdamW: one kernel over all parameters (50 -> 7 ms a step on 2 CPU threads).
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=True)
    ema_params, model_params = list(ema.parameters()), list(model.transformer.parameters())
    # host draws (dropout, sigma) from `g`; the noise from `g` too on the CPU (the shipped recipe's
    # order, bit for bit) or from a generator on the device
    g = torch.Generator().manual_seed(args.seed + 1)
    g_noise = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(args.seed + 1)
    log_path = out / "train_log.jsonl"
    log_f = log_path.open("w")
    t0 = last_save = time.time()
    last_log_s = 0.0
    # float64 sum of the float32 losses: the same logged means as summing loss.item() on the host
    running, n_run, stopped_early, step = torch.zeros((), dtype=torch.float64, device=device), 0, False, 0
    print(f"pretrain: {n_params / 1e6:.2f}M parameters ({n_trainable / 1e6:.2f}M trained), {args.steps} steps x batch "
          f"{args.batch}, {_device_name(device)}, threads {args.threads}, workers {args.workers}, out {out}", flush=True)

    def world_json(steps_done: int, train_s: float, finished: bool) -> dict:
        return {
            "frames": args.frames, "height": HEIGHT, "width": WIDTH, "patch": args.patch, "temporal": args.temporal,
            "latent_scale": codec.LATENT_SCALE, "text_encoder_seed": 0,
            "sampling": {"steps": 20, "shift": 3.0, "cfg_scale": args.sampling_cfg, "sampler": "ode"},
            "train": {"steps_done": steps_done, "steps_planned": args.steps, "batch": args.batch, "lr": args.lr,
                      "lr_schedule": args.lr_schedule, "warmup": args.warmup, "ema": args.ema,
                      "cond_dropout": args.cond_dropout, "two_object_prob": args.two_object_prob, "seed": args.seed,
                      "init": args.init, "prediction": args.prediction,
                      "init_from": None if args.init_from is None else str(args.init_from), "sigma_shift": args.sigma_shift,
                      "uniform_frac": args.uniform_frac, "x0_weight_floor": args.x0_weight_floor,
                      "freeze_byt5_hidden": args.freeze_byt5_hidden, "threads": args.threads,
                      "device": _device_name(device), "autocast": args.autocast,
                      "train_seconds": round(train_s, 1), "stopped_early": stopped_early, "finished": finished,
                      "parameters": n_params, "trained_parameters": n_trainable, "architecture_overrides": overrides},
            "command": "python -m sage_fast.world.pretrain " + " ".join(shlex.quote(a) for a in args.argv),
        }

    for step in range(args.steps):
        scene, ids_bl, mask_bl = next(batches)
        drop = torch.rand(args.batch, generator=g) < args.cond_dropout
        text = encoder.embed(*(_to_device(t, device) for t in drop_prompts(ids_bl, mask_bl, drop)))
        if device.type != "cpu":
            scene = scene.pin_memory().to(device, non_blocking=True)
        x0 = codec.encode(render(scene, frames=args.frames), args.patch, args.temporal)  # [B, 3 p^2 tau, T, H/p, W/p]
        x1 = torch.randn(x0.shape, generator=g_noise, device=device)
        sigma = torch.sigmoid(torch.randn(args.batch, generator=g))
        uniform = torch.rand(args.batch, generator=g) < args.uniform_frac
        sigma = torch.where(uniform, torch.rand(args.batch, generator=g), sigma)
        sigma = _to_device(shift_sigma(sigma, args.sigma_shift), device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * x1
        for group in opt.param_groups:
            group["lr"] = _progress_lr(args, step, time.time() - t0)
        v = model.velocity(xt, 1000.0 * sigma, Conditioning(prompt=text))
        err = (v.float() - (x1 - x0)).square()
        if args.x0_weight_floor > 0:
            loss = (err.mean((1, 2, 3, 4)) * loss_weights(sigma, args.x0_weight_floor)).mean()
        else:  # the shipped recipe, bit for bit
            loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        running += loss.detach()  # no host sync per step on a GPU
        n_run += 1
        elapsed = time.time() - t0
        out_of_time = elapsed > args.time_budget_min * 60
        if (step + 1) % args.log_every == 0 or step == args.steps - 1 or out_of_time:
            row = {"step": step + 1, "loss": running.item() / n_run, "lr": opt.param_groups[0]["lr"],
                   "elapsed_s": round(time.time() - t0, 1)}
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"pretrain: the loss is {row['loss']} at step {step + 1}; the last "
                                         f"checkpoint in {out} (if any) is intact")
            log_f.write(json.dumps(row) + "\n")
            log_f.flush()
            print(f"step {step + 1:5d}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  {elapsed / 60:.1f} min  "
                  f"{1000 * (row['elapsed_s'] - last_log_s) / n_run:.1f} ms/step", flush=True)
            last_log_s = row["elapsed_s"]
            running, n_run = torch.zeros((), dtype=torch.float64, device=device), 0
            if args.save_every_min > 0 and time.time() - last_save > 60 * args.save_every_min:
                save_checkpoint(ema, out, world_json(step + 1, time.time() - t0, finished=False))
                last_save = time.time()
        if out_of_time:
            stopped_early = True
            print(f"time budget {args.time_budget_min} min reached at step {step + 1}", flush=True)
            break
    log_f.close()
    train_s = time.time() - t0
    world = world_json(step + 1, train_s, finished=True)
    save_checkpoint(ema, out, world)
    print(f"saved {out} after {train_s / 60:.1f} min", flush=True)
    return world


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.check_device:
        torch.set_num_threads(args.threads)
        rel = check_device(args.device, args.autocast)
        ok = rel <= CHECK_TOLERANCE[args.autocast]
        print(f"check-device {args.device} autocast {args.autocast}: relative velocity difference vs CPU float32 "
              f"{rel:.2e} (tolerance {CHECK_TOLERANCE[args.autocast]:.0e}): {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            sys.exit(1)
        return
    train(args)
    if not args.skip_eval:
        from .model_card import write_model_card  # noqa: PLC0415

        write_model_card(args.out, num_prompts=args.eval_prompts)


if __name__ == "__main__":
    main()
