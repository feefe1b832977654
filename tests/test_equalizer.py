"""Fused empirical equalizer against the reference, over several updates."""

import pytest
import torch
from conftest import KERNEL_DEVICE

import sage_fast.kernels as K
from sage_fast.kernels import reference


@pytest.fixture(scope="module")
def eq():
    from sage_fast.kernels import equalizer

    return equalizer


@pytest.mark.parametrize("n_steps, batch", [(20, 8), (7, 300), (50, 1), (16, 129)])
def test_equalizer_kernel_matches_reference_over_updates(triton, eq, n_steps, batch):
    gen = torch.Generator().manual_seed(n_steps * 1000 + batch)
    ema_k, ema_r = torch.zeros(n_steps, device=KERNEL_DEVICE), torch.zeros(n_steps)
    cnt_k = torch.zeros(n_steps, dtype=torch.int64, device=KERNEL_DEVICE)
    cnt_r = torch.zeros(n_steps, dtype=torch.int64)
    for update in range(4):
        # norms span decades like |b|/c across steps; some NaN/inf/0 that must be ignored
        steps = torch.randint(0, max(1, n_steps - 2), (batch,), generator=gen)  # last steps unseen
        norms = torch.exp(torch.randn(batch, generator=gen) * 2 + steps.float() * 0.1)
        if batch > 3:
            norms[1], norms[2], norms[3] = float("nan"), float("inf"), 0.0
        scales_r = reference.equalizer_update(norms, steps, ema_r, cnt_r, momentum=0.8, clamp=(0.05, 20.0))
        scales_k = eq.equalizer_update_triton(norms.to(KERNEL_DEVICE), steps.to(KERNEL_DEVICE), ema_k, cnt_k,
                                              0.8, 0.05, 20.0)
        assert torch.equal(cnt_k.cpu(), cnt_r), update
        assert torch.allclose(ema_k.cpu(), ema_r, rtol=1e-5, atol=0), update
        assert torch.allclose(scales_k.cpu(), scales_r, rtol=1e-5, atol=0), update
        assert float(scales_r.min()) >= 0.05 and float(scales_r.max()) <= 20.0


def test_equalizer_public_op_and_errors():
    ema, count = torch.zeros(5), torch.zeros(5, dtype=torch.int64)
    scales = K.equalizer_update(torch.tensor([1.0, 4.0]), torch.tensor([0, 4]), ema, count, momentum=0.9,
                                clamp=(0.1, 10.0))
    assert scales.tolist() == [1.0, 0.25] and count.tolist() == [1, 0, 0, 0, 1]
    bad = [
        (dict(step_index=torch.tensor([0, 5])), r"step_index must lie in \[0, 4\]"),
        (dict(step_index=torch.tensor([0.0, 1.0])), "step_index must be an int64"),
        (dict(grad_norm=torch.tensor([1.0, 2.0], dtype=torch.float64)), "grad_norm must be a float32"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(clamp=(0.0, 1.0)), "clamp must be"),
        (dict(count=torch.zeros(4, dtype=torch.int64)), "count must be an int64 tensor of ema's shape"),
    ]
    for override, match in bad:
        args = dict(grad_norm=torch.tensor([1.0, 2.0]), step_index=torch.tensor([0, 1]), ema=torch.zeros(5),
                    count=torch.zeros(5, dtype=torch.int64), momentum=0.9, clamp=(0.1, 10.0))
        args.update(override)
        with pytest.raises(ValueError, match=match):
            K.equalizer_update(args.pop("grad_norm"), args.pop("step_index"), args.pop("ema"), args.pop("count"),
                               **args)
