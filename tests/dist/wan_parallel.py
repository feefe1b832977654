"""2-rank checks of the Wan model family, run by tests/test_wan_train.py as
`torchrun --standalone --nproc_per_node 2 tests/dist/wan_parallel.py WAN21 WAN22 TMP MODE [MODE ...]`
(gloo on CPU; WAN21 / WAN22: tiny pipeline folders with one / two experts).

Modes:
- `sp`:      Ulysses sp=2 (activation checkpointing on) vs one process, one expert and two
             (mixed timesteps: both experts in one call): the CFG velocity over 3 x 3 x 5 = 45
             video tokens (odd: padded to 46) and every LoRA gradient (random B, so A's
             gradients are not zero), averaged over the sp group as FSDP2 / DDP would.
- `fsdp_experts`: FSDP2 over dp=2, two experts, rank 0's rows all on the high-noise side and
             rank 1's on both: every LoRA gradient after one backward vs one process on all
             four rows; then a forward where the ranks use disjoint experts. Without every rank
             running both experts each call, this hangs (a collective mismatch).
- `fsdp_sp`: FSDP2 over the flattened (dp=1, sp=2) mesh with Ulysses, two experts.
- `trainer`: the Wan 2.1 trainer under dist.strategy=fsdp2, 2 ranks x 2 samples == 1 process x
             4 samples (reward; gradients within 1e-4 of each one's largest entry), and 1 + 1
             iterations with a save and a resume == 2, bitwise, on both ranks.
- `trainer_experts`: the same for the Wan 2.2 (two experts) trainer: each rank's micro-batches
             mix the experts differently.

Model checks use the float64 oracle of tests/dist/equivalence.py (`check`). Every mode runs;
exits non-zero if any failed; rank 0 prints `OK <mode> ...` for each mode that passed.
"""

from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from equivalence import check  # noqa: E402

from sage_fast.models import Conditioning, WanTextEmbeddings, build_wan_velocity_model  # noqa: E402
from sage_fast.parallel import apply_sequence_parallel, build_mesh, build_strategy, flat_mesh  # noqa: E402
from sage_fast.parallel.strategy import full  # noqa: E402

LATENT_SHAPE = (3, 6, 10)  # 3 x 3 x 5 = 45 tokens after Wan's 1x2x2 patches: odd, padded to 46
CFG = 5.0


def policy(folder):
    torch.manual_seed(0)
    model = build_wan_velocity_model(folder, lora_rank=4, lora_alpha=4, autocast_dtype=None,
                                     gradient_checkpointing=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at start: random, so that every LoRA gradient is non-zero
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def inputs(model, timesteps):
    batch = len(timesteps)
    g = torch.Generator().manual_seed(1234)
    c = model.latent_channels

    def text(lengths):
        embeds = torch.randn(batch, max(lengths), model.text_dim, generator=g)
        mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
        return WanTextEmbeddings(embeds * mask[..., None], mask)

    cond = Conditioning(prompt=text([7, 3, 5, 2][:batch]), negative=text([4, 6, 1, 3][:batch]))
    latents = torch.randn((batch, c) + LATENT_SHAPE, generator=g)
    weight = torch.randn((batch, c) + LATENT_SHAPE, generator=g)  # loss = mean over rows of sum(v * weight)
    return latents, torch.tensor(timesteps), cond, weight


def rows(batch, idx):
    latents, t, cond, weight = batch
    i = torch.tensor(idx)
    return latents[i], t[i], cond.index_select(i), weight[i]


def run(model, batch, dtype, grad=True):
    latents, t, cond, weight = batch
    with torch.set_grad_enabled(grad):
        v = model.velocity(latents.to(dtype), t, cond.to(dtype), CFG)
        if grad:
            (v * weight.to(dtype)).sum(dim=(1, 2, 3, 4)).mean().backward()
    return v.detach()


def lora(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def references(model):
    return copy.deepcopy(model), copy.deepcopy(model).double()


def check_grads(model, ref32, ref64, failures, reduce=None):
    worst = 0.0
    for (name, p), (_, p32), (_, p64) in zip(lora(model), lora(ref32), lora(ref64)):
        g = None if p.grad is None else full(p.grad).clone()
        if g is not None and reduce is not None:
            g = reduce(g)
        worst = max(worst, check(f"grad {name}", g, p32.grad, p64.grad, failures))
    return worst


def mode_sp(folders, failures):
    mesh = build_mesh(sp=2)
    group = mesh["sp"].get_group()

    def average(g):
        dist.all_reduce(g, group=group)
        return g / dist.get_world_size(group)

    worst, count = 0.0, 0
    for folder in folders:  # one expert, then two (990 high, 431 low: both in one call)
        model = policy(folder)
        ref32, ref64 = references(model)
        for t in (model.transformer, model.transformer_2):
            if t is not None:
                apply_sequence_parallel(t, group)
        batch = inputs(model, [990.0, 431.0])  # every rank of the sp group: the same inputs
        v64, v32 = run(ref64, batch, torch.float64), run(ref32, batch, torch.float32)
        v = run(model, batch, torch.float32)
        worst = max(worst, check("velocity", v, v32, v64, failures))
        worst = max(worst, check_grads(model, ref32, ref64, failures, average))
        count += len(lora(model))
    return f"{count} LoRA parameters over 1 and 2 experts, worst err/bound {worst:.3f}"


def mode_fsdp_experts(folders, failures):
    rank = dist.get_rank()
    model = policy(folders[1])
    ref32, ref64 = references(model)
    strategy = build_strategy("fsdp2", model, world_size=2, device=torch.device("cpu"), group=dist.group.WORLD)
    batch = inputs(model, [990.0, 950.0, 990.0, 431.0])  # rank 0: rows 0, 1 (high only); rank 1: 2, 3 (both)
    run(ref64, batch, torch.float64)
    run(ref32, batch, torch.float32)
    with strategy.micro_batch(last=True):
        run(strategy.policy, rows(batch, [2 * rank, 2 * rank + 1]), torch.float32)  # FSDP2 averages the ranks
    worst = check_grads(model, ref32, ref64, failures)
    # a rollout-like forward: rank 0 high only, rank 1 low only
    forward = rows(inputs(model, [990.0, 950.0, 431.0, 300.0]), [2 * rank, 2 * rank + 1])
    v64, v32 = run(ref64, forward, torch.float64, grad=False), run(ref32, forward, torch.float32, grad=False)
    v = run(strategy.policy, forward, torch.float32, grad=False)
    worst = max(worst, check("velocity", v, v32, v64, failures))
    return f"{len(lora(model))} LoRA parameters, worst err/bound {worst:.3f}"


def mode_fsdp_sp(folders, failures):
    mesh = build_mesh(sp=2)
    model = policy(folders[1])
    ref32, ref64 = references(model)
    for t in (model.transformer, model.transformer_2):
        apply_sequence_parallel(t, mesh["sp"].get_group())
    strategy = build_strategy("fsdp2", model, world_size=2, device=torch.device("cpu"), group=dist.group.WORLD,
                              grad_mesh=flat_mesh(mesh))
    batch = inputs(model, [990.0, 431.0])  # dp=1: both ranks (one sp group) get the whole batch
    v64, v32 = run(ref64, batch, torch.float64), run(ref32, batch, torch.float32)
    with strategy.micro_batch(last=True):
        v = run(strategy.policy, batch, torch.float32)
    worst = max(check("velocity", v, v32, v64, failures), check_grads(model, ref32, ref64, failures))
    return f"{len(lora(model))} LoRA parameters, worst err/bound {worst:.3f}"


def mode_trainer(folders, tmp, failures, two_experts=False):
    from test_wan_train import _cfg

    from sage_fast.trainer import Trainer

    rank, reward = dist.get_rank(), "python=wan_test_reward:brightness"
    recipe, folder = ("wan22_a14b_t2v_480p", folders[1]) if two_experts else ("wan21_t2v_1.3b_480p", folders[0])
    tmp = tmp / recipe

    def cfg(out, *extra):
        return _cfg(recipe, folder, out, reward, *extra)

    def two(out):
        return Trainer(cfg(out, "dist.strategy=fsdp2", "grpo.samples_per_rank=2"), rank=rank, world_size=2,
                       group=dist.group.WORLD)

    sharded = two(tmp / f"two{rank}")
    m_two = sharded.step()
    one = Trainer(cfg(tmp / f"one{rank}", "grpo.samples_per_rank=4"))
    m_one = one.step()
    worst = 0.0
    for (name, p2), (_, p1) in zip(sharded.trainable, one.trainable):
        g1, g2 = p1.grad, None if p2.grad is None else full(p2.grad)
        if g1 is None or g2 is None:
            failures.append(f"{name}: no gradient ({g1 is None}, {g2 is None})")
            continue
        scale, diff = float(g1.abs().max()), float((g2 - g1).abs().max())
        if not (scale == 0 and diff == 0 or diff <= 1e-4 * scale):
            failures.append(f"grad {name}: diff {diff:.3e} > 1e-4 x {scale:.3e}")
        worst = max(worst, diff / max(scale, 1e-30))
    reward_diff = abs(m_two["reward/mean"] - m_one["reward/mean"])
    if not reward_diff < 1e-5:
        failures.append(f"reward/mean {m_two['reward/mean']} != {m_one['reward/mean']}")

    straight = two(tmp / "straight")
    m_straight = [straight.step() for _ in range(2)]
    first = two(tmp / "resumed")
    first.step()
    first.save()
    second = two(tmp / "resumed")
    if not (second.resume() and second.iteration == 1):
        failures.append("resume did not restore iteration 1")
    m_second = second.step()
    if m_second["loss"] != m_straight[1]["loss"]:
        failures.append(f"resumed loss {m_second['loss']} != {m_straight[1]['loss']}")
    for (name, a), (_, b) in zip(straight.trainable, second.trainable):
        if not torch.equal(full(a.detach()), full(b.detach())):
            failures.append(f"resumed {name} differs")
    return (f"{len(sharded.trainable)} LoRA parameters, worst relative gradient difference {worst:.2e}, "
            f"reward difference {reward_diff:.1e}; 1 + 1 iterations == 2 bitwise")


def main(args):
    folders, tmp, modes = (Path(args[0]), Path(args[1])), Path(args[2]), args[3:]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, failed = dist.get_rank(), []
    for mode in modes:
        failures = []
        if mode in ("trainer", "trainer_experts"):
            summary = mode_trainer(folders, tmp, failures, two_experts=mode == "trainer_experts")
        else:
            modes_of = {"sp": mode_sp, "fsdp_experts": mode_fsdp_experts, "fsdp_sp": mode_fsdp_sp}
            summary = modes_of[mode](folders, failures)
        if failures:
            failed.append(mode)
            print(f"rank {rank} FAIL {mode}:\n  " + "\n  ".join(failures[:20]), flush=True)
        elif rank == 0:
            print(f"OK {mode}: {summary}", flush=True)
        # free the mode's sharded models and meshes on every rank at the same point, not whenever the
        # collector gets to them during the next mode's collectives
        gc.collect()
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    from sage_fast.parallel import exit_worker

    exit_worker(lambda: main(sys.argv[1:]))  # no interpreter finalization after the groups are gone (its doc: why)
