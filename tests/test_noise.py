"""The Philox noise stream: known answers, torch == Triton, launch-geometry independence, normality."""

import math

import pytest
import torch
from conftest import KERNEL_DEVICE

from sage_fast.kernels.philox import philox4x32, philox_normal


@pytest.fixture(scope="module")
def sde():
    from sage_fast.kernels import sde as sde_module

    return sde_module


# Random123 known-answer vectors for Philox4x32-10 (counter, key) -> output
KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


@pytest.mark.parametrize("counter, key, want", KAT)
def test_philox4x32_known_answers(counter, key, want):
    out = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert [int(t) for t in out] == want


def _kernel_noise(sde, numel_shape, seed, offset, block=4096, device=KERNEL_DEVICE):
    """Noise out of the rollout kernel: a = 1, b = 0, c = 1, x = v = 0 gives x_next = eps exactly."""
    batch = numel_shape[0]
    x = torch.zeros(numel_shape, device=device)
    coef = torch.tensor([[1.0] * batch, [0.0] * batch, [1.0] * batch], device=device)
    rng = torch.tensor([seed, offset], dtype=torch.int64, device=device)
    return sde.sde_step_packed(x, x, coef, None, rng, "dance_grpo", "mean", block=block)[0]


def test_triton_noise_equals_torch_stream(triton, sde):
    seed, offset = 2**40 + 17, 2**32 - 1000  # a 64-bit seed and a counter crossing 2^32
    shape = (2, 3, 7, 11, 13)
    got = _kernel_noise(sde, shape, seed, offset).cpu()
    want = philox_normal(math.prod(shape), seed, offset).view(shape)
    # same integers; float32 log/cos may differ by an ulp between implementations
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float((got - want).abs().max()) < 1e-4


def test_noise_independent_of_block_size_and_batch_split(triton, sde):
    shape = (4, 3, 5, 9, 11)
    d = math.prod(shape[1:])
    full = _kernel_noise(sde, shape, 7, 100, block=4096)
    for block in (128, 1024):
        assert torch.equal(full, _kernel_noise(sde, shape, 7, 100, block=block))
    first = _kernel_noise(sde, (1,) + shape[1:], 7, 100)
    rest = _kernel_noise(sde, (3,) + shape[1:], 7, 100 + d)
    assert torch.equal(full, torch.cat([first, rest]))
    # and the torch stream splits the same way
    assert torch.equal(philox_normal(4 * d, 7, 100)[d:], philox_normal(3 * d, 7, 100 + d))


def test_different_seeds_and_offsets_give_different_noise():
    a = philox_normal(1000, 1, 0)
    assert not torch.equal(a, philox_normal(1000, 2, 0))
    assert not torch.equal(a, philox_normal(1000, 1, 1))
    assert torch.equal(a[1:], philox_normal(999, 1, 1))


def _check_standard_normal(z: torch.Tensor):
    from scipy import stats

    z = z.double().flatten()
    n = z.numel()
    assert n >= 10**6
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.std()) - 1) < 5 * math.sqrt(0.5 / n)
    tail = float((z.abs() > 3).double().mean())
    assert abs(tail - 2 * stats.norm.sf(3)) < 5 * math.sqrt(2 * stats.norm.sf(3) / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert stats.normaltest(z.numpy()).pvalue > 1e-3


def test_torch_stream_is_standard_normal_at_1e6():
    _check_standard_normal(philox_normal(2**20, seed=20261122, offset=0))


def test_triton_stream_is_standard_normal_at_1e6(triton, sde):
    _check_standard_normal(_kernel_noise(sde, (4, 2**18, 1, 1, 1), 123, 0).cpu())


def test_bad_seed_and_offset():
    with pytest.raises(ValueError, match="seed and offset must be >= 0"):
        philox_normal(10, -1, 0)
