"""Sparsity and error, counted as SPEC.md section 4 says.

Shared by the reference and the GPU launcher: both count per (b, h, query block) how many
(group, block) P V products the Stage 2 filter saw and skipped, and this module turns the counts
into the published numbers.
"""
from __future__ import annotations

import numpy as np

from ..config import CONFIG


def mask_skips(visit, Lq, Lk, is_causal, pv_group_rows, cfg=CONFIG):
    """Per (b, h, query block) ``[B, Hq, nq]``: the visited (group, block) P V products that the
    Stage 2 filter, whenever it is on (lambda finite), skips because the causal mask hides every
    key of the block from the group. Such a group's scores there are all -inf, so its delta is
    -inf once each of its real rows has seen a key (its running max finite) and it skips for any
    lambda: the mask's saving, not the filter's. The kernels and the reference skip these and
    count them; the published Stage 2 numbers leave them out (minus this count where the
    filter is on), so that a lambda too large to fire reports no Stage 2 sparsity.

    From the geometry and the map alone: row t's last visible key is ``t + Lk - Lq`` (causal);
    a group (rows of one query block) sees nothing of key block j iff ``j BK`` is past its
    last real row's last key; each of its real rows has seen a key before such a j iff the first
    visited block of the row's query block starts at or before its first real row's last key
    (such a j is then later than that first block). Non-causal: 0 (every key block holds a key
    of every row; the tail block starts below Lk)."""
    visit = np.asarray(visit, dtype=bool)
    B, Hq, nq, nk = visit.shape
    out = np.zeros((B, Hq, nq), dtype=np.int64)
    if not is_causal or nq == 0 or nk == 0:
        return out
    bq, bk, G = cfg.block_q, cfg.block_k, pv_group_rows
    first_row = np.arange(nq)[:, None] * bq + np.arange(bq // G)[None, :] * G       # [nq, ng]
    last_row = np.minimum(first_row + G, Lq) - 1
    real = first_row < Lq
    first_lim = first_row + (Lk - Lq)                   # the group's smallest last visible key
    last_lim = last_row + (Lk - Lq)                     # its largest
    starts = np.arange(nk) * bk
    any_visit = visit.any(axis=-1)
    j0 = np.where(any_visit, visit.argmax(axis=-1), nk)                               # [B, Hq, nq]
    seen = (j0[..., None] * bk <= first_lim[None, None]) & any_visit[..., None] & real[None, None]
    hidden = starts[None, None, :] > last_lim[:, :, None]                             # [nq, ng, nk]
    n_hidden = np.einsum("bhij,igj->bhig", visit.astype(np.int64), hidden.astype(np.int64))
    return (n_hidden * seen).sum(axis=-1)


def filter_skips(skipped_groups, visit, Lq, Lk, is_causal, pvthreshd, pv_group_rows, cfg=CONFIG):
    """The Stage 2 filter's own skips ``[B, Hq, nq]``: the kernel's (or the reference's) count
    ``skipped_groups`` minus :func:`mask_skips` on the heads whose ``pvthreshd`` (``[Hq]``) is
    finite (the filter on)."""
    on = np.isfinite(np.asarray(pvthreshd, dtype=np.float32))[None, :, None]
    return skipped_groups - mask_skips(visit, Lq, Lk, is_causal, pv_group_rows, cfg) * on


def sparsity_stats(visit, valid, visited_groups, skipped_groups, Lq, pv_group_rows, cfg=CONFIG):
    """Stage 1, Stage 2 and total sparsity.

    Args:
      visit: bool ``[B, Hq, nq, nk]``, the blocks computed (block map AND causal validity).
      valid: bool ``[nq, nk]``, blocks holding at least one unmasked (query, key) pair.
      visited_groups, skipped_groups: int ``[B, Hq, nq]``, Stage 2 (group, block) counts (skips
        that the causal mask makes already taken out: :func:`filter_skips`).
    Returns a dict: per (b, h) counts ``valid_blocks``, ``kept_blocks``, ``pv_groups``,
    ``pv_skipped``, ``pv_blocks_computed`` (P V block products done, fractional when groups were
    skipped), and the overall floats ``stage1_sparsity`` (1 - kept / valid), ``stage2_sparsity``
    (skipped / visited groups) and ``total_sparsity`` (1 - computed QK^T and P V block products /
    twice the valid blocks).
    """
    visit = np.asarray(visit, dtype=bool)
    B, Hq, nq, _ = visit.shape
    valid_n = np.broadcast_to(valid.sum(), (B, Hq)).astype(np.int64)
    kept_n = visit.sum(axis=(2, 3)).astype(np.int64)
    # groups of rows holding at least one real query, per query block
    real_rows = np.minimum(cfg.block_q, Lq - np.arange(nq) * cfg.block_q)
    groups_per_block = -(-real_rows // pv_group_rows)
    visited_groups = np.asarray(visited_groups, dtype=np.int64)
    skipped_groups = np.asarray(skipped_groups, dtype=np.int64)
    pv_done = ((visited_groups - skipped_groups) / groups_per_block).sum(axis=-1)
    return _with_totals({"valid_blocks": valid_n, "kept_blocks": kept_n,
                         "pv_groups": visited_groups.sum(axis=-1),
                         "pv_skipped": skipped_groups.sum(axis=-1), "pv_blocks_computed": pv_done})


PER_HEAD_STATS = ("valid_blocks", "kept_blocks", "pv_groups", "pv_skipped", "pv_blocks_computed")


def _with_totals(counts):
    """The per (b, h) ``counts`` of :func:`sparsity_stats` with its three overall floats added."""
    valid_n, kept_n = counts["valid_blocks"], counts["kept_blocks"]
    pv_groups, pv_skipped, pv_done = counts["pv_groups"], counts["pv_skipped"], counts["pv_blocks_computed"]
    total_valid = int(valid_n.sum())
    return {
        **counts,
        "stage1_sparsity": float(1.0 - kept_n.sum() / total_valid) if total_valid else 0.0,
        "stage2_sparsity": float(pv_skipped.sum() / pv_groups.sum()) if pv_groups.sum() else 0.0,
        "total_sparsity": (float(1.0 - (kept_n.sum() + pv_done.sum()) / (2 * total_valid))
                           if total_valid else 0.0),
    }


def concat_sparsity_stats(parts):
    """The :func:`sparsity_stats` of a batch from those of consecutive slices of it (in batch
    order): the per (b, h) counts concatenated, the overall floats computed again from them."""
    parts = list(parts)
    return _with_totals({name: np.concatenate([p[name] for p in parts]) for name in PER_HEAD_STATS})


def relative_l1(out, ref):
    """``sum|O - O_ref| / sum|O_ref|`` (the paper's tuning metric), in float64."""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    denom = np.abs(ref).sum()
    return float(np.abs(out - ref).sum() / denom) if denom else float(np.abs(out).sum())


def cosine_similarity(out, ref):
    out, ref = (np.asarray(x, dtype=np.float64).ravel() for x in (out, ref))
    denom = np.linalg.norm(out) * np.linalg.norm(ref)
    return float(out @ ref / denom) if denom else float(np.array_equal(out, ref))


def rmse(out, ref):
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.sqrt(np.mean((out - ref) ** 2)))


def error_metrics(out, ref):
    """The three error numbers of SPEC.md section 4 as a dict."""
    return {"rel_l1": relative_l1(out, ref), "cosine": cosine_similarity(out, ref),
            "rmse": rmse(out, ref)}
