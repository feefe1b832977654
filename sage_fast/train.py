"""Entry point: `torchrun [--nproc_per_node N] -m sage_fast.train [--recipe NAME] [section.field=value ...]`.

Also `python -m sage_fast.train` (one process). Examples:

    python -m sage_fast.train                                   # the tiny_world recipe
    python -m sage_fast.train sampler.sde_type=flow_grpo grpo.kl_mode=none run.output_dir=runs/flow
    python -m sage_fast.train --resume run.output_dir=runs/tiny_world/20261122-0700
    python -m sage_fast.train --help-config                     # every field, its default and meaning

Before any work: the config is validated (errors name the field and the allowed values), and
the run folder is checked: an existing run is never overwritten without `--resume` or
`--overwrite`, and `--resume` needs a checkpoint there. The resolved config is saved as
`config.json` in the run folder.

On a cluster: a signal of `run.preempt_signals` (default SIGTERM and SIGUSR1, what SLURM sends
before a kill) lets the current iteration finish; every rank agrees, a checkpoint is written and
the run exits with code 75; `--resume` continues exactly. Exit codes:

    0   done                     2   bad config or run folder (one line on stderr)
    3   too many non-finite updates (run.max_nonfinite)
    4   the final export failed (the checkpoints hold the policy)
    5   a checkpoint could not be written (run.on_save_error=stop); the previous one is intact
    6   no usable checkpoint to resume from (every one corrupt or not fitting the config)
    75  stopped by a preemption signal after saving (EX_TEMPFAIL: run it again with --resume)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

__all__ = ["main", "build_config", "prepare_run_dir", "Preemption", "EXIT_PREEMPTED", "EXIT_SAVE_FAILED"]

log = logging.getLogger("sage_fast.train")

EXIT_CONFIG, EXIT_NONFINITE, EXIT_EXPORT, EXIT_SAVE_FAILED, EXIT_NO_CHECKPOINT = 2, 3, 4, 5, 6
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: try again (with --resume)


class Preemption:
    """Catches `run.preempt_signals`; `requested` names the first signal received (None before).

    The handler only records the signal: the loop checks it between iterations, so a checkpoint is
    never written from inside a signal handler or half-way through an update."""

    def __init__(self, numbers: list[int]) -> None:
        self.requested: str | None = None
        self._previous = {}
        for number in numbers:
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, _frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(number).name
            log.warning("%s received: stopping after the current iteration with a checkpoint", self.requested)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def build_config(argv: list[str]):
    from sage_fast import config as C  # noqa: PLC0415
    from sage_fast import train_config  # noqa: F401, PLC0415  (registers the recipes)

    parser = argparse.ArgumentParser(prog="python -m sage_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny_world", help=f"one of {C.recipes()}")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(C.field_help(train_config.TrainConfig)))
        sys.exit(0)
    cfg = C.apply_overrides(C.get_recipe(args.recipe), args.overrides)
    flags = []
    if args.resume:
        flags.append("run.resume=true")
    if args.overwrite:
        flags.append("run.overwrite=true")
    cfg = C.apply_overrides(cfg, flags)
    if cfg.run.resume and cfg.run.overwrite:
        raise ValueError("run.resume and run.overwrite exclude each other")
    train_config.check_paths(cfg)
    return cfg, args.recipe


def prepare_run_dir(cfg, rank: int = 0, barrier=None) -> Path:
    """Check (every rank) and create (rank 0) the run folder; returns it. With several ranks pass
    `barrier` (e.g. torch.distributed.barrier): every rank checks before rank 0 writes, otherwise a
    slower rank would find rank 0's new folder and take it for an existing run."""
    from sage_fast import config as C  # noqa: PLC0415
    from sage_fast.checkpoint import CheckpointManager  # noqa: PLC0415

    out = Path(cfg.run.output_dir)
    exists = out.exists() and any(out.iterdir())
    if cfg.run.resume:
        if CheckpointManager(out).latest() is None:
            raise ValueError(f"run.resume: no checkpoint in {out}/checkpoints to resume from")
        saved = out / "config.json"
        try:
            before = json.loads(saved.read_text()) if saved.exists() else None
        except ValueError:  # torn by a kill while it was rewritten: rewritten below
            log.warning("%s is unreadable; rewriting it from this config", saved)
            before = None
        if before is not None:
            now = C.to_dict(cfg)
            changed = [k for k in now if k != "run" and before.get(k) != json.loads(json.dumps(now[k]))]
            if changed:
                log.warning("resuming with config sections changed since the run started: %s", changed)
    elif exists and not cfg.run.overwrite:
        raise ValueError(f"run.output_dir {out} already holds a run: pass --resume to continue it or "
                         "--overwrite to replace it (or choose another run.output_dir)")
    if barrier is not None:
        barrier()  # every rank has checked the folder as it was
    if rank == 0:
        if exists and not cfg.run.resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "config.json.tmp"  # atomic: a kill mid-write must not leave a torn config.json
        tmp.write_text(json.dumps(C.to_dict(cfg), indent=1))
        os.replace(tmp, out / "config.json")
    if barrier is not None:
        barrier()  # the folder exists for every rank
    return out


def _device(cfg, local_rank: int) -> torch.device:
    want = cfg.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device='cuda' but no CUDA device is available")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg, recipe_name = build_config(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"sage_fast.train: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = _device(cfg, local_rank)
    group = barrier = None
    if world > 1:
        import torch.distributed as dist  # noqa: PLC0415

        from sage_fast.parallel import init_distributed  # noqa: PLC0415

        init_distributed(device.type)  # CPU tensors (rewards, counts) over gloo, also when the GPUs use NCCL
        group, barrier = dist.group.WORLD, dist.barrier
    try:
        try:
            out = prepare_run_dir(cfg, rank, barrier)
        except ValueError as err:  # every rank saw the same folder, so every rank stops here
            print(f"sage_fast.train: {err}", file=sys.stderr)
            return EXIT_CONFIG
        return _run(cfg, out, rank, world, group, device, recipe_name)
    finally:
        if world > 1:
            import torch.distributed as dist  # noqa: PLC0415

            dist.destroy_process_group()


def _run(cfg, out: Path, rank: int, world: int, group, device, recipe_name: str) -> int:
    from sage_fast.metrics import MetricsWriter  # noqa: PLC0415
    from sage_fast.report import (learning_summary, plot_history, run_path, save_gif, save_mp4,  # noqa: PLC0415
                                  to_uint8)
    from sage_fast.trainer import Trainer  # noqa: PLC0415

    from sage_fast.checkpoint import CheckpointError, CheckpointSaveError  # noqa: PLC0415
    from sage_fast.train_config import preempt_signal_numbers  # noqa: PLC0415

    writer = MetricsWriter(out, tensorboard=cfg.run.tensorboard, enabled=rank == 0)
    try:
        trainer = Trainer(cfg, rank=rank, world_size=world, group=group, device=device, writer=writer)
    except ValueError as err:  # a setting the config alone could not check (e.g. against the model)
        writer.close()
        if rank == 0 and not cfg.run.resume:  # the folder this start created holds no run: leave none
            shutil.rmtree(out, ignore_errors=True)
        print(f"sage_fast.train: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if cfg.run.resume:
        try:
            trainer.resume()
        except CheckpointError as err:
            writer.close()
            trainer.close()
            print(f"sage_fast.train: cannot resume: {err}", file=sys.stderr)
            return EXIT_NO_CHECKPOINT
        writer.truncate_after(trainer.iteration)
    log.info("recipe %s, %d rank(s), device %s, run folder %s, iterations %d -> %d", recipe_name, world, device,
             out, trainer.iteration, cfg.run.steps)

    def evaluate():
        # every rank: under FSDP2 and Ulysses the forward is a collective; rank 0 writes
        result = trainer.evaluate()
        if rank != 0:
            return
        writer.write(result, kind="eval")
        log.info("eval @ %d: %s", trainer.iteration,
                 ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in result.items() if k.startswith("eval/")))
        if cfg.run.save_videos:
            folder = run_path(out, "samples")
            folder.mkdir(exist_ok=True)
            stem = f"eval_{trainer.iteration:05d}"
            save_gif(trainer.last_eval_video, run_path(out, "samples", stem + ".gif"))
            save_mp4(trainer.last_eval_video, run_path(out, "samples", stem + ".mp4"))
            (folder / "prompts.txt").write_text("".join(p + "\n" for p in trainer.task.eval_prompts))
        if len(trainer.history) == 1:  # the run's first evaluation: kept for samples/compare.png
            run_path(out, "samples").mkdir(exist_ok=True)
            tmp = run_path(out, "samples", "first_eval.pt.tmp")
            # uint8, what the pictures show: a quarter of the float32 size
            torch.save({"video": to_uint8(trainer.last_eval_video), "eval_key": result.get("eval_key")}, tmp)
            os.replace(tmp, run_path(out, "samples", "first_eval.pt"))

    progress = None
    if rank == 0:
        try:
            from tqdm import tqdm  # noqa: PLC0415

            progress = tqdm(total=cfg.run.steps, initial=trainer.iteration, desc="grpo", dynamic_ncols=True)
        except ImportError:
            progress = None
    def save() -> bool:
        """A checkpoint of this iteration; False if it failed and run.on_save_error=continue."""
        try:
            trainer.save()
            return True
        except CheckpointSaveError as err:
            if cfg.run.on_save_error == "stop":
                raise
            log.error("%s; continuing (run.on_save_error=continue): the next save retries", err)
            return False

    preemption = Preemption(preempt_signal_numbers(cfg.run.preempt_signals))
    try:
        if not trainer.history:
            evaluate()
        while trainer.iteration < cfg.run.steps:
            metrics = trainer.step()
            writer.write(metrics)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", s_per_it=f"{metrics['time/total']:.1f}",
                                     kl=f"{metrics['kl/anchor']:.2e}")
            it = trainer.iteration
            if it % cfg.run.eval_every == 0 or it == cfg.run.steps:
                evaluate()
            saved = (it % cfg.run.save_every == 0 or it == cfg.run.steps) and save()
            # every rank agrees, so no rank waits in a collective for one that has left
            if trainer.any_rank(preemption.requested is not None):
                if not saved:
                    trainer.save()
                log.warning("stopped at iteration %d by %s: checkpoint %s written; continue with --resume "
                            "(exit code %d)", it, preemption.requested or "a signal on another rank",
                            trainer.ckpt.latest(), EXIT_PREEMPTED)
                return EXIT_PREEMPTED
    except FloatingPointError as err:
        log.error("%s", err)
        return EXIT_NONFINITE
    except CheckpointSaveError as err:
        log.error("%s; stopping (run.on_save_error=stop; 'continue' retries at the next save instead)", err)
        return EXIT_SAVE_FAILED
    finally:
        preemption.restore()
        trainer.close()
        if progress is not None:
            progress.close()
        writer.close()
    if rank == 0:
        plot = plot_history(trainer.history, run_path(out, "summary.png"))
        # paired test, last vs first evaluation; guards: the visual and motion quality where the
        # task has them (the world's VQ / MQ, VideoAlign's vq / mq)
        learned = learning_summary(trainer.history)
        summary = {"learning": learned, "history": trainer.history, "plot": str(plot), "compare": None}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        try:  # a picture must not cost the run its summary or its export
            summary["compare"] = _compare(trainer, out)
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
        except Exception as err:  # noqa: BLE001
            log.warning("samples/compare.png not written (%s: %s)", type(err).__name__, err)
        def num(x, spec):
            return "-" if x is None else format(x, spec)

        for key, d in learned.get("dimensions", {}).items():
            log.info("%s: %s -> %s, paired difference %s +- %s (z %s, %d prompts)", key, num(d["first"], ".4f"),
                     num(d["last"], ".4f"), num(d["diff"], "+.4f"), num(d["se"], ".4f"), num(d["z"], ".1f"),
                     d["prompts"])
        log.info("done: %s; learned %s (%s)", out, learned.get("learned"), learned.get("why"))
        if cfg.run.export_final:
            try:
                _export_final(trainer, out)
            except Exception as err:  # noqa: BLE001 - the checkpoints hold the policy: export it later
                log.error("final model not exported (%s: %s); export it with `python -m sage_fast.export %s OUT`",
                          type(err).__name__, err, out)
                return EXIT_EXPORT
    return 0


def _export_final(trainer, out: Path) -> None:
    """<run>/final_model: the trained policy in the base model's format (sage_fast.export)."""
    from sage_fast.export import export_policy  # noqa: PLC0415
    from sage_fast.report import run_path  # noqa: PLC0415

    if trainer.strategy.sharded:  # no rank holds the full parameters: the last checkpoint does
        log.info("final model: export it from the checkpoint with `python -m sage_fast.export %s %s/final_model`",
                 out, out)
        return
    path = export_policy(trainer, run_path(out, "final_model"), overwrite=True)
    if trainer.cfg.task.kind == "wan":
        log.info("final model: %s (each trained expert's folder, e.g. transformer/: WanTransformer3DModel."
                 "from_pretrained, then WanPipeline.from_pretrained(base, transformer=...))", path)
    else:
        log.info("final model: %s (load with sage_fast.world.load_base_model or diffusers' from_pretrained)", path)


def _compare(trainer, out: Path) -> str | None:
    """samples/compare.png: the first and the last evaluation's samples of the same prompts and noise."""
    from sage_fast.report import run_path, save_compare  # noqa: PLC0415

    first_path = run_path(out, "samples", "first_eval.pt")
    if len(trainer.history) < 2 or not first_path.exists() or getattr(trainer, "last_eval_video", None) is None:
        return None
    saved = torch.load(first_path)
    first, last = trainer.history[0], trainer.history[-1]
    if saved.get("eval_key") != last.get("eval_key"):
        log.warning("samples/compare.png not written: the last evaluation used other prompts, noise or sampler "
                    "settings than the first (a resumed run with a changed config)")
        return None
    before = saved["video"].float() / 127.5 - 1
    after = trainer.last_eval_video
    scores = None
    if "eval/reward" in first.get("per_prompt", {}) and "eval/reward" in last.get("per_prompt", {}):
        scores = (first["per_prompt"]["eval/reward"], last["per_prompt"]["eval/reward"])
    path = save_compare(before, after, trainer.task.eval_prompts, run_path(out, "samples", "compare.png"),
                        before_label=f"iteration {first['iteration']}", after_label=f"iteration {last['iteration']}",
                        scores=scores)
    return str(path)


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        from sage_fast.parallel import exit_worker

        exit_worker(main)  # after destroy_process_group, without interpreter finalization (its doc: why)
    sys.exit(main())
