"""The world's base model as pretraining builds it: a tiny HunyuanVideo-1.5-class transformer.

Owns: its architecture (`model_overrides` of the `tiny` config for the world's latents), its
initialisation for training from scratch (`adaln_zero_init_`), the parameters it may keep frozen
(`freeze_byt5_hidden_`), its checkpoint files (`save_checkpoint`: a diffusers folder that
`sage_fast.models.load_transformer` reads), and the check that a device computes its velocity
as the CPU does (`check_device`, `python -m sage_fast.world.pretrain --check-device`).

Leaves to others: the training loop (`pretrain`), loading the shipped checkpoint and its
evaluation (`evaluate`), the adapter itself (`sage_fast.models`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from sage_fast.models import AUTOCAST_DTYPES, VelocityModelConfig, build_velocity_model

from . import codec
from .prompts import WorldTextEncoder, describe_scenes
from .render import render, sample_scenes

__all__ = ["DEFAULT_CHECKPOINT", "CHECK_TOLERANCE", "adaln_zero_init_", "check_device", "freeze_byt5_hidden_",
           "model_overrides", "save_checkpoint"]

#: The shipped base model's folder: where pretraining writes by default and what evaluation and
#: the `tiny_world` recipe load.
DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "base_model"


def model_overrides(hidden_heads: int, head_dim: int, layers: int, mlp_ratio: float, patch: int = codec.PATCH,
                    temporal: int = codec.TEMPORAL) -> dict:
    """Architecture overrides of the `tiny` config for the world's latents (3 p^2 tau channels)."""
    C = codec.latent_channels(patch, temporal)
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 (3-D RoPE), got {head_dim}")
    t_axis = head_dim // 4 if (head_dim // 4) % 2 == 0 else head_dim // 4 - 1
    hw = head_dim - t_axis
    if hw % 4:  # two even spatial axes
        t_axis += hw % 4
        hw = head_dim - t_axis
    return dict(in_channels=2 * C + 1, out_channels=C, num_attention_heads=hidden_heads,
                attention_head_dim=head_dim, num_layers=layers, mlp_ratio=mlp_ratio,
                rope_axes_dim=(t_axis, hw // 2, hw // 2))


def save_checkpoint(transformer, out: Path, world: dict) -> None:
    """config.json + float16 safetensors (diffusers folder layout) + world.json."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    transformer.save_config(str(out))
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in transformer.state_dict().items()}
    save_file(state, str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (out / "world.json").write_text(json.dumps(world, indent=2) + "\n")


def adaln_zero_init_(transformer: nn.Module) -> nn.Module:
    """DiT's adaLN-Zero initialisation, in place, for training from scratch (Peebles & Xie 2023).

    Zeroes the weight and bias of every modulation layer that produces a residual gate (the
    double-stream blocks' `norm1` / `norm1_context`, the token refiner's `norm_out`), the final
    modulation `norm_out` and `proj_out`: every block starts as the identity and the velocity
    as 0, so early updates shape one residual path at a time instead of fighting O(1) random
    outputs. The class itself zero-initialises nothing (it expects pretrained weights). Loaded
    checkpoints must not be passed through this.
    """
    names = []
    for name, module in transformer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_modulation = leaf == "linear" and name.rsplit(".", 2)[-2:-1] in (["norm1"], ["norm1_context"], ["norm_out"])
        if is_modulation or name == "proj_out":
            if not isinstance(module, nn.Linear):
                raise TypeError(f"adaln_zero_init_: expected nn.Linear at {name}, got {type(module).__name__}")
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
            names.append(name)
    if "proj_out" not in names or not any(n.endswith("norm1.linear") for n in names):
        raise ValueError("adaln_zero_init_ expects a HunyuanVideo-1.5 transformer (proj_out, blocks' norm1.linear)")
    return transformer


def freeze_byt5_hidden_(transformer) -> list[str]:
    """Stop training the ByT5 projection's input norm and its two 2048-wide layers (a fixed random
    feature map of the world's second text stream; `linear_3` still learns to read it). The class
    fixes that width at 2048 whatever the model's, so at the world's size these layers hold two
    thirds of the parameters and, with their gradients, ~13% of a CPU training step. Returns the
    names of the frozen parameters."""
    projection = transformer.context_embedder_2
    frozen = []
    for name in ("norm", "linear_1", "linear_2"):
        module = getattr(projection, name)
        module.requires_grad_(False)
        frozen += [f"context_embedder_2.{name}.{n}" for n, _ in module.named_parameters()]
    return frozen


#: largest relative velocity difference `check_device` accepts, by autocast dtype
CHECK_TOLERANCE = {"none": 1e-3, "bfloat16": 5e-2}


def check_device(device: str, autocast: str = "none", batch: int = 16, seed: int = 0) -> float:
    """||v_device - v_cpu|| / ||v_cpu||: one batch of world velocities (random-init model of the
    shipped shape, world prompts with some dropped, sigma in [0.2, 1], CFG 3) computed by the
    training path on `device` under `autocast` (batched text order) against the class's own
    forward in float32 on the CPU. A quick check that a machine computes what the CPU does."""
    cfg = VelocityModelConfig(architecture="tiny", finetune="full", autocast_dtype="none", attention_backend="sdpa",
                              architecture_overrides=model_overrides(4, 32, 3, 2.0), prediction="sample")
    ref = build_velocity_model(cfg, seed=seed).eval()
    scene = sample_scenes(batch, seed)
    prompts = ["" if i % 3 == 0 else p for i, p in enumerate(describe_scenes(scene))]
    g = torch.Generator().manual_seed(seed)
    x0 = codec.encode(render(scene))
    sigma = 0.2 + 0.8 * torch.rand(batch, generator=g)
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
    encoder = WorldTextEncoder.for_model(ref.transformer.config)
    with torch.no_grad():
        v_ref = ref.velocity(xt, 1000.0 * sigma, encoder.conditioning(prompts), cfg_scale=3.0)
        model = copy.deepcopy(ref).to(device)
        model.autocast_dtype, model.batched_text = AUTOCAST_DTYPES[autocast], True
        encoder_dev = WorldTextEncoder.for_model(ref.transformer.config, device=device)
        v = model.velocity(xt.to(device), (1000.0 * sigma).to(device), encoder_dev.conditioning(prompts),
                           cfg_scale=3.0).cpu()
    return float((v - v_ref).norm() / v_ref.norm())
