"""Temporal gradient equalizer (docs/SPEC.md section 4): per-sample weights of the policy term.

Modes:
- `analytic` (the authors'): s_t = median_j(|b_j|/c_j) / (|b_t|/c_t) from the schedule, a table
  computed once (`schedule.equalizer_scales`), optionally clamped;
- `empirical` (ours): s_t = median over steps of an EMA of the measured |d logp / d v| at step t,
  divided by that EMA at t, clamped; the norms come free from the fused training op and the
  EMA update is the fused `equalizer_update` op;
- `none`: s_t = 1.

The scale is indexed by the sample's original step index (whatever order the trainer visits
steps in: docs/SPEC.md defect 4 crashed on that). State (the EMA and counts) is part of checkpoints.
"""

from __future__ import annotations

import torch

from sage_fast.grpo import schedule
from sage_fast.kernels import equalizer_update

__all__ = ["EQUALIZER_MODES", "TemporalEqualizer"]

EQUALIZER_MODES = ("analytic", "empirical", "none")


class TemporalEqualizer:
    def __init__(self, mode: str, sigmas: torch.Tensor, sde_type: str, eta: float, *,
                 clamp: tuple[float, float] | None = None, momentum: float = 0.9,
                 device: torch.device | str = "cpu") -> None:
        if mode not in EQUALIZER_MODES:
            raise ValueError(f"equalizer mode must be one of {EQUALIZER_MODES}, got {mode!r}")
        if mode == "empirical" and clamp is None:
            clamp = (0.1, 10.0)
        self.mode, self.clamp, self.momentum = mode, clamp, momentum
        num_steps = sigmas.numel() - 1
        self.table = schedule.equalizer_scales(sigmas, sde_type, eta, clamp=clamp).to(device, torch.float32) \
            if mode == "analytic" else None
        self.ema = torch.zeros(num_steps, dtype=torch.float32, device=device)
        self.count = torch.zeros(num_steps, dtype=torch.int64, device=device)

    def scales(self, step_index_b: torch.Tensor, grad_norm_b: torch.Tensor | None = None) -> torch.Tensor:
        """[B] float32 weights for samples at `step_index_b`. `empirical` needs the samples'
        gradient norms and updates its statistics with them (call once per micro-batch)."""
        if self.mode == "none":
            return torch.ones(step_index_b.shape, dtype=torch.float32, device=step_index_b.device)
        if self.mode == "analytic":
            return self.table[step_index_b]
        if grad_norm_b is None:
            raise ValueError("the empirical equalizer needs grad_norm_b (the training op's third output)")
        return equalizer_update(grad_norm_b.detach().float().contiguous(), step_index_b.contiguous(), self.ema,
                                self.count, momentum=self.momentum, clamp=self.clamp)

    def scales_across(self, step_index_b: torch.Tensor, grad_norm_b: torch.Tensor, axis) -> torch.Tensor:
        """`scales` of this rank's samples when a batch is split over the data axis
        (`parallel.DataAxis`): `empirical` updates its statistics with every rank's (gathered)
        norms, so every rank holds the same state."""
        if self.mode != "empirical" or axis.size == 1:
            return self.scales(step_index_b, grad_norm_b)
        all_norms, all_steps = axis.gather(grad_norm_b.detach()), axis.gather(step_index_b)
        m = step_index_b.numel()
        return self.scales(all_steps, all_norms)[axis.rank * m:(axis.rank + 1) * m]

    def state_dict(self) -> dict:
        return {"mode": self.mode, "ema": self.ema.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint equalizer is {state['mode']!r}, config says {self.mode!r}")
        self.ema.copy_(state["ema"])
        self.count.copy_(state["count"])
