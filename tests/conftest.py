"""Test setup: Triton runs in its interpreter on machines without a CUDA GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined (Triton reads it at
decoration time), so it is set here, before a test module imports sage_fast.kernels.sde.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
except ImportError:
    HAS_TRITON = False

# Triton device for kernel tests: native CUDA when present, else CPU tensors in the interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="needs triton (native or TRITON_INTERPRET=1)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton" in item.fixturenames and not HAS_TRITON:
            item.add_marker(skip_triton)


@pytest.fixture
def triton():
    """Marks a test as needing Triton (native or interpreted)."""
    import triton as _triton

    return _triton
