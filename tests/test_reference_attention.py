"""The blocked mirror against dense float64 attention, on ragged shapes; LSE; empty rows; masks."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import all_blocks, assert_close, assert_equal, float32_attention_tolerance, make_qkv

from sparge_cupy import reference as R

INF = np.float32(np.inf)

# (B, Hq, Hkv, Lq, Lk, D): every length of the issue, Lq != Lk both ways, 1 and 3 heads, GQA
# (Hq = 4 on 2 kv heads, 3 on 1), head dims 64, 128, 256 and an odd 80.
RAGGED = [
    (1, 1, 1, 1, 1, 64),
    (1, 3, 3, 63, 63, 64),
    (2, 1, 1, 64, 64, 128),
    (1, 3, 1, 65, 65, 64),
    (1, 4, 2, 127, 127, 128),
    (1, 1, 1, 128, 128, 256),
    (1, 3, 3, 129, 129, 64),
    (1, 2, 1, 1000, 1000, 64),
    (1, 1, 1, 1, 1000, 128),
    (1, 3, 1, 129, 63, 64),
    (1, 2, 2, 65, 300, 256),
    (1, 1, 1, 300, 65, 80),
]


def _exact_mirror(q, k, v, block_map, is_causal, scale, **kw):
    return R.block_sparse_attention(q, k, v, block_map, is_causal=is_causal, scale=scale,
                                    pvthreshd=INF, qk="fp32", pv="fp32", **kw)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", RAGGED, ids=lambda s: "B{}H{}/{}L{}x{}D{}".format(*s))
def test_mirror_all_blocks_unquantized_equals_dense(shape, is_causal):
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=Lq * 7 + Lk)
    scale = D ** -0.5
    out, lse = _exact_mirror(q, k, v, all_blocks(B, Hq, Lq, Lk), is_causal, scale, return_lse=True)
    ref, ref_lse = R.dense_attention(q, k, v, is_causal=is_causal, scale=scale, return_lse=True)
    tol = float32_attention_tolerance(q, k, v, is_causal=is_causal, scale=scale)
    assert_close(out, ref, tol, what="mirror vs dense")
    lse_tol = 1e-5 * np.maximum(1.0, np.abs(np.where(np.isfinite(ref_lse), ref_lse, 0)))
    assert_close(lse, ref_lse, lse_tol, what="lse")


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_dense_layouts_agree(layout):
    q, k, v = make_qkv(2, 4, 2, 150, 170, 64, seed=3)
    ref = R.dense_attention(q, k, v, is_causal=True)
    if layout == "NHD":
        qn, kn, vn = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
        out = R.dense_attention(qn, kn, vn, is_causal=True, layout="NHD").transpose(0, 2, 1, 3)
    else:
        out = R.dense_attention(q, k, v, is_causal=True, layout="HND")
    assert_close(out, ref, 1e-12)


def test_dense_matches_naive_softmax():
    """The float64 truth itself, against a direct softmax written independently."""
    q, k, v = (x.astype(np.float64) for x in make_qkv(1, 2, 1, 37, 53, 32, seed=5))
    scale = 0.3
    out = R.dense_attention(q, k, v, is_causal=True, scale=scale)
    Lq, Lk = 37, 53
    for h in range(2):
        for t in range(Lq):
            keys = [u for u in range(Lk) if u <= t + (Lk - Lq)]       # bottom-right aligned
            s = np.array([scale * float(q[0, h, t] @ k[0, 0, u]) for u in keys])
            p = np.exp(s - s.max())
            p /= p.sum()
            assert_close(out[0, h, t], p @ v[0, 0, keys], 1e-12)


def test_causal_rows_that_see_nothing_are_zero():
    """Lq > Lk, causal: the first Lq - Lk queries see no key: zeros, LSE -inf."""
    q, k, v = make_qkv(1, 1, 1, 200, 70, 64, seed=2)
    out, lse = R.dense_attention(q, k, v, is_causal=True, return_lse=True)
    assert_equal(out[0, 0, :130], np.zeros((130, 64)))
    assert np.isneginf(lse[0, 0, :130]).all() and np.isfinite(lse[0, 0, 130:]).all()
    mo, ml = _exact_mirror(q, k, v, all_blocks(1, 1, 200, 70), True, 0.125, return_lse=True)
    assert_equal(mo[0, 0, :130], np.zeros((130, 64), np.float32))
    assert np.isneginf(ml[0, 0, :130]).all()


def test_user_block_map_with_empty_rows():
    """A block map with an empty query block: the mirror and dense (map expanded to tokens) agree,
    and the empty block outputs zeros with LSE -inf."""
    q, k, v = make_qkv(1, 2, 1, 300, 400, 64, seed=9)
    rng = np.random.default_rng(0)
    bm = rng.random((1, 2, 3, 7)) < 0.5
    bm[0, 1, 1] = False                                       # rows 128..255 of head 1: nothing
    bm[0, 0, 0, :] = False
    bm[0, 0, 0, 3] = True                                     # a row with one kept block
    out, lse = _exact_mirror(q, k, v, bm, False, 0.125, return_lse=True)
    ref, ref_lse = R.dense_attention(q, k, v, scale=0.125, block_map=bm, return_lse=True)
    tol = float32_attention_tolerance(q, k, v, is_causal=False, scale=0.125, block_map=bm)
    assert_close(out, ref, tol, what="mirror vs dense with a block map")
    assert_equal(out[0, 1, 128:256], np.zeros((128, 64), np.float32))
    assert np.isneginf(lse[0, 1, 128:256]).all()


def test_negative_control_dropped_block_fails():
    """The check of the previous tests catches one dropped block."""
    q, k, v = make_qkv(1, 2, 1, 256, 256, 64, seed=11)
    bm = all_blocks(1, 2, 256, 256)
    ref = R.dense_attention(q, k, v, scale=0.125)
    tol = float32_attention_tolerance(q, k, v, is_causal=False, scale=0.125)
    assert_close(_exact_mirror(q, k, v, bm, False, 0.125), ref, tol)
    bm[0, 1, 1, 2] = False
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close(_exact_mirror(q, k, v, bm, False, 0.125), ref, tol)


def test_negative_control_wrong_scale_fails():
    q, k, v = make_qkv(1, 2, 1, 256, 256, 64, seed=12)
    ref = R.dense_attention(q, k, v, scale=0.125)
    tol = float32_attention_tolerance(q, k, v, is_causal=False, scale=0.125)
    wrong = _exact_mirror(q, k, v, all_blocks(1, 2, 256, 256), False, 0.125 * (1 + 1e-3))
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close(wrong, ref, tol)


def test_outputs_inside_hull_of_attended_values():
    """INT8 QK^T with unrounded P: each output is a convex combination of the attended V rows,
    so every channel lies between their minimum and maximum (up to float32 rounding)."""
    q, k, v = make_qkv(1, 3, 1, 300, 300, 64, seed=4)
    rng = np.random.default_rng(1)
    bm = rng.random((1, 3, 3, 5)) < 0.6
    bm[..., 0] = True
    out = R.block_sparse_attention(q, k, v, bm, is_causal=True, scale=0.125, pvthreshd=INF,
                                   qk="int8", pv="fp32")
    mask = R.token_mask(np.arange(300), 300, 300, True)[None, None] & R.expand_block_map(bm, 300, 300, 128, 64)
    vv = np.repeat(v, 3, axis=1)[:, :, None, :, :]                         # [1, 3, 1, Lk, D]
    lo = np.where(mask[..., None], vv, np.inf).min(axis=3)
    hi = np.where(mask[..., None], vv, -np.inf).max(axis=3)
    slack = 4 * np.finfo(np.float32).eps * np.abs(v).max()
    assert_close(np.clip(out, lo, hi), out, slack, what="outside the hull")


def _logit_error_bound(q, k, scale, rebalance=True):
    """Largest change INT8 per-block quantization can make to a logit scale * q . k.

    With q~ = q + e_q, k~ = k + e_k, |e| <= delta / 2 per element:
    |q~.k~ - q.k| <= |q|_1 dk/2 + |k|_1 dq/2 + D dq dk / 4 on the rebalanced, smoothed operands.
    """
    q32 = np.asarray(q, np.float32)
    km, ks = R.smooth_k(k)
    if rebalance:
        s_c = R.channel_scales(q32, ks)
        q32, ks = q32 * np.repeat(s_c, q.shape[1] // k.shape[1], axis=1), ks / s_c
    _, dq = R.quantize_int8_per_block(q32, 128)
    _, dk = R.quantize_int8_per_block(ks, 64)
    g = q.shape[1] // k.shape[1]
    dq_t = np.repeat(dq, 128, axis=2)[:, :, : q.shape[2]]
    dk_t = np.repeat(np.repeat(dk, g, axis=1), 64, axis=2)[:, :, : k.shape[2]]
    ks_r = np.repeat(ks, g, axis=1)
    bound = (np.abs(q32).sum(-1)[..., None] * dk_t[:, :, None, :] / 2
             + np.abs(ks_r).sum(-1)[:, :, None, :] * dq_t[..., None] / 2
             + q.shape[3] * dq_t[..., None] * dk_t[:, :, None, :] / 4)
    return scale * bound.max()


@pytest.mark.parametrize("rebalance", [True, False])
def test_int8_qk_error_within_derived_bound(rebalance):
    """Logits off by at most E move each probability by a factor in [e^-2E, e^2E], so
    |O~ - O| <= (e^{2E} - 1) max_u |v_u - O| per channel: a bound from the problem, not a guess."""
    q, k, v = make_qkv(1, 4, 2, 257, 257, 128, seed=21)
    scale = 128 ** -0.5
    E = _logit_error_bound(q, k, scale, rebalance)
    out = R.block_sparse_attention(q, k, v, all_blocks(1, 4, 257, 257), is_causal=False,
                                   scale=scale, pvthreshd=INF, qk="int8", pv="fp32", rebalance=rebalance)
    ref = R.dense_attention(q, k, v, scale=scale)
    spread = np.abs(np.repeat(v, 2, axis=1)[:, :, None].astype(np.float64) - ref[:, :, :, None]).max(axis=3)
    tol = np.expm1(2 * E) * spread + float32_attention_tolerance(q, k, v, is_causal=False, scale=scale)
    assert_close(out, ref, tol, what="int8 QK^T")


def test_fp8_pv_error_within_derived_bound():
    """e4m3 keeps 3 mantissa bits: relative rounding <= 2^-4 for normal values and absolute
    <= 2^-10 below 2^-6 (subnormals). With P~ = rnd(448 p)/448 and V~ = rnd(V/dv) dv,
    |O~ - O| <= 2^-4 sum_u P_u (|V~_u| + |V_u|) + 2^-10 dv + 2^-10/448 sum_u |V~_u| / l, l >= 1."""
    q, k, v = make_qkv(1, 2, 1, 200, 333, 64, seed=8)
    bm = all_blocks(1, 2, 200, 333)
    kw = dict(is_causal=True, scale=0.125, pvthreshd=INF, qk="fp32")
    o8 = R.block_sparse_attention(q, k, v, bm, pv="fp8", **kw).astype(np.float64)
    o32 = R.block_sparse_attention(q, k, v, bm, pv="fp32", **kw).astype(np.float64)
    v8, dv = R.quantize_v_fp8(v)
    v8 = (v8 * dv).astype(np.float64)
    mask = R.token_mask(np.arange(200), 200, 333, True)
    s = np.einsum("hqd,kd->hqk", q[0].astype(np.float64), k[0, 0].astype(np.float64)) * 0.125
    s = np.where(mask, s, -np.inf)
    P = np.exp(s - s.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    absv, absv8 = np.abs(v[0, 0].astype(np.float64)), np.abs(v8[0, 0])
    bound = (2 ** -4 * (P @ (absv + absv8)) + 2 ** -10 * dv[0, 0, 0]
             + 2 ** -10 / 448 * (mask.astype(np.float64) @ absv8))[None]
    assert_close(o8, o32, bound + 8 * np.finfo(np.float32).eps * np.abs(v).max(), what="fp8 P V")


# ---------------------------------------------------------------------------------------------
# QuantStats: the whole sequence's statistics, given to a part of it (ring attention).

def test_quant_stats_given_equal_computed():
    """Passing the operands' own statistics changes nothing, in every mode that reads them."""
    q, k, v = make_qkv(1, 4, 2, 200, 333, 80, seed=4)
    bm = all_blocks(1, 4, 200, 333)
    stats = R.quant_stats(q, k, v)
    for qk, pv in (("int8", "fp8"), ("fp16", "fp16")):
        kw = dict(is_causal=True, scale=0.1, pvthreshd=INF, qk=qk, pv=pv, return_lse=True)
        want = R.block_sparse_attention(q, k, v, bm, **kw)
        got = R.block_sparse_attention(q, k, v, bm, quant_stats=stats, **kw)
        for g, w, what in zip(got, want, ("out", "lse")):
            assert_equal(g, w, what=f"{qk}/{pv}: {what}")


def test_shard_quantized_with_global_stats_is_a_slice_of_the_whole():
    """A shard of whole blocks quantized with the whole sequence's QuantStats gives exactly the
    rows (and per-block scales) of the whole sequence's operands; with its own statistics it does
    not (negative control). MQA, so the Q channel maxima run over 3 heads."""
    q, k, v = make_qkv(1, 3, 1, 400, 333, 64, seed=6)
    stats = R.quant_stats(q, k, v)
    (q0, q1), (k0, k1) = (128, 256), (64, 192)
    kw = dict(scale=1.0, qk="int8", rebalance=True)
    whole = R.quantized_operands(q, k, **kw)
    part = R.quantized_operands(q[:, :, q0:q1], k[:, :, k0:k1], quant_stats=stats, **kw)
    for g, w, what in zip(part, (whole[0][:, :, q0:q1], whole[1][:, :, q0 // 128: q1 // 128],
                                 whole[2][:, :, k0:k1], whole[3][:, :, k0 // 64: k1 // 64],
                                 whole[4]), ("q_op", "dq", "k_op", "dk", "km")):
        assert_equal(g, w, what=what)
    v8, dv = R.quantize_v_fp8(v)
    v8_part, dv_part = R.quantize_v_fp8(v[:, :, k0:k1], amax=stats.v_amax)
    assert_equal(v8_part, v8[:, :, k0:k1], what="V e4m3")
    assert_equal(dv_part, dv, what="dv")
    own = R.quantized_operands(q[:, :, q0:q1], k[:, :, k0:k1], **kw)
    assert not np.array_equal(own[2], whole[2][:, :, k0:k1])
    assert not np.array_equal(R.quantize_v_fp8(v[:, :, k0:k1])[1], dv)
