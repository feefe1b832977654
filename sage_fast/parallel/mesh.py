"""The device mesh: named axes `dp` (data parallel) and `sp` (Ulysses sequence parallel).

Owns: process-group initialisation under torchrun, the 2-D mesh and the data axis. Ranks r = d * sp + s:
the sp groups are consecutive ranks (intra-node, where the all-to-alls are cheapest); each
dp group holds one rank of every sp group. All ranks of one sp group must get the same
prompts, seeds and latents. Gradients are averaged over the flattened `dp_sp` mesh (see
`collectives.py` for why that equals the single-process gradient).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["MESH_AXES", "DataAxis", "build_mesh", "exit_worker", "init_distributed", "flat_mesh"]

MESH_AXES = ("dp", "sp")


def init_distributed(device_type: str | None = None) -> None:
    """Initialise the default process group from torchrun's environment (idempotent).

    device_type: "cuda" -> `cpu:gloo,cuda:nccl` (NCCL for the GPU tensors, gloo for the CPU ones:
    rewards, advantages, counts) on the device LOCAL_RANK; "cpu" -> gloo; None: "cuda" when
    CUDA is available."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise ValueError("init_distributed needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR)")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")


def exit_worker(main: Callable[[], int | None]) -> NoReturn:
    """Run a torchrun worker's `main()` (which destroys its process groups) and end the process
    with its exit code: stdio and logging flushed, then `os._exit`, without interpreter
    finalization. An exception is printed and exits 1 (KeyboardInterrupt 130), as Python would.

    Why: gloo's process group has no shutdown, so its worker threads outlive
    `destroy_process_group` (the C++ object, and its threads, go only when the last Python
    reference does, often during finalization). A thread that then frees a tensor with a Python
    object needs the GIL of an interpreter being torn down and ends in std::terminate
    ("terminate called without an active exception", SIGABRT), the mechanism pytorch/pytorch#179291
    describes. torchrun then reports a run that finished every step as failed; the CPU box saw
    it in a full test suite, after a 2-rank script's every check had passed (rare: 0 of 50 direct
    runs of that script). Finalization has nothing left to do: `main` closes its files, reward
    workers and process groups itself."""
    try:
        code = main()
    except SystemExit as err:  # sys.exit(code) inside main, read as the interpreter reads it
        code = err.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # as the interpreter: the traceback, then the status of a SIGINT death
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, then exit 1
        traceback.print_exc()
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # no stream (None), or a closed or broken one
            pass
    os._exit(0 if code is None else int(code))


class DataAxis:
    """Reductions over a set of ranks: the data-parallel axis (the ranks that hold different
    samples; the sp ranks of a group hold the same ones), or all ranks. Of size 1 every call is
    the identity."""

    def __init__(self, rank: int = 0, size: int = 1, group=None) -> None:
        self.rank, self.size, self.group = rank, size, group

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """In place (and returned): the sum (or `op`) over the axis."""
        if self.size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t`, concatenated along dim 0 in rank order."""
        if self.size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a collective: every rank calls it)."""
        if self.size == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def gather_objects(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


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
