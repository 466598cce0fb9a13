"""Where a run came from: the command, the code (git commit, dirty or not, package version), the software and the
machine. Written into every run's ``config.json`` (``"provenance"``) and shown by the report.

``RLVR_ENTROPY_COMMAND`` (set by ``rlvr-entropy compare`` for the runs it starts) overrides the recorded command, so
a compare's runs name the command the user typed, not the internal one.
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

COMMAND_ENV = "RLVR_ENTROPY_COMMAND"


def command_line(argv: list[str] | None = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("rlvr-entropy", "cli.py", "__main__.py")):
        argv[0] = "rlvr-entropy"
    return " ".join(shlex.quote(a) for a in argv)


def git_commit(path: str | Path | None = None) -> str | None:
    """``<sha>`` or ``<sha>-dirty`` of the checkout holding ``path`` (default: this package); None outside git."""
    where = str(Path(path) if path else Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "-C", where, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def provenance(threads: int | None = None) -> dict:
    import torch

    import rlvr_entropy

    return {"command": os.environ.get(COMMAND_ENV) or command_line(), "commit": git_commit(),
            "version": rlvr_entropy.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)", "threads": threads,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
