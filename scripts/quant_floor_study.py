"""Where the INT8 / FP8 quantization floor of Gemma 3 comes from, and what would lower it.

The floor is the relative L1 error against float64 attention with every block kept (no sparsity):
on Gemma 3 270M's full layers it is 0.02-0.03 of the 0.05 budget (bench/results/gemma3_eval_pydoc.md),
so it caps every predictor's sparsity (bench/results/predictor_study.md). This script measures,
per layer and head, the floor of the shipped quantization and of variants that are not in
SPEC.md, each run through the blocked NumPy mirror of the kernels (reference.block_sparse_attention,
all blocks kept, Stage 2 off), so P's FP8 rounding is the kernel's:

    default      INT8 Q per 128 rows, INT8 K - km per 64 keys, channel rebalancing; FP8 V per channel
    v_smooth     default, with V's channel mean subtracted before FP8 and added to the output
                 (O = sum_u p_u (v_u - vm) / l + vm: exact, since the p_u / l sum to 1)
    q16          default, with one Q scale per 16 rows (a warp's row tile) instead of per 128
    k16          default, with one K scale per 16 keys instead of per 64
    q1_k1        default, with one scale per query row and per key (per token)
    qk_only      INT8 QK^T as default, P V unrounded (the INT8 part of the floor)
    q1_k1_qk_only  per-token INT8 QK^T, P V unrounded
    pv_only      Q K^T unrounded, FP8 P V as default (the FP8 part)
    pv_smooth    Q K^T unrounded, FP8 P V with V smoothing

Variants of the operands are passed to the mirror already dequantized (``qk="fp32"``, no
rebalancing): its float32 product of the dequantized values equals the kernel's exact int32 sum
times the scales up to one float32 rounding.

    HF_HUB_OFFLINE=1 python scripts/extract_gemma_qkv.py --tokens 4096      # the captures
    python scripts/quant_floor_study.py --tokens 4096 --out bench/results/quant_floor_gemma3.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparge_cupy import reference as R  # noqa: E402
from sparge_cupy.config import CONFIG  # noqa: E402
from sparge_cupy.hf import load_gemma_capture  # noqa: E402
from sparge_cupy.reference.quant import expand_kv_heads  # noqa: E402

LAYERS = (5, 11, 17)
VARIANTS = ("default", "v_smooth", "q16", "k16", "q1_k1", "qk_only", "q1_k1_qk_only", "pv_only",
            "pv_smooth")
# One INT8 scale per (Q rows, K rows): the shipped 128 / 64, or finer.
GRANULARITY = {"q16": (16, 64), "k16": (128, 16), "q1_k1": (1, 1), "q1_k1_qk_only": (1, 1)}
F32 = np.float32


def _int8_rows(x, rows):
    """x (float32 [B, H, L, D]) through INT8 with one scale per ``rows`` tokens, dequantized."""
    xi, delta = R.quantize_int8_per_block(x, rows)
    return R.dequantize_int8_per_block(xi, delta, rows)


def operands(q, k, q_rows, k_rows):
    """Rebalanced INT8 Q (one scale per ``q_rows`` rows) and smoothed INT8 K (per ``k_rows``
    keys), dequantized to float32: what the kernel's QK^T multiplies, times its scales."""
    q = np.asarray(q, F32)
    _, ks = R.smooth_k(k)
    s_c = R.channel_scales(q, ks)
    return _int8_rows(q * expand_kv_heads(s_c, q.shape[1]), q_rows), _int8_rows(ks / s_c, k_rows)


def floor(q, k, v, exact, variant, scale):
    """Per-head relative L1 of ``variant`` against ``exact`` (float64 [B, H, L, D])."""
    B, Hq, Lq, _ = q.shape
    full = np.ones((B, Hq, -(-Lq // CONFIG.block_q), -(-k.shape[2] // CONFIG.block_k)), bool)
    kw = dict(is_causal=True, scale=scale, pvthreshd=np.full(Hq, np.inf, F32), rebalance=False)
    v32 = np.asarray(v, F32)
    smooth = variant in ("v_smooth", "pv_smooth")
    vm = (v32.mean(axis=2, keepdims=True, dtype=np.float64).astype(F32) if smooth
          else np.zeros(v32.shape[:2] + (1, v32.shape[3]), F32))
    if variant in ("pv_only", "pv_smooth"):
        qo, ko = np.asarray(q, F32), np.asarray(k, F32)
    else:
        qo, ko = operands(q, k, *GRANULARITY.get(variant, (CONFIG.block_q, CONFIG.block_k)))
    pv = "fp32" if variant.endswith("qk_only") else "fp8"
    out = R.block_sparse_attention(qo, ko, v32 - vm, full, qk="fp32", pv=pv, **kw)
    out = out.astype(np.float64) + expand_kv_heads(vm, Hq)
    return [R.error_metrics(out[:, h], exact[:, h])["rel_l1"] for h in range(Hq)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--out", default=None, help="markdown file for the table")
    args = ap.parse_args(argv)
    lines = ["| tokens | layer | head | " + " | ".join(VARIANTS) + " |",
             "|---|---|---|" + "---|" * len(VARIANTS)]
    means = {}
    for n in args.tokens:
        for layer in LAYERS:
            cap = load_gemma_capture(n, layer)
            q, k, v, scale = cap["q"], cap["k"], cap["v"], float(cap["scale"])
            exact = R.dense_attention(q, k, v, is_causal=True, scale=scale)
            t0 = time.time()
            per = {var: floor(q, k, v, exact, var, scale) for var in VARIANTS}
            for h in range(q.shape[1]):
                lines.append(f"| {n} | {layer} | {h} | " + " | ".join(f"{per[var][h]:.4f}" for var in VARIANTS) + " |")
                for var in VARIANTS:
                    means.setdefault((n, var), []).append(per[var][h])
            print(f"N={n} layer {layer}: {time.time() - t0:.0f} s", flush=True)
        lines.append(f"| {n} | **mean** | | " + " | ".join(f"**{np.mean(means[(n, var)]):.4f}**" for var in VARIANTS) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
