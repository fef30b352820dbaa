"""The public API on NumPy arrays: results equal the reference, layouts and dtypes, and every bad
input raises TypeError/ValueError naming the argument."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_equal, make_qkv

import sparge_cupy as sc
from sparge_cupy import reference as R


@pytest.fixture(scope="module")
def qkv():
    return make_qkv(1, 4, 2, 300, 260, 64, seed=1)


def test_sparge_attn_is_prediction_then_block_sparse(qkv):
    q, k, v = qkv
    kw = dict(is_causal=True, scale=0.1)
    bm = sc.predict_block_map(q, k, cdfthreshd=0.8, simthreshd1=0.2, **kw)
    assert bm.dtype == bool and bm.shape == (1, 4, 3, 5)
    a, lse_a, st_a = sc.sparge_attn(q, k, v, cdfthreshd=0.8, simthreshd1=0.2, pvthreshd=4.0,
                                    return_lse=True, return_stats=True, **kw)
    b, lse_b, st_b = sc.block_sparse_attn(q, k, v, bm, pvthreshd=4.0, return_lse=True,
                                          return_stats=True, **kw)
    assert_equal(a, b)
    assert_equal(lse_a, lse_b)
    assert st_a["total_sparsity"] == st_b["total_sparsity"]
    assert a.dtype == np.float32 and lse_a.dtype == np.float32 and lse_a.shape == (1, 4, 300)


def test_defaults_and_topk(qkv):
    q, k, v = qkv
    default = sc.predict_block_map(q, k)
    explicit = sc.predict_block_map(q, k, cdfthreshd=sc.CONFIG.cdfthreshd, simthreshd1=sc.CONFIG.simthreshd1)
    assert_equal(default, explicit)
    topk = sc.predict_block_map(q, k, topk=0.5, simthreshd1=-1.0, attention_sink=False)
    assert (topk.sum(-1) == 2).all()                             # floor(0.5 * 5 valid blocks)


def test_mass_threshold_through_the_api(qkv):
    """``mass_threshold`` replaces the default TopCdf (no need to pass cdfthreshd=None), reaches
    the reference with the user's scale and layout, and sparge_attn runs the same map."""
    q, k, v = qkv
    kw = dict(is_causal=True, scale=0.1, simthreshd1=-1.0)
    t = [0.5, 1.0, 2.0, np.inf]
    bm = sc.predict_block_map(q, k, mass_threshold=t, **kw)
    want = R.predict_block_map(q, k, mass_threshold=np.asarray(t, np.float32),
                               simthreshd1=np.full(4, -1.0, np.float32), is_causal=True, scale=0.1)
    assert_equal(bm, want, what="block map")
    qn, kn = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k))
    assert_equal(sc.predict_block_map(qn, kn, layout="NHD", mass_threshold=t, **kw), bm, what="NHD")
    assert (bm[0, 3].sum(-1) <= 2).all()                          # inf: the row's best and the sink
    out, st = sc.sparge_attn(q, k, v, mass_threshold=t, return_stats=True, **kw)
    assert_equal(out, sc.block_sparse_attn(q, k, v, bm, is_causal=True, scale=0.1), what="output")
    assert st["stage1_sparsity"] > 0


@pytest.mark.parametrize("predictor", ["qbar_keys", "qgroup_keys"])
def test_key_level_predictors_through_the_api(qkv, predictor):
    """predictor="qbar_keys" / "qgroup_keys" reach the reference on NumPy arrays (the GPU tests
    check the kernels against it)."""
    q, k, v = qkv
    kw = dict(is_causal=True, scale=0.1, simthreshd1=-1.0, mass_threshold=1.0)
    bm = sc.predict_block_map(q, k, predictor=predictor, **kw)
    want = R.predict_block_map(q, k, is_causal=True, scale=0.1, simthreshd1=np.full(4, -1.0, np.float32),
                               mass_threshold=np.ones(4, np.float32), predictor=predictor)
    assert_equal(bm, want, what="block map")
    out = sc.sparge_attn(q, k, v, predictor=predictor, **kw)
    assert_equal(out, sc.block_sparse_attn(q, k, v, bm, is_causal=True, scale=0.1), what="output")
    assert (bm != sc.predict_block_map(q, k, **kw)).any(), "the estimates should differ here"


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_dtypes_and_layouts(qkv, dtype):
    q, k, v = (x.astype(dtype) for x in qkv)
    out_h = sc.sparge_attn(q, k, v, is_causal=True)
    assert out_h.dtype == dtype and out_h.shape == q.shape
    qn, kn, vn = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
    out_n = sc.sparge_attn(qn, kn, vn, is_causal=True, layout="NHD")
    assert out_n.dtype == dtype and out_n.shape == qn.shape
    assert_equal(out_n.transpose(0, 2, 1, 3), out_h, what="NHD vs HND")
    ref = R.dense_attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), is_causal=True)
    assert R.relative_l1(out_h.astype(np.float32), ref) < 0.1


def test_quantization_modes_all_run_and_order_by_precision(qkv):
    q, k, v = qkv
    bm = np.ones((1, 4, 3, 5), bool)
    ref = R.dense_attention(q, k, v)
    err = {(qk, pv): R.relative_l1(sc.block_sparse_attn(q, k, v, bm, qk=qk, pv=pv), ref)
           for qk in ("int8", "fp16") for pv in ("fp8", "fp16")}
    assert err["fp16", "fp16"] < err["int8", "fp16"] < err["int8", "fp8"]
    assert err["fp16", "fp16"] < 1e-3


def test_per_head_thresholds_accepted(qkv):
    q, k, v = qkv
    out, st = sc.sparge_attn(q, k, v, simthreshd1=[0.1, 0.2, 0.3, 0.4], cdfthreshd=np.array([0.5, 0.9, 0.99, 1.0]),
                             pvthreshd=[1.0, 2.0, np.inf, 8.0], return_stats=True)
    assert np.isfinite(out).all() and 0 <= st["total_sparsity"] < 1


# ------------------------------------------------------------------ bad input

def _call(fn, q, k, v, **kw):
    if fn is sc.predict_block_map:
        return fn(q, k, **kw)
    if fn is sc.block_sparse_attn:
        bm = kw.pop("block_map", np.ones((1, 4, 3, 5), bool))
        return fn(q, k, v, bm, **kw)
    return fn(q, k, v, **kw)


BAD = [
    # (description, mutate(q, k, v) -> (q, k, v, kwargs), exception, message fragment)
    ("q 3-d", lambda q, k, v: (q[0], k, v, {}), ValueError, "q: expected 4 dimensions"),
    ("int dtype", lambda q, k, v: (q.astype(np.int32), k, v, {}), TypeError, "q: expected dtype"),
    ("float64", lambda q, k, v: (q.astype(np.float64), k, v, {}), TypeError, "got float64"),
    ("mixed dtypes", lambda q, k, v: (q, k.astype(np.float16), v, {}), TypeError, "one dtype"),
    ("batch mismatch", lambda q, k, v: (q, np.concatenate([k, k]), v, {}), ValueError, "batch"),
    ("head dim mismatch", lambda q, k, v: (q, k[..., :32], v, {}), ValueError, "head dim 64"),
    ("D too large", lambda q, k, v: (np.zeros((1, 4, 300, 320), np.float32),) * 3 + ({},), ValueError, "<= 256"),
    ("Hq not multiple", lambda q, k, v: (q[:, :3], k, v, {}), ValueError, "multiple"),
    ("empty length", lambda q, k, v: (q[:, :, :0], k, v, {}), ValueError, ">= 1"),
    ("layout", lambda q, k, v: (q, k, v, {"layout": "BHSD"}), ValueError, "layout"),
    ("scale nan", lambda q, k, v: (q, k, v, {"scale": float("nan")}), ValueError, "scale"),
    ("scale str", lambda q, k, v: (q, k, v, {"scale": "0.1"}), TypeError, "scale"),
    ("causal not bool", lambda q, k, v: (q, k, v, {"is_causal": 1}), TypeError, "is_causal"),
    ("nan in q", lambda q, k, v: (np.where(np.arange(64) == 3, np.nan, q).astype(np.float32), k, v, {}), ValueError, "q: expected finite"),
    ("inf in k", lambda q, k, v: (q, np.where(np.arange(64) == 3, np.inf, k).astype(np.float32), v, {}), ValueError, "k: expected finite"),
    ("not an array", lambda q, k, v: (q.tolist(), k, v, {}), TypeError, "q"),
]
BAD_PRED = [
    ("theta range", {"simthreshd1": 1.5}, ValueError, "simthreshd1: expected values in [-1.0, 1.0]"),
    ("tau zero", {"cdfthreshd": 0.0}, ValueError, "cdfthreshd: expected values in (0.0, 1.0]"),
    ("tau nan", {"cdfthreshd": float("nan")}, ValueError, "cdfthreshd"),
    ("tau per head wrong length", {"cdfthreshd": [0.5, 0.9]}, ValueError, "4 values (one per query head), got shape (2)"),
    ("topk > 1", {"topk": 1.5}, ValueError, "topk"),
    ("both", {"cdfthreshd": 0.9, "topk": 0.5}, ValueError, "exactly one of them, got cdfthreshd and topk"),
    ("neither", {"cdfthreshd": None}, ValueError, "exactly one of them, got none"),
    ("cdf and mass", {"cdfthreshd": 0.9, "mass_threshold": 0.5}, ValueError,
     "cdfthreshd, topk, mass_threshold: expected exactly one of them, got cdfthreshd and mass_threshold"),
    ("topk and mass", {"topk": 0.5, "mass_threshold": 0.5}, ValueError, "got topk and mass_threshold"),
    ("mass negative", {"mass_threshold": -0.1}, ValueError, "mass_threshold: expected values in [0.0, inf]"),
    ("mass nan", {"mass_threshold": float("nan")}, ValueError, "mass_threshold: expected values"),
    ("mass per head wrong length", {"mass_threshold": [0.5, 0.9, 1.0]}, ValueError,
     "mass_threshold: expected a scalar or 4 values (one per query head), got shape (3)"),
    ("mass str", {"mass_threshold": "0.5"}, TypeError, "mass_threshold"),
    ("mass bool", {"mass_threshold": True}, TypeError, "mass_threshold: expected a number"),
    ("predictor", {"predictor": "quest"}, ValueError,
     "predictor: expected one of ('paper', 'qbar_keys', 'qgroup_keys')"),
    ("theta bool", {"simthreshd1": True}, TypeError, "simthreshd1"),
    ("theta None", {"simthreshd1": None}, TypeError, "simthreshd1: expected a number or a sequence of 4 numbers, got None"),
    ("tau strings", {"cdfthreshd": ["0.5"] * 4}, TypeError, "cdfthreshd: expected a number or a sequence of 4 numbers, got '0.5' (str) for head 0"),
    ("tau string array", {"cdfthreshd": np.array(["0.5"] * 4)}, TypeError, "cdfthreshd: expected a number or a sequence of 4 numbers, got dtype <U3"),
    ("topk None entry", {"topk": [0.5, None, 0.5, 0.5]}, TypeError, "topk: expected a number or a sequence of 4 numbers, got None for head 1"),
    ("topk bool entry", {"topk": [0.5, True, 0.5, 0.5]}, TypeError, "got True (bool) for head 1"),
    ("sink not bool", {"attention_sink": 1}, TypeError, "attention_sink: expected a bool"),
    ("local window not bool", {"local_window": "yes"}, TypeError, "local_window: expected a bool"),
]
BAD_ATTN = [
    ("pv mode", {"pv": "fp4"}, ValueError, "pv: expected one of"),
    ("qk mode", {"qk": "int4"}, ValueError, "qk: expected one of"),
    ("lambda negative", {"pvthreshd": -1.0}, ValueError, "pvthreshd"),
    ("lambda per head length", {"pvthreshd": [1.0, 2.0, 3.0]}, ValueError, "pvthreshd"),
    ("lambda complex", {"pvthreshd": 1j}, TypeError, "pvthreshd: expected a number or a sequence of 4 numbers, got complex"),
    ("rebalance not bool", {"rebalance": "yes"}, TypeError, "rebalance"),
    ("return_lse not bool", {"return_lse": None}, TypeError, "return_lse"),
]
BAD_MAP = [
    ("map shape", np.ones((1, 4, 3, 4), bool), ValueError, "block_map: expected shape [B, Hq, nq, nk] = (1, 4, 3, 5)"),
    ("map dtype", np.ones((1, 4, 3, 5), np.int8), TypeError, "block_map: expected dtype bool"),
    ("map list", [[True]], TypeError, "block_map"),
]


@pytest.mark.parametrize("fn", [sc.sparge_attn, sc.predict_block_map, sc.block_sparse_attn],
                         ids=["sparge_attn", "predict_block_map", "block_sparse_attn"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(qkv, fn, case):
    _, mutate, exc, msg = case
    q, k, v, kw = mutate(*qkv)
    with pytest.raises(exc, match=_re(msg)):
        _call(fn, q, k, v, **kw)


@pytest.mark.parametrize("fn", [sc.sparge_attn, sc.predict_block_map], ids=["sparge_attn", "predict_block_map"])
@pytest.mark.parametrize("case", BAD_PRED, ids=[c[0] for c in BAD_PRED])
def test_bad_thresholds(qkv, fn, case):
    _, kw, exc, msg = case
    with pytest.raises(exc, match=_re(msg)):
        _call(fn, *qkv, **kw)


@pytest.mark.parametrize("fn", [sc.sparge_attn, sc.block_sparse_attn], ids=["sparge_attn", "block_sparse_attn"])
@pytest.mark.parametrize("case", BAD_ATTN, ids=[c[0] for c in BAD_ATTN])
def test_bad_attention_options(qkv, fn, case):
    _, kw, exc, msg = case
    with pytest.raises(exc, match=_re(msg)):
        _call(fn, *qkv, **kw)


@pytest.mark.parametrize("case", BAD_MAP, ids=[c[0] for c in BAD_MAP])
def test_bad_block_map(qkv, case):
    _, bm, exc, msg = case
    with pytest.raises(exc, match=_re(msg)):
        sc.block_sparse_attn(*qkv, bm)


def test_v_shape_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="v: expected the heads and length of k"):
        sc.sparge_attn(q, k, v[:, :, :100])


def _re(msg):
    import re
    return re.escape(msg)


def test_batch_slices_fit_the_launch_grid():
    """The GPU path splits a batch whose (entry, head) pairs exceed CUDA's grid y / z limit into
    consecutive slices of whole entries, each within it (the kernels run per slice: GPU suite)."""
    from sparge_cupy import _gpu
    cap = _gpu.MAX_GRID_YZ
    assert cap == 65535
    for B, Hq in ((1, 1), (4, 32), (2048, 32), (2049, 32), (70000, 1), (3, 40000), (1, cap)):
        slices = _gpu.batch_slices(B, Hq)
        assert slices[0][0] == 0 and slices[-1][1] == B, (B, Hq, slices)
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:])), slices
        assert all(0 < (b1 - b0) * Hq <= cap for b0, b1 in slices), (B, Hq, slices)
        assert len(slices) == -(-B * Hq // (cap // Hq * Hq)), (B, Hq, len(slices))
    assert _gpu.batch_slices(2048, 32) == [(0, 2047), (2047, 2048)]
    with pytest.raises(ValueError, match="q: at most 65535 query heads on the GPU"):
        _gpu.batch_slices(1, cap + 1)


def test_batch_slices_driver_on_the_host(monkeypatch):
    """The slice driver of the GPU path, run with NumPy standing in for CuPy and a stand-in for
    the per-slice call: each slice gets its own entries (operands, map, given statistics) and
    writes its rows of one output; the LSE is concatenated and the statistics merged as the
    reference computes them for the whole batch; a non-finite value anywhere raises first with
    the whole tensor's count. (The kernels themselves run per slice in the GPU suite.)"""
    import dataclasses

    from sparge_cupy import _gpu
    from sparge_cupy import reference as R
    monkeypatch.setattr(_gpu, "_cupy", lambda: np)
    B, Hq, Hkv, L, D = 5, 2, 1, 150, 64
    rng = np.random.default_rng(0)
    ops = [_gpu.Operand(rng.standard_normal((B, H, L, D)).astype(np.float16), "float16", "HND", D)
           for H in (Hq, Hkv, Hkv)]
    valid = R.valid_blocks(L, L, 128, 64, True)
    bmap = (rng.random((B, Hq, 2, 3)) < 0.7) & valid
    given = R.QuantStats(km=rng.standard_normal((B, Hkv, D)).astype(np.float32))
    calls = []

    def one_slice(q, k, v, block_map, *, out, return_lse, return_stats, quant_stats, **options):
        b = q.array.shape[0]
        assert k.array.shape[0] == v.array.shape[0] == block_map.shape[0] == quant_stats.km.shape[0] == b
        calls.append((float(q.array[0, 0, 0, 0]), b, options))
        out[...] = q.array[..., :D]                       # stands for the attention
        lse = q.array[..., 0].astype(np.float32)
        counts = np.full((b, Hq, 2), 4)
        return out, lse, R.sparsity_stats(block_map, valid, counts, counts // 4, L, 16)

    slices = [(0, 2), (2, 4), (4, 5)]
    out, lse, stats = _gpu._in_batch_slices(one_slice, slices, ops, bmap, return_lse=True,
                                            return_stats=True, quant_stats=given, scale=0.1)
    assert [c[1] for c in calls] == [2, 2, 1] and all(c[2] == {"scale": 0.1} for c in calls)
    assert [c[0] for c in calls] == [float(ops[0].array[b0, 0, 0, 0]) for b0, _ in slices]
    assert_equal(out, ops[0].array, what="output rows")
    assert_equal(lse, ops[0].array[..., 0].astype(np.float32), what="lse")
    counts = np.full((B, Hq, 2), 4)
    whole = R.sparsity_stats(bmap, valid, counts, counts // 4, L, 16)
    assert stats.keys() == whole.keys()
    for key, value in whole.items():
        assert np.array_equal(stats[key], value), (key, stats[key], value)
    assert dataclasses.replace(given) == given                 # the caller's statistics untouched

    bad = ops[2].array.copy()
    bad[4, 0, 149, 63] = np.inf
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=f"^v: expected finite values, got 2 NaN or Inf of {bad.size}$"):
        _gpu._in_batch_slices(one_slice, slices, ops[:2] + [_gpu.Operand(bad, "float16", "HND", D)],
                              bmap, quant_stats=given)
    assert len(calls) == 3                                       # nothing ran
    bf16 = (rng.standard_normal((1, 1, 8, D)).astype(ml_dtypes.bfloat16)).view(np.uint16)
    bf16[0, 0, 3, 5], bf16[0, 0, 4, 6] = 0x7F80, 0xFFC1                # +Inf and a NaN
    assert _gpu._count_nonfinite(bf16) == 2


def test_entry_points_take_whole_batches_on_the_host(monkeypatch):
    """The GPU entry points' wrapper (_gpu._whole_batch), NumPy standing in for CuPy: a batch
    that fits the launch grid is one call; past it, one call per slice, each on its own entries,
    with the keyword options passed on unchanged and ``layout`` taken by the wrapper: the block
    maps concatenated in batch order, the attention written into one output; a non-finite value
    in any slice raises first, with the whole tensor's count, and nothing runs."""
    from sparge_cupy import _gpu
    monkeypatch.setattr(_gpu, "_cupy", lambda: np)
    B, H, L, D = 5, 2, 150, 64
    rng = np.random.default_rng(3)
    ops = [_gpu.Operand(rng.standard_normal((B, H, L, D)).astype(np.float16), "float16", "HND", D)
           for _ in range(3)]
    bmap = rng.random((B, H, 2, 3)) < 0.5
    calls = []

    @_gpu._whole_batch(2, returns_map=True)
    def predict(q, k, *, scale, topk):
        calls.append(("predict", q.array.shape[0], k.array.shape[0], scale, topk))
        return (q.array[:, :, :2, :3] + k.array[:, :, :2, :3]) > 0

    @_gpu._whole_batch(3)
    def attend(q, k, v, block_map, *, return_lse, return_stats, scale, out=None):
        calls.append(("attend", q.array.shape[0], v.array.shape[0], block_map.shape[0], scale))
        out = np.empty_like(q.array) if out is None else out
        out[...] = q.array * block_map[:, :, :1, :1] + v.array
        return out

    whole_map = predict(*ops[:2], layout="HND", scale=0.5, topk=0.25)
    whole_out = attend(*ops, bmap, layout="HND", scale=0.5, return_lse=False, return_stats=False)
    assert calls == [("predict", B, B, 0.5, 0.25), ("attend", B, B, B, 0.5)]
    monkeypatch.setattr(_gpu, "MAX_GRID_YZ", 2 * H)                # slices of 2, 2 and 1 entries
    calls.clear()
    assert_equal(predict(*ops[:2], layout="HND", scale=0.5, topk=0.25), whole_map, what="block map")
    assert_equal(attend(*ops, bmap, layout="HND", scale=0.5, return_lse=False, return_stats=False),
                 whole_out, what="output")
    assert calls == ([("predict", n, n, 0.5, 0.25) for n in (2, 2, 1)]
                     + [("attend", n, n, n, 0.5) for n in (2, 2, 1)])
    bad = ops[1].array.copy()
    bad[4, 1, 149, 63] = np.nan
    with pytest.raises(ValueError, match=f"^k: expected finite values, got 1 NaN or Inf of {bad.size}$"):
        predict(ops[0], _gpu.Operand(bad, "float16", "HND", D), layout="HND", scale=0.5, topk=0.25)
    assert len(calls) == 6                                       # nothing ran


@pytest.mark.parametrize("fn", ["sparge_attn", "block_sparse_attn"])
def test_fp16_qk_operands_past_the_fp16_range_raise(fn):
    """qk="fp16" on finite inputs whose rebalanced Q or smoothed K would round to inf in fp16
    raises a ValueError naming qk (the output would be NaN); operands that fit give a finite
    output, and qk="int8" (a scale per block) takes every one of these inputs."""
    from conftest import fp16_range_cases
    for name, (q, k, v), opts, overflows in fp16_range_cases():
        if fn == "block_sparse_attn":
            opts = dict(opts, block_map=np.ones((1, 2, 2, 3), bool))
        if overflows:
            with pytest.raises(ValueError, match=f"^qk: 'fp16' .*{overflows} reaches"):
                _call(getattr(sc, fn), q, k, v, qk="fp16", **opts)
        else:
            out = _call(getattr(sc, fn), q, k, v, qk="fp16", **dict(opts))
            assert np.isfinite(out).all(), name
        assert np.isfinite(_call(getattr(sc, fn), q, k, v, **dict(opts))).all(), name


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_fp16_output_saturates_at_the_fp16_maximum(pv):
    """The true output is a convex combination of V, so V at fp16's largest value 65504 gives
    65504; the rounded P can put the float32 result a fraction of a per cent past it, and the
    fp16 store saturates there instead of storing inf (reference.to_output, the kernels'
    cvt.rn.satfinite)."""
    rng = np.random.default_rng(5)
    q, k = (rng.standard_normal((1, 1, 200, 64)).astype(np.float16) for _ in range(2))
    v = np.full((1, 1, 200, 64), 65504, np.float16)
    v[..., 1::2] *= -1
    out = sc.sparge_attn(q, k, v, pv=pv)
    assert out.dtype == np.float16 and np.isfinite(out).all(), int((~np.isfinite(out)).sum())
    # Every output is 65504 sum_j p^_j / l with each p^_j within a relative 2^-4 (e4m3's half
    # ulp; fp16's is 2^-11) of p_j: at most that far below 65504, and never above it.
    a = np.abs(out.astype(np.float64))
    bad = (a > 65504) | (a < 65504 * (1 - 2.0 ** (-4 if pv == "fp8" else -11)))
    assert not bad.any(), f"{int(bad.sum())} of {a.size}, first {a[bad][:4]}"
    assert (a == 65504).any()                     # rows whose float32 value went past 65504
    assert R.to_output(np.float32([7e4, -7e4, np.nan, 1.0]), np.float16).tolist()[:2] == [65504, -65504]


def test_per_head_none_entries_turn_the_filter_off_for_that_head(qkv):
    """pvthreshd=[None, x, ...] (a tuning file's "off" head) is inf for that head: the same
    output as inf there; Fraction thresholds are numbers too."""
    from fractions import Fraction
    q, k, v = qkv
    a = sc.sparge_attn(q, k, v, pvthreshd=[None, 2.0, None, Fraction(3, 2)])
    b = sc.sparge_attn(q, k, v, pvthreshd=np.array([np.inf, 2.0, np.inf, 1.5]))
    assert_equal(a, b, what="output")


def test_ndarray_subclass_is_numpy(qkv):
    class Sub(np.ndarray):
        pass
    q, k, v = qkv
    assert_equal(sc.sparge_attn(*(x.view(Sub) for x in qkv)), sc.sparge_attn(q, k, v), what="output")


def test_stage2_counts_only_skips_of_groups_that_see_a_key():
    """A 16-row group whose keys in a causal diagonal block (or the key tail) are all masked
    skips that block's P V whatever lambda is, but by the mask's doing: a huge finite lambda
    (the filter on, never firing) reports no Stage 2 sparsity, as the filter off does, and the
    same output; a small lambda still counts the skips it makes."""
    rng = np.random.default_rng(0)
    for Lq, Lk in ((256, 256), (300, 200), (200, 300)):
        q, k, v = (rng.standard_normal((1, 1, L, 64)).astype(np.float32) for L in (Lq, Lk, Lk))
        bm = np.ones((1, 1, -(-Lq // 128), -(-Lk // 64)), bool)
        off = sc.block_sparse_attn(q, k, v, bm, is_causal=True, return_stats=True)
        on = sc.block_sparse_attn(q, k, v, bm, is_causal=True, pvthreshd=1e30, return_stats=True)
        assert_equal(on[0], off[0], what="output")
        assert on[1]["stage2_sparsity"] == off[1]["stage2_sparsity"] == 0.0, (Lq, Lk, on[1])
        assert on[1]["total_sparsity"] == off[1]["total_sparsity"], (Lq, Lk)
    q, k, v = (rng.standard_normal((1, 1, 1024, 64)).astype(np.float32) * 3 for _ in range(3))
    bm = np.ones((1, 1, 8, 16), bool)
    assert sc.block_sparse_attn(q, k, v, bm, is_causal=True, pvthreshd=2.0,
                                return_stats=True)[1]["stage2_sparsity"] > 0


def test_mask_skips_against_a_row_by_row_count():
    """reference.mask_skips (from the geometry and the map) equals the count, row by row, of
    visited (group, block) pairs where the causal mask hides every key of the block from the
    group while each of its real rows has seen a key in an earlier visited block."""
    rng = np.random.default_rng(2)
    bq, bk, G = sc.CONFIG.block_q, sc.CONFIG.block_k, sc.CONFIG.pv_group_rows
    total = 0
    for Lq, Lk in ((256, 256), (300, 200), (200, 300), (129, 1000), (1000, 65), (1, 1)):
        nq, nk = -(-Lq // bq), -(-Lk // bk)
        visit = (rng.random((2, 3, nq, nk)) < 0.6) & R.valid_blocks(Lq, Lk, bq, bk, True)
        want = np.zeros((2, 3, nq), np.int64)
        for b, h, i in np.ndindex(2, 3, nq):
            js = np.flatnonzero(visit[b, h, i])
            for g in range(bq // G):
                rows = [t for t in range(i * bq + g * G, i * bq + g * G + G) if t < Lq]
                lim = [min(Lk - 1, t + Lk - Lq) for t in rows]          # last visible key, or < 0
                for j in js:
                    hidden = bool(rows) and all(j * bk > x for x in lim)
                    seen = bool(rows) and all(any(jj < j and jj * bk <= x for jj in js) for x in lim)
                    want[b, h, i] += hidden and seen
        got = R.mask_skips(visit, Lq, Lk, True, G)
        assert_equal(got, want, what=f"mask_skips Lq {Lq} Lk {Lk}")
        assert not R.mask_skips(visit, Lq, Lk, False, G).any()
        total += int(want.sum())
    assert total > 0
