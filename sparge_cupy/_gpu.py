"""Launch code for CuPy arrays: the GPU half of :mod:`sparge_cupy.api`.

``api.py`` validates every input and then calls :func:`predict_block_map`,
:func:`block_sparse_attn` or :func:`sparge_attn` here, with thresholds already per-head float32
NumPy arrays and ``scale`` a Python float. The torch adapter calls the same functions through
:func:`operand` (which also knows bf16, CuPy-side uint16 storage).

The pipeline (one launch per line; kernels in ``cuda/``):

    q_stats (Q)          pass A: pooled Q, its similarity, channel maxima of Q      block_stats.cu
    q_groups (Q)         predictor="qgroup_keys": Q pooled over row groups          block_stats.cu
    k_sums (K)           pass A: per key block sums, max and min of K               block_stats.cu
    head_scales          K mean, max |K - km|, rebalancing scales per kv head       block_stats.cu
    k_pass (K)           pass B: pooled K - km, its similarity, the K operand       block_stats.cu
    compressed_map       S^ in tiles of 64 x 64 block pairs                         select.cu
      or qbar_keys_mma (K)   predictor="qbar_keys": S^ from every smoothed key         select.cu
      or qbar_keys_mma (K) + group_mass_map   "qgroup_keys": per row group, averaged    select.cu
    select_rows / _blocks  S^ rows -> bool block map (a warp or a block per row)    select.cu
    quantize_q (Q)       pass B: the Q operand                                      block_stats.cu
    v_channel_amax (V)   pass A: channel max |V| (pv="fp8")                         quant_v.cu
    quantize_v (V)       pass B: V^T in e4m3 (or fp16), dv                          quant_v.cu
    sparse_attn[_wg]     the attention loop and Stage 2                             sparse_attn.cu
                         (_wg: warpgroup MMAs and TMA loads, compute capability 9.0; see
                         attn_kernel_choice)

Q, K and V are read twice each (once to measure, once to quantize). :func:`sparge_attn` makes
k_pass write the K operand in the same pass as the pooled K (``k_operand`` of
:func:`block_statistics`); the other entry points run it where they need it.

Ring attention's partials (:mod:`sparge_cupy.distributed`) pass the whole sequence's K mean and
channel maxima (``quant_stats``, a :class:`reference.QuantStats`): head_scales and the quantizers
then read the given arrays in place of the computed ones, and v_channel_amax is skipped.

Non-finite inputs are detected on the way: q_stats, k_sums and quantize_v count the NaN / Inf of
Q, K and V into a three-element device counter, and each entry point reads it once, raising the
API's ValueError: the attention entry points after the quantization and before the attention
kernel (which then runs while the host goes on: the call returns without waiting for it),
predict_block_map at its end. Whatever the kernels computed from such inputs is discarded; they
still terminate.

Head dims other than 64, 128, 256 are zero-padded here to the next of them (exact: zero channels
add nothing to any dot product, maximum or similarity); the kernels use the caller's scale and
write only the true channels.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from . import _checks as ck
from ._compile import (ATTN_KERNELS, ELEMENT_TYPES, HEAD_DIMS, SELECT_ROW_KEYS, attn_define, attn_name,
                       get_kernel, wg_map_list_on, wg_overlap_dims)
from .config import CONFIG

BQ, BK = CONFIG.block_q, CONFIG.block_k
THREADS = 256

# NumPy mirrors of the kernels' parameter structs (align=True lays fields out as C does; the
# CPU tests compile offsetof checks generated from these).
_PTR, _I64, _I32, _F32, _F64 = np.uint64, np.int64, np.int32, np.float32, np.float64


def _struct(fields):
    return np.dtype(fields, align=True)


TENSOR_VIEW = _struct([("ptr", _PTR), ("stride_b", _I64), ("stride_h", _I64), ("stride_t", _I64),
                       ("align", _I64)])
Q_STATS_PARAMS = _struct([
    ("x", TENSOR_VIEW), ("pooled", _PTR), ("sim", _PTR), ("block_amax", _PTR),
    ("head_amax", _PTR), ("nonfinite", _PTR), ("H", _I32), ("L", _I32), ("heads_per_kv", _I32),
    ("sim_eps", _F64)])
HEAD_SCALES_PARAMS = _struct([
    ("sums", _PTR), ("kmax", _PTR), ("kmin", _PTR), ("q_amax", _PTR), ("km_given", _PTR),
    ("k_amax_given", _PTR), ("km", _PTR), ("k_amax", _PTR), ("s_c", _PTR), ("H", _I32),
    ("L", _I32)])
K_PASS_PARAMS = _struct([
    ("x", TENSOR_VIEW), ("km", _PTR), ("s_c", _PTR), ("kmax", _PTR), ("kmin", _PTR),
    ("pooled", _PTR), ("sim", _PTR), ("out", _PTR), ("delta", _PTR), ("H", _I32), ("L", _I32),
    ("sim_eps", _F64)])
QUANTIZE_Q_PARAMS = _struct([
    ("x", TENSOR_VIEW), ("s_c", _PTR), ("km", _PTR), ("block_amax", _PTR), ("out", _PTR),
    ("delta", _PTR), ("q_dot_km", _PTR), ("H", _I32), ("L", _I32), ("heads_per_kv", _I32)])
MAP_PARAMS = _struct([
    ("qbar", _PTR), ("kbar", _PTR), ("k_sim", _PTR), ("theta", _PTR), ("s_hat", _PTR),
    ("Hq", _I32), ("Hkv", _I32), ("nq", _I32), ("nk", _I32), ("D", _I32), ("Lq", _I32),
    ("Lk", _I32), ("causal", _I32), ("scale", _F32)])
QBAR_KEYS_PARAMS = _struct([
    ("k", TENSOR_VIEW), ("qbar", _PTR), ("km", _PTR), ("k_sim", _PTR), ("theta", _PTR),
    ("s_hat", _PTR), ("Hq", _I32), ("Hkv", _I32), ("nq", _I32), ("nk", _I32), ("Lq", _I32),
    ("Lk", _I32), ("causal", _I32), ("scale", _F32), ("group", _I32)])
GROUP_MASS_PARAMS = _struct([
    ("lse", _PTR), ("k_sim", _PTR), ("theta", _PTR), ("s_hat", _PTR), ("Hq", _I32), ("Hkv", _I32),
    ("nq", _I32), ("ng", _I32), ("nk", _I32), ("Lq", _I32), ("Lk", _I32), ("causal", _I32),
    ("group", _I32)])
SELECT_PARAMS = _struct([
    ("s_hat", _PTR), ("q_sim", _PTR), ("k_sim", _PTR), ("theta", _PTR), ("tau", _PTR),
    ("topk", _PTR), ("mass_threshold", _PTR), ("block_map", _PTR), ("Hq", _I32), ("Hkv", _I32),
    ("nq", _I32), ("nk", _I32), ("Lq", _I32), ("Lk", _I32), ("causal", _I32), ("sink", _I32),
    ("local", _I32), ("nk_pow2", _I32)])
ATTN_PARAMS = _struct([
    ("q", _PTR), ("k", _PTR), ("vt", _PTR), ("dq", _PTR), ("dk", _PTR), ("dv", _PTR),
    ("block_map", _PTR), ("pvthreshd", _PTR), ("q_dot_km", _PTR), ("out", _PTR), ("lse", _PTR),
    ("group_counts", _PTR), ("out_stride_b", _I64), ("out_stride_h", _I64), ("out_stride_t", _I64),
    ("Hq", _I32), ("Hkv", _I32), ("Lq", _I32), ("Lk", _I32), ("nq", _I32), ("nk", _I32),
    ("d_out", _I32), ("causal", _I32), ("scale", _F32)])
# sparse_attn_wg's second parameter: the TMA tensor maps of its three operands (CUtensorMap, 128
# opaque bytes each, made by cuTensorMapEncodeTiled: wg_tensor_maps).
WG_MAPS = _struct([("q", np.uint8, (128,)), ("k", np.uint8, (128,)), ("vt", np.uint8, (128,))])
STRUCTS = {"TensorView": TENSOR_VIEW, "WgMaps": WG_MAPS, "QStatsParams": Q_STATS_PARAMS,
           "HeadScalesParams": HEAD_SCALES_PARAMS, "KPassParams": K_PASS_PARAMS,
           "QuantizeQParams": QUANTIZE_Q_PARAMS, "MapParams": MAP_PARAMS,
           "QbarKeysParams": QBAR_KEYS_PARAMS, "GroupMassParams": GROUP_MASS_PARAMS,
           "SelectParams": SELECT_PARAMS, "AttnParams": ATTN_PARAMS}


_FORMATS = {np.dtype(_I64): "q", np.dtype(_I32): "i", np.dtype(_F32): "f", np.dtype(_F64): "d"}


@functools.lru_cache(maxsize=None)
def _packer(dtype):
    """(struct.Struct laying out ``dtype`` as C does, its field names, their kinds: "ptr",
    "num" or "image" (a nested struct or a byte array, given as a NumPy record or array))."""
    import struct
    fmt, at, names, kinds = ["<"], 0, [], []
    for name, (ft, off) in sorted(dtype.fields.items(), key=lambda kv: kv[1][1]):
        fmt.append(f"{off - at}x" if off > at else "")
        if ft == _PTR:
            fmt.append("Q")
            kinds.append("ptr")
        elif ft in _FORMATS:
            fmt.append(_FORMATS[ft])
            kinds.append("num")
        else:
            fmt.append(f"{ft.itemsize}s")
            kinds.append("image")
        names.append(name)
        at = off + ft.itemsize
    fmt.append(f"{dtype.itemsize - at}x" if dtype.itemsize > at else "")
    packer = struct.Struct("".join(fmt))
    assert packer.size == dtype.itemsize, (dtype, packer.format)
    return packer, tuple(names), tuple(kinds)


def _params(dtype, **fields):
    """The image of one struct of ``dtype`` (the kernels take it by value; _compile.Kernel passes
    bytes as they are): arrays become device pointers, NumPy records their bytes, fields not given
    are zero."""
    packer, names, kinds = _packer(dtype)
    values = []
    for name, kind in zip(names, kinds):
        v = fields.get(name)
        if kind == "ptr":
            values.append(_ptr(v))
        elif kind == "image":
            values.append(b"" if v is None else v.tobytes())
        else:
            values.append(0 if v is None else v)
    return packer.pack(*values)


def _ptr(x):
    return 0 if x is None else int(x.data.ptr)


def _cupy():
    import cupy
    return cupy


@functools.lru_cache(maxsize=512)
def _device_copy(device_id, data):
    return _cupy().asarray(np.frombuffer(data, dtype=np.float32))


def device_constant(x):
    """A read-only float32 device array of the small host array ``x`` (per-head thresholds), cached
    by value per device; None stays None, a CuPy array is only cast. A copy from pageable host
    memory makes CUDA wait for the stream first, which in the middle of the pipeline would stall
    the host until every kernel launched before had finished; a model calls each layer with the
    same thresholds every step, so after its first call nothing is copied. The kernels never
    write these arrays."""
    if x is None:
        return None
    cp = _cupy()
    if isinstance(x, cp.ndarray):
        return x.astype(cp.float32, copy=False)
    return _device_copy(cp.cuda.Device().id, np.ascontiguousarray(x, dtype=np.float32).tobytes())


def padded_head_dim(D):
    """The native head dim (64, 128, 256) that ``D`` is zero-padded to."""
    for n in HEAD_DIMS:
        if D <= n:
            return n
    raise ValueError(f"head dim must be <= {HEAD_DIMS[-1]}, got {D}")


# ---------------------------------------------------------------------------------------------
# Operands: a user tensor as the kernels see it.

@dataclass(frozen=True)
class Operand:
    """A user tensor (HND or NHD) with its channels contiguous and padded to a native head dim."""
    array: object            # cupy array, [B, H, L, Dp] (HND) or [B, L, H, Dp] (NHD)
    dtype: str               # "float16" | "float32" | "bfloat16" (bf16 stored as uint16)
    layout: str
    D: int                   # the caller's head dim (<= Dp)

    @property
    def shape(self):
        """(B, H, L, Dp)."""
        s = self.array.shape
        return (s[0], s[1], s[2], s[3]) if self.layout == "HND" else (s[0], s[2], s[1], s[3])

    @property
    def size(self):
        """Elements of the caller's tensor (true head dim)."""
        return math.prod(self.shape[:3]) * self.D

    def view(self):
        """The TensorView struct: pointer, element strides of batch, head, token, alignment."""
        st = [s // self.array.itemsize for s in self.array.strides]
        sb, sh, stt = (st[0], st[1], st[2]) if self.layout == "HND" else (st[0], st[2], st[1])
        rec = np.zeros(1, dtype=TENSOR_VIEW)
        rec["ptr"], rec["stride_b"], rec["stride_h"], rec["stride_t"] = _ptr(self.array), sb, sh, stt
        rec["align"] = row_alignment(_ptr(self.array), [s * self.array.itemsize for s in (sb, sh, stt)])
        return rec


def row_alignment(ptr, byte_strides, most=16):
    """The largest power of two <= ``most`` dividing ``ptr`` and every stride: every row start is
    aligned to it (the kernels' vector loads need 4 to 16 bytes; other rows take scalar loads)."""
    a = most
    for x in (ptr, *byte_strides):
        while x % a:
            a //= 2
    return a


def operand(x, layout, dtype=None):
    """Wrap a CuPy array (bf16: a uint16 view of the storage, with ``dtype="bfloat16"``)."""
    cp = _cupy()
    dtype = dtype or str(x.dtype)
    if dtype not in ELEMENT_TYPES:
        raise TypeError(f"expected float16, float32 or bfloat16 storage, got {dtype}")
    D = int(x.shape[3])
    Dp = padded_head_dim(D)
    # RawKernel ignores strides: the kernels need contiguous channels and element-multiple strides.
    if x.strides[3] != x.itemsize or any(s % x.itemsize for s in x.strides):
        x = cp.ascontiguousarray(x)
    if Dp != D:
        padded = cp.zeros(x.shape[:3] + (Dp,), dtype=x.dtype)
        padded[..., :D] = x
        x = padded
    return Operand(x, dtype, layout, D)


def nonfinite_counter():
    """The device counter of NaN / Inf in (q, k, v) that the kernels fill (uint64 [3])."""
    cp = _cupy()
    return cp.zeros(3, dtype=cp.uint64)


def _slot(counter, i):
    return None if counter is None else counter[i:i + 1]


def check_counter(counter, **operands):
    """Raise the API's ValueError for the first of ``operands`` (in q, k, v order, matching the
    counter's slots) with NaN or Inf: one read of the counter (a host synchronisation)."""
    counts = counter.get()
    for (name, x), bad in zip(operands.items(), counts):
        if bad:
            raise ck.nonfinite_error(name, int(bad), x.size)


# ---------------------------------------------------------------------------------------------
# Stage 1 statistics and quantization.

@dataclass
class Stats:
    """Statistics of Q and smoothed K (block_stats.cu), on the device. Every field may be None
    where the caller has no use for it (the sequence-parallel selection passes the pooled rows
    alone)."""
    km: object = None            # [B, Hkv, Dp] K mean
    q_amax: object = None        # [B, Hkv, Dp] channel max |Q| over the heads sharing a kv head
    k_amax: object = None        # [B, Hkv, Dp] channel max |K - km|
    s_c: object = None           # [B, Hkv, Dp] rebalancing scales sqrt(k_amax / q_amax)
    q_block_amax: object = None  # [B, Hq, nq, Dp]
    k_block_max: object = None   # [B, Hkv, nk, Dp] channel max of K per key block (k_sums)
    k_block_min: object = None   # [B, Hkv, nk, Dp] channel min
    qbar: object = None          # [B, Hq, nq, Dp] pooled Q (prediction only)
    q_groups: object = None      # [B, Hq, ng, Dp] Q pooled over CONFIG.query_group rows ("qgroup_keys")
    q_sim: object = None         # [B, Hq, nq]
    kbar: object = None          # [B, Hkv, nk, Dp] pooled smoothed K
    k_sim: object = None         # [B, Hkv, nk]
    v_amax: object = None        # [B, Hkv, Dp] given channel max |V|, or None: quantize_v's own
    k_operand: tuple = None      # (qk, rebalance, k_op, dk): K quantized in the same k_pass


def _grid(nb, H, B):
    return (int(nb), int(H), int(B))


# CUDA's limit on gridDim.y and gridDim.z. The kernels put the heads in y and the batch in z, or
# batch x heads in z (compressed_map, qbar_keys_mma); a batch with more than this many (batch
# entry, head) pairs runs in slices of whole batch entries (every statistic is per batch entry,
# so a slice computes exactly what the whole batch would), one set of launches a slice.
MAX_GRID_YZ = 65535


def batch_slices(B, Hq):
    """``[(b0, b1)]`` covering the batch in order, each slice with ``(b1 - b0) * Hq`` at most
    :data:`MAX_GRID_YZ`."""
    if Hq > MAX_GRID_YZ:
        raise ValueError(f"q: at most {MAX_GRID_YZ} query heads on the GPU (CUDA's launch grid), "
                         f"got {Hq}")
    step = MAX_GRID_YZ // Hq
    return [(b0, min(B, b0 + step)) for b0 in range(0, B, step)]


def _batch_slice(x, b0, b1):
    """``x`` (an :class:`Operand`, a device array, a dataclass of them, or None) restricted to
    batch entries ``b0 .. b1 - 1``."""
    if x is None:
        return None
    if isinstance(x, Operand):
        return Operand(x.array[b0:b1], x.dtype, x.layout, x.D)
    if dataclasses.is_dataclass(x):
        return dataclasses.replace(x, **{f.name: _batch_slice(getattr(x, f.name), b0, b1)
                                         for f in dataclasses.fields(x)
                                         if hasattr(getattr(x, f.name), "shape")})
    return x[b0:b1]


def _count_nonfinite(a):
    """NaN and Inf in operand storage ``a`` (uint16 holds bf16: exponent bits all ones)."""
    cp = _cupy()
    if a.dtype == cp.uint16:
        return int(cp.count_nonzero((a & 0x7F80) == 0x7F80))
    return int(cp.count_nonzero(~cp.isfinite(a)))


def _check_finite_operands(**operands):
    """The API's non-finite check (:func:`_checks.check_finite`) over whole Operands, their true
    channels: one reduction each, a host read (the sliced path, which has no single counter)."""
    ck.check_finite(_count_nonfinite, **{n: x.array[..., :x.D] for n, x in operands.items()})


def _in_batch_slices(fn, slices, operands, block_map=None, *, out=None, return_lse=False,
                     return_stats=False, quant_stats=None, **options):
    """``fn`` (:func:`sparge_attn` or :func:`block_sparse_attn`) slice by slice into one output:
    the non-finite check first, over the whole inputs (so that its count is the whole tensor's),
    then each slice's call writing its rows of ``out``; the LSE concatenated and the statistics
    merged in batch order."""
    cp = _cupy()
    from .reference import concat_sparsity_stats
    _check_finite_operands(**dict(zip("qkv", operands)))
    out = _output(operands[0], out)
    lse, stats = [], []
    for b0, b1 in slices:
        args = [_batch_slice(x, b0, b1) for x in operands]
        if block_map is not None:
            args.append(block_map[b0:b1])
        extra = {} if quant_stats is None else {"quant_stats": _batch_slice(quant_stats, b0, b1)}
        res = fn(*args, out=out[b0:b1], return_lse=return_lse, return_stats=return_stats,
                 **extra, **options)
        res = res if isinstance(res, tuple) else (res,)
        if return_lse:
            lse.append(res[1])
        if return_stats:
            stats.append(res[-1])
    results = [out] + ([cp.concatenate(lse)] if return_lse else [])
    results += [concat_sparsity_stats(stats)] if return_stats else []
    return results[0] if len(results) == 1 else tuple(results)


STATS_THREADS = 128                  # block_stats.cu's per-block kernels: a warp per block


def _warp_grid(nb, H, B):
    """Grid of a warp-per-block kernel over ``nb`` blocks (4 blocks per program)."""
    return _grid(-(-nb // (STATS_THREADS // 32)), H, B)


def _given_channels(x, Dp):
    """A given :class:`reference.QuantStats` field (``[B, Hkv, D]``, any float dtype) as the
    kernels read it: a new contiguous float32 ``[B, Hkv, Dp]`` array, zero for the padded
    channels (the statistics of zero channels); None stays None."""
    if x is None:
        return None
    cp = _cupy()
    x = cp.asarray(x, dtype=cp.float32)
    out = cp.zeros(x.shape[:2] + (Dp,), dtype=cp.float32)
    out[..., :x.shape[2]] = x
    return out


def _operand_type(qk):
    cp = _cupy()
    return ("signed char", cp.int8) if qk == "int8" else ("__half", cp.float16)


def block_statistics(q, k, *, pooled, nonfinite=None, quant_stats=None, k_operand=None,
                     q_groups=False):
    """Pass A over Q and K, the per-head scales, and (with ``pooled``) the pooled blocks and
    similarities of Q and smoothed K.

    ``nonfinite``: a :func:`nonfinite_counter` to count the NaN / Inf of Q and K into, or None.
    ``quant_stats``: a :class:`reference.QuantStats` of CuPy ``[B, Hkv, D]`` arrays (ring
    attention: the whole sequence's). A given ``km`` replaces the K mean (K is then smoothed with
    it), given maxima replace ``q_amax`` and ``k_amax`` (the kernels' own go to scratch) and fill
    ``v_amax``. The per-block maxima stay those of q and k. ``k_operand``: ``(qk, rebalance)``
    to have k_pass also write the K operand (with ``pooled``: the pass that pools K - km reads K
    anyway); :func:`quantize_qk` then takes it from ``Stats.k_operand``. ``q_groups``: also pool Q
    over groups of ``CONFIG.query_group`` rows (``Stats.q_groups``, predictor="qgroup_keys")."""
    cp = _cupy()
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    nq, nk = -(-Lq // BQ), -(-Lk // BK)
    f32 = cp.float32
    T = ELEMENT_TYPES[q.dtype]
    given = {f: _given_channels(getattr(quant_stats, f, None), D)
             for f in ("km", "q_amax", "k_amax", "v_amax")}

    st = Stats(km=cp.empty((B, Hkv, D), f32), q_amax=cp.zeros((B, Hkv, D), f32),
               k_amax=cp.empty((B, Hkv, D), f32), s_c=cp.empty((B, Hkv, D), f32),
               q_block_amax=cp.empty((B, Hq, nq, D), f32),
               k_block_max=cp.empty((B, Hkv, nk, D), f32), k_block_min=cp.empty((B, Hkv, nk, D), f32),
               v_amax=given["v_amax"])
    if pooled:
        st.qbar, st.q_sim = cp.empty((B, Hq, nq, D), f32), cp.empty((B, Hq, nq), f32)
        st.kbar, st.k_sim = cp.empty((B, Hkv, nk, D), f32), cp.empty((B, Hkv, nk), f32)
    get_kernel("block_stats.cu", f"sparge::q_stats<{T}, {D}>")(_warp_grid(nq, Hq, B), (STATS_THREADS,), (_params(
        Q_STATS_PARAMS, x=q.view(), pooled=st.qbar, sim=st.q_sim, block_amax=st.q_block_amax,
        head_amax=st.q_amax, nonfinite=_slot(nonfinite, 0), H=Hq, L=Lq, heads_per_kv=Hq // Hkv,
        sim_eps=CONFIG.sim_eps),))
    sums = cp.empty((B, Hkv, nk, D), dtype=cp.float64)
    get_kernel("block_stats.cu", f"sparge::k_sums<{T}, {D}>")(
        _warp_grid(nk, Hkv, B), (STATS_THREADS,),
        (k.view(), sums, st.k_block_max, st.k_block_min, _slot(nonfinite, 1), _I32(Hkv), _I32(Lk)))
    if given["q_amax"] is not None:
        st.q_amax = given["q_amax"]
    get_kernel("block_stats.cu", "sparge::head_scales")(_grid(D // 32, Hkv, B), (THREADS,), (_params(
        HEAD_SCALES_PARAMS, sums=sums, kmax=st.k_block_max, kmin=st.k_block_min, q_amax=st.q_amax,
        km_given=given["km"], k_amax_given=given["k_amax"], km=st.km, k_amax=st.k_amax, s_c=st.s_c,
        H=Hkv, L=Lk),))
    if pooled or k_operand is not None:
        st.k_operand = _k_pass(k, st, pooled=pooled, k_operand=k_operand)
    if q_groups:
        G = query_group()
        ng = -(-Lq // G)
        st.q_groups = cp.empty((B, Hq, ng, D), f32)
        get_kernel("block_stats.cu", f"sparge::q_groups<{T}, {D}, {G}>")(
            _warp_grid(ng, Hq, B), (STATS_THREADS,), (q.view(), st.q_groups, _I32(Hq), _I32(Lq)))
    return st


def query_group():
    """CONFIG.query_group, checked for the kernels: a divisor of BQ, a multiple of 4 (a warp step
    of q_groups covers up to 4 rows; group_mass_map takes up to 32 groups per block)."""
    from .reference.predict import check_query_group
    G = check_query_group(CONFIG)
    if G % 4:
        raise ValueError(f"query_group: the kernels need a multiple of 4, got {G}")
    return G


def _k_pass(k, st, *, pooled, k_operand):
    """k_pass: with ``pooled`` fill ``st.kbar`` / ``st.k_sim``; with ``k_operand`` = (qk,
    rebalance) return (qk, rebalance, k_op [B,Hkv,nk*BK,Dp], dk [B,Hkv,nk]), else None."""
    cp = _cupy()
    B, Hkv, Lk, D = k.shape
    nk = -(-Lk // BK)
    T = ELEMENT_TYPES[k.dtype]
    k_op = dk = None
    out_t = "signed char"
    result = None
    if k_operand is not None:
        qk, rebalance = k_operand
        out_t, out_dtype = _operand_type(qk)
        k_op, dk = cp.empty((B, Hkv, nk * BK, D), out_dtype), cp.empty((B, Hkv, nk), cp.float32)
        result = (qk, rebalance, k_op, dk)
    s_c = st.s_c if k_operand is None or k_operand[1] else None       # None: no rebalancing
    get_kernel("block_stats.cu", f"sparge::k_pass<{T}, {out_t}, {D}>")(_warp_grid(nk, Hkv, B), (STATS_THREADS,), (_params(
        K_PASS_PARAMS, x=k.view(), km=st.km, s_c=s_c, kmax=st.k_block_max, kmin=st.k_block_min,
        pooled=st.kbar if pooled else None, sim=st.k_sim if pooled else None, out=k_op, delta=dk,
        H=Hkv, L=Lk, sim_eps=CONFIG.sim_eps),))
    return result


def quantize_qk(q, k, st, *, qk, rebalance, with_q_dot_km):
    """INT8 (or fp16) rebalanced Q and smoothed K with their per-block scales (the K operand from
    ``st.k_operand`` where :func:`block_statistics` made it for the same modes).

    Returns ``(q_op [B,Hq,nq*BQ,Dp], dq [B,Hq,nq], k_op [B,Hkv,nk*BK,Dp], dk [B,Hkv,nk],
    q_dot_km [B,Hq,Lq] or None)``.
    """
    cp = _cupy()
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    nq = -(-Lq // BQ)
    out_t, out_dtype = _operand_type(qk)
    q_op, dq = cp.empty((B, Hq, nq * BQ, D), out_dtype), cp.empty((B, Hq, nq), cp.float32)
    q_dot_km = cp.empty((B, Hq, Lq), cp.float32) if with_q_dot_km else None
    get_kernel("block_stats.cu", f"sparge::quantize_q<{ELEMENT_TYPES[q.dtype]}, {out_t}, {D}>")(
        _warp_grid(nq, Hq, B), (STATS_THREADS,), (_params(
            QUANTIZE_Q_PARAMS, x=q.view(), s_c=st.s_c if rebalance else None,
            km=st.km if with_q_dot_km else None, block_amax=st.q_block_amax, out=q_op, delta=dq,
            q_dot_km=q_dot_km, H=Hq, L=Lq, heads_per_kv=Hq // Hkv),))
    made = st.k_operand
    if made is None or made[:2] != (qk, rebalance):
        made = _k_pass(k, st, pooled=False, k_operand=(qk, rebalance))
    return q_op, dq, made[2], made[3], q_dot_km


# Key blocks per quantize_v program, at most (the next block's loads are in flight while a block
# is stored); bench/NOTES.md has the measured choice.
VQ_BLOCKS_PER_PROGRAM = 4


def _vq_grid(nk, H, B):
    """quantize_v's grid: up to VQ_BLOCKS_PER_PROGRAM key blocks a program while at least 8
    programs per multiprocessor remain (short sequences keep one block a program)."""
    sms = _device_limits(_cupy().cuda.Device().id)[2]
    per = max(1, min(VQ_BLOCKS_PER_PROGRAM, (nk * H * B) // (8 * sms)))
    return _grid(-(-nk // per), H, B)


def quantize_v(v, *, pv, nonfinite=None, amax=None):
    """V^T ``[B, Hkv, Dp, nk*BK]`` in e4m3 (keys permuted within each 32) or fp16, and ``dv``
    ``[B, Hkv, Dp]`` (FP8 only, else None). ``nonfinite``: a :func:`nonfinite_counter` to count
    the NaN / Inf of V into, or None. ``amax``: given channel maxima of |V|, float32
    ``[B, Hkv, Dp]`` (:attr:`Stats.v_amax`, at least V's own), or None to take V's."""
    cp = _cupy()
    B, Hkv, Lk, D = v.shape
    nk = -(-Lk // BK)
    T = ELEMENT_TYPES[v.dtype]
    fp8 = pv == "fp8"
    dv = None
    if fp8:
        if amax is None:
            amax = cp.zeros((B, Hkv, D), cp.float32)
            get_kernel("quant_v.cu", f"sparge::v_channel_amax<{T}, {D}>")(
                _grid(nk, Hkv, B), (THREADS,), (v.view(), amax, _I32(Hkv), _I32(Lk)))
        dv = cp.empty_like(amax)
    vt = cp.empty((B, Hkv, D, nk * BK), cp.uint8 if fp8 else cp.float16)
    kern = get_kernel("quant_v.cu", f"sparge::quantize_v<{T}, {'true' if fp8 else 'false'}, {D}>")
    kern(_vq_grid(nk, Hkv, B), (THREADS,),
         (v.view(), amax, vt, dv, _slot(nonfinite, 2), _I32(Hkv), _I32(Lk)))
    return vt, dv


# ---------------------------------------------------------------------------------------------
# Stage 1 selection.

def select_smem_bytes(nk):
    pow2 = 1 << max(0, int(nk - 1).bit_length())
    return pow2 * 8 + nk * 4 * 2 + nk, pow2


@functools.lru_cache(maxsize=None)
def _device_limits(device_id):
    """(compute capability as an int, shared memory per block after opt-in, multiprocessors)
    of a device."""
    cp = _cupy()
    dev = cp.cuda.Device(device_id)
    attr = cp.cuda.runtime.deviceGetAttribute
    return (int(dev.compute_capability),
            attr(cp.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id),
            attr(cp.cuda.runtime.cudaDevAttrMultiProcessorCount, device_id))


def _compute_capability():
    return _device_limits(_cupy().cuda.Device().id)[0]


def _set_smem(kern, nbytes, what):
    limit = _device_limits(_cupy().cuda.Device().id)[1]
    if nbytes > limit:
        raise ValueError(f"{what}: needs {nbytes} bytes of shared memory per block, "
                         f"the device allows {limit}")
    if nbytes > 48 * 1024 and kern.max_dynamic_shared_size_bytes < nbytes:
        kern.max_dynamic_shared_size_bytes = nbytes


MAP_TILE = 64                        # compressed_map's tile of query and key blocks (select.cu)
QK_ROWS, QK_KEYS = 64, 256          # qbar_keys_mma: pooled rows, keys per program (256 threads)
GM_WARPS = 8                         # group_mass_map: warps (a query block each) per program


def select_row_keys(nk):
    """Keys per lane of the warp-per-row selection (select_rows<E>) for rows of ``nk`` key
    blocks, or None where a row needs the block-per-row kernel (select_blocks)."""
    return next((e for e in SELECT_ROW_KEYS if nk <= 32 * e), None)


def estimate_logits(st, k=None, *, Lq, Lk, is_causal, scale, simthreshd1, predictor="paper"):
    """S^ ``[B, Hq, nq, nk]`` float32, the logits the selection takes the softmax of (-inf where
    a block is causally invalid or its K block not self-similar): the compressed map
    (``predictor="paper"``, from the pooled blocks), the qbar-keys estimate (``"qbar_keys"``,
    from the pooled Q against every key of ``k``, the K :class:`Operand`) or the query-group
    estimate (``"qgroup_keys"``: ``st.q_groups`` against every key, the groups' softmaxes
    averaged per query block)."""
    cp = _cupy()
    B, Hq, nq, D = st.qbar.shape
    Hkv, nk = st.k_sim.shape[1], st.k_sim.shape[2]
    theta = device_constant(simthreshd1)
    qbar = cp.ascontiguousarray(st.qbar)
    s_hat = cp.empty((B, Hq, nq, nk), dtype=cp.float32)
    if predictor in ("qbar_keys", "qgroup_keys"):
        G = BQ if predictor == "qbar_keys" else query_group()
        rows = qbar if G == BQ else st.q_groups
        nr = rows.shape[2]
        lse = s_hat if G == BQ else cp.empty((B, Hq, nr, nk), dtype=cp.float32)
        get_kernel("select.cu", f"sparge::qbar_keys_mma<{ELEMENT_TYPES[k.dtype]}, {D}>")(
            (-(-nr // QK_ROWS), -(-Lk // QK_KEYS), B * Hq), (256,), (_params(
                QBAR_KEYS_PARAMS, k=k.view(), qbar=rows, km=st.km, k_sim=st.k_sim, theta=theta,
                s_hat=lse, Hq=Hq, Hkv=Hkv, nq=nr, nk=nk, Lq=Lq, Lk=Lk, causal=int(is_causal),
                scale=scale, group=G),))
        if G != BQ:
            get_kernel("select.cu", "sparge::group_mass_map")(
                _grid(-(-nq // GM_WARPS), Hq, B), (32 * GM_WARPS,), (_params(
                    GROUP_MASS_PARAMS, lse=lse, k_sim=st.k_sim, theta=theta, s_hat=s_hat, Hq=Hq,
                    Hkv=Hkv, nq=nq, ng=nr, nk=nk, Lq=Lq, Lk=Lk, causal=int(is_causal), group=G),))
        return s_hat
    get_kernel("select.cu", "sparge::compressed_map")(
        (-(-nk // MAP_TILE), -(-nq // MAP_TILE), B * Hq), (THREADS,), (_params(
            MAP_PARAMS, qbar=qbar, kbar=cp.ascontiguousarray(st.kbar), k_sim=st.k_sim,
            theta=theta, s_hat=s_hat, Hq=Hq, Hkv=Hkv, nq=nq, nk=nk, D=D, Lq=Lq, Lk=Lk,
            causal=int(is_causal), scale=scale),))
    return s_hat


def select(st, k=None, *, Lq, Lk, is_causal, scale, simthreshd1, cdfthreshd, topk,
           attention_sink, mass_threshold=None, predictor="paper", s_hat=None, row_kernel="auto",
           local_window=False):
    """The bool block map ``[B, Hq, nq, nk]`` from the pooled statistics; exactly one of
    ``cdfthreshd``, ``topk``, ``mass_threshold`` is not None; ``local_window``: also keep each
    query block's own key blocks (``reference.local_blocks``). ``predictor``, ``k``: see
    :func:`estimate_logits`; ``s_hat``: its result, given (then neither is used).
    ``row_kernel``: ``"auto"`` (a warp per row where the row fits, :func:`select_row_keys`) or
    ``"block"`` (select_blocks always: the two give the same map, which the GPU tests check)."""
    cp = _cupy()
    B, Hq = (s_hat if s_hat is not None else st.q_sim).shape[:2]
    slices = batch_slices(B, Hq)
    if len(slices) > 1:
        part = dict(Lq=Lq, Lk=Lk, is_causal=is_causal, scale=scale, simthreshd1=simthreshd1,
                    cdfthreshd=cdfthreshd, topk=topk, attention_sink=attention_sink,
                    mass_threshold=mass_threshold, predictor=predictor, row_kernel=row_kernel,
                    local_window=local_window)
        return cp.concatenate([
            select(_batch_slice(st, b0, b1), _batch_slice(k, b0, b1),
                   s_hat=_batch_slice(s_hat, b0, b1), **part)
            for b0, b1 in slices])
    if s_hat is None:
        s_hat = estimate_logits(st, k, Lq=Lq, Lk=Lk, is_causal=is_causal, scale=scale,
                                simthreshd1=simthreshd1, predictor=predictor)
    B, Hq, nq, nk = s_hat.shape
    Hkv = st.k_sim.shape[1]
    theta, tau, kk, mt = (device_constant(x) for x in (simthreshd1, cdfthreshd, topk, mass_threshold))
    block_map = cp.empty((B, Hq, nq, nk), dtype=cp.bool_)
    smem, pow2 = select_smem_bytes(nk)
    params = (_params(
        SELECT_PARAMS, s_hat=s_hat, q_sim=st.q_sim, k_sim=st.k_sim, theta=theta, tau=tau,
        topk=kk, mass_threshold=mt, block_map=block_map, Hq=Hq, Hkv=Hkv, nq=nq, nk=nk, Lq=Lq,
        Lk=Lk, causal=int(is_causal), sink=int(attention_sink), local=int(local_window),
        nk_pow2=pow2),)
    e = select_row_keys(nk) if row_kernel == "auto" else None
    if e is not None:
        get_kernel("select.cu", f"sparge::select_rows<{e}>")(
            (-(-nq // (THREADS // 32)), Hq, B), (THREADS,), params)
        return block_map
    kern = get_kernel("select.cu", "sparge::select_blocks")
    _set_smem(kern, smem, f"k: {Lk} tokens ({nk} key blocks) in prediction")
    kern(_grid(nq, Hq, B), (THREADS,), params, shared_mem=smem)
    return block_map


# ---------------------------------------------------------------------------------------------
# The attention kernel.

# Shared memory one CTA of the wgmma kernel may have (sm_90: 227 KB after opt-in); mirrors
# WG_SMEM_MAX in cuda/sparse_attn.cu.
WG_SMEM_MAX = 227 * 1024


# The kept-block list's limit: int16 entries and the end marker (cuda/sparse_attn.cu).
WG_MAP_LIST_MAX = 32766
# Shared memory of an sm_90 SM, what it reserves per CTA, and room for sparse_attn_wg's static
# shared memory (barriers, the warps' flags and counts, D = 256's V scales: under 1.2 KB).
SM90_SMEM, CTA_RESERVED, WG_STATIC_SMEM = 228 * 1024, 1024, 2048


def _wg_tiles(D, qk, pv, overlap_dims=None):
    """sparse_attn_wg's tiles: Q and two stages of K and V (three where it overlaps: D in
    overlap_dims, default _compile.wg_overlap_dims(), and three fit in WG_SMEM_MAX), and 1 KB for
    aligning them."""
    qe, ve = (1 if qk == "int8" else 2), (1 if pv == "fp8" else 2)
    stage = BK * D * qe + D * BK * ve
    three = 1024 + BQ * D * qe + 3 * stage
    overlap = D in (wg_overlap_dims() if overlap_dims is None else overlap_dims)
    return three if overlap and three <= WG_SMEM_MAX else three - stage


def _map_list_bytes(nk):
    return -(-2 * (nk + 1) // 16) * 16          # int16, nk + 1 entries, 16-byte rounded


def _ctas_per_sm(D, smem):
    """CTAs of sparse_attn_wg an SM holds: its launch bound (WgOccupancy: SPARGE_WG_MIN_BLOCKS,
    default 2, at D <= 128; 1 at D = 256), or fewer where their shared memory does not fit."""
    bound = (attn_define("SPARGE_WG_MIN_BLOCKS") or 2) if D <= 128 else 1
    return min(bound, SM90_SMEM // (smem + WG_STATIC_SMEM + CTA_RESERVED))


def wg_map_list(D, qk, pv, nk, overlap_dims=None):
    """Whether sparse_attn_wg reads the kept key blocks from a list in shared memory (its LIST):
    where _compile.wg_map_list_on(), the list's int16 entries hold ``nk`` (WG_MAP_LIST_MAX) and
    its bytes cost no CTA per SM; else it scans the map row (MapScan)."""
    if not wg_map_list_on() or nk > WG_MAP_LIST_MAX:
        return False
    tiles = _wg_tiles(D, qk, pv, overlap_dims)
    return _ctas_per_sm(D, tiles + _map_list_bytes(nk)) >= _ctas_per_sm(D, tiles)


def attn_smem_bytes(D, qk, pv, kernel="mma", overlap_dims=None, nk=0, map_list=False):
    """Dynamic shared memory of the attention kernel (sparse_attn.cu): Q and K/V tiles; the
    wgmma kernel's (_wg_tiles) and, with ``map_list`` (its LIST: wg_map_list), the list of up
    to ``nk`` kept key blocks and its end marker."""
    if kernel == "wgmma":
        tiles = _wg_tiles(D, qk, pv, overlap_dims)
        if map_list:
            if nk > WG_MAP_LIST_MAX:
                raise ValueError(f"k: the kept-block list takes at most {WG_MAP_LIST_MAX} key blocks "
                                 f"({WG_MAP_LIST_MAX * BK} tokens), got {nk}")
            tiles += _map_list_bytes(nk)
        return tiles
    qe, ve = (1 if qk == "int8" else 2), (1 if pv == "fp8" else 2)
    return (BQ + BK) * (D * qe + 16) + D * (BK * ve + 16)


@functools.lru_cache(maxsize=None)
def _encode_tiled():
    """The driver's cuTensorMapEncodeTiled (CUDA 12.0 and newer), through ctypes."""
    import ctypes
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p,
                   u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_TMA_SWIZZLE = {64: 2, 128: 3}      # CU_TENSOR_MAP_SWIZZLE_64B, _128B
_TMA_UINT8, _TMA_L2_256B = 0, 3      # CU_TENSOR_MAP_DATA_TYPE_UINT8, CU_TENSOR_MAP_L2_PROMOTION_L2_256B


def _tensor_map(out, array, row_bytes, box_bytes, box_rows):
    """Write into ``out`` (128 bytes) the tensor map of ``array`` seen as a 2D byte tensor of
    rows of ``row_bytes`` bytes, with a box of ``box_rows`` rows x ``box_bytes`` bytes swizzled
    by ``box_bytes`` (the wgmma tile image of sparse_attn.cu)."""
    import ctypes
    rows = array.nbytes // row_bytes
    if rows >= 2 ** 31:
        raise ValueError(f"inputs too large for the attention kernel's tensor maps: {rows} rows "
                         f"of {row_bytes} bytes (at most 2**31 - 1)")
    c64, c32 = ctypes.c_uint64, ctypes.c_uint32
    buf = np.zeros(128 + 64, np.uint8)                  # CUtensorMap is 64-byte aligned
    at = (-buf.ctypes.data) % 64
    err = _encode_tiled()(
        ctypes.c_void_p(buf.ctypes.data + at), _TMA_UINT8, 2, ctypes.c_void_p(array.data.ptr),
        (c64 * 2)(row_bytes, rows), (c64 * 1)(row_bytes), (c32 * 2)(box_bytes, box_rows),
        (c32 * 2)(1, 1), 0, _TMA_SWIZZLE[box_bytes], _TMA_L2_256B, 0)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {err}")
    out[:] = buf[at:at + 128]


def wg_tensor_maps(qz, D, qk, pv):
    """sparse_attn_wg's WgMaps: Q [B Hq nq BQ, D qe], K [B Hkv nk BK, D qe] in boxes of one
    128-byte (or narrower) column panel of a tile, V^T [B Hkv D, nk BK ve] in boxes of one tile."""
    qrb, vrb = D * (1 if qk == "int8" else 2), BK * (1 if pv == "fp8" else 2)
    panel = min(qrb, 128)
    maps = np.zeros(1, dtype=WG_MAPS)
    _tensor_map(maps["q"][0], qz.q_op, qrb, panel, BQ)
    _tensor_map(maps["k"][0], qz.k_op, qrb, panel, BK)
    _tensor_map(maps["vt"][0], qz.vt, qz.vt.shape[-1] * qz.vt.itemsize, vrb, D)
    return maps.tobytes()


def attn_kernel_choice(cc=None):
    """Which attention kernel runs: ``"wgmma"`` on compute capability 9.0 (Hopper, sm_90a), else
    ``"mma"`` (mma.sync). ``SPARGE_ATTN_KERNEL=mma`` forces the portable kernel everywhere."""
    forced = os.environ.get("SPARGE_ATTN_KERNEL", "auto")
    if forced not in ("auto",) + ATTN_KERNELS:
        raise ValueError(f"SPARGE_ATTN_KERNEL: expected one of auto, {', '.join(ATTN_KERNELS)}, "
                         f"got {forced!r}")
    cc = _compute_capability() if cc is None else int(cc)
    if forced == "wgmma" and cc != 90:
        raise ValueError(f"SPARGE_ATTN_KERNEL=wgmma needs compute capability 9.0, got {cc}")
    if forced != "auto":
        return forced
    return "wgmma" if cc == 90 else "mma"


def _output(q, out):
    """The output array (user layout, input dtype, true head dim), allocated if not given."""
    cp = _cupy()
    shape = q.array.shape[:3] + (q.D,)
    storage = cp.uint16 if q.dtype == "bfloat16" else cp.dtype(q.dtype)
    if out is None:
        return cp.empty(shape, dtype=storage)
    if tuple(out.shape) != shape or out.dtype != storage or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a C-contiguous {storage} array of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


@dataclass
class Quantized:
    """The operands of the attention kernel (quantize_qk, quantize_v)."""
    q_op: object
    dq: object
    k_op: object
    dk: object
    q_dot_km: object         # None unless the LSE is asked for
    vt: object
    dv: object               # None for pv="fp16"


def quantize_operands(q, k, v, st, *, qk, rebalance, pv, with_q_dot_km, nonfinite=None):
    if pv == "fp8" and _compute_capability() < 89:
        raise ValueError("pv: 'fp8' needs compute capability 8.9 or newer (e4m3 tensor cores); "
                         "use pv='fp16' on this GPU")
    q_op, dq, k_op, dk, q_dot_km = quantize_qk(q, k, st, qk=qk, rebalance=rebalance,
                                               with_q_dot_km=with_q_dot_km)
    vt, dv = quantize_v(v, pv=pv, nonfinite=nonfinite, amax=st.v_amax)
    return Quantized(q_op, dq, k_op, dk, q_dot_km, vt, dv)


def run_attention(q, k, qz, block_map, **options):
    """The attention kernel alone, on prepared operands; ``q``, ``k`` give the shapes."""
    return prepare_attention(q, k, qz, block_map, **options)()


def prepare_attention(q, k, qz, block_map, *, is_causal, scale, pvthreshd, qk, pv, return_lse,
                      return_stats, out=None):
    """Everything the attention launch needs on the host (outputs, parameter struct, tensor
    maps), done before the launch: returns ``launch()``, which launches the kernel and returns
    what :func:`run_attention` returns. :func:`_attend` prepares while the quantization kernels
    run and reads the non-finite counter only then, so that the GPU waits for the launch alone."""
    cp = _cupy()
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    nq, nk = -(-Lq // BQ), -(-Lk // BK)
    out = _output(q, out)
    lse = cp.empty((B, Hq, Lq), cp.float32) if return_lse else None
    counts = cp.zeros((B, Hq, nq, 2), cp.int32) if return_stats else None
    block_map = cp.ascontiguousarray(block_map)
    lam = device_constant(pvthreshd)
    ost = [s // out.itemsize for s in out.strides]
    sb, sh, stt = (ost[0], ost[1], ost[2]) if q.layout == "HND" else (ost[0], ost[2], ost[1])

    which = attn_kernel_choice()
    lst = which == "wgmma" and wg_map_list(D, qk, pv, nk)
    kern = get_kernel("sparse_attn.cu", attn_name(D, qk, pv, q.dtype, which, lst))
    smem = attn_smem_bytes(D, qk, pv, which, nk=nk, map_list=lst)
    _set_smem(kern, smem, f"q: head dim {q.D} with qk={qk!r}, pv={pv!r}")
    params = (_params(
        ATTN_PARAMS, q=qz.q_op, k=qz.k_op, vt=qz.vt, dq=qz.dq, dk=qz.dk, dv=qz.dv,
        block_map=block_map, pvthreshd=lam, q_dot_km=qz.q_dot_km, out=out, lse=lse,
        group_counts=counts, out_stride_b=sb, out_stride_h=sh, out_stride_t=stt, Hq=Hq, Hkv=Hkv,
        Lq=Lq, Lk=Lk, nq=nq, nk=nk, d_out=q.D, causal=int(is_causal), scale=scale),)
    if which == "wgmma":
        params += (wg_tensor_maps(qz, D, qk, pv),)

    def launch():
        kern(_grid(nq, Hq, B), (THREADS,), params, shared_mem=smem)
        results = [out]
        if return_lse:
            results.append(lse)
        if return_stats:
            results.append(_stats(block_map, counts, pvthreshd, Lq=Lq, Lk=Lk, is_causal=is_causal))
        return results[0] if len(results) == 1 else tuple(results)
    return launch


def _stats(block_map, counts, pvthreshd, *, Lq, Lk, is_causal):
    """The reference's stats dict (reference.stats.sparsity_stats) from the kernel's counts, the
    causal mask's skips (reference.mask_skips) taken out where the filter is on."""
    from .reference import filter_skips, sparsity_stats, valid_blocks
    G = CONFIG.pv_group_rows
    valid = valid_blocks(Lq, Lk, BQ, BK, is_causal)
    visit = block_map.get() & valid
    c = counts.get()
    lam = pvthreshd.get() if hasattr(pvthreshd, "get") else pvthreshd
    skipped = filter_skips(c[..., 1], visit, Lq, Lk, is_causal, lam, G)
    return sparsity_stats(visit, valid, c[..., 0], skipped, Lq, G)


# ---------------------------------------------------------------------------------------------
# The entry points called by api.py (and, through operand(), by the torch adapter).

def _as_operands(layout, *arrays):
    return [a if isinstance(a, Operand) else operand(a, layout) for a in arrays]


def _whole_batch(n_operands, *, returns_map=False):
    """An entry point ``fn(q, k[, v][, block_map], *, **options)`` made callable on whole
    inputs, ``fn(..., layout=..., **options)``: its first ``n_operands`` arguments made
    :class:`Operand` (``layout``), and where the batch's (entry, head) pairs exceed
    :data:`MAX_GRID_YZ`, ``fn`` run slice by slice (:func:`batch_slices`): the block maps
    concatenated (``returns_map``) or the attention written into one output
    (:func:`_in_batch_slices`), after one non-finite check over the whole inputs."""
    def wrap(fn):
        @functools.wraps(fn)
        def entry(*args, layout, **options):
            ops = _as_operands(layout, *args[:n_operands])
            rest = args[n_operands:]
            slices = batch_slices(*ops[0].shape[:2])
            if len(slices) == 1:
                return fn(*ops, *rest, **options)
            if not returns_map:
                return _in_batch_slices(fn, slices, ops, *rest, **options)
            _check_finite_operands(**dict(zip("qkv", ops)))
            return _cupy().concatenate([fn(*(_batch_slice(x, b0, b1) for x in ops), **options)
                                        for b0, b1 in slices])
        return entry
    return wrap


@_whole_batch(2, returns_map=True)
def predict_block_map(q, k, *, is_causal, scale, simthreshd1, cdfthreshd, topk, attention_sink,
                      mass_threshold=None, predictor="paper", local_window=False):
    counter = nonfinite_counter()
    st = block_statistics(q, k, pooled=True, nonfinite=counter, q_groups=predictor == "qgroup_keys")
    block_map = select(st, k, Lq=q.shape[2], Lk=k.shape[2], is_causal=is_causal, scale=scale,
                       simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
                       mass_threshold=mass_threshold, attention_sink=attention_sink,
                       predictor=predictor, local_window=local_window)
    check_counter(counter, q=q, k=k)
    return block_map


def _attend(q, k, v, block_map, st, counter, *, qk, rebalance, pv, return_lse, **options):
    """Quantization and the attention kernel on operands whose Q and K statistics are done, with
    the call's one non-finite check (``counter`` holds Q's and K's counts; quantize_v adds V's)
    between them: a bad input raises before the attention runs, and the host waits only for the
    short passes, not for the attention, so that it queues the next work while the attention
    runs. The launch is prepared before the wait (prepare_attention)."""
    qz = quantize_operands(q, k, v, st, qk=qk, rebalance=rebalance, pv=pv,
                           with_q_dot_km=return_lse, nonfinite=counter)
    launch = prepare_attention(q, k, qz, block_map, qk=qk, pv=pv, return_lse=return_lse, **options)
    check_counter(counter, q=q, k=k, v=v)
    if qk == "fp16":
        _check_fp16_operands(st, rebalance)
    return launch()


def _check_fp16_operands(st, rebalance):
    """reference.check_fp16_operands from the head statistics: the largest rebalanced |Q| is
    max fl(q_amax s_c) and the largest smoothed |K| max fl(k_amax / s_c), since the kernels'
    x -> fl(x s_c) and fl(x / s_c) are monotone (one small reduction and a host read)."""
    cp = _cupy()
    from .reference import check_fp16_operands
    q_max, k_max = (st.q_amax * st.s_c, st.k_amax / st.s_c) if rebalance else (st.q_amax, st.k_amax)
    check_fp16_operands(*(float(x) for x in cp.stack([q_max.max(), k_max.max()]).get()))


@_whole_batch(3)
def block_sparse_attn(q, k, v, block_map, *, is_causal, scale, pvthreshd, qk, rebalance, pv,
                      return_lse, return_stats, out=None, quant_stats=None):
    """``quant_stats``: see :func:`block_statistics` (private: the ring's partials)."""
    counter = nonfinite_counter()
    st = block_statistics(q, k, pooled=False, nonfinite=counter, quant_stats=quant_stats)
    return _attend(q, k, v, block_map, st, counter, is_causal=is_causal, scale=scale,
                   pvthreshd=pvthreshd, qk=qk, rebalance=rebalance, pv=pv,
                   return_lse=return_lse, return_stats=return_stats, out=out)


@_whole_batch(3)
def sparge_attn(q, k, v, *, is_causal, scale, simthreshd1, cdfthreshd, topk, attention_sink,
                pvthreshd, qk, rebalance, pv, return_lse, return_stats, out=None,
                mass_threshold=None, predictor="paper", local_window=False):
    """Prediction and attention sharing the statistics of Q and K; the pass that pools K - km
    also writes the K operand."""
    counter = nonfinite_counter()
    st = block_statistics(q, k, pooled=True, nonfinite=counter, k_operand=(qk, rebalance),
                          q_groups=predictor == "qgroup_keys")
    block_map = select(st, k, Lq=q.shape[2], Lk=k.shape[2], is_causal=is_causal, scale=scale,
                       simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
                       mass_threshold=mass_threshold, attention_sink=attention_sink,
                       predictor=predictor, local_window=local_window)
    return _attend(q, k, v, block_map, st, counter, is_causal=is_causal, scale=scale,
                   pvthreshd=pvthreshd, qk=qk, rebalance=rebalance, pv=pv,
                   return_lse=return_lse, return_stats=return_stats, out=out)
