"""Layouts and masks shared by the dense reference and the blocked mirror.

Everything inside reference/ works on HND arrays ``[B, H, L, D]``; NHD ``[B, L, H, D]`` inputs are
viewed as HND on the way in and outputs viewed back on the way out.
"""
from __future__ import annotations

import numpy as np

LAYOUTS = ("HND", "NHD")


def to_hnd(x, layout):
    """View ``x`` (HND or NHD) as HND. No copy."""
    if layout == "HND":
        return x
    if layout == "NHD":
        return x.transpose(0, 2, 1, 3)
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def from_hnd(x, layout):
    """Inverse of :func:`to_hnd` (the transpose is its own inverse)."""
    return to_hnd(x, layout)


def num_blocks(length, block):
    return -(-int(length) // int(block))


def token_mask(rows, Lq, Lk, is_causal):
    """Bool ``[len(rows), Lk]``: query t may see key u (token-exact, bottom-right aligned causal)."""
    rows = np.asarray(rows)
    cols = np.arange(Lk)
    if not is_causal:
        return np.ones((rows.size, Lk), dtype=bool)
    return cols[None, :] <= rows[:, None] + (Lk - Lq)


def valid_blocks(Lq, Lk, block_q, block_k, is_causal):
    """Bool ``[nq, nk]``: the block holds at least one unmasked (query, key) pair.

    Causal: the last query row of block i is ``min((i+1) BQ, Lq) - 1`` and the first key of block j
    is ``j BK``; the pair is visible iff ``j BK <= last_row + (Lk - Lq)``.
    """
    nq, nk = num_blocks(Lq, block_q), num_blocks(Lk, block_k)
    if not is_causal:
        return np.ones((nq, nk), dtype=bool)
    last_row = np.minimum((np.arange(nq) + 1) * block_q, Lq) - 1
    first_key = np.arange(nk) * block_k
    return first_key[None, :] <= last_row[:, None] + (Lk - Lq)


def local_blocks(Lq, Lk, block_q, block_k):
    """Bool ``[nq, nk]``: the key blocks of each query block's own positions, its "diagonal".

    Query t is aligned with key ``t + (Lk - Lq)`` (bottom-right, as the causal mask); block (i, j)
    is local iff key block j holds one of the keys aligned with the rows of query block i. With
    Lq = Lk and the 128 x 64 geometry these are key blocks 2i and 2i + 1: the most recent tokens
    of every causal row. Rows aligned before key 0 or past the last key have none.
    """
    nq, nk = num_blocks(Lq, block_q), num_blocks(Lk, block_k)
    off = Lk - Lq
    first = np.arange(nq) * block_q + off                      # aligned key of each block's first row
    last = np.minimum((np.arange(nq) + 1) * block_q, Lq) - 1 + off
    lo, hi = np.maximum(first, 0) // block_k, np.minimum(last, Lk - 1) // block_k
    j = np.arange(nk)[None, :]
    return (j >= lo[:, None]) & (j <= hi[:, None]) & (last >= 0)[:, None] & (first <= Lk - 1)[:, None]


def expand_block_map(block_map, Lq, Lk, block_q, block_k):
    """Token-level bool mask ``[..., Lq, Lk]`` from a block map ``[..., nq, nk]`` (np.kron)."""
    m = np.asarray(block_map, dtype=bool)
    m = np.repeat(np.repeat(m, block_q, axis=-2), block_k, axis=-1)
    return m[..., :Lq, :Lk]
