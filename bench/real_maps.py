"""Speed on predicted maps of real inputs: a captured attention layer, its tuned thresholds.

    python bench/real_maps.py --npz ~/.cache/sparge_cupy/gemma3_qkv/gemma3-270m_pydoc_16384_layer11.npz \
        --thresholds bench/results/gemma3_eval_qbar_local_16k.csv --out bench/results

The layer's Q, K, V (``scripts/extract_gemma_qkv.py``: fp16, HND, causal, its scale; never
committed) run once per method in this process on this card, each gated first on sampled rows
like ``run_bench.py``'s rows (ours against float64 on the same block map, gate 0.08; cuDNN and
flash against dense float64; flex_attention against float64 on its block map), with the error
against dense float64 in ``rel_l1_dense``:

- ``sdpa_cudnn``, ``sdpa_flash``: dense;
- ``sparge_attn`` with the per-head thresholds the eval tuned (``--group``, Stage 1 rows of the
  CSV: theta and the mass threshold of the qbar-keys estimate with the local window), in the
  default modes (INT8 QK^T, FP8 P V) and in the modes it was tuned with (fp16 / fp16); its
  ``predict_ms`` is ``predict_block_map`` alone;
- ``block_sparse_attn`` and ``flex_attention`` on the map that prediction makes.

Throughput is dense-equivalent (SPEC.md section 4: the causal pairs of the whole layer over the
time), so the rows compare times on one problem. Writes ``real_maps_<date>_<card>.{csv,md}``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_bench as rb  # noqa: E402

FIELDS = rb.FIELDS + ["rel_l1_dense", "layer", "tokens"]


def thresholds(path, tokens, layer, group, H):
    """(theta [H], mass threshold [H]) float32 of the Stage-1 rows of ``group`` in an eval CSV."""
    theta, mt = np.full(H, np.nan, np.float32), np.full(H, np.nan, np.float32)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if (r["tokens"], r["layer"], r["group"], r["setting"]) == (str(tokens), str(layer), group, "stage 1"):
                theta[int(r["head"])], mt[int(r["head"])] = float(r["theta"]), float(r["mass_threshold"])
    if np.isnan(theta).any() or np.isnan(mt).any():
        raise SystemExit(f"{path}: no complete Stage-1 rows for tokens={tokens} layer={layer} group={group}")
    return theta, mt


def write(rows, stem, argv):
    """The CSV and the markdown table of the rows so far (after every row: a run cut short keeps
    what it measured); returns the markdown."""
    import platform

    import torch
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| layer | tokens | method | density | rel L1 (same map) | rel L1 vs dense | ms | TOPS | "
             "x cuDNN | predict ms | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cud = next((x["ms"] for x in rows if x["method"] == "sdpa_cudnn" and x["layer"] == r["layer"]
                    and "ms" in x), None)
        f = lambda key, fmt: format(r[key], fmt) if r.get(key) not in (None, "") else "-"  # noqa: E731
        lines.append(f"| {r['layer']} | {r['tokens']} | {r['method']} | {r['density']:.3f} | "
                     f"{f('rel_l1', '.4f')} | {f('rel_l1_dense', '.4f')} | {f('ms', '.3f')} | "
                     f"{f('tops', '.0f')} | {format(cud / r['ms'], '.2f') if cud and r.get('ms') else '-'} | "
                     f"{f('predict_ms', '.3f')} | {r.get('status', '-')} |")
    md = (f"# Predicted maps of real inputs, {rb.card_name()}, {stem.name.split('_')[2]}, commit "
          f"{rb.git_commit()}\n\n"
          f"torch {torch.__version__}, python {platform.python_version()}; command: "
          f"`python bench/real_maps.py {' '.join(argv or sys.argv[1:])}`; dense-equivalent TOPS; "
          "median of do_bench (L2 flushed). Inputs: captured layers (fp16, causal, never committed).\n\n"
          + "\n".join(lines) + "\n")
    Path(f"{stem}.md").write_text(md)
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npz", nargs="+", required=True, help="captured layers (extract_gemma_qkv.py)")
    ap.add_argument("--thresholds", required=True, help="CSV of sparge-cupy eval with the tuned thresholds")
    ap.add_argument("--group", default="tuned_qbar")
    ap.add_argument("--reps-ms", type=int, default=100)
    ap.add_argument("--out", default=str(rb.ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    import torch
    import triton.testing

    import sparge_cupy.torch as st
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = out / f"real_maps_{stamp}_{rb.card_name().replace(' ', '_')}"
    rows = []
    for npz in args.npz:
        z = np.load(npz)
        q, k, v = (torch.from_numpy(z[n]).cuda() for n in ("q", "k", "v"))
        layer, tokens, scale = int(z["layer"]), int(z["tokens"]), float(z["scale"])
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        theta, mt = thresholds(args.thresholds, tokens, layer, args.group, H)
        pred_kw = dict(is_causal=True, scale=scale, simthreshd1=theta, mass_threshold=mt,
                       predictor="qbar_keys", local_window=True)
        bm = st.predict_block_map(q, k, **pred_kw)
        valid = torch.from_numpy(rb.valid_blocks(L, L, True)).cuda()
        density = float(bm.float().sum() / (B * H * valid.sum()))
        flops = 4 * B * H * rb.visible_pairs(L, L, True) * D
        sample = torch.randint(0, L, (512,), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        heads = list(range(H))
        ref_dense = rb.exact_rows(q, k, v, sample, heads, causal=True, scale=scale)
        ref_map = rb.exact_rows(q, k, v, sample, heads, causal=True, scale=scale, block_map=bm)
        timing = dict(heads=heads, rows=sample, flops=flops, reps_ms=args.reps_ms)
        base = dict(card=rb.card_name(), B=B, H=H, Hkv=Hkv, L=L, D=D, causal=True, dtype="float16",
                    layer=layer, tokens=tokens)
        dense_m = rb.methods(q, k, v, bm, causal=True, scale=scale, density=1.0)
        cases = [("sdpa_cudnn", dense_m["sdpa_cudnn"][0], ref_dense, "fp16", 1.0),
                 ("sdpa_flash", dense_m["sdpa_flash"][0], ref_dense, "fp16", 1.0),
                 ("flex_attention", dense_m["flex_attention"][0], ref_map, "fp16", density),
                 ("sparge_int8_fp8", functools.partial(st.block_sparse_attn, q, k, v, bm, is_causal=True,
                                                       scale=scale), ref_map, "ours", density),
                 ("sparge_e2e_tuned", functools.partial(st.sparge_attn, q, k, v, **pred_kw),
                  ref_map, "ours", density),
                 ("sparge_e2e_tuned_fp16_fp16", functools.partial(st.sparge_attn, q, k, v, qk="fp16",
                                                                  pv="fp16", **pred_kw),
                  ref_map, "ours", density)]
        for name, fn, ref, gate, dens in cases:
            row = dict(base, method=name, density=round(dens, 4))
            if rb.gate_and_time(row, fn, ref, gate, **timing):
                got = fn()
                got = got[0] if isinstance(got, tuple) else got
                row["rel_l1_dense"] = rb.rel_l1(got[0][heads][:, sample], ref_dense)
                if name.startswith("sparge_e2e"):
                    row["predict_ms"] = triton.testing.do_bench(
                        functools.partial(st.predict_block_map, q, k, **pred_kw),
                        warmup=25, rep=args.reps_ms, return_mode="median")
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
            write(rows, stem, argv)
        del q, k, v
        torch.cuda.empty_cache()
    print(write(rows, stem, argv))


if __name__ == "__main__":
    main()
