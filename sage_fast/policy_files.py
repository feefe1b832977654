"""The files of an exported policy: its weights with every LoRA delta merged, in diffusers' layout,
and the LoRA adapter alone, in peft's; and which transformers of a policy are written.

    parts, base_experts = exported_parts(policy, cfg)  # [(subfolder, transformer)], the experts left out
    state = merged_state_dict(transformer)        # plain class names, float32 CPU, merged in float64
    files = write_weights(state, folder, max_shard_bytes)  # diffusion_pytorch_model*.safetensors (+ index)
    lora = write_adapter(transformer, folder / "adapter", base)  # adapter_config.json + adapter_model.safetensors

Leaves to others: which policy, which folder, world.json and export.json (`sage_fast.export`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["exported_parts", "lora_layers", "merged_state_dict", "write_weights", "write_adapter"]

_WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
#: PeftModel.save_pretrained's key prefix (PeftModel -> LoraModel -> the model)
_PEFT_PREFIX = "base_model.model."


def lora_layers(transformer: nn.Module) -> dict[str, nn.Module]:
    """The transformer's peft LoRA layers by module name ({} for a fully fine-tuned one)."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    return {name: m for name, m in transformer.named_modules() if isinstance(m, LoraLayer)}


def exported_parts(policy, cfg) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The diffusers transformer(s) to write, as (subfolder, transformer) with "" for OUT itself,
    and the experts left out, from a Trainer, a VelocityModel, a WanVelocityModel or a peft
    PeftModel. A Wan policy writes each expert the run trained into the pipeline's subfolder name
    (cfg.model.experts; without a cfg, those with LoRA or trainable weights, else all); a frozen
    expert is the base's own."""
    from sage_fast.models import VelocityModel, WanVelocityModel  # noqa: PLC0415
    from sage_fast.trainer import Trainer  # noqa: PLC0415

    if isinstance(policy, Trainer):
        policy = policy.model
    if isinstance(policy, WanVelocityModel):
        experts = [("transformer", policy.transformer)]
        if policy.transformer_2 is not None:
            experts.append(("transformer_2", policy.transformer_2))
        if cfg is not None:
            trained = {"both": ("transformer", "transformer_2"), "high": ("transformer",),
                       "low": ("transformer_2",)}[cfg.model.experts]
        else:
            trained = tuple(n for n, t in experts if lora_layers(t) or any(p.requires_grad for p in t.parameters()))
            trained = trained or tuple(n for n, _ in experts)
        return [(n, t) for n, t in experts if n in trained], [n for n, _ in experts if n not in trained]
    if isinstance(policy, VelocityModel):
        policy = policy.transformer
    if hasattr(policy, "get_base_model"):  # peft.PeftModel (an adapter loaded with PeftModel.from_pretrained)
        policy = policy.get_base_model()
    if not isinstance(policy, nn.Module) or not hasattr(policy, "config"):
        raise ValueError(f"export_policy takes a Trainer, a VelocityModel, a WanVelocityModel or a diffusers "
                         f"transformer, got {type(policy).__name__}")
    return [("", policy)], []


def merged_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's state dict with every active LoRA delta merged into its base weight,
    under the plain class's names (no peft key): W' = W + get_delta_weight() (= (alpha / r) B A),
    summed in float64, returned as float32 on the CPU. The module is left untouched; tensors of
    unmerged entries are the module's own (no copy for float32 CPU weights)."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    sharded = [n for n, p in transformer.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(f"the policy's parameters are sharded (FSDP2, e.g. {sharded[0]}): export from a checkpoint "
                         "with export_run / python -m sage_fast.export, which hold full tensors")
    layers = lora_layers(transformer)
    state = transformer.state_dict()
    out: dict[str, torch.Tensor] = {}
    lora_prefixes = tuple(f"{name}." for name in layers)
    for key, t in state.items():
        if key.startswith(lora_prefixes):
            prefix = next(p for p in lora_prefixes if key.startswith(p))
            rest = key[len(prefix):]
            if not rest.startswith("base_layer."):
                continue  # lora_A / lora_B / ...: merged below
            key = prefix + rest[len("base_layer."):]
        out[key] = t.detach().to("cpu", torch.float32)
    with torch.no_grad():
        for name, layer in layers.items():
            if layer.merged:
                raise ValueError(f"LoRA layer {name} is already merged into its base weight (peft merge_adapter): "
                                 "unmerge it first, its delta would be added twice")
            if layer.disable_adapters:
                raise ValueError(f"LoRA layer {name} has its adapters disabled: the policy is the base model, export "
                                 "that instead")
            adapters = [a for a in layer.active_adapters if a in layer.lora_A]
            for adapter in adapters:
                if layer.use_dora.get(adapter, False) or getattr(layer, "lora_bias", {}).get(adapter, False):
                    raise ValueError(f"LoRA layer {name}: DoRA and LoRA biases are not merged by sage_fast.export "
                                     "(apply_lora builds neither)")
            if adapters:
                weight = out[f"{name}.weight"].to(torch.float64)
                for adapter in adapters:
                    weight = weight + layer.get_delta_weight(adapter).detach().to("cpu", torch.float64)
                out[f"{name}.weight"] = weight.to(torch.float32)
    _check_plain_keys(transformer, out)
    return out


def _check_plain_keys(transformer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The merged state dict must be exactly the plain class's (built on the meta device)."""
    init_config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in type(transformer).from_config(init_config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert got == expected, (f"merged state dict differs from the plain class: missing "
                             f"{sorted(set(expected) - set(got))[:3]}, extra {sorted(set(got) - set(expected))[:3]}")


def write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """diffusers' layout: one diffusion_pytorch_model.safetensors, or shards and their index."""
    from huggingface_hub import split_torch_state_dict_into_shards  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    split = split_torch_state_dict_into_shards(state, filename_pattern=_WEIGHTS_PATTERN, max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (folder / _WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


def write_adapter(transformer: nn.Module, folder: Path, base: str | None) -> dict:
    """The LoRA adapter alone, as `PeftModel.save_pretrained` writes it (keys "base_model.model.<module>.lora_A.weight",
    adapter_config.json), so `PeftModel.from_pretrained(base_transformer, folder)` restores the policy."""
    from peft.utils import get_peft_model_state_dict  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    names = list(transformer.peft_config)
    if len(names) != 1:
        raise ValueError(f"the policy carries {len(names)} LoRA adapters {names}; sage_fast trains one (apply_lora)")
    config = copy.deepcopy(transformer.peft_config[names[0]])
    config.base_model_name_or_path = base
    config.inference_mode = True
    weights = get_peft_model_state_dict(transformer, adapter_name=names[0])
    folder.mkdir()
    save_file({_PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    return {"rank": config.r, "alpha": config.lora_alpha, "target_modules": config.target_modules,
            "tensors": len(weights)}
