"""One sparge_attn call for Nsight Compute: what limits the statistics, selection and quantization
kernels (issue 4, target 4).

    ncu --clock-control none -k regex:'q_stats|k_sums|head_scales|k_pass|compressed_map|select_|quantize_|v_channel' \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy -o prediction python bench/prediction_ncu.py 4,32,16384,128,0
    ncu --import prediction.ncu-rep --page details > prediction_ncu.txt

The argument is B,H,L,D,CAUSAL[,PREDICTOR] (fp16, HND, random inputs, the defaults: INT8 Q K with
rebalancing, FP8 P V; a PREDICTOR other than paper runs with theta = -1 and the mass threshold 1,
e.g. ``-k regex:'qbar_keys|group_mass|q_groups'`` with ``4,32,16384,128,1,qgroup_keys``). A warm-up call on a small input compiles the kernels first, so that the profiled call is
the second launch of each kernel of the shape's own instantiation.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(shape):
    import cupy

    import sparge_cupy as sc
    fields = shape.split(",")
    B, H, L, D, causal = (int(x) for x in fields[:5])
    predictor = fields[5] if len(fields) > 5 else "paper"
    opts = {} if predictor == "paper" else dict(predictor=predictor, simthreshd1=-1.0, mass_threshold=1.0)
    rng = cupy.random.default_rng(0)
    small = rng.standard_normal((1, 1, 256, D), dtype=cupy.float32).astype(cupy.float16)
    sc.sparge_attn(small, small, small, is_causal=bool(causal), **opts)          # compile
    q, k, v = (rng.standard_normal((B, H, L, D), dtype=cupy.float32).astype(cupy.float16)
               for _ in range(3))
    sc.sparge_attn(q, k, v, is_causal=bool(causal), **opts)
    cupy.cuda.Device().synchronize()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "4,32,16384,128,0")
