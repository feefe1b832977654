"""The tests' tiny run: a random tiny model on a 16 x 16 world, an iteration in a fraction of a second."""

TINY = [
    "model.checkpoint=none", 'model.architecture_overrides={"in_channels": 385, "out_channels": 192}',
    "model.lora_rank=4", "model.lora_alpha=4",
    "world.frames=5", "world.height=16", "world.width=16", "world.num_train_prompts=16", "world.num_eval_prompts=2",
    "sampler.num_steps=4", "sampler.cfg_scale=2.0", "grpo.samples_per_rank=4", "grpo.group_size=2",
    "grpo.train_steps=2", "grpo.micro_batch=4", "grpo.clip_range=0.01", "optim.lr=0.01",
    "run.eval_every=100", "run.save_every=100", "run.tensorboard=false", "run.save_videos=false",
]


def nudge_lora(trainer, scale: float = 0.1, seed: int = 0) -> None:
    """Move every LoRA B matrix off its zero initialisation (B = 0 makes every LoRA delta zero,
    which would hide a merge or an adapter that is missing)."""
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in trainer.trainable:
            if "lora_B" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))
