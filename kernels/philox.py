"""The engine's counter-based noise stream, in plain torch (the definition the kernels follow).

Owns: the exact mapping (seed, offset, element index) -> standard normal float32 that the
Triton kernel (`sde.py`) and the C++/CUDA ops reproduce, so that a rollout's noise never has to
be materialised, is the same whatever the launch geometry, and can be regenerated anywhere.

Stream "sage_fast/philox-v1", for element j of a launch (j = linear index in the batch):

    n        = offset + j                      (64-bit)
    counter  = (n mod 2^32, n div 2^32, 0, 0)
    key      = (seed mod 2^32, (seed div 2^32) mod 2^32)
    (x0, x1, _, _) = Philox4x32-10(counter, key)            (Salmon et al., SC'11, Random123)
    u1 = ((x0 >> 9) + 0.5) * 2^-23,  u2 = ((x1 >> 9) + 0.5) * 2^-23      (both in (0, 1))
    eps = sqrt(-2 ln u1) * cos(2 pi u2)                      (Box-Muller, cosine branch)

One Philox call per element and no pairing between elements: the value at index j depends on
(seed, offset + j) only, so block sizes, batch splits (advance `offset` by the elements skipped)
and thread counts cannot change it. 23-bit uniforms are exact in float32, never 0 or 1, and
truncate the normal at |eps| <= 5.8 (probability 7e-9 of hitting the bound).

Leaves to others: launching (the kernels), choosing seeds and offsets (the rollout engine).
"""

from __future__ import annotations

import math

import torch

__all__ = ["PHILOX_STREAM", "philox4x32", "philox_normal"]

PHILOX_STREAM = "sage_fast/philox-v1"

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_ROUNDS = 10


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 holds x < 2^32; m * x < 2^64 wraps in two's complement, but the wrapped product
    # still has the right low 64 bits, so masking recovers both halves exactly.
    prod = x * m
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with 10 rounds on int64 tensors holding uint32 values."""
    for _ in range(_ROUNDS):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def philox_normal(
    numel: int, seed: int, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`numel` float32 standard normals of stream philox-v1 starting at `offset` for `seed`."""
    seed, offset = int(seed), int(offset)
    if seed < 0 or offset < 0:
        raise ValueError(f"seed and offset must be >= 0, got seed={seed}, offset={offset}")
    n = torch.arange(numel, dtype=torch.int64, device=device) + offset
    zero = torch.zeros_like(n)
    x0, x1, _, _ = philox4x32(n & _MASK32, (n >> 32) & _MASK32, zero, zero,
                              seed & _MASK32, (seed >> 32) & _MASK32)
    scale = 2.0**-23
    u1 = ((x0 >> 9).to(torch.float32) + 0.5) * scale
    u2 = ((x1 >> 9).to(torch.float32) + 0.5) * scale
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
