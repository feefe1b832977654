"""HunyuanVideo-1.5's transformer: a random init by architecture name (`build_transformer`) or
strict loading from local files (`load_transformer`, a model or pipeline folder or one
.safetensors file; nothing is downloaded).

Leaves to others: the config and building the policy around it (`policy`), the velocity call
(`velocity`, `hunyuan_forward`), the architectures by name (`configs`), the pipeline's text
encoders and VAE (`hunyuan_pipeline`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from .configs import architecture
from .velocity import PREDICTION_KEY

__all__ = ["CLASS_NAME", "build_transformer", "load_transformer"]

log = logging.getLogger("sage_fast.models")

CLASS_NAME = "HunyuanVideo15Transformer3DModel"


def _transformer_class():
    from diffusers import HunyuanVideo15Transformer3DModel  # noqa: PLC0415 (heavy import, on use)

    return HunyuanVideo15Transformer3DModel


def build_transformer(name: str = "tiny", *, seed: int | None = 0, device="cpu", **overrides) -> nn.Module:
    """A randomly initialised transformer of architecture `name` (float32, fixed `seed`).

    Note: the class zero-initialises nothing; with random weights the output is O(1).
    """
    config = architecture(name, **overrides)
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        model = _transformer_class()(**config)
    return model.to(device)  # float32: the class builds its parameters in the default dtype


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from e


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    single = folder / "diffusion_pytorch_model.safetensors"
    if index.exists():
        shards = sorted(set(_read_json(index, "checkpoint index")["weight_map"].values()))
        files = [folder / s for s in shards]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"checkpoint {folder}: shards named in {index.name} are missing: {missing}")
        return files
    if single.exists():
        return [single]
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"checkpoint folder {folder} has no diffusion_pytorch_model.safetensors "
                            f"(or its .index.json); it holds {found}")


def load_transformer(path: str | Path, config: dict | str | Path | None = None, device="cpu") -> nn.Module:
    """Load a HunyuanVideo-1.5 transformer from local files only, strictly, as float32.

    path: a diffusers model folder (config.json + diffusion_pytorch_model.safetensors or a
    sharded index), a pipeline folder holding `transformer/`, or one .safetensors file
    (then `config`, a dict or a config.json path, defaults to the config.json beside it).
    Raises FileNotFoundError for a missing path or weights, ValueError for a config of another
    class, and ValueError listing missing, unexpected and mis-shaped tensors when the weights
    do not match the config. Nothing is downloaded: hub ids are not accepted.
    """
    from safetensors import safe_open  # noqa: PLC0415

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (local folders and .safetensors files "
                                "only; hub ids are never downloaded)")
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
            path = path / "transformer"
        files = _weight_files(path)
        config = path / "config.json" if config is None else config
    else:
        if path.suffix != ".safetensors":
            raise ValueError(f"checkpoint file must be .safetensors, got {path.name!r}")
        files = [path]
        if config is None:
            config = path.parent / "config.json"
            if not config.exists():
                raise FileNotFoundError(f"checkpoint {path} is a bare .safetensors file: pass its config "
                                        f"(dict or config.json path); none found at {config}")
    if not isinstance(config, dict):
        config = _read_json(Path(config), "checkpoint config")
    class_name = config.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise ValueError(f"checkpoint config is for {class_name!r}, expected {CLASS_NAME!r}")
    cls = _transformer_class()
    init_config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(init_config)
    expected = model.state_dict()

    state = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        def head(items):
            return f"{len(items)} {items[:5]}{' ...' if len(items) > 5 else ''}"
        raise ValueError(f"checkpoint {path} does not match its config: missing {head(missing)}; "
                         f"unexpected {head(unexpected)}; shape mismatches {head(mismatched)}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
    if PREDICTION_KEY in config:
        model.register_to_config(**{PREDICTION_KEY: config[PREDICTION_KEY]})  # VelocityModel validates it
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftover, f"tensors not loaded: {leftover}"
    log.info("loaded %s from %s (%d tensors)", CLASS_NAME, path, len(state))
    return model.to(device)
