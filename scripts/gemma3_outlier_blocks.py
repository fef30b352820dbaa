"""Why single query blocks of Gemma 3 keep large errors under the tuned maps: how much of their
true attention mass the qbar-keys estimate ranks first, with the query pooled over the whole block
(128 rows, the shipped estimate) or over 32- / 16-row sub-blocks (the mean of their estimates).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/gemma3_outlier_blocks.py

Needs the capture of ``scripts/extract_gemma_qkv.py --tokens 16384``. For each (layer, head, query
block) of ``CASES`` (the two outliers of ``bench/results/gemma3_block_bound_16k.md`` and two
ordinary blocks) it prints, for the n key blocks the estimate ranks highest, the share of the
block's true (float64, causal) attention mass they hold, and the best possible share (the n blocks
of largest true mass). The estimate is ``reference.qbar_keys_logits``'s: scale * qbar . (k - km) +
log(share of the block's rows that see the key), softmax over the keys, summed per key block.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ((5, 1, 42), (11, 2, 62), (5, 0, 10), (11, 0, 100))
BQ, BK = 128, 64


def main():
    from sparge_cupy import evaluate as ev
    for layer, head, blk in CASES:
        d = ev.load_capture(16384, layer)
        q = d["q"][0, head].astype(np.float64)
        k = d["k"][0, 0].astype(np.float64)
        scale = float(d["scale"])
        r0, r1 = blk * BQ, (blk + 1) * BQ
        keys = k[:r1]
        km = k.mean(axis=0)
        rows, cols = np.arange(r0, r1)[:, None], np.arange(r1)[None, :]
        s = np.where(cols <= rows, (q[r0:r1] @ keys.T) * scale, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        starts = np.arange(0, r1, BK)
        true = np.add.reduceat(p.mean(axis=0), starts)

        def estimate(sub):
            """Mean over the sub-blocks of ``sub`` rows of their estimated key-block mass."""
            out = np.zeros(len(starts))
            for a in range(0, BQ, sub):
                seen = (np.arange(r0 + a, r0 + a + sub)[:, None] >= cols).mean(axis=0)
                lg = (keys - km) @ q[r0 + a:r0 + a + sub].mean(axis=0) * scale
                lg = np.where(seen > 0, lg + np.log(np.maximum(seen, 1e-300)), -np.inf)
                e = np.exp(lg - lg.max())
                out += np.add.reduceat(e / e.sum(), starts)
            return out / (BQ // sub)

        best = np.sort(true)[::-1]
        for sub in (128, 32, 16):
            order = np.argsort(-estimate(sub))
            shares = " ".join(f"top-{n}: {true[order[:n]].sum():.3f} (best {best[:n].sum():.3f})"
                              for n in (8, 16, 32))
            print(f"layer {layer} head {head} query block {blk}, query pooled over {sub} rows: {shares}",
                  flush=True)


if __name__ == "__main__":
    main()
