"""Shared test helpers: inputs with real structure, tolerances derived from the problem, and
comparisons whose failure messages show the count and the first mismatches."""
from __future__ import annotations

import numpy as np
import pytest

from sparge_cupy import CONFIG
from sparge_cupy import reference as R


def make_qkv(B=1, Hq=2, Hkv=None, Lq=200, Lk=None, D=64, *, dtype=np.float32, layout="HND",
             seed=0, structured=True):
    """Random Q, K, V; ``structured`` adds what real attention has (a shared direction per kv
    head, so K has a mean to smooth away, and locally similar neighbouring tokens, so blocks are
    self-similar and prediction has something to find)."""
    Hkv = Hq if Hkv is None else Hkv
    Lk = Lq if Lk is None else Lk
    rng = np.random.default_rng(seed)

    def tokens(H, L):
        x = rng.standard_normal((B, H, L, D))
        if structured:
            # slowly varying component: tokens near each other point the same way
            anchors = rng.standard_normal((B, H, L // 32 + 2, D)) * 2.0
            t = np.arange(L) / 32.0
            i0 = np.floor(t).astype(int)
            w = (t - i0)[None, None, :, None]
            x = x * 0.5 + anchors[:, :, i0] * (1 - w) + anchors[:, :, i0 + 1] * w
        return x

    q, k, v = tokens(Hq, Lq), tokens(Hkv, Lk), tokens(Hkv, Lk)
    if structured:
        k = k + rng.standard_normal((B, Hkv, 1, D)) * 3.0   # the mean that smoothing removes
    out = []
    for x in (q, k, v):
        x = x.astype(dtype)
        out.append(np.ascontiguousarray(x.transpose(0, 2, 1, 3)) if layout == "NHD" else x)
    return tuple(out)


def mismatch_report(actual, expected, bad, *, what, limit=8):
    """'N of M elements differ' and the first few (index, actual, expected)."""
    idx = np.argwhere(bad)
    lines = [f"{what}: {len(idx)} of {bad.size} elements out of tolerance"]
    for i in idx[:limit]:
        i = tuple(int(t) for t in i)
        lines.append(f"  at {i}: got {actual[i]!r}, expected {expected[i]!r}")
    return "\n".join(lines)


def assert_close(actual, expected, atol, *, what="output"):
    """Elementwise |actual - expected| <= atol (atol broadcastable); NaN never passes."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} != expected {expected.shape}")
    both_inf = np.isinf(actual) & np.isinf(expected) & (np.sign(actual) == np.sign(expected))
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(actual - expected) <= atol) & ~both_inf
    if bad.any():
        raise AssertionError(mismatch_report(actual, expected, bad, what=what))


def assert_equal(actual, expected, *, what="array"):
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} != expected {expected.shape}")
    bad = actual != expected
    if np.issubdtype(actual.dtype, np.floating):
        bad &= ~(np.isnan(actual) & np.isnan(expected))
    if bad.any():
        raise AssertionError(mismatch_report(actual, expected, bad, what=what))


def dense_float32(q, k, v, *, is_causal, scale, block_map=None):
    """Plain float32 softmax attention (HND): the same-precision framework reference."""
    q, k, v = (np.asarray(x, dtype=np.float32) for x in (q, k, v))
    Hq, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    k, v = (np.repeat(x, Hq // x.shape[1], axis=1) for x in (k, v))
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * np.float32(scale)
    mask = R.token_mask(np.arange(Lq), Lq, Lk, is_causal)[None, None]
    if block_map is not None:
        mask = mask & R.expand_block_map(block_map, Lq, Lk, CONFIG.block_q, CONFIG.block_k)
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    return np.where(l > 0, (p / np.where(l > 0, l, 1)) @ v, 0).astype(np.float32)


def float32_attention_tolerance(q, k, v, *, is_causal, scale, block_map=None):
    """Tolerance for a float32 computation of attention (HND inputs): twice the largest error of
    a plain float32 attention against float64 on the same inputs, plus a floor of a few float32
    ulps of max|V| (flash-attention's rule: at most about twice a same-precision reference's
    error)."""
    exact = R.dense_attention(q, k, v, is_causal=is_causal, scale=scale, block_map=block_map)
    f32 = dense_float32(q, k, v, is_causal=is_causal, scale=scale, block_map=block_map)
    return 2.0 * np.abs(f32 - exact).max() + 8 * np.finfo(np.float32).eps * np.abs(np.asarray(v, np.float64)).max()


def all_blocks(B, Hq, Lq, Lk):
    return np.ones((B, Hq, R.num_blocks(Lq, CONFIG.block_q), R.num_blocks(Lk, CONFIG.block_k)), bool)


def heads(x, Hq):
    return np.full((Hq,), x, dtype=np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def fp16_range_cases():
    """``(name, (q, k, v), options, overflows)``: inputs for ``qk="fp16"`` whose rebalanced Q and
    smoothed K fit fp16 or not. Rebalancing gives both operands the channel maximum
    sqrt(max|Q_c| max|K_c - km_c|) (SPEC section 3): 3e4 and 2e5 make it 7.7e4, past 65504.
    Without rebalancing, K at 60000 with one row at -60000 is 1.2e5 from its mean; rebalanced,
    the same K fits. Q at fp16's largest finite value, not rebalanced, still fits."""
    rng = np.random.default_rng(11)
    base = [rng.standard_normal((1, 2, 130, 64)).astype(np.float32) for _ in range(3)]
    q, k, v = (x.copy() for x in base)
    q[0, 1, 7, 5], k[0, 1, 9, 5] = 3e4, 2e5
    cases = [("rebalanced Q and K", (q, k, v), {}, "Q")]
    q, k, v = (x.astype(np.float16) for x in base)
    k[0, 0, :, 3] = 60000
    k[0, 0, 100, 3] = -60000
    cases += [("smoothed K", (q, k, v), {"rebalance": False}, "smoothed K"),
              ("smoothed K rebalanced", (q, k, v), {}, None)]
    q, k, v = (x.astype(np.float16) for x in base)
    q[0, 0, 0, 0] = 65504
    cases.append(("Q at the fp16 maximum", (q, k, v), {"rebalance": False}, None))
    return cases
