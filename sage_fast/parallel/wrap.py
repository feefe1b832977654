"""FSDP2 wrapping: `fully_shard` per transformer block (the strategy `strategy.FSDP2` uses it):
HunyuanVideo-1.5's double-stream `transformer_blocks`, Wan's `blocks`.

Owns: how the policy's parameters are sharded and its gradients reduced: averaged over every
rank of the mesh (dp x sp); with Ulysses that average is what makes the sp ranks' gradients
equal the single-process one (`collectives.py`).

FSDP2 keeps float32 sharded master parameters; `param_dtype` (e.g. torch.bfloat16) makes it
all-gather and compute in that dtype, `reduce_dtype` float32 keeps gradient reduction exact
to float32. The authors' recipe (docs/SPEC.md section 7) keeps fp32 parameters under bf16 autocast,
which is the default here (param_dtype None).
"""

from __future__ import annotations

import torch
from torch import nn

from .mesh import flat_mesh

__all__ = ["wrap_fsdp2"]


def wrap_fsdp2(transformer: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `transformer` (in place) with FSDP2 over the flattened dp x sp mesh.

    One FSDP unit per block (HunyuanVideo-1.5: 54 double-stream blocks at full size; Wan: 30
    (1.3B) or 40 (14B) blocks; one all-gather per block keeps the peak at one block's
    unsharded weights), then the root for everything else. Each of Wan 2.2's two experts is
    wrapped on its own (its own root). mesh: a (dp, sp) DeviceMesh from `build_mesh` or a 1-D
    mesh. Returns `transformer`.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

    if mesh.ndim == 2:
        mesh = flat_mesh(mesh)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in _blocks(transformer):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(transformer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return transformer


def _blocks(transformer: nn.Module) -> nn.ModuleList:
    """The transformer's block list: `transformer_blocks` (HunyuanVideo-1.5) or `blocks` (Wan)."""
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(transformer, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"wrap_fsdp2: {type(transformer).__name__} has neither transformer_blocks nor blocks")
