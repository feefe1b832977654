"""Distribution: the (dp, sp) device mesh (`mesh.py`), collectives as autograd Functions
(`collectives.py`), Ulysses sequence parallelism for the HunyuanVideo-1.5 transformer by hooks
and the attention processor (`ulysses.py`), FSDP2 and DDP wrapping (`wrap.py`). Model code
never sees a process group."""

from .collectives import all_gather, all_to_all
from .mesh import MESH_AXES, build_mesh, flat_mesh, init_distributed
from .ulysses import ShardedRope, UlyssesGroup, apply_sequence_parallel, remove_sequence_parallel
from .wrap import wrap_ddp, wrap_fsdp2

__all__ = [
    "all_gather", "all_to_all", "MESH_AXES", "build_mesh", "flat_mesh", "init_distributed",
    "ShardedRope", "UlyssesGroup", "apply_sequence_parallel", "remove_sequence_parallel",
    "wrap_ddp", "wrap_fsdp2",
]
