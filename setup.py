"""Install sage_fast, building the extension sage_fast._C with CMake (CMakeLists.txt).

- The top-level `kernels/` folder is installed as `sage_fast.kernels` (never as a top-level
  `kernels` module: that name is another PyPI package that diffusers probes).
- The extension compiles against the torch already installed, so install without build
  isolation:  pip install --no-build-isolation -e .   (the Makefile does this). An isolated
  build environment would have no torch, or download another one.
- SAGE_FAST_NO_EXT=1 skips the extension: a pure-Python install whose CPU path is the torch
  reference.  SAGE_FAST_CUDA=ON|OFF|AUTO (default AUTO) controls the CUDA twin.

Requirements are ranges; exact CPU pins live in constraints/cpu.txt (used by the Makefile).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SKIP_EXT = os.environ.get("SAGE_FAST_NO_EXT", "0") not in ("", "0")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build with CMake + Ninja against the installed torch (the vLLM pattern)."""

    def build_extension(self, ext: Extension) -> None:
        try:
            import torch.utils
        except ImportError:
            sys.exit(
                "sage_fast: building sage_fast._C needs torch installed in this environment first.\n"
                "  Install torch, then: pip install --no-build-isolation -e .   (no build isolation: the\n"
                "  extension must compile against your torch). Or set SAGE_FAST_NO_EXT=1 to skip it."
            )
        missing = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
        if missing:
            sys.exit(
                f"sage_fast: building sage_fast._C needs {' and '.join(missing)} on PATH "
                "(pip install cmake ninja), or set SAGE_FAST_NO_EXT=1 to skip the extension."
            )
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSAGE_FAST_OUTPUT_DIR={out_dir}",
            f"-DSAGE_FAST_CUDA={os.environ.get('SAGE_FAST_CUDA', 'AUTO')}",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        for step in (configure, ["cmake", "--build", str(build_dir), "-j", jobs]):
            try:
                subprocess.run(step, check=True)
            except subprocess.CalledProcessError as err:
                sys.exit(
                    f"sage_fast: `{' '.join(step[:3])} ...` failed (exit {err.returncode}); see the CMake output "
                    "above for what is missing (a C++17 compiler, Python headers, a CUDA compiler for "
                    "SAGE_FAST_CUDA=ON). SAGE_FAST_NO_EXT=1 installs without the extension."
                )


packages = find_packages(include=["sage_fast", "sage_fast.*"]) + ["sage_fast.kernels"]

setup(
    name="sage_fast",
    version="0.1.0",
    description="High-throughput SAGE-GRPO / FlowGRPO / DanceGRPO / CPS post-training for video flow-matching models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"sage_fast.kernels": "kernels"},
    # the world's shipped base model (weights, config, card): the tiny-world recipe loads it
    package_data={"sage_fast.world": ["assets/base_model/*"]},
    ext_modules=[] if SKIP_EXT else [CMakeExtension("sage_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # custom_op / register_fake / register_autograd: torch >= 2.4
        "torch>=2.4",
        "numpy>=1.24",
        # Triton kernels: native on CUDA, interpreter-only on CPUs (tests)
        "triton>=3.0; platform_system == 'Linux'",
        # models: the HunyuanVideo-1.5 class (its forward is version-sensitive: 0.42 tested),
        # LoRA, local checkpoints
        "diffusers>=0.42",
        "peft>=0.17",
        "safetensors>=0.4",
        # trainer: progress, TensorBoard, sample videos (imageio-ffmpeg ships ffmpeg), the end plot
        "tqdm>=4.60",
        "tensorboard>=2.10",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.4",
        "matplotlib>=3.7",
        "pillow>=9",
    ],
    extras_require={
        # deepspeed: dist.strategy=deepspeed_zero2 (its ops are JIT-built when first used)
        "deepspeed": ["deepspeed>=0.16"],
        "dev": ["pytest>=7", "pytest-benchmark>=4", "scipy>=1.10", "deepspeed>=0.16"],
        # GPU extras: built against the user's CUDA torch; cannot build on CPU-only machines
        "gpu": ["flash-attn>=2.6", "xformers>=0.0.27"],
    },
)
