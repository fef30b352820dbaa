"""Per-launch times of the key-level estimates (select.cu): qbar_keys_mma for predictor="qbar_keys"
(a pooled query per 128-row block) and "qgroup_keys" (per 32-row group, then group_mass_map; its
q_groups pass over Q too), against the paper's compressed map and the dense attention kernel.

    PYTHONPATH=. python bench/key_level_bench.py

At B = 1 and 4, H = 32, L = 16K, D = 64 / 128 / 256, causal and not, fp16, theta = -1 (every
valid block selectable): CUDA-event medians per launch (the smaller of two repeats of 20) and the
useful TFLOP/s of the product (2 rows x keys x D, halved when causal). Prints a table last. Needs
a CUDA GPU. (The float32-FMA kernel it replaced: ``qbar_keys_kernels_2026-12-04_h200.md``.)
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

from sparge_cupy import _gpu  # noqa: E402

SHAPES = ((1, 16384, 128, True), (1, 16384, 128, False), (4, 16384, 128, True),
          (1, 16384, 64, True), (1, 16384, 256, True))


def main():
    rows = []
    for B, L, D, causal in SHAPES:
        P = pb.pipeline(B, 32, L, D, causal)
        st = _gpu.block_statistics(P.qo, P.ko, pooled=True, q_groups=True)
        kw = dict(Lq=L, Lk=L, is_causal=causal, scale=D ** -0.5, simthreshd1=np.full(32, -1.0, np.float32))
        for predictor in ("qbar_keys", "qgroup_keys"):
            run = lambda: _gpu.estimate_logits(st, P.ko, predictor=predictor, **kw)  # noqa: E731
            t = [pb.per_launch_ms(run, 20) for _ in range(2)]
            rows.append((B, L, D, causal, predictor, "qbar_keys_mma", min(x[("qbar_keys_mma", 1)] for x in t)))
            if predictor == "qgroup_keys":
                rows.append((B, L, D, causal, predictor, "group_mass_map",
                             min(x[("group_mass_map", 1)] for x in t)))
                pool = lambda: _gpu.block_statistics(P.qo, P.ko, pooled=False, q_groups=True)  # noqa: E731
                rows.append((B, L, D, causal, predictor, "q_groups", pb.per_launch_ms(pool, 20)[("q_groups", 1)]))
            assert np.isfinite(run().get()).any()
        paper = lambda: _gpu.estimate_logits(P.st, P.ko, **kw)  # noqa: E731
        rows.append((B, L, D, causal, "paper", "compressed_map", pb.per_launch_ms(paper, 20)[("compressed_map", 1)]))
        full = cupy.ones_like(P.bmap)
        rows.append((B, L, D, causal, "-", "attention kernel, all blocks (dense work)",
                     pb.region_ms(lambda: _gpu.run_attention(P.qo, P.ko, P.qz, full, **P.common,
                                                             **P.attn), 10)))
        for r in rows[-6:]:
            print(r, flush=True)
        P = st = None                        # free this shape's arrays
        cupy.get_default_memory_pool().free_all_blocks()
    print("\n| B | L | D | causal | predictor | kernel | ms | useful TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for B, L, D, causal, predictor, what, ms in rows:
        rows_per = {"qbar_keys": 128, "qgroup_keys": 32}.get(predictor)
        rate = ""
        if rows_per and what == "qbar_keys_mma":
            flops = 2 * B * 32 * (L // rows_per) * L * D * (0.5 if causal else 1.0)
            rate = f"{flops / ms / 1e9:.1f}"
        print(f"| {B} | {L} | {D} | {causal} | {predictor} | {what} | {ms:.4f} | {rate} |")


if __name__ == "__main__":
    main()
