"""Per-launch times of block_stats.cu's kernels built with other options or from other sources.

    PYTHONPATH=. python bench/stats_variants.py 4 5 6      # values of SPARGE_STATS_MIN_BLOCKS
    PYTHONPATH=. python bench/stats_variants.py shipped= base@/tmp/old_cuda \
        pf=-DSPARGE_STATS_PREFETCH=1,-DSPARGE_QSTATS_STAGE_REGS=16

Each argument is a variant: a number n (``-DSPARGE_STATS_MIN_BLOCKS=n``), ``label=opt,opt`` (NVRTC
options added to the shipped build) or ``label@folder`` (block_stats.cu and its headers read from
another folder, e.g. an older commit's ``cuda/``). For each, block_statistics with the K operand
and quantize_qk at B = 1 and 4, H = 32, L = 16K, D = 128, fp16 are timed per launch (CUDA events,
the smaller median of two repeats of 20), then both as one region; the quantized operands and
statistics of every variant are compared with the first variant's (bit for bit, "same" column).
With ``--select`` first, the variants are of select.cu instead (compressed_map and select_rows
at B = 4, L = 16K and 32K; the S^ and the block map compared); with ``--quant-v``, of quant_v.cu
(v_channel_amax and quantize_v, FP8, at B = 4, H = 32, D = 64 / 128 / 256 and 8K / 16K; V^T and dv
compared), where an option ``bpp:N`` sets ``_gpu.VQ_BLOCKS_PER_PROGRAM`` (e.g.
``old@/tmp/old_cuda,bpp:1`` for a source whose quantize_v takes one key block a program). Prints a
table last. Needs a CUDA GPU.
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

from sparge_cupy import _compile, _gpu  # noqa: E402

KERNELS = ("q_stats", "k_sums", "k_pass", "quantize_q")
SELECT_KERNELS = ("compressed_map", "select_rows")
QUANT_V_KERNELS = ("v_channel_amax", "quantize_v")


def variant_get_kernel(extra, variant_source="block_stats.cu", folder=None):
    """A get_kernel that builds ``variant_source`` (from ``folder`` where given) with the NVRTC
    options ``extra`` added."""
    cache = {}
    cc = int(cupy.cuda.Device().compute_capability)

    def get_kernel(source, name):
        if source != variant_source:
            return _compile.get_kernel(source, name)
        if name not in cache:
            options = _compile.base_options() + (_compile.arch_flag(cc),) + tuple(extra)
            mod = cupy.RawModule(code=_compile.source_text(source, folder), options=options,
                                 name_expressions=[name])
            cache[name] = _compile.Kernel(mod.get_function(name))
        return cache[name]
    return get_kernel


def parse(spec):
    """(label, extra options, folder, quantize_v blocks per program or None) of one variant."""
    bpp = None
    if "@" in spec:
        label, folder = spec.split("@", 1)
        folder, *opts = folder.split(",")
    elif "=" in spec:
        label, rest = spec.split("=", 1)
        folder, opts = None, rest.split(",")
    else:
        return f"min_blocks={spec}", [f"-DSPARGE_STATS_MIN_BLOCKS={spec}"], None, None
    extra = []
    for o in filter(None, opts):
        if o.startswith("bpp:"):
            bpp = int(o[4:])
        else:
            extra.append(o)
    return label, extra, folder, bpp


def outputs(P):
    """Every array the timed calls write, as host copies (for the bit-for-bit comparison)."""
    st = _gpu.block_statistics(P.qo, P.ko, pooled=True, nonfinite=_gpu.nonfinite_counter(),
                               k_operand=pb.K_OPERAND)
    q_op, dq, k_op, dk, _ = _gpu.quantize_qk(P.qo, P.ko, st, qk="int8", rebalance=True,
                                             with_q_dot_km=False)
    return [a.get() for a in (st.qbar, st.q_sim, st.kbar, st.k_sim, st.q_block_amax, st.km,
                              st.s_c, q_op, dq, k_op, dk)]


def stages(P, source):
    """(timed calls, the kernels to report, what they write) for the variant ``source``."""
    if source == "quant_v.cu":
        def quant_v():
            return _gpu.quantize_v(P.vo, pv="fp8")
        return (quant_v,), QUANT_V_KERNELS, lambda: [a.get() for a in quant_v()]
    if source == "select.cu":
        def select():
            return _gpu.select(P.st, Lq=P.q.shape[2], Lk=P.k.shape[2], **P.common, **P.sel)
        logits = lambda: _gpu.estimate_logits(P.st, Lq=P.q.shape[2], Lk=P.k.shape[2],  # noqa: E731
                                              is_causal=P.common["is_causal"],
                                              scale=P.common["scale"], simthreshd1=P.sel["simthreshd1"])
        return (select,), SELECT_KERNELS, lambda: [select().get(), logits().get()]

    def stats():
        _gpu.block_statistics(P.qo, P.ko, pooled=True, nonfinite=_gpu.nonfinite_counter(),
                              k_operand=pb.K_OPERAND)

    def quant():
        _gpu.quantize_qk(P.qo, P.ko, P.st, qk="int8", rebalance=True, with_q_dot_km=False)
    return (stats, quant), KERNELS, lambda: outputs(P)


def main(specs, source="block_stats.cu", shapes=((1, 16384, 128), (4, 16384, 128))):
    rows = []
    original, original_bpp = _gpu.get_kernel, _gpu.VQ_BLOCKS_PER_PROGRAM
    kernels = KERNELS
    for B, L, D in shapes:
        P = pb.pipeline(B, 32, L, D, True)
        fns, kernels, written = stages(P, source)
        first = None
        for spec in specs:
            label, extra, folder, bpp = parse(spec)
            _gpu.get_kernel = variant_get_kernel(extra, source, folder=folder)
            _gpu.VQ_BLOCKS_PER_PROGRAM = original_bpp if bpp is None else bpp
            got = written()
            first = got if first is None else first
            same = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, first))
            times = {}
            for fn in fns + fns:                             # twice: the spread
                for (lab, _), ms in pb.per_launch_ms(fn, 20).items():
                    times.setdefault(lab, []).append(ms)
            region = pb.region_ms(lambda: [fn() for fn in fns], 20)
            rows.append((B, L, D, label, [min(times.get(k, [float("nan")])) for k in kernels], region, same))
            print(rows[-1], flush=True)
        _gpu.get_kernel, _gpu.VQ_BLOCKS_PER_PROGRAM = original, original_bpp
    print(f"\n{source}\n\n| B | L | D | variant | " + " | ".join(kernels) + " | region | same |")
    print("|---|---|---|---|" + "---|" * (len(kernels) + 2))
    for B, L, D, label, ms, region, same in rows:
        print(f"| {B} | {L} | {D} | {label} | " + " | ".join(f"{x:.4f}" for x in ms)
              + f" | {region:.4f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--select"]:           # variants of select.cu (B 4, L 16K and 32K)
        main(args[1:] or ["shipped="], "select.cu", ((4, 16384, 128), (4, 32768, 128)))
    elif args[:1] == ["--quant-v"]:        # variants of quant_v.cu
        main(args[1:] or ["shipped="], "quant_v.cu",
             ((4, 8192, 64), (4, 8192, 128), (4, 16384, 128), (4, 8192, 256)))
    else:
        main(args or ["4"])
