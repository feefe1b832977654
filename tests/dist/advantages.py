"""torchrun --nproc_per_node 2: group advantages over 2 gloo ranks == one process (bitwise)."""

import torch
import torch.distributed as dist

from sage_fast.grpo.advantages import group_advantages


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, generator=g)
    rewards[3] = float("nan")  # a failed reward on rank 0, in a group spanning both ranks
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2])  # each group has members on both ranks
    full = group_advantages(rewards, groups)
    local = slice(rank * 6, (rank + 1) * 6)
    mine = group_advantages(rewards[local], groups[local], process_group=dist.group.WORLD)
    assert torch.equal(mine.adv_b, full.adv_b[local]), (mine.adv_b, full.adv_b[local])
    assert torch.equal(mine.valid_b, full.valid_b[local])
    alone = group_advantages(rewards[local], groups[local])  # without the gather: different
    assert not torch.equal(alone.adv_b, mine.adv_b)
    for scope in ("batch", "none"):  # the pooled std is the global batch's on every rank
        full_s = group_advantages(rewards, groups, std_scope=scope)
        mine_s = group_advantages(rewards[local], groups[local], process_group=dist.group.WORLD, std_scope=scope)
        assert torch.equal(mine_s.adv_b, full_s.adv_b[local]), (scope, mine_s.adv_b, full_s.adv_b[local])
        assert torch.equal(mine_s.group_std_b, full_s.group_std_b[local])
    alone_b = group_advantages(rewards[local], groups[local], std_scope="batch")
    assert not torch.equal(alone_b.group_std_b, group_advantages(rewards, groups, std_scope="batch").group_std_b[local])
    print(f"OK advantages rank {rank}/{world}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from sage_fast.parallel import exit_worker

    exit_worker(main)  # no interpreter finalization after the groups are gone (its doc: why)
