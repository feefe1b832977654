"""Attention backends behind one signature, chosen once at build and logged.

Owns: the kernels of the joint text+video attention and the choice between them.

    attend(q_bshd, k_bshd, v_bshd, key_mask_bs) -> out_bshd

- q, k, v: [B, S, H, D], one dtype, one device (the layout FlashAttention and xformers take).
- key_mask_bs: bool [B, S] (True = a real token) or None (every token is real). Masked tokens
  are never attended to, and the output rows of masked queries are exactly zero. This is the
  semantics of the diffusers HunyuanVideo-1.5 processor, whose dense [B, 1, S, S] mask is
  `mask[:, None] & mask[None, :]` per sample (fully masked rows of torch SDPA are zero), but
  without materialising S x S booleans: at 480p, 81 frames that would be 33,390^2 = 1.1 GB
  per sample.
- softmax scale 1/sqrt(D), no dropout, not causal.

Backends (`BACKENDS`):
- `fa3`       FlashAttention 3 (`flash_attn_interface`, Hopper sm_90 only); bf16/fp16.
- `fa2`       FlashAttention 2 (`flash_attn`), sm_80+; bf16/fp16.
- `xformers`  `xformers.ops.memory_efficient_attention`; any CUDA GPU.
- `sdpa`      `torch.nn.functional.scaled_dot_product_attention` (any device; the CPU path).
- `sdpa_math` SDPA restricted to its math kernel: the test oracle.
The flash and xformers backends drop masked tokens (varlen packing: one host sync for the
longest sequence per call), so padding costs them nothing; SDPA masks keys with a [B,1,1,S]
bias and zeroes masked query rows.

Choice: `choose_backend(requested, device)` with requested = `auto` (default) or a name, and
the environment override `SAGE_FAST_ATTENTION_BACKEND`. `auto` on CUDA takes the first of
fa3 (sm_90 only) -> fa2 -> xformers -> sdpa that imports; on any other device `sdpa`. Naming
a backend that cannot run raises a ValueError that says what is missing. The choice is made
by the caller once (at model build) and logged on logger `sage_fast.attention`.

Leaves to others: the projections, RoPE and sequence parallelism (`processor.py`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "AttentionBackend",
    "attention_reference",
    "available_backends",
    "choose_backend",
    "get_backend",
    "missing_reason",
    "varlen_attention",
]

log = logging.getLogger("sage_fast.attention")

ENV_VAR = "SAGE_FAST_ATTENTION_BACKEND"
BACKENDS = ("fa3", "fa2", "xformers", "sdpa", "sdpa_math")
CHOICES = ("auto",) + BACKENDS
_AUTO_CUDA_ORDER = ("fa3", "fa2", "xformers", "sdpa")


@dataclass(frozen=True)
class AttentionBackend:
    """One backend: `name` and `attend(q_bshd, k_bshd, v_bshd, key_mask_bs) -> out_bshd`."""

    name: str
    attend: Callable[..., torch.Tensor]

    def __call__(self, q_bshd, k_bshd, v_bshd, key_mask_bs=None):
        return self.attend(q_bshd, k_bshd, v_bshd, key_mask_bs)


# ---------------------------------------------------------------------------------------------
# Reference (test oracle; float64 when given float64)


def attention_reference(q_bshd, k_bshd, v_bshd, key_mask_bs=None):
    """softmax(q k^T / sqrt(D)) v in the input dtype with explicit matmuls (the oracle).

    Same contract as every backend: masked keys excluded, masked query rows zero.
    """
    scale = 1.0 / math.sqrt(q_bshd.shape[-1])
    q, k, v = (t.transpose(1, 2) for t in (q_bshd, k_bshd, v_bshd))  # [B, H, S, D]
    scores_bhss = (q @ k.transpose(-1, -2)) * scale
    if key_mask_bs is not None:
        scores_bhss = scores_bhss.masked_fill(~key_mask_bs[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores_bhss, dim=-1)
    if key_mask_bs is not None:
        probs = torch.nan_to_num(probs, nan=0.0)  # a row with no key at all: zero, not NaN
    out = (probs @ v).transpose(1, 2)
    return _zero_masked_rows(out, key_mask_bs)


def _zero_masked_rows(out_bshd, key_mask_bs):
    if key_mask_bs is None:
        return out_bshd
    return out_bshd * key_mask_bs[:, :, None, None].to(out_bshd.dtype)


# ---------------------------------------------------------------------------------------------
# SDPA


def _sdpa(q_bshd, k_bshd, v_bshd, key_mask_bs=None):
    q, k, v = (t.transpose(1, 2) for t in (q_bshd, k_bshd, v_bshd))  # [B, H, S, D]
    # [B, 1, 1, S] key mask: broadcast, O(S) memory (the dense [B, 1, S, S] mask is O(S^2))
    mask = None if key_mask_bs is None else key_mask_bs[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return _zero_masked_rows(out.transpose(1, 2), key_mask_bs)


def _sdpa_math(q_bshd, k_bshd, v_bshd, key_mask_bs=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return _sdpa(q_bshd, k_bshd, v_bshd, key_mask_bs)


# ---------------------------------------------------------------------------------------------
# Varlen packing shared by the flash and xformers backends


def varlen_attention(q_bshd, k_bshd, v_bshd, key_mask_bs, varlen_fn):
    """Pack the real tokens of every sample, run `varlen_fn`, scatter back with zero rows.

    varlen_fn(q_thd, k_thd, v_thd, cu_seqlens_b1 (int32), max_seqlen (int)) -> out_thd, where
    T = number of real tokens in the batch and sample b owns rows cu[b]:cu[b+1]. Works for any
    mask (not only prefixes): tokens keep their order inside a sample.
    """
    B, S, H, D = q_bshd.shape
    seqlens_b = key_mask_bs.sum(dim=1, dtype=torch.int32)
    cu_seqlens_b1 = F.pad(torch.cumsum(seqlens_b, 0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens_b.max())  # host sync: the kernels need it as an int
    index_t = key_mask_bs.reshape(-1).nonzero().squeeze(1)  # [T] positions in the flat [B*S]
    q_thd, k_thd, v_thd = (t.reshape(B * S, H, D).index_select(0, index_t) for t in (q_bshd, k_bshd, v_bshd))
    out_thd = varlen_fn(q_thd, k_thd, v_thd, cu_seqlens_b1, max_seqlen)
    out = out_thd.new_zeros(B * S, H, D).index_copy(0, index_t, out_thd)
    return out.view(B, S, H, D)


def _flash_dtype(*tensors):
    dtype = tensors[0].dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash attention backends take float16 or bfloat16 q/k/v, got {dtype}; "
                         "run the model under bf16 autocast or choose attention backend 'sdpa'")


def _make_fa2():
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    def varlen(q, k, v, cu, max_len):
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, causal=False)

    def attend(q_bshd, k_bshd, v_bshd, key_mask_bs=None):
        _flash_dtype(q_bshd)
        if key_mask_bs is None:
            return flash_attn_func(q_bshd, k_bshd, v_bshd, dropout_p=0.0, causal=False)
        return varlen_attention(q_bshd, k_bshd, v_bshd, key_mask_bs, varlen)

    return attend


def _first(out):
    # flash_attn_interface (FA3) returns (out, softmax_lse) in some releases and out in others
    return out[0] if isinstance(out, tuple) else out


def _make_fa3():
    from flash_attn_interface import flash_attn_func, flash_attn_varlen_func

    def varlen(q, k, v, cu, max_len):
        return _first(flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=False))

    def attend(q_bshd, k_bshd, v_bshd, key_mask_bs=None):
        _flash_dtype(q_bshd)
        if key_mask_bs is None:
            return _first(flash_attn_func(q_bshd, k_bshd, v_bshd, causal=False))
        return varlen_attention(q_bshd, k_bshd, v_bshd, key_mask_bs, varlen)

    return attend


def _make_xformers():
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    def varlen(q, k, v, cu, max_len):
        seqlens = torch.diff(cu).tolist()
        bias = BlockDiagonalMask.from_seqlens(q_seqlen=seqlens, kv_seqlen=seqlens)
        # packed layout: one "batch" of T tokens, the block-diagonal bias separates samples
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]

    def attend(q_bshd, k_bshd, v_bshd, key_mask_bs=None):
        if key_mask_bs is None:
            return xops.memory_efficient_attention(q_bshd, k_bshd, v_bshd)
        return varlen_attention(q_bshd, k_bshd, v_bshd, key_mask_bs, varlen)

    return attend


# ---------------------------------------------------------------------------------------------
# Availability and choice


def missing_reason(name: str, device: torch.device | str = "cuda") -> str | None:
    """Why backend `name` cannot run on `device` here, or None when it can."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {CHOICES}, got {name!r}")
    if name in ("sdpa", "sdpa_math"):
        return None
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{name} needs a CUDA device (got {device.type}, cuda available: {torch.cuda.is_available()})"
    module = {"fa3": "flash_attn_interface", "fa2": "flash_attn", "xformers": "xformers.ops"}[name]
    try:
        __import__(module)
    except ImportError as e:
        package = {"fa3": "flash-attn 3 (hopper build, module flash_attn_interface)",
                   "fa2": "flash-attn>=2.6", "xformers": "xformers"}[name]
        return f"{name} needs {package}: import {module} failed ({e})"
    major, minor = torch.cuda.get_device_capability(device)
    if name == "fa3" and (major, minor) != (9, 0):
        return f"fa3 runs on Hopper (sm_90) only, this GPU is sm_{major}{minor}"
    if name == "fa2" and major < 8:
        return f"fa2 needs sm_80 or newer, this GPU is sm_{major}{minor}"
    return None


def available_backends(device: torch.device | str = "cuda") -> tuple[str, ...]:
    return tuple(name for name in BACKENDS if missing_reason(name, device) is None)


_FACTORIES = {"fa3": _make_fa3, "fa2": _make_fa2, "xformers": _make_xformers,
              "sdpa": lambda: _sdpa, "sdpa_math": lambda: _sdpa_math}


def get_backend(name: str) -> AttentionBackend:
    """The backend `name` without availability checks (it imports its library)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {CHOICES}, got {name!r}")
    return AttentionBackend(name, _FACTORIES[name]())


def choose_backend(requested: str = "auto", device: torch.device | str = "cpu") -> AttentionBackend:
    """Resolve `requested` (or the `SAGE_FAST_ATTENTION_BACKEND` override) for `device`; log it.

    Called once at model build, never per attention call.
    """
    env = os.environ.get(ENV_VAR)
    source = "config"
    if env:
        requested, source = env, f"${ENV_VAR}"
    if requested not in CHOICES:
        raise ValueError(f"attention backend ({source}) must be one of {CHOICES}, got {requested!r}")
    device = torch.device(device)
    if requested == "auto":
        order = _AUTO_CUDA_ORDER if device.type == "cuda" else ("sdpa",)
        skipped = []
        for name in order:
            why = missing_reason(name, device)
            if why is None:
                break
            skipped.append(why)
        for why in skipped:
            log.info("attention: skipping %s", why)
    else:
        name = requested
        why = missing_reason(name, device)
        if why is not None:
            raise ValueError(f"attention backend {name!r} ({source}) cannot run: {why}")
    log.info("attention: %s tensors -> %s backend (requested %r via %s)", device.type, name, requested, source)
    return get_backend(name)

