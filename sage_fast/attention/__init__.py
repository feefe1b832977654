"""Attention for the video DiTs: backends (FA3, FA2, xformers, SDPA) behind one signature,
chosen once at build and logged (`backends.py`), and the HunyuanVideo-1.5 joint text+video
attention processor that uses them, with Ulysses sequence parallelism (`processor.py`)."""

from .backends import (BACKENDS, ENV_VAR, AttentionBackend, attention_reference, available_backends,
                       choose_backend, get_backend, missing_reason, varlen_attention)
from .processor import HunyuanVideo15JointAttnProcessor, install_attention, joint_attention_processors

__all__ = [
    "BACKENDS", "ENV_VAR", "AttentionBackend", "attention_reference", "available_backends",
    "choose_backend", "get_backend", "missing_reason", "varlen_attention",
    "HunyuanVideo15JointAttnProcessor", "install_attention", "joint_attention_processors",
]
