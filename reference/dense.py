"""Dense attention in float64: the truth every other number is measured against.

``O = softmax(scale Q K^T + mask) V`` with token-exact causal masking (query t sees key u iff
``u <= t + (Lk - Lq)``, bottom-right aligned as FlashAttention >= 2.1), GQA (query head h reads
kv head ``h // (Hq / Hkv)``), HND or NHD layout, an optional block map expanded to tokens, and an
optional log-sum-exp. Rows that see no key output zeros and LSE ``-inf`` (SPEC.md section 2).
"""
from __future__ import annotations

import numpy as np

from ..config import CONFIG
from .layout import expand_block_map, from_hnd, num_blocks, to_hnd, token_mask

_CHUNK_ELEMS = 1 << 24  # scores held at once: 128 MiB of float64


def _kv_for_query_heads(x, Hq):
    """Repeat kv heads so that index h of the result is kv head h // (Hq / Hkv)."""
    return np.repeat(x, Hq // x.shape[1], axis=1)


def _row_chunks(B, Hq, Lq, Lk, align):
    rows = max(align, (_CHUNK_ELEMS // max(1, B * Hq * Lk)) // align * align)
    for r0 in range(0, Lq, rows):
        yield r0, min(Lq, r0 + rows)


def _chunk_probs(q, k, r0, r1, *, Lq, is_causal, scale, block_map, cfg):
    """Masked softmax probabilities ``[B, Hq, r1-r0, Lk]`` (float64) and the row LSE."""
    Lk = k.shape[2]
    s = np.einsum("bhqd,bhkd->bhqk", q[:, :, r0:r1], k) * scale
    mask = token_mask(np.arange(r0, r1), Lq, Lk, is_causal)[None, None]
    if block_map is not None:
        bm = np.asarray(block_map, dtype=bool)
        i0, i1 = r0 // cfg.block_q, num_blocks(r1, cfg.block_q)
        tok = expand_block_map(bm[:, :, i0:i1], (i1 - i0) * cfg.block_q, Lk, cfg.block_q, cfg.block_k)
        mask = mask & tok[:, :, r0 - i0 * cfg.block_q: r1 - i0 * cfg.block_q]
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(m)
    m = np.where(empty, 0.0, m)
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(empty, 0.0, p / np.where(empty, 1.0, l))
        lse = np.where(empty, -np.inf, m + np.log(np.where(empty, 1.0, l)))[..., 0]
    return p, lse


def dense_attention(q, k, v, *, is_causal=False, scale=None, layout="HND", block_map=None,
                    return_lse=False, cfg=CONFIG):
    """Exact attention in float64.

    Args:
      q: ``[B, Hq, Lq, D]`` (HND) or ``[B, Lq, Hq, D]`` (NHD).
      k, v: the same with Hkv heads and Lk tokens.
      block_map: optional bool ``[B, Hq, nq, nk]``; keys outside the kept blocks are masked.
    Returns:
      ``out`` float64 in the input layout, and ``lse`` float64 ``[B, Hq, Lq]`` if ``return_lse``.
    """
    q, k, v = (to_hnd(np.asarray(x), layout).astype(np.float64) for x in (q, k, v))
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    k, v = _kv_for_query_heads(k, Hq), _kv_for_query_heads(v, Hq)
    out = np.zeros((B, Hq, Lq, v.shape[-1]), dtype=np.float64)
    lse = np.full((B, Hq, Lq), -np.inf, dtype=np.float64)
    for r0, r1 in _row_chunks(B, Hq, Lq, Lk, cfg.block_q):
        p, lse[:, :, r0:r1] = _chunk_probs(q, k, r0, r1, Lq=Lq, is_causal=is_causal, scale=scale,
                                           block_map=block_map, cfg=cfg)
        out[:, :, r0:r1] = p @ v
    out = from_hnd(out, layout)
    return (out, lse) if return_lse else out


def block_attention_mass(q, k, *, is_causal=False, scale=None, layout="HND", cfg=CONFIG):
    """True attention mass per block, float64 ``[B, Hq, nq, nk]``.

    Entry (i, j) is the mean over the query rows of block i of the probability they put on the
    keys of block j; each row sums to 1 over j (0 for rows that see no key). This is what the
    predicted block map tries to cover.
    """
    q, k = (to_hnd(np.asarray(x), layout).astype(np.float64) for x in (q, k))
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    k = _kv_for_query_heads(k, Hq)
    nq, nk = num_blocks(Lq, cfg.block_q), num_blocks(Lk, cfg.block_k)
    mass = np.zeros((B, Hq, nq, nk), dtype=np.float64)
    key_starts = np.arange(0, Lk, cfg.block_k)
    for r0, r1 in _row_chunks(B, Hq, Lq, Lk, cfg.block_q):  # chunks start on query-block edges
        p, _ = _chunk_probs(q, k, r0, r1, Lq=Lq, is_causal=is_causal, scale=scale,
                            block_map=None, cfg=cfg)
        p = np.add.reduceat(p, key_starts, axis=3)
        p = np.add.reduceat(p, np.arange(0, r1 - r0, cfg.block_q), axis=2)
        i0 = r0 // cfg.block_q
        mass[:, :, i0:i0 + p.shape[2]] = p
    counts = np.minimum(cfg.block_q, Lq - np.arange(nq) * cfg.block_q)
    return mass / counts[None, None, :, None]
