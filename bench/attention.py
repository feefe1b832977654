"""Full-size HunyuanVideo-1.5 transformer forward per attention backend (to run on a GPU).

    python bench/attention.py                       # 8.3B, random bf16 weights, 81 frames 480p
    python bench/attention.py --arch tiny --device cpu --latent 21 3 5 --iters 2   # smoke run

Per backend that can run here (fa3, fa2, xformers, sdpa): median and spread of the forward
time (no grad, CFG batch of 2 = cond + uncond of one sample by default), TFLOP/s from an
analytic FLOP count, the fraction of the measured bf16 matmul peak, and peak memory. One JSON
file under bench/results/ (bench/harness.py's schema) names the device, versions and the git
commit. Nothing is estimated that was not measured: a backend that cannot run is a row with
the reason in `skipped` and no numbers.

FLOPs per forward (multiply-add = 2): every nn.Linear / Conv3d at its token count, plus
attention 4 * B * H * S_total^2 * D per double-stream block (QK^T and PV), S_total = video +
text tokens. The token refiner and embedders are counted through their linears.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sage_fast.attention import BACKENDS, install_attention, missing_reason  # noqa: E402
from sage_fast.models import VelocityModel, build_transformer, random_conditioning  # noqa: E402

from harness import environment, time_fn, timing_stats, write_json  # noqa: E402  (bench/harness.py)


def linear_flops(model, batch, video_tokens, text_tokens, text2_tokens, image_tokens):
    """2 * in * out per token for every Linear/Conv3d, by which stream it sees."""
    flops = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            if name.startswith("context_embedder_2"):
                n = text2_tokens
            elif name.startswith("context_embedder.time_text_embed") or name.startswith("time_embed") \
                    or ".norm" in name or name.startswith("norm_out"):
                n = 1  # per-sample modulation / embedding
            elif name.startswith("context_embedder"):
                n = text_tokens
            elif name.startswith("image_embedder"):
                n = image_tokens
            elif ".attn.add_" in name or "to_add_out" in name or "ff_context" in name:
                n = text_tokens + text2_tokens + image_tokens
            else:
                n = video_tokens
            flops += 2 * m.in_features * m.out_features * n * batch
        elif isinstance(m, torch.nn.Conv3d):
            flops += 2 * m.in_channels * m.out_channels * video_tokens * batch
    return flops


def attention_flops(cfg, batch, total_tokens):
    return 4 * batch * cfg.num_attention_heads * total_tokens ** 2 * cfg.attention_head_dim * cfg.num_layers


def matmul_peak(device, dtype, n=8192, iters=20):
    """Measured n x n matmul FLOP/s: total FLOPs of `iters` products over their summed time."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = time_fn(lambda: a @ b, device, 3, iters)
    return 2 * n ** 3 * iters / sum(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="hunyuanvideo15")
    p.add_argument("--device", default="cuda")
    p.add_argument("--latent", type=int, nargs=3, default=(21, 30, 53), metavar=("T", "H", "W"))
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--text2-len", type=int, default=128)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backends", nargs="*", default=["fa3", "fa2", "xformers", "sdpa"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    torch.manual_seed(0)
    model = build_transformer(args.arch, seed=0).to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    cfg = model.config
    cond = random_conditioning(cfg, 1, text_len=(args.text_len, args.text_len),
                               text_len_2=(args.text2_len, args.text2_len), device=device)
    cond = cond.to(dtype)
    T, H, W = args.latent
    latents = torch.randn(1, cfg.out_channels, T, H, W, device=device, dtype=dtype)
    batch = 2 if args.cfg != 1.0 else 1
    video = T * H * W
    text = args.text_len + args.text2_len + 1  # + the masked t2v image token
    flops = linear_flops(model, batch, video, args.text_len, args.text2_len, 1) \
        + attention_flops(cfg, batch, video + text)
    peak = matmul_peak(device, dtype) if device.type == "cuda" else None
    vm = VelocityModel(model, autocast_dtype=None)

    rows = []
    for name in args.backends:
        why = missing_reason(name, device) if name in BACKENDS else f"unknown backend {name!r}"
        row = dict(backend=name, skipped=why, median_ms=None, min_ms=None, max_ms=None, tflops=None,
                   frac_of_matmul_peak=None, peak_mem_gib=None)
        rows.append(row)
        if why is not None:
            continue
        install_attention(model, name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            times = time_fn(lambda: vm.velocity(latents, 500.0, cond, args.cfg), device, args.warmup, args.iters)
        med = statistics.median(times)
        row.update(timing_stats(times), tflops=flops / med / 1e12)
        if peak:
            row["frac_of_matmul_peak"] = flops / med / peak
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        print(json.dumps(row), flush=True)

    setup = dict(arch=args.arch, latent_thw=[T, H, W], video_tokens=video, text_tokens=text, batch=batch,
                 dtype=str(dtype), cfg=args.cfg, flops_per_forward=flops,
                 matmul_peak_tflops=None if peak is None else peak / 1e12, warmup=args.warmup, repeats=args.iters)
    stamp = time.strftime("%Y-%m-%d")
    path = write_json(Path(args.out) / f"attention-{device.type}-{args.arch}-{stamp}.json", "attention",
                      environment(device), setup, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
