"""Per-launch times of block_stats.cu's kernels built with other register caps.

    PYTHONPATH=. python bench/stats_variants.py 4 5 6      # values of SPARGE_STATS_MIN_BLOCKS

Builds block_stats.cu with ``-DSPARGE_STATS_MIN_BLOCKS=<n>`` for each argument (the other sources
as shipped) and times, per launch (CUDA events, the smaller median of two repeats of 20),
block_statistics with the K operand and quantize_qk at B = 1 and 4, H = 32, L = 16K, D = 128, fp16;
then both as one region. Prints a table last. Needs a CUDA GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import cupy  # noqa: E402
import prediction_bench as pb  # noqa: E402

from sparge_cupy import _compile, _gpu  # noqa: E402

KERNELS = ("q_stats", "k_sums", "k_pass", "quantize_q")


def variant_get_kernel(extra, variant_source="block_stats.cu"):
    """A get_kernel that builds ``variant_source`` with the NVRTC options ``extra`` added."""
    cache = {}
    cc = int(cupy.cuda.Device().compute_capability)

    def get_kernel(source, name):
        if source != variant_source:
            return _compile.get_kernel(source, name)
        if name not in cache:
            options = _compile.base_options() + (_compile.arch_flag(cc),) + tuple(extra)
            mod = cupy.RawModule(code=_compile.source_text(source), options=options,
                                 name_expressions=[name])
            cache[name] = mod.get_function(name)
        return cache[name]
    return get_kernel


def main(values):
    rows = []
    for B, L in ((1, 16384), (4, 16384)):
        P = pb.pipeline(B, 32, L, 128, True)

        def stats():
            _gpu.block_statistics(P.qo, P.ko, pooled=True, nonfinite=_gpu.nonfinite_counter(),
                                  k_operand=pb.K_OPERAND)

        def quant():
            _gpu.quantize_qk(P.qo, P.ko, P.st, qk="int8", rebalance=True, with_q_dot_km=False)

        for mb in values:
            _gpu.get_kernel = variant_get_kernel([f"-DSPARGE_STATS_MIN_BLOCKS={mb}"])
            times = {}
            for fn in (stats, quant, stats, quant):          # twice: the spread
                for (label, _), ms in pb.per_launch_ms(fn, 20).items():
                    times.setdefault(label, []).append(ms)
            region = pb.region_ms(lambda: (stats(), quant()), 20)
            rows.append((B, L, mb, [min(times[k]) for k in KERNELS], region))
            print(rows[-1], flush=True)
    print("\n| B | L | min blocks | " + " | ".join(KERNELS) + " | stats+quant region |")
    print("|---|---|---|" + "---|" * (len(KERNELS) + 1))
    for B, L, mb, ms, region in rows:
        print(f"| {B} | {L} | {mb} | " + " | ".join(f"{x:.4f}" for x in ms) + f" | {region:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["4"])
