"""Data order: which prompts, noise and trained steps an iteration uses, from seeds alone.

Owns: the seed derivation (`derive_seed`, `epoch_seed`), the epoch-shuffled prompt order, the
layout of a global batch into groups of G samples, the (sample, step) pairs trained and their
micro-batches, and the typed data of an iteration (`RolloutBatch`).

Everything random in a run derives from (run.seed, iteration, global sample index), never from
the number of ranks or micro-batches: a resumed run continues exactly, and a 2-rank run draws
the data of a 1-rank run with the same global batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sage_fast.grpo.advantages import Advantages
    from sage_fast.grpo.rollout import Trajectory
    from sage_fast.models import Conditioning
    from sage_fast.task import RewardResult

__all__ = ["derive_seed", "epoch_seed", "prompt_order", "BatchLayout", "MicroBatch", "TrainedPairs", "trained_pairs",
           "RolloutBatch"]


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (distinct parts, unrelated seeds)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_seed(base_seed: int, epoch: int) -> int:
    """The rollout's Philox seed for (base_seed, epoch): distinct epochs draw unrelated noise."""
    return derive_seed("sage_fast", "rollout", int(base_seed), int(epoch))


def prompt_order(seed: int, prompts: list[str], iteration: int, per_iteration: int) -> list[str]:
    """The global batch's prompts of `iteration`: `per_iteration` consecutive positions of an
    endless sequence of epochs, each epoch a seeded permutation of `prompts`."""
    n = len(prompts)
    out = []
    for pos in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, i = divmod(pos, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))
        out.append(prompts[int(order[i])])
    return out


@dataclass(frozen=True)
class BatchLayout:
    """Where this rank's B samples sit in the global batch of groups of G.

    Global sample first + b belongs to group (first + b) // G, the group of the prompt it renders.
    The sp ranks of a group share one layout (they render the same samples)."""

    rank: int  # this rank's index on the data axis
    first: int  # global index of this rank's first sample
    samples: int  # B, samples on this rank
    group_size: int  # G
    total: int  # samples of the global batch

    @classmethod
    def of_rank(cls, dp_rank: int, dp_size: int, samples_per_rank: int, group_size: int) -> "BatchLayout":
        return cls(dp_rank, dp_rank * samples_per_rank, samples_per_rank, group_size, samples_per_rank * dp_size)

    @property
    def group_b(self) -> list[int]:
        """The group (index into the global batch's prompts) of each local sample."""
        return [(self.first + b) // self.group_size for b in range(self.samples)]

    def group_ids(self) -> torch.Tensor:
        return torch.tensor(self.group_b, dtype=torch.int64)

    def shared_noise_index(self) -> list[int]:
        """Each sample's group's first member (`grpo.group_noise=shared`: one initial noise a group)."""
        return [g * self.group_size for g in self.group_b]


@dataclass
class MicroBatch:
    sample_b: torch.Tensor  # [M] local sample index of each pair (samples may repeat)
    step_t: torch.Tensor  # [M] step index
    valid: torch.Tensor  # [M] bool: the pair's sample has a finite reward


@dataclass
class TrainedPairs:
    """The (sample, step) pairs one update trains, in training order."""

    sample_b: torch.Tensor  # [P]
    step_t: torch.Tensor  # [P]

    def micro_batches(self, size: int, valid_b: torch.Tensor) -> list[MicroBatch]:
        """Consecutive pairs, `size` at a time; each knows which of its pairs are valid."""
        return [MicroBatch(s, t, valid_b[s]) for s, t in zip(self.sample_b.split(size), self.step_t.split(size))]


def trained_pairs(seed: int, iteration: int, layout: BatchLayout, steps: list[int], k: int) -> TrainedPairs:
    """K of the trainable `steps` per local sample (seeded per global sample, so independent of
    the rank count), then all pairs of the rank in one seeded shuffle: the micro-batches mix timesteps."""
    steps_t = torch.tensor(steps)
    sample_b, step_t = [], []
    for b in range(layout.samples):
        g = torch.Generator().manual_seed(derive_seed(seed, "steps", iteration, layout.first + b))
        chosen = steps_t[torch.randperm(len(steps_t), generator=g)[:k]]
        sample_b += [b] * len(chosen)
        step_t += chosen.tolist()
    order = torch.randperm(len(sample_b), generator=torch.Generator().manual_seed(
        derive_seed(seed, "order", iteration, layout.rank)))
    return TrainedPairs(torch.tensor(sample_b)[order], torch.tensor(step_t)[order])


@dataclass
class RolloutBatch:
    """One iteration's data on this rank: its samples under the current policy, rewarded."""

    layout: BatchLayout
    prompts: list[str]  # [B] the prompt of each local sample
    cond: "Conditioning"
    traj: "Trajectory"
    reward: "RewardResult"
    adv: "Advantages"

    def pair_inputs(self, mb: MicroBatch, sigmas: torch.Tensor, device):
        """(x_t, x_t+1, coefficients [M, 3], timestep 1000 sigma_t, conditioning) of a micro-batch's pairs."""
        x = self.traj.latents[mb.step_t, mb.sample_b]  # [M, C, T, H, W]
        x_next = self.traj.latents[mb.step_t + 1, mb.sample_b]
        coef = self.traj.coef[mb.step_t, :, mb.sample_b]  # [M, 3]
        timestep = (1000.0 * sigmas[mb.step_t]).to(torch.float32).to(device)
        return x, x_next, coef, timestep, self.cond.index_select(mb.sample_b.to(device))
