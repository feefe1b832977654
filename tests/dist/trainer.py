"""torchrun --nproc_per_node 2 tests/dist/trainer.py TMP: 2 ranks x 4 samples == 1 rank x 8 samples.

Same global batch, prompts, noise and trained steps; DDP averages the gradients. After one
iteration the gradient of every trainable parameter in the 2-rank run must match the 1-process
run up to float32 summation order (1e-4 of its largest entry)."""

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from test_trainer import tiny_cfg  # noqa: E402

from sage_fast.trainer import Trainer  # noqa: E402


def main():
    tmp = __import__("pathlib").Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    two = Trainer(tiny_cfg(tmp / f"two{rank}", "grpo.samples_per_rank=4"), rank=rank, world_size=2,
                  dp_group=dist.group.WORLD)
    m_two = two.step()
    one = Trainer(tiny_cfg(tmp / f"one{rank}", "grpo.samples_per_rank=8"))
    m_one = one.step()
    # Compare the (clipped) gradients left by the update, not the parameters: Adam's first step is
    # lr * sign(g) elementwise, which turns rounding noise in near-zero gradient entries into
    # full-size steps.
    worst = 0.0
    for (name, p2), (_, p1) in zip(two.trainable, one.trainable):
        g1, g2 = p1.grad, p2.grad
        assert (g1 is None) == (g2 is None), name
        if g1 is None:  # unused parameter (the last block's text branch feeds nothing)
            continue
        scale = float(g1.abs().max())
        diff = float((g2 - g1).abs().max())
        assert scale == 0 or diff <= 1e-4 * scale, (name, diff, scale)
        worst = max(worst, diff / max(scale, 1e-30))
    assert abs(m_two["reward/mean"] - m_one["reward/mean"]) < 1e-5, (m_two["reward/mean"], m_one["reward/mean"])
    print(f"OK trainer rank {rank}: worst relative gradient difference {worst:.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
