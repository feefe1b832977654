"""Rollout throughput of the tiny world model: eager vs CUDA-graph replay (GPU), eager (CPU).

    python bench/rollout.py [--device cuda] [--batch 8] [--steps 10] [--repeats 5]

Prints and writes bench/results/rollout-<device>-<date>.json: seconds per rollout (median,
min, max) and samples/s for each mode, and whether graph replay equals eager bitwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sage_fast.grpo.rollout import RolloutEngine, SamplerConfig
from sage_fast.models import VelocityModelConfig, build_velocity_model, random_conditioning

ROOT = Path(__file__).resolve().parent.parent


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
    results, trajs = {}, {}
    for name, engine in modes.items():
        engine.sample(cond, shape, seed=1, device=device)  # warm up
        times = []
        for r in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            trajs[name] = engine.sample(cond, shape, seed=100 + r, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        results[name] = {"median_s": med, "min_s": min(times), "max_s": max(times),
                         "samples_per_s": args.batch / med, "graph_error": getattr(engine, "graph_error", None)}
        print(f"{name:10s} {med * 1e3:9.2f} ms per rollout ({args.batch / med:8.1f} samples/s)", flush=True)
    if "cuda_graph" in trajs:
        same = torch.equal(trajs["cuda_graph"].latents, trajs["eager"].latents) and \
            torch.equal(trajs["cuda_graph"].logp_old, trajs["eager"].logp_old)
        results["graph_equals_eager_bitwise"] = same
        results["speedup"] = results["eager"]["median_s"] / results["cuda_graph"]["median_s"]
        print(f"graph == eager bitwise: {same}; speedup {results['speedup']:.2f}x")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rollout-{hardware.replace(' ', '_')}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"hardware": hardware, "torch": torch.__version__, "batch": args.batch,
                                "steps": args.steps, "shape": list(shape), "results": results}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
