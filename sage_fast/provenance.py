"""Where a measurement came from: the source commit and the CPU (for results files and reports).

    sha, dirty = git_commit()      # ("4606992", False); ("unknown", False) outside a git checkout
    commit_label()                 # "4606992", "4606992-dirty"; outside a checkout $SAGE_FAST_COMMIT or "unknown"
    cpu_name()                     # "Intel(R) Xeon(R) Processor" (/proc/cpuinfo's model name)
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

__all__ = ["git_commit", "commit_label", "cpu_name", "ROOT"]

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


def commit_label(root: Path = ROOT) -> str:
    """HEAD's short sha, with "-dirty" if tracked files changed; outside a git checkout (a copy of
    the tree on another machine) the caller's $SAGE_FAST_COMMIT, else "unknown"."""
    sha, dirty = git_commit(root)
    if sha == "unknown":
        return os.environ.get("SAGE_FAST_COMMIT", "unknown")
    return sha + ("-dirty" if dirty else "")


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
