"""Export a trained policy out of a run: a plain diffusers transformer folder with the LoRA merged,
and the LoRA adapter on its own.

    python -m sage_fast.export RUN [--step N] OUT [--dtype float32] [--overwrite]
    export_run(run_dir, out_dir, step=None)            # the same from Python; returns OUT
    export_policy(trainer_or_model, out_dir, cfg=...)  # a policy in memory (Trainer, VelocityModel, transformer)
    loaded = load_policy(run_dir, step=None)           # the run's policy itself (peft LoRA, unmerged)

RUN is a folder written by `python -m sage_fast.train`: `config.json` (the resolved TrainConfig)
and `checkpoints/step_<N>/state.pt`, whose state["model"] holds the trainable parameters by
`VelocityModel.named_parameters()` name. The policy is rebuilt as the trainer builds it (same
config, same seeded LoRA initialisation, the base weights from `model.checkpoint` or the seeded
random init), then those parameters are loaded; N defaults to the latest checkpoint.

OUT (the shipped base model's format, `sage_fast/world/assets/base_model/`):

    config.json                           HunyuanVideo15Transformer3DModel config (diffusers), with the
    diffusion_pytorch_model.safetensors   prediction key; every LoRA delta merged, W' = W + (alpha / r) B A,
                                          so no peft key: a plain diffusers model folder (sharded with
                                          diffusers' .index.json above `max_shard_bytes`)
    adapter/adapter_config.json           LoRA runs only: the adapter alone, in peft's format (the keys and
    adapter/adapter_model.safetensors     config `PeftModel.save_pretrained` writes), for the base model
    world.json                            task.kind='world' only: the base checkpoint's, copied; for a
                                          random-init base, written from the run config (what WorldTask used)
    export.json                           where it came from: run, iteration, checkpoint, base, merged, dtype

A Wan policy is written as its pipeline's parts, OUT/transformer/ (and OUT/transformer_2/, Wan 2.2),
each laid out as OUT above, for the experts the run trained (export.json "experts": written, and
left to the base); `WanPipeline.from_pretrained(base, transformer=WanTransformer3DModel...)` runs it.

Readers: `sage_fast.world.load_base_model(OUT)` and `python -m sage_fast.world.evaluate --checkpoint
OUT` (world), diffusers' `HunyuanVideo15Transformer3DModel.from_pretrained(OUT)`,
`sage_fast.models.load_transformer(OUT)` and so the trainer's `model.checkpoint=OUT`, and
`peft.PeftModel.from_pretrained(<base transformer>, OUT/adapter)`; for Wan
`WanTransformer3DModel.from_pretrained(OUT/transformer)` and its `adapter/` likewise.

Precision: the merge runs in float64 and the weights are written as float32 by default, so the
export's velocity equals the trained policy's to float32 rounding. Half precision is available
(`dtype`) but lossy where it matters: bf16 keeps 8 significant bits (resolution 2^-8 = 0.4% of
a weight) and float16 11 bits (0.05%), and a GRPO LoRA delta is often smaller than that, so it is
rounded away in part or whole.

Leaves to others: the merge and the weight and adapter files (policy_files.py), the checkpoint
layout (checkpoint.py), building and loading the policy (sage_fast.models), the run folder
(train.py), evaluation (sage_fast.world.evaluate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sage_fast.policy_files import exported_parts, lora_layers, merged_state_dict, write_adapter, write_weights

__all__ = ["DTYPES", "DEFAULT_MAX_SHARD_BYTES", "ADAPTER_FOLDER", "LoadedPolicy", "list_checkpoints", "read_run_config",
           "build_policy", "load_policy", "merged_state_dict", "export_policy", "export_run", "main"]

log = logging.getLogger("sage_fast.export")

#: output weight dtypes (see the module doc for why float32 is the default)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: diffusers' own default shard size (`save_pretrained(max_shard_size="10GB")`): the 8.3B
#: HunyuanVideo-1.5 transformer is 4 shards in float32, 2 in bf16; the world's model one file
DEFAULT_MAX_SHARD_BYTES = 10 * 10**9
ADAPTER_FOLDER = "adapter"


# ---------------------------------------------------------------------------------------------
# Reading a run


@dataclass
class LoadedPolicy:
    """A run's policy as it trained: `model` (VelocityModel, float32, peft LoRA unmerged, eval
    mode, no gradients), its run config, and the iteration and folder of the checkpoint."""

    model: nn.Module
    cfg: object  # TrainConfig
    iteration: int
    checkpoint: Path


def list_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """The run's complete checkpoints (a meta.json marks one, checkpoint.py), by iteration, ascending."""
    from sage_fast.checkpoint import CheckpointManager  # noqa: PLC0415

    return CheckpointManager(run_dir).by_step()


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise ValueError(f"run folder {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise ValueError(f"run folder {str(run_dir)!r} is not a folder")
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"{run_dir} is not a run folder of sage_fast.train: it has no config.json")


def read_run_config(run_dir: str | Path):
    """The run's TrainConfig, rebuilt from its config.json (`sage_fast.config.from_dict`)."""
    from sage_fast import config as C  # noqa: PLC0415
    from sage_fast.train_config import TrainConfig  # noqa: PLC0415

    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    try:
        return C.from_dict(TrainConfig, json.loads((run_dir / "config.json").read_text()))
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{run_dir}/config.json is not a TrainConfig this version of sage_fast reads: {err}") from err


def _select_checkpoint(run_dir: Path, step: int | None) -> tuple[int, Path]:
    from sage_fast.checkpoint import CheckpointManager  # noqa: PLC0415

    return CheckpointManager(run_dir).pick(step)


def _base_checkpoint(cfg) -> Path | None:
    """The run's base model (model.checkpoint), checked to exist; None for a random init."""
    if cfg.model.checkpoint is None:
        return None
    path = Path(cfg.model.checkpoint)
    if not path.exists():
        raise ValueError(f"the run's base model model.checkpoint={cfg.model.checkpoint!r} does not exist (a relative "
                         "path is read from the current folder): LoRA runs store only the adapter, so the base is "
                         "needed to rebuild the policy")
    return path


def build_policy(cfg, device="cpu") -> nn.Module:
    """The run's policy before training, built as `Trainer.__init__` builds it: the LoRA
    initialisation drawn under the same seed (derive_seed(run.seed, "init")), the random-init base
    from run.seed. The attention backend is SDPA and activation checkpointing off: an export runs
    no forward, and a backend chosen for the training GPUs (fa3) need not exist here."""
    from sage_fast.models import build_policy_model  # noqa: PLC0415

    _base_checkpoint(cfg)
    model_cfg = dataclasses.replace(cfg.model, attention_backend="sdpa", gradient_checkpointing=False)
    return build_policy_model(model_cfg, cfg.run.seed, device=device)


def load_policy(run_dir: str | Path, step: int | None = None, device="cpu") -> LoadedPolicy:
    """The policy of checkpoint `step` (its iteration; None = the latest) of the run at `run_dir`."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    iteration, ckpt = _select_checkpoint(run_dir, step)
    model = build_policy(cfg, device=device)
    # mmap: only state["model"] is read from disk, not the optimizer moments (2x the parameters)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True, mmap=True)
    saved = state["model"]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(trainable):
        diff = sorted(set(saved) ^ set(trainable))
        raise ValueError(f"checkpoint {ckpt} holds other parameters than the policy its config.json builds "
                         f"({len(diff)} differ, e.g. {diff[:3]}): was config.json or the base model changed?")
    with torch.no_grad():
        for name, p in trainable.items():
            if saved[name].shape != p.shape:
                raise ValueError(f"checkpoint {ckpt}: {name} has shape {tuple(saved[name].shape)}, the policy "
                                 f"{tuple(p.shape)}")
            p.copy_(saved[name])
    model.eval().requires_grad_(False)
    return LoadedPolicy(model=model, cfg=cfg, iteration=iteration, checkpoint=ckpt)


# ---------------------------------------------------------------------------------------------
# world.json


def _world_json(cfg) -> tuple[dict | Path, bool]:
    """(the base checkpoint's world.json path, False) or, without one, (the dict WorldTask used, True):
    video size, the codec's default layout, the text encoder seed, and the run's sampler as the
    evaluation ODE's steps, shift and CFG."""
    from sage_fast.world import codec  # noqa: PLC0415

    base = _base_checkpoint(cfg)
    if base is not None:
        path = (base if base.is_dir() else base.parent) / "world.json"  # where WorldTask reads it
        if path.is_file():
            return path, False
    w, s = cfg.world, cfg.sampler
    return {"frames": w.frames, "height": w.height, "width": w.width, "patch": codec.PATCH,
            "temporal": codec.TEMPORAL, "latent_scale": codec.LATENT_SCALE, "text_encoder_seed": w.text_seed,
            "sampling": {"steps": s.num_steps, "shift": s.shift, "cfg_scale": s.cfg_scale, "sampler": "ode"}}, True


# ---------------------------------------------------------------------------------------------
# Export


FINAL_MODEL = "final_model"


def _check_out_dir(out: Path, overwrite: bool, protected: list[Path], run_dir: Path | None = None) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} exists and is a file")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} exists and is not empty: pass --overwrite (overwrite=True) to replace "
                         "it, or choose another folder")
    resolved = out.resolve()
    for keep in protected:
        keep = keep.resolve()
        if resolved == keep or resolved in keep.parents or keep in resolved.parents:
            # one place inside a run is meant for this: <run>/final_model, what training ends with
            if run_dir is not None and keep == run_dir.resolve() and resolved == keep / FINAL_MODEL:
                continue
            raise ValueError(f"output folder {out} overlaps {keep} (the run or its base model): choose a folder "
                             f"outside both (or the run's own {FINAL_MODEL}/)")


def export_policy(policy, out_dir: str | Path, *, cfg=None, iteration: int | None = None, source: dict | None = None,
                  world: dict | str | Path | None = None, dtype: str = "float32", overwrite: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `policy` (a Trainer, a VelocityModel, a WanVelocityModel, a diffusers transformer or
    a peft PeftModel of one) to `out_dir` in the layout of the module doc; returns the folder.

    cfg: the run's TrainConfig (a Trainer's own when None): decides world.json (task.kind
    'world'), the base named in export.json and adapter_config.json. iteration: recorded in
    export.json (a Trainer's own when None). source: extra export.json entries (export_run:
    the run folder and checkpoint). world: a world.json dict or path for a policy without a
    world cfg. dtype: one of DTYPES. overwrite: replace a non-empty `out_dir`. The folder is
    written beside `out_dir` and renamed into place, so a failed export leaves no partial one.
    Call it on one rank, with a plain or DDP-wrapped policy (FSDP2-sharded parameters are
    refused: export those runs from their checkpoints, which hold full tensors).
    """
    from sage_fast.trainer import Trainer  # noqa: PLC0415

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be an int >= 1, got {max_shard_bytes!r}")
    if isinstance(policy, Trainer):
        cfg = policy.cfg if cfg is None else cfg
        iteration = policy.iteration if iteration is None else iteration
    parts, untouched = exported_parts(policy, cfg)
    out = Path(out_dir)
    base = _base_checkpoint(cfg) if cfg is not None else None
    run_dir = Path(cfg.run.output_dir) if cfg is not None else None
    protected = [p for p in (base, run_dir) if p is not None]
    _check_out_dir(out, overwrite, protected, run_dir)
    world_file, world_note = None, None  # a world.json path to copy or a dict to write; where it came from
    if world is not None:
        world_file = Path(world) if isinstance(world, (str, Path)) else world
        world_note = str(world_file) if isinstance(world_file, Path) else "given to export_policy"
    elif cfg is not None and cfg.task.kind == "world":
        world_file, synthesized = _world_json(cfg)
        world_note = "written from the run config (random-init base)" if synthesized else str(world_file.resolve())

    t0 = time.time()
    lora = all(lora_layers(t) for _, t in parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files, adapter, parameters = [], {}, 0
        for sub, transformer in parts:  # one expert at a time: its merged copy is freed before the next
            state = {k: v.to(DTYPES[dtype]) for k, v in merged_state_dict(transformer).items()}
            folder = tmp / sub
            folder.mkdir(exist_ok=True)
            transformer.save_config(str(folder))  # the diffusers config.json, prediction key included
            files += [str(Path(sub) / f) for f in write_weights(state, folder, max_shard_bytes)]
            parameters += sum(v.numel() for v in state.values())
            if lora:
                adapter[sub] = write_adapter(transformer, folder / ADAPTER_FOLDER,
                                             None if base is None else str(base / sub))
            del state
        if isinstance(world_file, Path):
            if not world_file.is_file():
                raise ValueError(f"world={str(world_file)!r} is not a world.json file")
            shutil.copyfile(world_file, tmp / "world.json")
        elif world_file is not None:
            (tmp / "world.json").write_text(json.dumps(world_file, indent=2) + "\n")
        manifest = {
            "format": "sage_fast.export/1",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(source or {}),
            "iteration": iteration,
            "task": None if cfg is None else cfg.task.kind,
            "finetune": "lora" if lora else "full",
            "merged": lora,  # the LoRA deltas are in the weights
            "adapter": ADAPTER_FOLDER if lora else None,  # in each written transformer's folder
            "lora": adapter.get("") if parts[0][0] == "" else (adapter or None),
            "experts": None if parts[0][0] == "" else {"written": [sub for sub, _ in parts], "base": untouched},
            "guidance": None if cfg is None or cfg.task.kind != "wan" else {  # no world.json carries it
                "cfg_scale": cfg.sampler.cfg_scale, "low_noise_cfg_scale": cfg.model.low_noise_cfg_scale},
            "base_checkpoint": None if base is None else str(base.resolve()),
            "base_random_init": None if cfg is None or base is not None else {
                "architecture": cfg.model.architecture, "architecture_overrides": cfg.model.architecture_overrides,
                "seed": cfg.run.seed},
            "pipeline": cfg.video.pipeline if cfg is not None and cfg.task.kind in ("hunyuanvideo15", "wan") else None,
            "world_json": world_note,
            "dtype": dtype,
            "weights": files,
            "parameters": parameters,
        }
        (tmp / "export.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)  # checked above: empty, or overwrite
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s policy (iteration %s, %s) to %s in %.1f s", "LoRA-merged" if lora else "fully fine-tuned",
             iteration, dtype, out, time.time() - t0)
    return out


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, *, dtype: str = "float32",
               overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, device="cpu") -> Path:
    """Export the policy of checkpoint `step` (its iteration; None = the latest) of the run at
    `run_dir` to `out_dir` (see export_policy for the other arguments); returns `out_dir`.
    ValueErrors name the problem: no run folder, no checkpoint, a step not on disk (the
    available ones listed), a non-empty `out_dir` without overwrite."""
    run_dir = Path(run_dir)
    if dtype not in DTYPES:  # before the minutes a real model takes to load
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    cfg = read_run_config(run_dir)
    _select_checkpoint(run_dir, step)  # fail before loading anything
    base = _base_checkpoint(cfg)
    _check_out_dir(Path(out_dir), overwrite, [p for p in (base, run_dir) if p is not None], Path(run_dir))
    loaded = load_policy(run_dir, step, device=device)
    source = {"source_run": str(run_dir.resolve()), "checkpoint": str(loaded.checkpoint.resolve())}
    return export_policy(loaded.model, out_dir, cfg=loaded.cfg, iteration=loaded.iteration, source=source,
                         dtype=dtype, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sage_fast.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run folder written by python -m sage_fast.train")
    p.add_argument("out", type=Path, help="output folder (must be empty or absent, unless --overwrite)")
    p.add_argument("--step", type=int, default=None, help="iteration of the checkpoint to export (default: the latest)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="weight dtype of the export (default float32: half precision rounds small LoRA deltas away)")
    p.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9,
                   help="largest safetensors file, in GB (10^9 bytes); bigger models are sharded with an index")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not args.max_shard_gb > 0:
        print(f"sage_fast.export: --max-shard-gb must be > 0, got {args.max_shard_gb}", file=sys.stderr)
        return 2
    try:
        out = export_run(args.run, args.out, args.step, dtype=args.dtype, overwrite=args.overwrite,
                         max_shard_bytes=max(1, int(args.max_shard_gb * 1e9)))
    except (ValueError, FileNotFoundError) as err:
        print(f"sage_fast.export: {err}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "export.json").read_text())
    folders = [out / sub for sub in (manifest["experts"] or {"written": [""]})["written"]]
    adapters = ", ".join(str(f / ADAPTER_FOLDER) for f in folders)
    print(f"exported iteration {manifest['iteration']} of {args.run} to {out} "
          f"({'LoRA merged, adapter in ' + adapters if manifest['merged'] else 'full weights'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
