"""Token permutation for image and video models (SPEC.md section 6).

Attention is invariant to permuting keys and values together, and permuting the queries permutes
the output rows the same way. The tokens of an image or video model form a T x H x W grid, stored
row-major (token ``t*H*W + h*W + w``); in that order a block of 128 tokens is a thin strip of one
or two image rows, whose tokens are far apart in the picture. Ordering the grid along a Hilbert
curve instead makes every block a compact patch of neighbouring tokens, so more blocks are
self-similar (SPEC.md section 1) and prediction can skip more of them.

The curve is the *generalized* Hilbert curve ("gilbert", after Jakub Červený's construction,
reimplemented here): it covers a box of any size, not only powers of two, and visits every cell
exactly once, always moving to one of the 8 (2-D) or 26 (3-D) neighbouring cells. What it
guarantees about unit steps (moves to a face neighbour), checked by ``tests/test_permute.py``:

- 2-D (one of T, H, W is 1): every step is a unit step, except exactly one diagonal step when
  the longer side is odd and the shorter side even and > 2. Power-of-two squares give the classic
  Hilbert curve.
- 3-D (T, H, W all > 1): every step is a unit step when T, H and W are all even; otherwise some
  steps are diagonal (at least 90% are unit steps on every such grid up to 8 x 8 x 8).

Use::

    from sparge_cupy.permute import hilbert_permutation, permute_tokens, unpermute_tokens

    perm, _ = hilbert_permutation(T, H, W)                      # once per grid shape
    q, k, v = (permute_tokens(x, perm, prefix=n_text) for x in (q, k, v))
    o = sparge_cupy.sparge_attn(q, k, v)
    o = unpermute_tokens(o, perm, prefix=n_text)                # back to row-major order

Causal attention is *not* invariant to a permutation of the grid tokens (the mask follows token
positions): use the permutation with non-causal attention, as image and video models do.
"""
from __future__ import annotations

import numbers
from functools import lru_cache

import numpy as np

from . import _checks as ck

__all__ = ["curve_coordinates", "hilbert_permutation", "permute_tokens", "unpermute_tokens"]

_TOKEN_AXIS = {"HND": 2, "NHD": 1}


# --------------------------------------------------------------------------------------------
# The generalized Hilbert curve
#
# A box is given by its first corner ``p`` and up to three edge vectors: ``a`` the major axis
# (the curve enters at ``p`` and leaves next to ``p + a - unit(a)``), ``b`` and ``c`` the others.
# Each vector points along one grid axis, with a sign; its length is the box's size along it.
# The box is cut in halves along its axes and the halves are visited in an order (and with
# orientations) such that each one ends next to where the following one starts. Halves are made
# even where possible ("prefer even steps"): a box of even width can be crossed and left at the
# far end with unit steps only, which is what keeps the curve free of diagonal jumps.
# --------------------------------------------------------------------------------------------

# Vectors are (t, h, w) int 3-tuples; these run once per box, so they are written out by hand.

def _add(*vs):
    x = y = z = 0
    for v in vs:
        x, y, z = x + v[0], y + v[1], z + v[2]
    return (x, y, z)


def _neg(v):
    return (-v[0], -v[1], -v[2])


def _unit(v):
    return ((v[0] > 0) - (v[0] < 0), (v[1] > 0) - (v[1] < 0), (v[2] > 0) - (v[2] < 0))


def _size(v):
    return abs(v[0] + v[1] + v[2])      # an edge lies along one axis: its only non-zero entry


def _half(v, even=True):
    """Half of edge ``v`` (rounded towards zero); with ``even``, made even when the edge is
    longer than 2 (an odd half would end its sub-curve at the wrong side)."""
    h = (int(v[0] / 2), int(v[1] / 2), int(v[2] / 2))
    if even and _size(h) % 2 and _size(v) > 2:
        h = _add(h, _unit(v))
    return h


def _line(out, p, a):
    """Visit the cells ``p, p + unit(a), ...`` along a box of width 1 in all but one axis."""
    out.append((p, _unit(a), _size(a)))


def _curve2d(out, p, a, b):
    """Visit the box ``p + [0, a) x [0, b)``, entering at ``p``, leaving near ``p + a``."""
    w, h = _size(a), _size(b)
    if h == 1:
        return _line(out, p, a)
    if w == 1:
        return _line(out, p, b)
    ua, ub = _unit(a), _unit(b)
    if 2 * w > 3 * h:
        # long box: two halves side by side along a, each traversed the same way
        a2 = _half(a)
        _curve2d(out, p, a2, b)
        _curve2d(out, _add(p, a2), _add(a, _neg(a2)), b)
        return
    # square-ish box: up the first half of b, across the whole of a, down the second part
    a2, b2 = _half(a, even=False), _half(b)
    rest_a = _add(a, _neg(a2))
    _curve2d(out, p, b2, a2)
    _curve2d(out, _add(p, b2), a, _add(b, _neg(b2)))
    _curve2d(out, _add(p, a, _neg(ua), b2, _neg(ub)), _neg(b2), _neg(rest_a))


def _curve3d(out, p, a, b, c):
    """Visit the box ``p + [0, a) x [0, b) x [0, c)``, entering at ``p``, leaving near ``p + a``."""
    w, h, d = _size(a), _size(b), _size(c)
    if h == 1 and d == 1:
        return _line(out, p, a)
    if w == 1 and d == 1:
        return _line(out, p, b)
    if w == 1 and h == 1:
        return _line(out, p, c)
    ua, ub, uc = _unit(a), _unit(b), _unit(c)
    a2, b2, c2 = _half(a), _half(b), _half(c)
    ra, rb, rc = _add(a, _neg(a2)), _add(b, _neg(b2)), _add(c, _neg(c2))   # the second parts
    if 2 * w > 3 * h and 2 * w > 3 * d:
        # wide box: split along a only
        _curve3d(out, p, a2, b, c)
        _curve3d(out, _add(p, a2), ra, b, c)
    elif 3 * h > 4 * d:
        # flat in c: split along a and b, not c (the 2-D pattern, with c carried along)
        _curve3d(out, p, b2, c, a2)
        _curve3d(out, _add(p, b2), a, rb, c)
        _curve3d(out, _add(p, a, _neg(ua), b2, _neg(ub)), _neg(b2), c, _neg(ra))
    elif 3 * d > 4 * h:
        # flat in b: split along a and c, not b
        _curve3d(out, p, c2, a2, b)
        _curve3d(out, _add(p, c2), a, b, rc)
        _curve3d(out, _add(p, a, _neg(ua), c2, _neg(uc)), _neg(c2), _neg(ra), b)
    else:
        # cube-ish box: split along all three axes, eight octants visited in five runs
        _curve3d(out, p, b2, c2, a2)
        _curve3d(out, _add(p, b2), c, a2, rb)
        _curve3d(out, _add(p, b2, _neg(ub), c, _neg(uc)), a, _neg(b2), _neg(rc))
        _curve3d(out, _add(p, a, _neg(ua), b2, c, _neg(uc)), _neg(c), _neg(ra), rb)
        _curve3d(out, _add(p, a, _neg(ua), b2, _neg(ub)), _neg(b2), c2, _neg(ra))


def _check_extent(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if int(value) < 1:
        raise ValueError(f"{name}: expected a positive int, got {int(value)}")
    return int(value)


@lru_cache(maxsize=32)
def _coordinates(T, H, W):
    shape = (T, H, W)
    # Axes of extent 1 carry no locality: run the curve of the dimension that is really there
    # (a 1 x H x W video is an H x W image along the 2-D curve, not a flat 3-D box).
    axes = [i for i in range(3) if shape[i] > 1]
    # the longest axis is the major one, so the curve's first cut halves it
    axes.sort(key=lambda i: -shape[i])
    edges = []
    for i in axes:
        e = [0, 0, 0]
        e[i] = shape[i]
        edges.append(tuple(e))
    out = []                    # runs (start, unit step, length) in curve order
    origin = (0, 0, 0)
    if not edges:
        _line(out, origin, (1, 0, 0))
    elif len(edges) == 1:
        _line(out, origin, edges[0])
    elif len(edges) == 2:
        _curve2d(out, origin, *edges)
    else:
        _curve3d(out, origin, *edges)
    start, step, length = (np.array(col, dtype=np.int64) for col in zip(*out))
    run = np.repeat(np.arange(len(out)), length)
    offset = np.arange(run.size) - np.repeat(np.cumsum(length) - length, length)
    coords = start[run] + offset[:, None] * step[run]
    coords.setflags(write=False)
    return coords


def curve_coordinates(T, H, W):
    """The cells of the T x H x W grid in curve order: int64 ``[T*H*W, 3]`` rows ``(t, h, w)``.

    Starts at ``(0, 0, 0)``; every cell appears exactly once. Axes of extent 1 are ignored, so a
    single frame (T = 1) follows the 2-D curve over H x W.
    """
    T, H, W = _check_extent("T", T), _check_extent("H", H), _check_extent("W", W)
    return _coordinates(T, H, W).copy()


def hilbert_permutation(T, H, W):
    """``(perm, inv_perm)`` for a T x H x W token grid stored row-major (``t*H*W + h*W + w``).

    ``perm[i]`` is the row-major index of the i-th token along the generalized Hilbert curve, so
    ``x[..., perm, :]`` puts the tokens in curve order; ``inv_perm`` is its inverse
    (``inv_perm[perm] == arange(T*H*W)``) and ``y[..., inv_perm, :]`` puts them back. Both int64
    NumPy arrays of length T*H*W, for any positive T, H, W.
    """
    T, H, W = _check_extent("T", T), _check_extent("H", H), _check_extent("W", W)
    coords = _coordinates(T, H, W)
    perm = (coords[:, 0] * H + coords[:, 1]) * W + coords[:, 2]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(perm.size, dtype=np.int64)
    return perm, inv_perm


# --------------------------------------------------------------------------------------------
# Applying a permutation to Q, K, V and its inverse to O
# --------------------------------------------------------------------------------------------

def _array_module(name, x):
    module = ck.array_module_name(x)
    if module == "numpy":
        return np
    if module == "cupy":
        import cupy
        return cupy
    raise TypeError(f"{name}: expected a NumPy or CuPy array, "
                    f"got {type(x).__module__}.{type(x).__name__}")


def _check_perm(perm):
    """``perm`` as a host int64 array, checked to be a permutation of ``range(len(perm))``."""
    if not hasattr(perm, "shape") or not hasattr(perm, "dtype"):
        raise TypeError(f"perm: expected an integer array (from hilbert_permutation), "
                        f"got {type(perm).__name__}")
    host = perm.get() if ck.array_module_name(perm) == "cupy" else np.asarray(perm)
    if host.ndim != 1 or host.size == 0:
        raise ValueError(f"perm: expected a non-empty 1-D array, got shape {tuple(host.shape)}")
    if not np.issubdtype(host.dtype, np.integer):
        raise TypeError(f"perm: expected an integer dtype, got {host.dtype}")
    host = host.astype(np.int64, copy=False)
    n = host.size
    if host.min() < 0 or host.max() >= n or np.bincount(host, minlength=n).max() != 1:
        raise ValueError(f"perm: expected a permutation of range({n}) (each index exactly once)")
    return host


def _token_index(name, x, perm, layout, prefix, *, inverse):
    """(module, token axis, full index over the L tokens) after checking every argument;
    ``name`` is the argument ``x`` was passed as, for the error messages."""
    xp = _array_module(name, x)
    layout = ck.check_choice("layout", layout, ck.LAYOUTS)
    if len(x.shape) != 4:
        dims = "[B, H, L, D]" if layout == "HND" else "[B, L, H, D]"
        raise ValueError(f"{name}: expected 4 dimensions ({dims} for layout {layout!r}), "
                         f"got shape {tuple(int(s) for s in x.shape)}")
    if isinstance(prefix, (bool, np.bool_)) or not isinstance(prefix, numbers.Integral):
        raise TypeError(f"prefix: expected a non-negative int, got {type(prefix).__name__} {prefix!r}")
    if prefix < 0:
        raise ValueError(f"prefix: expected a non-negative int, got {int(prefix)}")
    prefix = int(prefix)
    host = _check_perm(perm)
    axis = _TOKEN_AXIS[layout]
    L = int(x.shape[axis])
    if L != prefix + host.size:
        raise ValueError(f"{name}: expected L = prefix + len(perm) = {prefix} + {host.size} = "
                         f"{prefix + host.size} tokens on axis {axis} (layout {layout!r}), got {L}")
    if inverse:
        inv = np.empty_like(host)
        inv[host] = np.arange(host.size, dtype=np.int64)
        host = inv
    # the text prefix keeps its place; grid token i of the result is grid token host[i]
    index = np.concatenate([np.arange(prefix, dtype=np.int64), prefix + host])
    return xp, axis, xp.asarray(index)


def permute_tokens(x, perm, *, layout="HND", prefix=0):
    """Reorder the grid tokens of ``x`` along ``perm``; the first ``prefix`` tokens stay in place.

    Args:
      x: Q, K or V, ``[B, H, L, D]`` (layout "HND") or ``[B, L, H, D]`` ("NHD"), NumPy or CuPy,
        any dtype. ``L`` must be ``prefix + len(perm)``: ``prefix`` non-grid (e.g. text) tokens
        followed by the T*H*W grid tokens in row-major order.
      perm: the ``perm`` of :func:`hilbert_permutation` (or any permutation of the grid tokens).
    Returns a new array of ``x``'s module, shape and dtype, whose grid token i is ``x``'s grid
    token ``perm[i]``.
    """
    xp, axis, index = _token_index("x", x, perm, layout, prefix, inverse=False)
    return xp.take(x, index, axis=axis)


def unpermute_tokens(o, perm, *, layout="HND", prefix=0):
    """Undo :func:`permute_tokens` (same ``perm``, ``layout``, ``prefix``): typically on the
    attention output of permuted Q, K, V, which returns it to row-major token order."""
    xp, axis, index = _token_index("o", o, perm, layout, prefix, inverse=True)
    return xp.take(o, index, axis=axis)
