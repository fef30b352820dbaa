"""The oracle block map: how sparse Stage 1 could be if it knew the true attention.

Per (b, head, query block i) the oracle ranks the causally valid key blocks j by a score taken from
the exact float64 attention and keeps a prefix of that ranking; the prefix lengths ``n_i`` are
chosen so that the head's relative L1 error against dense float64 attention,

    L1(b, h) = sum_{t, d} |O_masked - O_dense| / sum_{t, d} |O_dense|

(``O_masked``: dense float64 attention restricted to the kept blocks, the token-exact causal mask
kept), is at most ``l1`` with as few kept blocks as possible. No quantization: the oracle spends the
whole error budget on sparsity. It is the yardstick for Stage 1: a predictor only sees pooled Q and
K, the oracle sees every score (and, with the allocation below, the exact error), so no Stage-1
predictor can beat it by much (it could only by ranking blocks better than the oracle's score).

How it is computed, exactly. For query block i every key block j gives float64 partial sums
``N_tj = sum_{u in j} exp(s_tu - m_t) v_u`` and ``l_tj = sum_{u in j} exp(s_tu - m_t)`` (``m_t`` the
row maximum over all visible keys). Keeping a set K of blocks gives
``O_t = sum_{j in K} N_tj / sum_{j in K} l_tj`` (zero if the row sees no kept key, as the kernels do),
so cumulative sums over the ranking give the error ``E_i(n)`` of row block i for *every* prefix
length n in one pass over the data. Choosing the ``n_i`` is then a small problem on these curves:

- ``allocation="lagrange"`` (default): minimise ``sum_i n_i`` subject to ``sum_i E_i(n_i) <= l1 *
  sum|O_dense|``. Walk the lower convex hull of every row block's curve ``(n, E_i(n))`` from n = 1;
  all hull segments of all row blocks are taken in order of decreasing error removed per block
  added (the Lagrangian relaxation, exact at hull points), and the last segment taken is cut at
  the first n that meets the bound.
- ``allocation="mass"``: one dropped-mass threshold per head: row block i keeps the shortest prefix
  whose dropped score is <= eps, and eps is the largest value (every breakpoint is tried, through
  one sorted sweep) for which the head meets the bound.

Both keep at least one block per row block that has a valid block. The ranking is
``rank="mass"`` (default, the true attention mass of :func:`reference.block_attention_mass`: the
mean over the block's query rows of the probability on the key block) or ``rank="contribution"``
(``sum_t || (N_tj - l_tj O_t) / L_t ||_1``: how far the block pulls the output rows of block i, the
first-order change of the output when block j alone is dropped).

Rows of the whole head share one bound, so the per-row-block budget is the allocation's choice; the
bound holds per (b, head) (so also per head over the batch). The achieved L1 is checked with an
independent masked dense float64 attention (``verify=True``).
"""
from __future__ import annotations

import numpy as np

from ..config import CONFIG
from .layout import expand_block_map, num_blocks, valid_blocks

RANKS = ("mass", "contribution")
ALLOCATIONS = ("lagrange", "mass")


def _grouped(q, k, v):
    """float64 views grouped by kv head: q ``[B, Hkv, g, Lq, D]``, k and v ``[B, Hkv, Lk, D]``."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    return q.reshape(B, Hkv, Hq // Hkv, Lq, D), k, v


def _row_block_scores(qg, k, r0, r1, n_keys, *, Lq, is_causal, scale):
    """Masked logits ``[B, Hq, r1-r0, n_keys]`` of query rows r0:r1 against the first keys, and the
    token mask (query t sees key u iff ``u <= t + (Lk - Lq)`` when causal)."""
    B, Hkv, g, _, D = qg.shape
    Lk = k.shape[2]
    rows = r1 - r0
    qi = qg[:, :, :, r0:r1].reshape(B, Hkv, g * rows, D)
    s = (qi @ k[:, :, :n_keys].swapaxes(-1, -2)).reshape(B, Hkv * g, rows, n_keys) * scale
    if is_causal:
        mask = np.arange(n_keys)[None, :] <= np.arange(r0, r1)[:, None] + (Lk - Lq)
    else:
        mask = np.ones((rows, n_keys), dtype=bool)
    return s, mask


def exact_attention(q, k, v, *, is_causal, scale, block_map=None, cfg=CONFIG):
    """Dense float64 attention (HND), optionally restricted to the kept blocks of ``block_map``.

    The same mathematics as :func:`reference.dense_attention` (rows that see no key output zeros),
    computed one query block at a time with BLAS matrix products and only the causally visible
    keys, so that it is fast enough for the oracle and the tuner at 16K tokens. Returns float64
    ``[B, Hq, Lq, D]``.
    """
    qg, k, v = _grouped(q, k, v)
    B, Hkv, g, Lq, D = qg.shape
    Lk = k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    nq = num_blocks(Lq, bq)
    nk_row = valid_blocks(Lq, Lk, bq, bk, is_causal).sum(axis=1)
    out = np.zeros((B, Hkv * g, Lq, v.shape[-1]), dtype=np.float64)
    for i in range(nq):
        r0, r1 = i * bq, min(Lq, (i + 1) * bq)
        n_keys = min(Lk, int(nk_row[i]) * bk)
        if n_keys == 0:
            continue
        s, mask = _row_block_scores(qg, k, r0, r1, n_keys, Lq=Lq, is_causal=is_causal, scale=scale)
        mask = np.broadcast_to(mask, s.shape)
        if block_map is not None:
            tok = expand_block_map(np.asarray(block_map, dtype=bool)[:, :, i:i + 1], bq, n_keys, bq, bk)
            mask = mask & tok[:, :, :r1 - r0]
        s = np.where(mask, s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        p = np.exp(s - m)
        l = p.sum(axis=-1, keepdims=True)
        o = (p.reshape(B, Hkv, g * (r1 - r0), n_keys) @ v[:, :, :n_keys]).reshape(B, Hkv * g, r1 - r0, -1)
        out[:, :, r0:r1] = np.where(l > 0, o / np.where(l > 0, l, 1.0), 0.0)
    return out


def _block_partials(qg, k, v, i, n_blocks, *, Lq, is_causal, scale, cfg):
    """Per key block partial sums of query block i: ``N [B, Hq, n, rows, D]`` and
    ``l [B, Hq, n, rows]`` (float64, relative to the row maximum over the visible keys)."""
    B, Hkv, g, _, D = qg.shape
    Lk = k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    r0, r1 = i * bq, min(Lq, (i + 1) * bq)
    rows = r1 - r0
    n_keys = min(Lk, n_blocks * bk)
    s, mask = _row_block_scores(qg, k, r0, r1, n_keys, Lq=Lq, is_causal=is_causal, scale=scale)
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0)).reshape(B, Hkv, g * rows, n_keys)
    N = np.empty((B, Hkv * g, n_blocks, rows, v.shape[-1]))
    l = np.empty((B, Hkv * g, n_blocks, rows))
    for j in range(n_blocks):         # one BLAS product per key block, the query heads of a kv head stacked
        u0, u1 = j * bk, min(n_keys, (j + 1) * bk)
        pj = np.ascontiguousarray(p[..., u0:u1])
        N[:, :, j] = (pj @ v[:, :, u0:u1]).reshape(B, Hkv * g, rows, -1)
        l[:, :, j] = pj.sum(axis=-1).reshape(B, Hkv * g, rows)
    return N, l


def _prefix_errors(N, l, order, o_ref):
    """``E[b, h, n]`` for n = 0..len(order): the L1 numerator of keeping the first n ranked blocks
    (accumulated one block at a time, so that nothing larger than N is held)."""
    B, H, nb = order.shape
    bi, hi = np.arange(B)[:, None], np.arange(H)[None, :]
    E = np.empty((B, H, nb + 1))
    E[:, :, 0] = np.abs(o_ref).sum(axis=(2, 3))
    acc = np.zeros_like(o_ref)
    den = np.zeros(o_ref.shape[:3] + (1,))
    for n in range(nb):
        j = order[:, :, n]
        acc += N[bi, hi, j]
        den += l[bi, hi, j][..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            o = np.where(den > 0, acc / den, 0.0)
        E[:, :, n + 1] = np.abs(o - o_ref).sum(axis=(2, 3))
    return E


def _lower_hull(E, n_max):
    """Indices n (from 1) of the lower convex hull of ``(n, E[n])``, n = 1..n_max, up to the first
    minimiser of E: the Lagrangian choices of one row block."""
    hull = []
    for n in range(1, n_max + 1):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> n
            if (E[b] - E[a]) * (n - a) >= (E[n] - E[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(n)
    stop = 1 + int(np.argmin(E[1:n_max + 1]))
    return [n for n in hull if n <= stop]


def _allocate_lagrange(E, n_max, budget):
    """Prefix length per row block ``[nq]`` for one (b, head); see the module docstring."""
    n = np.minimum(n_max, 1)
    err = float(E[np.arange(len(n_max)), n].sum())
    if err <= budget:
        return n
    segs = []                       # (error removed per block, row, n_from, n_to)
    for i, nm in enumerate(n_max):
        if nm <= 1:
            continue
        h = _lower_hull(E[i], int(nm))
        for a, b in zip(h[:-1], h[1:]):
            segs.append(((E[i, a] - E[i, b]) / (b - a), i, a, b))
    segs.sort(key=lambda s: -s[0])   # stable: hull order within a row is kept
    for _, i, a, b in segs:
        gain = E[i, a] - E[i, b]
        if err - gain <= budget:     # cut this segment at its first point that meets the bound
            for c in range(a + 1, b + 1):
                if err - (E[i, a] - E[i, c]) <= budget:
                    n[i] = c
                    return n
        err -= gain
        n[i] = b
    return n                        # the bound cannot be met: every row at its minimum error


def _allocate_mass(E, n_max, sorted_scores, budget):
    """One dropped-score threshold per (b, head): the sparsest one that meets the bound."""
    nq, nk = sorted_scores.shape
    n = np.minimum(n_max, 1)
    err = float(E[np.arange(nq), n].sum())
    total = np.array([sorted_scores[i, :n_max[i]].sum() for i in range(nq)])
    cum = np.cumsum(sorted_scores, axis=1)
    # breakpoint (i, c), c = 1..n_max_i - 1: row i needs c+1 blocks once eps < dropped_i(c)
    c = np.arange(1, nk)
    dropped = np.clip(total[:, None] - cum[:, :-1], 0.0, None)       # [nq, nk-1], c = 1..nk-1
    real = c[None, :] < n_max[:, None]
    rows_idx, c_idx = np.nonzero(real)
    values = dropped[rows_idx, c_idx]
    cs = c[c_idx]
    order = np.argsort(-values, kind="stable")   # row-major order, so c rises within a row
    if err <= budget:
        return n
    delta = E[rows_idx, cs + 1] - E[rows_idx, cs]
    ok = np.nonzero(err + np.cumsum(delta[order]) <= budget)[0]
    if not ok.size:                  # unreachable in exact arithmetic: all blocks give E = 0
        return n_max.copy()
    np.add.at(n, rows_idx[order[:int(ok[0]) + 1]], 1)
    return n


def oracle_block_map(q, k, v, *, is_causal, scale, l1, rank="mass", allocation="lagrange",
                     verify=True, cfg=CONFIG):
    """The sparsest block map whose per-head relative L1 error is at most ``l1`` (see the module
    docstring for the ranking and the allocation rules).

    Args:
      q, k, v: HND arrays ``[B, Hq, Lq, D]``, ``[B, Hkv, Lk, D]`` (any float dtype).
      l1: the bound on ``sum|O - O_dense| / sum|O_dense|`` per (b, head).
      verify: recompute the error of the chosen map with :func:`exact_attention` (independent of
        the prefix curves) and report that.
    Returns:
      ``(block_map, info)``: bool ``[B, Hq, nq, nk]`` (only causally valid blocks kept), and a dict:
      ``sparsity`` and ``l1`` float64 ``[Hq]`` (pooled over the batch), ``sparsity_bh`` and
      ``l1_bh`` ``[B, Hq]``, ``kept_blocks`` and ``valid_blocks`` int ``[B, Hq]``, ``l1_curves``
      (the predicted error of the map, from the curves), ``stage1_sparsity`` (overall) and the
      rule (``rank``, ``allocation``, ``bound``).
    """
    if rank not in RANKS:
        raise ValueError(f"rank: expected one of {RANKS}, got {rank!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: expected one of {ALLOCATIONS}, got {allocation!r}")
    if not l1 >= 0:
        raise ValueError(f"l1: expected a number >= 0, got {l1!r}")
    qg, kk, vv = _grouped(q, k, v)
    B, Hkv, g, Lq, D = qg.shape
    Hq, Lk = Hkv * g, kk.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = num_blocks(Lq, bq), num_blocks(Lk, bk)
    valid = valid_blocks(Lq, Lk, bq, bk, is_causal)
    n_max = valid.sum(axis=1)                      # valid blocks form a prefix of every row

    E = np.full((B, Hq, nq, nk + 1), np.inf)
    order = np.broadcast_to(np.arange(nk), (B, Hq, nq, nk)).copy()   # a permutation per row
    sorted_scores = np.zeros((B, Hq, nq, nk))
    den = np.zeros((B, Hq))
    for i in range(nq):
        nb = int(n_max[i])
        if nb == 0:
            E[:, :, i, 0] = 0.0
            continue
        N, l = _block_partials(qg, kk, vv, i, nb, Lq=Lq, is_causal=is_causal, scale=scale, cfg=cfg)
        L = l.sum(axis=2)                                                   # [B, Hq, rows]
        Ls = np.where(L > 0, L, 1.0)
        o_ref = np.where((L > 0)[..., None], N.sum(axis=2) / Ls[..., None], 0.0)
        den += np.abs(o_ref).sum(axis=(2, 3))
        if rank == "mass":
            score = (l / Ls[:, :, None]).sum(axis=-1) / l.shape[-1]        # mean over rows
        else:
            score = np.abs(N - l[..., None] * o_ref[:, :, None]).sum(axis=-1)
            score = (score / Ls[:, :, None]).sum(axis=-1)
        ordr = np.argsort(-score, axis=-1, kind="stable")
        order[:, :, i, :nb] = ordr
        sorted_scores[:, :, i, :nb] = np.take_along_axis(score, ordr, axis=-1)
        E[:, :, i, :nb + 1] = _prefix_errors(N, l, ordr, o_ref)

    block_map = np.zeros((B, Hq, nq, nk), dtype=bool)
    l1_curves = np.zeros((B, Hq))
    rows = np.arange(nq)
    for b in range(B):
        for h in range(Hq):
            budget = l1 * den[b, h]
            if allocation == "lagrange":
                n = _allocate_lagrange(E[b, h], n_max, budget)
            else:
                n = _allocate_mass(E[b, h], n_max, sorted_scores[b, h], budget)
            keep = np.arange(nk)[None, :] < n[:, None]
            np.put_along_axis(block_map[b, h], order[b, h], keep, axis=-1)
            l1_curves[b, h] = E[b, h, rows, n].sum() / den[b, h] if den[b, h] else 0.0
    block_map &= valid

    if verify:
        out = exact_attention(q, k, v, is_causal=is_causal, scale=scale, block_map=block_map, cfg=cfg)
        ref = exact_attention(q, k, v, is_causal=is_causal, scale=scale, cfg=cfg)
        num = np.abs(out - ref).sum(axis=(2, 3))
        den_v = np.abs(ref).sum(axis=(2, 3))
        l1_bh = np.where(den_v > 0, num / np.where(den_v > 0, den_v, 1.0), 0.0)
        l1_head = num.sum(0) / np.maximum(den_v.sum(0), np.finfo(float).tiny)
    else:
        l1_bh = l1_curves
        l1_head = (l1_curves * den).sum(0) / np.maximum(den.sum(0), np.finfo(float).tiny)
    kept = block_map.sum(axis=(2, 3))
    n_valid = int(valid.sum())
    return block_map, {
        "sparsity": 1.0 - kept.sum(0) / (B * n_valid),
        "l1": l1_head,
        "sparsity_bh": 1.0 - kept / n_valid,
        "l1_bh": l1_bh,
        "l1_curves": l1_curves,
        "kept_blocks": kept,
        "valid_blocks": np.full((B, Hq), n_valid),
        "stage1_sparsity": float(1.0 - kept.sum() / (B * Hq * n_valid)),
        "rank": rank, "allocation": allocation, "bound": float(l1),
    }
