"""GRPO math on the host: the sigma schedule, per-step SDE coefficients, equalizer scales."""
