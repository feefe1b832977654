"""Typed configuration: dataclass trees, named recipes, dotted command-line overrides.

Owns the machinery (the trainer's config tree and its recipes live in `train_config.py`):

- a config is a tree of dataclasses whose fields carry a docstring and are validated in
  `__post_init__` with `ValueError`s that name the field and the allowed values;
- a recipe is a function returning a full config, registered by name (`@recipe("tiny_world")`);
- the command line picks a recipe and overrides fields by dotted path:
  `--recipe tiny_world sampler.sde_type=flow_grpo train.lr=3e-5 sampler.sde_window=2,8`;
  values are parsed by the field's annotation (bool, int, float, str, None for Optional,
  tuples as `a,b`, dicts and lists as JSON), and the result is validated again;
- `to_dict` / `from_dict` round-trip a config through JSON (the resolved config is saved next
  to every run, and a resumed run checks it against the saved one).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Callable, TypeVar

__all__ = ["recipe", "recipes", "get_recipe", "apply_overrides", "to_dict", "from_dict", "field_help"]

T = TypeVar("T")
_RECIPES: dict[str, Callable[[], Any]] = {}


def recipe(name: str):
    """Register `fn() -> config` as the recipe `name`."""
    def register(fn):
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} is registered twice")
        _RECIPES[name] = fn
        return fn
    return register


def recipes() -> tuple[str, ...]:
    return tuple(sorted(_RECIPES))


def get_recipe(name: str):
    if name not in _RECIPES:
        raise ValueError(f"recipe must be one of {recipes()}, got {name!r}")
    return _RECIPES[name]()


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else typing.Union[tuple(args)]
    return False, tp


def _parse(text: str, tp, path: str):
    optional, inner = _is_optional(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if inner is str:
            return text
        if origin is tuple or inner is tuple:
            parts = json.loads(text) if text.strip().startswith("[") else [p for p in text.split(",") if p.strip()]
            args = typing.get_args(inner)
            if args and args[-1] is not Ellipsis:
                if len(parts) != len(args):
                    raise ValueError
                return tuple(_parse(str(p), a, path) for p, a in zip(parts, args))
            elem = args[0] if args else str
            return tuple(_parse(str(p), elem, path) for p in parts)
        if origin in (list, dict) or inner in (list, dict):
            value = json.loads(text)
            if not isinstance(value, origin or inner):
                raise ValueError
            return value
    except (ValueError, json.JSONDecodeError):
        pass
    else:
        if dataclasses.is_dataclass(inner):
            raise ValueError(f"{path} is a section; set its fields ({path}.<field>=...)")
        return text
    raise ValueError(f"{path}: cannot read {text!r} as {getattr(tp, '__name__', tp)}")


def apply_overrides(config: T, overrides: list[str]) -> T:
    """A copy of `config` with `path=value` overrides applied and every section re-validated."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        path, text = item.split("=", 1)
        names = path.strip().split(".")
        config = _set(config, names, text, path.strip())
    return config


def _set(node, names: list[str], text: str, full: str):
    if not dataclasses.is_dataclass(node):
        raise ValueError(f"{full}: {'.'.join(names)} is not inside a config section")
    fields = {f.name: f for f in dataclasses.fields(node)}
    name = names[0]
    if name not in fields:
        raise ValueError(f"{full}: unknown field {name!r}; one of {sorted(fields)}")
    if len(names) == 1:
        value = _parse(text, _hints(type(node))[name], full)
    else:
        value = _set(getattr(node, name), names[1:], text, full)
    return dataclasses.replace(node, **{name: value})  # re-runs __post_init__: validation


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a config tree of type `cls` from `to_dict` output (JSON lists become tuples)."""
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        _, tp = _is_optional(hints[name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        elif (typing.get_origin(tp) is tuple or tp is tuple) and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def field_help(cls, prefix: str = "") -> list[str]:
    """`path: type = default  docstring` lines for every leaf field (for --help)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for prev, node in zip(body, body[1:]):
            if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                docs[prev.target.id] = " ".join(str(node.value.value).split())
    except (OSError, TypeError, IndexError):
        pass
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        _, inner = _is_optional(tp)
        if dataclasses.is_dataclass(inner):
            lines += field_help(inner, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        lines.append(f"{prefix}{f.name} = {default!r}  {docs.get(f.name, '')}".rstrip())
    return lines
