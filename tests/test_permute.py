"""Token permutation (SPEC.md section 6): the generalized Hilbert curve is a permutation of any
T x H x W grid with its inverse, it is local (what the construction guarantees about unit steps,
asserted exactly), and attention on permuted Q, K, V, unpermuted, equals attention on the
original tokens, with and without a text prefix. Bad inputs raise, naming the argument."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import assert_close, assert_equal, make_qkv

import sparge_cupy as sc
from sparge_cupy import reference as R
from sparge_cupy.permute import (curve_coordinates, hilbert_permutation, permute_tokens,
                                 unpermute_tokens)

GRIDS = [(1, 1, 1), (1, 7, 13), (3, 5, 8), (2, 16, 16), (4, 9, 6), (1, 1, 17), (5, 1, 1),
         (3, 1, 4), (1, 33, 2), (2, 3, 2), (7, 1, 9), (1, 64, 64), (1, 30, 45), (6, 10, 14)]


def steps(T, H, W):
    """Per step of the curve: (Manhattan distance, Chebyshev distance) between consecutive cells."""
    d = np.abs(np.diff(curve_coordinates(T, H, W), axis=0))
    return d.sum(axis=1), d.max(axis=1, initial=0)


# ------------------------------------------------------------------ a permutation and its inverse

@pytest.mark.parametrize("T,H,W", GRIDS)
def test_perm_is_a_permutation_with_its_inverse(T, H, W):
    n = T * H * W
    perm, inv = hilbert_permutation(T, H, W)
    assert perm.dtype == np.int64 and inv.dtype == np.int64
    assert perm.shape == (n,) and inv.shape == (n,)
    assert_equal(np.sort(perm), np.arange(n), what="sorted perm")
    assert_equal(inv[perm], np.arange(n), what="inv_perm[perm]")
    assert_equal(perm[inv], np.arange(n), what="perm[inv_perm]")
    # perm is the row-major index t*H*W + h*W + w of the curve's cells, starting at the origin
    c = curve_coordinates(T, H, W)
    assert_equal(c[0], np.zeros(3, np.int64), what="first cell")
    assert_equal(perm, (c[:, 0] * H + c[:, 1]) * W + c[:, 2], what="perm from coordinates")
    assert (c >= 0).all() and (c < np.array([T, H, W])).all()


def test_every_small_grid_is_covered_once():
    for T, H, W in itertools.product(range(1, 6), range(1, 7), range(1, 7)):
        perm, inv = hilbert_permutation(T, H, W)
        assert np.array_equal(np.sort(perm), np.arange(T * H * W)), (T, H, W)
        assert np.array_equal(inv[perm], np.arange(T * H * W)), (T, H, W)


def test_results_are_fresh_arrays():
    perm, inv = hilbert_permutation(2, 3, 4)
    perm[:] = 0
    inv[:] = 0
    again, _ = hilbert_permutation(2, 3, 4)
    assert np.array_equal(np.sort(again), np.arange(24))


# ------------------------------------------------------------------ locality

def test_2d_curve_steps_to_neighbours_with_at_most_one_diagonal():
    """2-D: all unit steps, except exactly one diagonal step when the longer side is odd and the
    shorter even and > 2 (the curve is entered along the longer side; width and height play the same
    role, whether the grid is H x W, T x W or T x H)."""
    for a, b in itertools.product(range(1, 41), range(1, 41)):
        for shape in ((1, a, b), (a, 1, b)):
            manhattan, chebyshev = steps(*shape)
            if manhattan.size == 0:
                continue
            long_side, short_side = max(a, b), min(a, b)
            expected = int(long_side % 2 == 1 and short_side % 2 == 0 and short_side > 2)
            assert (chebyshev == 1).all(), (shape, "a step leaves the 8 neighbours")
            assert int((manhattan != 1).sum()) == expected, (shape, int((manhattan != 1).sum()))
            if a * b >= 11:
                assert (manhattan == 1).mean() >= 0.9, shape


@pytest.mark.parametrize("T,H,W", [(1, 7, 13), (1, 30, 45), (1, 33, 2), (2, 3, 2), (1, 1, 17)])
def test_2d_unit_step_share_of_odd_grids(T, H, W):
    manhattan, _ = steps(T, H, W)
    assert (manhattan == 1).mean() >= 0.9


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32, 64, 128])
def test_power_of_two_squares_are_all_unit_steps(n):
    manhattan, _ = steps(1, n, n)
    assert (manhattan == 1).all()


def test_3d_curve_steps_to_neighbours():
    """3-D: unit steps only when T, H, W are all even; every step within the 26 neighbours; at
    least 90% unit steps on every grid up to 8 x 8 x 8."""
    for shape in itertools.product(range(2, 9), repeat=3):
        manhattan, chebyshev = steps(*shape)
        assert (chebyshev == 1).all(), shape
        assert (manhattan == 1).mean() >= 0.9, (shape, (manhattan == 1).mean())
        if all(s % 2 == 0 for s in shape):
            assert (manhattan == 1).all(), shape


def test_blocks_are_compact_patches():
    """What the permutation is for: a block of 64 consecutive tokens covers a compact patch of a
    64 x 64 grid (8 x 8 for the Hilbert curve) instead of one strip of a row (1 x 64)."""
    c = curve_coordinates(1, 64, 64).reshape(-1, 64, 3)
    extent = c.max(axis=1) - c.min(axis=1) + 1
    assert (extent[:, 1] * extent[:, 2] == 64).all()


# ------------------------------------------------------------------ attention is invariant

def _grid_qkv(prefix, grid, layout, *, D=64, Hq=2, Hkv=1, seed=3):
    T, H, W = grid
    L = prefix + T * H * W
    return make_qkv(1, Hq, Hkv, L, L, D, dtype=np.float64, layout=layout, seed=seed)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("prefix,grid", [(0, (3, 5, 8)), (17, (3, 5, 8)), (5, (1, 7, 13)),
                                         (1, (2, 16, 16))])
def test_dense_attention_is_invariant(layout, prefix, grid):
    q, k, v = _grid_qkv(prefix, grid, layout)
    perm, _ = hilbert_permutation(*grid)
    qp, kp, vp = (permute_tokens(x, perm, layout=layout, prefix=prefix) for x in (q, k, v))
    out = unpermute_tokens(R.dense_attention(qp, kp, vp, layout=layout), perm, layout=layout,
                           prefix=prefix)
    ref = R.dense_attention(q, k, v, layout=layout)
    # float64 softmax over the same keys in another order: only summation order differs
    assert_close(out, ref, 1e-12 * np.abs(v).max(), what="unpermuted attention")


def test_permute_moves_only_grid_tokens():
    prefix, grid = 7, (2, 3, 4)
    x = np.arange(1 * 2 * (prefix + 24) * 3, dtype=np.float32).reshape(1, 2, prefix + 24, 3)
    perm, inv = hilbert_permutation(*grid)
    y = permute_tokens(x, perm, prefix=prefix)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_equal(y[:, :, :prefix], x[:, :, :prefix], what="text prefix")
    assert_equal(y[:, :, prefix:], x[:, :, prefix:][:, :, perm], what="grid tokens")
    assert_equal(unpermute_tokens(y, perm, prefix=prefix), x, what="round trip")
    # NHD holds tokens on axis 1
    xn = np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    assert_equal(permute_tokens(xn, perm, layout="NHD", prefix=prefix),
                 y.transpose(0, 2, 1, 3), what="NHD permutation")
    # any permutation of the grid tokens is accepted, not only the curve's
    assert_equal(unpermute_tokens(permute_tokens(x, inv, prefix=prefix), inv, prefix=prefix), x,
                 what="round trip with inv_perm")


@pytest.mark.parametrize("qk,pv", [("int8", "fp8"), ("fp16", "fp16")])
@pytest.mark.parametrize("prefix", [0, 9])
def test_sparge_attn_all_blocks_is_invariant(qk, pv, prefix):
    """SpargeAttn with every block kept (theta = 1: no block is self-similar, so all are fix
    blocks). Quantization blocks hold other tokens after the permutation, so the two results are
    not bit-equal: each must be as accurate against the float64 truth as the other (at most
    twice the unpermuted run's error, plus a few float32 ulps)."""
    grid = (2, 12, 13)
    q, k, v = (x.astype(np.float32) for x in _grid_qkv(prefix, grid, "HND", seed=5))
    perm, _ = hilbert_permutation(*grid)
    kw = dict(simthreshd1=1.0, qk=qk, pv=pv, return_stats=True)
    plain, st = sc.sparge_attn(q, k, v, **kw)
    qp, kp, vp = (permute_tokens(x, perm, prefix=prefix) for x in (q, k, v))
    out_p, st_p = sc.sparge_attn(qp, kp, vp, **kw)
    out = unpermute_tokens(out_p, perm, prefix=prefix)
    assert st["stage1_sparsity"] == 0.0 and st_p["stage1_sparsity"] == 0.0
    truth = R.dense_attention(q, k, v)
    err = np.abs(np.asarray(plain, np.float64) - truth).max()
    tol = 2 * err + 8 * np.finfo(np.float32).eps * np.abs(v).max()
    assert_close(out, truth, tol, what="unpermuted SpargeAttn")
    assert R.relative_l1(out, truth) <= 1.5 * R.relative_l1(plain, truth) + 1e-6


# ------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("name,value,exc", [
    ("T", 0, ValueError), ("H", -3, ValueError), ("W", 2.0, TypeError), ("T", True, TypeError),
    ("H", "4", TypeError), ("W", None, TypeError),
])
def test_bad_grid_raises(name, value, exc):
    args = {"T": 2, "H": 3, "W": 4, name: value}
    with pytest.raises(exc, match=f"^{name}:"):
        hilbert_permutation(**args)
    with pytest.raises(exc, match=f"^{name}:"):
        curve_coordinates(**args)


def test_numpy_integer_extents_are_accepted():
    perm, _ = hilbert_permutation(np.int64(2), np.int32(3), 4)
    assert perm.size == 24


def test_bad_permute_arguments_raise():
    perm, _ = hilbert_permutation(2, 3, 4)
    x = np.zeros((1, 2, 24, 8), np.float32)
    with pytest.raises(ValueError, match=r"^x: expected L = prefix \+ len\(perm\) = 3 \+ 24"):
        permute_tokens(x, perm, prefix=3)
    with pytest.raises(ValueError, match="^o: expected L"):
        unpermute_tokens(x, perm, layout="NHD")         # NHD reads L on axis 1 (2 tokens)
    with pytest.raises(ValueError, match="^layout:"):
        permute_tokens(x, perm, layout="BHLD")
    with pytest.raises(ValueError, match="^x: expected 4 dimensions"):
        permute_tokens(x[0], perm)
    with pytest.raises(TypeError, match="^prefix:"):
        permute_tokens(x, perm, prefix=1.0)
    with pytest.raises(ValueError, match="^prefix:"):
        permute_tokens(x, perm, prefix=-1)
    with pytest.raises(TypeError, match="^x:"):
        permute_tokens(x.tolist(), perm)
    with pytest.raises(TypeError, match="^o:"):
        unpermute_tokens(x.tolist(), perm)
    with pytest.raises(TypeError, match="^perm:"):
        permute_tokens(x, list(perm))
    with pytest.raises(TypeError, match="^perm:"):
        permute_tokens(x, perm.astype(np.float64))
    with pytest.raises(ValueError, match="^perm: expected a non-empty 1-D"):
        permute_tokens(x, perm.reshape(4, 6))
    dup = perm.copy()
    dup[0] = dup[1]
    with pytest.raises(ValueError, match=r"^perm: expected a permutation of range\(24\)"):
        permute_tokens(x, dup)
    with pytest.raises(ValueError, match="^perm: expected a permutation"):
        permute_tokens(x, perm + 1)


@pytest.mark.gpu
def test_cupy_arrays_match_numpy():
    cupy = pytest.importorskip("cupy")
    if not cupy.is_available():
        pytest.skip("no CUDA GPU")
    perm, _ = hilbert_permutation(3, 5, 8)
    x = np.random.default_rng(0).standard_normal((1, 2, 124, 16)).astype(np.float32)
    y = permute_tokens(cupy.asarray(x), perm, prefix=4)
    assert isinstance(y, cupy.ndarray)
    assert_equal(y.get(), permute_tokens(x, perm, prefix=4), what="CuPy permutation")
    assert_equal(unpermute_tokens(y, cupy.asarray(perm), prefix=4).get(), x, what="CuPy round trip")
