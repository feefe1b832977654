"""sage_fast: an RL post-training engine (SAGE-GRPO and baselines) for video flow-matching models.

Subpackages: `grpo` (schedule and GRPO math), `kernels` (fused Triton ops and their torch
reference; installed from the top-level `kernels/` folder).
"""

__version__ = "0.1.0"
