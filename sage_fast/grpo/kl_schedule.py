"""The KL coefficient beta over training: constant, two-stage, or an adaptive controller.

docs/SPEC.md section 6. The paper describes a two-stage schedule (loose first, tight later); the
authors' code ships an adaptive controller whose direction is inverted (a large KL lowers
beta, docs/SPEC.md defect 2). Ours is correctly signed: a measured KL above the target raises beta.

- `constant`: beta = beta0 always.
- `two_stage`: beta = warmup_beta for the first `warmup_steps` optimizer steps, then beta0.
- `adaptive`: after each update with measured KL k, beta <- beta * exp(rate * e) with
  e = clip((k - target) / target, -1, 1): proportional in log space (the PPO adaptive-KL
  rule of Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"), clamped
  to [beta_min, beta_max].

State (`state_dict`) is part of exact checkpoints.
"""

from __future__ import annotations

import math

__all__ = ["BETA_SCHEDULES", "KLController"]

BETA_SCHEDULES = ("constant", "two_stage", "adaptive")


class KLController:
    def __init__(self, schedule: str = "constant", beta: float = 0.01, *, warmup_beta: float = 0.0,
                 warmup_steps: int = 0, target: float = 0.01, rate: float = 0.1, beta_min: float = 1e-6,
                 beta_max: float = 10.0) -> None:
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")
        for name, value in (("beta", beta), ("warmup_beta", warmup_beta)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if schedule == "adaptive":
            if not target > 0 or not rate > 0 or not 0 < beta_min <= beta_max:
                raise ValueError("adaptive: target and rate must be > 0 and 0 < beta_min <= beta_max, got "
                                 f"target={target}, rate={rate}, beta_min={beta_min}, beta_max={beta_max}")
            if beta <= 0:
                raise ValueError("adaptive: beta must start > 0 (a multiplicative controller cannot leave 0)")
        self.schedule, self.beta0, self.warmup_beta, self.warmup_steps = schedule, beta, warmup_beta, warmup_steps
        self.target, self.rate, self.beta_min, self.beta_max = target, rate, beta_min, beta_max
        self.step_count = 0
        self._beta = beta

    @property
    def beta(self) -> float:
        """The coefficient for the next update."""
        if self.schedule == "two_stage":
            return self.warmup_beta if self.step_count < self.warmup_steps else self.beta0
        return self._beta

    def update(self, measured_kl: float) -> float:
        """Record one optimizer step with its measured KL; returns the beta for the next one."""
        self.step_count += 1
        if self.schedule == "adaptive" and math.isfinite(measured_kl):
            error = max(-1.0, min(1.0, (measured_kl - self.target) / self.target))
            self._beta = min(self.beta_max, max(self.beta_min, self._beta * math.exp(self.rate * error)))
        return self.beta

    def state_dict(self) -> dict:
        return {"schedule": self.schedule, "step_count": self.step_count, "beta": self._beta}

    def load_state_dict(self, state: dict) -> None:
        if state["schedule"] != self.schedule:
            raise ValueError(f"checkpoint KL controller is {state['schedule']!r}, config says {self.schedule!r}")
        self.step_count, self._beta = int(state["step_count"]), float(state["beta"])
