"""The anchor of the anchor KL (docs/SPEC.md section 6): a fixed or a moving copy of the policy.

Owns: a snapshot of the policy's *trainable* parameters (the LoRA weights under LoRA: a few MB
for an 8.3B model, the frozen base is shared) and evaluating the policy's module with them
swapped in (`torch.func.functional_call`), so the anchor costs no second model.

- `fixed`: the snapshot is the initial policy, never refreshed.
- `moving`: every `update_every` optimizer steps the snapshot becomes the current policy
  (authors: 10).
- Right after a refresh (and at the start) the anchor equals the policy: `equals_policy` is
  True, and its KL is exactly 0, so the trainer skips the anchor forward.

Leaves to others: when optimizer steps happen (the trainer calls `after_optimizer_step`), the
KL itself (the fused training op takes the anchor's velocity as `v_ref`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.func import functional_call

__all__ = ["ANCHOR_MODES", "Anchor"]

ANCHOR_MODES = ("fixed", "moving")


class Anchor:
    def __init__(self, model: nn.Module, mode: str = "moving", update_every: int = 10) -> None:
        if mode not in ANCHOR_MODES:
            raise ValueError(f"anchor mode must be one of {ANCHOR_MODES}, got {mode!r}")
        if mode == "moving" and update_every < 1:
            raise ValueError(f"update_every must be >= 1 for a moving anchor, got {update_every}")
        self.mode, self.update_every = mode, update_every
        self.params: dict[str, torch.Tensor] = {}
        self.steps_since_refresh = 0
        self.refresh(model)

    def refresh(self, model: nn.Module) -> None:
        """Make the anchor a copy of the policy's current trainable parameters."""
        self.params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters to anchor")
        self.steps_since_refresh = 0
        self.equals_policy = True

    def after_optimizer_step(self, model: nn.Module) -> bool:
        """Record one optimizer step; refreshes a moving anchor when due. Returns True if it did."""
        self.equals_policy = False
        self.steps_since_refresh += 1
        if self.mode == "moving" and self.steps_since_refresh >= self.update_every:
            self.refresh(model)
            return True
        return False

    @torch.no_grad()
    def forward(self, model: nn.Module, *args, **kwargs):
        """model(*args, **kwargs) evaluated with the anchor's parameters, without gradients.

        Sharded (FSDP2) parameters are swapped in place and restored: FSDP2 all-gathers its own
        parameters before each block, so `functional_call`'s substitutes would be ignored."""
        named = dict(model.named_parameters())
        if not any(isinstance(named[n], DTensor) for n in self.params):
            return functional_call(model, self.params, args, kwargs, strict=False)
        saved = {n: named[n].detach().clone() for n in self.params}
        try:
            for n, p in self.params.items():
                named[n].copy_(p)
            return model(*args, **kwargs)
        finally:
            for n, p in saved.items():
                named[n].copy_(p)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "params": dict(self.params), "steps_since_refresh": self.steps_since_refresh,
                "equals_policy": self.equals_policy}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint anchor is {state['mode']!r}, config says {self.mode!r}")
        missing = set(self.params) ^ set(state["params"])
        if missing:
            raise ValueError(f"checkpoint anchor parameters differ from the model's trainable ones: "
                             f"{sorted(missing)[:5]}")
        self.params = {k: v.to(self.params[k].device) for k, v in state["params"].items()}
        self.steps_since_refresh = int(state["steps_since_refresh"])
        self.equals_policy = bool(state["equals_policy"])
