"""The shifted sigma schedule and the per-step affine coefficients of every SDE type.

Owns: docs/SPEC.md sections 1, 2 and 4 (analytic part) as host-side float64 math. Every sampler step
of every SDE type is one affine map plus Gaussian noise,

    mean   = a * x + b * v
    x_next = mean + c * eps,    eps ~ N(0, I)

and this module computes the three per-sample scalars (a, b, c). The kernels
(`sage_fast.kernels`) consume them and never see sigma, eta or the SDE type's formula, except
for the `cps` log-prob convention.

Leaves to others: the kernels (one pass over the latent), the empirical equalizer (EMA of
measured gradient norms, `sage_fast.kernels.equalizer`), the GRPO loss.

Why float64 on the host: the coefficients are scalars per sample (a few hundred flops per
rollout step) and the sage log term `log((1 - sigma') / (1 - sigma))` cancels catastrophically
near sigma = 1 in float32 (1 - 0.98958 keeps only ~3 significant digits of 7).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SDE_TYPES",
    "DETERMINISTIC_TYPES",
    "STOCHASTIC_TYPES",
    "GAUSSIAN_TYPES",
    "shift_sigma",
    "sigmas",
    "step_coefficients",
    "equalizer_scales",
    "check_sde_type",
]

#: Every step type the engine knows. `ode` is the plain Euler step (c = 0) used outside an
#: SDE window (MixGRPO-style); the others are the stochastic samplers of docs/SPEC.md section 2.
SDE_TYPES = ("sage_grpo", "flow_grpo", "dance_grpo", "cps", "ode")
#: Types whose log-prob is the full Gaussian log-density (cps drops constants and variance).
GAUSSIAN_TYPES = ("sage_grpo", "flow_grpo", "dance_grpo")
DETERMINISTIC_TYPES = ("ode",)
#: The stochastic samplers (what `sampler.sde_type` may be and the paper compares), in SDE_TYPES order.
STOCHASTIC_TYPES = tuple(t for t in SDE_TYPES if t not in DETERMINISTIC_TYPES)

# docs/SPEC.md defect 9: the authors clamp sigma at 1 - 3e-3; we shrink the margin to (1 - sigma')/2
# when sigma' is closer to 1 than 6e-3, which keeps the log term positive.
_SAGE_CLAMP = 3e-3


def check_sde_type(sde_type: str) -> str:
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    return sde_type


def _check_eta(eta: float) -> float:
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    return eta


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The schedule's shift map `s * u / (1 + (s - 1) * u)` (docs/SPEC.md section 1), elementwise, same dtype."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """The shifted flow-matching schedule, sigma_0 = 1 down to sigma_N = 0.

    `sigma_i = s * u_i / (1 + (s - 1) * u_i)` with `u_i = 1 - i / N` (docs/SPEC.md section 1).

    Returns a float64 CPU tensor of shape [num_steps + 1], strictly decreasing.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    shift = float(shift)
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    u = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    out = shift_sigma(u, shift)
    out[0], out[-1] = 1.0, 0.0  # exact endpoints whatever the rounding of the formula
    return out


def _check_schedule(sigmas_n1: torch.Tensor) -> torch.Tensor:
    if not isinstance(sigmas_n1, torch.Tensor) or sigmas_n1.dim() != 1 or sigmas_n1.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor of num_steps + 1 >= 2 values (see sigmas())")
    s = sigmas_n1.detach().to("cpu", torch.float64)
    if not bool(torch.all(s[1:] < s[:-1])) or s[0] > 1 or s[-1] < 0:
        raise ValueError("sigmas must decrease strictly from <= 1 to >= 0")
    return s


def _check_steps(step_index: torch.Tensor | int, num_steps: int) -> torch.Tensor:
    if isinstance(step_index, int) and not isinstance(step_index, bool):
        step_index = torch.tensor([step_index])
    if not isinstance(step_index, torch.Tensor) or step_index.dtype not in (
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8
    ):
        raise ValueError("step_index must be an integer tensor [B] (or an int)")
    step_index = step_index.detach().to("cpu", torch.int64).reshape(-1)
    if step_index.numel() == 0:
        raise ValueError("step_index must hold at least one step")
    lo, hi = int(step_index.min()), int(step_index.max())
    if lo < 0 or hi >= num_steps:
        raise ValueError(
            f"step_index must lie in [0, {num_steps - 1}] for a {num_steps}-step schedule, "
            f"got values in [{lo}, {hi}]"
        )
    return step_index


def _variance(sde_type: str, sigma, sigma_next, eta: float, sigma_1: float) -> torch.Tensor:
    """Per-step variance V of the three score-template types (docs/SPEC.md section 2 table)."""
    delta = sigma - sigma_next
    if sde_type == "dance_grpo":
        return eta**2 * delta
    if sde_type == "flow_grpo":
        # Left-point (Euler) area of eta^2 * sigma / (1 - sigma); at sigma == 1 the authors
        # evaluate the denominator at sigma_1 instead.
        sigma_tilde = torch.where(sigma == 1.0, torch.full_like(sigma, sigma_1), sigma)
        return eta**2 * sigma / (1.0 - sigma_tilde) * delta
    # sage_grpo: the exact integral of the same coefficient over [sigma', sigma].
    e = torch.clamp((1.0 - sigma_next) / 2.0, max=_SAGE_CLAMP)
    sigma_c = torch.minimum(sigma, 1.0 - e)
    return eta**2 * (torch.log((1.0 - sigma_next) / (1.0 - sigma_c)) - delta)


def step_coefficients(
    sigmas: torch.Tensor,
    step_index: torch.Tensor | int,
    sde_type: str,
    eta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (a, b, c) of step `step_index` (from sigma_i to sigma_{i+1}).

    Args:
        sigmas: the schedule, [num_steps + 1], as from `sigmas()`.
        step_index: LongTensor [B]; samples may sit at different steps.
        sde_type: one of `SDE_TYPES`.
        eta: noise level >= 0 (eta = 0 makes every type deterministic, c = 0).

    Returns:
        (a, b, c), each a float64 CPU tensor [B]: `mean = a*x + b*v`, `x_next = mean + c*eps`.
        c >= 0; c == 0 marks a deterministic step (no log-prob, never trained).
    """
    check_sde_type(sde_type)
    eta = _check_eta(eta)
    s = _check_schedule(sigmas)
    idx = _check_steps(step_index, s.numel() - 1)
    sigma, sigma_next = s[idx], s[idx + 1]
    dt = sigma_next - sigma  # < 0: sampling runs sigma 1 -> 0

    if sde_type == "ode" or eta == 0.0:
        return torch.ones_like(sigma), dt, torch.zeros_like(sigma)
    if sde_type == "cps":
        c = sigma_next * math.sin(eta * math.pi / 2.0)
        r = torch.sqrt(torch.clamp(sigma_next**2 - c**2, min=0.0))
        a = (1.0 - sigma_next) + r
        b = -sigma * (1.0 - sigma_next) + (1.0 - sigma) * r
        return a, b, c
    var = _variance(sde_type, sigma, sigma_next, eta, float(s[1]))
    if not bool(torch.all(torch.isfinite(var) & (var >= 0))):  # invariant of the formulas above
        raise AssertionError(f"non-finite or negative step variance for {sde_type}: {var}")
    # mean = x + v*dt + 0.5*V*score(x), score(x) = -(x + (1 - sigma)*v) / sigma
    a = 1.0 - var / (2.0 * sigma)
    b = dt - var * (1.0 - sigma) / (2.0 * sigma)
    return a, b, torch.sqrt(var)


def equalizer_scales(
    sigmas: torch.Tensor,
    sde_type: str,
    eta: float = 0.5,
    clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Analytic temporal equalizer: s_i = median_j(g_j) / g_i with g_i = |b_i| / c_i.

    Faithful to the authors: the median runs over the schedule's steps, the lower median for
    an even count, and a non-finite or non-positive g becomes 1. Deterministic steps (c == 0:
    `ode`, eta = 0, the last `cps` step) are never trained; they are left out of the median and
    get scale 1. `clamp=(s_min, s_max)` bounds the scales (the authors' are unclipped and span
    ~150x for sage at the defaults).

    Returns a float64 CPU tensor [num_steps].
    """
    check_sde_type(sde_type)
    if clamp is not None:
        if len(clamp) != 2 or not (0 < float(clamp[0]) <= float(clamp[1])):
            raise ValueError(f"clamp must be (s_min, s_max) with 0 < s_min <= s_max, got {clamp}")
    s = _check_schedule(sigmas)
    n = s.numel() - 1
    _, b, c = step_coefficients(s, torch.arange(n), sde_type, eta)
    stochastic = c > 0
    scales = torch.ones(n, dtype=torch.float64)
    if not bool(stochastic.any()):
        return scales
    g = b[stochastic].abs() / c[stochastic]
    g = torch.where(torch.isfinite(g) & (g > 0), g, torch.ones_like(g))
    median = torch.sort(g).values[(g.numel() - 1) // 2]  # lower median
    scales[stochastic] = median / g
    if clamp is not None:
        scales = scales.clamp(float(clamp[0]), float(clamp[1]))
    return scales
