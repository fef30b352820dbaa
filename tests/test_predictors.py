"""Alternative Stage-1 predictors (reference/predictors.py): properties on small synthetic inputs."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import make_qkv

from sparge_cupy import CONFIG
from sparge_cupy import reference as R
from sparge_cupy.reference import predictors as P

F32 = np.float32
BQ, BK = CONFIG.block_q, CONFIG.block_k
SHAPES = [  # (Hq, Hkv, Lq, Lk, causal): ragged edges, GQA, decode-like Lq < Lk
    (2, 2, 300, 300, True),
    (4, 2, 256, 256, True),
    (2, 1, 200, 333, True),
    (2, 2, 190, 260, False),
]


def _inputs(Hq, Hkv, Lq, Lk, seed=0):
    return make_qkv(1, Hq, Hkv, Lq, Lk, 64, seed=seed)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("est", [dict(q_group=128, k_sub=64, variance=1.0),
                                 dict(q_group=16, k_sub=16, variance=1.0),
                                 dict(q_group=128, k_sub=1, variance=0.0),
                                 dict(q_group=32, k_sub=64, variance=0.0, box=1.0),
                                 dict(q_group=128, k_sub=1, q_detail=16),
                                 dict(q_group=128, k_sub=4, q_detail=32, sink_detail=True)])
def test_estimated_mass_is_a_distribution_over_valid_blocks(shape, est):
    Hq, Hkv, Lq, Lk, causal = shape
    q, k, _ = _inputs(Hq, Hkv, Lq, Lk)
    m = P.estimate_block_mass(q, k, is_causal=causal, scale=0.125, **est)
    valid = R.valid_blocks(Lq, Lk, BQ, BK, causal)
    assert m.shape == (1, Hq) + valid.shape
    assert np.all(m >= 0) and np.all(m[..., ~valid] == 0)
    want = np.broadcast_to(np.where(valid.any(-1), 1.0, 0.0), m.shape[:-1])
    np.testing.assert_allclose(m.sum(-1), want, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_rowwise_estimate_against_every_key_is_the_true_mass(shape):
    """q_group = 1, k_sub = 1: the 'estimate' is the exact per-row softmax, so the true block mass."""
    Hq, Hkv, Lq, Lk, causal = shape
    q, k, _ = _inputs(Hq, Hkv, Lq, Lk, seed=1)
    m = P.estimate_block_mass(q, k, is_causal=causal, scale=0.125, q_group=1, k_sub=1, variance=0.0)
    true = R.block_attention_mass(q, k, is_causal=causal, scale=0.125)
    np.testing.assert_allclose(m, true, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_pooled_estimate_without_extras_is_the_papers_compressed_map(shape):
    Hq, Hkv, Lq, Lk, causal = shape
    q, k, _ = _inputs(Hq, Hkv, Lq, Lk, seed=2)
    m = P.estimate_block_mass(q, k, is_causal=causal, scale=0.125, q_group=BQ, k_sub=BK,
                              variance=0.0, count_keys=False)
    _, det = R.predict_block_map(q, k, is_causal=causal, scale=0.125, simthreshd1=np.full(Hq, -1, F32),
                                 cdfthreshd=np.ones(Hq, F32), return_details=True)
    np.testing.assert_allclose(m, det["p_hat"], atol=2e-6)


def test_visible_keys_counts_the_causal_diagonal():
    n = P.visible_keys(256, 256, 1, 64, True)                       # row t sees keys 0..t
    assert n[0, 0] == 1 and n[63, 0] == 64 and n[64, 1] == 1 and n[255, 3] == 64
    assert np.all(n[:64, 1:] == 0)
    g = P.visible_keys(256, 256, 128, 64, True)                     # mean over 128 rows
    np.testing.assert_allclose(g[0], [(64 * 32.5 + 64 * 64) / 128, 64 * 32.5 / 128, 0, 0])
    full = P.visible_keys(100, 70, 16, 64, False)                   # partial last key block: 6 keys
    assert np.all(full[:, 0] == 64) and np.all(full[:-1, 1] == 6) and np.all(full[-1] == [64, 6])


@pytest.mark.parametrize("rule", ["threshold", "cdf"])
@pytest.mark.parametrize("shape", SHAPES)
def test_map_is_monotone_in_the_threshold_and_causally_valid(rule, shape):
    Hq, Hkv, Lq, Lk, causal = shape
    q, k, v = _inputs(Hq, Hkv, Lq, Lk, seed=3)
    valid = R.valid_blocks(Lq, Lk, BQ, BK, causal)
    grid = [1.0, 0.3, 0.1, 0.03, 0.01, 0.0] if rule == "threshold" else [0.0, 0.5, 0.8, 0.95, 0.999, 1.0]
    prev = None
    for t in grid:
        bm = P.predict_block_map_v2(q, k, v, is_causal=causal, scale=0.125, rule=rule,
                                    threshold=np.full(Hq, t), attention_sink=False)
        assert bm.shape == (1, Hq) + valid.shape and bm.dtype == bool
        assert not bm[..., ~valid].any()                               # never an invalid block
        assert np.all(bm.any(-1) == valid.any(-1))                     # >= 1 block per valid row
        if prev is not None:
            assert np.all(bm | ~prev), f"{rule}: threshold {t} dropped a block kept before"
        prev = bm


@pytest.mark.parametrize("score", ["mass", "contribution"])
def test_threshold_extremes(score):
    q, k, v = _inputs(2, 1, 300, 300, seed=4)
    valid = R.valid_blocks(300, 300, BQ, BK, True)
    every = P.predict_block_map_v2(q, k, v, is_causal=True, scale=0.125, threshold=np.zeros(2),
                                   score=score, attention_sink=False)
    assert np.array_equal(every[0, 0], valid) and np.array_equal(every[0, 1], valid)
    one = P.predict_block_map_v2(q, k, v, is_causal=True, scale=0.125, threshold=np.full(2, np.inf),
                                 score=score, attention_sink=False)
    assert np.all(one.sum(-1) == 1)
    # the one block kept is the row's largest score
    s = P.block_scores(q, k, v, is_causal=True, scale=0.125, score=score)
    s = np.where(valid, s, -np.inf)
    assert np.array_equal(np.argmax(one, -1), np.argmax(s, -1))


def test_forced_blocks_sink_and_local_window():
    q, k, v = _inputs(2, 2, 512, 512, seed=5)
    bm = P.predict_block_map_v2(q, k, v, is_causal=True, scale=0.125, threshold=np.full(2, np.inf),
                                local_blocks=2, attention_sink=True)
    valid = R.valid_blocks(512, 512, BQ, BK, True)
    nv = valid.sum(1)
    for i in range(valid.shape[0]):
        assert bm[0, :, i, 0].all()                                     # sink
        assert bm[0, :, i, nv[i] - 2:nv[i]].all()                       # the diagonal 128 x 128
    assert not bm[..., ~valid].any()
    f = P.forced_blocks(512, 512, is_causal=True, local_blocks=0, attention_sink=False)
    assert not f.any()


def test_select_threshold_compares_across_rows():
    """One threshold per head: a row of large scores keeps more than a row of small ones."""
    s = np.array([[[[0.5, 0.3, 0.2, 0.0], [0.04, 0.03, 0.02, 0.01]]]])
    keep = P.select_threshold(s, np.ones_like(s, bool), np.array([0.1]))
    assert keep[0, 0, 0].tolist() == [True, True, True, False]
    assert keep[0, 0, 1].tolist() == [True, False, False, False]       # at least its largest


def test_select_cdf_matches_the_papers_topcdf():
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.full(20, 0.3), size=(1, 3, 7)).astype(F32)
    finite = np.ones(p.shape, bool)
    for tau in (0.5, 0.9, 0.99):
        a = P.select_cdf(p, finite, np.full(3, tau))
        b = R.select_topcdf(p, finite, np.full((3, 1, 1), tau, F32))
        assert np.array_equal(a, b)


def test_contribution_vanishes_when_every_value_block_is_the_same():
    q, k, v = _inputs(2, 1, 256, 256, seed=7)
    v = np.broadcast_to(v[:, :, :1], v.shape).copy()                   # every value row equal
    m = P.estimate_block_mass(q, k, is_causal=True, scale=0.125)
    c = P.estimate_contribution(m, v)
    np.testing.assert_allclose(c, 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="needs v"):
        P.block_scores(q, k, None, is_causal=True, scale=0.125, score="contribution")


def test_bad_options():
    q, k, v = _inputs(2, 1, 256, 256)
    with pytest.raises(ValueError, match="rule"):
        P.predict_block_map_v2(q, k, v, is_causal=True, scale=0.1, threshold=np.zeros(2), rule="topk")
    with pytest.raises(ValueError, match="divide"):
        P.estimate_block_mass(q, k, is_causal=True, scale=0.1, q_group=48)
    with pytest.raises(ValueError, match="score"):
        P.block_scores(q, k, v, is_causal=True, scale=0.1, score="max")


def test_threshold_is_relative_to_uniform_attention_over_the_sequence():
    """q = 0: every key gets the same attention, so nk * m_ij = 1 on full blocks (non-causal).
    Threshold 1 keeps every block, anything above keeps one per row, at every length."""
    for L in (256, 1024):
        q = np.zeros((1, 2, L, 64), F32)
        k = np.random.default_rng(8).standard_normal((1, 1, L, 64)).astype(F32)
        s = P.block_scores(q, k, None, is_causal=False, scale=0.125)
        nk = L // BK
        np.testing.assert_allclose(s * nk, 1.0, rtol=1e-12)
        every = P.predict_block_map_v2(q, k, is_causal=False, scale=0.125, threshold=np.ones(2),
                                       attention_sink=False)
        assert every.all()
        one = P.predict_block_map_v2(q, k, is_causal=False, scale=0.125, threshold=np.full(2, 1.001),
                                     attention_sink=False)
        assert np.all(one.sum(-1) == 1)


def test_two_level_estimate_with_one_group_is_the_one_level_estimate():
    q, k, _ = _inputs(2, 1, 300, 300, seed=9)
    a = P.estimate_block_mass(q, k, is_causal=True, scale=0.125, q_group=128, k_sub=1)
    b = P.estimate_block_mass(q, k, is_causal=True, scale=0.125, q_group=128, k_sub=1, q_detail=128)
    np.testing.assert_allclose(a, b, atol=1e-12)
