"""The GPU suite: GPU tests, compute-sanitizer, a few timings; one results file naming the card.

Run from the repository root on a machine with a CUDA GPU:

    python scripts/gpu_suite.py      # writes bench/results/gpu_suite_<date>_<card>_<commit>.md

Stages (each under its own time limit, so a hang costs one stage, not the run):
  1. ``pytest tests/test_gpu.py`` (kernels against reference/; parallel with pytest-xdist where
     installed), per-test outcome and the errors the tests record (against the mirror and
     against dense float64);
  2. compute-sanitizer memcheck, racecheck, synccheck and initcheck over representative shapes
     (tails, GQA/MQA, causal with Lq != Lk, D 256, padded D 80, every qk/pv mode, bf16 through
     torch), running this script in ``--worker`` mode;
  3. timings with CUDA events (warm-up and compilation outside, median of repeats) of the
     attention kernel alone and of sparge_attn end to end, against torch's dense SDPA.
The results file goes to ``--out`` (default bench/results/) and, where the environment sets
``OUT``, also there.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from provenance import git_commit  # noqa: E402

# Representative shapes for the sanitizers: (B, Hq, Hkv, Lq, Lk, D, dtype, layout, causal).
SANITIZE_CASES = [
    (1, 3, 1, 129, 127, 64, "float16", "NHD", True),
    (1, 2, 2, 200, 300, 256, "float32", "HND", True),
    (2, 2, 1, 65, 130, 80, "float16", "HND", False),
]


def worker():
    """What compute-sanitizer wraps: every kernel on a few ragged shapes."""
    import cupy

    import sparge_cupy as sc
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_qkv
    fp8 = int(cupy.cuda.Device().compute_capability) >= 89
    modes = [("int8", "fp8" if fp8 else "fp16"), ("fp16", "fp16")]
    for case in SANITIZE_CASES:
        B, Hq, Hkv, Lq, Lk, D, dtype, layout, causal = case
        q, k, v = (cupy.asarray(x) for x in make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=np.dtype(dtype),
                                                     layout=layout, seed=Lq))
        for qk, pv in modes:
            for lam in (4.0, None):          # Stage 2 on and off
                sc.sparge_attn(q, k, v, is_causal=causal, layout=layout, simthreshd1=0.3,
                               cdfthreshd=0.9, pvthreshd=lam, qk=qk, pv=pv, return_lse=True,
                               return_stats=True)
        sc.predict_block_map(q, k, is_causal=causal, layout=layout, topk=0.3)
        for predictor in ("qbar_keys", "qgroup_keys"):
            sc.predict_block_map(q, k, is_causal=causal, layout=layout, mass_threshold=1.0,
                                 predictor=predictor)
    try:
        import torch

        import sparge_cupy.torch as st
    except ImportError:
        torch = None
    if torch is not None:
        B, Hq, Hkv, Lq, Lk, D, _, layout, causal = SANITIZE_CASES[0]
        q, k, v = (torch.from_numpy(x).to("cuda", torch.bfloat16)
                   for x in make_qkv(B, Hq, Hkv, Lq, Lk, D, layout=layout))
        st.sparge_attn(q, k, v, is_causal=causal, layout=layout, pv=modes[0][1], return_lse=True)
    cupy.cuda.Device().synchronize()
    print("worker done")


def _run(cmd, timeout, env=None):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, p.stdout + p.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out + f"\n[timed out after {timeout} s]", time.time() - t0


def device_info():
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    commit = git_commit(ROOT)
    return {
        "card": name, "cc": f"{props['major']}.{props['minor']}",
        "driver": cupy.cuda.runtime.driverGetVersion(), "runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cupy": cupy.__version__, "commit": commit,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_tests(timeout, log_dir, variant="auto"):
    """tests/test_gpu.py as the package builds it ("auto"), or its attention tests alone with a
    variant of FORCED (its environment: another kernel, the overlapped loop)."""
    xml = log_dir / f"gpu_tests_{variant}.xml"
    workers = ["-n", str(min(8, max(1, (os.cpu_count() or 2) // 2)))] if _has("xdist") else []
    workers += ["--timeout=180"] if _has("pytest_timeout") else []
    workers += [] if variant == "auto" else ["-k", "attention or attn"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2",
           "SPARGE_ATTN_KERNEL": "auto", **(FORCED[variant][1] if variant != "auto" else {})}
    code, out, secs = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers,
                            "tests/test_gpu.py", f"--junitxml={xml}"], timeout, env=env)
    (log_dir / f"gpu_tests_{variant}.log").write_text(out)
    rows, metrics = [], []
    if xml.exists():
        for tc in ET.parse(xml).getroot().iter("testcase"):
            for prop in tc.iter("property"):
                if prop.get("name") == "metrics":
                    metrics.append(f"{tc.get('name')}: {prop.get('value')}")
            status = "passed"
            for tag in ("failure", "error", "skipped"):
                el = tc.find(tag)
                if el is not None:
                    status = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                    msg = (el.get("message") or "").splitlines()
                    status += f": {msg[0][:150]}" if msg else ""
                    break
            rows.append((tc.get("name"), status, float(tc.get("time", 0))))
    return code, rows, metrics, secs, out


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def run_sanitizers(timeout, log_dir):
    tool_bin = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    results = []
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        cmd = [tool_bin, "--tool", tool, "--error-exitcode", "99"]
        if tool == "racecheck":
            cmd += ["--racecheck-report", "all"]
        cmd += [sys.executable, str(Path(__file__).resolve()), "--worker"]
        code, out, secs = _run(cmd, timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
        (log_dir / f"sanitizer_{tool}.log").write_text(out)
        summary = [line for line in out.splitlines() if "SUMMARY" in line]
        ok = code == 0 and "worker done" in out
        results.append((tool, "clean" if ok else f"FAILED (exit {code})",
                        summary[-1].strip() if summary else "", secs))
    return results


def _median_ms(fn, reps=20, warmup=3):
    import cupy
    for _ in range(warmup):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90))


def run_timings():
    """Kernel-only attention (all blocks kept: the dense-equivalent rate) and end-to-end
    sparge_attn, against torch SDPA; FLOPs 4 B H Lq Lk D, half of that for causal."""
    import cupy

    import sparge_cupy as sc
    from sparge_cupy import _gpu
    fp8 = int(cupy.cuda.Device().compute_capability) >= 89
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    rows = []
    for B, Hq, Hkv, L, D, causal in ((1, 32, 32, 8192, 128, True), (1, 8, 2, 8192, 256, True),
                                     (1, 32, 32, 8192, 64, False)):
        rng = np.random.default_rng(0)
        q, k, v = (cupy.asarray(rng.standard_normal((B, H, L, D), dtype=np.float32).astype(np.float16))
                   for H in (Hq, Hkv, Hkv))
        flops = 4.0 * B * Hq * L * L * D * (0.5 if causal else 1.0)
        pv = "fp8" if fp8 else "fp16"
        qo, ko, vo = (_gpu.operand(x, "HND") for x in (q, k, v))
        st = _gpu.block_statistics(qo, ko, pooled=False)
        qz = _gpu.quantize_operands(qo, ko, vo, st, qk="int8", rebalance=True, pv=pv,
                                    with_q_dot_km=False)
        full = cupy.ones((B, Hq, -(-L // 128), -(-L // 64)), dtype=cupy.bool_)
        lam = np.full(Hq, np.inf, np.float32)
        kern = lambda: _gpu.run_attention(qo, ko, qz, full, is_causal=causal, scale=D ** -0.5,  # noqa: E731
                                          pvthreshd=lam, qk="int8", pv=pv, return_lse=False,
                                          return_stats=False)
        e2e = lambda: sc.sparge_attn(q, k, v, is_causal=causal, pv=pv)  # noqa: E731
        shape = f"B{B} H{Hq}/{Hkv} L{L} D{D} {'causal' if causal else 'full'}"
        for what, fn in ((f"attention kernel, int8/{pv}, all blocks", kern),
                         (f"sparge_attn end to end (defaults, int8/{pv})", e2e)):
            med, lo, hi = _median_ms(fn)
            rows.append((shape, what, med, lo, hi, flops / med / 1e9))
        if torch is not None:
            tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v))
            tk, tv = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (tk, tv))
            sdpa = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)  # noqa: E731
            med, lo, hi = _median_ms(sdpa)
            rows.append((shape, "torch SDPA fp16 (dense baseline)", med, lo, hi, flops / med / 1e9))
    return rows


def run_breakdown():
    """Where sparge_attn's time goes, per stage: host (CPU) and device (GPU) time from
    cupyx.profiler.benchmark, on the first timing shape with the default thresholds."""
    from cupyx.profiler import benchmark

    import sparge_cupy as sc
    from bench.prediction_bench import pipeline
    from sparge_cupy import CONFIG, _gpu
    from sparge_cupy import reference as R
    B, H, L, D, causal = 1, 32, 8192, 128, True
    P = pipeline(B, H, L, D, causal)
    q, k, v, qo, ko, vo, pv, st, bmap, qz = P.q, P.k, P.v, P.qo, P.ko, P.vo, P.pv, P.st, P.bmap, P.qz
    common, sel, attn = P.common, P.sel, P.attn
    stages = [
        ("sparge_cupy.sparge_attn (API: checks + all stages)",
         lambda: sc.sparge_attn(q, k, v, is_causal=causal, pv=pv)),
        ("_gpu.sparge_attn (all stages, the non-finite check at the end)",
         lambda: _gpu.sparge_attn(q, k, v, layout="HND", rebalance=True, **common, **sel, **attn)),
        ("block_statistics (K mean, pooling, similarity, channel maxima)",
         lambda: _gpu.block_statistics(qo, ko, pooled=True)),
        ("select (compressed map, TopCdf, fix blocks)",
         lambda: _gpu.select(st, Lq=L, Lk=L, **common, **sel)),
        ("quantize_operands (Q, K int8; V e4m3)",
         lambda: _gpu.quantize_operands(qo, ko, vo, st, qk="int8", rebalance=True, pv=pv,
                                        with_q_dot_km=False)),
        ("run_attention (predicted map)", lambda: _gpu.run_attention(qo, ko, qz, bmap, **common, **attn)),
    ]
    valid = int(R.valid_blocks(L, L, CONFIG.block_q, CONFIG.block_k, causal).sum()) * B * H
    rows = [("kept blocks / valid", f"{int(bmap.sum())} / {valid}", "", "")]
    for name, fn in stages:
        r = benchmark(fn, n_repeat=20, n_warmup=3)
        rows.append((name, "", f"{np.median(r.cpu_times) * 1e3:.3f}",
                     f"{np.median(r.gpu_times[0]) * 1e3:.3f}"))
    return rows


CACHE_PROBE = """
import time, numpy as np, cupy, sparge_cupy as sc
q = cupy.asarray(np.random.default_rng(0).standard_normal((1, 2, 300, 64), dtype=np.float32))
t = time.perf_counter(); sc.sparge_attn(q, q, q); cupy.cuda.Device().synchronize()
first = time.perf_counter() - t
t = time.perf_counter(); sc.sparge_attn(q, q, q); cupy.cuda.Device().synchronize()
print(f"CACHE_TIMES {first:.3f} {time.perf_counter() - t:.4f}")
"""


def run_cache_and_demo(timeout, log_dir):
    """The compile path: the first call of a process compiles, later calls reuse the module, and a
    later process reuses CuPy's on-disk cache (a fresh cache directory, two processes). Then the
    demo, which must report the GPU backend."""
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CUPY_CACHE_DIR": cache}
        for proc in ("first process (empty cache)", "second process (disk cache)"):
            code, out, _ = _run([sys.executable, "-c", CACHE_PROBE], timeout, env=env)
            m = re.search(r"CACHE_TIMES (\S+) (\S+)", out)
            first, second = m.groups() if code == 0 and m else ("error", "error")
            rows.append((proc, first, second))
    code, out, _ = _run([sys.executable, "-m", "sparge_cupy", "demo", "--out", str(log_dir / "demo")],
                        timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return rows, (code, out)


def _tests_section(tests, title):
    code, rows, metrics, secs, _ = tests
    passed = sum(r[1] == "passed" for r in rows)
    failed = sum(r[1].startswith(("FAILED", "ERROR")) for r in rows)
    skipped = sum(r[1].startswith("skipped") for r in rows)
    lines = [f"## {title}: {passed} passed, {failed} failed, {skipped} skipped in {secs:.0f} s", "",
             "| test | outcome | s |", "| --- | --- | --- |"]
    lines += [f"| `{n}` | {s} | {t:.2f} |" for n, s, t in rows]
    if not rows:
        lines.append(f"| (no results: pytest exit {code}) | | |")
    return lines


# The attention tests again in other builds the device can run: name: (what, environment,
# whether a device of compute capability cc runs it). Hopper runs wgmma by default (with the
# kept-block list where it fits); mma is the portable kernel; the wg- runs turn the wgmma
# kernel's switches the other way from the defaults (SPARGE_WG_OVERLAP, SPARGE_ATTN_DEFINES), so
# that every path the switches select stays tested: wg-no-list is the map scan the launcher falls
# back to where the list does not fit (_gpu.wg_map_list).
_WG = {"SPARGE_ATTN_KERNEL": "wgmma"}
FORCED = {
    "mma": ("the portable mma.sync kernel", {"SPARGE_ATTN_KERNEL": "mma"}, lambda cc: cc == 90),
    "wg-switches": ("the wgmma kernel with the overlapped loop at every head dim, the early Q load "
                    "and the mask threshold register off",
                    {**_WG, "SPARGE_WG_OVERLAP": "64,128,256",
                     "SPARGE_ATTN_DEFINES": "SPARGE_WG_EARLY_Q=0 SPARGE_WG_MASK_FROM=0"}, lambda cc: cc == 90),
    "wg-no-list": ("the wgmma kernel scanning the block map instead of the kept-block list",
                   {**_WG, "SPARGE_ATTN_DEFINES": "SPARGE_WG_MAP_LIST=0"}, lambda cc: cc == 90),
    "wg-no-list-switches": ("the map scan without its prefetch, no overlapped loop",
                            {**_WG, "SPARGE_WG_OVERLAP": "",
                             "SPARGE_ATTN_DEFINES": "SPARGE_WG_MAP_LIST=0 SPARGE_WG_MAP_PREFETCH=0"},
                            lambda cc: cc == 90),
}


def write_report(info, tests, sanitizers, timings, out_dirs, breakdown=(), cache_demo=None,
                 forced=()):
    from sparge_cupy import _gpu
    code, rows, metrics, secs, _ = tests
    lines = [f"# GPU suite: {info['card']}", "",
             f"- card: {info['card']} (compute capability {info['cc']}), driver {info['driver']}, "
             f"CUDA runtime {info['runtime']}, CuPy {info['cupy']}",
             f"- date: {info['date']}", f"- commit: {info['commit']}",
             f"- attention kernel by default on this card: {_gpu.attn_kernel_choice()}", ""]
    lines += _tests_section(tests, "GPU tests (tests/test_gpu.py, default attention kernel)")
    for variant, result in forced:
        what, env, _ = FORCED[variant]
        lines += [""] + _tests_section(
            result, f"Attention tests again with {what} ({' '.join(f'{k}={v}' for k, v in env.items())})")
    if metrics:
        lines += ["", "Errors recorded by the tests (relative L1; 'mirror' = the blocked mirror of "
                  "reference/ on the same quantized operands, 'dense' = float64 attention with the "
                  "same block map):",
                  "", "```"] + metrics + ["```"]
    if sanitizers:
        lines += ["", "## compute-sanitizer (scripts/gpu_suite.py --worker)", "",
                  "| tool | result | summary | s |", "| --- | --- | --- | --- |"]
        lines += [f"| {t} | {r} | {s} | {d:.0f} |" for t, r, s, d in sanitizers]
    if timings:
        lines += ["", "## Timings (CUDA events, median of 20 after 3 warm-ups; fp16 inputs, "
                  "FLOPs = 4 B H Lq Lk D, halved when causal)", "",
                  "| shape | what | median ms | p10 | p90 | dense-equiv TFLOP/s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {s} | {w} | {m:.3f} | {lo:.3f} | {hi:.3f} | {tf:.1f} |"
                  for s, w, m, lo, hi, tf in timings]
    if breakdown:
        lines += ["", "## Where sparge_attn's time goes (B1 H32 L8192 D128 causal, fp16, default "
                  "thresholds; cupyx.profiler.benchmark medians of 20)", "",
                  "| stage | note | host ms | device ms |", "| --- | --- | --- | --- |"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in breakdown]
    if cache_demo:
        cache_rows, (demo_code, demo_out) = cache_demo
        lines += ["", "## Compilation cache (sparge_attn on a small input; seconds)", "",
                  "| process | first call | second call |", "| --- | --- | --- |"]
        lines += [f"| {p} | {a} | {b} |" for p, a, b in cache_rows]
        lines += ["", f"## `python -m sparge_cupy demo` (exit {demo_code})", "", "```",
                  demo_out.strip(), "```"]
    text = "\n".join(lines) + "\n"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["card"]).strip("-").lower()
    commit = re.sub(r"[^A-Za-z0-9]+", "-", info["commit"]).strip("-")
    name = f"gpu_suite_{info['date'][:10]}_{slug}_{commit}.md"
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help="run the kernels once (for the sanitizers)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--skip-sanitizers", action="store_true")
    ap.add_argument("--skip-timings", action="store_true")
    ap.add_argument("--test-timeout", type=int, default=300)
    ap.add_argument("--sanitizer-timeout", type=int, default=75)
    args = ap.parse_args()
    if args.worker:
        worker()
        return 0
    out_dirs = [Path(args.out)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    log_dir = out_dirs[-1]
    log_dir.mkdir(parents=True, exist_ok=True)
    info = device_info()
    print(f"{info['card']} cc {info['cc']}, commit {info['commit']}", flush=True)
    tests = run_tests(args.test_timeout, log_dir)
    print(f"tests done in {tests[3]:.0f} s (exit {tests[0]})", flush=True)
    forced = []
    cc = int(info["cc"].replace(".", ""))
    for variant in (v for v, (_, _, runs_on) in FORCED.items() if runs_on(cc)):
        forced.append((variant, run_tests(args.test_timeout, log_dir, variant)))
        print(f"{variant} attention tests done in {forced[-1][1][3]:.0f} s (exit {forced[-1][1][0]})",
              flush=True)
    sanitizers = [] if args.skip_sanitizers else run_sanitizers(args.sanitizer_timeout, log_dir)
    timings, breakdown = [], []
    if not args.skip_timings:
        try:
            timings = run_timings()
            breakdown = run_breakdown()
        except Exception as exc:        # report, do not lose the rest of the run
            print(f"timings failed: {exc!r}", flush=True)
    cache_demo = run_cache_and_demo(args.test_timeout, log_dir)
    text = write_report(info, tests, sanitizers, timings, out_dirs, breakdown, cache_demo, forced)
    fails = [line for t in [tests] + [r for _, r in forced] for line in t[4].splitlines()
             if line.startswith(("FAILED", "ERROR"))]
    print("\n".join(fails[:40]))
    print(text[-6000:])
    ok = (tests[0] == 0 and all(r[0] == 0 for _, r in forced) and all(r[1] == "clean" for r in sanitizers if r[0] != "initcheck")
          and cache_demo[1][0] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
