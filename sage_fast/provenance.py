"""Where a measurement came from: the source commit and the CPU (for results files and reports).

    sha, dirty = git_commit()      # ("4606992", False); ("unknown", False) outside a git checkout
    cpu_name()                     # "Intel(R) Xeon(R) Processor" (/proc/cpuinfo's model name)
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

__all__ = ["git_commit", "cpu_name", "ROOT"]

ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = ROOT) -> tuple[str, bool]:
    """(short sha of HEAD, whether tracked files have uncommitted changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=False).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=False).stdout.strip())
    except OSError:
        return "unknown", False
    return sha, dirty and sha != "unknown"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name
