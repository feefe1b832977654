"""The GRPO algorithm around the fused kernels.

    schedule      the sigma schedule, per-step SDE coefficients (a, b, c), analytic equalizer scales
    rollout       `RolloutEngine`: the sampling loop, its noise addressing, CUDA-graph replay
    data          seeds, prompt order, batch layout, trained (sample, step) pairs, `RolloutBatch`
    advantages    group-relative advantages across data-parallel ranks, failed rewards excluded
    loss          the clipped policy term x equalizer + dual KL of one micro-batch
    kl_schedule   the KL coefficient beta (constant, two-stage, adaptive)
    equalizer     the temporal gradient equalizer (analytic, empirical, none)
    anchor        the fixed or moving anchor of the anchor KL
    guard         skipped updates, and stopping after too many in a row
"""
