"""Benchmark SpargeAttn against the attention a user has on the same GPU.

Rows: this package through ``sparge_cupy.torch`` (defaults: INT8 QK^T with channel rebalancing,
FP8 P V; also ``qk="fp16"``) on fixed block maps of a given density and end-to-end with predicted
maps; our default modes once more as the attention kernel alone (``sparge_int8_fp8_kernel``: the
operands quantized once outside the timed region, with the statistics and quantization time of the
same call path in ``quant_ms``, what the ``sparge_int8_fp8`` row pays on top of the kernel);
against PyTorch ``scaled_dot_product_attention`` (flash and cuDNN backends),
``flex_attention`` (compiled) given the same block map as a ``BlockMask``, and ``sageattention``
1.0.6 (Triton INT8), all measured in this one process on this one card.

Every row is gated on correctness first: its output on sampled query rows is compared with exact
float64 attention (the same block map for block-sparse rows); a row over its gate prints FAIL and
is not timed. Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed
before each run; at least 5 timed runs per row). Throughput is dense-equivalent, SPEC.md section 4: ``4 B H sum_t(visible keys) D
/ t`` (causal counts only unmasked pairs), so a sparse row gets credit for the work it skipped.

    python bench/run_bench.py --L 8192 16384 --D 64 128 --density 1 0.5 0.25 0.1 --out bench/results

``--methods`` runs some of the rows only (e.g. ``sdpa_cudnn sparge_int8_fp8 sparge_int8_fp8_kernel``);
``--dtype bfloat16`` runs every row on bf16 inputs (ours through the torch adapter, whose bf16
travels as 16-bit storage: CuPy has no bfloat16), into files named with the dtype.
needs a CUDA GPU, torch and cupy; sageattention is optional (``pip install sageattention==1.0.6``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from provenance import git_commit  # noqa: E402  (real_maps.py uses it as rb.git_commit too)
BQ, BK = 128, 64
GATE = {"ours": 0.08, "sage": 0.05, "fp16": 0.01}   # relative L1 on sampled rows, random inputs
DTYPES = ("float16", "bfloat16")
METHODS = ("sdpa_flash", "sdpa_cudnn", "sageattn_1.0.6", "flex_attention", "sparge_int8_fp8",
           "sparge_fp16_fp8", "sparge_int8_fp16", "sparge_fp16_fp16", "sparge_int8_fp8_kernel",
           "sparge_e2e_tau0.9")


def visible_pairs(Lq, Lk, causal):
    if not causal:
        return Lq * Lk
    t = np.arange(Lq, dtype=np.int64)
    return int(np.clip(t + (Lk - Lq) + 1, 0, Lk).sum())


def valid_blocks(Lq, Lk, causal):
    nq, nk = -(-Lq // BQ), -(-Lk // BK)
    if not causal:
        return np.ones((nq, nk), bool)
    last = np.minimum((np.arange(nq) + 1) * BQ, Lq) - 1
    return (np.arange(nk) * BK)[None, :] <= last[:, None] + (Lk - Lq)


def fixed_density_map(B, H, Lq, Lk, density, causal, seed=0):
    """Per query block, round(density * valid) random valid key blocks (at least one)."""
    rng = np.random.default_rng(seed)
    valid = valid_blocks(Lq, Lk, causal)
    nq, nk = valid.shape
    score = np.where(valid, rng.random((B, H, nq, nk)), -1.0)
    n_keep = np.maximum(1, np.round(density * valid.sum(-1))).astype(int)          # [nq]
    rank = np.argsort(np.argsort(-score, axis=-1), axis=-1)
    return (rank < n_keep[:, None]) & valid


def exact_rows(q, k, v, rows, heads, *, causal, scale, block_map=None):
    """float64 attention of the sampled (head, row) pairs, on the GPU: [len(heads), len(rows), D]."""
    import torch
    Hq, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    g = Hq // k.shape[1]
    out = []
    for h in heads:
        qr = q[0, h, rows].double()
        s = (qr @ k[0, h // g].double().T) * scale
        keys = torch.arange(Lk, device=q.device)
        mask = torch.ones_like(s, dtype=torch.bool)
        if causal:
            mask &= keys[None, :] <= rows[:, None] + (Lk - Lq)
        if block_map is not None:
            mask &= block_map[0, h][rows // BQ][:, keys // BK]
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out.append(p @ v[0, h // g].double())
    return torch.stack(out)


def rel_l1(out, ref):
    return float((out.double() - ref).abs().sum() / ref.abs().sum())


def card_name():
    import torch
    return torch.cuda.get_device_name()


def methods(q, k, v, bm_t, *, causal, scale, density):
    """name -> (callable, gate class, is block-sparse). Missing libraries just leave rows out."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import sparge_cupy.torch as st

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                      enable_gqa=q.shape[1] != k.shape[1])
        return run

    m = {}
    if density == 1.0:
        m["sdpa_flash"] = (sdpa(SDPBackend.FLASH_ATTENTION), "fp16", False)
        m["sdpa_cudnn"] = (sdpa(SDPBackend.CUDNN_ATTENTION), "fp16", False)
        try:
            import sageattention
            m["sageattn_1.0.6"] = (lambda: sageattention.sageattn(q, k, v, tensor_layout="HND", is_causal=causal,
                                                                   sm_scale=scale), "sage", False)
        except ImportError as e:     # a row that says so: a missing baseline must show
            def missing(e=e):
                raise RuntimeError(f"sageattention not importable: {e}")
            m["sageattn_1.0.6"] = (missing, "sage", False)
    try:
        from torch.nn.attention.flex_attention import flex_attention
        bmask = flex_block_mask(bm_t, q.shape[2], k.shape[2], causal)
        # One compiled graph per shape and mask: past Dynamo's default of 8 recompilations flex
        # would silently run eagerly (unfused, an L x L score buffer: out of memory at 16K).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 4096)
        flex = torch.compile(flex_attention, dynamic=False)
        # Its kernel tiles must divide our blocks (128 x 64); inductor's default at D = 64 is
        # 128 x 128, and at D = 256 the default falls back to an unfused (L x L) path.
        tiles = {64: {"BLOCK_M": 128, "BLOCK_N": 64}, 256: {"BLOCK_M": 64, "BLOCK_N": 64}}
        opts = tiles.get(q.shape[-1])
        m["flex_attention"] = (lambda: flex(q, k, v, block_mask=bmask, scale=scale,
                                            enable_gqa=q.shape[1] != k.shape[1],
                                            kernel_options=opts), "fp16", True)
    except Exception as e:  # a row that says why, and the other rows go on
        def unavailable(e=e):
            raise RuntimeError(f"flex_attention setup failed: {type(e).__name__}: {e}")
        m["flex_attention"] = (unavailable, "fp16", True)
    m["sparge_int8_fp8"] = (lambda: st.block_sparse_attn(q, k, v, bm_t, is_causal=causal, scale=scale),
                            "ours", True)
    m["sparge_fp16_fp8"] = (lambda: st.block_sparse_attn(q, k, v, bm_t, is_causal=causal, scale=scale,
                                                         qk="fp16"), "ours", True)
    m["sparge_int8_fp16"] = (lambda: st.block_sparse_attn(q, k, v, bm_t, is_causal=causal, scale=scale,
                                                          pv="fp16"), "ours", True)
    m["sparge_fp16_fp16"] = (lambda: st.block_sparse_attn(q, k, v, bm_t, is_causal=causal, scale=scale,
                                                          qk="fp16", pv="fp16"), "fp16", True)
    return m


def kernel_only(q, k, v, bm_t, *, causal, scale):
    """Our default modes (INT8 QK^T with rebalancing, FP8 P V, Stage 2 off) split where
    ``sparge_cupy.torch.block_sparse_attn`` runs them, both on torch's current stream:

    - ``quantize()``: the statistics and quantization passes of that call (``block_statistics``
      without pooling, ``quantize_operands``, with the NaN/Inf counter they fill); not included are
      the argument checks, the DLPack views and the one host read of the counter at the end;
    - ``run()``: the attention kernel alone: one launch on the operands of the first ``quantize()``
      into one torch output. The first ``run()`` quantizes (and checks the counter) and prepares
      the launch (``prepare_attention``: the parameter struct, the tensor maps, the upload of the
      per-head lambda) outside the timed runs, so that a setup error lands in the row like any
      other error and a timed run is the launch alone: at L <= 2K, where the kernel takes
      0.1-0.4 ms, timing the preparation too made the row measure the host (up to 2x between
      processes, ``bench/results/small_L_2026-12-06_h100_d4254e5.md``).
    """
    import cupy
    import torch

    from sparge_cupy import _gpu
    from sparge_cupy.torch import _operands, _to_cupy
    dev = q.device.index
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(q.device).cuda_stream, dev)
    qo, ko, vo = _operands("HND", q, k, v)         # bf16 as uint16 storage, as the adapter does
    bmap = cupy.from_dlpack(bm_t.contiguous().view(torch.uint8)).view(cupy.bool_)
    no_filter = np.full((q.shape[1],), np.inf, dtype=np.float32)   # pvthreshd=None: Stage 2 off
    qz = launch = out = None

    def quantize():
        nonlocal qz
        with cupy.cuda.Device(dev), stream:
            counter = _gpu.nonfinite_counter()
            st = _gpu.block_statistics(qo, ko, pooled=False, nonfinite=counter)
            qz = _gpu.quantize_operands(qo, ko, vo, st, qk="int8", rebalance=True, pv="fp8",
                                        with_q_dot_km=False, nonfinite=counter)
        return counter

    def run():
        nonlocal launch, out
        if launch is None:
            counter = quantize()
            stream.synchronize()
            _gpu.check_counter(counter, q=qo, k=ko, v=vo)
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            with cupy.cuda.Device(dev), stream:
                launch = _gpu.prepare_attention(qo, ko, qz, bmap, is_causal=causal, scale=scale,
                                                pvthreshd=no_filter, qk="int8", pv="fp8", return_lse=False,
                                                return_stats=False, out=_to_cupy(out, "out")[0])
        with cupy.cuda.Device(dev), stream:
            launch()
        return out

    return run, quantize


def flex_block_mask(bm_t, Lq, Lk, causal):
    """Our block map as a flex_attention BlockMask, built from block indices (no L x L mask).

    Kept blocks that every (query, key) pair may see are "full" blocks; with causal masking the
    kept blocks that straddle the diagonal are "partial" blocks evaluated through the mask_mod.
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask
    nq, nk = bm_t.shape[-2:]
    off = Lk - Lq
    i = torch.arange(nq, device=bm_t.device)[:, None]
    j = torch.arange(nk, device=bm_t.device)[None, :]
    first_row = i * BQ
    last_key = torch.clamp((j + 1) * BK, max=Lk) - 1
    whole = (last_key <= first_row + off) if causal else torch.ones_like(i * j, dtype=torch.bool)
    full = bm_t & whole
    partial = bm_t & ~whole

    def indices(m):
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return m.sum(-1).to(torch.int32), order

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)

    def mask_mod(b, h, q_idx, kv_idx):
        # Evaluated only on partial blocks by the fused kernel; the unfused fallback evaluates it
        # everywhere, so it carries the block map too.
        keep = bm_t[b, h, q_idx // BQ, kv_idx // BK]
        return (keep & (kv_idx <= q_idx + off)) if causal else keep

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(BQ, BK),
                                    mask_mod=mask_mod, seq_lengths=(Lq, Lk))


def peak_extra_bytes(fn):
    """Peak device memory a call adds: torch's allocator peak plus what CuPy's pool holds."""
    import cupy
    import torch
    pool = cupy.get_default_memory_pool()
    torch.cuda.synchronize()
    pool.free_all_blocks()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base + pool.total_bytes()


MIN_RUNS = 5     # timed runs per row at least: do_bench times rep / (its estimate) runs, one at
                 # L = 32K with --reps-ms 20, which made those rows single shots


# The background nvidia-smi sampler of main() (gpu_clocks.ClockSampler), or None.
CLOCKS = None


def median_ms(fn, reps_ms, warmup=25, row=None):
    """The median of ``triton.testing.do_bench`` over at least MIN_RUNS timed runs; with ``row``,
    also the SM clock, power and power-cap share sampled meanwhile (``sm_mhz``, ``sm_mhz_min``,
    ``power_w``, ``power_capped``: blank without nvidia-smi)."""
    import triton.testing
    t0 = time.time()
    ms = triton.testing.do_bench(fn, warmup=warmup, rep=reps_ms, return_mode="median")
    if MIN_RUNS * ms > reps_ms:
        ms = triton.testing.do_bench(fn, warmup=warmup, rep=int(MIN_RUNS * ms * 1.2) + 1, return_mode="median")
    if row is not None and CLOCKS is not None:
        row.update(CLOCKS.window(t0, time.time()))
    return ms


def gate_and_time(row, fn, ref, gate, *, heads, rows, flops, reps_ms):
    """Fill ``row`` for ``fn``: its error on the sampled rows against ``ref`` and, if within
    ``GATE[gate]``, its median time, TOPS and peak extra memory. Returns whether it was timed."""
    import torch
    try:
        out = fn()
        torch.cuda.synchronize()
        err = rel_l1(out[0][heads][:, rows], ref)
    except Exception as e:
        row.update(status=f"ERROR {type(e).__name__}: {str(e)[:80]}")
        return False
    row["rel_l1"] = err
    if not math.isfinite(err) or err > GATE[gate]:
        row["status"] = "FAIL"
        return False
    ms = median_ms(fn, reps_ms, warmup=max(25, reps_ms // 4), row=row)
    row.update(status="ok", ms=ms, tops=flops / (ms * 1e-3) / 1e12, extra_mb=peak_extra_bytes(fn) / 2 ** 20)
    return True


def bench_case(B, H, Hkv, L, D, causal, density, *, dtype, reps_ms, rows_sampled=256, only=None):
    """The rows of one case; ``only``: the method names to run (None: all)."""
    import torch

    import sparge_cupy.torch as st
    torch.manual_seed(0)
    q = torch.randn(B, H, L, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype)
    scale = D ** -0.5
    bm = fixed_density_map(B, H, L, L, density, causal)
    bm_t = torch.from_numpy(bm).cuda()
    kept = bm.sum() / (B * H * valid_blocks(L, L, causal).sum())
    flops = 4 * B * H * visible_pairs(L, L, causal) * D
    rows = torch.randint(0, L, (rows_sampled,), device="cuda")
    heads = [0, H - 1]
    ref_dense = exact_rows(q, k, v, rows, heads, causal=causal, scale=scale)
    ref_sparse = exact_rows(q, k, v, rows, heads, causal=causal, scale=scale, block_map=bm_t)
    case = dict(card=card_name(), B=B, H=H, Hkv=Hkv, L=L, D=D, causal=causal,
                density=round(float(kept), 4), dtype=str(dtype).replace("torch.", ""))
    timing = dict(heads=heads, rows=rows, flops=flops, reps_ms=reps_ms)
    results = []

    def wanted(name):
        return only is None or name in only

    for name, (fn, gate, sparse) in methods(q, k, v, bm_t, causal=causal, scale=scale, density=density).items():
        if not wanted(name):
            continue
        row = dict(case, method=name)
        gate_and_time(row, fn, ref_sparse if sparse else ref_dense, gate, **timing)
        results.append(row)
    # The kernel alone (extra_mb: its output plus the quantized operands it reads), then what the
    # sparge_int8_fp8 row pays before it: statistics and quantization, in quant_ms.
    if wanted("sparge_int8_fp8_kernel"):
        run, quantize = kernel_only(q, k, v, bm_t, causal=causal, scale=scale)
        row = dict(case, method="sparge_int8_fp8_kernel")
        if gate_and_time(row, run, ref_sparse, "ours", **timing):
            row["quant_ms"] = median_ms(quantize, reps_ms)
        results.append(row)
        del run, quantize   # they hold the quantized operands
    # end-to-end with a predicted map (prediction included) and prediction alone
    for name, kw in (("sparge_e2e_tau0.9", dict(cdfthreshd=0.9, simthreshd1=0.3)),):
        if density != 1.0 or not wanted(name):
            break
        e2e = functools.partial(st.sparge_attn, q, k, v, is_causal=causal, scale=scale, **kw)
        pred = functools.partial(st.predict_block_map, q, k, is_causal=causal, scale=scale, **kw)
        pm = pred()
        kept_p = float(pm.float().mean() / (valid_blocks(L, L, causal).mean()))
        err = rel_l1(e2e()[0][heads][:, rows], exact_rows(q, k, v, rows, heads, causal=causal, scale=scale,
                                                         block_map=pm))
        clocks = {}
        ms = median_ms(e2e, reps_ms, row=clocks)
        ms_pred = median_ms(pred, reps_ms)
        results.append(dict(card=card_name(), method=name, B=B, H=H, Hkv=Hkv, L=L, D=D, causal=causal,
                            density=round(kept_p, 4), dtype=str(dtype).replace("torch.", ""),
                            rel_l1=err, status="ok" if err <= GATE["ours"] else "FAIL", ms=ms,
                            tops=flops / (ms * 1e-3) / 1e12, predict_ms=ms_pred, **clocks))
    return results


FIELDS = ["card", "method", "B", "H", "Hkv", "L", "D", "causal", "density", "dtype", "status", "rel_l1",
          "ms", "tops", "predict_ms", "extra_mb", "quant_ms",
          "sm_mhz", "power_w", "power_capped", "sm_mhz_min"]   # new columns go at the end


def table(rows):
    lines = ["| method | L | D | causal | density | rel L1 | ms | TOPS | x flash | x cuDNN | quant ms | "
             "SM MHz (power-capped) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        if r["method"] in ("sdpa_flash", "sdpa_cudnn") and "ms" in r:
            base[(r["method"], r["L"], r["D"], r["causal"])] = r["ms"]
    for r in rows:
        key = (r["L"], r["D"], r["causal"])
        f, c = base.get(("sdpa_flash",) + key), base.get(("sdpa_cudnn",) + key)
        ms = r.get("ms")
        lines.append("| {} | {} | {} | {} | {:.2f} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["method"], r["L"], r["D"], "yes" if r["causal"] else "no", r["density"],
            f"{r['rel_l1']:.4f}" if "rel_l1" in r else "-", f"{ms:.3f}" if ms else "-",
            f"{r['tops']:.0f}" if ms else "-", f"{f / ms:.2f}" if ms and f else "-",
            f"{c / ms:.2f}" if ms and c else "-",
            f"{r['quant_ms']:.3f}" if "quant_ms" in r else "-",
            f"{r['sm_mhz']:.0f} ({r['power_capped']:.0%})" if "sm_mhz" in r else "-", r["status"]))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--Hkv", type=int, default=None)
    ap.add_argument("--L", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--D", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--density", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.1])
    ap.add_argument("--dtype", choices=DTYPES, default="float16",
                    help="the inputs' dtype (bfloat16: our rows through the torch adapter's bf16 "
                         "path); a bfloat16 run's files are named with it")
    ap.add_argument("--reps-ms", type=int, default=200, help="do_bench's rep (ms of timed runs)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default="bench")
    ap.add_argument("--flex-min-L", type=int, default=0,
                    help="flex_attention rows only at L >= this (its compilation per shape is the "
                         "slowest part of a long sweep; issue 4's flex target is for L >= 8K)")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS, metavar="NAME",
                    help=f"run only these rows (default: all): {', '.join(METHODS)}")
    args = ap.parse_args(argv)

    import torch

    from gpu_clocks import ClockSampler
    global CLOCKS
    CLOCKS = ClockSampler(torch.cuda.current_device())
    rows = []
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    card = card_name().replace(" ", "_") + ("" if args.dtype == "float16" else f"_{args.dtype}")
    csv_path = out / f"{args.tag}_{stamp}_{card}.csv"

    def write():                       # after every case: a run cut short keeps what it measured
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        md = (f"# Benchmark, {card_name()}, {stamp}, commit {git_commit()}\n\n"
              f"torch {torch.__version__}, python {platform.python_version()}, B={args.B}, H={args.H}, {args.dtype}, "
              f"random inputs; dense-equivalent TOPS (SPEC.md section 4); median of do_bench "
              f"(L2 flushed); command: `python bench/run_bench.py {' '.join(argv or sys.argv[1:])}`\n\n"
              + table(rows) + "\n")
        (out / f"{args.tag}_{stamp}_{card}.md").write_text(md)

    t_start = time.perf_counter()
    try:
        for D in args.D:
            for L in args.L:
                for causal in causals:
                    for d in args.density:
                        print(f"L={L} D={D} causal={causal} density={d} "
                              f"({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
                        only = args.methods
                        if L < args.flex_min_L:
                            only = [m for m in (only or METHODS) if m != "flex_attention"]
                        rows += bench_case(args.B, args.H, args.Hkv or args.H, L, D, causal, d,
                                           dtype=getattr(torch, args.dtype), reps_ms=args.reps_ms,
                                           only=only)
                        write()
                        gc.collect()               # the case's tensors (a failed flex setup keeps a
                        torch.cuda.empty_cache()   # reference cycle through its traceback), then the cache
    finally:                           # nvidia-smi stops also when a case raises
        CLOCKS.close()
    print(table(rows))
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
