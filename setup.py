"""Install sage_fast. The top-level `kernels/` folder is installed as `sage_fast.kernels`
(never as a top-level `kernels` module: that name is another PyPI package that diffusers probes).

Requirements are ranges; exact CPU pins live in constraints/cpu.txt (used by the Makefile).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["sage_fast", "sage_fast.*"]) + ["sage_fast.kernels"]

setup(
    name="sage_fast",
    version="0.1.0",
    description="High-throughput SAGE-GRPO / FlowGRPO / DanceGRPO / CPS post-training for video flow-matching models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"sage_fast.kernels": "kernels"},
    install_requires=[
        # custom_op / register_fake / register_autograd: torch >= 2.4
        "torch>=2.4",
        "numpy>=1.24",
        # Triton kernels: native on CUDA, interpreter-only on CPUs (tests)
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark>=4", "scipy>=1.10"],
        # GPU extras: built against the user's CUDA torch; cannot build on CPU-only machines
        "gpu": ["flash-attn>=2.6", "xformers>=0.0.27"],
    },
)
