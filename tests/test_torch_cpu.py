"""sparge_cupy.torch on CPU tensors: the NumPy reference, through the same checks as CUDA tensors.

The reference is deterministic, so the adapter must give exactly what the NumPy API gives on the
same values: bit for bit, in the input's dtype (bf16 included), layout and device. Needs torch
(skipped without it; CUDA tensors are tested in test_gpu.py)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sparge_cupy as sc  # noqa: E402
import sparge_cupy.torch as st  # noqa: E402
from conftest import assert_equal, make_qkv  # noqa: E402

DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
          "bfloat16": (ml_dtypes.bfloat16, torch.bfloat16)}


def tensors(arrays, torch_dtype):
    """The arrays as torch tensors of ``torch_dtype`` with the same values."""
    return [torch.from_numpy(np.asarray(a, np.float32)).to(torch_dtype) for a in arrays]


def as_numpy(t):
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("layout, causal", [("HND", True), ("NHD", False)])
def test_sparge_attn_on_cpu_tensors_is_the_numpy_api(dtype, layout, causal):
    np_dtype, torch_dtype = DTYPES[dtype]
    arrays = make_qkv(1, 4, 2, 300, 260, 64, dtype=np_dtype, layout=layout, seed=3)
    q, k, v = tensors(arrays, torch_dtype)
    kw = dict(is_causal=causal, layout=layout, simthreshd1=0.3, cdfthreshd=[0.5, 0.7, 0.9, 0.95],
              pvthreshd=6.0, return_lse=True, return_stats=True)
    out, lse, stats = st.sparge_attn(q, k, v, **kw)
    ref_out, ref_lse, ref_stats = sc.sparge_attn(*(as_numpy(t) for t in (q, k, v)), **kw)
    assert out.dtype == torch_dtype and out.device.type == "cpu" and tuple(out.shape) == arrays[0].shape
    assert lse.dtype == torch.float32 and tuple(lse.shape) == (1, 4, 300)
    assert_equal(as_numpy(out).view(np.uint16 if dtype != "float32" else np.uint32),
                 ref_out.view(np.uint16 if dtype != "float32" else np.uint32), what="out bits")
    assert_equal(lse.numpy(), ref_lse, what="lse")
    assert stats.keys() == ref_stats.keys() and stats["total_sparsity"] == ref_stats["total_sparsity"]
    assert 0 < stats["total_sparsity"] < 1, stats      # both stages skip something on this input


def test_predict_block_map_and_block_sparse_attn_on_cpu_tensors():
    arrays = make_qkv(2, 2, 1, 400, 400, 32, seed=5)
    q, k, v = tensors(arrays, torch.float32)
    bmap = st.predict_block_map(q, k, is_causal=True, topk=0.4, simthreshd1=-1.0)
    ref_map = sc.predict_block_map(*arrays[:2], is_causal=True, topk=0.4, simthreshd1=-1.0)
    assert bmap.dtype == torch.bool and bmap.device.type == "cpu"
    assert_equal(bmap.numpy(), ref_map, what="block map")
    assert not ref_map.all(), "topk 0.4 must drop blocks"
    out = st.block_sparse_attn(q, k, v, bmap, is_causal=True, qk="fp16", pv="fp16")
    ref = sc.block_sparse_attn(*arrays, ref_map, is_causal=True, qk="fp16", pv="fp16")
    assert_equal(out.numpy(), ref, what="block_sparse_attn output")


def test_bad_cpu_tensors_are_refused_like_arrays():
    q, k, v = tensors(make_qkv(1, 2, 2, 100, 100, 64), torch.float32)
    bad = q.clone()
    bad[0, 1, 7, 3] = float("nan")
    with pytest.raises(ValueError, match=r"q: expected finite values, got 1 NaN or Inf"):
        st.sparge_attn(bad, k, v)
    with pytest.raises(TypeError, match=r"q: expected dtype one of .*got float64"):
        st.sparge_attn(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match=r"k: expected a torch tensor, got ndarray"):
        st.sparge_attn(q, k.numpy(), v)
    with pytest.raises(ValueError, match=r"q, k, v: expected one device, got cpu, meta"):
        st.sparge_attn(q, k, v.to("meta"))
    full = torch.ones((1, 2, 1, 2), dtype=torch.bool)
    with pytest.raises(TypeError, match=r"block_map: expected a torch bool tensor, got dtype torch.int8"):
        st.block_sparse_attn(q, k, v, full.to(torch.int8))
    with pytest.raises(TypeError, match=r"block_map: expected a torch bool tensor, got ndarray"):
        st.block_sparse_attn(q, k, v, full.numpy())
    with pytest.raises(ValueError, match=r"block_map: expected a tensor on cpu \(that of q\), got one on meta"):
        st.block_sparse_attn(q, k, v, full.to("meta"))
    with pytest.raises(ValueError, match=r"cdfthreshd: expected values in \(0.0, 1.0\], got 1.5"):
        st.sparge_attn(q, k, v, cdfthreshd=1.5)


def test_tensors_that_require_grad_are_refused():
    """The attention is inference only: an input that requires grad (a Parameter, a tensor of a
    graph) raises instead of returning an output that silently carries no gradient; under
    torch.no_grad() or with .detach() the same inputs run."""
    q, k, v = tensors(make_qkv(1, 2, 2, 100, 100, 64), torch.float32)
    p = torch.nn.Parameter(q.clone())
    with pytest.raises(RuntimeError, match=r"^q: sparge attention is inference only"):
        st.sparge_attn(p, k, v)
    with pytest.raises(RuntimeError, match=r"^k, v: sparge attention is inference only"):
        st.block_sparse_attn(q, k.requires_grad_(), v.requires_grad_(), torch.ones((1, 2, 1, 2), dtype=torch.bool))
    with torch.no_grad():
        a = st.sparge_attn(p, k, v)
    assert_equal(a.numpy(), st.sparge_attn(p.detach(), k.detach(), v.detach()).numpy(), what="output")


def test_thresholds_as_tensors():
    """Thresholds may be torch tensors of any float dtype (0-d, one per head, or a list of 0-d
    tensors), also ones that require grad; the values are those of the equal floats."""
    q, k, v = tensors(make_qkv(1, 2, 2, 300, 300, 64), torch.float32)
    want = st.sparge_attn(q, k, v, simthreshd1=0.25, cdfthreshd=[0.5, 0.75], pvthreshd=[2.0, None])
    got = st.sparge_attn(q, k, v, simthreshd1=torch.tensor(0.25, dtype=torch.bfloat16),
                         cdfthreshd=torch.tensor([0.5, 0.75], requires_grad=True),
                         pvthreshd=[torch.tensor(2.0, dtype=torch.float16), None])
    assert_equal(got.numpy(), want.numpy(), what="output")
    with pytest.raises(TypeError, match=r"cdfthreshd: expected a number or a sequence of 2 numbers, "
                                        r"got a tensor on the meta device"):
        st.sparge_attn(q, k, v, cdfthreshd=torch.tensor(0.5, device="meta"))
