"""The pipelined sparge_attn (``SPARGE_PIPELINE``) against one call, and both against the kernel.

    PYTHONPATH=. python bench/pipeline_bench.py [--parts 1 2 4 8] [--shapes B,H,L,D,CAUSAL ...]

For each shape (random fp16 inputs, torch adapter, torch's current stream): ``sparge_attn`` end to
end as the full benchmark's ``sparge_e2e_tau0.9`` row calls it, once per number of parts, and the
attention kernel alone on the same predicted map (``run_bench.kernel_only``). Prints the median
time (``triton.testing.do_bench``: CUDA events, L2 flushed), dense-equivalent TOPS, the overhead
over the kernel (issue 4's target 4 counts ``(sparge_attn - kernel) / kernel``) and the largest
difference from the one-call output (the parts run the same kernels on the same heads: 0).
Needs a CUDA GPU and torch.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = ["4,32,8192,128,0", "4,32,16384,128,0", "4,32,8192,128,1", "4,32,16384,64,0", "4,32,32768,128,0"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--shapes", nargs="+", default=SHAPES, metavar="B,H,L,D,CAUSAL")
    ap.add_argument("--reps-ms", type=int, default=300)
    a = ap.parse_args(argv)
    import torch
    import triton.testing

    import sparge_cupy.torch as st
    from run_bench import card_name, kernel_only, visible_pairs

    rows = []
    for shape in a.shapes:
        B, H, L, D, causal = (int(x) for x in shape.split(","))
        causal = bool(causal)
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16) for _ in range(3))
        scale, kw = D ** -0.5, dict(cdfthreshd=0.9, simthreshd1=0.3)
        flops = 4 * B * H * visible_pairs(L, L, causal) * D
        os.environ["SPARGE_PIPELINE"] = "1"
        bm = st.predict_block_map(q, k, is_causal=causal, scale=scale, **kw)
        run, _ = kernel_only(q, k, v, bm, causal=causal, scale=scale)
        kern = triton.testing.do_bench(run, warmup=25, rep=a.reps_ms, return_mode="median")
        del run
        name = f"B{B} H{H} L{L // 1024}K D{D} {'causal' if causal else 'full'}"
        rows.append((name, "kernel", kern, flops / kern / 1e9, 0.0, 0.0))
        ref = None
        for n in a.parts:
            os.environ["SPARGE_PIPELINE"] = str(n)
            e2e = functools.partial(st.sparge_attn, q, k, v, is_causal=causal, scale=scale, **kw)
            out = e2e()
            ref = out if ref is None else ref
            diff = float((out.float() - ref.float()).abs().max())
            ms = triton.testing.do_bench(e2e, warmup=25, rep=a.reps_ms, return_mode="median")
            rows.append((name, f"sparge_attn, {n} part{'s' if n > 1 else ''}", ms, flops / ms / 1e9,
                         (ms - kern) / kern, diff))
            print(*rows[-1], sep=" | ", flush=True)
        del q, k, v, bm, out, ref, e2e
        torch.cuda.empty_cache()
    os.environ.pop("SPARGE_PIPELINE", None)
    print(f"\n{card_name()}: median of do_bench (L2 flushed), random fp16 inputs, cdfthreshd 0.9, simthreshd1 0.3")
    print(f"{'shape':26s} {'what':24s} {'ms':>8s} {'TOPS':>7s} {'over kernel':>11s} {'max|d| vs 1 part':>16s}")
    for r in rows:
        print(f"{r[0]:26s} {r[1]:24s} {r[2]:8.3f} {r[3]:7.1f} {100 * r[4]:10.1f}% {r[5]:16.3g}")


if __name__ == "__main__":
    main()
