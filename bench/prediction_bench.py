"""Time Stage 1 and the quantization, kernel by kernel, against the attention they serve.

Issue 4, target 4: prediction (statistics + selection + quantization) at most 3% of dense
attention time at L >= 16K, 5% at 8K. For each shape this prints, per kernel launch: the median
time (CUDA events around that launch alone, after warm-up, over ``--reps`` runs of the stage), the
bytes it must move (inputs read once, outputs written once: the floor) and the achieved GB/s; then
the stages and the whole prediction timed as one region, the attention kernel (predicted map, and
all blocks kept = dense work), the public API end to end (which ends with one host sync for the
non-finite check) and torch SDPA where torch is installed.

    PYTHONPATH=. python bench/prediction_bench.py                  # the issue's shapes, fp16, causal
    PYTHONPATH=. python bench/prediction_bench.py --shapes 1,32,8192,128 --reps 50 --out $OUT

Before timing, a correctness gate on a small input: K mean, INT8 Q / K, scales and e4m3 V
bit-identical to reference/ (else the script stops).
"""
from __future__ import annotations

import argparse
import collections
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = ((1, 32, 8192, 128), (1, 32, 16384, 128), (1, 32, 32768, 128), (4, 32, 16384, 128))
K_OPERAND = ("int8", True)                       # the defaults: INT8 Q K with rebalancing


def gate():
    """Stop unless the kernels reproduce the reference's quantized operands on a small input."""
    import cupy

    from sparge_cupy import _gpu
    from sparge_cupy import reference as R
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 1000, 128)).astype(np.float16) for _ in range(3))
    qo, ko, vo = (_gpu.operand(cupy.asarray(x), "HND") for x in (q, k, v))
    st = _gpu.block_statistics(qo, ko, pooled=True)
    q_op, dq, k_op, dk, _ = _gpu.quantize_qk(qo, ko, st, qk="int8", rebalance=True,
                                             with_q_dot_km=False)
    rq, rdq, rk, rdk, rkm = R.quantized_operands(q, k, scale=1.0, qk="int8", rebalance=True)
    checks = {"km": (st.km.get(), rkm[:, :, 0]), "q_op": (q_op.get()[:, :, :1000], rq),
              "k_op": (k_op.get()[:, :, :1000], rk), "dq": (dq.get(), rdq), "dk": (dk.get(), rdk)}
    if _fp8():
        _, dv = _gpu.quantize_v(vo, pv="fp8")
        checks["dv"] = (dv.get(), R.quantize_v_fp8(v)[1][:, :, 0])
    bad = [name for name, (got, want) in checks.items() if not np.array_equal(got, want)]
    if bad:
        sys.exit(f"correctness gate failed: {', '.join(bad)} differ from reference/; not timing")


def _fp8():
    import cupy
    return int(cupy.cuda.Device().compute_capability) >= 89


class LaunchTimer:
    """Wraps _gpu.get_kernel so that every launch is bracketed by its own pair of CUDA events."""

    def __init__(self):
        from sparge_cupy import _gpu
        self._gpu, self._orig = _gpu, _gpu.get_kernel
        self.events = []                         # (label, start, stop) of the current pass

    def __enter__(self):
        import cupy

        def get_kernel(source, name):
            kern = self._orig(source, name)

            def launch(*args, **kw):
                start, stop = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                kern(*args, **kw)
                stop.record()
                self.events.append((name.split("<")[0].replace("sparge::", ""), start, stop))
            return _Proxy(kern, launch)
        self._gpu.get_kernel = get_kernel
        return self

    def __exit__(self, *exc):
        self._gpu.get_kernel = self._orig


class _Proxy:
    """A launch wrapper that forwards attribute writes (max_dynamic_shared_size_bytes) to the kernel."""

    def __init__(self, kern, launch):
        object.__setattr__(self, "_kern", kern)
        object.__setattr__(self, "_launch", launch)

    def __call__(self, *args, **kw):
        self._launch(*args, **kw)

    def __getattr__(self, name):
        return getattr(self._kern, name)

    def __setattr__(self, name, value):
        setattr(self._kern, name, value)


def per_launch_ms(stage, reps, warmup=3):
    """{label: median ms} of every launch ``stage()`` makes; a repeated kernel gets #1, #2."""
    import cupy
    for _ in range(warmup):
        stage()
    samples = collections.defaultdict(list)
    with LaunchTimer() as timer:
        for _ in range(reps):
            timer.events.clear()
            stage()
            cupy.cuda.Device().synchronize()
            seen = collections.Counter()
            for label, start, stop in timer.events:
                seen[label] += 1
                samples[(label, seen[label])].append(cupy.cuda.get_elapsed_time(start, stop))
    return {key: float(np.median(v)) for key, v in samples.items()}


def region_ms(fn, reps):
    """Median ms of ``fn`` as one CUDA-event region (scripts/gpu_suite.py's timer)."""
    from scripts.gpu_suite import _median_ms
    return _median_ms(fn, reps=reps)[0]


def pipeline(B, H, L, D, causal):
    """Random fp16 HND inputs (Hq = Hkv = H) and every stage's keywords and results, built once:
    a namespace with q, k, v, their operands qo, ko, vo, pv, common, sel, attn, st, bmap, qz."""
    import types

    import cupy

    from sparge_cupy import CONFIG, _gpu
    pv = "fp8" if _fp8() else "fp16"
    rng = cupy.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, D), dtype=cupy.float32).astype(cupy.float16)
               for _ in range(3))
    heads = lambda x: np.full(H, x, np.float32)  # noqa: E731
    common = dict(is_causal=causal, scale=D ** -0.5)
    sel = dict(simthreshd1=heads(CONFIG.simthreshd1), cdfthreshd=heads(CONFIG.cdfthreshd),
               topk=None, attention_sink=True)
    attn = dict(pvthreshd=heads(np.inf), qk="int8", pv=pv, return_lse=False, return_stats=False)
    qo, ko, vo = (_gpu.operand(x, "HND") for x in (q, k, v))
    st = _gpu.block_statistics(qo, ko, pooled=True, k_operand=K_OPERAND)
    bmap = _gpu.select(st, Lq=L, Lk=L, **common, **sel)
    qz = _gpu.quantize_operands(qo, ko, vo, st, qk="int8", rebalance=True, pv=pv,
                                with_q_dot_km=False)
    return types.SimpleNamespace(q=q, k=k, v=v, qo=qo, ko=ko, vo=vo, pv=pv, common=common,
                                 sel=sel, attn=attn, st=st, bmap=bmap, qz=qz)


def traffic(B, H, L, D, elem, pv_bytes):
    """Bytes each launch must move (read every input element once, write every output once), by
    (kernel, occurrence) as they launch: block_statistics (with the K operand), select,
    quantize_operands (Q and V)."""
    nq, nk = -(-L // 128), -(-L // 64)
    x = B * H * L * D * elem                     # one of Q, K, V (Hq = Hkv here)
    stats = B * H * D * 4                        # one [B, H, D] float32 vector
    kblocks = B * H * nk * D                     # one [B, H, nk, D] array's elements
    select = B * H * nq * nk * (4 + 1) + B * H * (nq + nk) * 4    # S^ in, map out, similarities
    return {
        ("q_stats", 1): x + B * H * nq * (2 * D * 4 + 4) + stats,      # qbar, block_amax, sim
        ("k_sums", 1): x + kblocks * (8 + 4 + 4),                      # sums, max, min
        ("head_scales", 1): kblocks * 16 + 4 * stats,
        ("k_pass", 1): x + kblocks * 8 + 2 * stats + kblocks * 4 + B * H * nk * 4
        + B * H * nk * 64 * D + B * H * nk * 4,                        # kbar, sim, operand, dk
        ("compressed_map", 1): B * H * (nq + nk) * D * 4 + B * H * nq * nk * 4,
        ("qbar_keys_mma", 1): B * H * nq * D * 4 + x + B * H * nq * nk * 4,   # qbar, K, S^
        ("select_blocks", 1): select,
        ("select_rows", 1): select,                                    # nk <= 512
        ("quantize_q", 1): x + B * H * nq * D * 4 + B * H * nq * 128 * D + B * H * nq * 4,
        ("v_channel_amax", 1): x + stats,
        ("quantize_v", 1): x + 2 * stats + B * H * D * nk * 64 * pv_bytes,
    }


def bench_shape(B, H, L, D, reps, causal=True):
    import cupy

    import sparge_cupy as sc
    from sparge_cupy import _gpu
    P = pipeline(B, H, L, D, causal)
    q, k, v, qo, ko, vo, pv, st, bmap, qz = P.q, P.k, P.v, P.qo, P.ko, P.vo, P.pv, P.st, P.bmap, P.qz
    common, sel, attn = P.common, P.sel, P.attn
    full = cupy.ones_like(bmap)

    def stats():
        _gpu.block_statistics(qo, ko, pooled=True, nonfinite=_gpu.nonfinite_counter(),
                              k_operand=K_OPERAND)

    def select():
        _gpu.select(st, Lq=L, Lk=L, **common, **sel)

    mass = dict(sel, cdfthreshd=None, mass_threshold=np.ones(H, np.float32))

    def select_mass():
        _gpu.select(st, Lq=L, Lk=L, **common, **mass)

    def select_qbar_keys():
        _gpu.select(st, ko, Lq=L, Lk=L, predictor="qbar_keys", **common, **mass)

    st_g = _gpu.block_statistics(qo, ko, pooled=True, q_groups=True)

    def q_groups():
        _gpu.block_statistics(qo, ko, pooled=False, q_groups=True)

    def select_qgroup_keys():
        _gpu.select(st_g, ko, Lq=L, Lk=L, predictor="qgroup_keys", **common, **mass)

    def quant():
        _gpu.quantize_operands(qo, ko, vo, st, qk="int8", rebalance=True, pv=pv,
                               with_q_dot_km=False, nonfinite=_gpu.nonfinite_counter())

    def prediction():
        counter = _gpu.nonfinite_counter()
        s = _gpu.block_statistics(qo, ko, pooled=True, nonfinite=counter, k_operand=K_OPERAND)
        _gpu.select(s, Lq=L, Lk=L, **common, **sel)
        _gpu.quantize_operands(qo, ko, vo, s, qk="int8", rebalance=True, pv=pv,
                               with_q_dot_km=False, nonfinite=counter)

    shape = f"B{B} H{H} L{L} D{D} fp16 {'causal' if causal else 'full'}"
    rows = []
    moved = traffic(B, H, L, D, 2, 1 if pv == "fp8" else 2)
    launches = {}
    for fn in (stats, select, quant):
        launches.update(per_launch_ms(fn, reps))
    key = ("qbar_keys_mma", 1)                   # its select_rows would replace TopCdf's
    launches[key] = per_launch_ms(select_qbar_keys, reps)[key]
    key = ("q_groups", 1)                        # predictor="qgroup_keys": its own pass over Q
    launches[key] = per_launch_ms(q_groups, reps)[key]
    grouped = per_launch_ms(select_qgroup_keys, reps)
    launches[("qbar_keys_mma, 32-row query groups", 1)] = grouped[("qbar_keys_mma", 1)]
    launches[("group_mass_map", 1)] = grouped[("group_mass_map", 1)]
    for (label, occ), ms in launches.items():
        nbytes = moved.get((label, occ))
        name = label + {("q_stats", 1): " (Q)", ("k_sums", 1): " (K)",
                        ("k_pass", 1): " (K - km, K operand)", ("quantize_q", 1): " (Q)",
                        ("quantize_v", 1): " (V)"}.get((label, occ), "")
        rows.append((shape, "kernel", name, ms, nbytes, nbytes / ms / 1e6 if nbytes else None))
    dense_ms = region_ms(lambda: _gpu.run_attention(qo, ko, qz, full, **common, **attn), reps)
    regions = [
        ("block_statistics (q_stats, k_sums, head_scales, k_pass with the K operand)", stats),
        ("select (compressed_map, select_blocks)", select),
        ("select, mass threshold rule (no sort)", select_mass),
        ("select, qbar-keys estimate + mass threshold (qbar_keys_mma, select_rows)", select_qbar_keys),
        ("select, query-group estimate + mass threshold (qbar_keys_mma on 32-row groups, "
         "group_mass_map, select_rows; q_groups not included)", select_qgroup_keys),
        ("quantize_operands (Q, V; K made by k_pass)", quant),
        ("prediction = statistics + selection + quantization", prediction),
        ("attention kernel, predicted map", lambda: _gpu.run_attention(qo, ko, qz, bmap, **common, **attn)),
        ("sparge_cupy.sparge_attn (API, end to end)",
         lambda: sc.sparge_attn(q, k, v, is_causal=causal, pv=pv)),
    ]
    total_bytes = sum(moved.values()) - (0 if pv == "fp8" else moved[("v_channel_amax", 1)])
    for what, fn in regions:
        ms = region_ms(fn, reps)
        nbytes = total_bytes if what.startswith("prediction") else None
        rows.append((shape, "region", what, ms, nbytes, nbytes / ms / 1e6 if nbytes else None))
    rows.append((shape, "region", "attention kernel, all blocks kept (dense work)", dense_ms, None, None))
    pred_ms = next(r[3] for r in rows if r[2].startswith("prediction"))
    try:
        import torch
        import torch.nn.functional as F
        tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v))
        sdpa_ms = region_ms(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal), reps)
        rows.append((shape, "region", "torch SDPA fp16 (dense)", sdpa_ms, None, None))
    except ImportError:
        sdpa_ms = None
    ratio = f"prediction / our dense attention {pred_ms / dense_ms:.1%}" + (
        f", / torch SDPA {pred_ms / sdpa_ms:.1%}" if sdpa_ms else "")
    rows.append((shape, "ratio", ratio, None, None, None))
    return rows


def profile_once(B, H, L, D, causal=True):
    """The prediction once, after the pipeline's own first run (compilation) and a sync."""
    import cupy

    from sparge_cupy import _gpu
    P = pipeline(B, H, L, D, causal)
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.start()          # ncu --profile-from-start off: these launches only
    counter = _gpu.nonfinite_counter()
    st = _gpu.block_statistics(P.qo, P.ko, pooled=True, nonfinite=counter, k_operand=K_OPERAND)
    _gpu.select(st, Lq=L, Lk=L, **P.common, **P.sel)
    _gpu.quantize_operands(P.qo, P.ko, P.vo, st, qk="int8", rebalance=True, pv=P.pv,
                           with_q_dot_km=False, nonfinite=counter)
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="*", default=None,
                    help="B,H,L,D (Hq = Hkv); default: the issue's four shapes")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None, help="folder for prediction_bench.csv")
    ap.add_argument("--profile", action="store_true",
                    help="no timing: build each shape's pipeline, then run the prediction once "
                         "(for a profiler such as ncu, which times each launch itself)")
    args = ap.parse_args(argv)
    import cupy
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    if args.profile:
        for B, H, L, D in shapes:
            profile_once(B, H, L, D)
        return
    gate()
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    print(f"# Prediction kernels on {name} (CUDA events, median of {args.reps}; GB/s = the "
          f"bytes each launch must move / its time)\n")
    print("| shape | kind | what | ms | MB moved | GB/s |\n| --- | --- | --- | --- | --- | --- |")
    all_rows = []
    for B, H, L, D in shapes:
        rows = bench_shape(B, H, L, D, args.reps)
        all_rows += rows
        for shape, kind, what, ms, nbytes, gbs in rows:
            print(f"| {shape} | {kind} | {what} | {'' if ms is None else f'{ms:.4f}'} | "
                  f"{'' if nbytes is None else f'{nbytes / 1e6:.1f}'} | "
                  f"{'' if gbs is None else f'{gbs:.0f}'} |", flush=True)
        cupy.get_default_memory_pool().free_all_blocks()
    if args.out:
        path = Path(args.out) / "prediction_bench.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["gpu", "shape", "kind", "what", "ms", "bytes", "GB/s"])
            w.writerows([name, *r] for r in all_rows)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
