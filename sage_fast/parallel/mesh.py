"""The device mesh: named axes `dp` (data parallel) and `sp` (Ulysses sequence parallel).

Owns: process-group initialisation under torchrun and the 2-D mesh. Ranks r = d * sp + s:
the sp groups are consecutive ranks (intra-node, where the all-to-alls are cheapest); each
dp group holds one rank of every sp group. All ranks of one sp group must get the same
prompts, seeds and latents. Gradients are averaged over the flattened `dp_sp` mesh (see
`collectives.py` for why that equals the single-process gradient).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["MESH_AXES", "build_mesh", "init_distributed", "flat_mesh"]

MESH_AXES = ("dp", "sp")


def init_distributed(backend: str | None = None) -> None:
    """Initialise the default process group from torchrun's environment (idempotent).

    backend: None = `nccl` when CUDA is available else `gloo`.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise ValueError("init_distributed needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def build_mesh(sp: int = 1, dp: int | None = None, device_type: str | None = None) -> DeviceMesh:
    """A (dp, sp) mesh over the whole world; dp defaults to world_size // sp."""
    world = dist.get_world_size()
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1 or world % sp:
        raise ValueError(f"sp must be an int >= 1 dividing the world size {world}, got {sp!r}")
    dp = world // sp if dp is None else dp
    if dp * sp != world:
        raise ValueError(f"dp * sp must equal the world size {world}, got dp={dp}, sp={sp}")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (dp, sp), mesh_dim_names=MESH_AXES)


def flat_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D `dp_sp` mesh over both axes (FSDP2 shards and averages gradients over it)."""
    return mesh[MESH_AXES]._flatten("dp_sp")
