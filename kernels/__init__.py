"""`sage_fast.kernels`: the fused step ops, their three implementations and the torch reference.

`ops.py` checks the arguments (`validate.py`), packs them and calls the `torch.library` ops, which
`dispatch.py` routes to one implementation per device type: Triton (`sde.py`, `equalizer.py`),
the C++ op `sage_fast._C` (`csrc/`: CPU, and the CUDA twin) or the torch reference
(`reference.py`). `philox.py` defines the noise stream they all draw.

Installed as `sage_fast.kernels` (setup.py maps this folder there); import it by that name. A
top-level `kernels` import (a name that belongs to another PyPI package, probed by transformers
when the repository root is on sys.path) is made an alias of `sage_fast.kernels` and its loaded
submodules, so the ops are registered once.

Public API (the trainer, the bench and outside checks call these):

- `sde_step(x, v, a, b, c, *, sde_type, noise=None, seed=None, offset=0, reduction="mean")`
  -> `(x_next, logp)`
- `sde_logprob(x, v, x_next, a, b, c, *, sde_type, v_ref=None, reduction="mean")`
  -> `(logp, kl, grad_norm)`, differentiable w.r.t. v
- `equalizer_update(grad_norm, step_index, ema, count, *, momentum, clamp)` -> scales
- `pack_coefficients`, `pack_rng`: the packed (a, b, c) [3, B] and (seed, offset) [2] tensors
  that `torch.ops.sage_fast.*` take (the CUDA-graph path calls those ops directly)
- `philox_normal(numel, seed, offset, device)`, `PHILOX_STREAM`: the noise stream in plain torch
- `reference`: the same functions in plain torch (the oracle)
- `dispatch`: which implementation runs (`backend_for`, `use_backend`, `SAGE_FAST_KERNEL_BACKEND`)
"""

import sys as _sys

if __name__ != "sage_fast.kernels":
    # Imported as a top-level `kernels` (a package probe, e.g. transformers', with the repository
    # root on sys.path): be `sage_fast.kernels` itself, so the torch.library ops are registered
    # once and `dispatch.use_backend` steers the only copy.
    import importlib as _importlib

    _sys.modules[__name__] = _importlib.import_module("sage_fast.kernels")
    for _name, _module in list(_sys.modules.items()):  # and its loaded submodules: `import kernels.dispatch` too
        if _name.startswith("sage_fast.kernels."):
            _sys.modules[__name__ + _name[len("sage_fast.kernels"):]] = _module
else:
    from . import dispatch, reference
    from .ops import equalizer_update, pack_coefficients, pack_rng, sde_logprob, sde_step
    from .philox import PHILOX_STREAM, philox_normal

__all__ = [
    "sde_step",
    "sde_logprob",
    "equalizer_update",
    "pack_coefficients",
    "pack_rng",
    "philox_normal",
    "PHILOX_STREAM",
    "reference",
    "dispatch",
]
