"""sparge-cupy: SpargeAttn, a training-free sparse and quantized attention, on CuPy and NumPy."""
from __future__ import annotations

from pathlib import Path as _Path

# In a source checkout reference/, viz/ and cuda/ sit beside this package (the repository layout);
# an installed wheel carries them inside it. Either way they are sparge_cupy.reference, ...
_here = _Path(__file__).resolve().parent
if not (_here / "reference").is_dir() and (_here.parent / "reference" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (package __path__)

from .config import CONFIG, SpargeConfig  # noqa: E402
from .api import block_sparse_attn, predict_block_map, sparge_attn  # noqa: E402

__all__ = ["CONFIG", "SpargeConfig", "sparge_attn", "predict_block_map", "block_sparse_attn"]
__version__ = "0.1.0"
