"""The noise budget of each SDE type (the paper's Table 1): what a step injects vs the exact integral.

    budget = noise_budget(num_steps=10, shift=3.0, eta=0.5)
    budget["steps"][i]["variance"]["flow_grpo"]      # V_i = c_i^2 of step i
    budget["steps"][i]["exact"]                      # the exact integral of the reference coefficient
    budget["totals"]["excess"]["flow_grpo"]          # sum over steps 1..N-1 of V_i - exact_i

The reference is the diffusion coefficient the paper and FlowGRPO use, g^2(u) = eta^2 u / (1 - u)
(sigma = u), whose SDE keeps the rectified flow's marginals. Over step i, from sigma to
sigma' < sigma, the variance it injects is exactly

    exact_i = eta^2 * integral_{sigma'}^{sigma} u / (1 - u) du = eta^2 * (log((1 - sigma') / (1 - sigma)) - delta)

(delta = sigma - sigma'), infinite at step 0 where sigma = 1. Per type (docs/SPEC.md section 2):

- `sage_grpo` injects exactly this; at step 0 sigma is clamped to 1 - e in the log term (the
  linear term keeps delta), i.e. the integral up to 1 - e less eta^2 e: a finite stand-in for +inf.
- `flow_grpo` injects the left-point (Euler) area eta^2 sigma / (1 - sigma) * delta. Its error is
  the left Riemann error of an increasing integrand: f'(xi) delta^2 / 2 with f'(u) = 1 / (1 - u)^2
  for some xi in [sigma', sigma], so between eta^2 delta^2 / (2 (1 - sigma')^2) and
  eta^2 delta^2 / (2 (1 - sigma)^2): first order in delta, largest at high noise. At step 0 it
  evaluates the denominator at sigma_1 instead (finite, where the exact value is not).
- `dance_grpo` integrates a different coefficient exactly: the constant eta^2, so V = eta^2 delta
  with no discretisation error of its own. Against the reference it differs by
  eta^2 * integral (u / (1 - u) - 1) du: less noise where sigma > 1/2, more below.
- `cps` is not built from a diffusion coefficient: it keeps the coefficients of x0 and of the
  noise consistent, with c = sigma' sin(eta pi / 2). Its variance is listed beside the others.

Totals leave out step 0 (the reference is infinite there) and report it separately.
"""

from __future__ import annotations

import math

import torch

from sage_fast.grpo import schedule
from sage_fast.grpo.schedule import STOCHASTIC_TYPES  # the four samplers the paper compares

__all__ = ["exact_variance", "noise_budget"]


def exact_variance(sigma: float, sigma_next: float, eta: float) -> float:
    """eta^2 * integral_{sigma_next}^{sigma} u / (1 - u) du (inf when sigma == 1)."""
    if not 0.0 <= sigma_next < sigma <= 1.0:
        raise ValueError(f"need 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")
    if sigma == 1.0:
        return math.inf
    return eta**2 * (math.log((1.0 - sigma_next) / (1.0 - sigma)) - (sigma - sigma_next))


def noise_budget(num_steps: int, shift: float, eta: float) -> dict:
    """Per-step variance of every stochastic type against the exact integral (see module doc)."""
    sig = schedule.sigmas(num_steps, shift)
    idx = torch.arange(num_steps)
    variance = {t: (schedule.step_coefficients(sig, idx, t, eta)[2] ** 2).tolist() for t in STOCHASTIC_TYPES}
    steps = []
    for i in range(num_steps):
        s, s_next = float(sig[i]), float(sig[i + 1])
        exact = exact_variance(s, s_next, eta)
        row = {"step": i, "sigma": s, "sigma_next": s_next, "exact": exact,
               "variance": {t: variance[t][i] for t in STOCHASTIC_TYPES}}
        row["excess"] = {t: (row["variance"][t] - exact) if math.isfinite(exact) else None for t in STOCHASTIC_TYPES}
        steps.append(row)
    finite = [r for r in steps if math.isfinite(r["exact"])]
    totals = {
        "steps_counted": [r["step"] for r in finite],
        "exact": sum(r["exact"] for r in finite),
        "variance": {t: sum(r["variance"][t] for r in finite) for t in STOCHASTIC_TYPES},
        "step0_variance": {t: steps[0]["variance"][t] for t in STOCHASTIC_TYPES},
    }
    totals["excess"] = {t: totals["variance"][t] - totals["exact"] for t in STOCHASTIC_TYPES}
    totals["ratio"] = {t: totals["variance"][t] / totals["exact"] for t in STOCHASTIC_TYPES}
    return {"num_steps": num_steps, "shift": float(shift), "eta": float(eta), "steps": steps, "totals": totals}
