"""Collectives as autograd Functions: each backward is the mirrored collective.

Owns the three communication patterns of Ulysses sequence parallelism over one process group
of size W (the `sp` axis of the mesh):

| function | forward | backward |
|---|---|---|
| `all_to_all(x, group, scatter_dim, gather_dim)` | split `scatter_dim` in W, send piece j to rank j, concatenate what arrives along `gather_dim` (in rank order) | the same all-to-all with the two dims swapped |
| `all_gather(x, group, dim)` | concatenate every rank's `x` along `dim` (rank order) | reduce-scatter (sum) of the gradient along `dim` |

Gradient convention (the torchtitan context-parallel one): a tensor that every rank of the
group holds in full ("replicated") carries, on each rank, a *partial* gradient; the true
gradient is the sum over ranks. `all_gather` turns a sharded tensor into a replicated one,
so its backward sums the partial gradients and hands each rank its shard: reduce-scatter.
Slicing a replicated tensor (taking this rank's heads) needs no communication: autograd's
zero-padding of the slice gradient is already the partial gradient. A loss computed on
the gathered output by every rank of the group therefore yields parameter gradients that
are W times a partial each; averaging them over the group (what FSDP2 and DDP do over the
flattened dp x sp mesh) gives exactly the single-process gradient.

Every rank of the group must call the same collectives in the same order with the same
shapes (true for Ulysses: all ranks of a group run the same model on equal shards).
Backends: NCCL and gloo (all_to_all_single, all_gather_into_tensor, reduce_scatter_tensor).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "all_gather"]


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} "
                         f"is not divisible by the group size {world}")
    # [W, *piece]: piece j (of the scatter dim) goes to rank j
    send = torch.stack(x.chunk(world, dim=scatter_dim), dim=0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] is rank j's piece for this rank: concatenated along the gather dim in rank order
    return torch.cat(recv.unbind(0), dim=gather_dim)


class AllToAllFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """x's `scatter_dim` split over the group, its `gather_dim` gathered; backward mirrored."""
    if dist.get_world_size(group) == 1:
        return x
    return AllToAllFn.apply(x, group, scatter_dim, gather_dim)


class AllGatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        world = dist.get_world_size(group)
        ctx.group, ctx.dim = group, dim
        x0 = x.movedim(dim, 0).contiguous()  # [n, ...]
        out = x0.new_empty((world * x0.shape[0],) + x0.shape[1:])  # [W * n, ...], rank-major
        dist.all_gather_into_tensor(out, x0, group=group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        g0 = grad.movedim(ctx.dim, 0).contiguous()  # [W * n, ...]
        out = g0.new_empty((g0.shape[0] // world,) + g0.shape[1:])
        dist.reduce_scatter_tensor(out, g0, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.movedim(0, ctx.dim), None, None


def all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim` (rank order); backward = reduce-scatter."""
    if dist.get_world_size(group) == 1:
        return x
    return AllGatherFn.apply(x, group, dim)
