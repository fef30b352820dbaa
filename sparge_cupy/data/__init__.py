"""Data shipped with the package: real attention inputs for the demo (see PROVENANCE.md here)."""
from __future__ import annotations

from importlib import resources

import numpy as np

DEFAULT_QKV = "minilm_l6_qkv.npz"


def load_default_qkv() -> dict:
    """Q, K, V of one attention layer of all-MiniLM-L6-v2 on CPython's docs (see PROVENANCE.md).

    Returns a dict: ``q``, ``k``, ``v`` as float16 arrays [B, H, L, D] (as committed
    [1, 12, 512, 32]), the projections before any scaling; ``scale`` (float, 32**-0.5, the
    model's softmax scale);
    ``token_ids`` (int32 [B, L]); and the metadata as Python values: ``model``,
    ``model_package``, ``layer``, ``tokens``, ``layout``, ``text_source``, ``text`` and
    ``capture_rel_error`` (the float32 capture against the model's own attention output).
    """
    # importlib.resources reads the file from a source checkout, an installed wheel or a zip alike.
    with resources.files(__name__).joinpath(DEFAULT_QKV).open("rb") as f, np.load(f) as npz:
        arrays = {name: npz[name] for name in npz.files}
    out = {}
    for name, a in arrays.items():
        out[name] = a.item() if a.ndim == 0 else a  # 0-d arrays are the metadata
    out["scale"] = float(out["scale"])
    return out
