"""Figures of SpargeAttn, drawn from the NumPy reference or from result CSVs (no GPU needed).

- :mod:`.block_maps`: the predicted block map next to the true block attention mass, per head.
- :mod:`.error_sparsity`: error against dense float64 as the thresholds sweep, with quantization
  on and off, so that quantization error and sparsity error are seen apart.
- :mod:`.bench`: dense-equivalent TOPS per method against L and density, from the CSVs of
  ``bench/run_bench.py`` (``python viz/bench.py CSV ... --out PNG``).

Each module runs standalone on CPU (``python viz/block_maps.py [--out PATH]``), writes one PNG of
the default input (``sparge_cupy.data.load_default_qkv``) and prints its path. The figures are
drawn on a ``matplotlib.figure.Figure`` directly, so importing them never changes the pyplot
backend of the caller.

The helpers below are shared by the modules.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["bench", "block_maps", "error_sparsity", "real_model"]


def save_figure(fig, path, *, dpi=None):
    """Write ``fig`` to exactly the returned path: ``path`` as given, with ".png" added where it
    has no extension (matplotlib would add it without saying); its folder is made. A folder, or
    an extension matplotlib cannot write, is a ValueError naming ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path: expected a file name for the figure, got the folder {path}")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    kinds = fig.canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in kinds:
        raise ValueError(f"path: expected a file name ending in one of "
                         f"{', '.join('.' + k for k in sorted(kinds))}, got {str(path)!r} "
                         "(add .png)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def host(x):
    """A NumPy view of ``x`` (CuPy arrays are copied to the host)."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def prepare(q, k, v=None, *, layout, is_causal, scale, simthreshd1, cdfthreshd, topk):
    """Check the inputs as the public API does and bring them to what ``reference`` takes.

    Returns ``(q, k, v, scale, theta, tau, topk)``: HND NumPy arrays (``v`` None if not given),
    the softmax scale as a float, and per-head float32 thresholds (``tau`` defaults to
    ``CONFIG.cdfthreshd`` when neither ``cdfthreshd`` nor ``topk`` is given).
    """
    from sparge_cupy import _checks as ck
    from sparge_cupy import reference as R
    from sparge_cupy.config import CONFIG

    q, k = host(q), host(k)
    v = None if v is None else host(v)
    shapes = ck.check_qkv(q, k, k if v is None else v, layout)
    ck.check_flag("is_causal", is_causal)
    scale = ck.check_scale(scale, shapes.D)
    if cdfthreshd is None and topk is None:
        cdfthreshd = CONFIG.cdfthreshd
    theta, tau, kk, _ = ck.check_thresholds(shapes, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd,
                                            topk=topk)
    q, k = R.to_hnd(q, layout), R.to_hnd(k, layout)
    v = None if v is None else R.to_hnd(v, layout)
    return q, k, v, scale, theta, tau, kk


def default_input_title(data) -> str:
    """One line naming the default input: model, layer, tokens, shape."""
    q = data["q"]
    return (f"{data.get('model', 'default input')} layer {data.get('layer', '?')}, "
            f"{data.get('tokens', q.shape[2])} tokens, q/k/v {list(q.shape)} {q.dtype} (HND)")
