"""Rollout throughput of the tiny world model: eager vs CUDA-graph replay (GPU), eager (CPU).

    python bench/rollout.py [--device cuda] [--batch 8] [--steps 10] [--repeats 5]

Prints and writes bench/results/rollout-<device>-<date>.json (bench/harness.py's schema): a row
per mode with the time per rollout (median, min, max; one warm-up rollout first), samples/s, the
speedup over eager and, for the graph, whether its last rollout equals eager's bitwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from pathlib import Path

import torch

from sage_fast.grpo.rollout import RolloutEngine, SamplerConfig
from sage_fast.models import VelocityModelConfig, build_velocity_model, random_conditioning

from harness import environment, time_fn, timing_stats, write_json  # bench/harness.py

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 1  # rollouts before the timed ones (the CUDA graph path captures on every rollout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model = build_velocity_model(VelocityModelConfig(architecture="tiny", finetune="full", autocast_dtype="none",
                                                     architecture_overrides={"in_channels": 97, "out_channels": 48}),
                                 device=device)
    cfg = model.transformer.config
    shape = (args.batch, cfg.out_channels, 9, 8, 8)  # 9 latent frames of 8 x 8 tokens (per-frame codec, 9 x 32 x 32 videos)
    cond = random_conditioning(cfg, args.batch, generator=torch.Generator().manual_seed(0), device=device)
    sampler = SamplerConfig(num_steps=args.steps, sde_type="sage_grpo", cfg_scale=3.0)
    modes = {"eager": RolloutEngine(model.velocity, sampler, cuda_graph=False)}
    if device.type == "cuda":
        modes["cuda_graph"] = RolloutEngine(model.velocity, sampler, cuda_graph=True)
    rows, trajs = {}, {}  # by mode
    for name, engine in modes.items():
        seeds = iter([1, *range(100, 100 + args.repeats)])  # the warm-up rollout's seed, then one a repeat

        def rollout(engine=engine, name=name, seeds=seeds):
            trajs[name] = engine.sample(cond, shape, seed=next(seeds), device=device)

        times = time_fn(rollout, device, WARMUP, args.repeats)
        med = statistics.median(times)
        rows[name] = dict(mode=name, **timing_stats(times), samples_per_s=args.batch / med, speedup_vs_eager=None,
                          equals_eager_bitwise=None, graph_error=getattr(engine, "graph_error", None))
        print(f"{name:10s} {med * 1e3:9.2f} ms per rollout ({args.batch / med:8.1f} samples/s)", flush=True)
    for row in rows.values():
        row["speedup_vs_eager"] = rows["eager"]["median_ms"] / row["median_ms"]
    if "cuda_graph" in trajs:
        same = torch.equal(trajs["cuda_graph"].latents, trajs["eager"].latents) and \
            torch.equal(trajs["cuda_graph"].logp_old, trajs["eager"].logp_old)
        rows["cuda_graph"]["equals_eager_bitwise"] = same
        print(f"graph == eager bitwise: {same}; speedup {rows['cuda_graph']['speedup_vs_eager']:.2f}x")
    env = environment(device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = Path(args.out) / f"rollout-{hardware.replace(' ', '_')}-{dt.date.today().isoformat()}.json"
    write_json(path, "rollout", env, dict(batch=args.batch, steps=args.steps, shape=list(shape), warmup=WARMUP,
                                          repeats=args.repeats), list(rows.values()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
