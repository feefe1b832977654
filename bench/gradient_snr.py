"""How much signal one GRPO update carries: the gradient's signal-to-noise at fixed parameters.

    python bench/gradient_snr.py NAME M [section.field=value ...]   # --recipe tiny_world by default

Takes M independent batch gradients of the recipe (iterations 1000, 1001, ...: independent
rollouts of the same prompt distribution) at the base parameters, without an update: the
trainer's own rollout, reward, advantages, trained pairs and backward (`Trainer.rollout`,
`grpo.data.trained_pairs`, `Trainer._train_pass`). From them, with B samples a batch:

    |mu|^2   = (|sum_i g_i|^2 - sum_i |g_i|^2) / (M (M - 1))        unbiased signal
    noise    = mean_i |g_i|^2 - |mu|^2                             one batch's noise trace
    SNR      = |mu|^2 / (B noise)                                  per sample
    n(0.5)   = 1 / SNR                                             samples whose mean gradient has
                                                                   cosine ~0.5 with an independent one

plus measured cosines between disjoint means of 1 and 4 batches, a jackknife standard error of
|mu|^2, and the wall seconds a batch cost (rollout and backward), so levers are compared by the
seconds they need for a usable update. Writes `NAME.json` (and the gradients, `NAME.pt`) into
$SNR_OUT (default: the system's temporary folder / sage_fast_snr).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch


def batch_gradient(trainer, it: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat float64 gradient, rewards [B]) of iteration `it` at the trainer's current parameters."""
    from sage_fast.grpo.data import trained_pairs  # noqa: PLC0415
    from sage_fast.metrics import PerStepStats  # noqa: PLC0415

    trainer.iteration = it
    batch = trainer.rollout(it)
    pairs = trained_pairs(trainer.cfg.run.seed, it, trainer.layout, trainer.trainable_steps, trainer.k_steps)
    trainer._train_pass(batch, pairs, None, PerStepStats(trainer.cfg.sampler.num_steps))
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                      for _, p in trainer.trainable])
    trainer.optimizer.zero_grad(set_to_none=True)
    return grad, batch.reward.total_b


def snr_stats(grads: torch.Tensor, batch: int) -> dict:
    """Signal, noise, per-sample SNR and cosines of M batch gradients [M, P] of `batch` samples each."""
    g = grads.double()
    m = g.shape[0]
    total = g.sum(0)
    sq = (g * g).sum(1)
    mu2 = float((total @ total - sq.sum()) / (m * (m - 1)))
    # jackknife standard error of the unbiased |mu|^2
    loo = []
    for i in range(m):
        s = total - g[i]
        q = sq.sum() - sq[i]
        loo.append(float((s @ s - q) / ((m - 1) * (m - 2))))
    loo_t = torch.tensor(loo)
    mu2_se = float(((m - 1) / m * ((loo_t - loo_t.mean()) ** 2).sum()).sqrt())
    noise = float(sq.mean()) - mu2
    snr = mu2 / (batch * noise)
    gen = torch.Generator().manual_seed(0)
    cos = {}
    for k in (1, 4):
        if 2 * k > m:
            continue
        vals = []
        for _ in range(200):
            perm = torch.randperm(m, generator=gen)
            a, b = g[perm[:k]].mean(0), g[perm[k:2 * k]].mean(0)
            vals.append(float(a @ b / (a.norm() * b.norm())))
        cos[str(k * batch)] = sum(vals) / len(vals)
    return {"batches": m, "samples_per_batch": batch, "mu2": mu2, "mu2_se": mu2_se, "noise_per_batch": noise,
            "per_sample_snr": snr, "snr_z": mu2 / mu2_se if mu2_se > 0 else float("nan"),
            "samples_for_cos_0.5": 1.0 / snr if snr > 0 else float("inf"), "cos_measured": cos}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    name, m, overrides = argv[0], int(argv[1]), argv[2:]
    if m < 3:
        raise SystemExit(f"gradient_snr: M must be >= 3 batches (the jackknife needs them), got {m}")
    recipe = "tiny_world"
    if overrides and overrides[0].startswith("--recipe="):
        recipe, overrides = overrides[0].split("=", 1)[1], overrides[1:]
    out_dir = os.environ.get("SNR_OUT", os.path.join(tempfile.gettempdir(), "sage_fast_snr"))
    os.makedirs(out_dir, exist_ok=True)
    from sage_fast import config as C  # noqa: PLC0415
    from sage_fast import train_config  # noqa: F401, PLC0415
    from sage_fast.trainer import Trainer  # noqa: PLC0415

    run_dir = tempfile.mkdtemp(prefix="snr_run_")
    cfg = C.apply_overrides(C.get_recipe(recipe), [f"run.output_dir={run_dir}", "run.device=cpu"] + overrides)
    trainer = Trainer(cfg, device="cpu")
    grads, rewards, within = [], [], []
    t0 = time.time()
    for i in range(m):
        g, r = batch_gradient(trainer, 1000 + i)
        grads.append(g.float())
        rewards.append(float(r.nanmean()))
        G = cfg.grpo.group_size
        within.append(float(r.view(-1, G).std(1, unbiased=False).mean()) if r.numel() % G == 0 else float("nan"))
    seconds = (time.time() - t0) / m
    stats = snr_stats(torch.stack(grads), cfg.grpo.samples_per_rank)
    stats.update({"name": name, "overrides": overrides, "seconds_per_batch": seconds,
                  "seconds_for_cos_0.5": stats["samples_for_cos_0.5"] / cfg.grpo.samples_per_rank * seconds,
                  "rollout_reward": sum(rewards) / m, "within_group_reward_std": sum(within) / m})
    (open(os.path.join(out_dir, f"{name}.json"), "w")).write(json.dumps(stats, indent=1))
    torch.save(torch.stack(grads), os.path.join(out_dir, f"{name}.pt"))
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("SNR_THREADS", "2")))
    sys.exit(main(sys.argv[1:]))
