"""Input checks shared by the NumPy and the CuPy paths (and the torch adapter).

Every check raises ``TypeError`` or ``ValueError`` naming the argument, what was expected and what
was given; nothing here uses ``assert``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .config import CONFIG

LAYOUTS = ("HND", "NHD")
QK_MODES = ("int8", "fp16")
PV_MODES = ("fp8", "fp16")
DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Shapes:
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    nq: int
    nk: int
    dtype: str


def dtype_name(x):
    """'float16', 'bfloat16', 'float32', ... for NumPy (ml_dtypes), CuPy and torch arrays."""
    return str(x.dtype).replace("torch.", "")


def _shape_str(shape):
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_qkv(q, k, v, layout):
    """Shapes of a (q, k, v) triple in ``layout``; raises on any inconsistency."""
    layout = check_choice("layout", layout, LAYOUTS)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: expected an array (NumPy, CuPy or torch), got {type(x).__name__}")
        if len(x.shape) != 4:
            raise ValueError(f"{name}: expected 4 dimensions ({'[B, H, L, D]' if layout == 'HND' else '[B, L, H, D]'}"
                             f" for layout {layout!r}), got shape {_shape_str(x.shape)}")
        if dtype_name(x) not in DTYPES:
            raise TypeError(f"{name}: expected dtype one of {DTYPES}, got {dtype_name(x)}")
        if 0 in tuple(x.shape):
            raise ValueError(f"{name}: every dimension must be >= 1, got shape {_shape_str(x.shape)}")
    if not (dtype_name(q) == dtype_name(k) == dtype_name(v)):
        raise TypeError(f"q, k, v: expected one dtype, got {dtype_name(q)}, {dtype_name(k)}, {dtype_name(v)}")
    hnd = (lambda s: s) if layout == "HND" else (lambda s: (s[0], s[2], s[1], s[3]))
    (B, Hq, Lq, D), (Bk, Hkv, Lk, Dk), (Bv, Hv, Lv, Dv) = (hnd(tuple(int(s) for s in x.shape)) for x in (q, k, v))
    if not (B == Bk == Bv):
        raise ValueError(f"q, k, v: expected one batch size, got {B}, {Bk}, {Bv}")
    if (Hkv, Lk) != (Hv, Lv):
        raise ValueError(f"v: expected the heads and length of k ({Hkv} heads, {Lk} tokens), "
                         f"got {Hv} heads, {Lv} tokens")
    if Dk != D or Dv != D:
        raise ValueError(f"k, v: expected head dim {D} (that of q), got {Dk} and {Dv}")
    if D > CONFIG.max_head_dim:
        raise ValueError(f"q: head dim must be <= {CONFIG.max_head_dim}, got {D}")
    if Hq % Hkv:
        raise ValueError(f"q, k: query heads must be a multiple of key/value heads, got Hq={Hq}, Hkv={Hkv}")
    return Shapes(B, Hq, Hkv, Lq, Lk, D, -(-Lq // CONFIG.block_q), -(-Lk // CONFIG.block_k), dtype_name(q))


def check_scale(scale, D):
    if scale is None:
        return D ** -0.5
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
    if not math.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
    return float(scale)


def _host_values(value):
    """A threshold's values on the host: a CuPy array through ``.get()``, a torch tensor (any
    device or float dtype, also one that requires grad) as a float64 NumPy array, a list of
    0-d tensors entry by entry; anything else as given."""
    if hasattr(value, "get") and not isinstance(value, dict):
        return value.get()
    if array_module_name(value) == "torch":
        t = value.detach()
        if t.device.type == "meta":
            raise TypeError("a tensor on the meta device (no values)")
        return (t.cpu().double() if t.is_floating_point() else t.cpu()).numpy()
    if isinstance(value, (list, tuple)):
        return [_host_values(x) if array_module_name(x) == "torch" else x for x in value]
    return value


def per_head(name, value, Hq, lo, hi, *, lo_open=False, allow_inf=False, none_is=None):
    """A per-head threshold as float32 ``[Hq]``: a scalar or one value per query head, within
    [lo, hi] (``(lo, hi]`` with ``lo_open``). ``none_is``: the value a None entry of a sequence
    stands for (None: a None entry is an error)."""
    expected = f"{name}: expected a number or a sequence of {Hq} numbers"
    if value is None:
        raise TypeError(f"{expected}, got None")
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{expected}, got a bool")
    if isinstance(value, (str, bytes)):             # np.asarray would parse "0.5"
        raise TypeError(f"{expected}, got a string {value!r}")
    try:
        raw = _host_values(value)
    except TypeError as e:
        raise TypeError(f"{expected}, got {e}") from None
    if isinstance(raw, (list, tuple)):              # the entries, which np.asarray would coerce
        for h, x in enumerate(raw):
            if x is None and none_is is None:
                raise TypeError(f"{expected}, got None for head {h}")
            if isinstance(x, (bool, np.bool_, str, bytes)):
                raise TypeError(f"{expected}, got {x!r} ({type(x).__name__}) for head {h}")
        raw = [none_is if x is None else x for x in raw]
    try:
        arr = np.asarray(raw)
        if arr.dtype.kind == "O" and not all(isinstance(x, numbers.Real) for x in arr.ravel()):
            raise TypeError
        if arr.dtype.kind not in "iufO":            # strings, bools, complex
            raise TypeError
        arr = arr.astype(np.float64)
    except (TypeError, ValueError):
        what = f"dtype {arr.dtype}" if isinstance(raw, np.ndarray) else type(value).__name__
        raise TypeError(f"{expected}, got {what}") from None
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != Hq):
        raise ValueError(f"{name}: expected a scalar or {Hq} values (one per query head), "
                         f"got shape {_shape_str(arr.shape)}")
    bad = np.isnan(arr) | (np.isinf(arr) & (not allow_inf)) | (arr > hi) | ((arr <= lo) if lo_open else (arr < lo))
    if bad.any():
        first = arr.ravel()[np.flatnonzero(bad.ravel())[0]]
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name}: expected values in {bracket}{lo}, {hi}], got {float(first)}"
                         + (f" ({int(bad.sum())} of {arr.size} out of range)" if arr.ndim else ""))
    return np.broadcast_to(arr.astype(np.float32), (Hq,)).copy()


def check_thresholds(shapes, *, simthreshd1, cdfthreshd, topk, mass_threshold=None):
    """Normalise (theta, tau, topk, mass threshold) to per-head float32 arrays; exactly one of the
    three selection rules (the others None)."""
    given = [n for n, x in (("cdfthreshd", cdfthreshd), ("topk", topk),
                            ("mass_threshold", mass_threshold)) if x is not None]
    if len(given) != 1:
        raise ValueError("cdfthreshd, topk, mass_threshold: expected exactly one of them, got "
                         + (" and ".join(given) if given else "none"))
    theta = per_head("simthreshd1", simthreshd1, shapes.Hq, -1.0, 1.0)
    tau = None if cdfthreshd is None else per_head("cdfthreshd", cdfthreshd, shapes.Hq, 0.0, 1.0, lo_open=True)
    kk = None if topk is None else per_head("topk", topk, shapes.Hq, 0.0, 1.0, lo_open=True)
    mt = None if mass_threshold is None else per_head("mass_threshold", mass_threshold, shapes.Hq,
                                                      0.0, np.inf, allow_inf=True)
    return theta, tau, kk, mt


def check_predictor(predictor, xp_name=None):
    """The Stage-1 estimate: one of reference.predict.PREDICTORS (each has a kernel and a
    reference mirror, so every array type takes every one)."""
    from .reference.predict import PREDICTORS
    return check_choice("predictor", predictor, PREDICTORS)


def check_pvthreshd(pvthreshd, Hq):
    """lambda in log2 units, > 0 (``inf`` allowed); ``None`` turns the filter off (all ``inf``),
    a None entry of a per-head sequence for that head (as tuning files write an "off" head)."""
    if pvthreshd is None:
        return np.full((Hq,), np.inf, dtype=np.float32)
    return per_head("pvthreshd", pvthreshd, Hq, 0.0, np.inf, lo_open=True, allow_inf=True,
                    none_is=np.inf)


def check_block_map(block_map, shapes, xp_name):
    expected = (shapes.B, shapes.Hq, shapes.nq, shapes.nk)
    if not hasattr(block_map, "shape") or not hasattr(block_map, "dtype"):
        raise TypeError(f"block_map: expected a bool array of shape {_shape_str(expected)}, "
                        f"got {type(block_map).__name__}")
    if array_module_name(block_map) != xp_name:
        raise TypeError(f"block_map: expected a {xp_name} array like q, got {array_module_name(block_map)}")
    if dtype_name(block_map) != "bool":
        raise TypeError(f"block_map: expected dtype bool, got {dtype_name(block_map)} (use .astype(bool))")
    if tuple(int(s) for s in block_map.shape) != expected:
        raise ValueError(f"block_map: expected shape [B, Hq, nq, nk] = {_shape_str(expected)} "
                         f"(blocks of {CONFIG.block_q} x {CONFIG.block_k}), got {_shape_str(block_map.shape)}")


def array_module_name(x):
    """"numpy", "cupy", "torch" or the top-level module of ``x``'s type (a subclass of
    numpy.ndarray counts as NumPy)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__.split(".")[0]
    return {"numpy": "numpy", "cupy": "cupy", "torch": "torch"}.get(mod, mod)


def check_same_module(q, k, v):
    names = [array_module_name(x) for x in (q, k, v)]
    if len(set(names)) != 1:
        raise TypeError(f"q, k, v: expected arrays of one library, got {', '.join(names)}")
    name = names[0]
    if name == "torch":
        raise TypeError("q: torch tensors go through sparge_cupy.torch (same functions, zero-copy)")
    if name not in ("numpy", "cupy"):
        raise TypeError(f"q: expected a NumPy or CuPy array, got {type(q).__module__}.{type(q).__name__}")
    return name


def count_nonfinite_numpy(x):
    return int(np.count_nonzero(~np.isfinite(x.astype(np.float32) if dtype_name(x) == "bfloat16" else x)))


def nonfinite_error(name, bad, size):
    """The error for ``bad`` NaN or Inf among the ``size`` elements of argument ``name``."""
    return ValueError(f"{name}: expected finite values, got {bad} NaN or Inf of {size}")


def check_finite(count_nonfinite, **arrays):
    """Non-finite inputs are refused: NaN or Inf would poison a whole block's INT8 scale (and the
    K mean, hence every score of the head), so the output would be wrong far beyond that token.
    ``count_nonfinite(x)`` counts on the array's own device. (CuPy and torch CUDA inputs are
    counted inside the kernels instead: sparge_cupy._gpu.check_counter.)"""
    for name, x in arrays.items():
        bad = count_nonfinite(x)
        if bad:
            raise nonfinite_error(name, bad, math.prod(x.shape))
