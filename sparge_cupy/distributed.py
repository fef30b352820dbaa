"""Sequence-parallel SpargeAttn over ``torch.distributed``: DeepSpeed-Ulysses and ring attention.

Every rank passes its shard of the sequence (tokens ``[offset_r, offset_r + L_r)`` of q, k, v, in
rank order) and gets back the attention output of its own query tokens. CPU tensors run the NumPy
reference (``gloo``); CUDA tensors run the kernels through :mod:`sparge_cupy.torch` (``nccl``). The
keywords are those of :func:`sparge_cupy.sparge_attn`; ``return_lse`` returns the float32 LSE of
the local query tokens too.

**Ulysses** (:func:`ulysses_attn`). One all-to-all gives every rank all tokens of ``Hq / W`` query
heads and of the key/value heads they read; each rank runs ``sparge_attn`` on whole sequences, then
a second all-to-all returns the output (and LSE) to the token owners. The computation of every head
is the single-process one, so the result equals single-process ``sparge_attn`` bit for bit. GQA:
``Hq % W == 0``, and either ``Hkv % W == 0`` (each rank holds whole groups of query heads with their
kv heads) or every rank's query heads share one kv head (``(Hq / Hkv) % (Hq / W) == 0``, e.g. MQA:
that kv head is sent to each of its ranks). In the second case channel rebalancing needs the channel
maxima of |Q| over the whole group, which no single rank holds: they are all-reduced and carried in
one extra query block of 128 rows prepended to the rank's queries (its own quantization block and
block-map row; prepending keeps the bottom-right causal alignment), so the scales are exactly the
single-process ones. Any Lq, Lk and shard lengths (at least one token each).

**Ring** (:func:`ring_attn`). Each rank keeps its queries; key/value shards travel round the ring
(``batch_isend_irecv``, overlapped with the compute) and each step adds one partial result.

* Shards: the blocks are defined on the global token index, and a block must not straddle ranks,
  so every shard but the last holds a multiple of 128 query tokens and of 64 key tokens (a ragged
  last shard is fine). Anything else raises ``ValueError``: re-cut the sequence, or use Ulysses.
* Prediction is exact (:func:`ring_predict_block_map`). All-reduced: the float64 K sum (for the
  global mean ``km``). All-gathered: the pooled blocks and self-similarities of ``K - km`` (small:
  ``nk x D`` per kv head). Each rank then builds the compressed map of its query blocks against the
  whole row of key blocks and selects (TopCdf/TopK over the whole row, or the mass threshold
  scaled by the whole sequence's key-block count ``nk``; fix blocks, causal, sink) exactly as one
  process does: the same block map rows. The only freedom left is the float64
  summation order of ``km``, which the single-process kernels and reference do not share either.
* Quantization is the single process's. The statistics that one process takes over the whole
  sequence are global here too: the K mean ``km`` (the prediction's), and the channel maxima of
  |Q| (over the query heads of each kv head), of |K - km| and of |V|, one MAX all-reduce of
  ``3 B Hkv D`` floats (:class:`reference.QuantStats`). Every other scale is per block, and blocks
  do not straddle ranks (a causal pair ending inside a key block keeps the whole block and appends
  zero query rows instead, :func:`_fit`). So each partial smooths, rebalances (``s_c``) and
  quantizes with the single process's numbers: its INT8 (or fp16) Q and K operands and scales and
  its FP8 (or fp16) V operand and ``dv`` are the single process's bit for bit (given the same
  ``km``: see its summation order above), and so are the logits ``s`` (INT8 products are summed
  exactly).
* Partials: the engine's block-sparse attention of (query shard, key shard, the map's columns of
  that shard), in float32 so that nothing is rounded to fp16/bf16 before the merge. Each starts
  its online softmax afresh at its key shard, with a running maximum ``m'`` that is at most the
  single process's ``m`` at the same block. What that leaves different:

  - float32 rounding of ``exp2(s - m)``, the rescalings and the merge: with P V unrounded (the
    reference's ``pv="fp32"``, in the tests) out and LSE equal one process's to a few float32
    ulps (measured at most 4.3 ulps of max|V|, within a derived bound of about ``9 n`` ulps for
    ``n`` visited blocks);
  - the rounding of P for the P V product, which is relative to the running maximum:
    ``p' = p 2^(m - m')`` is rounded to fp16 (relative ``u = 2^-11``) or, times 448, to e4m3
    (``u = 2^-4``, 3 significand bits). Unless ``m - m'`` is an integer, the two runs round
    unrelated values, so ``|dO| <= 2 u sum_u a_u |v_u| <= 2 u max|v|`` (``a`` the softmax
    weights; plus subnormal terms): ``pv="fp16"`` measured 480 ulps of max|V| (relative L1 5e-6
    to one process); ``pv="fp8"``, the default, is a different draw of the same rounding: its
    error against float64 is the single process's (measured relative L1 0.01288 against 0.01291,
    the same maximum error), and the ring's output lies at relative L1 6e-4 from one process's
    (1.6e-2 when each shard used its own statistics). The LSE takes ``l`` from the unrounded p,
    so it agrees to float32 rounding in every mode. Removing this would mean starting each
    partial from the running maximum of the keys before it, which serialises the ring;
  - the Stage 2 filter compares a block's scores with ``m'``, so a partial skips a subset of the
    P V products that one process skips: with ``pvthreshd`` set the ring computes a little more.
* Merge in float32, online over the partials: ``lse = log sum_i exp(lse_i)``,
  ``o = sum_i exp(lse_i - lse) o_i``; a row no partial reaches outputs zeros and LSE ``-inf``.
* Causal: bottom-right on global indices (query t sees key u iff ``u <= t + Lk - Lq``). A shard
  pair is skipped, run without mask, or run causally; for the last kind the key shard is cut
  after the last key block any local query sees, and zero keys or zero query rows are appended
  in blocks left out of the map (:func:`_fit`), so that the engine's own bottom-right rule lands
  on the global diagonal. Causal work is uneven across ranks (rank r computes r + 1 of W shards
  when Lq == Lk), as in plain ring attention.

Errors: every rank checks its own input first; a summary of all checks is all-gathered, so a bad
input on one rank raises on every rank (``ValueError``/``TypeError``) instead of leaving the others
waiting in a collective.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _checks as ck
from . import torch as torch_adapter
from .api import DEFAULT_CDF, _selection
from .config import CONFIG

BQ, BK = CONFIG.block_q, CONFIG.block_k
_STATS_FIELDS = ("km", "q_amax", "k_amax", "v_amax")   # reference.QuantStats, in order
_DTYPES = ck.DTYPES                       # ("float16", "bfloat16", "float32"): index = wire code


def _torch():
    import torch
    return torch


def _dist():
    import torch.distributed as dist
    return dist


# ---------------------------------------------------------------------------------------------
# Engines: what runs one rank's share. CPU tensors -> the NumPy reference; CUDA -> the kernels.

class _Reference:
    """The NumPy path: torch CPU tensors converted (zero-copy where possible) to NumPy arrays."""

    to_numpy = staticmethod(torch_adapter.to_numpy)
    to_torch = staticmethod(torch_adapter.from_numpy)

    @classmethod
    def _call(cls, fn, *arrays, **kw):
        res = fn(*(cls.to_numpy(a) for a in arrays), **kw)
        return tuple(cls.to_torch(r) for r in res) if isinstance(res, tuple) else cls.to_torch(res)

    @classmethod
    def sparge_attn(cls, q, k, v, **kw):
        from .api import sparge_attn
        return cls._call(sparge_attn, q, k, v, **kw)

    @classmethod
    def block_sparse_attn(cls, q, k, v, block_map, *, quant_stats, **kw):
        """The reference's block-sparse attention on checked inputs (``kw``: ``_options``'s), with
        the torch :class:`QuantStats` ``quant_stats`` of the whole sequence."""
        from .api import _ref_attention
        from .reference import QuantStats
        given = QuantStats(*(cls.to_numpy(getattr(quant_stats, f)) for f in _STATS_FIELDS))
        return cls._call(lambda *a: _ref_attention(*a, dtype=np.float32, return_stats=False,
                                                   quant_stats=given, **kw),
                         q, k, v, block_map)

    @classmethod
    def block_stats(cls, x, block):
        """Pooled blocks and self-similarities of float32 HND ``x`` (reference.predict)."""
        from . import reference as R
        xn = cls.to_numpy(x)
        return (cls.to_torch(R.pool_blocks(xn, block)),
                cls.to_torch(R.block_self_similarity(xn, block, CONFIG)))

    @classmethod
    def select(cls, qbar, q_sim, kbar, k_sim, *, q0, Lq, Lk, is_causal, scale, theta, tau, topk,
               attention_sink, mass_threshold=None):
        """reference.select_blocks on the gathered statistics: ``kbar`` holds every key block of
        the sequence, so the mass threshold's ``nk`` is the whole sequence's."""
        from . import reference as R
        nq = qbar.shape[2]
        valid = R.valid_blocks(Lq, Lk, BQ, BK, is_causal)[q0 // BQ: q0 // BQ + nq]
        bm = R.select_blocks(*(cls.to_numpy(x) for x in (qbar, q_sim, kbar, k_sim)), valid,
                             scale=scale, simthreshd1=theta, cdfthreshd=tau, topk=topk,
                             mass_threshold=mass_threshold, attention_sink=attention_sink)
        return cls.to_torch(bm)


def _block_stats_torch(x, block, eps=CONFIG.sim_eps):
    """``reference.pool_blocks`` and ``reference.block_self_similarity`` in torch float64 (on the
    tensor's device), each rounded once to float32: the same numbers up to float64 summation
    order. Used on CUDA, where the kernels compute these only with the local K mean."""
    torch = _torch()
    B, H, L, D = x.shape
    nb = -(-L // block)
    xb = torch.zeros((B, H, nb * block, D), dtype=torch.float64, device=x.device)
    xb[:, :, :L] = x
    xb = xb.view(B, H, nb, block, D)
    counts = (torch.arange(nb * block, device=x.device) < L).view(nb, block).sum(1)
    counts = counts.to(torch.float64)[None, None, :, None]
    pooled = (xb.sum(dim=3) / counts).float()
    norms = torch.sqrt((xb * xb).sum(dim=-1, keepdim=True))
    mean = (xb / torch.clamp(norms, min=eps)).sum(dim=3) / counts
    return pooled, (mean * mean).sum(dim=-1).float()


class _Cuda:
    """The kernels, through the torch adapter (zero-copy, torch's current stream)."""

    @staticmethod
    def sparge_attn(q, k, v, **kw):
        from . import torch as st
        return st.sparge_attn(q, k, v, **kw)

    @staticmethod
    def block_sparse_attn(q, k, v, block_map, *, quant_stats, layout, **kw):
        """The kernels on checked inputs (``kw``: ``_options``'s), with the torch
        :class:`QuantStats` ``quant_stats`` of the whole sequence (DLPack views)."""
        import cupy
        from . import _gpu
        from .reference import QuantStats
        from .torch import _on_current_stream, _operands, _run_attention, _to_cupy
        with _on_current_stream(q):
            given = QuantStats(*(cupy.from_dlpack(getattr(quant_stats, f).contiguous())
                                 for f in _STATS_FIELDS))
            qo, ko, vo = _operands(layout, q, k, v)
            bmap = _to_cupy(block_map.contiguous(), "block_map")[0]
            return _run_attention(_gpu.block_sparse_attn, q, qo, ko, vo, bmap, layout=layout,
                                  return_stats=False, quant_stats=given, **kw)

    block_stats = staticmethod(_block_stats_torch)

    @staticmethod
    def select(qbar, q_sim, kbar, k_sim, *, q0, Lq, Lk, is_causal, scale, theta, tau, topk,
               attention_sink, mass_threshold=None):
        """select.cu on the gathered statistics. Its causal rule reads only ``Lq`` and ``Lk``:
        with ``Lq - q0`` in place of ``Lq``, local query block i has the global block's last row
        and diagonal offset, so the rows are those of the whole sequence's map. The mass
        threshold's ``nk`` is ``kbar``'s block count, every key block of the sequence."""
        import cupy
        from . import _gpu
        from .torch import _on_current_stream, _to_torch
        with _on_current_stream(qbar):
            st = _gpu.Stats(**{n: cupy.from_dlpack(t.contiguous()) for n, t in
                               (("qbar", qbar), ("q_sim", q_sim), ("kbar", kbar), ("k_sim", k_sim))})
            bm = _gpu.select(st, Lq=Lq - q0, Lk=Lk, is_causal=is_causal, scale=scale,
                             simthreshd1=theta, cdfthreshd=tau, topk=topk,
                             mass_threshold=mass_threshold, attention_sink=attention_sink)
            return _to_torch(bm)


# ---------------------------------------------------------------------------------------------
# The process group, the shards and the checks every rank agrees on.

@dataclass(frozen=True)
class _Shards:
    group: object
    world: int
    rank: int
    engine: type             # _Reference or _Cuda
    B: int
    Hq: int
    Hkv: int
    D: int
    dtype: object            # torch dtype
    lq: tuple                # query tokens of every rank
    lk: tuple                # key tokens of every rank

    @property
    def q_offsets(self):
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.lq)]))

    @property
    def k_offsets(self):
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.lk)]))

    def global_rank(self, r):
        return r if self.group is None else _dist().get_global_rank(self.group, r)


def _hnd(t, layout):
    return t if layout == "HND" else t.transpose(1, 2)


def _check_local(q, k, v, layout, is_causal, scale):
    """This rank's input alone: types, shapes, device, finite values. Returns (Shapes, scale)."""
    torch = _torch()
    arrays = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, t in arrays.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor (this rank's shard), "
                            f"got {type(t).__name__}")
    shapes = ck.check_qkv(q, k, k if v is None else v, layout)
    devices = {str(t.device) for t in arrays.values()}
    if len(devices) != 1:
        raise ValueError(f"q, k, v: expected one device, got {', '.join(sorted(devices))}")
    if q.device.type not in ("cpu", "cuda"):
        raise TypeError(f"q: expected CPU tensors (reference) or CUDA tensors (kernels), "
                        f"got {q.device}")
    ck.check_flag("is_causal", is_causal)
    scale = ck.check_scale(scale, shapes.D)
    torch_adapter.refuse_grad(**arrays)
    ck.check_finite(lambda t: int((~torch.isfinite(t)).sum()), **arrays)
    return shapes, scale


def _fingerprint(x):
    """A 64-bit digest of normalised keywords (dicts, sequences, NumPy arrays, scalars), the same
    in every process for equal values: ranks compare it instead of every value."""
    import hashlib

    def canon(y):
        if isinstance(y, dict):
            return "{" + ",".join(f"{k!r}:{canon(y[k])}" for k in sorted(y)) + "}"
        if isinstance(y, (list, tuple)):
            return "(" + ",".join(canon(z) for z in y) + ")"
        if isinstance(y, np.ndarray):
            return f"array({y.dtype},{y.shape},{y.tobytes().hex()})"
        return repr(y)
    return int.from_bytes(hashlib.blake2b(canon(x).encode(), digest_size=8).digest(), "little",
                          signed=True)


def _comm_device(q, group):
    torch = _torch()
    if isinstance(q, torch.Tensor) and q.device.type in ("cpu", "cuda"):
        return q.device
    if _dist().get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(q, k, v, *, group, layout, is_causal, scale, what, options):
    """Check locally, all-gather a summary, check globally: every rank returns or raises alike.

    ``options(shapes)`` normalises the keywords after the local checks (it may raise too).
    Returns (_Shards, scale, what ``options`` returned)."""
    torch, dist = _torch(), _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"group: {what} needs torch.distributed initialised on every rank "
                         "(init_process_group: 'gloo' for CPU tensors, 'nccl' for CUDA tensors)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local_error, shapes, opts = None, None, None
    try:
        shapes, scale = _check_local(q, k, v, layout, is_causal, scale)
        opts = options(shapes)
    except (TypeError, ValueError, RuntimeError) as e:
        local_error, shapes = e, None
    device = _comm_device(q, group)
    if shapes is None:
        summary = [0] * 12
    else:
        scale_bits = int(np.float64(scale).view(np.int64))
        summary = [1, shapes.B, shapes.Hq, shapes.Hkv, shapes.D, shapes.Lq, shapes.Lk,
                   _DTYPES.index(shapes.dtype), int(bool(is_causal)), ck.LAYOUTS.index(layout),
                   scale_bits, _fingerprint(opts)]
    mine = torch.tensor(summary, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    every = [[int(x) for x in t.tolist()] for t in every]
    refused = [r for r, s in enumerate(every) if s[0] == 0]
    if local_error is not None:
        raise local_error
    if refused:
        raise ValueError(f"{what}: rank(s) {refused} refused their input (see the error there); "
                         "every rank stops")
    names = ("batch", "query heads", "kv heads", "head dim")
    for col, name in zip(range(1, 5), names):
        values = [s[col] for s in every]
        if len(set(values)) != 1:
            raise ValueError(f"q, k, v: every rank must pass the same {name}; got {values} "
                             f"on ranks 0..{world - 1}")
    for col, name, show in ((7, "dtype", lambda c: _DTYPES[c]), (8, "is_causal", bool),
                            (9, "layout", lambda c: ck.LAYOUTS[c]), (10, "scale",
                            lambda b: float(np.int64(b).view(np.float64)))):
        values = [s[col] for s in every]
        if len(set(values)) != 1:
            raise ValueError(f"{name}: every rank must pass the same value; got "
                             f"{[show(x) for x in values]} on ranks 0..{world - 1}")
    prints = [s[11] for s in every]
    if len(set(prints)) != 1:      # thresholds, qk, pv, rebalance, return_lse, ...: a mismatch
        groups = {}                # would pair different collectives or give mixed results
        for r, f in enumerate(prints):
            groups.setdefault(f, []).append(r)
        raise ValueError(f"{what}: every rank must pass the same keywords (thresholds, qk, pv, "
                         f"rebalance, return_lse, ...); ranks {sorted(groups.values())} differ")
    engine = _Reference if q.device.type == "cpu" else _Cuda
    shards = _Shards(group=group, world=world, rank=rank, engine=engine, B=shapes.B, Hq=shapes.Hq,
                     Hkv=shapes.Hkv, D=shapes.D, dtype=q.dtype,
                     lq=tuple(s[5] for s in every), lk=tuple(s[6] for s in every))
    return shards, scale, opts


def _options(shapes, *, simthreshd1, cdfthreshd, topk, mass_threshold, attention_sink, pvthreshd,
             qk, rebalance, pv, return_lse, return_stats):
    """Every keyword normalised as sparge_attn does (per-head float32 arrays of Hq values)."""
    if ck.check_flag("return_stats", return_stats):
        raise ValueError("return_stats: not available in the sequence-parallel functions "
                         "(the counts are spread over the ranks); use return_stats=False")
    opts = dict(pvthreshd=ck.check_pvthreshd(pvthreshd, shapes.Hq),
                qk=ck.check_choice("qk", qk, ck.QK_MODES),
                rebalance=ck.check_flag("rebalance", rebalance),
                pv=ck.check_choice("pv", pv, ck.PV_MODES),
                return_lse=ck.check_flag("return_lse", return_lse))
    opts.update(_selection(shapes, simthreshd1, cdfthreshd, topk, mass_threshold),
                attention_sink=ck.check_flag("attention_sink", attention_sink))
    return opts


# ---------------------------------------------------------------------------------------------
# Ulysses.

def _head_plan(Hq, Hkv, world):
    """(query heads of every rank, kv heads of every rank) as slices; raises if GQA cannot map."""
    if Hq % world:
        raise ValueError(f"q: ulysses_attn splits the query heads over the ranks; Hq={Hq} is not "
                         f"a multiple of the world size {world}")
    hq, group_size = Hq // world, Hq // Hkv
    q_heads = [slice(r * hq, (r + 1) * hq) for r in range(world)]
    if Hkv % world == 0:
        hk = Hkv // world
        return q_heads, [slice(r * hk, (r + 1) * hk) for r in range(world)], False
    if group_size % hq == 0:        # every rank's query heads read one kv head: send it to each
        return q_heads, [slice(r * hq // group_size, r * hq // group_size + 1)
                         for r in range(world)], True
    raise ValueError(f"k: ulysses_attn needs Hkv % W == 0 or (Hq / Hkv) % (Hq / W) == 0 so that "
                     f"every rank holds its query heads' kv heads; got Hq={Hq}, Hkv={Hkv}, W={world}")


def _scatter_heads(x, heads, lens, sh, prefix=0):
    """All-to-all: send ``x[:, heads[s]]`` (my tokens) to rank s; return my heads over all
    tokens, ``[B, H_mine, prefix + sum(lens), ...]`` (``prefix`` zero rows first)."""
    torch, dist = _torch(), _dist()
    tail = tuple(x.shape[3:])
    width = math.prod(tail)
    send = torch.cat([x[:, h].reshape(-1) for h in heads])
    in_sizes = [sh.B * (h.stop - h.start) * x.shape[2] * width for h in heads]
    h_mine = heads[sh.rank].stop - heads[sh.rank].start
    out_sizes = [sh.B * h_mine * n * width for n in lens]
    recv = torch.empty(sum(out_sizes), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(recv, send, out_sizes, in_sizes, group=sh.group)
    parts = [c.view((sh.B, h_mine, n) + tail) for c, n in zip(recv.split(out_sizes), lens)]
    if prefix:
        parts.insert(0, torch.zeros((sh.B, h_mine, prefix) + tail, dtype=x.dtype, device=x.device))
    return torch.cat(parts, dim=2)


def _gather_heads(y, heads, lens, sh):
    """The inverse all-to-all: ``y`` ``[B, H_mine, sum(lens), ...]`` -> my tokens of every head,
    ``[B, sum of |heads[s]|, lens[rank], ...]``."""
    torch, dist = _torch(), _dist()
    tail = tuple(y.shape[3:])
    width = math.prod(tail)
    offs = np.concatenate([[0], np.cumsum(lens)])
    send = torch.cat([y[:, :, offs[s]:offs[s + 1]].reshape(-1) for s in range(sh.world)])
    in_sizes = [y.shape[0] * y.shape[1] * n * width for n in lens]
    out_sizes = [sh.B * (h.stop - h.start) * lens[sh.rank] * width for h in heads]
    recv = torch.empty(sum(out_sizes), dtype=y.dtype, device=y.device)
    dist.all_to_all_single(recv, send, out_sizes, in_sizes, group=sh.group)
    parts = [c.view((sh.B, h.stop - h.start, lens[sh.rank]) + tail)
             for c, h in zip(recv.split(out_sizes), heads)]
    return torch.cat(parts, dim=1)


def _local_q_amax(q, sh):
    """Channel max of |Q| over this rank's tokens of all query heads of each kv head (HND ``q``),
    float32 ``[B, Hkv, D]``: what channel rebalancing takes over the group, before the
    all-reduce (:func:`_all_max`)."""
    g = sh.Hq // sh.Hkv
    return q.abs().float().reshape(sh.B, sh.Hkv, g * q.shape[2], sh.D).amax(dim=2)


def _all_max(x, sh):
    dist = _dist()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=sh.group)
    return x


def ulysses_attn(q, k, v, *, group=None, is_causal=False, scale=None, layout="HND",
                 simthreshd1=CONFIG.simthreshd1, cdfthreshd=DEFAULT_CDF, topk=None,
                 mass_threshold=None, pvthreshd=None, attention_sink=True, qk="int8",
                 rebalance=True, pv="fp8", return_lse=False, return_stats=False):
    """Sequence-parallel :func:`sparge_cupy.sparge_attn` by all-to-all over heads (Ulysses).

    Args:
      q: this rank's query tokens of every head, ``[B, Hq, L_r, D]`` (HND) or ``[B, L_r, Hq, D]``
        (NHD); ranks hold consecutive token ranges in rank order, any lengths (>= 1).
      k, v: this rank's key/value tokens, Hkv heads (see the module notes for GQA).
      group: the process group (default: the whole world).
      Other keywords: as :func:`sparge_cupy.sparge_attn`; per-head thresholds have Hq values.
    Returns:
      ``out`` (input dtype and layout, this rank's query tokens), then ``lse`` float32
      ``[B, Hq, L_r]`` with ``return_lse``: single-process ``sparge_attn``, bit for bit.
    """
    torch = _torch()
    sh, scale, opts = _agree(
        q, k, v, group=group, layout=layout, is_causal=is_causal, scale=scale, what="ulysses_attn",
        options=lambda shapes: _options(
            shapes, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
            mass_threshold=mass_threshold, attention_sink=attention_sink, pvthreshd=pvthreshd,
            qk=qk, rebalance=rebalance, pv=pv, return_lse=return_lse,
            return_stats=return_stats))
    q_heads, kv_heads, shared_kv = _head_plan(sh.Hq, sh.Hkv, sh.world)
    qh, kh, vh = (_hnd(t, layout) for t in (q, k, v))

    # A rank holding part of a kv head's query group cannot see the group's |Q| maxima: carry
    # them in one prepended query block (see the module notes).
    prefix = BQ if shared_kv and opts["rebalance"] else 0
    q_all = _scatter_heads(qh, q_heads, sh.lq, sh, prefix=prefix)
    if prefix:
        amax = _all_max(_local_q_amax(qh, sh), sh)[:, kv_heads[sh.rank]]   # [B, 1, D]
        q_all[:, :, 0] = amax.to(q_all.dtype)
    k_all = _scatter_heads(kh, kv_heads, sh.lk, sh)
    v_all = _scatter_heads(vh, kv_heads, sh.lk, sh)

    mine = q_heads[sh.rank]
    per_head = {n: (opts[n][mine] if opts[n] is not None else None)
                for n in ("simthreshd1", "cdfthreshd", "topk", "mass_threshold", "pvthreshd")}
    res = sh.engine.sparge_attn(q_all, k_all, v_all, is_causal=is_causal, scale=scale,
                                layout="HND", attention_sink=opts["attention_sink"],
                                qk=opts["qk"], rebalance=opts["rebalance"], pv=opts["pv"],
                                return_lse=opts["return_lse"], **per_head)
    res = res if isinstance(res, tuple) else (res,)
    out = _gather_heads(res[0][:, :, prefix:], q_heads, sh.lq, sh)
    out = out if layout == "HND" else out.transpose(1, 2).contiguous()
    if not opts["return_lse"]:
        return out
    lse = _gather_heads(res[1][:, :, prefix:].to(torch.float32), q_heads, sh.lq, sh)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Ring: exact prediction from global statistics, partials round the ring, LSE merge.

def _check_ring_shards(sh):
    for name, lens, block in (("q", sh.lq, BQ), ("k", sh.lk, BK)):
        bad = [r for r, n in enumerate(lens[:-1]) if n % block]
        if bad:
            raise ValueError(
                f"{name}: ring attention needs every shard but the last to hold a multiple of "
                f"{block} tokens (blocks of {BQ} queries x {BK} keys must not straddle ranks); "
                f"shard lengths {list(lens)}, rank(s) {bad} off. Re-cut the sequence, or use "
                "ulysses_attn")


def _k_mean(kh, sh):
    """The K mean over every rank's tokens, float32 ``[B, Hkv, D]``: float64 sums all-reduced and
    divided, rounded once (reference.quant.smooth_k)."""
    torch, dist = _torch(), _dist()
    ksum = kh.to(torch.float64).sum(dim=2)
    dist.all_reduce(ksum, group=sh.group)
    return (ksum / sum(sh.lk)).float()


def _ring_quant_stats(qh, kh, vh, km, sh):
    """The :class:`reference.QuantStats` of the whole sequence (torch float32 ``[B, Hkv, D]``, on
    the shards' device) from the HND float32 shards and the global ``km``: the channel maxima of
    |Q| (over the kv head's query heads), |K - km| and |V|, one MAX all-reduce for the three. Every
    value is one a single process computes from the same float32 numbers, and a maximum does not
    depend on the order, so the result is the single process's bit for bit."""
    from .reference import QuantStats
    amax = _torch().stack([_local_q_amax(qh, sh), (kh - km[:, :, None]).abs().amax(dim=2),
                           vh.abs().amax(dim=2)])
    return QuantStats(km, *_all_max(amax, sh).unbind(0))


def _ring_predict(q, k, sh, *, layout, is_causal, scale, simthreshd1, cdfthreshd, topk,
                  mass_threshold, attention_sink, km=None):
    """This rank's rows of the single-process block map, ``[B, Hq, nq_r, nk]`` (torch bool).
    ``km``: the global K mean if already known (:func:`_k_mean`). The selection sees the pooled
    blocks of every key shard, so ``nk`` (the mass threshold's scale) is the whole sequence's."""
    torch, dist = _torch(), _dist()
    qh = _hnd(q, layout).float()
    kh = _hnd(k, layout).float()
    Lq, Lk = sum(sh.lq), sum(sh.lk)
    km = _k_mean(kh, sh) if km is None else km
    qbar, q_sim = sh.engine.block_stats(qh, BQ)
    kbar, k_sim = sh.engine.block_stats(kh - km[:, :, None], BK)
    # all-gather the key statistics (padded to the largest shard's block count)
    nks = [-(-n // BK) for n in sh.lk]
    width = max(nks)
    packed = torch.zeros((sh.B, sh.Hkv, width, sh.D + 1), dtype=torch.float32, device=qh.device)
    packed[:, :, :kbar.shape[2], :sh.D] = kbar
    packed[:, :, :kbar.shape[2], sh.D] = k_sim
    every = [torch.empty_like(packed) for _ in range(sh.world)]
    dist.all_gather(every, packed, group=sh.group)
    full = torch.cat([t[:, :, :n] for t, n in zip(every, nks)], dim=2)
    kbar, k_sim = full[..., :sh.D].contiguous(), full[..., sh.D].contiguous()
    return sh.engine.select(qbar, q_sim, kbar, k_sim, q0=sh.q_offsets[sh.rank], Lq=Lq, Lk=Lk,
                            is_causal=is_causal, scale=scale, theta=simthreshd1, tau=cdfthreshd,
                            topk=topk, mass_threshold=mass_threshold,
                            attention_sink=attention_sink)


def ring_predict_block_map(q, k, *, group=None, is_causal=False, scale=None, layout="HND",
                           simthreshd1=CONFIG.simthreshd1, cdfthreshd=DEFAULT_CDF, topk=None,
                           mass_threshold=None, attention_sink=True):
    """Stage 1 for ring attention: this rank's rows of the whole sequence's block map.

    Shards as :func:`ring_attn`; keywords as :func:`sparge_cupy.predict_block_map` (exactly one
    of ``cdfthreshd``, ``topk``, ``mass_threshold``; ``mass_threshold`` scales by the global
    ``ceil(Lk / 64)``). Returns bool ``[B, Hq, ceil(L_r / 128), ceil(Lk / 64)]`` (Lk the global
    key length): rows ``offset_r / 128 ...`` of single-process
    :func:`sparge_cupy.predict_block_map`.
    """
    sh, scale, (sel, sink) = _agree(
        q, k, None, group=group, layout=layout, is_causal=is_causal, scale=scale,
        what="ring_predict_block_map",
        options=lambda shapes: (_selection(shapes, simthreshd1, cdfthreshd, topk, mass_threshold),
                                ck.check_flag("attention_sink", attention_sink)))
    _check_ring_shards(sh)
    return _ring_predict(q, k, sh, layout=layout, is_causal=is_causal, scale=scale,
                         attention_sink=sink, **sel)


def _pair(q0, q_end, k0, k_end, c):
    """How the query range [q0, q_end) meets the key range [k0, k_end) under the global causal
    rule ``u <= t + c``: ("skip", _), ("full", _) or ("causal", keys), where ``keys`` is the key
    count that puts the engine's bottom-right diagonal (``u - k0 <= t - q0 + keys - (q_end - q0)``)
    on the global one."""
    if k0 > q_end - 1 + c:
        return "skip", 0
    if k_end - 1 <= q0 + c:
        return "full", k_end - k0
    return "causal", q_end + c - k0


def _fit(keys, n):
    """The shapes a pair of :func:`_pair` runs with: ``(kept, pad_k, pad_q)``, the first ``kept``
    of the key shard's ``n`` keys, then ``pad_k`` zero keys, and ``pad_q`` zero query rows after
    the shard's, so that the engine's diagonal offset ``kept + pad_k - (rows + pad_q)`` is
    ``keys - rows``. Key blocks stay whole: a block cut short would take its INT8 scale over part
    of its keys (the single process takes it over all 64). ``pad_k > 0`` only for a shard that is
    not the last (``keys`` reaches past it), so ``kept = n`` is a multiple of 64 and the zero keys
    fill blocks of their own, which the map leaves out. ``pad_q > 0`` only when ``keys < n``, that
    is for a query shard that is not the last, a multiple of 128: the zero rows (fewer than 64)
    fill a query block of their own, which the map leaves out too."""
    kept = min(n, -(-keys // BK) * BK)
    return kept, max(0, keys - n), kept - min(keys, kept)


class _Merge:
    """Online float32 merge of partial (out, lse): o = sum_i exp(lse_i - lse) o_i."""

    def __init__(self, B, H, L, D, device):
        torch = _torch()
        self.m = torch.full((B, H, L), -math.inf, dtype=torch.float32, device=device)
        self.den = torch.zeros((B, H, L), dtype=torch.float32, device=device)
        self.acc = torch.zeros((B, H, L, D), dtype=torch.float32, device=device)

    def add(self, out, lse):
        torch = _torch()
        m_new = torch.maximum(self.m, lse)
        m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all -inf so far
        a, b = torch.exp(self.m - m_use), torch.exp(lse - m_use)
        self.acc = self.acc * a[..., None] + out * b[..., None]
        self.den = self.den * a + b
        self.m = m_new

    def result(self):
        torch = _torch()
        empty = self.den == 0
        den = torch.where(empty, torch.ones_like(self.den), self.den)
        out = torch.where(empty[..., None], torch.zeros_like(self.acc), self.acc / den[..., None])
        lse = torch.where(empty, torch.full_like(self.m, -math.inf), self.m + torch.log(den))
        return out, lse


def ring_attn(q, k, v, *, group=None, is_causal=False, scale=None, layout="HND",
              simthreshd1=CONFIG.simthreshd1, cdfthreshd=DEFAULT_CDF, topk=None,
              mass_threshold=None, pvthreshd=None, attention_sink=True, qk="int8",
              rebalance=True, pv="fp8", return_lse=False, return_stats=False):
    """Sequence-parallel :func:`sparge_cupy.sparge_attn` by ring attention.

    Args:
      q: this rank's query tokens, ``[B, Hq, L_r, D]`` (HND) or ``[B, L_r, Hq, D]`` (NHD); ranks
        hold consecutive token ranges in rank order; every shard but the last a multiple of 128.
      k, v: this rank's key/value tokens (Hkv heads; every shard but the last a multiple of 64).
      group: the process group (default: the whole world).
      Other keywords: as :func:`sparge_cupy.sparge_attn`.
    Returns:
      ``out`` (input dtype and layout), then ``lse`` float32 ``[B, Hq, L_r]`` with
      ``return_lse``. Block maps and quantized operands are exactly the single-process ones;
      the numbers agree to the rounding of P relative to each partial's running maximum
      (module notes).
    """
    torch, dist = _torch(), _dist()
    sh, scale, opts = _agree(
        q, k, v, group=group, layout=layout, is_causal=is_causal, scale=scale, what="ring_attn",
        options=lambda shapes: _options(
            shapes, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
            mass_threshold=mass_threshold, attention_sink=attention_sink, pvthreshd=pvthreshd,
            qk=qk, rebalance=rebalance, pv=pv, return_lse=return_lse,
            return_stats=return_stats))
    _check_ring_shards(sh)
    q32, k32, v32 = (_hnd(t, layout).float() for t in (q, k, v))
    km = _k_mean(k32, sh)
    block_map = _ring_predict(q32, k32, sh, layout="HND", is_causal=is_causal, scale=scale,
                              simthreshd1=opts["simthreshd1"], cdfthreshd=opts["cdfthreshd"],
                              topk=opts["topk"], mass_threshold=opts["mass_threshold"],
                              attention_sink=opts["attention_sink"], km=km)
    quant_stats = _ring_quant_stats(q32, k32, v32, km, sh)

    qo, ko = sh.q_offsets, sh.k_offsets
    q0, q_end = qo[sh.rank], qo[sh.rank + 1]
    rows = q_end - q0
    c = ko[-1] - qo[-1]                                   # global Lk - Lq
    merge = _Merge(sh.B, sh.Hq, rows, sh.D, q32.device)
    attn = dict(scale=scale, layout="HND", pvthreshd=opts["pvthreshd"], qk=opts["qk"],
                rebalance=opts["rebalance"], pv=opts["pv"], return_lse=True,
                quant_stats=quant_stats)

    def partial(kv, src):
        k0, k_end = ko[src], ko[src + 1]
        kind, keys = _pair(q0, q_end, k0, k_end, c) if is_causal else ("full", k_end - k0)
        if kind == "skip":
            return
        kept, pad_k, pad_q = _fit(keys, k_end - k0)
        cols = block_map[..., k0 // BK: k0 // BK + -(-kept // BK)]
        if not bool(cols.any()):
            return
        kv, qp = kv[:, :, :, :kept].float(), q32
        if pad_k:
            kv = torch.cat([kv, kv.new_zeros(kv.shape[:3] + (pad_k, sh.D))], dim=3)
            cols = torch.cat([cols, cols.new_zeros(cols.shape[:3] + (-(-pad_k // BK),))], dim=3)
        if pad_q:
            qp = torch.cat([q32, q32.new_zeros((sh.B, sh.Hq, pad_q, sh.D))], dim=2)
            cols = torch.cat([cols, cols.new_zeros(cols.shape[:2] + (1, cols.shape[3]))], dim=2)
        out, lse = sh.engine.block_sparse_attn(qp, kv[0], kv[1], cols.contiguous(),
                                               is_causal=kind == "causal", **attn)
        merge.add(out[:, :, :rows].float(), lse[:, :, :rows])

    cur, src = torch.stack([_hnd(k, layout), _hnd(v, layout)]).contiguous(), sh.rank
    nxt, prv = sh.global_rank((sh.rank + 1) % sh.world), sh.global_rank((sh.rank - 1) % sh.world)
    for step in range(sh.world):
        reqs = []
        if step < sh.world - 1:           # pass the shard on while computing with it
            incoming = (src - 1) % sh.world
            buf = cur.new_empty(cur.shape[:3] + (sh.lk[incoming], sh.D))
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, cur, nxt, sh.group),
                                           dist.P2POp(dist.irecv, buf, prv, sh.group)])
        partial(cur, src)
        for r in reqs:
            r.wait()
        if reqs:
            cur, src = buf, incoming

    out, lse = merge.result()
    out = out.to(sh.dtype)
    out = out if layout == "HND" else out.transpose(1, 2).contiguous()
    return (out, lse) if opts["return_lse"] else out
