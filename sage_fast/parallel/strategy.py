"""Data-parallel strategies behind one interface: how the policy is wrapped, how its gradients
are synchronised and applied, and how the full training state leaves and re-enters it.

    strategy, axis = parallelize(model, strategy=cfg.dist.strategy, sp=cfg.dist.sp, rank=r, world_size=W,
                                 group=g, device=d)         # Ulysses, then the strategy below
    optimizer = strategy.make_optimizer(lambda params: torch.optim.AdamW(params, ...))
    for i, micro_batch in enumerate(micro_batches):
        with strategy.micro_batch(last=i == len(micro_batches) - 1):
            loss = f(strategy.policy(x, ...))      # the wrapped forward
            strategy.backward(loss)
    norm, applied = strategy.step(clip, loss_finite=...)

    Single   one process; also what every strategy is on one rank
    DDP      DistributedDataParallel; gradients all-reduced on the last micro-batch only
    FSDP2    `fully_shard` per transformer block of every expert (`wrap.py`); reduce-scattered
             on the last one; Wan 2.2's two experts run on every rank in every call
    ZeRO2    DeepSpeed stage 2: optimizer states and gradients partitioned, parameters replicated

Every strategy averages gradients over all ranks (dp x sp; `collectives.py` for why that is
the single-process gradient under Ulysses). Saved state is always full tensors (`full`), so a
checkpoint resumes under any strategy and rank count, except ZeRO-2's optimizer partitions,
which need the same rank count. `like` lays a full tensor out as a live parameter is.

Leaves to others: the process group and mesh (`mesh.py`), what the loss is (the trainer).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["STRATEGIES", "Strategy", "Single", "DDP", "FSDP2", "ZeRO2", "build_strategy", "parallelize", "full", "like"]

STRATEGIES = ("ddp", "fsdp2", "deepspeed_zero2")  # dist.strategy


def full(t):
    """A DTensor's full value (a collective: every rank calls it); other values as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like `ref`: sharded the same way when `ref` is a DTensor."""
    if isinstance(ref, DTensor):
        return distribute_tensor(value.to(ref.dtype), ref.device_mesh, ref.placements)
    return value


def experts(model: nn.Module) -> list[nn.Module]:
    """The policy's transformers: `transformer`, and Wan 2.2's `transformer_2` when present."""
    return [t for t in (model.transformer, getattr(model, "transformer_2", None)) if t is not None]


def _union_over_ranks(used, *, group, device) -> tuple[bool, ...]:
    """Each flag true on every rank when it is on any (a collective: every rank calls it)."""
    flags = torch.tensor([int(u) for u in used], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return tuple(bool(f) for f in flags.tolist())


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class Strategy:
    """The interface, and the single-process strategy's behaviour."""

    name = "single"
    collective_state = False  # True: building the state is a collective (every rank calls state_dict)
    sharded = False  # True: no rank holds the full parameters (export from a checkpoint instead)
    cuda_graphs = True  # whether rollouts may be captured in CUDA graphs under this strategy

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.policy: nn.Module = model  # what the training forward calls
        self.trainable = _trainable(model)
        self.optimizer: torch.optim.Optimizer | None = None

    def make_optimizer(self, build) -> torch.optim.Optimizer:
        """`build(params)` -> the optimizer over the trainable parameters (a strategy may wrap it)."""
        self.optimizer = build([p for _, p in self.trainable])
        return self.optimizer

    def micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward; gradients are synchronised
        across ranks on the `last` one only."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, clip: float | None, *, loss_finite: bool) -> tuple[torch.Tensor, bool]:
        """Clip the gradient norm to `clip` (None: no clip) and apply the optimizer step when the
        norm and the loss are finite. Returns (the gradient norm before clipping, applied)."""
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable],
                                              clip if clip is not None else float("inf"))
        applied = bool(torch.isfinite(norm)) and loss_finite
        if applied:
            self.optimizer.step()
        return norm, applied

    # full state: checkpoints hold full tensors ------------------------------------------------

    def model_state(self) -> dict[str, torch.Tensor]:
        return {n: full(p.detach()).clone() for n, p in self.trainable}

    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-parameter tensors (e.g. an anchor's copy) as full tensors (a collective under FSDP2)."""
        return {n: full(v) for n, v in tensors.items()}

    def local_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full per-parameter tensors laid out like the trainable parameter of the same name."""
        params = dict(self.trainable)
        return {n: like(v.to(self.device), params[n]) if n in params else v for n, v in tensors.items()}

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        names = {n for n, _ in self.trainable}
        if set(state) != names:
            raise ValueError("checkpoint parameters do not match the model's trainable ones "
                             f"(e.g. {sorted(set(state) ^ names)[:3]}): same model config needed to resume")
        with torch.no_grad():
            for n, p in self.trainable:
                p.copy_(like(state[n].to(self.device), p))

    def optimizer_state(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        """After `load_model_state` (ZeRO-2 rebuilds its master weights from the parameters)."""
        self.optimizer.load_state_dict(state)


Single = Strategy


class DDP(Strategy):
    name = "ddp"

    def __init__(self, model: nn.Module, device: torch.device, group) -> None:
        super().__init__(model, device)
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        # find_unused_parameters: the last double-stream block's text branch (and its LoRA) feeds
        # nothing, and DDP without it silently skips the gradient all-reduce of any bucket
        # holding an unused parameter (seen here: rank gradients differed after "sync")
        self.policy = DistributedDataParallel(model, process_group=group, find_unused_parameters=True,
                                              device_ids=[device.index] if device.type == "cuda" else None)

    def micro_batch(self, last: bool):
        return contextlib.nullcontext() if last else self.policy.no_sync()


class FSDP2(Strategy):
    """Unsharded gradients accumulate over micro-batches; one reduce-scatter, on the last.

    Every expert is sharded (its own FSDP root). An expert's forward and backward are then
    collectives, so with two experts (Wan 2.2) every rank must run the same experts in every
    call, though its rows may all lie on one side of the boundary: the model's `sync_experts`
    takes the union over the ranks, and an expert a rank has no row for runs a stand-in whose
    gradient is exactly zero (`sage_fast.models.wan`)."""

    name = "fsdp2"
    collective_state = sharded = True
    cuda_graphs = False  # a graph does not hold the per-block all-gathers here: eager rollouts

    def __init__(self, model: nn.Module, device: torch.device, mesh) -> None:
        from .wrap import wrap_fsdp2  # noqa: PLC0415

        self.experts = experts(model)
        for transformer in self.experts:
            wrap_fsdp2(transformer, mesh)  # one FSDP unit per block, then the root
        if len(self.experts) > 1:
            model.sync_experts = functools.partial(_union_over_ranks, group=mesh.get_group(), device=device)
        super().__init__(model, device)  # fully_shard replaced every parameter with a sharded DTensor

    def micro_batch(self, last: bool):
        for transformer in self.experts:
            transformer.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def optimizer_state(self) -> dict:
        state = self.optimizer.state_dict()
        state["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in state["state"].items()}
        return state

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        for p in self.optimizer.state:  # the loaded moments are full tensors: shard them like their parameters
            for k, v in self.optimizer.state[p].items():
                if torch.is_tensor(v) and v.dim() > 0 and not isinstance(v, DTensor):
                    self.optimizer.state[p][k] = like(v.to(self.device), p)


class ZeRO2(Strategy):
    """The DeepSpeed engine around the policy and its optimizer. The rollout runs the plain
    module (parameters are replicated); the process group must exist (`init_distributed`)."""

    name = "deepspeed_zero2"
    collective_state = True  # the optimizer partitions are gathered

    def __init__(self, model: nn.Module, device: torch.device, group, rank: int, world_size: int,
                 grad_clip: float | None) -> None:
        super().__init__(model, device)
        self.group, self.rank, self.world_size, self.grad_clip = group, rank, world_size, grad_clip
        self.engine = None

    def make_optimizer(self, build) -> torch.optim.Optimizer:
        self.engine = _deepspeed_zero2(self.model, build([p for _, p in self.trainable]), self.grad_clip, self.device)
        self.policy, self.optimizer = self.engine, self.engine.optimizer
        return self.optimizer

    def micro_batch(self, last: bool):
        self.engine.set_gradient_accumulation_boundary(last)  # reduce-scatters every micro-batch
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # the trainer's weights already average: no 1 / accumulation-steps scaling
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, clip: float | None, *, loss_finite: bool) -> tuple[torch.Tensor, bool]:
        # DeepSpeed clips (gradient_clipping, set at construction from the same `clip`) and skips
        # the step itself when the global gradient norm is not finite (its overflow check, on in fp32 too)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float("inf") if norm is None else float(norm)), self.engine.was_step_applied()

    def optimizer_state(self) -> dict:
        local = {"base_optimizer_state": self.optimizer.optimizer.state_dict()}
        gathered = [None] * self.world_size  # every rank's partition (a collective)
        dist.all_gather_object(gathered, local, group=self.group)
        return {"deepspeed_zero2": gathered}

    def load_optimizer_state(self, state: dict) -> None:
        """This rank's partition: AdamW moments and step from the checkpoint, the fp32 master
        partition from the (already loaded) float32 parameters, which equal it exactly."""
        parts = state.get("deepspeed_zero2") if isinstance(state, dict) else None
        if parts is None:
            raise ValueError("checkpoint optimizer state was not written under dist.strategy='deepspeed_zero2': "
                             "resume with the strategy that wrote it")
        if len(parts) != self.world_size:
            raise ValueError(f"checkpoint holds {len(parts)} ZeRO-2 partitions but this run has {self.world_size} "
                             "ranks: resume a deepspeed_zero2 run with the same number of ranks")
        self.optimizer.optimizer.load_state_dict(parts[self.rank]["base_optimizer_state"])
        self.optimizer._restore_from_bit16_weights()


def _deepspeed_zero2(model, optimizer, grad_clip, device):
    """deepspeed.initialize with stage 2 and gradient clipping `grad_clip`."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    try:
        import deepspeed  # noqa: PLC0415
    except ImportError as err:
        raise ValueError("dist.strategy='deepspeed_zero2' needs the deepspeed package (pip install deepspeed); "
                         "or use dist.strategy='ddp' or 'fsdp2'") from err
    config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "gradient_clipping": float(grad_clip) if grad_clip is not None else 0.0,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def build_strategy(name: str, model: nn.Module, *, world_size: int, device: torch.device, group=None,
                   grad_mesh=None, rank: int = 0, grad_clip: float | None = None) -> Strategy:
    """The strategy `name` (dist.strategy) around `model`; one process is always `Single`.

    group: the process group of all training ranks; grad_mesh: the flattened dp x sp mesh FSDP2
    shards over (default: a 1-D mesh over `group`); grad_clip: ZeRO-2 clips inside DeepSpeed."""
    if world_size == 1:
        return Single(model, device)
    if name == "fsdp2":
        if grad_mesh is None:
            from torch.distributed.device_mesh import DeviceMesh  # noqa: PLC0415

            grad_mesh = DeviceMesh.from_group(group, device.type)
        return FSDP2(model, device, grad_mesh)
    if name == "deepspeed_zero2":
        return ZeRO2(model, device, group, rank, world_size, grad_clip)
    if name == "ddp":
        return DDP(model, device, group)
    raise ValueError(f"dist.strategy must be one of {STRATEGIES}, got {name!r}")


def parallelize(model: nn.Module, *, strategy: str, sp: int, rank: int, world_size: int, group,
                device: torch.device, grad_clip: float | None = None):
    """Lay the policy out over the ranks, once: Ulysses over the sp axis (`dist.sp` > 1, on every
    expert), then the data-parallel `strategy` over all ranks. Returns (Strategy, the data axis).

    Ranks form a (dp, sp) mesh, r = d * sp + s: the sp ranks of a group hold the same samples
    and split each video's tokens; the data axis (advantages, metrics, equalizer statistics)
    has world_size / sp ranks; gradients are averaged over all of them."""
    from .mesh import DataAxis  # noqa: PLC0415

    if world_size % sp:
        raise ValueError(f"dist.sp={sp} must divide the number of ranks ({world_size})")
    for transformer in experts(model):
        heads = transformer.config.num_attention_heads
        if heads % sp:
            raise ValueError(f"dist.sp={sp} must divide the attention heads ({heads})")
    dp_rank, dp_size = rank // sp, world_size // sp
    axis, grad_mesh = DataAxis(dp_rank, dp_size, group), None
    if sp > 1:
        from .mesh import build_mesh, flat_mesh  # noqa: PLC0415
        from .ulysses import apply_sequence_parallel  # noqa: PLC0415

        mesh = build_mesh(sp=sp, device_type=device.type)
        axis = DataAxis(dp_rank, dp_size, mesh["dp"].get_group() if dp_size > 1 else None)
        grad_mesh = flat_mesh(mesh)
        # after LoRA (the model is built): a LoRA delta on proj_out must come before the gather
        for transformer in experts(model):
            apply_sequence_parallel(transformer, mesh["sp"].get_group())
    built = build_strategy(strategy, model, world_size=world_size, device=device, group=group, grad_mesh=grad_mesh,
                           rank=rank, grad_clip=grad_clip)
    if sp > 1:
        built.cuda_graphs = False  # a graph does not hold Ulysses' all-to-alls here: eager rollouts
    return built, axis
