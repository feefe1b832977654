"""`sage_fast.kernels`: the fused step ops and their torch reference.

Installed as `sage_fast.kernels` (setup.py maps this folder there); never import it as a
top-level `kernels` module, a name that belongs to another PyPI package.

Public API (the trainer, the bench and outside checks call these):

- `sde_step(x, v, a, b, c, *, sde_type, noise=None, seed=None, offset=0, reduction="mean")`
  -> `(x_next, logp)`
- `sde_logprob(x, v, x_next, a, b, c, *, sde_type, v_ref=None, reduction="mean")`
  -> `(logp, kl, grad_norm)`, differentiable w.r.t. v
- `equalizer_update(grad_norm, step_index, ema, count, *, momentum, clamp)` -> scales
- `reference`: the same functions in plain torch (the oracle)
- `dispatch`: which implementation runs (`backend_for`, `use_backend`, `SAGE_FAST_KERNEL_BACKEND`)
"""

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
