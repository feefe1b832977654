"""sage_fast: an RL post-training engine (SAGE-GRPO and baselines) for video flow-matching models.

Subpackages: `grpo` (the GRPO algorithm: schedule, rollout, data order, advantages, loss, KL,
equalizer, anchor), `kernels` (the fused step ops and their torch reference; installed from the
top-level `kernels/` folder), `models` (the HunyuanVideo-1.5 adapter), `attention` (attention
backends), `parallel` (mesh, Ulysses, data-parallel strategies), `rewards` (rewards for real
videos), `world` (the synthetic video world), `paper` (the paper's micro-level measurements).

Modules: `train` (the entry point), `trainer` (`Trainer.step()`), `train_config` and `config`
(the config tree, its recipes, and the machinery), `task` (what the trainer asks of a task),
`evaluation`, `reward_worker`, `metrics`, `checkpoint`, `report`, `export`, `provenance`.
How they fit: docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
