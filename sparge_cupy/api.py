"""The public API: the same three functions on NumPy arrays (the reference, on the CPU) and on CuPy
arrays (the GPU kernels). Torch tensors go through :mod:`sparge_cupy.torch`.

Each stage is a function of its own: :func:`predict_block_map` (Stage 1), :func:`block_sparse_attn`
(quantized attention + Stage 2 on a given block map), and :func:`sparge_attn`, which composes them.
"""
from __future__ import annotations

import numpy as np

from . import _checks as ck
from .config import CONFIG


class _Default:
    """Marks ``cdfthreshd`` left at its default: CONFIG.cdfthreshd unless another selection rule
    (``topk``, ``mass_threshold``) is given."""

    def __repr__(self):
        return f"{CONFIG.cdfthreshd} (unless topk or mass_threshold is given)"


DEFAULT_CDF = _Default()


def _resolve_cdf(cdfthreshd, topk, mass_threshold=None):
    if cdfthreshd is DEFAULT_CDF:
        return None if topk is not None or mass_threshold is not None else CONFIG.cdfthreshd
    return cdfthreshd


def _selection(shapes, simthreshd1, cdfthreshd, topk, mass_threshold):
    """The checked per-head thresholds as the keyword arguments of both back ends."""
    theta, tau, kk, mt = ck.check_thresholds(
        shapes, simthreshd1=simthreshd1, cdfthreshd=_resolve_cdf(cdfthreshd, topk, mass_threshold),
        topk=topk, mass_threshold=mass_threshold)
    return dict(simthreshd1=theta, cdfthreshd=tau, topk=kk, mass_threshold=mt)


def _prediction_options(attention_sink, local_window, predictor):
    """The checked options of Stage 1 besides the thresholds, as keyword arguments of both back ends."""
    return dict(attention_sink=ck.check_flag("attention_sink", attention_sink),
                local_window=ck.check_flag("local_window", local_window),
                predictor=ck.check_predictor(predictor))


def _common(q, k, v, layout, is_causal, scale):
    """Checks shared by every entry point; returns (module name, shapes, scale)."""
    xp_name = ck.check_same_module(q, k, v) if v is not None else ck.check_same_module(q, k, k)
    shapes = ck.check_qkv(q, k, k if v is None else v, layout)
    ck.check_flag("is_causal", is_causal)
    scale = ck.check_scale(scale, shapes.D)
    if xp_name == "numpy":      # CuPy inputs: counted inside the kernels, checked at the end
        ck.check_finite(ck.count_nonfinite_numpy,
                        **({"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}))
    return xp_name, shapes, scale


def _attn_options(shapes, pvthreshd, qk, rebalance, pv, return_lse, return_stats):
    return dict(
        pvthreshd=ck.check_pvthreshd(pvthreshd, shapes.Hq),
        qk=ck.check_choice("qk", qk, ck.QK_MODES),
        rebalance=ck.check_flag("rebalance", rebalance),
        pv=ck.check_choice("pv", pv, ck.PV_MODES),
        return_lse=ck.check_flag("return_lse", return_lse),
        return_stats=ck.check_flag("return_stats", return_stats),
    )


def _reference():
    from . import reference
    return reference


def _ref_attention(q, k, v, block_map, *, layout, is_causal, scale, dtype, **opts):
    ref = _reference()
    res = ref.block_sparse_attention(ref.to_hnd(q, layout), ref.to_hnd(k, layout), ref.to_hnd(v, layout),
                                     block_map, is_causal=is_causal, scale=scale, **opts)
    res = res if isinstance(res, tuple) else (res,)
    out = ref.to_output(np.ascontiguousarray(ref.from_hnd(res[0], layout)), dtype)
    return out if len(res) == 1 else (out,) + res[1:]


def predict_block_map(q, k, *, is_causal=False, scale=None, layout="HND",
                      simthreshd1=CONFIG.simthreshd1, cdfthreshd=DEFAULT_CDF, topk=None,
                      mass_threshold=None, attention_sink=True, local_window=False,
                      predictor="paper"):
    """Stage 1: which (query block, key block) pairs to compute.

    Args:
      q: ``[B, Hq, Lq, D]`` (layout "HND") or ``[B, Lq, Hq, D]`` ("NHD"); fp16, bf16 or fp32.
      k: the same with Hkv heads (Hq a multiple of Hkv) and Lk tokens.
      simthreshd1: theta in [-1, 1], a scalar or one per query head: blocks with self-similarity
        <= theta are not trusted to their mean and kept whole (fix blocks).
      cdfthreshd: tau in (0, 1], per head: keep the key blocks holding this share of the
        compressed attention map (default CONFIG.cdfthreshd unless ``topk`` or
        ``mass_threshold`` is given).
      topk: a fraction in (0, 1], per head: keep that share of each row's valid blocks instead.
      mass_threshold: t >= 0 (inf allowed), per head: keep block (i, j) iff
        ``ceil(Lk/64) * P^_ij >= t`` (its estimated mass relative to uniform attention over the
        whole key sequence), one threshold for all rows, and each row's largest block; not in the
        paper (README, "Predictors beyond the paper"). Tune it with ``sparge-cupy tune --mode mass``.
        Exactly one of cdfthreshd, topk, mass_threshold applies.
      predictor: the estimate the rule selects from: "paper" (the compressed map: pooled queries
        against pooled keys) or "qbar_keys" (each query block's pooled query against every
        smoothed key, about 1/256 of attention's FLOPs; README, "Predictors beyond the paper").
      attention_sink: always keep key block 0.
      local_window: always keep each query block's own key blocks (its "diagonal": the keys
        aligned with its rows, bottom-right when Lq != Lk; the most recent tokens of every causal
        row); not in the paper (README, "Predictors beyond the paper").
    Returns:
      bool ``[B, Hq, ceil(Lq/128), ceil(Lk/64)]`` on the arrays' device.
    """
    xp_name, shapes, scale = _common(q, k, None, layout, is_causal, scale)
    sel = _selection(shapes, simthreshd1, cdfthreshd, topk, mass_threshold)
    sel.update(_prediction_options(attention_sink, local_window, predictor))
    if xp_name == "cupy":
        from . import _gpu
        return _gpu.predict_block_map(q, k, is_causal=is_causal, scale=scale, layout=layout, **sel)
    ref = _reference()
    return ref.predict_block_map(ref.to_hnd(q, layout), ref.to_hnd(k, layout), is_causal=is_causal,
                                 scale=scale, **sel)


def block_sparse_attn(q, k, v, block_map, *, is_causal=False, scale=None, layout="HND",
                      pvthreshd=None, qk="int8", rebalance=True, pv="fp8", return_lse=False,
                      return_stats=False):
    """Quantized attention over the kept blocks of ``block_map``, with the Stage 2 filter.

    Args:
      block_map: bool ``[B, Hq, ceil(Lq/128), ceil(Lk/64)]``; a query block with no kept block
        outputs zeros (LSE ``-inf``).
      pvthreshd: lambda > 0 in log2 units, per head, or None (filter off): a group of 16 query rows
        skips a block's P V when its scores are all at least lambda below the running max.
      qk: "int8" (per-block INT8 Q and smoothed K) or "fp16". rebalance: per-channel Q/K
        rebalancing before quantizing. pv: "fp8" (e4m3 P and per-channel V) or "fp16".
      return_lse: also return the log-sum-exp, float32 ``[B, Hq, Lq]`` (natural log).
      return_stats: also return a dict of Stage 1 / Stage 2 / total sparsity and counts.
    Returns:
      ``out`` in the input dtype and layout, then ``lse`` and ``stats`` as requested.
    """
    xp_name, shapes, scale = _common(q, k, v, layout, is_causal, scale)
    ck.check_block_map(block_map, shapes, xp_name)
    opts = _attn_options(shapes, pvthreshd, qk, rebalance, pv, return_lse, return_stats)
    if xp_name == "cupy":
        from . import _gpu
        return _gpu.block_sparse_attn(q, k, v, block_map, is_causal=is_causal, scale=scale,
                                      layout=layout, **opts)
    return _ref_attention(q, k, v, block_map, layout=layout, is_causal=is_causal, scale=scale,
                          dtype=q.dtype, **opts)


def sparge_attn(q, k, v, *, is_causal=False, scale=None, layout="HND",
                simthreshd1=CONFIG.simthreshd1, cdfthreshd=DEFAULT_CDF, topk=None,
                mass_threshold=None, pvthreshd=None, attention_sink=True, local_window=False,
                qk="int8", rebalance=True, pv="fp8", return_lse=False, return_stats=False,
                predictor="paper"):
    """SpargeAttn: Stage 1 prediction, then quantized block-sparse attention with Stage 2.

    ``O ~ softmax(scale Q K^T + causal mask) V``. Keywords as in :func:`predict_block_map` and
    :func:`block_sparse_attn`. Returns ``out`` in the input dtype and layout, then ``lse`` and
    ``stats`` as requested.
    """
    xp_name, shapes, scale = _common(q, k, v, layout, is_causal, scale)
    sel = _selection(shapes, simthreshd1, cdfthreshd, topk, mass_threshold)
    sel.update(_prediction_options(attention_sink, local_window, predictor))
    opts = _attn_options(shapes, pvthreshd, qk, rebalance, pv, return_lse, return_stats)
    if xp_name == "cupy":
        from . import _gpu
        return _gpu.sparge_attn(q, k, v, is_causal=is_causal, scale=scale, layout=layout, **sel, **opts)
    ref = _reference()
    block_map = ref.predict_block_map(ref.to_hnd(q, layout), ref.to_hnd(k, layout),
                                      is_causal=is_causal, scale=scale, **sel)
    return _ref_attention(q, k, v, block_map, layout=layout, is_causal=is_causal, scale=scale,
                          dtype=q.dtype, **opts)
