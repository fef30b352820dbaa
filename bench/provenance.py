"""Which code a results file came from: the commit, for bench/ and scripts/ alike."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(root=ROOT):
    """``SPARGE_COMMIT`` if set (the device machine gets a copy of the tree without .git), else
    ``git describe --always --dirty --abbrev=7`` of ``root``, else ``"unknown"``."""
    if os.environ.get("SPARGE_COMMIT"):
        return os.environ["SPARGE_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=root,
                              capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"
