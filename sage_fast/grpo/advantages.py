"""Group-relative advantages (docs/SPEC.md section 5), across data-parallel ranks, failures excluded.

Owns: turning per-sample rewards into advantages

    A_i = clamp((r_i - mean_G r) / max(std_G r, eps), -clip, clip)     (population std)

where G is the sample's group (the G rollouts of one prompt). `std_scope` chooses the
denominator: "group" (above, the authors'), "batch" (one pooled within-group std over the
whole global batch, sqrt(mean_i (r_i - mean_G(i) r)^2): groups of 4 estimate their std from 3
degrees of freedom, a noisy scale; flow_grpo's `global_std` idea, on residuals so that reward
differences between prompts do not shrink it) or "none" (A_i = r_i - mean_G r, Dr. GRPO).
Groups may span ranks: every
rank gathers the rewards and group ids of the data-parallel group, computes the statistics
of every group in one fixed order, and keeps its own samples, so all ranks agree bitwise and
a 2-rank run equals 1 rank with the same global batch.

A failed reward (NaN, +-inf: the reward model raised or returned garbage) must not become 0
(docs/SPEC.md defect 1): the sample is left out of its group's mean and std and gets `valid = False`,
so the loss drops it. A group with fewer than two valid samples has no spread to learn from:
its advantages are 0 (valid stays True for its finite samples: they are trained, with A = 0).

Leaves to others: computing rewards (sage_fast.world / reward models), the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Advantages", "group_advantages", "STD_SCOPES"]

STD_SCOPES = ("group", "batch", "none")


@dataclass
class Advantages:
    adv_b: torch.Tensor  # [B] float32, 0 where not valid
    valid_b: torch.Tensor  # [B] bool: reward finite (sample enters the loss)
    group_mean_b: torch.Tensor  # [B] float32, the statistics each sample was normalised with
    group_std_b: torch.Tensor  # [B] float32
    num_failed: int  # failed rewards on this rank


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def group_advantages(rewards_b: torch.Tensor, group_ids_b: torch.Tensor, *, clip: float = 5.0,
                     eps: float = 1e-6, process_group=None, std_scope: str = "group") -> Advantages:
    """Advantages of this rank's samples.

    Args:
        rewards_b: [B] rewards of this rank's samples (NaN/inf = failed).
        group_ids_b: [B] int64 global group id of each sample (the prompt's index in the global
            batch); groups may have members on other ranks.
        clip: |A| bound (authors: 5).
        eps: floor of the std (a group whose rewards are all equal gets A = 0).
        process_group: the data-parallel group to gather over, or None for no gathering (also
            when torch.distributed is not initialised). Every rank must pass the same B.
        std_scope: "group", "batch" or "none" (module doc).
    """
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {std_scope!r}")
    if rewards_b.dim() != 1 or group_ids_b.shape != rewards_b.shape:
        raise ValueError(f"rewards_b and group_ids_b must be [B] of equal shape, got {tuple(rewards_b.shape)} "
                         f"and {tuple(group_ids_b.shape)}")
    if group_ids_b.dtype != torch.int64:
        raise ValueError(f"group_ids_b must be int64, got {group_ids_b.dtype}")
    if not clip > 0 or not eps > 0:
        raise ValueError(f"clip and eps must be > 0, got clip={clip}, eps={eps}")
    rewards = rewards_b.detach().to(torch.float64)
    groups = group_ids_b.detach()
    local = rewards.shape[0]
    distributed = process_group is not None and dist.is_available() and dist.is_initialized() \
        and dist.get_world_size(process_group) > 1
    if distributed:
        rank = dist.get_rank(process_group)
        all_rewards, all_groups = _gather(rewards, process_group), _gather(groups, process_group)
    else:
        rank, all_rewards, all_groups = 0, rewards, groups

    valid = torch.isfinite(all_rewards)
    # statistics per group over valid members, in float64, via a [G, N] membership matrix:
    # the same arithmetic on every rank, whatever its share of the batch
    ids, inverse = torch.unique(all_groups, return_inverse=True)
    member = (inverse.view(1, -1) == torch.arange(ids.numel(), device=ids.device).view(-1, 1)) & valid.view(1, -1)
    r = torch.where(valid, all_rewards, torch.zeros_like(all_rewards)).view(1, -1)
    count = member.sum(1).to(torch.float64)
    mean = (member * r).sum(1) / count.clamp(min=1)
    var = (member * (r - mean.view(-1, 1)) ** 2).sum(1) / count.clamp(min=1)
    std = var.sqrt()
    mean_n, std_n, count_n = mean[inverse], std[inverse], count[inverse]
    if std_scope != "group":
        # residuals of the samples that are trained with a nonzero advantage (groups of >= 2)
        used = valid & (count_n >= 2)
        resid = torch.where(used, all_rewards - mean_n, torch.zeros_like(all_rewards))
        pooled = (resid.pow(2).sum() / used.sum().clamp(min=1)).sqrt()
        std_n = torch.full_like(std_n, float(pooled) if std_scope == "batch" else 1.0)
    adv = (all_rewards - mean_n) / std_n.clamp(min=eps)
    adv = torch.where(valid & (count_n >= 2), adv.clamp(-clip, clip), torch.zeros_like(adv))

    sl = slice(rank * local, (rank + 1) * local)
    valid_local = valid[sl]
    return Advantages(
        adv_b=adv[sl].to(torch.float32),
        valid_b=valid_local,
        group_mean_b=mean_n[sl].to(torch.float32),
        group_std_b=std_n[sl].to(torch.float32),
        num_failed=int((~valid_local).sum()),
    )
