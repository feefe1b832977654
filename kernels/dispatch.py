"""Pick the implementation of the fused ops once per process and device type, and log it.

Owns: the backend registry and the choice. Backends take *packed* arguments (coefficients as a
float32 [3, B] tensor on the latents' device, rng as an int64 [2] tensor (seed, offset)) and
do no user-input checks (those live in `validate.py`, called by `ops.py`).

Choice, made at the first call for a device type and then fixed:
- `SAGE_FAST_KERNEL_BACKEND` = `auto` (default) | `triton` | `torch`
- auto: CUDA tensors -> `triton` (when importable, else `torch` with a warning);
  CPU tensors -> `torch` (Triton runs on CPUs only in its interpreter, which is for tests).
  The C++ op of `csrc/` joins here as `cpp` for CPU tensors when it is built.
- `use_backend(name)` forces a backend inside a `with` block (tests, the bench).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import torch

from . import reference
from .philox import philox_normal

__all__ = ["ENV_VAR", "CHOICES", "backend_for", "use_backend", "available_backends",
           "TorchBackend", "TritonBackend"]

log = logging.getLogger("sage_fast.kernels")

ENV_VAR = "SAGE_FAST_KERNEL_BACKEND"
CHOICES = ("auto", "triton", "torch")


class TorchBackend:
    """The plain-torch reference behind the packed interface (CPU default, any device)."""

    name = "torch"

    def step(self, x, v, coef, noise, rng, sde_type, reduction):
        a, b, c = coef.unbind(0)
        if noise is None:
            seed, offset = (int(t) for t in rng.tolist())  # a sync on CUDA: fallback path only
            noise = philox_normal(x.numel(), seed, offset, x.device).view_as(x)
        return reference.step_math(x, v, a, b, c, noise, sde_type, reduction)

    def logprob(self, x, v, x_next, coef, v_ref, sde_type, reduction):
        a, b, c = coef.unbind(0)
        return reference.logprob_math(x, v, x_next, a, b, c, v_ref, sde_type, reduction)

    def logprob_backward(self, x, v, x_next, coef, v_ref, grad_logp, grad_kl, sde_type, reduction):
        a, b, c = coef.unbind(0)
        return reference.sde_logprob_backward(x, v, x_next, a, b, c, v_ref, grad_logp, grad_kl,
                                              sde_type=sde_type, reduction=reduction)

    def equalizer(self, grad_norm, step_index, ema, count, momentum, s_min, s_max):
        return reference.equalizer_update(grad_norm, step_index, ema, count, momentum=momentum,
                                          clamp=(s_min, s_max))


class TritonBackend:
    """The fused Triton kernels (`sde.py`, `equalizer.py`), imported on first use."""

    name = "triton"

    def __init__(self) -> None:
        from . import equalizer, sde  # noqa: PLC0415  (import triton only when chosen)

        self._sde, self._eq = sde, equalizer

    def step(self, x, v, coef, noise, rng, sde_type, reduction):
        return self._sde.sde_step_packed(x, v, coef, noise, rng, sde_type, reduction)

    def logprob(self, x, v, x_next, coef, v_ref, sde_type, reduction):
        return self._sde.sde_logprob_packed(x, v, x_next, coef, v_ref, sde_type, reduction)

    def logprob_backward(self, x, v, x_next, coef, v_ref, grad_logp, grad_kl, sde_type, reduction):
        return self._sde.sde_logprob_backward_packed(x, v, x_next, coef, v_ref, grad_logp, grad_kl,
                                                     sde_type, reduction)

    def equalizer(self, grad_norm, step_index, ema, count, momentum, s_min, s_max):
        return self._eq.equalizer_update_triton(grad_norm, step_index, ema, count, momentum,
                                                s_min, s_max)


_chosen: dict[str, object] = {}
_forced: list[object] = []


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device_type: str) -> tuple[str, ...]:
    """Backends that can run on `device_type` in this process."""
    names = ["torch"]
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return tuple(names)
    if device_type == "cuda" or _triton_interpreting():
        names.append("triton")
    return tuple(names)


def _make(name: str, device_type: str):
    if name == "torch":
        return TorchBackend()
    if name not in available_backends(device_type):
        raise ValueError(
            f"backend 'triton' cannot run {device_type} tensors here: it needs a CUDA device, or "
            "TRITON_INTERPRET=1 set before sage_fast.kernels is first used (tests only), and "
            "an importable triton"
        )
    return TritonBackend()


def _choose(device_type: str):
    want = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if want not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {CHOICES}, got {want!r}")
    if want == "auto":
        name = "triton" if device_type == "cuda" and "triton" in available_backends("cuda") else "torch"
        if device_type == "cuda" and name == "torch":
            log.warning("sage_fast.kernels: triton is not importable; CUDA tensors use the torch reference")
    else:
        name = want
    backend = _make(name, device_type)
    log.info("sage_fast.kernels: %s tensors -> %s backend (%s=%s)", device_type, name, ENV_VAR, want)
    return backend


def backend_for(device: torch.device):
    """The backend for tensors on `device`: chosen at the first call, then a dict lookup."""
    if _forced:
        return _forced[-1]
    backend = _chosen.get(device.type)
    if backend is None:
        backend = _chosen[device.type] = _choose(device.type)
    return backend


@contextlib.contextmanager
def use_backend(name: str, device_type: str = "cpu") -> Iterator[object]:
    """Force `name` for every device inside the block (tests and the bench compare backends)."""
    if name not in CHOICES[1:]:
        raise ValueError(f"backend must be one of {CHOICES[1:]}, got {name!r}")
    backend = _make(name, device_type)
    _forced.append(backend)
    try:
        yield backend
    finally:
        _forced.pop()
