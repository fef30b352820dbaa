"""The PyTorch adapter: :func:`predict_block_map`, :func:`block_sparse_attn` and
:func:`sparge_attn` on torch tensors.

CUDA tensors run the GPU kernels, zero-copy both ways through DLPack, on torch's current stream.
Tensors on the CPU (or any other device) run the NumPy reference (:mod:`sparge_cupy.api` on NumPy
copies; bf16 through ``ml_dtypes``, bit for bit). Either way the output is a torch tensor of the
input dtype, layout and device. bf16 works on the GPU although CuPy has no bfloat16: the storage
travels as 16-bit integers and the kernels are instantiated for ``__nv_bfloat16``. Arguments and defaults are those
of :mod:`sparge_cupy.api`; the checks are the same functions. torch is imported on first call only.
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import _checks as ck
from . import api
from .api import DEFAULT_CDF, _attn_options, _prediction_options, _selection
from .config import CONFIG


def _torch():
    import torch
    return torch


def _to_cupy(t, name):
    """A CuPy view of tensor ``t`` (bf16 as uint16 storage) and its dtype name."""
    try:
        import cupy
    except ImportError as e:
        raise ImportError("sparge_cupy.torch on CUDA tensors needs CuPy (pip install "
                          f"'sparge-cupy[cuda]'); importing it failed: {e}") from e
    torch = _torch()
    if not t.is_cuda:
        raise TypeError(f"{name}: expected a CUDA tensor, got one on {t.device}")
    t = t.detach()      # the same storage; DLPack refuses a tensor that requires grad (no_grad too)
    if t.dtype == torch.bfloat16:
        return cupy.from_dlpack(t.view(torch.int16)).view(cupy.uint16), "bfloat16"
    if t.dtype == torch.bool:
        return cupy.from_dlpack(t.view(torch.uint8)).view(cupy.bool_), "bool"
    return cupy.from_dlpack(t), str(t.dtype).replace("torch.", "")


def _to_torch(x):
    torch = _torch()
    if x.dtype == bool:
        return torch.from_dlpack(x.view("uint8")).view(torch.bool)
    return torch.from_dlpack(x)


def to_numpy(t):
    """A NumPy copy of tensor ``t`` (any device), bfloat16 as ``ml_dtypes.bfloat16`` (bit-exact)."""
    torch = _torch()
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a, like=None):
    """Array ``a`` as a CPU tensor (sharing its memory where it is contiguous), or on the device of
    tensor ``like``; bfloat16 arrays as torch.bfloat16."""
    torch = _torch()
    a = np.ascontiguousarray(a)
    t = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype.name == "bfloat16"
         else torch.from_numpy(a))
    return t if like is None else t.to(like.device)


def _on_reference(fn, like, *tensors, **kw):
    """``fn`` (an :mod:`sparge_cupy.api` function) on NumPy copies of ``tensors``, its arrays back
    as tensors on the device of ``like`` (the statistics dict as it is)."""
    res = fn(*(to_numpy(t) for t in tensors), **kw)
    if not isinstance(res, tuple):
        return from_numpy(res, like)
    return tuple(r if isinstance(r, dict) else from_numpy(r, like) for r in res)


class _StreamHandle:
    """A raw ``cudaStream_t`` through the CUDA stream protocol (``__cuda_stream__``: version 0,
    the handle), which ``cupy.cuda.Stream.from_external`` takes."""

    def __init__(self, ptr):
        self.ptr = int(ptr)

    def __cuda_stream__(self):
        return (0, self.ptr)


def _external_stream(ptr, device_id):
    """A CuPy stream on torch's stream ``ptr``: ``Stream.from_external`` (CuPy 14, which
    deprecates ``ExternalStream``), else ``ExternalStream``."""
    import cupy
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr, device_id)


@contextlib.contextmanager
def _on_current_stream(t):
    """CuPy launches on the device of ``t`` and torch's current stream there."""
    import cupy
    torch = _torch()
    with cupy.cuda.Device(t.device.index):
        stream = torch.cuda.current_stream(t.device)
        with _external_stream(stream.cuda_stream, t.device.index):
            yield


def refuse_grad(**tensors):
    """The attention is inference only: a RuntimeError naming the tensors that require grad
    while grad mode is on (the output would silently carry no gradient back to them)."""
    if _torch().is_grad_enabled():
        needs = [name for name, t in tensors.items() if t.requires_grad]
        if needs:
            raise RuntimeError(f"{', '.join(needs)}: sparge attention is inference only (no "
                               "gradient flows through it), got a tensor that requires grad: run "
                               "under torch.no_grad() or torch.inference_mode(), or pass .detach()")


def _check(q, k, v, layout, is_causal, scale):
    """(shapes, scale, whether the reference runs: tensors not on a CUDA device) of checked inputs."""
    torch = _torch()
    arrays = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, t in arrays.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
    shapes = ck.check_qkv(q, k, k if v is None else v, layout)
    devices = {str(t.device) for t in arrays.values()}
    if len(devices) != 1:
        raise ValueError(f"q, k, v: expected one device, got {', '.join(sorted(devices))}")
    refuse_grad(**arrays)
    ck.check_flag("is_causal", is_causal)
    scale = ck.check_scale(scale, shapes.D)
    # NaN / Inf: counted inside the kernels, the ValueError raised at the end of the call (_gpu);
    # on the reference path checked by the NumPy functions before anything runs.
    return shapes, scale, q.device.type != "cuda"


def _operands(layout, *tensors):
    from . import _gpu
    ops = []
    for name, t in zip("qkv", tensors):
        x, dtype = _to_cupy(t, name)
        ops.append(_gpu.operand(x, layout, dtype))
    return ops


def _run_attention(fn, q, *args, **kw):
    """Allocate the output in torch, let ``fn`` fill its CuPy view, convert the extras."""
    torch = _torch()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    res = fn(*args, out=_to_cupy(out, "out")[0], **kw)
    if not isinstance(res, tuple):
        return out
    extras = [_to_torch(r) if not isinstance(r, dict) else r for r in res[1:]]
    return (out, *extras)


def predict_block_map(q, k, *, is_causal=False, scale=None, layout="HND",
                      simthreshd1=CONFIG.simthreshd1, cdfthreshd=DEFAULT_CDF, topk=None,
                      mass_threshold=None, attention_sink=True, local_window=False,
                      predictor="paper"):
    """:func:`sparge_cupy.predict_block_map` for torch tensors; a torch bool tensor."""
    from . import _gpu
    shapes, scale, on_reference = _check(q, k, None, layout, is_causal, scale)
    sel = _selection(shapes, simthreshd1, cdfthreshd, topk, mass_threshold)
    sel.update(_prediction_options(attention_sink, local_window, predictor))
    if on_reference:
        return _on_reference(api.predict_block_map, q, q, k, is_causal=is_causal, scale=scale,
                             layout=layout, **sel)
    with _on_current_stream(q):
        qo, ko = _operands(layout, q, k)
        bmap = _gpu.predict_block_map(qo, ko, is_causal=is_causal, scale=scale, layout=layout, **sel)
        return _to_torch(bmap)


def block_sparse_attn(q, k, v, block_map, *, is_causal=False, scale=None, layout="HND",
                      pvthreshd=None, qk="int8", rebalance=True, pv="fp8", return_lse=False,
                      return_stats=False):
    """:func:`sparge_cupy.block_sparse_attn` for torch tensors."""
    from . import _gpu
    shapes, scale, on_reference = _check(q, k, v, layout, is_causal, scale)
    torch = _torch()
    if not isinstance(block_map, torch.Tensor):
        raise TypeError(f"block_map: expected a torch bool tensor, got {type(block_map).__name__}")
    if block_map.dtype != torch.bool:
        raise TypeError(f"block_map: expected a torch bool tensor, got dtype {block_map.dtype}")
    expected = (shapes.B, shapes.Hq, shapes.nq, shapes.nk)
    if tuple(block_map.shape) != expected:
        raise ValueError(f"block_map: expected shape [B, Hq, nq, nk] = {expected}, "
                         f"got {tuple(block_map.shape)}")
    if block_map.device != q.device:
        raise ValueError(f"block_map: expected a tensor on {q.device} (that of q), got one on "
                         f"{block_map.device}")
    opts = _attn_options(shapes, pvthreshd, qk, rebalance, pv, return_lse, return_stats)
    if on_reference:
        return _on_reference(api.block_sparse_attn, q, q, k, v, block_map, is_causal=is_causal,
                             scale=scale, layout=layout, **opts)
    with _on_current_stream(q):
        qo, ko, vo = _operands(layout, q, k, v)
        bmap = _to_cupy(block_map.contiguous(), "block_map")[0]
        return _run_attention(_gpu.block_sparse_attn, q, qo, ko, vo, bmap, is_causal=is_causal,
                              scale=scale, layout=layout, **opts)


def sparge_attn(q, k, v, *, is_causal=False, scale=None, layout="HND",
                simthreshd1=CONFIG.simthreshd1, cdfthreshd=DEFAULT_CDF, topk=None,
                mass_threshold=None, pvthreshd=None, attention_sink=True, local_window=False,
                qk="int8", rebalance=True, pv="fp8", return_lse=False, return_stats=False,
                predictor="paper"):
    """:func:`sparge_cupy.sparge_attn` for torch tensors."""
    from . import _gpu
    shapes, scale, on_reference = _check(q, k, v, layout, is_causal, scale)
    sel = _selection(shapes, simthreshd1, cdfthreshd, topk, mass_threshold)
    sel.update(_prediction_options(attention_sink, local_window, predictor))
    opts = _attn_options(shapes, pvthreshd, qk, rebalance, pv, return_lse, return_stats)
    if on_reference:
        return _on_reference(api.sparge_attn, q, q, k, v, is_causal=is_causal, scale=scale,
                             layout=layout, **sel, **opts)
    with _on_current_stream(q):
        qo, ko, vo = _operands(layout, q, k, v)
        return _run_attention(_gpu.sparge_attn, q, qo, ko, vo, is_causal=is_causal, scale=scale,
                              layout=layout, **sel, **opts)
