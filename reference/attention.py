"""Stage 2 and the quantized block-sparse attention: the blocked mirror of ``cuda/sparse_attn.cu``.

The kernel's loop, in NumPy: for every (b, h, query block i), walk the kept key blocks j in
increasing order with running max ``m``, running sum ``l`` and accumulator ``acc`` in float32, in the
log2 domain (SPEC.md section 2). Here the loop runs over j on the outside and over all active
(b, h, i) at once on the inside; each (b, h, i) still sees its blocks in increasing j, which is all
the online softmax depends on.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import CONFIG
from .layout import num_blocks, valid_blocks
from .quant import (F32, QuantStats, channel_scales, check_fp16_operands, expand_kv_heads,
                    quantize_int8_per_block, quantize_v_fp8, round_e4m3, round_fp16, smooth_k)
from .stats import filter_skips, sparsity_stats

QK_MODES = ("int8", "fp16", "fp32")  # "fp32" (no rounding) exists only in the reference
PV_MODES = ("fp8", "fp16", "fp32")


def _pad_tokens(x, block):
    L = x.shape[2]
    pad = num_blocks(L, block) * block - L
    if not pad:
        return x
    return np.concatenate([x, np.zeros(x.shape[:2] + (pad, x.shape[3]), dtype=x.dtype)], axis=2)


def quantized_operands(q, k, *, scale, qk, rebalance, cfg=CONFIG, quant_stats=None):
    """What the kernel multiplies in QK^T: Q and K as float32 holding the exact operand values, and
    per-block factors that turn the product into log2-domain logits ``s``.

    Returns ``(q_op [B,Hq,Lq,D], dq [B,Hq,nq], k_op [B,Hkv,Lk,D], dk [B,Hkv,nk], km)``; the logit of
    (t, u) is ``(q_op[t] . k_op[u]) * dq[i] * dk[j] * scale * log2(e)``. For ``qk="int8"`` the operands
    are the INT8 values; their products summed in float32 are exact integers (|sum| <= 127^2 D <
    2^24 for D <= 1040), so this is the kernel's int32 accumulation. ``quant_stats``: a
    :class:`~reference.quant.QuantStats` whose fields replace the K mean and channel maxima of
    ``q`` and ``k`` (None: Q's and K's own).
    """
    st = quant_stats or QuantStats()
    q = np.asarray(q, dtype=F32)
    km, ks = smooth_k(k, st.km)
    if rebalance:
        s_c = channel_scales(q, ks, q_amax=st.q_amax, k_amax=st.k_amax)
        q = q * expand_kv_heads(s_c, q.shape[1])
        ks = ks / s_c
    if qk == "int8":
        q_op, dq = quantize_int8_per_block(q, cfg.block_q, cfg)
        k_op, dk = quantize_int8_per_block(ks, cfg.block_k, cfg)
        q_op, k_op = q_op.astype(F32), k_op.astype(F32)
    else:
        rnd = round_fp16 if qk == "fp16" else (lambda x: x)
        if qk == "fp16":
            check_fp16_operands(*(float(np.abs(x).max()) if x.size else 0.0 for x in (q, ks)))
        q_op, k_op = rnd(q), rnd(ks)
        dq = np.ones(q.shape[:2] + (num_blocks(q.shape[2], cfg.block_q),), dtype=F32)
        dk = np.ones(ks.shape[:2] + (num_blocks(ks.shape[2], cfg.block_k),), dtype=F32)
    return q_op, dq, k_op, dk, km


def block_sparse_attention(q, k, v, block_map, *, is_causal, scale, pvthreshd, qk="int8",
                           rebalance=True, pv="fp8", pv_group_rows=None, return_lse=False,
                           return_stats=False, quant_stats=None, cfg=CONFIG):
    """Quantized block-sparse attention with the Stage 2 filter, float32 HND output.

    Args:
      q, k, v: HND arrays (any float dtype; computed in float32).
      block_map: bool ``[B, Hq, nq, nk]``; blocks outside it, and causally invalid ones, are never
        visited.
      pvthreshd: float32 ``[Hq]``, lambda in log2 units; ``inf`` turns the filter off.
      qk: "int8" | "fp16" | "fp32"; pv: "fp8" | "fp16" | "fp32" ("fp32": no rounding, reference only).
      pv_group_rows: rows per Stage 2 group (run with the kernel's value, CONFIG.pv_group_rows).
      quant_stats: a :class:`~reference.quant.QuantStats` of the whole sequence when q, k, v are
        part of it (ring attention): the K mean and channel maxima to quantize with (None: their
        own, the single-process computation).
    Returns:
      ``out`` float32 HND, then ``lse`` float32 ``[B, Hq, Lq]`` (natural log) and the stats dict of
      :func:`reference.stats.sparsity_stats`, as requested.
    """
    if qk not in QK_MODES:
        raise ValueError(f"qk: expected one of {QK_MODES}, got {qk!r}")
    if pv not in PV_MODES:
        raise ValueError(f"pv: expected one of {PV_MODES}, got {pv!r}")
    G = cfg.pv_group_rows if pv_group_rows is None else int(pv_group_rows)
    bq, bk = cfg.block_q, cfg.block_k
    if bq % G:
        raise ValueError(f"pv_group_rows: expected a divisor of block_q={bq}, got {G}")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    nq, nk = num_blocks(Lq, bq), num_blocks(Lk, bk)
    n_groups = bq // G
    log2e = F32(cfg.log2e)
    lam = np.broadcast_to(np.asarray(pvthreshd, dtype=F32), (Hq,))

    quant_stats = quant_stats or QuantStats()
    q_op, dq, k_op, dk, km = quantized_operands(q, k, scale=scale, qk=qk, rebalance=rebalance,
                                                cfg=cfg, quant_stats=quant_stats)
    if pv == "fp8":
        v_op, dv = quantize_v_fp8(v, cfg, amax=quant_stats.v_amax)
    else:
        v_op = round_fp16(v) if pv == "fp16" else np.asarray(v, dtype=F32)
        dv = None
    q_blk = _pad_tokens(q_op, bq).reshape(B, Hq, nq, bq, D)
    k_blk = _pad_tokens(k_op, bk).reshape(B, Hkv, nk, bk, D)
    v_blk = _pad_tokens(v_op, bk).reshape(B, Hkv, nk, bk, v_op.shape[3])

    valid = valid_blocks(Lq, Lk, bq, bk, is_causal)
    visit = np.asarray(block_map, dtype=bool) & valid
    rows = np.arange(nq)[:, None] * bq + np.arange(bq)[None, :]       # token index [nq, bq]
    row_real = rows < Lq

    m = np.full((B, Hq, nq, bq), -np.inf, dtype=F32)
    l = np.zeros((B, Hq, nq, bq), dtype=F32)
    acc = np.zeros((B, Hq, nq, bq, v_op.shape[3]), dtype=F32)
    visited_groups = np.zeros((B, Hq, nq), dtype=np.int64)
    skipped_groups = np.zeros((B, Hq, nq), dtype=np.int64)
    group_real = row_real.reshape(nq, n_groups, G).any(axis=-1)       # [nq, n_groups]

    for j in range(nk):
        b, h, i = np.nonzero(visit[..., j])
        if b.size == 0:
            continue
        hk = h // (Hq // Hkv)
        # QK^T for the active (b, h, i): exact for int8 operands (see quantized_operands).
        s = np.matmul(q_blk[b, h, i], k_blk[b, hk, j].swapaxes(-1, -2))
        s = s * ((dq[b, h, i] * dk[b, hk, j]) * F32(scale) * log2e)[:, None, None]
        keys = j * bk + np.arange(bk)
        mask = (keys[None, None, :] < Lk) & row_real[i][:, :, None]
        if is_causal:
            mask &= keys[None, None, :] <= rows[i][:, :, None] + (Lk - Lq)
        s = np.where(mask, s, -np.inf).astype(F32)

        row_max = s.max(axis=-1)                                        # [n, bq]
        m_prev = m[b, h, i]
        # Stage 2: delta_g = max over the group's real rows of (rowmax - m_prev). A row that has
        # seen no key yet (m_prev = -inf) is never skipped; a row with no key in this block adds
        # nothing, so it does not hold its group back.
        with np.errstate(invalid="ignore"):
            delta = np.where(np.isneginf(m_prev), np.inf, row_max - m_prev)
        delta = np.where(row_real[i], delta, -np.inf)
        delta_g = delta.reshape(-1, n_groups, G).max(axis=-1)           # [n, n_groups]
        real_g = group_real[i]
        skip_g = (delta_g <= -lam[h][:, None]) & np.isfinite(lam[h])[:, None] & real_g
        visited_groups[b, h, i] += real_g.sum(axis=-1)
        skipped_groups[b, h, i] += skip_g.sum(axis=-1)
        run = ~np.repeat(skip_g, G, axis=-1)                            # [n, bq]

        m_new = np.maximum(m_prev, row_max)
        m_use = np.where(np.isneginf(m_new), F32(0), m_new)             # guard: -inf - -inf
        alpha = np.exp2(m_prev - m_use).astype(F32)
        p = np.exp2(s - m_use[..., None]).astype(F32)
        if pv == "fp8":
            p_op = round_e4m3(p * F32(cfg.fp8_max))   # P scaled into e4m3's range; l stays unrounded
        elif pv == "fp16":
            p_op = round_fp16(p)
        else:
            p_op = p
        pv_blk = np.matmul(p_op, v_blk[b, hk, j])
        l_new = l[b, h, i] * alpha + p.sum(axis=-1, dtype=F32)
        acc_new = acc[b, h, i] * alpha[..., None] + pv_blk
        m[b, h, i] = np.where(run, m_new, m_prev)
        l[b, h, i] = np.where(run, l_new, l[b, h, i])
        acc[b, h, i] = np.where(run[..., None], acc_new, acc[b, h, i])

    empty = l == 0                      # no kept block, or every key masked: zeros, LSE -inf
    l_safe = np.where(empty, F32(1), l)
    out = np.where(empty[..., None], F32(0), acc / l_safe[..., None])
    out = out.reshape(B, Hq, nq * bq, -1)[:, :, :Lq]
    if dv is not None:                  # O_d = acc_d dv_d / (448 l)
        out = out * (expand_kv_heads(dv, Hq) / F32(cfg.fp8_max))
    out = out.astype(F32)

    results = [out]
    if return_lse:
        q32 = np.asarray(q, dtype=F32)
        q_km = np.einsum("bhtd,bhd->bht", q32, expand_kv_heads(km, Hq)[:, :, 0]).astype(F32)
        with np.errstate(divide="ignore"):
            lse = (m + np.log2(l_safe)) * F32(math.log(2.0))
        lse = np.where(empty, -np.inf, lse).reshape(B, Hq, -1)[:, :, :Lq] + F32(scale) * q_km
        results.append(lse.astype(F32))
    if return_stats:
        skipped_groups = filter_skips(skipped_groups, visit, Lq, Lk, is_causal, lam, G, cfg)
        results.append(sparsity_stats(visit, valid, visited_groups, skipped_groups, Lq, G, cfg))
    return results[0] if len(results) == 1 else tuple(results)
