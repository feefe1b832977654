"""Distribution: the (dp, sp) device mesh and the data axis (`mesh.py`), collectives as autograd
Functions (`collectives.py`), Ulysses sequence parallelism for the HunyuanVideo-1.5 and Wan
transformers by hooks and attention processors (`ulysses.py`), FSDP2 wrapping (`wrap.py`) and the data-parallel
strategies the trainer runs under (`strategy.py`). Model code never sees a process group."""

from .collectives import all_gather, all_to_all
from .mesh import MESH_AXES, DataAxis, build_mesh, exit_worker, flat_mesh, init_distributed
from .strategy import STRATEGIES, Strategy, build_strategy, parallelize
from .ulysses import ShardedRope, UlyssesGroup, apply_sequence_parallel, remove_sequence_parallel
from .wrap import wrap_fsdp2

__all__ = [
    "all_gather", "all_to_all", "MESH_AXES", "DataAxis", "build_mesh", "exit_worker", "flat_mesh", "init_distributed",
    "STRATEGIES", "Strategy", "build_strategy", "parallelize",
    "ShardedRope", "UlyssesGroup", "apply_sequence_parallel", "remove_sequence_parallel", "wrap_fsdp2",
]
