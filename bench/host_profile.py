"""Where the host time of one API call goes (issue 4: short sequences are host-bound).

    PYTHONPATH=. python bench/host_profile.py [B,H,L,D] [--calls N]

Times ``sparge_attn`` (defaults) and ``block_sparse_attn`` on a small fp16 CuPy input: the wall
time per call with the device synchronised once at the end (the host's cost when the GPU keeps
up), the GPU time of one call (CUDA events), then cProfile over N calls: the functions with the
largest own time and the largest cumulative time. Needs a CUDA GPU.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv):
    import cupy

    import sparge_cupy as sc
    shape = next((a for a in argv if "," in a), "1,8,1024,128")
    calls = int(argv[argv.index("--calls") + 1]) if "--calls" in argv else 200
    B, H, L, D = (int(x) for x in shape.split(","))
    rng = cupy.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, D), dtype=cupy.float32).astype(cupy.float16) for _ in range(3))
    bm = sc.predict_block_map(q, k, is_causal=True)
    runs = {"sparge_attn": lambda: sc.sparge_attn(q, k, v, is_causal=True),
            "block_sparse_attn": lambda: sc.block_sparse_attn(q, k, v, bm, is_causal=True),
            "predict_block_map": lambda: sc.predict_block_map(q, k, is_causal=True)}
    for name, fn in runs.items():
        for _ in range(20):
            fn()
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        cupy.cuda.Device().synchronize()
        host = (time.perf_counter() - t0) / calls * 1e3
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        print(f"{name}: {host:.3f} ms per call back to back (B{B} H{H} L{L} D{D} fp16 causal), "
              f"one call's GPU span {cupy.cuda.get_elapsed_time(start, stop):.3f} ms", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        runs["sparge_attn"]()
    cupy.cuda.Device().synchronize()
    prof.disable()
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(28)
        text = out.getvalue()
        print(f"\n--- sparge_attn x {calls}, by {key} ---")
        print(text[text.index("ncalls"):] if "ncalls" in text else text)


if __name__ == "__main__":
    main(sys.argv[1:])
