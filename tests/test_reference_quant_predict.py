"""Quantizers (bit rules of SPEC.md section 3) and Stage 1 prediction (section 1) in the reference."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, assert_equal, heads, make_qkv

from sparge_cupy import CONFIG
from sparge_cupy import reference as R

F32 = np.float32


# ---------------------------------------------------------------- INT8 per block

def test_int8_rounds_half_to_even():
    x = np.zeros((1, 1, 128, 4), F32)
    x[0, 0, 0, 0] = 127.0                                  # amax 127 -> delta exactly 1
    x[0, 0, 1, :] = [0.5, 1.5, 2.5, -3.5]
    xi, delta = R.quantize_int8_per_block(x, 128)
    assert delta[0, 0, 0] == 1.0
    assert_equal(xi[0, 0, 1], np.array([0, 2, 2, -4], np.int8), what="half to even")


def test_int8_zero_block_and_partial_block():
    x = np.zeros((1, 1, 70, 8), F32)
    x[0, 0, 64:] = np.arange(48, dtype=F32).reshape(6, 8) - 20     # only block 1 (6 rows) is non-zero
    xi, delta = R.quantize_int8_per_block(x, 64)
    assert delta.shape == (1, 1, 2)
    assert delta[0, 0, 0] == 1.0 and not xi[0, 0, :64].any()        # zero block: delta 1, zeros
    assert delta[0, 0, 1] == F32(27) / F32(127)
    assert np.abs(xi).max() == 127


@pytest.mark.parametrize("block", [64, 128])
def test_int8_dequantization_error_at_most_half_a_step(block):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 3, 333, 64)) * rng.uniform(0.01, 100, (2, 3, 1, 1))).astype(F32)
    xi, delta = R.quantize_int8_per_block(x, block)
    err = np.abs(R.dequantize_int8_per_block(xi, delta, block) - x)
    half_step = np.repeat(delta, block, axis=2)[:, :, :333, None] / 2
    # the dequantization itself rounds once more in float32
    assert_close(err, np.zeros_like(err), half_step * (1 + 4 * np.finfo(F32).eps), what="dequant error")


def test_negative_control_int8_scale_one_ulp_off_is_caught():
    """Bit-exact comparison of int8 tensors catches a quantizer whose scale is one ulp off."""
    x = np.zeros((1, 1, 64, 4), F32)
    x[0, 0, 0, 0] = 127.0
    x[0, 0, 1, :] = [3.5, 5.5, -7.5, 9.5]
    xi, delta = R.quantize_int8_per_block(x, 64)
    wrong_delta = np.nextafter(delta, F32(2))
    wrong = np.clip(np.rint(x / wrong_delta[:, :, 0, None, None]), -127, 127).astype(np.int8)
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_equal(wrong, xi, what="int8")


def test_channel_rebalancing_is_exact_and_balances_channels():
    q, k, _ = make_qkv(1, 4, 2, 200, 150, 64, seed=3)
    q[:, :, :, 5] = 0                                       # a zero Q channel keeps s = 1
    k[:, :, :, 7] *= 30                                     # an outlier K channel
    km, ks = R.smooth_k(k)
    s = R.channel_scales(q, ks)
    assert s.shape == (1, 2, 1, 64) and (s[..., 5] == 1).all()
    qr, kr = q * np.repeat(s, 2, axis=1), ks / s
    # q . k = sum_c (q_c s_c)(k_c / s_c): the logits do not change beyond float32 rounding
    g = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), np.repeat(ks, 2, axis=1).astype(np.float64))
    r = np.einsum("bhqd,bhkd->bhqk", qr.astype(np.float64), np.repeat(kr, 2, axis=1).astype(np.float64))
    scale = np.abs(q).sum(-1).max() * np.abs(ks).max() * 1e-6
    assert_close(r, g, scale, what="rebalanced logits")
    amax_q = np.abs(qr).reshape(1, 2, -1, 64).max(2)
    amax_k = np.abs(kr).max(2)
    ok = np.arange(64) != 5
    assert_close(amax_q[..., ok], amax_k[..., ok], 1e-5 * amax_k[..., ok], what="balanced maxima")


def test_fp8_rounding_rules():
    got = R.round_e4m3(np.array([448, 500, -1e9, 17, 19, 0.0137, 2.0 ** -10, 3 * 2.0 ** -11], F32))
    # saturate at 448; 17 is halfway between 16 and 18 -> even mantissa 16; 19 -> 20;
    # smallest subnormal is 2^-9: 2^-10 is a tie -> 0; 3*2^-11 rounds up to 2^-9
    want = np.array([448, 448, -448, 16, 20, 0.013671875, 0, 2.0 ** -9], F32)
    assert_equal(got, want, what="e4m3")


def test_fp8_v_quantization_uses_per_channel_scale():
    v = np.zeros((1, 1, 10, 3), F32)
    v[0, 0, :, 0] = np.linspace(-2, 1, 10)
    v[0, 0, :, 2] = 1000.0
    v8, dv = R.quantize_v_fp8(v)
    assert_equal(dv[0, 0, 0], np.array([F32(2) / F32(448), 1, F32(1000) / F32(448)], F32))
    assert np.abs(v8).max() == 448 and not v8[..., 1].any()


# ---------------------------------------------------------------- pooling and similarity

def test_pooling_and_similarity_on_partial_blocks():
    x = np.zeros((1, 1, 130, 4), F32)
    x[0, 0, :128] = [1, 0, 0, 0]
    x[0, 0, 128] = [0, 2, 0, 0]
    x[0, 0, 129] = [0, 0, 3, 0]
    assert_close(R.pool_blocks(x, 128)[0, 0, 1], np.array([0, 1, 1.5, 0]), 1e-7)
    sim = R.block_self_similarity(x, 128)[0, 0]
    assert np.isfinite(sim).all()
    assert_close(sim, np.array([1.0, 0.5]), 1e-6, what="similarity")   # two orthogonal rows: 1/2


def test_similarity_in_unit_interval():
    q, _, _ = make_qkv(2, 3, 3, 500, 500, 64, seed=2, structured=False)
    sim = R.block_self_similarity(q, 128)
    assert ((sim >= 0) & (sim <= 1 + 1e-6)).all()


# ---------------------------------------------------------------- selection

def test_topcdf_ties_lower_j_first_and_at_least_one():
    p = np.array([[0.25, 0.25, 0.25, 0.25]], F32)
    fin = np.ones_like(p, bool)
    assert_equal(R.select_topcdf(p, fin, F32(0.5)), np.array([[1, 1, 0, 0]], bool))
    assert_equal(R.select_topcdf(p, fin, F32(0.01)), np.array([[1, 0, 0, 0]], bool))
    assert_equal(R.select_topcdf(p, fin, F32(1.0)), fin)


def test_topk_counts():
    p = np.array([[0.1, 0.4, 0.2, 0.3, 0.0]], F32)
    fin = np.array([[1, 1, 1, 1, 0]], bool)
    nv = np.array([5])
    assert_equal(R.select_topk(p, fin, nv, F32(0.5)), np.array([[0, 1, 0, 1, 0]], bool))  # floor(2.5)
    assert_equal(R.select_topk(p, fin, nv, F32(0.01)), np.array([[0, 1, 0, 0, 0]], bool))  # at least 1
    assert_equal(R.select_topk(p, fin, nv, F32(1.0)), fin)                                  # finite only


def _brute_mass_threshold(p, finite, t):
    """Scalar loops: keep finite j with float32(nk * p_j) >= t; a row where none passes keeps its
    first largest finite p."""
    keep = np.zeros(p.shape, bool)
    nk = p.shape[-1]
    for idx in np.ndindex(p.shape[:-1]):
        cols = [j for j in range(nk) if finite[idx + (j,)]]
        for j in cols:
            keep[idx + (j,)] = F32(F32(nk) * p[idx + (j,)]) >= F32(t)
        if cols and not keep[idx].any():
            best = cols[0]
            for j in cols:
                if p[idx + (j,)] > p[idx + (best,)]:
                    best = j
            keep[idx + (best,)] = True
    return keep


def test_mass_threshold_against_brute_force(rng):
    p = rng.dirichlet(np.full(7, 0.3), size=(3, 5)).astype(F32)
    p[0, 1] = 1 / 7                                      # a uniform row: nk * p = 1 (up to rounding)
    p[1, 2, 3:] = p[1, 2, 2]                             # ties
    finite = rng.random(p.shape) < 0.8
    finite[2, 0] = False                                 # a row without any finite column
    finite[2, 1] = True
    for t in (0.0, 0.25, 1.0, 1.0000001, 2.5, 7.0, np.inf):
        got = R.select_mass_threshold(p, finite, F32(t))
        assert_equal(got, _brute_mass_threshold(p, finite, t), what=f"threshold {t}")
    assert_equal(R.select_mass_threshold(p, finite, F32(0)), finite, what="t = 0: every finite column")
    top = R.select_mass_threshold(p, finite, F32(np.inf))
    assert_equal(top.sum(-1), finite.any(-1).astype(int), what="t = inf: one per row with a finite column")


@pytest.mark.parametrize("is_causal", [False, True])
def test_mass_threshold_map_against_brute_force(is_causal):
    """The whole map (fix blocks, causal, sink) rebuilt from the details with scalar loops; the kept
    set per row is a prefix of TopCdf's ranking (what the tuner's curves rely on); raising the
    threshold never adds blocks."""
    q, k, _ = make_qkv(2, 4, 2, 700, 900, 64, seed=37)
    nk = R.num_blocks(900, 64)
    t = np.array([0.3, 1.0, 3.0, 12.0], F32)
    m, d = _predict(q, k, mass_threshold=t, is_causal=is_causal, simthreshd1=heads(0.4, 4),
                    return_details=True)
    valid, p = d["valid"], d["p_hat"]
    finite = valid & ~d["k_fix"][:, :, None, :]
    sel = _brute_mass_threshold(p, finite, 0) & False
    for h in range(4):
        sel[:, h] = _brute_mass_threshold(p[:, h], finite[:, h], t[h])
    want = (sel | d["q_fix"][..., None] | d["k_fix"][:, :, None, :]) & valid
    want[..., 0] |= valid[:, 0]
    assert_equal(m, want, what="map")
    order = np.argsort(-p, axis=-1, kind="stable")
    ranked = np.take_along_axis(sel, order, axis=-1)
    n = sel.sum(-1, keepdims=True)
    assert_equal(ranked, np.arange(nk) < n, what="kept set as a prefix of the ranking")
    maps = [_predict(q, k, mass_threshold=x, is_causal=is_causal) for x in (0.0, 0.5, 1.0, 2.0, 8.0, np.inf)]
    assert_equal(maps[0], np.broadcast_to(valid, maps[0].shape), what="t = 0 keeps every valid block")
    for hi, lo in zip(maps, maps[1:]):
        assert not (lo & ~hi).any()
    assert maps[-1].sum() < maps[0].sum()


def _tf32_relative_bound(q, k, scale, rows):
    """Relative bound on P^ between the key-level estimates (operands rounded to TF32, the kernels'
    tensor-core format) and the study's float64 code: each rounding moves an operand by at most
    2^-11 of itself, so a logit by at most 2^-10 scale sum_c |q_c k_c| (largest over the head's
    pooled rows and keys: Delta); a softmax, or a mean of softmaxes, by a factor within
    exp(+-2 Delta); plus 1e-5 for float32 P^ and pooled means. ``[B, H, 1, 1]``."""
    _, ks = R.smooth_k(k)
    qr = np.abs(R.pool_blocks(q, rows)).astype(np.float64)
    kk = R.expand_kv_heads(np.abs(ks).astype(np.float64), q.shape[1])
    delta = scale * 2.0 ** -10 * np.matmul(qr, kk.swapaxes(-1, -2)).max(axis=(2, 3))
    return (np.expm1(2 * delta) + 1e-5)[:, :, None, None]


def test_round_tf32_is_cvt_rna():
    """round_tf32 keeps 10 mantissa bits, rounding half away from zero; inf / nan pass through."""
    one = 1.0
    x = np.array([one + 2.0 ** -11, one + 2.0 ** -11 - 2.0 ** -23, -(one + 3 * 2.0 ** -11),
                  one + 2.0 ** -10, 2.0 ** -100 * (1 + 2.0 ** -11), np.inf], F32)
    got = R.round_tf32(x)
    want = np.array([one + 2.0 ** -10, one, -(one + 2 * 2.0 ** -10), one + 2.0 ** -10,
                     2.0 ** -100 * (1 + 2.0 ** -10), np.inf], F32)
    assert_equal(got, want, what="tf32 rounding")
    assert np.isnan(R.round_tf32(np.array([np.nan], F32))).all()


@pytest.mark.parametrize("is_causal", [False, True])
def test_qbar_keys_predictor_matches_the_study_code(is_causal):
    """predictor="qbar_keys" with theta = -1 and the mass threshold is the predictor study's
    predict_block_map_v2 (float64 scores; independent selection code), up to the TF32 rounding
    of the operands (_tf32_relative_bound) and blocks whose scaled estimate lies within it of
    the threshold."""
    from sparge_cupy.reference import predictors as P
    q, k, _ = make_qkv(1, 4, 2, 700, 900, 64, seed=41)
    t = np.array([0.2, 0.7, 1.5, 4.0], F32)
    got, d = R.predict_block_map(q, k, is_causal=is_causal, scale=0.125, simthreshd1=heads(-1, 4),
                                 mass_threshold=t, predictor="qbar_keys", return_details=True)
    want, dv2 = P.predict_block_map_v2(q, k, is_causal=is_causal, scale=0.125, threshold=t,
                                       return_details=True)
    nk = got.shape[-1]
    rel = _tf32_relative_bound(q, k, 0.125, CONFIG.block_q)
    near = np.abs(dv2["score"] * nk - t[None, :, None, None]) <= rel * t[None, :, None, None]
    bad = (got != want) & ~near
    assert not bad.any(), f"{int(bad.sum())} blocks differ: first {np.argwhere(bad)[:8].tolist()}"
    want_p = np.where(d["valid"], dv2["score"], 0)
    assert_close(d["p_hat"], want_p, rel * want_p + 1e-9, what="P^ vs the study's mass")
    assert np.abs(d["p_hat"] - want_p).max() > 0, "TF32 rounding should show"
    paper = R.predict_block_map(q, k, is_causal=is_causal, scale=0.125, simthreshd1=heads(-1, 4),
                                mass_threshold=t)
    assert (paper != got).any(), "the two estimates should differ on structured input"


@pytest.mark.parametrize("is_causal", [False, True])
def test_qgroup_keys_predictor_matches_the_study_code(is_causal):
    """predictor="qgroup_keys": its P^ is the predictor study's mass estimate with the query pooled
    over CONFIG.query_group rows (estimate_block_mass(q_group=32, k_sub=1): float64 from the
    unrounded means, a linear-domain mean; independent code) to TF32 rounding, partial last
    query block and causal diagonal included; and it differs from the block-pooled qbar_keys."""
    from sparge_cupy.reference import predictors as P
    q, k, _ = make_qkv(1, 4, 2, 700, 900, 64, seed=43)
    q[..., :4] += 3.0 * np.random.default_rng(5).standard_normal(q.shape[:3] + (1,)).astype(F32)
    kw = dict(is_causal=is_causal, scale=0.125, simthreshd1=heads(-1, 4), mass_threshold=heads(1.0, 4))
    _, d = R.predict_block_map(q, k, predictor="qgroup_keys", return_details=True, **kw)
    want = P.estimate_block_mass(q, k, is_causal=is_causal, scale=0.125, q_group=CONFIG.query_group, k_sub=1)
    want = np.where(d["valid"], want, 0)
    rel = _tf32_relative_bound(q, k, 0.125, CONFIG.query_group)
    assert_close(d["p_hat"], want, rel * want + 1e-9, what="P^ vs the study's mass")
    _, dq = R.predict_block_map(q, k, predictor="qbar_keys", return_details=True, **kw)
    assert np.abs(d["p_hat"] - dq["p_hat"]).max() > 1e-3, "query groups should change the estimate"


def test_qgroup_keys_with_one_group_per_block_is_qbar_keys():
    """With query_group = BQ the groups are the blocks: the mean of one softmax is that softmax,
    so P^ and the map are qbar_keys' (a check of the combination step, mean_group_logits)."""
    import dataclasses
    cfg = dataclasses.replace(CONFIG, query_group=CONFIG.block_q)
    q, k, _ = make_qkv(2, 4, 2, 530, 530, 64, seed=44)
    for causal in (False, True):
        kw = dict(is_causal=causal, scale=0.2, simthreshd1=heads(0.2, 4),
                  mass_threshold=np.array([0.3, 1, 2, 5], F32), return_details=True)
        m1, d1 = R.predict_block_map(q, k, predictor="qgroup_keys", cfg=cfg, **kw)
        m2, d2 = R.predict_block_map(q, k, predictor="qbar_keys", **kw)
        # the two logits differ by a per-row constant, each rounded to float32: a few ulp of
        # logits of magnitude ~10 move P^ by ~1e-6 relative
        assert_close(d1["p_hat"], d2["p_hat"], 1e-5 * d2["p_hat"] + 1e-12, what="P^ (float32 rounding)")
        assert_equal(m1, m2, what="block map")


def test_mean_group_logits_weights_partial_groups_and_rejects_bad_groups():
    """The combination weights each group by its valid rows (a 1-row last group counts 1/33 of
    a block of 33 rows) in the log domain (no underflow at logits -1e4), and a query_group that
    does not divide BQ is a ValueError naming it."""
    import dataclasses
    with np.errstate(divide="ignore"):
        lse = np.log(np.array([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]]))[None, None]   # 2 groups, 3 blocks
    got = np.exp(R.mean_group_logits(lse, 33))
    assert_close(got[0, 0, 0], (32 * np.array([0.5, 0.5, 0]) + np.array([0, 0.25, 0.75])) / 33,
                 1e-15, what="weighted mean")
    far = R.mean_group_logits(lse - 1e4, 33)
    with np.errstate(divide="ignore"):
        assert_close(far, np.log(got), 1e-12, what="shifted logits")
    with pytest.raises(ValueError, match="query_group: expected a positive divisor of block_q"):
        R.mean_group_logits(lse, 33, dataclasses.replace(CONFIG, query_group=48))


def _predict(q, k, **kw):
    Hq = q.shape[1]
    kw.setdefault("simthreshd1", heads(0.3, Hq))
    kw.setdefault("scale", q.shape[-1] ** -0.5)
    kw.setdefault("is_causal", False)
    for name in ("cdfthreshd", "topk", "mass_threshold"):
        if np.isscalar(kw.get(name)):
            kw[name] = heads(kw[name], Hq)
    return R.predict_block_map(q, k, **kw)


@pytest.mark.parametrize("is_causal", [False, True])
def test_lowering_tau_never_adds_blocks(is_causal):
    q, k, _ = make_qkv(2, 4, 2, 700, 900, 64, seed=13)
    maps = [_predict(q, k, cdfthreshd=t, is_causal=is_causal) for t in (1.0, 0.99, 0.9, 0.7, 0.4, 0.1)]
    for hi, lo in zip(maps, maps[1:]):
        assert not (lo & ~hi).any()
    assert maps[-1].sum() < maps[0].sum()        # and the sweep did remove blocks


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("theta", [-1.0, 0.5, 0.99])
def test_tau_one_and_topk_one_keep_every_valid_block(is_causal, theta):
    q, k, _ = make_qkv(1, 3, 1, 600, 450, 64, seed=17)
    valid = R.valid_blocks(600, 450, 128, 64, is_causal)
    for kw in ({"cdfthreshd": 1.0}, {"topk": 1.0}):
        m = _predict(q, k, is_causal=is_causal, simthreshd1=heads(theta, 3), attention_sink=False, **kw)
        assert_equal(m, np.broadcast_to(valid, m.shape), what=f"{kw}")


def test_fix_blocks_sink_and_causal():
    q, k, _ = make_qkv(1, 2, 2, 900, 900, 64, seed=19)
    m, d = _predict(q, k, cdfthreshd=0.2, is_causal=True, return_details=True)
    valid = d["valid"]
    assert not (m & ~valid).any()                                        # never a future block
    assert (m[..., 0] == valid[:, 0]).all()                              # the sink
    rows, cols = d["q_fix"], d["k_fix"]
    assert rows.any() or cols.any(), "fixture should hold non-self-similar blocks"
    assert (m | ~rows[..., :, None] | ~valid).all()                      # fix rows kept whole
    assert (m | ~cols[..., None, :] | ~valid).all()                      # fix columns kept whole
    m2 = _predict(q, k, cdfthreshd=0.2, is_causal=True, attention_sink=False)
    assert m2.sum() <= m.sum()


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1000, 1000), (129, 63), (63, 129), (300, 1000),
                                   (1000, 300), (128, 64), (4224, 129)])
def test_local_blocks_hold_the_aligned_keys(Lq, Lk):
    """local_blocks against brute force: block (i, j) is local iff one row t of query block i has
    its aligned key t + Lk - Lq inside key block j; Lq = Lk gives the two blocks 2i, 2i + 1."""
    nq, nk = R.num_blocks(Lq, 128), R.num_blocks(Lk, 64)
    want = np.zeros((nq, nk), bool)
    for t in range(Lq):
        u = t + Lk - Lq
        if 0 <= u < Lk:
            want[t // 128, u // 64] = True
    assert_equal(R.local_blocks(Lq, Lk, 128, 64), want, what=f"local blocks {Lq}x{Lk}")
    if Lq == Lk:
        assert all(set(np.flatnonzero(want[i])) == {j for j in (2 * i, 2 * i + 1) if j < nk}
                   for i in range(nq))


@pytest.mark.parametrize("is_causal", [True, False])
def test_local_window_only_adds_the_local_blocks(is_causal):
    """local_window=True is the map without it OR (local blocks AND valid): nothing else moves;
    a negative control (the window shifted by one block) is not what it keeps."""
    q, k, _ = make_qkv(1, 2, 1, 1000, 700, 64, seed=29)
    kw = dict(mass_threshold=np.inf, simthreshd1=heads(-1.0, 2), is_causal=is_causal)
    off, on = _predict(q, k, **kw), _predict(q, k, local_window=True, **kw)
    local = R.local_blocks(1000, 700, 128, 64) & R.valid_blocks(1000, 700, 128, 64, is_causal)
    assert_equal(on, off | local, what="map with the local window")
    assert (on & ~off).any(), "the window must add blocks at t = inf"
    shifted = np.roll(local, 1, axis=1)
    assert not np.array_equal(on, off | (shifted & R.valid_blocks(1000, 700, 128, 64, is_causal)))


def test_valid_blocks_match_token_mask():
    for Lq, Lk in [(1, 1), (129, 63), (63, 129), (300, 1000), (1000, 300), (128, 64)]:
        tok = R.token_mask(np.arange(Lq), Lq, Lk, True)
        brute = R.expand_block_map(np.ones((R.num_blocks(Lq, 128), R.num_blocks(Lk, 64)), bool), Lq, Lk, 128, 64)
        nq, nk = R.num_blocks(Lq, 128), R.num_blocks(Lk, 64)
        want = np.array([[tok[i * 128:(i + 1) * 128, j * 64:(j + 1) * 64].any() for j in range(nk)]
                         for i in range(nq)])
        assert_equal(R.valid_blocks(Lq, Lk, 128, 64, True), want, what=f"valid blocks {Lq}x{Lk}")
        assert brute.shape == (Lq, Lk)


def test_per_head_thresholds_equal_per_head_runs():
    q, k, _ = make_qkv(1, 4, 2, 500, 500, 64, seed=23)
    taus = np.array([0.3, 0.6, 0.9, 0.99], F32)
    thetas = np.array([0.1, 0.5, 0.2, -1.0], F32)
    m = _predict(q, k, cdfthreshd=taus, simthreshd1=thetas)
    for h in range(4):
        mh = _predict(q, k, cdfthreshd=taus[h], simthreshd1=heads(thetas[h], 4))[:, h]
        assert_equal(m[:, h], mh, what=f"head {h}")


def test_prediction_uses_the_scale():
    """Unlike the original, the compressed map uses the user's scale: a larger scale sharpens
    P^, so TopCdf keeps fewer blocks."""
    q, k, _ = make_qkv(1, 2, 2, 1000, 1000, 64, seed=29)
    few = _predict(q, k, cdfthreshd=0.9, scale=1.0, simthreshd1=heads(-1, 2)).sum()
    many = _predict(q, k, cdfthreshd=0.9, scale=0.01, simthreshd1=heads(-1, 2)).sum()
    assert few < many


# ---------------------------------------------------------------- Stage 2 and statistics

def _naive_stage2(q, k, v, bm, *, is_causal, scale, lam, G):
    """An independent, scalar-loop version of the kernel's loop (fp32 modes): per (b, h, i),
    blocks in increasing j, groups of G rows. Returns (out, visited, skipped); ``skipped`` counts
    only groups that see a key of the block (a group whose keys there are all masked skips it
    for any lambda: the mask's saving, reference.mask_skips)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    km, ks = R.smooth_k(k)
    out = np.zeros((B, Hq, Lq, D), F32)
    visited = skipped = 0
    c = F32(scale / np.log(2.0))
    for b in range(B):
        for h in range(Hq):
            kk, vv = ks[b, h // (Hq // Hkv)], v[b, h // (Hq // Hkv)].astype(F32)
            for i in range(R.num_blocks(Lq, 128)):
                rows = np.arange(i * 128, min(Lq, i * 128 + 128))
                m = np.full(rows.size, -np.inf, F32)
                l = np.zeros(rows.size, F32)
                acc = np.zeros((rows.size, D), F32)
                for j in range(R.num_blocks(Lk, 64)):
                    keys = np.arange(j * 64, min(Lk, j * 64 + 64))
                    if not bm[b, h, i, j] or not R.valid_blocks(Lq, Lk, 128, 64, is_causal)[i, j]:
                        continue
                    s = (q[b, h, rows].astype(F32) @ kk[keys].T) * c
                    if is_causal:
                        s = np.where(keys[None] <= rows[:, None] + (Lk - Lq), s, -np.inf)
                    for g0 in range(0, rows.size, G):
                        r = slice(g0, min(rows.size, g0 + G))
                        rm = s[r].max(1)
                        with np.errstate(invalid="ignore"):
                            d = np.where(np.isneginf(m[r]), np.inf, rm - m[r])
                        visited += 1
                        if np.isfinite(lam) and d.max() <= -lam:
                            skipped += bool((rm > -np.inf).any())   # the mask's skips are not counted
                            continue
                        mn = np.maximum(m[r], rm)
                        mu = np.where(np.isneginf(mn), 0, mn)
                        a = np.exp2(m[r] - mu)
                        p = np.exp2(s[r] - mu[:, None])
                        l[r] = l[r] * a + p.sum(1)
                        acc[r] = acc[r] * a[:, None] + p @ vv[keys]
                        m[r] = mn
                out[b, h, rows] = np.where(l[:, None] > 0, acc / np.where(l > 0, l, 1)[:, None], 0)
    return out, visited, skipped


@pytest.mark.parametrize("lam", [np.inf, 8.0, 2.0, 0.5])
@pytest.mark.parametrize("G", [16, 128])
def test_stage2_matches_independent_loop(lam, G):
    q, k, v = make_qkv(1, 3, 1, 300, 330, 64, seed=31)
    rng = np.random.default_rng(5)
    bm = rng.random((1, 3, 3, 6)) < 0.7
    kw = dict(is_causal=True, scale=0.125)
    out, st = R.block_sparse_attention(q, k, v, bm, pvthreshd=heads(lam, 3), qk="fp32", pv="fp32",
                                       pv_group_rows=G, return_stats=True, **kw)
    ref, visited, skipped = _naive_stage2(q, k, v, bm, lam=lam, G=G, **kw)
    assert (int(st["pv_groups"].sum()), int(st["pv_skipped"].sum())) == (visited, skipped)
    assert_close(out, ref, 1e-5 * np.abs(v).max(), what="Stage 2 output")
    if lam == np.inf:
        assert skipped == 0
    if lam == 0.5:
        assert skipped > 0


def test_stage2_first_block_never_skipped_and_error_grows():
    q, k, v = make_qkv(1, 2, 2, 512, 512, 64, seed=37)
    bm = np.ones((1, 2, 4, 8), bool)
    ref = R.dense_attention(q, k, v)
    errs, sparsity = [], []
    for lam in (np.inf, 6.0, 1.0, 1e-3):
        out, st = R.block_sparse_attention(q, k, v, bm, is_causal=False, scale=0.125,
                                           pvthreshd=heads(lam, 2), qk="fp32", pv="fp32", return_stats=True)
        assert (np.abs(out).sum(-1) > 0).all(), "a row lost every block"
        errs.append(R.relative_l1(out, ref))
        sparsity.append(st["stage2_sparsity"])
    assert sparsity == sorted(sparsity) and sparsity[0] == 0 and sparsity[-1] > sparsity[1]
    assert errs[-1] > errs[0]


def test_stats_counting():
    q, k, v = make_qkv(1, 2, 1, 300, 400, 64, seed=41)
    bm = np.zeros((1, 2, 3, 7), bool)
    bm[0, 0, :, :2] = True
    bm[0, 1, 2, :] = True                                       # includes causally invalid blocks
    out, st = R.block_sparse_attention(q, k, v, bm, is_causal=True, scale=0.125,
                                       pvthreshd=heads(np.inf, 2), return_stats=True)
    valid = R.valid_blocks(300, 400, 128, 64, True)
    assert (st["valid_blocks"] == valid.sum()).all()
    assert_equal(st["kept_blocks"][0], np.array([(bm[0, 0] & valid).sum(), (bm[0, 1] & valid).sum()]))
    s1 = 1 - (bm[0] & valid).sum() / (2 * valid.sum())
    assert abs(st["stage1_sparsity"] - s1) < 1e-12
    assert abs(st["total_sparsity"] - s1) < 1e-12 and st["stage2_sparsity"] == 0
