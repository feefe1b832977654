"""Throughput of the SDE step ops: fused kernel vs eager torch reference vs torch.compile of it.

    python bench/run.py                         # this machine's default device
    python bench/run.py --device cuda --batch 8 --sizes 480p
    python bench/run.py --quick                 # tiny shapes, smoke test (what tests run)

For every SDE type and provider it times
  - `rollout`: one denoise step with its log-prob (noise given; the fused kernel also with
    in-kernel Philox noise, `fused-philox`),
  - `train`:   the training log-prob with the anchor KL, forward + backward to d/dv,
and reports min / median / max time, effective GB/s (the bytes the fused op must move: each
latent-sized tensor read or written once) and that as % of a measured device-copy bandwidth.
Providers: `eager` (kernels/reference.py as is), `compile` (torch.compile of the same
functions), `fused` (the engine's fused op for the device: the Triton kernels on CUDA, the C++
op sage_fast._C on CPU; Triton runs on CPUs only in its interpreter, which is no speed), and
on CUDA `twin` (the CUDA twin of the C++ op, when built).

Results go to bench/results/ as JSON (bench/harness.py's schema) + CSV + a markdown table,
named by device and date, with the hardware, versions, commit and command line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import statistics
import sys
from pathlib import Path

import torch

from sage_fast.grpo import schedule
from sage_fast.kernels import dispatch, pack_coefficients, pack_rng, reference

from harness import environment, synchronize, time_fn, timing_stats, write_json  # bench/harness.py

ROOT = Path(__file__).resolve().parent.parent
# docs/SPEC.md section 7: latent per sample [C, T, H, W] for 81 frames
SIZES = {
    "authors": (32, 21, 22, 39),  # 352x624, the authors' training size
    "480p": (32, 21, 30, 53),
    "720p": (32, 21, 45, 80),
    "tiny": (4, 5, 6, 7),  # --quick
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------
# timing: time_fn in bench/harness.py; the peak it is compared with
# ------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, repeats: int) -> float:
    """Measured device copy bandwidth in GB/s (read + write), median of `repeats`."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, warmup, repeats)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


# ------------------------------------------------------------------------------------------
# workloads
# ------------------------------------------------------------------------------------------


def make_case(sde_type, shape, dtype, device, seed=0):
    steps = torch.arange(shape[0]) % 19  # mixed timesteps, all stochastic for every type
    a, b, c = schedule.step_coefficients(schedule.sigmas(20, 5.0), steps, sde_type, 0.5)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x, v, noise = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    abc_dev = tuple(t.to(device=device, dtype=torch.float32) for t in (a, b, c))
    x_next = reference.step_math(x, v, *abc_dev, noise, sde_type, "mean")[0]
    v_ref = (v.float() + 0.01 * torch.randn(shape, generator=g).to(device)).to(dtype)
    return dict(x=x, v=v, noise=noise, x_next=x_next, v_ref=v_ref, abc=abc_dev,
                coef=pack_coefficients(a, b, c, x), rng=pack_rng(seed, 0, x.device))


def _train_fn(logprob, case):
    v = case["v"].detach().requires_grad_()

    def run():
        v.grad = None
        logp, kl, _ = logprob(v)
        (logp.sum() + kl.sum()).backward()

    return run


def providers(case, sde_type, device, names):
    """name -> (rollout fn or None, train fn or None, rollout passes over a latent, backend or None)."""
    x, v, noise, x_next, v_ref, abc = (case[k] for k in ("x", "v", "noise", "x_next", "v_ref", "abc"))
    out = {}
    if "eager" in names:
        out["eager"] = (
            lambda: reference.step_math(x, v, *abc, noise, sde_type, "mean"),
            _train_fn(lambda v_: reference.logprob_math(x, v_, x_next, *abc, v_ref, sde_type, "mean"), case),
            4,
            None,
        )
    if "compile" in names:
        step_c = torch.compile(reference.step_math, fullgraph=True)
        lp_c = torch.compile(reference.logprob_math, fullgraph=True)
        out["compile"] = (
            lambda: step_c(x, v, *abc, noise, sde_type, "mean"),
            _train_fn(lambda v_: lp_c(x, v_, x_next, *abc, v_ref, sde_type, "mean"), case),
            4,
            None,
        )
    fused = "triton" if device.type == "cuda" else "cpp"
    for name, backend in (("fused", fused), ("twin", "cpp")):
        if name not in names or backend not in dispatch.available_backends(device.type):
            continue
        if name == "twin" and device.type != "cuda":
            continue
        coef, rng = case["coef"], case["rng"]
        ops = torch.ops.sage_fast
        out[name] = (
            lambda: ops.sde_step(x, v, coef, noise, None, sde_type, "mean"),
            _train_fn(lambda v_: ops.sde_logprob(x, v_, x_next, coef, v_ref, sde_type, "mean"), case),
            4,
            backend,
        )
        out[f"{name}-philox"] = (lambda: ops.sde_step(x, v, coef, None, rng, sde_type, "mean"), None, 3, backend)
    return out


def peak_extra_memory(fn, device: torch.device, baseline_tensor_bytes: int) -> float | None:
    """Peak memory allocated during fn beyond what was allocated before, in latent tensors."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / baseline_tensor_bytes


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def bench_case(size, shape, dtype_name, sde_type, device, names, warmup, repeats, copy_gbs) -> list[dict]:
    """Every provider x op for one latent size and SDE type; one result row each."""
    numel = torch.Size(shape).numel()
    elem = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
    case = make_case(sde_type, shape, DTYPES[dtype_name], device)
    rows, medians = [], {}
    for name, (rollout, train, passes, backend) in providers(case, sde_type, device, names).items():
        for op, fn, n_passes in (("rollout", rollout, passes), ("train", train, 9)):
            if fn is None:
                continue
            with dispatch.use_backend(backend, device.type) if backend else contextlib.nullcontext():
                times = time_fn(fn, device, warmup, repeats)
                extra = peak_extra_memory(fn, device, numel * elem) if op == "train" else None
            med = statistics.median(times)
            gbs = n_passes * numel * elem / med / 1e9
            medians[(op, name)] = med
            rows.append(dict(size=size, batch=shape[0], dtype=dtype_name, sde_type=sde_type, op=op, provider=name,
                             numel=numel, **timing_stats(times),
                             gbs=gbs, pct_copy=100 * gbs / copy_gbs,
                             extra_mem_latents="" if extra is None else round(extra, 2),
                             speedup_vs_eager="", speedup_vs_compile=""))
            print(f"{size:8s} {sde_type:10s} {op:8s} {name:13s} {med * 1e3:9.3f} ms  {gbs:8.1f} GB/s "
                  f"({100 * gbs / copy_gbs:4.0f}% copy)", flush=True)
    for r in rows:
        for base in ("eager", "compile"):
            if (r["op"], base) in medians:
                r[f"speedup_vs_{base}"] = round(medians[(r["op"], base)] / (r["median_ms"] / 1e3), 3)
    return rows


def _fmt(value) -> str:
    return value if value == "" else f"{value:.2f}"


def write_results(rows: list[dict], env: dict, setup: dict, out_dir: Path, tag: str) -> Path:
    """tag.json (bench/harness.py's schema), tag.csv (the rows) and tag.md (a table) in out_dir."""
    stem = out_dir / tag
    write_json(stem.with_suffix(".json"), "run", env, setup, rows)
    copy_gbs = setup["copy_bandwidth_gbs"]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# SDE step bench: {env['hardware']}",
        "",
        f"{env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; commit {env['commit']}",
        f"`{env['command']}`",
        "",
        f"Measured copy bandwidth: {copy_gbs:.1f} GB/s. GB/s = bytes the fused op must move "
        "(each latent-sized tensor once) / median time.",
        "",
        "| size | batch | dtype | sde_type | op | provider | median ms | min ms | max ms | GB/s | % copy | speedup vs eager | vs compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['batch']} | {r['dtype']} | {r['sde_type']} | {r['op']} | {r['provider']} | "
            f"{r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['max_ms']:.3f} | {r['gbs']:.1f} | {r['pct_copy']:.0f} | "
            f"{_fmt(r['speedup_vs_eager'])} | {_fmt(r['speedup_vs_compile'])} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default=None, help=f"comma list of {list(SIZES)} (default: 480p on cuda, authors on cpu)")
    p.add_argument("--batch", type=int, default=None, help="samples per call (default: 8 on cuda, 4 on cpu)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--types", default=",".join(schedule.STOCHASTIC_TYPES), help="comma list of SDE types")
    p.add_argument("--providers", default="eager,compile,fused,twin", help="comma list of eager, compile, fused, twin")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default=None, help="file stem for the results (default: device and date)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, eager only, few repeats: a smoke test")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    gpu = device.type == "cuda"
    if args.quick:
        args.sizes, args.batch = args.sizes or "tiny", args.batch or 2
        if args.providers == p.get_default("providers"):
            args.providers = "eager"
        args.warmup, args.repeats = args.warmup or 1, args.repeats or 3
    sizes = (args.sizes or ("480p" if gpu else "authors")).split(",")
    for s in sizes:
        if s not in SIZES:
            p.error(f"--sizes: unknown size {s!r}; allowed: {list(SIZES)}")
    types = args.types.split(",")
    for t in types:
        if t not in schedule.STOCHASTIC_TYPES:
            p.error(f"--types: unknown SDE type {t!r}; allowed: {list(schedule.STOCHASTIC_TYPES)}")
    names = args.providers.split(",")
    for n in names:
        if n not in ("eager", "compile", "fused", "twin"):
            p.error(f"--providers: unknown provider {n!r}; allowed: eager, compile, fused, twin")
    batch = args.batch or (8 if gpu else 4)
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = DTYPES[dtype_name]
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    repeats = args.repeats if args.repeats is not None else (50 if gpu else 7)

    env = environment(device)
    copy_gbs = copy_bandwidth(device, (1 << 30) if gpu else (256 << 20) if not args.quick else (8 << 20),
                              warmup, repeats)
    print(f"{env['hardware']} | torch {env['torch']} | copy bandwidth {copy_gbs:.1f} GB/s", flush=True)

    rows = []
    for size in sizes:
        for sde_type in types:
            rows += bench_case(size, (batch,) + SIZES[size], dtype_name, sde_type, device, names, warmup, repeats,
                               copy_gbs)

    tag = args.tag or f"{'cuda-' + torch.cuda.get_device_name(device).replace(' ', '_') if gpu else 'cpu'}-" \
                      f"{dt.date.today().isoformat()}{'-quick' if args.quick else ''}"
    setup = dict(copy_bandwidth_gbs=copy_gbs, warmup=warmup, repeats=repeats)
    stem = write_results(rows, env, setup, Path(args.out), tag)
    print(f"wrote {stem}.json/.csv/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
