"""Where the package's data files live, in a source checkout and in an installed wheel."""
from __future__ import annotations

from pathlib import Path

import sparge_cupy


def cuda_dir() -> Path:
    """The folder of the CUDA sources: ``sparge_cupy/cuda`` in an installed wheel, else the
    repository's top-level ``cuda/``."""
    here = Path(sparge_cupy.__file__).resolve().parent
    installed = here / "cuda"
    return installed if installed.is_dir() else here.parent / "cuda"
