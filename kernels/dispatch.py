"""Pick the implementation of the fused ops once per process and device type, and log it.

Owns: the backend registry and the choice. Backends take *packed* arguments (coefficients as a
float32 [3, B] tensor on the latents' device, rng as an int64 [2] tensor (seed, offset)) and
do no user-input checks (those live in `validate.py`, called by `ops.py`).

Choice, made at the first call for a device type and then fixed:
- `SAGE_FAST_KERNEL_BACKEND` = `auto` (default) | `triton` | `cpp` | `torch`
- auto: CUDA tensors -> `triton` (when importable, else `torch` with a warning);
  CPU tensors -> `cpp`, the C++ op `sage_fast._C` of `csrc/` (when built, else `torch` with a
  warning). Triton runs on CPUs only in its interpreter, which is for tests.
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
           "TorchBackend", "TritonBackend", "CppBackend", "cpp_extension"]

log = logging.getLogger("sage_fast.kernels")

ENV_VAR = "SAGE_FAST_KERNEL_BACKEND"
CHOICES = ("auto", "triton", "cpp", "torch")


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


class CppBackend:
    """The C++ op `sage_fast._C` (`torch.ops.sage_fast_cpp`): CPU kernels, and on CUDA builds
    the CUDA twin. float64 latents (the exact-math path) and the equalizer use the reference."""

    name = "cpp"

    def __init__(self) -> None:
        if cpp_extension() is None:
            raise ValueError("backend 'cpp' needs the extension sage_fast._C, which is not built "
                             "(reinstall without SAGE_FAST_NO_EXT; see README 'Building')")
        self._ops = torch.ops.sage_fast_cpp
        self._ref = TorchBackend()

    def step(self, x, v, coef, noise, rng, sde_type, reduction):
        if x.dtype == torch.float64:
            return self._ref.step(x, v, coef, noise, rng, sde_type, reduction)
        if noise is not None and noise.dtype not in (x.dtype, torch.float32):
            noise = noise.to(torch.float32)  # what the reference computes with
        return self._ops.sde_step(x, v, coef, noise, rng, sde_type, reduction)

    def logprob(self, x, v, x_next, coef, v_ref, sde_type, reduction):
        if x.dtype == torch.float64:
            return self._ref.logprob(x, v, x_next, coef, v_ref, sde_type, reduction)
        return self._ops.sde_logprob(x, v, x_next, coef, v_ref, sde_type, reduction)

    def logprob_backward(self, x, v, x_next, coef, v_ref, grad_logp, grad_kl, sde_type, reduction):
        if x.dtype == torch.float64:
            return self._ref.logprob_backward(x, v, x_next, coef, v_ref, grad_logp, grad_kl, sde_type, reduction)
        return self._ops.sde_logprob_backward(x, v, x_next, coef, v_ref, grad_logp, grad_kl, sde_type, reduction)

    def equalizer(self, *args):
        return self._ref.equalizer(*args)


def cpp_extension():
    """The loaded extension module `sage_fast._C`, or None when it is not built."""
    try:
        from sage_fast import _C  # noqa: PLC0415  (loading it registers torch.ops.sage_fast_cpp)
    except ImportError:
        return None
    return _C


_chosen: dict[str, object] = {}
_forced: list[object] = []


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device_type: str) -> tuple[str, ...]:
    """Backends that can run on `device_type` in this process."""
    names = ["torch"]
    if cpp_extension() is not None and (device_type == "cpu" or _cpp_has_cuda()):
        names.append("cpp")
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return tuple(names)
    if device_type == "cuda" or _triton_interpreting():
        names.append("triton")
    return tuple(names)


def _cpp_has_cuda() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("sage_fast_cpp::sde_step", "CUDA")


def _make(name: str, device_type: str):
    if name == "torch":
        return TorchBackend()
    if name == "cpp":
        if name not in available_backends(device_type):
            raise ValueError(f"backend 'cpp' cannot run {device_type} tensors here: the extension sage_fast._C "
                             "is not built" + (" with its CUDA twin" if device_type == "cuda" else ""))
        return CppBackend()
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
        have = available_backends(device_type)
        preferred = "triton" if device_type == "cuda" else "cpp"
        name = preferred if preferred in have else "torch"
        if name == "torch":
            log.warning("sage_fast.kernels: %s is not available; %s tensors use the torch reference",
                        "triton" if preferred == "triton" else "the C++ op sage_fast._C", device_type)
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
