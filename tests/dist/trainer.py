"""torchrun --nproc_per_node 2 tests/dist/trainer.py TMP [ddp|fsdp2|sp|sp_fsdp2|deepspeed_zero2|ddp_shared]

1. 2 ranks x 4 samples == 1 rank x 8 samples (ddp, fsdp2), or one sp=2 group x 8 samples ==
   1 rank x 8 samples (sp: Ulysses splits every video's tokens over the 2 ranks; sp_fsdp2: the
   same, sharded). Same global batch, prompts, noise and trained steps; DDP averages the
   gradients, FSDP2 reduce-scatters them. After one iteration the
   gradient of every trainable parameter in the 2-rank run must match the 1-process run up to
   float32 summation order (1e-4 of its largest entry). DeepSpeed ZeRO-2 frees the parameters'
   .grad after its step, so there the first Adam moment is compared instead: after one step it
   is exactly (1 - beta1) x the clipped gradient in both runs.
2. Checkpoints hold full tensors: 1 + 1 iterations with a save and a resume into a fresh trainer
   of the same layout equal 2 uninterrupted iterations bitwise, on every rank.
3. (ddp) The adaptive KL controller's beta is the same on every rank (it reads the global KL).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_trainer import tiny_cfg  # noqa: E402

from sage_fast.trainer import Trainer  # noqa: E402


def full(t):
    if t is None:
        return None
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def two_rank_trainer(path, strategy, *extra):
    layout = {"ddp": ("grpo.samples_per_rank=4", "dist.strategy=ddp"),
              "fsdp2": ("grpo.samples_per_rank=4", "dist.strategy=fsdp2"),
              "sp": ("grpo.samples_per_rank=8", "dist.strategy=ddp", "dist.sp=2"),
              "sp_fsdp2": ("grpo.samples_per_rank=8", "dist.strategy=fsdp2", "dist.sp=2"),
              "deepspeed_zero2": ("grpo.samples_per_rank=4", "dist.strategy=deepspeed_zero2"),
              "ddp_shared": ("grpo.samples_per_rank=4", "dist.strategy=ddp")}[strategy]
    return Trainer(tiny_cfg(path, *layout, *SAME[strategy], *extra), rank=dist.get_rank(), world_size=2,
                   group=dist.group.WORLD)


# settings of both runs: ddp_shared has one group of 8 spanning the ranks, sharing its initial
# noise (a global index), with the batch-pooled advantage std (gathered over the ranks)
SAME = {"ddp_shared": ("grpo.group_size=8", "grpo.group_noise=shared", "grpo.adv_std=batch")}
SAME = {k: SAME.get(k, ()) for k in ("ddp", "fsdp2", "sp", "sp_fsdp2", "deepspeed_zero2", "ddp_shared")}


def check_equals_one_rank(tmp, strategy, rank):
    two = two_rank_trainer(tmp / f"two{rank}", strategy)
    m_two = two.step()
    one = Trainer(tiny_cfg(tmp / f"one{rank}", "grpo.samples_per_rank=8", *SAME[strategy]))
    m_one = one.step()
    # Compare the (clipped) gradients left by the update, not the parameters: Adam's first step is
    # lr * sign(g) elementwise, which turns rounding noise in near-zero gradient entries into
    # full-size steps.
    worst = 0.0
    for (name, p2), (_, p1) in zip(two.trainable, one.trainable):
        g1, g2 = p1.grad, full(p2.grad)
        if strategy == "deepspeed_zero2":
            from deepspeed.utils import safe_get_full_optimizer_state

            assert g2 is None, name  # ZeRO-2 keeps gradients in its partitions only
            g2 = safe_get_full_optimizer_state(p2, "exp_avg")  # a collective
            g1 = one.optimizer.state[p1]["exp_avg"] if p1 in one.optimizer.state else None
        if g1 is None:  # unused parameter (the last block's text branch feeds nothing)
            assert g2 is None or not g2.any(), name
            continue
        assert g2 is not None, name
        scale = float(g1.abs().max())
        diff = float((g2 - g1).abs().max())
        assert scale == 0 or diff <= 1e-4 * scale, (name, diff, scale)
        worst = max(worst, diff / max(scale, 1e-30))
    assert abs(m_two["reward/mean"] - m_one["reward/mean"]) < 1e-5, (m_two["reward/mean"], m_one["reward/mean"])
    print(f"OK trainer {strategy} rank {rank}: worst relative gradient difference {worst:.2e}", flush=True)


def check_resume(tmp, strategy, rank):
    # every rank needs the same run folder: rank 0 writes, all read
    extra = ("grpo.kl_mode=dual_moving", "grpo.beta=0.05", "grpo.update_ref_every=3")
    straight = two_rank_trainer(tmp / "straight", strategy, *extra)
    m_straight = [straight.step() for _ in range(2)]
    first = two_rank_trainer(tmp / "resumed", strategy, *extra)
    first.step()
    first.save()
    second = two_rank_trainer(tmp / "resumed", strategy, *extra)
    assert second.resume() and second.iteration == 1
    m_second = second.step()
    assert m_second["loss"] == m_straight[1]["loss"], (m_second["loss"], m_straight[1]["loss"])
    for (name, a), (_, b) in zip(straight.trainable, second.trainable):
        assert torch.equal(full(a.detach()), full(b.detach())), name
    print(f"OK resume {strategy} rank {rank}: 1 + 1 iterations == 2, bitwise", flush=True)


def check_adaptive_beta_agrees(tmp, strategy, rank):
    # the adaptive controller must follow the global batch's KL: with each rank's own KL (different
    # samples, different KL) the ranks' beta would drift apart. kl_target 1 keeps the error
    # (k - 1) unclipped, so any difference in the measured KL shows in beta.
    extra = ("grpo.beta_schedule=adaptive", "grpo.kl_mode=stepwise", "grpo.updates_per_rollout=2",
             "grpo.kl_target=1.0", "grpo.beta=0.05")
    trainer = two_rank_trainer(tmp / f"adaptive{rank}", strategy, *extra)
    kl = [trainer.step()["kl/step"] for _ in range(2)]
    betas, local = [None, None], [None, None]
    dist.all_gather_object(betas, trainer.kl.beta)
    dist.all_gather_object(local, kl)
    assert local[0] != local[1], local  # the ranks did measure different KLs
    assert betas[0] == betas[1] != 0.05, betas
    print(f"OK adaptive beta {strategy} rank {rank}: {betas[rank]:.6g} on every rank", flush=True)


def main():
    tmp = Path(sys.argv[1])
    strategy = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    check_equals_one_rank(tmp, strategy, rank)
    check_resume(tmp, strategy, rank)
    if strategy == "ddp":
        check_adaptive_beta_agrees(tmp, strategy, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    from sage_fast.parallel import exit_worker

    exit_worker(main)  # no interpreter finalization after the groups are gone (its doc: why)
