"""Stage 1: block pooling, self-similarity, the compressed map and block selection (SPEC.md section 1).

Mirror of ``cuda/block_stats.cu`` (pooling, similarity) and ``cuda/select.cu`` (compressed map,
TopCdf/TopK/mass threshold, fix blocks, causal, sink). Inputs are HND; thresholds are per query head arrays.
"""
from __future__ import annotations

import numpy as np

from ..config import CONFIG
from .layout import local_blocks, num_blocks, valid_blocks
from .quant import F32, _blocked, expand_kv_heads, smooth_k

# The estimates Stage 1 can select from (select.cu has a kernel for each): the paper's compressed
# map, "qbar_keys" (qbar_keys_logits: the pooled query of each query block against every
# smoothed key; bench/results/predictor_study.md) and "qgroup_keys" (qgroup_keys_logits: the
# query pooled over groups of CONFIG.query_group rows, each group's softmax over every key,
# averaged over the block's groups; bench/results/gemma3_query_groups_16k.md).
PREDICTORS = ("paper", "qbar_keys", "qgroup_keys")


def _valid_rows(L, block):
    """Bool ``[nb, block]``: which rows of each block are real tokens."""
    return (np.arange(num_blocks(L, block) * block) < L).reshape(-1, block)


def pool_blocks(x, block):
    """Mean of the valid rows of each block, float32 ``[B, H, nb, D]`` (a partial last block
    averages its real rows only)."""
    L = x.shape[2]
    xb = _blocked(np.asarray(x, dtype=np.float64), block)
    counts = _valid_rows(L, block).sum(axis=1)
    return (xb.sum(axis=3) / counts[None, None, :, None]).astype(F32)


def block_self_similarity(x, block, cfg=CONFIG):
    """``sim = || mean_r x_r / max(||x_r||, eps) ||^2`` over the valid rows of each block.

    The mean of the block's cosine-similarity matrix, in [0, 1]; float32 ``[B, H, nb]``.
    """
    L = x.shape[2]
    xb = _blocked(np.asarray(x, dtype=np.float64), block)
    norms = np.sqrt((xb * xb).sum(axis=-1, keepdims=True))
    unit = xb / np.maximum(norms, cfg.sim_eps)
    counts = _valid_rows(L, block).sum(axis=1)
    mean = unit.sum(axis=3) / counts[None, None, :, None]
    return (mean * mean).sum(axis=-1).astype(F32)


def select_topcdf(p_hat, finite, tau):
    """TopCdf per row: sort P^ descending (ties: lower j first), keep the longest prefix whose
    cumulative sum is <= tau times the last element of that same cumulative sum, at least one.

    ``p_hat`` float32 ``[..., nq, nk]``, ``finite`` bool (columns that may be selected), ``tau``
    float32 broadcastable to ``[..., nq, 1]``. Only finite columns are selected; a row without
    any selects nothing.
    """
    order = np.argsort(-p_hat, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(p_hat, order, axis=-1)
    csum = np.cumsum(sorted_p, axis=-1, dtype=F32)
    bound = (tau * csum[..., -1:]).astype(F32)
    n_keep = np.maximum((csum <= bound).sum(axis=-1), 1)
    n_keep = np.minimum(n_keep, finite.sum(axis=-1))
    keep_sorted = np.arange(p_hat.shape[-1]) < n_keep[..., None]
    keep = np.zeros_like(finite)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def select_topk(p_hat, finite, n_valid, topk):
    """TopK per row: ``max(1, floor(topk * n_valid))`` blocks of largest P^ (ties: lower j first),
    computed in float32 as the kernel does; never more than the finite columns.

    ``n_valid`` int ``[..., nq]`` (valid blocks per row), ``topk`` float32 broadcastable to it."""
    order = np.argsort(-p_hat, axis=-1, kind="stable")
    n_keep = np.floor((topk * n_valid.astype(F32)).astype(F32)).astype(np.int64)
    n_keep = np.where(n_valid > 0, np.maximum(n_keep, 1), 0)
    n_keep = np.minimum(n_keep, finite.sum(axis=-1))
    keep_sorted = np.arange(p_hat.shape[-1]) < n_keep[..., None]
    keep = np.zeros_like(finite)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def select_mass_threshold(p_hat, finite, threshold):
    """The mass threshold rule (README "Predictors beyond the paper"): keep the finite columns
    whose P^ relative to uniform attention over all key blocks reaches the head's threshold,
    ``fl32(nk * P^_ij) >= threshold`` with ``nk = p_hat.shape[-1]`` (the whole key sequence's
    blocks, also in causal rows), and in a row where none does, its largest P^ (lowest j on ties).
    One threshold per head is compared across all rows (no per-row sort): rows with a peaked
    estimate keep few blocks, rows with a flat one many.

    ``p_hat`` float32 ``[..., nq, nk]``, ``finite`` bool, ``threshold`` float32 broadcastable to
    ``[..., nq, 1]``, >= 0 (0 keeps every finite column, inf one per row). The product is one
    float32 multiplication (correctly rounded, as ``__fmul_rn`` in select.cu); a row without any
    finite column selects nothing.
    """
    nk = p_hat.shape[-1]
    scaled = (F32(nk) * p_hat).astype(F32)
    keep = finite & (scaled >= threshold)
    best = np.argmax(np.where(finite, p_hat, F32(-1)), axis=-1)[..., None]   # first max: lowest j
    need = (finite.any(axis=-1) & ~keep.any(axis=-1))[..., None]
    top = np.zeros_like(keep)
    np.put_along_axis(top, best, True, axis=-1)
    return keep | (top & need)


def query_keys_lse(qrows, ks, *, Lq, rows, is_causal, scale, cfg=CONFIG):
    """Pooled query rows against every key, LSE per key block, float64 ``[B, Hq, nr, nk]``::

        A_rj = LSE_{u in key block j} (scale * qrows_r . ks_u + log n_ru)

    ``qrows`` float32 ``[B, Hq, nr, D]``: the mean of each group of ``rows`` query rows (``rows``
    divides BQ); ``ks`` float32 ``[B, Hkv, Lk, D]`` (smoothed K, every key); ``n_ru`` the share of
    the group's valid rows that see key u (1, or causal a fraction near the diagonal), ``-inf``
    where no row of the group sees a key of the block. ``exp(A_rj)`` estimates the group's mean
    over its rows of ``sum_{u in j} exp(scale q . k_u)``. Both operands are rounded to TF32 first
    (:func:`round_tf32`), as ``select.cu`` qbar_keys_mma feeds its tensor cores; the dot products
    are then float64. Computed a few groups at a time (memory ``chunk x Lk`` per head).
    """
    from .predictors import _lse_blocks, visible_keys
    qrows = round_tf32(qrows).astype(np.float64)
    ks = expand_kv_heads(round_tf32(ks).astype(np.float64), qrows.shape[1])
    B, Hq, nr, _ = qrows.shape
    Lk = ks.shape[2]
    nk = num_blocks(Lk, cfg.block_k)
    out = np.empty((B, Hq, nr, nk))
    step = max(1, (1 << 22) // max(1, B * Hq * Lk))
    for i0 in range(0, nr, step):
        i1 = min(nr, i0 + step)
        a = scale * np.matmul(qrows[:, :, i0:i1], ks.swapaxes(-1, -2))          # [B, Hq, c, Lk]
        n = visible_keys(Lq, Lk, rows, 1, is_causal, cfg, groups=slice(i0, i1))
        with np.errstate(divide="ignore"):
            a = np.where(n > 0, a + np.log(np.maximum(n, 1e-300)), -np.inf)
        out[:, :, i0:i1] = _lse_blocks(a, cfg.block_k, nk)
    return out


def round_tf32(x):
    """float32 ``x`` rounded to TF32 (10 mantissa bits, 8 exponent bits) to nearest, ties away
    from zero: PTX ``cvt.rna.tf32.f32``, the tensor cores' operand format. float32 result."""
    bits = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = np.where(finite, (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000), bits)
    return rounded.astype(np.uint32).view(F32)


def qbar_keys_logits(qbar, ks, *, Lq, is_causal, scale, cfg=CONFIG):
    """The qbar-keys estimate as logits over key blocks (``select.cu`` qbar_keys_mma), float64
    ``[B, Hq, nq, nk]``: :func:`query_keys_lse` of the pooled query blocks,

        S^_ij = LSE_{u in key block j} (scale * qbar_i . ks_u + log n_iu)

    ``qbar`` float32 ``[B, Hq, nq, D]`` (pooled Q), ``ks`` float32 ``[B, Hkv, Lk, D]`` (smoothed
    K). ``softmax_j S^_ij`` is the softmax of the block's pooled query over every key it sees,
    summed per key block: :func:`predictors.estimate_block_mass` with its defaults (there with the
    unrounded float64 mean of the query rows; here the pooled rows the kernels share).
    """
    return query_keys_lse(qbar, ks, Lq=Lq, rows=cfg.block_q, is_causal=is_causal, scale=scale, cfg=cfg)


def check_query_group(cfg=CONFIG):
    """``cfg.query_group``, validated: a positive divisor of BQ."""
    g = int(cfg.query_group)
    if g < 1 or cfg.block_q % g:
        raise ValueError(f"query_group: expected a positive divisor of block_q = {cfg.block_q}, got {g}")
    return g


def mean_group_logits(lse, Lq, cfg=CONFIG):
    """Logits whose softmax is the mean over each query block's groups of the groups' softmaxes
    (``select.cu`` group_mass_map), float64 ``[B, Hq, nq, nk]``::

        S^_ij = log( sum_{g in i} w_g softmax_j(lse_g)_j / sum_{g in i} w_g )

    ``lse`` ``[B, Hq, ng, nk]`` (:func:`query_keys_lse` of groups of ``cfg.query_group`` rows;
    ``-inf`` where the group sees no key of the block), ``w_g`` the group's valid rows. The true
    block mass is a mean over rows of per-row probabilities, and so is this; in the log domain
    throughout (no underflow). ``-inf`` where no group of the block sees a key of block j."""
    G = check_query_group(cfg)
    lse = np.asarray(lse, dtype=np.float64)
    B, Hq, ng, nk = lse.shape
    per = cfg.block_q // G
    nq = num_blocks(Lq, cfg.block_q)
    w = np.minimum(G, Lq - np.arange(ng) * G).astype(np.float64)              # valid rows
    m = lse.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.log(np.exp(lse - m).sum(axis=-1, keepdims=True)) + m        # LSE_j' per group
        t = lse - np.where(np.isfinite(norm), norm, 0.0) + np.log(w)[:, None]  # log(w_g p_gj)
    pad = nq * per - ng
    if pad:
        t = np.concatenate([t, np.full((B, Hq, pad, nk), -np.inf)], axis=2)
    t = t.reshape(B, Hq, nq, per, nk)
    tm = t.max(axis=3)
    tm_f = np.where(np.isfinite(tm), tm, 0.0)
    wsum = np.add.reduceat(w, np.arange(0, ng, per))
    with np.errstate(divide="ignore"):
        out = np.log(np.exp(t - tm_f[:, :, :, None, :]).sum(axis=3)) + tm_f - np.log(wsum)[:, None]
    return np.where(np.isfinite(tm), out, -np.inf)


def qgroup_keys_logits(q, ks, *, is_causal, scale, cfg=CONFIG):
    """The query-group estimate as logits over key blocks, float64 ``[B, Hq, nq, nk]``: the query
    pooled over groups of ``cfg.query_group`` rows (:func:`pool_blocks`, float32 as the kernels
    pool), each group against every smoothed key (:func:`query_keys_lse`), the groups' softmaxes
    averaged per query block (:func:`mean_group_logits`). With groups of BQ rows its softmax is
    that of :func:`qbar_keys_logits`. ``predictors.estimate_block_mass(q_group=G, k_sub=1)``
    estimates the same mass from the unrounded float64 means."""
    G = check_query_group(cfg)
    q = np.asarray(q, dtype=F32)
    Lq = q.shape[2]
    lse = query_keys_lse(pool_blocks(q, G), ks, Lq=Lq, rows=G, is_causal=is_causal, scale=scale, cfg=cfg)
    return mean_group_logits(lse, Lq, cfg)


def predict_block_map(q, k, *, is_causal, scale, simthreshd1, cdfthreshd=None, topk=None,
                      mass_threshold=None, attention_sink=True, local_window=False,
                      return_details=False, predictor="paper", cfg=CONFIG):
    """The Stage 1 block map, bool ``[B, Hq, nq, nk]``.

    ``q``, ``k``: HND arrays. ``simthreshd1``, ``cdfthreshd``, ``topk``, ``mass_threshold``:
    float32 ``[Hq]`` (exactly one of the last three given). ``predictor``: "paper" (the compressed
    map), "qbar_keys" (:func:`qbar_keys_logits`) or "qgroup_keys" (:func:`qgroup_keys_logits`);
    the last two rounded once to float32 in place of the compressed map's logits (the softmax,
    the rules, fix blocks, causal validity and sink are the same). ``local_window``: also keep each query block's own key blocks (:func:`local_blocks`).
    With ``return_details`` also a dict of the intermediate arrays (similarities,
    self-similar flags, P^, selection) for tests and figures.
    """
    q = np.asarray(q, dtype=F32)
    Lq, Lk = q.shape[2], k.shape[2]
    _, ks = smooth_k(k)
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor: expected one of {PREDICTORS}, got {predictor!r}")
    qbar = pool_blocks(q, cfg.block_q)
    logits = None
    if predictor == "qbar_keys":
        logits = qbar_keys_logits(qbar, ks, Lq=Lq, is_causal=is_causal, scale=scale, cfg=cfg)
    elif predictor == "qgroup_keys":
        logits = qgroup_keys_logits(q, ks, is_causal=is_causal, scale=scale, cfg=cfg)
    return select_blocks(qbar, block_self_similarity(q, cfg.block_q, cfg),
                         pool_blocks(ks, cfg.block_k), block_self_similarity(ks, cfg.block_k, cfg),
                         valid_blocks(Lq, Lk, cfg.block_q, cfg.block_k, is_causal), scale=scale,
                         simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
                         mass_threshold=mass_threshold, attention_sink=attention_sink,
                         local=local_blocks(Lq, Lk, cfg.block_q, cfg.block_k) if local_window else None,
                         return_details=return_details, logits=logits)


def select_blocks(qbar, q_sim, kbar, k_sim, valid, *, scale, simthreshd1, cdfthreshd=None,
                  topk=None, mass_threshold=None, attention_sink=True, local=None,
                  return_details=False, logits=None):
    """Selection from the pooled statistics (``cuda/select.cu``): compressed map, TopCdf, TopK or
    the mass threshold, fix blocks, causal validity and sink.

    ``qbar`` float32 ``[B, Hq, nq, D]`` and ``q_sim`` ``[B, Hq, nq]``; ``kbar`` ``[B, Hkv, nk, D]``
    and ``k_sim`` ``[B, Hkv, nk]`` (pooled smoothed K, per kv head); ``valid`` bool ``[nq, nk]``,
    the causal validity of these query blocks (a subset of rows is fine: sequence parallelism);
    ``local``: bool ``[nq, nk]`` blocks kept whatever the rule says (the local window), or None.
    ``logits``: ``[B, Hq, nq, nk]`` (any float dtype, rounded to float32), logits to select from
    in place of the compressed map's ``scale * qbar_i . kbar_j`` (the qbar-keys estimate, or a
    kernel's own S^ in the GPU tests); the softmax and everything after are the same.
    """
    B, Hq = qbar.shape[:2]
    head = (slice(None), None, None)                     # per-head value -> [Hq, 1, 1]
    theta = np.asarray(simthreshd1, dtype=F32)[head]
    k_sim = expand_kv_heads(k_sim[:, :, None], Hq)[:, :, 0]
    q_ok = q_sim[..., :, None] > theta                                 # [B, Hq, nq, 1]
    k_ok = k_sim[..., None, :] > theta                                 # [B, Hq, 1, nk]
    kbar = expand_kv_heads(kbar, Hq)
    finite = valid & k_ok
    if logits is None:
        # The compressed map's dot products, exponentials and softmax sum are taken in float64
        # and rounded once to float32 (select.cu does the same), so that P^ is defined to the
        # last bit up to float64 summation order, and the selection below mirrors the kernel.
        dots = np.matmul(qbar.astype(np.float64), kbar.astype(np.float64).swapaxes(-1, -2)).astype(F32)
        logits = F32(scale) * dots
    with np.errstate(invalid="ignore"):
        s_hat = np.where(finite, np.asarray(logits).astype(F32), -np.inf).astype(F32)
    row_max = s_hat.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, F32(0))
    e = np.exp((s_hat - row_max).astype(np.float64)).astype(F32)
    total = e.astype(np.float64).sum(axis=-1, keepdims=True).astype(F32)
    p_hat = np.where(total > 0, e / np.where(total > 0, total, F32(1)), F32(0)).astype(F32)

    if sum(x is not None for x in (cdfthreshd, topk, mass_threshold)) != 1:
        raise ValueError("cdfthreshd, topk, mass_threshold: exactly one of them must be given")
    if cdfthreshd is not None:
        selected = select_topcdf(p_hat, finite, np.asarray(cdfthreshd, dtype=F32)[head])
    elif mass_threshold is not None:
        selected = select_mass_threshold(p_hat, finite, np.asarray(mass_threshold, dtype=F32)[head])
    else:
        n_valid = np.broadcast_to(valid.sum(axis=-1), (B, Hq, valid.shape[0]))
        selected = select_topk(p_hat, finite, n_valid, np.asarray(topk, dtype=F32)[:, None])

    block_map = (selected | ~q_ok | ~k_ok) & valid
    if attention_sink:
        block_map[..., 0] |= valid[:, 0]
    if local is not None:
        block_map |= local & valid
    if not return_details:
        return block_map
    return block_map, {
        "q_sim": q_sim, "k_sim": k_sim, "q_fix": ~q_ok[..., 0], "k_fix": ~k_ok[..., 0, :],
        "p_hat": p_hat, "selected": selected & valid, "valid": valid,
    }
