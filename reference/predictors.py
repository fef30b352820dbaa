"""Alternative Stage-1 predictors, measured against the paper's (``predict.py``) and the oracle.

The paper's predictor (SPEC.md section 1) estimates the attention of query block i on key block j by
``P^_ij = softmax_j(scale * qbar_i . kbar_j)`` and keeps, per row i, the blocks holding a share tau
of ``P^_i`` (TopCdf). ``scripts/predictor_study.py`` measured on Gemma 3 at equal relative L1
(``bench/results/predictor_study.md``) that it loses sparsity to the oracle for two reasons:

1. **The allocation** (most of the gap). TopCdf drops the same share of every row's mass. The
   error budget is one number per head (relative L1 over all rows), and dropping the blocks of
   smallest estimated mass first, whatever their row, is the Lagrangian allocation the oracle
   makes: one threshold per head compared across rows (:func:`select_threshold`). With the true
   mass this rule reaches 98-99% of the oracle; with the paper's own ``P^`` it lifts the paper's
   predictor from 51-59% to 80% of the oracle, at no cost.
2. **The estimate.** One pooled query against one pooled key per block. Pooling K loses most:
   within a 64-key block a few keys take the attention (``exp`` of a mean is not the mean of
   ``exp``). The recommended estimate keeps the pooled query of each query block but takes it
   against *every* key (``q_group=128, k_sub=1``: "qbar-keys"), a softmax over the keys, then sums
   per key block; with the threshold rule it reaches 89-90% of the oracle.

Everything here works from block statistics (pooled Q per group, pooled or single keys, pooled V
per block), never from the full ``Q K^T``. Cost in a kernel (causal, relative to dense attention's
``2 Lq Lk D`` FLOPs and ``Lq Lk / 2`` exponentials per head): the logits are a
``[Lq / q_group, D] x [D, Lk / k_sub]`` product, ``1 / (2 q_group k_sub)`` of the FLOPs (0.39% for
qbar-keys), and ``1 / (q_group k_sub)`` of the exponentials (0.78%); the threshold rule needs no sort.

All functions take HND arrays (``q [B, Hq, Lq, D]``, ``k``, ``v [B, Hkv, Lk, D]``) and per-head
threshold arrays ``[Hq]``; block maps are bool ``[B, Hq, nq, nk]`` with the conventions of
``predict.py``: never a causally invalid block, at least one block per row that has a valid block,
optional attention sink (block column 0), and optional forced local blocks (the last ``local_blocks``
valid key blocks of each row: with BQ = 2 BK and Lq = Lk these cover the diagonal 128 x 128 square).
"""
from __future__ import annotations

import numpy as np

from ..config import CONFIG
from .layout import num_blocks, valid_blocks
from .quant import expand_kv_heads, smooth_k

RULES = ("cdf", "threshold")
SCORES = ("mass", "contribution")


# ---------------------------------------------------------------------------------------------
# Block statistics.

def _group_moments(x, rows_per_group):
    """Mean and mean of squares of the valid rows of every group of ``rows_per_group`` tokens, and
    the number of valid rows: float64 ``[B, H, ng, D]`` twice and int ``[ng]``. Padding rows (past
    the sequence end) are not counted; an empty group has mean 0."""
    x = np.asarray(x, dtype=np.float64)
    B, H, L, D = x.shape
    ng = num_blocks(L, rows_per_group)
    pad = ng * rows_per_group - L
    if pad:
        x = np.concatenate([x, np.zeros((B, H, pad, D))], axis=2)
    xb = x.reshape(B, H, ng, rows_per_group, D)
    count = np.minimum(rows_per_group, L - np.arange(ng) * rows_per_group)
    c = np.maximum(count, 1)[None, None, :, None]
    return xb.sum(axis=3) / c, (xb * xb).sum(axis=3) / c, count


def _group_minmax(x, rows_per_group):
    """Per-channel min and max over the valid rows of every group, float64 ``[B, H, ng, D]``."""
    x = np.asarray(x, dtype=np.float64)
    B, H, L, D = x.shape
    ng = num_blocks(L, rows_per_group)
    pad = ng * rows_per_group - L
    lo = np.concatenate([x, np.full((B, H, pad, D), np.inf)], axis=2) if pad else x
    hi = np.concatenate([x, np.full((B, H, pad, D), -np.inf)], axis=2) if pad else x
    return (lo.reshape(B, H, ng, rows_per_group, D).min(axis=3),
            hi.reshape(B, H, ng, rows_per_group, D).max(axis=3))


def visible_keys(Lq, Lk, rows_per_group, block_k, is_causal, cfg=CONFIG, groups=None):
    """Mean number of keys of key block j that a row of query group g sees, float64 ``[ng, nk]``
    (token-exact causal, bottom-right aligned; keys past Lk never seen). ``groups``: a slice of
    the groups to return (default all). Groups never straddle a query block when
    ``rows_per_group`` divides BQ."""
    ng, nk = num_blocks(Lq, rows_per_group), num_blocks(Lk, block_k)
    g0, g1, _ = (groups or slice(0, ng)).indices(ng)
    t = np.arange(g0 * rows_per_group, g1 * rows_per_group)
    start = np.arange(nk) * block_k
    size = np.minimum(block_k, Lk - start)                                # keys of block j
    if is_causal:
        # row t sees keys u <= t + (Lk - Lq): n_tj = clip(t + Lk - Lq + 1 - start_j, 0, size_j)
        n = np.clip(t[:, None] + (Lk - Lq) + 1 - start[None, :], 0, size[None, :]).astype(np.float64)
    else:
        n = np.broadcast_to(size[None, :], (t.size, nk)).astype(np.float64)
    n[t >= Lq] = 0.0                                                      # padding rows
    counts = np.minimum(rows_per_group, Lq - np.arange(g0, g1) * rows_per_group)
    return n.reshape(g1 - g0, rows_per_group, nk).sum(axis=1) / np.maximum(counts, 1)[:, None]


# ---------------------------------------------------------------------------------------------
# The estimate of the attention mass of every block.

def _lse_blocks(a, per, nk):
    """Log-sum-exp of every ``per`` consecutive columns of ``a [..., ns]`` into ``[..., nk]``."""
    if per == 1:
        return a
    pad = nk * per - a.shape[-1]
    if pad:
        a = np.concatenate([a, np.full(a.shape[:-1] + (pad,), -np.inf)], axis=-1)
    a = a.reshape(a.shape[:-1] + (nk, per))
    am = a.max(axis=-1, keepdims=True)
    am_f = np.where(np.isfinite(am), am, 0.0)
    with np.errstate(divide="ignore"):
        out = (np.log(np.exp(a - am_f).sum(axis=-1, keepdims=True)) + am_f)[..., 0]
    return np.where(np.isfinite(am[..., 0]), out, -np.inf)


def estimate_block_mass(q, k, *, is_causal, scale, q_group=128, k_sub=1, q_detail=None,
                        sink_detail=False, count_keys=True, variance=0.0, box=0.0, sharpen=1.0,
                        cfg=CONFIG):
    """Estimated attention mass of every block, float64 ``[B, Hq, nq, nk]``; every row with a valid
    block sums to 1 over j (like :func:`reference.block_attention_mass`, which it estimates).

    For query group g (``q_group`` consecutive rows; 128 = one query block: the paper's pooling) and
    key sub-block s (``k_sub`` keys; 64 = one key block: the paper's; 1 = every key), with
    ``qbar_g``, ``q2_g`` the mean and mean square of the group's rows, ``kbar_s``, ``k2_s`` those
    of the smoothed K sub-block:

        a_gs = scale qbar_g . kbar_s                                   (the paper's logit)
             + variance * scale^2 / 2 * (q2_g . k2_s - qbar_g^2 . kbar_s^2)   (Var(q . k), diagonal)
             + log n_gs                                                (keys the group really sees)

    ``exp(a_gs)`` is the log-normal estimate of ``sum_{u in s} exp(scale q . k_u)`` averaged over
    the group's rows (q and k independent within group and sub-block, per-channel variances); the
    sub-blocks of a key block are summed (log-sum-exp) into ``a_gj``. Then ``p_gj = softmax_j a_gj``
    and ``m_ij = mean_{g in i} p_gj`` weighted by the group's valid rows: the true mass is a mean
    over rows of per-row probabilities, and so is this. ``count_keys=False`` drops ``log n`` (full
    blocks assumed, as the paper does). ``variance``, ``box`` (a Quest-style per-channel
    upper bound of the logit, mixed in with that weight), ``sharpen`` (logits times a factor, or
    "norm": times mean|q_t| / |qbar_g|) are measured alternatives that did not help.

    ``q_detail`` (with ``q_group = BQ``; a divisor of BQ): two levels. The key detail comes from the
    block's pooled query against every sub-block, the query detail from groups of ``q_detail``
    rows against the pooled key blocks, to first order in ``q_t - qbar_i``:

        a_gj = LSE_{s in j}(scale qbar_i . kbar_s + log n_gs) + scale (qbar_g - qbar_i) . kbar_j

    (``q . k_u = qbar_i . k_u + (q - qbar_i) . k_u`` and ``k_u`` replaced by ``kbar_j`` in the
    second term only). It costs one ``[Lq / q_detail, D] x [D, nk]`` product more, 1/(BK q_detail)
    of QK^T.
    """
    bq, bk = cfg.block_q, cfg.block_k
    k_sub = bk if k_sub is None else int(k_sub)
    if bq % q_group or bk % k_sub or (q_detail and (bq % q_detail or q_group != bq)):
        raise ValueError(f"q_group and q_detail must divide {bq} (q_detail needs q_group = {bq}) "
                         f"and k_sub must divide {bk}; got {q_group}, {q_detail}, {k_sub}")
    q = np.asarray(q)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    nq, nk = num_blocks(Lq, bq), num_blocks(Lk, bk)
    _, ks = smooth_k(k)                      # softmax-invariant; keeps the variance term centred
    qm, q2, _ = _group_moments(q, q_group)                                # [B, Hq, ng, D]
    km, k2, _ = _group_moments(ks, k_sub)                                 # [B, Hkv, ns, D]
    km, k2 = expand_kv_heads(km, Hq), expand_kv_heads(k2, Hq)
    unit = q_detail or q_group               # rows per group of the softmax and the mean
    per_unit = q_group // unit               # softmax groups per pooled query (1, or BQ/q_detail)
    _, _, ucount = _group_moments(q[:, :1, :, :1], unit)
    nu = ucount.size
    if q_detail:
        qd, _, _ = _group_moments(q, q_detail)                            # [B, Hq, nu, D]
        kb, _, _ = _group_moments(ks, bk)
        kb = expand_kv_heads(kb, Hq)
        # first-order query detail per (group, key block): scale (qbar_g - qbar_i) . kbar_j
        qrep = np.repeat(qm, per_unit, axis=2)[:, :, :nu]
        delta = scale * np.matmul(qd - qrep, kb.swapaxes(-1, -2))         # [B, Hq, nu, nk]
    qn = None
    if isinstance(sharpen, str):
        qn, _, _ = _group_moments(np.sqrt((np.asarray(q, np.float64) ** 2).sum(-1, keepdims=True)), q_group)
    mass = np.zeros((B, Hq, nq, nk))
    wsum = np.zeros(nq)
    step = max(per_unit, (1 << 23) // max(1, B * Hq * km.shape[2]) // per_unit * per_unit)
    for u0 in range(0, nu, step):            # chunks of softmax groups: memory stays bounded
        u1 = min(nu, u0 + step)
        g0, g1 = u0 // per_unit, -(-u1 // per_unit)
        qc = qm[:, :, g0:g1]
        a = scale * np.matmul(qc, km.swapaxes(-1, -2))                    # [B, Hq, c, ns]
        if qn is not None:
            # the pooled query is shorter than its rows when they disagree (|qbar| <= mean|q_t|)
            ratio = qn[:, :, g0:g1, 0] / np.maximum(np.sqrt((qc * qc).sum(-1)), 1e-30)
            a = a * ratio[..., None]
        elif sharpen != 1.0:
            a = a * sharpen
        if box:
            # Quest-style bound: the largest logit of qbar_g over the per-channel box [kmin, kmax]
            # of the sub-block, sum_c max(q_c kmin_c, q_c kmax_c)
            kmin, kmax = (expand_kv_heads(x, Hq) for x in _group_minmax(ks, k_sub))
            ub = (np.matmul(np.maximum(qc, 0), kmax.swapaxes(-1, -2))
                  + np.matmul(np.minimum(qc, 0), kmin.swapaxes(-1, -2)))
            a = (1 - box) * a + box * scale * ub
        if variance:
            # Var(q . k) = sum_c E[q_c^2] E[k_c^2] - qbar_c^2 kbar_c^2 (independent, diagonal)
            var = (np.matmul(q2[:, :, g0:g1], k2.swapaxes(-1, -2))
                   - np.matmul(qc * qc, (km * km).swapaxes(-1, -2)))
            a = a + (0.5 * variance * scale * scale) * np.maximum(var, 0.0)
        a = np.repeat(a, per_unit, axis=2)[:, :, u0 - g0 * per_unit:u1 - g0 * per_unit]
        n = visible_keys(Lq, Lk, unit, k_sub, is_causal, cfg, groups=slice(u0, u1))   # [c, ns]
        with np.errstate(divide="ignore"):
            a = np.where(n > 0, a + (np.log(np.maximum(n, 1e-300)) if count_keys else 0.0), -np.inf)
        a = _lse_blocks(a, bk // k_sub, nk)                                # [B, Hq, c, nk]
        if q_detail:
            a = a + delta[:, :, u0:u1]
            if sink_detail:
                # key block 0 (the attention sink: one outlier key that kbar_0 averages away) at
                # key resolution with the groups' own queries: [Lq / q_detail, D] x [D, BK]
                k0 = expand_kv_heads(ks[:, :, :bk].astype(np.float64), Hq)
                a0 = scale * np.matmul(qd[:, :, u0:u1], k0.swapaxes(-1, -2))
                n0 = visible_keys(Lq, Lk, unit, 1, is_causal, cfg, groups=slice(u0, u1))[:, :k0.shape[2]]
                with np.errstate(divide="ignore"):
                    a0 = np.where(n0 > 0, a0 + (np.log(np.maximum(n0, 1e-300)) if count_keys else 0.0), -np.inf)
                a[..., 0] = _lse_blocks(a0, k0.shape[2], 1)[..., 0]
        m = a.max(axis=-1, keepdims=True)
        e = np.exp(a - np.where(np.isfinite(m), m, 0.0))                  # exp(-inf) = 0
        tot = e.sum(axis=-1, keepdims=True)
        p = np.where(tot > 0, e / np.where(tot > 0, tot, 1.0), 0.0)
        # mean over the groups of each query block, weighted by their valid rows
        blk = np.arange(u0, u1) // (bq // unit)
        w = ucount[u0:u1].astype(np.float64)
        np.add.at(mass, (slice(None), slice(None), blk), p * w[None, None, :, None])
        np.add.at(wsum, blk, w)
    return mass / np.maximum(wsum, 1)[None, None, :, None]


def estimate_contribution(mass, v, *, norm="l2", cfg=CONFIG):
    """Estimated error of dropping each block alone: ``c_ij = m_ij * || vbar_j - o^_i ||`` with
    ``vbar_j`` the mean of V over key block j and ``o^_i = sum_j m_ij vbar_j`` the estimated output
    of query block i (dropping mass m of values vbar from a row moves its output by
    ``m (o - vbar) / (1 - m)``). ``norm="l2"`` (a matrix product in a kernel:
    ``|vbar|^2 - 2 vbar . o^ + |o^|^2``) or ``"l1"`` (the metric's own norm, ``nq nk D`` absolute
    differences). float64 ``[B, Hq, nq, nk]``."""
    mass = np.asarray(mass, dtype=np.float64)
    Hq = mass.shape[1]
    vbar, _, _ = _group_moments(v, cfg.block_k)
    vbar = expand_kv_heads(vbar, Hq)                                       # [B, Hq, nk, D]
    o_hat = np.matmul(mass, vbar)                                          # [B, Hq, nq, D]
    if norm == "l1":
        dist = np.abs(vbar[:, :, None, :, :] - o_hat[:, :, :, None, :]).sum(axis=-1)
    elif norm == "l2":
        d2 = ((vbar * vbar).sum(-1)[:, :, None, :] - 2 * np.matmul(o_hat, vbar.swapaxes(-1, -2))
              + (o_hat * o_hat).sum(-1)[..., None])
        dist = np.sqrt(np.maximum(d2, 0.0))
    else:
        raise ValueError(f"norm: expected 'l1' or 'l2', got {norm!r}")
    return mass * dist


# ---------------------------------------------------------------------------------------------
# Selection.

def forced_blocks(Lq, Lk, *, is_causal, local_blocks=0, attention_sink=True, cfg=CONFIG):
    """Bool ``[nq, nk]``: the blocks kept whatever the scores (sink column 0; the last
    ``local_blocks`` valid key blocks of every row), only causally valid ones."""
    valid = valid_blocks(Lq, Lk, cfg.block_q, cfg.block_k, is_causal)
    n_valid = valid.sum(axis=1)                                            # valid blocks: a prefix
    j = np.arange(valid.shape[1])[None, :]
    forced = (j >= n_valid[:, None] - int(local_blocks)) & valid
    if attention_sink:
        forced[:, 0] |= valid[:, 0]
    return forced


def select_threshold(score, candidates, threshold):
    """Keep the candidate blocks whose score is >= the head's threshold, and per row at least the
    candidate of largest score (ties: lower j). One threshold per head is compared across all rows
    of the head: the allocation of the error budget between rows follows the scores.

    ``score`` float ``[B, Hq, nq, nk]``, ``candidates`` bool (broadcastable), ``threshold`` ``[Hq]``.
    Monotone: a lower threshold keeps a superset; ``threshold <= min score`` keeps every
    candidate, ``+inf`` one block per row."""
    score = np.asarray(score, dtype=np.float64)
    candidates = np.broadcast_to(candidates, score.shape)
    thr = np.asarray(threshold, dtype=np.float64)[None, :, None, None]
    # dropping block (i, j) adds about m_ij |o_i - vbar_j| to a sum over all rows that one budget
    # bounds: with a common threshold the cheapest blocks go first whatever their row (Lagrange)
    keep = candidates & (score >= thr)
    s = np.where(candidates, score, -np.inf)
    best = np.argmax(s, axis=-1)[..., None]                                # first maximum: lowest j
    top = np.zeros_like(keep)
    np.put_along_axis(top, best, True, axis=-1)
    return keep | (top & candidates.any(axis=-1, keepdims=True))


def select_cdf(score, candidates, tau):
    """TopCdf on any non-negative score: per row, sort descending (ties: lower j first) and keep
    the longest prefix whose cumulative sum is <= tau times the row's total, at least one. The
    paper's rule (``predict.select_topcdf``), in float64, for scores other than ``P^``."""
    score = np.asarray(score, dtype=np.float64)
    candidates = np.broadcast_to(candidates, score.shape)
    s = np.where(candidates, score, 0.0)
    order = np.argsort(-s, axis=-1, kind="stable")
    csum = np.cumsum(np.take_along_axis(s, order, axis=-1), axis=-1)
    tau = np.asarray(tau, dtype=np.float64)[None, :, None, None]
    n_keep = np.maximum((csum <= tau * csum[..., -1:]).sum(axis=-1), 1)
    n_keep = np.minimum(n_keep, candidates.sum(axis=-1))
    keep = np.zeros(score.shape, bool)
    np.put_along_axis(keep, order, np.arange(score.shape[-1]) < n_keep[..., None], axis=-1)
    return keep & candidates


# ---------------------------------------------------------------------------------------------
# The predictor.

def block_scores(q, k, v=None, *, is_causal, scale, score="mass", norm="l2", cfg=CONFIG,
                 **estimate):
    """The per-block score that :func:`predict_block_map_v2` thresholds: the estimated mass
    (:func:`estimate_block_mass` with the keyword arguments ``estimate``) or the estimated error
    contribution (:func:`estimate_contribution`, needs ``v``). float64 ``[B, Hq, nq, nk]``, 0 on
    invalid blocks."""
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    mass = estimate_block_mass(q, k, is_causal=is_causal, scale=scale, cfg=cfg, **estimate)
    if score == "mass":
        return mass
    if v is None:
        raise ValueError("score='contribution' needs v")
    return estimate_contribution(mass, v, norm=norm, cfg=cfg)


def predict_block_map_v2(q, k, v=None, *, is_causal, scale, threshold, rule="threshold",
                         local_blocks=0, attention_sink=True, return_details=False, cfg=CONFIG,
                         **estimate):
    """A Stage-1 block map from estimated block scores, bool ``[B, Hq, nq, nk]``.

    ``rule="threshold"`` (recommended): keep block (i, j) iff ``nk * score_ij >= threshold[h]``:
    one number per head, compared across all rows of the head (the Lagrangian allocation of the
    error budget). ``nk = ceil(Lk / BK)`` makes the threshold relative to uniform attention over
    the whole key sequence (``nk * m = 1``), so that one threshold serves every length: the
    optimal absolute threshold on Gemma 3 halves when the sequence doubles (fitted exponent 0.85 to
    1.05, ``bench/results/predictor_study.md``). ``rule="cdf"``: TopCdf with tau = ``threshold[h]``
    per row, the paper's rule on this score.

    The score is :func:`block_scores` with the keyword arguments ``estimate`` (defaults: the
    estimated mass from one pooled query per query block against every key, ``q_group=128,
    k_sub=1, variance=0``). Then OR the forced blocks (sink, ``local_blocks``) and AND the causal
    validity; at least one selected block per row that has a valid block. No self-similarity fix
    blocks. ``return_details``: also ``{"score", "selected", "forced", "valid"}``.
    """
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    q = np.asarray(q)
    Lq, Lk = q.shape[2], k.shape[2]
    valid = valid_blocks(Lq, Lk, cfg.block_q, cfg.block_k, is_causal)
    s = block_scores(q, k, v, is_causal=is_causal, scale=scale, cfg=cfg, **estimate)
    s = np.where(valid, s, 0.0)
    if rule == "threshold":
        # one threshold per head across rows, on the mass relative to uniform attention over Lk
        selected = select_threshold(s * valid.shape[1], valid, threshold)
    else:
        selected = select_cdf(s, valid, threshold)
    forced = forced_blocks(Lq, Lk, is_causal=is_causal, local_blocks=local_blocks,
                           attention_sink=attention_sink, cfg=cfg)
    block_map = (selected | forced) & valid
    if not return_details:
        return block_map
    return block_map, {"score": s, "selected": selected & valid, "forced": forced, "valid": valid}
