"""Per-launch times of select.cu's qbar_keys_map (predictor="qbar_keys") for other programs shapes.

    PYTHONPATH=. python bench/qbar_keys_variants.py 8,2 4,4     # SPARGE_QK_WARPS,SPARGE_QK_MIN_BLOCKS

Builds select.cu with ``-DSPARGE_QK_WARPS=<w> -DSPARGE_QK_MIN_BLOCKS=<m>`` for each argument and
times qbar_keys_map (CUDA events, the smaller median of two repeats of 20) at B = 1 and 4, H = 32,
L = 16K, D = 64 / 128 / 256, causal and not, fp16; checks each variant's S^ is bit for bit the first
variant's (the same FMA order per entry), and prints the compressed map (the paper's estimate) and
the dense attention kernel of the same shape for scale. Prints a table last. Needs a CUDA GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import cupy  # noqa: E402
import numpy as np  # noqa: E402
import prediction_bench as pb  # noqa: E402
from stats_variants import variant_get_kernel  # noqa: E402

from sparge_cupy import _gpu  # noqa: E402

SHAPES = ((1, 16384, 128, True), (1, 16384, 128, False), (4, 16384, 128, True),
          (1, 16384, 64, True), (1, 16384, 256, True))


def main(variants):
    rows, shipped = [], _gpu.get_kernel
    for B, L, D, causal in SHAPES:
        P = pb.pipeline(B, 32, L, D, causal)
        kw = dict(Lq=L, Lk=L, is_causal=causal, scale=D ** -0.5, simthreshd1=P.sel["simthreshd1"])
        first = None
        for warps, min_blocks in variants:
            _gpu.QK_WARPS = warps
            _gpu.get_kernel = variant_get_kernel(
                [f"-DSPARGE_QK_WARPS={warps}", f"-DSPARGE_QK_MIN_BLOCKS={min_blocks}"], "select.cu")
            run = lambda: _gpu.estimate_logits(P.st, P.ko, predictor="qbar_keys", **kw)  # noqa: E731
            ms = min(pb.per_launch_ms(run, 20)[("qbar_keys_map", 1)] for _ in range(2))
            s_hat = run().get()
            first = s_hat if first is None else first
            rows.append((B, L, D, causal, f"qbar_keys_map warps={warps} min_blocks={min_blocks}", ms,
                         bool(np.array_equal(s_hat, first))))
            print(rows[-1], flush=True)
        _gpu.get_kernel, _gpu.QK_WARPS = shipped, 8
        paper = lambda: _gpu.estimate_logits(P.st, P.ko, **kw)  # noqa: E731
        rows.append((B, L, D, causal, "compressed_map (paper)",
                     pb.per_launch_ms(paper, 20)[("compressed_map", 1)], None))
        full = cupy.ones_like(P.bmap)
        rows.append((B, L, D, causal, "attention kernel, all blocks (dense work)",
                     pb.region_ms(lambda: _gpu.run_attention(P.qo, P.ko, P.qz, full, **P.common,
                                                             **P.attn), 10), None))
        P = None                             # free this shape's arrays
        cupy.get_default_memory_pool().free_all_blocks()
    print("\n| B | L | D | causal | what | ms | useful FMA TFLOP/s | S^ = first variant's |")
    print("|---|---|---|---|---|---|---|---|")
    for B, L, D, causal, what, ms, same in rows:
        flops = 2 * B * 32 * (L // 128) * L * D * (0.5 if causal else 1.0)
        rate = f"{flops / ms / 1e9:.1f}" if what.startswith("qbar") else ""
        print(f"| {B} | {L} | {D} | {causal} | {what} | {ms:.4f} | {rate} | "
              f"{'' if same is None else same} |")


if __name__ == "__main__":
    main([tuple(int(x) for x in a.split(",")) for a in (sys.argv[1:] or ["8,2"])])
