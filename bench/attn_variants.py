"""Time versions of the attention kernel (cuda/sparse_attn.cu, and candidate copies added to
VERSIONS while one is being tried) against torch SDPA, on one card, in one process: the kernel alone on prepared operands, all blocks
kept, filter off, CUDA events, median after warm-up.

    python bench/attn_variants.py                      # table: every version x shape, + SDPA
    python bench/attn_variants.py --ncu --versions wgmma  # one launch (for ncu)
    python bench/attn_variants.py --quick --versions mma wgmma
    python bench/attn_variants.py --versions wgmma wgmma@/tmp/old_cuda --shapes 4,32,8192,128,1,0.1

A version ``kernel@folder`` is that kernel built from the sources in ``folder`` (e.g. an older
commit's ``cuda/``, for a before / after in one process); ``--shapes B,H,L,D,CAUSAL,DENSITY ...``
replaces the default shapes (block maps of that density drawn at random, block column 0 kept).

Versions: the two kernels of cuda/sparse_attn.cu as the package builds them (mma: mma.sync,
wgmma: sm_90a warpgroup MMA with TMA loads) and builds with extra NVRTC options (VERSIONS);
bench/NOTES.md records what each was measured at.

Dense-equivalent TOPS as SPEC.md section 4 counts them (causal: unmasked pairs only).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cupy as cp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sparge_cupy import _compile, _gpu  # noqa: E402

BQ, BK = _gpu.BQ, _gpu.BK


VERSIONS = {  # name: (kernel of cuda/sparse_attn.cu, extra NVRTC options or None for the
              #        package's own build)
    "mma": ("mma", None),
    "wgmma": ("wgmma", None),
    "wgmma-1cta": ("wgmma", ("-DSPARGE_WG_MIN_BLOCKS=1",)),
    "wgmma-3cta": ("wgmma", ("-DSPARGE_WG_MIN_BLOCKS=3",)),
    "wgmma-no-ovl": ("wgmma", ("-DSPARGE_WG_OVERLAP=0",)),
    "wgmma-ovl-all": ("wgmma", (f"-DSPARGE_WG_OVERLAP={_compile.wg_overlap_mask((64, 128, 256))}",)),
    "wgmma-no-list": ("wgmma", ("-DSPARGE_WG_MAP_LIST=0",)),        # MapScan (read by map_list)
    "wgmma-list-no-mask-from": ("wgmma", ("-DSPARGE_WG_MASK_FROM=0",)),
    "wgmma-no-prologue": ("wgmma", (f"-DSPARGE_WG_OVERLAP={_compile.wg_overlap_mask(_compile.WG_OVERLAP_DIMS)}",
                                    "-DSPARGE_WG_EARLY_Q=0", "-DSPARGE_WG_MAP_PREFETCH=0")),
}


def overlap_dims(version):
    """The head dims at which a version overlaps (its SPARGE_WG_OVERLAP; the package's own
    build: None, the package's setting)."""
    extra = parse_version(version)[1]
    if extra is None:
        return None
    for opt in extra:
        if opt.startswith("-DSPARGE_WG_OVERLAP="):
            mask = int(opt.split("=")[1])
            return tuple(d for d in _compile.HEAD_DIMS if (mask >> (d // 64)) & 1)
    return tuple(_compile.WG_OVERLAP_DIMS)   # the source's default mirrors the package's


def map_list(version, D, qk, pv, nk):
    """Whether a wgmma version reads the kept key blocks from a list (sparse_attn_wg's LIST):
    as the package chooses (_gpu.wg_map_list), but never with -DSPARGE_WG_MAP_LIST=0; None for a
    folder's source from before the list (its kernel has no LIST argument)."""
    which, extra, folder = parse_version(version)
    if which != "wgmma" or "-DSPARGE_WG_MAP_LIST=0" in (extra or ()):
        return False
    if folder is not None and "bool LIST>" not in _compile.source_text("sparse_attn.cu", folder):
        return None
    return _gpu.wg_map_list(D, qk, pv, nk, overlap_dims(version))


def parse_version(version):
    """(kernel, extra NVRTC options or None, source folder or None) of a version name."""
    if "@" in version:
        which, folder = version.split("@", 1)
        return which, (), folder
    which, extra = VERSIONS[version]
    return which, extra, None


def kernel(version, D, qk, pv, lst, dtype="float16"):
    which, extra, folder = parse_version(version)
    name = _compile.attn_name(D, qk, pv, dtype, which, bool(lst))
    if lst is None and which == "wgmma":
        name = name.rsplit(", ", 1)[0] + ">"
    if extra is None:
        return _compile.get_kernel("sparse_attn.cu", name)
    opts = _compile.base_options() + (_compile.arch_flag(90),) + tuple(extra)
    return _compile.Kernel(cp.RawModule(code=_compile.source_text("sparse_attn.cu", folder), options=opts,
                                        name_expressions=[name]).get_function(name))


def visible_pairs(Lq, Lk, causal):
    if not causal:
        return Lq * Lk
    t = np.arange(Lq, dtype=np.int64)
    return int(np.clip(t + (Lk - Lq) + 1, 0, Lk).sum())


def prepare(B, H, L, D, causal, qk, pv, density=1.0, seed=0):
    rs = cp.random.RandomState(seed)
    q, k, v = (rs.standard_normal((B, H, L, D), dtype=cp.float32).astype(cp.float16) for _ in range(3))
    qo, ko, vo = (_gpu.operand(x, "HND") for x in (q, k, v))
    st = _gpu.block_statistics(qo, ko, pooled=False)
    qz = _gpu.quantize_operands(qo, ko, vo, st, qk=qk, rebalance=True, pv=pv, with_q_dot_km=False)
    nq, nk = -(-L // BQ), -(-L // BK)
    if density >= 1.0:
        bmap = cp.ones((B, H, nq, nk), cp.bool_)
    else:
        bmap = cp.random.RandomState(seed + 1).random_sample((B, H, nq, nk)) < density
        bmap[..., 0] = True
    return (q, k, v), qo, ko, qz, bmap


def launcher(version, qo, ko, qz, bmap, causal, qk, pv):
    B, Hq, Lq, D = qo.shape
    _, Hkv, Lk, _ = ko.shape
    nq, nk = -(-Lq // BQ), -(-Lk // BK)
    which = parse_version(version)[0]
    threads = _gpu.THREADS
    lst = map_list(version, D, qk, pv, nk)
    kern = kernel(version, D, qk, pv, lst)
    smem = _gpu.attn_smem_bytes(D, qk, pv, which, overlap_dims(version), nk=nk, map_list=bool(lst))
    if smem > 48 * 1024:
        kern.max_dynamic_shared_size_bytes = smem
    out = cp.empty((B, Hq, Lq, D), cp.float16)
    lam = cp.full((Hq,), np.inf, cp.float32)
    params = _gpu._params(
        _gpu.ATTN_PARAMS, q=qz.q_op, k=qz.k_op, vt=qz.vt, dq=qz.dq, dk=qz.dk, dv=qz.dv,
        block_map=bmap, pvthreshd=lam, q_dot_km=None, out=out, lse=None, group_counts=None,
        out_stride_b=Hq * Lq * D, out_stride_h=Lq * D, out_stride_t=D, Hq=Hq, Hkv=Hkv, Lq=Lq,
        Lk=Lk, nq=nq, nk=nk, d_out=D, causal=int(causal), scale=D ** -0.5)
    grid = (nq, Hq, B)
    args = (params,) if which == "mma" else (params, _gpu.wg_tensor_maps(qz, D, qk, pv))

    def run():
        kern(grid, (threads,), args, shared_mem=smem)
    return run, out


def time_ms(fn, warm=5, rep=20):
    for _ in range(warm):
        fn()
    ev = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(rep)]
    for a, b in ev:
        a.record(); fn(); b.record()
    ev[-1][1].synchronize()
    return float(np.median([cp.cuda.get_elapsed_time(a, b) for a, b in ev]))


def sdpa(q, k, v, causal):
    import torch
    import torch.nn.functional as F
    tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v))
    return lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)


SHAPES = [  # B, H, L, D, causal, density
    (1, 32, 8192, 128, True, 1.0), (1, 32, 8192, 128, False, 1.0), (1, 32, 16384, 128, False, 1.0),
    (1, 32, 8192, 64, False, 1.0), (1, 8, 8192, 256, True, 1.0), (1, 32, 8192, 128, False, 0.5),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true", help="one launch of the first version (for ncu)")
    ap.add_argument("--ncu-shape", default="1,32,8192,128,1", metavar="B,H,L,D,CAUSAL[,DENSITY]",
                    help="the --ncu launch's shape (default 1,32,8192,128,1, all blocks kept)")
    ap.add_argument("--versions", nargs="+", default=list(VERSIONS))
    ap.add_argument("--modes", nargs="+", default=["int8-fp8"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="B,H,L,D,CAUSAL,DENSITY")
    a = ap.parse_args()
    if a.ncu:
        B, H, L, D, causal = (int(x) for x in a.ncu_shape.split(",")[:5])
        dens = float(a.ncu_shape.split(",")[5]) if a.ncu_shape.count(",") >= 5 else 1.0
        qk, pv = a.modes[0].split("-")
        _, qo, ko, qz, bmap = prepare(B, H, L, D, bool(causal), qk, pv, dens)
        run, _ = launcher(a.versions[0], qo, ko, qz, bmap, bool(causal), qk, pv)
        run()
        cp.cuda.Device().synchronize()
        return
    rows = []
    shapes = SHAPES[:2] + SHAPES[3:4] if a.quick else SHAPES
    if a.shapes:
        shapes = [tuple(int(x) for x in sh.split(",")[:4]) + (bool(int(sh.split(",")[4])), float(sh.split(",")[5]))
                  for sh in a.shapes]
    for (B, H, L, D, causal, dens) in shapes:
        for mode in a.modes:
            qk, pv = mode.split("-")
            (q, k, v), qo, ko, qz, bmap = prepare(B, H, L, D, causal, qk, pv, dens)
            flops = 4 * B * H * visible_pairs(L, L, causal) * D
            ref = None
            for ver in a.versions:
                run, out = launcher(ver, qo, ko, qz, bmap, causal, qk, pv)
                out.fill(cp.nan)
                run()
                o = out.astype(cp.float32)
                if ref is None:
                    ref = o
                diff = float(cp.abs(o - ref).max()) if bool(cp.isfinite(o).all()) else float("nan")
                ms = time_ms(run)
                rows.append((f"B{B} H{H} L{L} D{D} {'causal' if causal else 'full'} d={dens}",
                             f"{ver} {mode}", ms, flops / ms / 1e9, diff))
                print(*rows[-1], sep=" | ", flush=True)
            if dens >= 1.0 and mode == a.modes[0]:
                ms = time_ms(sdpa(q, k, v, causal))
                rows.append((rows[-1][0], "torch SDPA fp16", ms, flops / ms / 1e9, 0.0))
            del q, k, v, qo, ko, qz, bmap
            cp.get_default_memory_pool().free_all_blocks()
    print(f"\n{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: kernel only, median of 20")
    print(f"{'shape':38s} {'version':22s} {'ms':>8s} {'TOPS':>7s} {'max|d| vs first':>15s}")
    for r in rows:
        print(f"{r[0]:38s} {r[1]:22s} {r[2]:8.3f} {r[3]:7.1f} {r[4]:15.3g}")


if __name__ == "__main__":
    main()
