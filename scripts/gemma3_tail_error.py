"""Where the error of a tuned map lies: relative L1 over all rows against the last T rows.

The eval's tuning bounds each head's relative L1 over *all* query rows; perplexity scores the last
T tokens. For each full layer of the Gemma 3 capture this compares, per head, the tuned map of an
eval CSV (``--group``: its per-head theta and rule threshold, run through
``reference.predict_block_map`` with the group's predictor) and the oracle map at the same bound:
Stage-1 sparsity over all rows and over the last T rows' query blocks, relative L1 (float64,
sparsity only: no quantization) over all rows and over the last T rows, and the share of query
blocks that drop one of their two last valid key blocks (the 128 x 128 square on the diagonal:
the most recent tokens).

    PYTHONPATH=. python scripts/gemma3_tail_error.py --csv bench/results/gemma3_eval_qbar.csv --tokens 16384 --last 2048
"""
from __future__ import annotations

import argparse

import numpy as np

F32 = np.float32
PREDICTOR = {"tuned": "paper", "tuned_mass": "paper", "tuned_qbar": "qbar_keys"}
RULE = {"tuned": "cdfthreshd", "tuned_mass": "mass_threshold", "tuned_qbar": "mass_threshold"}


def rel_l1(out, ref, rows):
    return np.abs(out[:, :, rows] - ref[:, :, rows]).sum(axis=(0, 2, 3)) / np.abs(ref[:, :, rows]).sum(axis=(0, 2, 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", required=True)
    ap.add_argument("--group", default="tuned_qbar", choices=sorted(PREDICTOR))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--last", type=int, default=2048)
    args = ap.parse_args(argv)
    from sparge_cupy import evaluate as ev
    from sparge_cupy import reference as R
    rows = [r for r in ev.read_csv(args.csv) if r["tokens"] == args.tokens
            and r["group"] == args.group and r["setting"] == "stage 1"]
    print(f"| layer | head | map | sparsity (all rows) | sparsity (last {args.last}) | "
          f"L1 (all rows) | L1 (last {args.last}) | diagonal dropped |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in sorted({r["layer"] for r in rows}):
        heads = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["head"])
        data = ev.load_capture(args.tokens, layer)
        q, k, v, scale = data["q"], data["k"], data["v"], float(data["scale"])
        Lq = q.shape[2]
        tail = slice(Lq - args.last, Lq)
        i0 = (Lq - args.last) // 128
        valid = R.valid_blocks(Lq, k.shape[2], 128, 64, True)
        last = valid.sum(axis=1) - 1                                   # each row's last valid block
        rows_i = np.arange(valid.shape[0])
        ref = R.exact_attention(q, k, v, is_causal=True, scale=scale)
        theta = np.array([r["theta"] for r in heads], F32)
        thr = np.array([r[RULE[args.group].replace("cdfthreshd", "tau")] for r in heads], F32)
        tuned = R.predict_block_map(q, k, is_causal=True, scale=scale, simthreshd1=theta,
                                    predictor=PREDICTOR[args.group], **{RULE[args.group]: thr})
        bound = heads[0]["bound"]
        oracle, _ = R.oracle_block_map(q, k, v, is_causal=True, scale=scale, l1=bound, verify=False)
        for name, bm in ((args.group, tuned), (f"oracle l1<={bound:g}", oracle)):
            out = R.exact_attention(q, k, v, is_causal=True, scale=scale, block_map=bm)
            bm = bm & valid
            s_all = 1 - bm.sum(axis=(0, 2, 3)) / (bm.shape[0] * valid.sum())
            s_tail = 1 - bm[:, :, i0:].sum(axis=(0, 2, 3)) / (bm.shape[0] * valid[i0:].sum())
            l_all, l_tail = rel_l1(out, ref, slice(None)), rel_l1(out, ref, tail)
            diag = ~(bm[:, :, rows_i, last] & bm[:, :, rows_i, np.maximum(last - 1, 0)])
            diag = diag.mean(axis=(0, 2))
            for h in range(len(heads)):
                print(f"| {layer} | {h} | {name} | {s_all[h]:.3f} | {s_tail[h]:.3f} | "
                      f"{l_all[h]:.4f} | {l_tail[h]:.4f} | {diag[h]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
