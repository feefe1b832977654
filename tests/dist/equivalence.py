"""2-rank equivalence checks, run by tests/test_parallel.py as
`torchrun --standalone --nproc_per_node 2 tests/dist/equivalence.py MODE [MODE ...]` (gloo on CPU).

Modes:
- `sp`:      Ulysses sp=2 (activation checkpointing on) vs one process: the velocity (CFG, mixed
             timesteps, text padding) and every parameter gradient, the gradients averaged
             over the sp group as FSDP2/DDP would.
- `fsdp`:    FSDP2 over dp=2 (one sample per rank) vs one process on both samples: every
             gradient and every parameter after one SGD step.
- `fsdp_sp`: FSDP2 over the flattened (dp=1, sp=2) mesh with Ulysses: the authors' layout;
             every parameter after one SGD step.

The oracle is the single-process model in float64; a float32 result must be within twice the
single-process float32 error plus a floor (STYLE rule 5), per output and per parameter.
Every mode runs; exits non-zero if any failed (failures listed per rank); rank 0 prints
`OK <mode> ...` for each mode that passed.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

from sage_fast.attention import install_attention
from sage_fast.models import VelocityModel, build_transformer, random_conditioning
from sage_fast.parallel import apply_sequence_parallel, build_mesh, init_distributed, wrap_fsdp2

FLOOR32 = 2e-6
LATENT_SHAPE = (21, 3, 5)  # 21 latent frames (81 video frames); 315 tokens: odd, padded to 316
TIMESTEPS = (990.0, 431.0)  # mixed timesteps in one batch
CFG = 5.0


def inputs(batch):
    g = torch.Generator().manual_seed(1234)
    cfg = build_transformer("tiny").config  # the config only
    cond = random_conditioning(cfg, batch, generator=g, text_len=(7, 3), text_len_2=(5, 2))
    latents = torch.randn((batch, 32) + LATENT_SHAPE, generator=g)
    weight = torch.randn((batch, 32) + LATENT_SHAPE, generator=g)  # loss = sum(v * weight)
    return latents, torch.tensor(TIMESTEPS[:batch]), cond, weight


def run(model, latents, t, cond, weight, dtype):
    vm = VelocityModel(model, autocast_dtype=None)
    v = vm.velocity(latents.to(dtype), t, cond.to(dtype), CFG)
    loss = (v * weight.to(dtype)).sum(dim=(1, 2, 3, 4)).mean()  # mean over samples
    loss.backward()
    return v.detach()


def check(name, got, ref32, ref64, failures):
    if got is None or ref64 is None:  # e.g. the last block's text stream: its output is unused
        if not (got is None and ref32 is None and ref64 is None):
            failures.append(f"{name}: gradient present in one run only")
        return 0.0
    ref64 = ref64.double()
    scale = max(1.0, float(ref64.abs().max()))
    base = float((ref32.double() - ref64).abs().max())
    err = float((got.double() - ref64).abs().max())
    bound = 2 * base + FLOOR32 * scale
    if not (err <= bound) or got.shape != ref64.shape:
        failures.append(f"{name}: err {err:.3e} > bound {bound:.3e} (fp32 single-process err {base:.3e})")
    return err / bound


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(modes):
    init_distributed("cpu")
    failed = [mode for mode in modes if not run_mode(mode)]
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


def run_mode(mode):
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    torch.manual_seed(0)
    base = build_transformer("tiny", seed=0)
    install_attention(base, "sdpa")
    ref32, ref64, model = copy.deepcopy(base), copy.deepcopy(base).double(), copy.deepcopy(base)
    failures, worst = [], 0.0
    lr = 0.5

    if mode == "sp":
        mesh = build_mesh(sp=2)
        apply_sequence_parallel(model, mesh["sp"].get_group())
        model.enable_gradient_checkpointing()
        latents, t, cond, weight = inputs(2)  # every rank of the sp group: the same inputs
        v64 = run(ref64, latents, t, cond, weight, torch.float64)
        v32 = run(ref32, latents, t, cond, weight, torch.float32)
        v = run(model, latents, t, cond, weight, torch.float32)
        worst = max(worst, check("velocity", v, v32, v64, failures))
        group = mesh["sp"].get_group()
        for (name, p), p32, p64 in zip(model.named_parameters(), ref32.parameters(), ref64.parameters()):
            g = None if p.grad is None else p.grad.clone()
            if g is not None:
                dist.all_reduce(g, group=group)
                g /= dist.get_world_size(group)  # the average FSDP2 / DDP take over dp x sp
            worst = max(worst, check(f"grad {name}", g, p32.grad, p64.grad, failures))
        count = sum(1 for _ in model.parameters())
    elif mode in ("fsdp", "fsdp_sp"):
        sp = 2 if mode == "fsdp_sp" else 1
        mesh = build_mesh(sp=sp)
        if sp > 1:
            apply_sequence_parallel(model, mesh["sp"].get_group())
        wrap_fsdp2(model, mesh)
        latents, t, cond, weight = inputs(2)
        for ref, dtype in ((ref32, torch.float32), (ref64, torch.float64)):
            run(ref, latents, t, cond, weight, dtype)
            with torch.no_grad():
                for p in ref.parameters():
                    if p.grad is not None:
                        p -= lr * p.grad
        if sp == 1:  # dp=2: rank r gets sample r; the per-rank mean loss averaged over ranks
            local = (latents[rank:rank + 1], t[rank:rank + 1], _select(cond, rank), weight[rank:rank + 1])
        else:  # dp=1: both ranks (one sp group) get the whole batch
            local = (latents, t, cond, weight)
        run(model, *local, torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        names = [n for n, _ in model.named_parameters()]
        grads = [None if p.grad is None else full(p.grad) for p in model.parameters()]
        opt.step()
        for name, g, p, p32, p64 in zip(names, grads, model.parameters(), ref32.parameters(), ref64.parameters()):
            worst = max(worst, check(f"grad {name}", g, p32.grad, p64.grad, failures))
            worst = max(worst, check(f"param {name}", full(p.detach()), p32.detach(), p64.detach(), failures))
        count = len(names)
    else:
        raise ValueError(f"mode must be one of ('sp', 'fsdp', 'fsdp_sp'), got {mode!r}")

    if failures:
        print(f"rank {rank} FAIL {mode}:\n  " + "\n  ".join(failures[:20]), flush=True)
    elif rank == 0:
        print(f"OK {mode}: {count} parameters, worst err/bound {worst:.3f}", flush=True)
    return not failures


def _select(cond, i):
    from sage_fast.models import Conditioning, TextEmbeddings

    def text(te):
        return TextEmbeddings(*(x[i:i + 1] for x in (te.embeds_bld, te.mask_bl, te.embeds_2_bld, te.mask_2_bl)))

    return Conditioning(prompt=text(cond.prompt), negative=text(cond.negative))


if __name__ == "__main__":
    from sage_fast.parallel import exit_worker

    exit_worker(lambda: main(sys.argv[1:]))  # no interpreter finalization after the groups are gone (its doc: why)
