"""Smoothing, channel rebalancing and the quantizers, bit-exact with the kernels (SPEC.md section 3).

Every function takes float32 HND arrays and returns float32 (or int8) arrays. The rounding rules
are the kernels': IEEE float32 division and square root, round half to even (``np.rint`` here,
``__float2int_rn`` there), so that given the same float32 inputs both sides produce identical int8
tensors and scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..config import CONFIG
from .layout import num_blocks

F32 = np.float32
E4M3 = ml_dtypes.float8_e4m3fn


@dataclass(frozen=True)
class QuantStats:
    """The quantization statistics taken over the whole sequence, each float32 ``[B, Hkv, D]``.

    Every other quantization statistic is per block. A caller holding only part of the sequence
    (ring attention, :mod:`sparge_cupy.distributed`) computes these over all of it and passes them
    in, so that its quantizers are the single-process ones. A field left None is taken from the
    operands at hand, as without ``QuantStats``. :func:`quant_stats` is the definition.
    """
    km: object = None        # K mean over the tokens
    q_amax: object = None    # channel max |Q| over the tokens of every query head of the kv head
    k_amax: object = None    # channel max |K - km|
    v_amax: object = None    # channel max |V| (pv="fp8": dv = v_amax / 448)


def quant_stats(q, k, v):
    """The :class:`QuantStats` of HND ``q``, ``k``, ``v``: what the quantizers take when given none."""
    km, ks = smooth_k(k)
    return QuantStats(km=km[:, :, 0], q_amax=_group_amax(np.asarray(q, dtype=F32), ks.shape[1]),
                      k_amax=np.abs(ks).max(axis=2), v_amax=np.abs(np.asarray(v, F32)).max(axis=2))


def _given(x):
    """A ``[B, Hkv, D]`` QuantStats field as float32 ``[B, Hkv, 1, D]``."""
    return np.asarray(x, dtype=F32)[:, :, None]


def _group_amax(q, Hkv):
    """Channel max |Q| over the tokens of all query heads sharing each kv head, ``[B, Hkv, D]``."""
    B, Hq, Lq, D = q.shape
    return np.abs(q).reshape(B, Hkv, (Hq // Hkv) * Lq, D).max(axis=2)


def smooth_k(k, km=None):
    """``km = mean_t K`` per (b, kv head) and the smoothed ``K - km``.

    The mean is taken in float64 and rounded once to float32 (the kernels sum in float32 in
    another order, so km agrees to rounding, not bit for bit). Softmax is unchanged by smoothing:
    every logit of a row shifts by ``q . km``. ``km``: a given mean ``[B, Hkv, D]``
    (:class:`QuantStats`), used instead of K's own.
    """
    if km is None:
        km = np.asarray(k, dtype=np.float64).mean(axis=2, keepdims=True).astype(F32)
    else:
        km = _given(km)
    return km, (np.asarray(k, dtype=F32) - km)


def channel_scales(q, ks, *, q_amax=None, k_amax=None):
    """Per-channel rebalancing scales ``s_c = sqrt(amax_t|K_c| / amax_t|Q_c|)``, ``[B, Hkv, 1, D]``.

    ``q``: float32 ``[B, Hq, Lq, D]``; ``ks``: smoothed K, float32 ``[B, Hkv, Lk, D]``. The Q
    maximum runs over every query head that shares the kv head. ``q . k = sum_c (q_c s_c)(k_c / s_c)``
    exactly, and after scaling both operands have the same per-channel maximum
    ``sqrt(amaxQ_c amaxK_c)``, so one INT8 scale per block no longer rounds small channels away.
    A zero channel on either side keeps ``s_c = 1``. ``q_amax``, ``k_amax``: given maxima
    ``[B, Hkv, D]`` (:class:`QuantStats`), used instead of those of ``q`` and ``ks``.
    """
    amax_q = _given(_group_amax(q, ks.shape[1]) if q_amax is None else q_amax)
    amax_k = np.abs(ks).max(axis=2, keepdims=True) if k_amax is None else _given(k_amax)
    ok = (amax_q > 0) & (amax_k > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(amax_k / np.where(ok, amax_q, F32(1)))
    return np.where(ok, s, F32(1)).astype(F32)


def expand_kv_heads(x, Hq):
    """Index the kv-head axis (1) by query head: result[:, h] = x[:, h // (Hq / Hkv)]."""
    return np.repeat(x, Hq // x.shape[1], axis=1)


def _blocked(x, block):
    """Zero-pad the token axis to a multiple of ``block`` and split it: ``[B, H, nb, block, D]``."""
    B, H, L, D = x.shape
    nb = num_blocks(L, block)
    pad = nb * block - L
    if pad:
        x = np.concatenate([x, np.zeros((B, H, pad, D), dtype=x.dtype)], axis=2)
    return x.reshape(B, H, nb, block, D)


def quantize_int8_per_block(x, block, cfg=CONFIG):
    """Symmetric INT8 per block of ``block`` tokens, per (b, head).

    ``delta = amax|X_block| / 127`` (1 for an all-zero block), ``X_int8 = rint(X / delta)`` clipped
    to [-127, 127]. Returns ``(x_int8 [B, H, L, D], delta float32 [B, H, nb])``. Zero padding of a
    partial block changes neither its maximum nor its values.
    """
    x = np.asarray(x, dtype=F32)
    L = x.shape[2]
    xb = _blocked(x, block)
    amax = np.abs(xb).max(axis=(3, 4))
    delta = np.where(amax > 0, amax / F32(cfg.int8_max), F32(1)).astype(F32)
    xi = np.clip(np.rint(xb / delta[..., None, None]), -cfg.int8_max, cfg.int8_max).astype(np.int8)
    return xi.reshape(x.shape[:2] + (-1, x.shape[3]))[:, :, :L], delta


def dequantize_int8_per_block(xi, delta, block):
    L = xi.shape[2]
    xb = _blocked(xi.astype(F32), block) * delta[..., None, None]
    return xb.reshape(xi.shape[:2] + (-1, xi.shape[3]))[:, :, :L]


def round_e4m3(x):
    """Round float32 to FP8 e4m3 (nearest even, saturating at +-448), returned as float32."""
    return np.clip(np.asarray(x, dtype=F32), -448.0, 448.0).astype(E4M3).astype(F32)


def quantize_v_fp8(v, cfg=CONFIG, *, amax=None):
    """V per channel to e4m3: ``dv_d = amax_t|V[:, d]| / 448`` (1 for a zero channel).

    ``amax``: given channel maxima ``[B, Hkv, D]`` (:class:`QuantStats` ``v_amax``, at least those
    of ``v``), used instead of V's own. Returns ``(v_e4m3 as float32 [B, Hkv, L, D], dv float32
    [B, Hkv, 1, D])``.
    """
    v = np.asarray(v, dtype=F32)
    amax = np.abs(v).max(axis=2, keepdims=True) if amax is None else _given(amax)
    dv = np.where(amax > 0, amax / F32(cfg.fp8_max), F32(1)).astype(F32)
    return round_e4m3(v / dv), dv


def round_fp16(x):
    return np.asarray(x, dtype=F32).astype(np.float16).astype(F32)


def to_output(x, dtype):
    """The float32 attention output ``x`` in the output ``dtype`` as the kernels store it:
    rounded to nearest, and for fp16 saturated to its largest finite value, 65504 (the rounded P
    can put an output a fraction of a per cent past max |V|: inf for V near 65504 otherwise)."""
    x = np.asarray(x, dtype=F32)
    if np.dtype(dtype) == np.float16:
        x = np.clip(x, F32(-65504), F32(65504))
    return x.astype(dtype)


# A float32 of magnitude at least this rounds to inf in fp16 (65504 is the largest finite value;
# 65520, half an ulp above it, rounds to even, which is 2^16).
FP16_OVERFLOW = 65520.0


def check_fp16_operands(q_max, k_max):
    """``qk="fp16"`` rounds the rebalanced Q and smoothed K to fp16; raise a ValueError naming
    ``qk`` where either one's largest magnitude (``q_max``, ``k_max``: floats, NaN for none)
    would round to inf there: a finite input would otherwise give a NaN output."""
    for what, m in (("Q", q_max), ("smoothed K", k_max)):
        if m >= FP16_OVERFLOW:
            raise ValueError(
                f"qk: 'fp16' rounds Q and smoothed K (after rebalancing, where on) to fp16, and "
                f"{what} reaches {m:.6g} there, beyond fp16's 65504 (it would round to inf and "
                "make the output NaN); "
                "use qk='int8' (a scale per block) or scale the inputs down")
