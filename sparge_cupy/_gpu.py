"""Launch code for CuPy arrays: the GPU half of :mod:`sparge_cupy.api`.

``api.py`` validates every input and then calls :func:`predict_block_map`,
:func:`block_sparse_attn` or :func:`sparge_attn` here, with thresholds already per-head float32
NumPy arrays and ``scale`` a Python float. The torch adapter calls the same functions through
:func:`operand` (which also knows bf16, CuPy-side uint16 storage).

The pipeline (one launch per line; kernels in ``cuda/``):

    k_block_sums, k_mean          K mean per (b, kv head)                      block_stats.cu
    block_stats(Q), (K - km)      pooled rows, similarity, channel maxima      block_stats.cu
    select_blocks                 compressed map -> bool block map             select.cu
    quantize(Q), quantize(K)      rebalanced INT8 (or fp16) operands, scales   block_stats.cu
    v_channel_amax, quantize_v    V^T in e4m3 (or fp16), dv                    quant_v.cu
    sparse_attn[_wg]              the attention loop and Stage 2               sparse_attn.cu
                                  (_wg: warpgroup MMAs, compute capability 9.0; see attn_kernel_choice)

Ring attention's partials (:mod:`sparge_cupy.distributed`) pass the whole sequence's K mean and
channel maxima (``quant_stats``, a :class:`reference.QuantStats`): k_block_sums, k_mean and
v_channel_amax are then skipped, and the kernels read the given arrays through the same pointers.

Non-finite inputs are detected on the way: k_block_sums (block_stats of K when the K mean is
given), block_stats (Q) and quantize_v count the NaN / Inf of K, Q and V into a three-element
device counter, and each entry point reads it once, at its end, raising the API's ValueError
(whatever the kernels computed from such inputs is discarded; they still terminate).

Head dims other than 64, 128, 256 are zero-padded here to the next of them (exact: zero channels
add nothing to any dot product, maximum or similarity); the kernels use the caller's scale and
write only the true channels.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from . import _checks as ck
from ._compile import ATTN_KERNELS, ELEMENT_TYPES, HEAD_DIMS, attn_name, get_kernel
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
BLOCK_STATS_PARAMS = _struct([
    ("x", TENSOR_VIEW), ("km", _PTR), ("pooled", _PTR), ("sim", _PTR), ("block_amax", _PTR),
    ("head_amax", _PTR), ("nonfinite", _PTR), ("H", _I32), ("L", _I32), ("block", _I32),
    ("heads_per_kv", _I32), ("sim_eps", _F64)])
QUANTIZE_PARAMS = _struct([
    ("x", TENSOR_VIEW), ("km", _PTR), ("amax_q", _PTR), ("amax_k", _PTR), ("block_amax", _PTR),
    ("out", _PTR), ("delta", _PTR), ("q_dot_km", _PTR), ("H", _I32), ("L", _I32),
    ("block", _I32), ("heads_per_kv", _I32), ("is_key", _I32)])
SELECT_PARAMS = _struct([
    ("qbar", _PTR), ("q_sim", _PTR), ("kbar", _PTR), ("k_sim", _PTR), ("theta", _PTR),
    ("tau", _PTR), ("topk", _PTR), ("mass_threshold", _PTR), ("block_map", _PTR), ("Hq", _I32),
    ("Hkv", _I32), ("nq", _I32), ("nk", _I32), ("D", _I32), ("Lq", _I32), ("Lk", _I32),
    ("causal", _I32), ("sink", _I32), ("nk_pow2", _I32), ("scale", _F32)])
ATTN_PARAMS = _struct([
    ("q", _PTR), ("k", _PTR), ("vt", _PTR), ("dq", _PTR), ("dk", _PTR), ("dv", _PTR),
    ("block_map", _PTR), ("pvthreshd", _PTR), ("q_dot_km", _PTR), ("out", _PTR), ("lse", _PTR),
    ("group_counts", _PTR), ("out_stride_b", _I64), ("out_stride_h", _I64), ("out_stride_t", _I64),
    ("Hq", _I32), ("Hkv", _I32), ("Lq", _I32), ("Lk", _I32), ("nq", _I32), ("nk", _I32),
    ("d_out", _I32), ("causal", _I32), ("scale", _F32)])
STRUCTS = {"TensorView": TENSOR_VIEW, "BlockStatsParams": BLOCK_STATS_PARAMS,
           "QuantizeParams": QUANTIZE_PARAMS, "SelectParams": SELECT_PARAMS,
           "AttnParams": ATTN_PARAMS}


def _params(dtype, **fields):
    """A one-element struct array (CuPy passes it by value); arrays become device pointers."""
    rec = np.zeros(1, dtype=dtype)
    for name, value in fields.items():
        rec[name] = _ptr(value) if dtype[name] == _PTR else value
    return rec


def _ptr(x):
    return 0 if x is None else int(x.data.ptr)


def _cupy():
    import cupy
    return cupy


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
    """Per-block statistics of Q and smoothed K (block_stats.cu), on the device."""
    km: object               # [B, Hkv, Dp] K mean
    q_amax: object           # [B, Hkv, Dp] channel max |Q| over the heads sharing a kv head
    k_amax: object           # [B, Hkv, Dp] channel max |K - km|
    q_block_amax: object     # [B, Hq, nq, Dp]
    k_block_amax: object     # [B, Hkv, nk, Dp]
    qbar: object = None      # [B, Hq, nq, Dp] pooled Q (prediction only)
    q_sim: object = None     # [B, Hq, nq]
    kbar: object = None      # [B, Hkv, nk, Dp] pooled smoothed K
    k_sim: object = None     # [B, Hkv, nk]
    v_amax: object = None    # [B, Hkv, Dp] given channel max |V|, or None: quantize_v's own


def _grid(nb, H, B):
    return (int(nb), int(H), int(B))


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


def block_statistics(q, k, *, pooled, nonfinite=None, quant_stats=None):
    """K mean, channel maxima and (with ``pooled``) pooled blocks and similarities of Q and K.

    ``nonfinite``: a :func:`nonfinite_counter` to count the NaN / Inf of Q and K into, or None.
    ``quant_stats``: a :class:`reference.QuantStats` of CuPy ``[B, Hkv, D]`` arrays (ring
    attention: the whole sequence's). A given ``km`` replaces the K mean (K is then smoothed with
    it, and its NaN / Inf counted by block_stats instead of k_block_sums); given maxima replace
    ``q_amax``, ``k_amax`` (the kernel's own atomic maxima go to scratch) and fill ``v_amax``.
    The per-block maxima stay those of q and k."""
    cp = _cupy()
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    nq, nk = -(-Lq // BQ), -(-Lk // BK)
    f32 = cp.float32
    T = ELEMENT_TYPES[q.dtype]
    given = {f: _given_channels(getattr(quant_stats, f, None), D)
             for f in ("km", "q_amax", "k_amax", "v_amax")}

    km, k_count = given["km"], _slot(nonfinite, 1)
    if km is None:                # K's NaN / Inf counted here, not again by block_stats
        sums = cp.empty((B, Hkv, nk, D), dtype=cp.float64)
        get_kernel("block_stats.cu", f"sparge::k_block_sums<{T}, {D}>")(
            _grid(nk, Hkv, B), (THREADS,), (k.view(), sums, k_count, _I32(Hkv), _I32(Lk)))
        km, k_count = cp.empty((B, Hkv, D), dtype=f32), None
        get_kernel("block_stats.cu", "sparge::k_mean")(
            (Hkv, B), (D,), (sums, km, _I32(Hkv), _I32(Lk), _I32(D)))

    st = Stats(km=km, q_amax=cp.zeros((B, Hkv, D), f32), k_amax=cp.zeros((B, Hkv, D), f32),
               q_block_amax=cp.empty((B, Hq, nq, D), f32), k_block_amax=cp.empty((B, Hkv, nk, D), f32))
    if pooled:
        st.qbar, st.q_sim = cp.empty((B, Hq, nq, D), f32), cp.empty((B, Hq, nq), f32)
        st.kbar, st.k_sim = cp.empty((B, Hkv, nk, D), f32), cp.empty((B, Hkv, nk), f32)
    kern = get_kernel("block_stats.cu", f"sparge::block_stats<{T}, {D}>")
    for x, km_, bar, sim, bamax, amax, H, L, block, hpk, nb, count in (
            (q, None, st.qbar, st.q_sim, st.q_block_amax, st.q_amax, Hq, Lq, BQ, Hq // Hkv, nq,
             _slot(nonfinite, 0)),
            (k, km, st.kbar, st.k_sim, st.k_block_amax, st.k_amax, Hkv, Lk, BK, 1, nk, k_count)):
        kern(_grid(nb, H, B), (THREADS,), (_params(
            BLOCK_STATS_PARAMS, x=x.view(), km=km_, pooled=bar, sim=sim, block_amax=bamax,
            head_amax=amax, nonfinite=count, H=H, L=L, block=block, heads_per_kv=hpk,
            sim_eps=CONFIG.sim_eps),))
    for f in ("q_amax", "k_amax", "v_amax"):
        if given[f] is not None:
            setattr(st, f, given[f])
    return st


def quantize_qk(q, k, st, *, qk, rebalance, with_q_dot_km):
    """INT8 (or fp16) rebalanced Q and smoothed K with their per-block scales.

    Returns ``(q_op [B,Hq,nq*BQ,Dp], dq [B,Hq,nq], k_op [B,Hkv,nk*BK,Dp], dk [B,Hkv,nk],
    q_dot_km [B,Hq,Lq] or None)``.
    """
    cp = _cupy()
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    nq, nk = -(-Lq // BQ), -(-Lk // BK)
    out_t, out_dtype = ("signed char", cp.int8) if qk == "int8" else ("__half", cp.float16)
    kern = get_kernel("block_stats.cu", f"sparge::quantize<{ELEMENT_TYPES[q.dtype]}, {out_t}, {D}>")
    q_op, dq = cp.empty((B, Hq, nq * BQ, D), out_dtype), cp.empty((B, Hq, nq), cp.float32)
    k_op, dk = cp.empty((B, Hkv, nk * BK, D), out_dtype), cp.empty((B, Hkv, nk), cp.float32)
    q_dot_km = cp.empty((B, Hq, Lq), cp.float32) if with_q_dot_km else None
    amax_q, amax_k = (st.q_amax, st.k_amax) if rebalance else (None, None)
    kern(_grid(nq, Hq, B), (THREADS,), (_params(
        QUANTIZE_PARAMS, x=q.view(), km=st.km if with_q_dot_km else None, amax_q=amax_q,
        amax_k=amax_k, block_amax=st.q_block_amax, out=q_op, delta=dq, q_dot_km=q_dot_km,
        H=Hq, L=Lq, block=BQ, heads_per_kv=Hq // Hkv, is_key=0),))
    kern(_grid(nk, Hkv, B), (THREADS,), (_params(
        QUANTIZE_PARAMS, x=k.view(), km=st.km, amax_q=amax_q, amax_k=amax_k,
        block_amax=st.k_block_amax, out=k_op, delta=dk, q_dot_km=None,
        H=Hkv, L=Lk, block=BK, heads_per_kv=1, is_key=1),))
    return q_op, dq, k_op, dk, q_dot_km


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
    if amax is None:
        amax = cp.zeros((B, Hkv, D), cp.float32)
        if fp8:
            get_kernel("quant_v.cu", f"sparge::v_channel_amax<{T}, {D}>")(
                _grid(nk, Hkv, B), (THREADS,), (v.view(), amax, _I32(Hkv), _I32(Lk)))
    if fp8:
        dv = cp.empty_like(amax)
        get_kernel("quant_v.cu", "sparge::v_scales")(
            (-(-amax.size // THREADS),), (THREADS,), (amax, dv, _I32(amax.size)))
    vt = cp.empty((B, Hkv, D, nk * BK), cp.uint8 if fp8 else cp.float16)
    kern = get_kernel("quant_v.cu", f"sparge::quantize_v<{T}, {'true' if fp8 else 'false'}, {D}>")
    kern(_grid(nk, Hkv, B), (THREADS,),
         (v.view(), amax, vt, _slot(nonfinite, 2), _I32(Hkv), _I32(Lk)))
    return vt, dv


# ---------------------------------------------------------------------------------------------
# Stage 1 selection.

def select_smem_bytes(nk):
    pow2 = 1 << max(0, int(nk - 1).bit_length())
    return pow2 * 8 + nk * 4 * 2 + nk, pow2


@functools.lru_cache(maxsize=None)
def _device_limits(device_id):
    """(compute capability as an int, shared memory per block after opt-in) of a device."""
    cp = _cupy()
    dev = cp.cuda.Device(device_id)
    return int(dev.compute_capability), cp.cuda.runtime.deviceGetAttribute(
        cp.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id)


def _compute_capability():
    return _device_limits(_cupy().cuda.Device().id)[0]


def _set_smem(kern, nbytes, what):
    limit = _device_limits(_cupy().cuda.Device().id)[1]
    if nbytes > limit:
        raise ValueError(f"{what}: needs {nbytes} bytes of shared memory per block, "
                         f"the device allows {limit}")
    if nbytes > 48 * 1024 and kern.max_dynamic_shared_size_bytes < nbytes:
        kern.max_dynamic_shared_size_bytes = nbytes


def select(st, *, Lq, Lk, is_causal, scale, simthreshd1, cdfthreshd, topk, attention_sink,
           mass_threshold=None):
    """The bool block map ``[B, Hq, nq, nk]`` from the pooled statistics; exactly one of
    ``cdfthreshd``, ``topk``, ``mass_threshold`` is not None."""
    cp = _cupy()
    B, Hq, nq, D = st.qbar.shape
    Hkv, nk = st.kbar.shape[1], st.kbar.shape[2]
    theta, tau, kk, mt = (None if x is None else cp.asarray(x, dtype=cp.float32)
                          for x in (simthreshd1, cdfthreshd, topk, mass_threshold))
    block_map = cp.empty((B, Hq, nq, nk), dtype=cp.bool_)
    smem, pow2 = select_smem_bytes(nk)
    kern = get_kernel("select.cu", "sparge::select_blocks")
    _set_smem(kern, smem, f"k: {Lk} tokens ({nk} key blocks) in prediction")
    kern(_grid(nq, Hq, B), (THREADS,), (_params(
        SELECT_PARAMS, qbar=st.qbar, q_sim=st.q_sim, kbar=st.kbar, k_sim=st.k_sim, theta=theta,
        tau=tau, topk=kk, mass_threshold=mt, block_map=block_map, Hq=Hq, Hkv=Hkv, nq=nq, nk=nk,
        D=D, Lq=Lq, Lk=Lk, causal=int(is_causal), sink=int(attention_sink), nk_pow2=pow2, scale=scale),),
        shared_mem=smem)
    return block_map


# ---------------------------------------------------------------------------------------------
# The attention kernel.

def attn_smem_bytes(D, qk, pv, kernel="mma"):
    """Dynamic shared memory of the attention kernel (sparse_attn.cu): Q and K/V tiles; the
    wgmma kernel keeps two stages of K and V and 1 KB for aligning its swizzled tiles."""
    qe, ve = (1 if qk == "int8" else 2), (1 if pv == "fp8" else 2)
    if kernel == "wgmma":
        return 1024 + BQ * D * qe + 2 * (BK * D * qe + D * BK * ve)
    return (BQ + BK) * (D * qe + 16) + D * (BK * ve + 16)


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


def run_attention(q, k, qz, block_map, *, is_causal, scale, pvthreshd, qk, pv, return_lse,
                  return_stats, out=None):
    """The attention kernel alone, on prepared operands; ``q``, ``k`` give the shapes."""
    cp = _cupy()
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    nq, nk = -(-Lq // BQ), -(-Lk // BK)
    out = _output(q, out)
    lse = cp.empty((B, Hq, Lq), cp.float32) if return_lse else None
    counts = cp.zeros((B, Hq, nq, 2), cp.int32) if return_stats else None
    block_map = cp.ascontiguousarray(block_map)
    lam = cp.asarray(pvthreshd, dtype=cp.float32)
    ost = [s // out.itemsize for s in out.strides]
    sb, sh, stt = (ost[0], ost[1], ost[2]) if q.layout == "HND" else (ost[0], ost[2], ost[1])

    which = attn_kernel_choice()
    kern = get_kernel("sparse_attn.cu", attn_name(D, qk, pv, q.dtype, which))
    smem = attn_smem_bytes(D, qk, pv, which)
    _set_smem(kern, smem, f"q: head dim {q.D} with qk={qk!r}, pv={pv!r}")
    kern(_grid(nq, Hq, B), (THREADS,), (_params(
        ATTN_PARAMS, q=qz.q_op, k=qz.k_op, vt=qz.vt, dq=qz.dq, dk=qz.dk, dv=qz.dv,
        block_map=block_map, pvthreshd=lam, q_dot_km=qz.q_dot_km, out=out, lse=lse,
        group_counts=counts, out_stride_b=sb, out_stride_h=sh, out_stride_t=stt, Hq=Hq, Hkv=Hkv,
        Lq=Lq, Lk=Lk, nq=nq, nk=nk, d_out=q.D, causal=int(is_causal), scale=scale),),
        shared_mem=smem)

    results = [out]
    if return_lse:
        results.append(lse)
    if return_stats:
        results.append(_stats(block_map, counts, Lq=Lq, Lk=Lk, is_causal=is_causal))
    return results[0] if len(results) == 1 else tuple(results)


def attention(q, k, v, block_map, *, st, is_causal, scale, pvthreshd, qk, rebalance, pv,
              return_lse, return_stats, out=None, nonfinite=None):
    qz = quantize_operands(q, k, v, st, qk=qk, rebalance=rebalance, pv=pv,
                           with_q_dot_km=return_lse, nonfinite=nonfinite)
    return run_attention(q, k, qz, block_map, is_causal=is_causal, scale=scale,
                         pvthreshd=pvthreshd, qk=qk, pv=pv, return_lse=return_lse,
                         return_stats=return_stats, out=out)


def _stats(block_map, counts, *, Lq, Lk, is_causal):
    """The reference's stats dict (reference.stats.sparsity_stats) from the kernel's counts."""
    from .reference import sparsity_stats, valid_blocks
    valid = valid_blocks(Lq, Lk, BQ, BK, is_causal)
    visit = block_map.get() & valid
    c = counts.get()
    return sparsity_stats(visit, valid, c[..., 0], c[..., 1], Lq, CONFIG.pv_group_rows)


# ---------------------------------------------------------------------------------------------
# The entry points called by api.py (and, through operand(), by the torch adapter).

def _as_operands(layout, *arrays):
    return [a if isinstance(a, Operand) else operand(a, layout) for a in arrays]


def predict_block_map(q, k, *, is_causal, scale, layout, simthreshd1, cdfthreshd, topk,
                      attention_sink, mass_threshold=None):
    q, k = _as_operands(layout, q, k)
    counter = nonfinite_counter()
    st = block_statistics(q, k, pooled=True, nonfinite=counter)
    block_map = select(st, Lq=q.shape[2], Lk=k.shape[2], is_causal=is_causal, scale=scale,
                       simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
                       mass_threshold=mass_threshold, attention_sink=attention_sink)
    check_counter(counter, q=q, k=k)
    return block_map


def _attend(q, k, v, block_map, st, counter, **options):
    """:func:`attention` on operands whose Q and K statistics are done, then the call's one
    non-finite check (``counter`` holds Q's and K's counts; quantize_v adds V's)."""
    result = attention(q, k, v, block_map, st=st, nonfinite=counter, **options)
    check_counter(counter, q=q, k=k, v=v)
    return result


def block_sparse_attn(q, k, v, block_map, *, is_causal, scale, layout, pvthreshd, qk, rebalance,
                      pv, return_lse, return_stats, out=None, quant_stats=None):
    """``quant_stats``: see :func:`block_statistics` (private: the ring's partials)."""
    q, k, v = _as_operands(layout, q, k, v)
    counter = nonfinite_counter()
    st = block_statistics(q, k, pooled=False, nonfinite=counter, quant_stats=quant_stats)
    return _attend(q, k, v, block_map, st, counter, is_causal=is_causal, scale=scale,
                   pvthreshd=pvthreshd, qk=qk, rebalance=rebalance, pv=pv,
                   return_lse=return_lse, return_stats=return_stats, out=out)


def sparge_attn(q, k, v, *, is_causal, scale, layout, simthreshd1, cdfthreshd, topk,
                attention_sink, pvthreshd, qk, rebalance, pv, return_lse, return_stats, out=None,
                mass_threshold=None):
    """Prediction and attention sharing one statistics pass over Q and K."""
    q, k, v = _as_operands(layout, q, k, v)
    counter = nonfinite_counter()
    st = block_statistics(q, k, pooled=True, nonfinite=counter)
    block_map = select(st, Lq=q.shape[2], Lk=k.shape[2], is_causal=is_causal, scale=scale,
                       simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
                       mass_threshold=mass_threshold, attention_sink=attention_sink)
    return _attend(q, k, v, block_map, st, counter, is_causal=is_causal, scale=scale,
                   pvthreshd=pvthreshd, qk=qk, rebalance=rebalance, pv=pv,
                   return_lse=return_lse, return_stats=return_stats, out=out)
