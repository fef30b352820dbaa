"""The per-query-block bound of the tuner (``tune_layer(block_factor=F, block_quantile=q)``) on
Gemma 3 270M's full layers at 16K tokens: Stage-1 sparsity and perplexity for a grid of (F, q).

Two steps, so the slow one runs once:

- ``sweep``: per full layer (5, 11, 17) of the capture, the tuner's curves evaluator for the
  configuration of ``sparge-cupy eval --steps tuned_qbar --local-window`` (qbar-keys estimate, mass
  threshold rule, FP16 Q K^T / FP16 P V, local window, the default theta grid) is built once; then
  for every (F, q) of ``--grid`` the Stage-1 search of ``sparge_cupy.tune`` runs on it at
  ``--l1`` (curves only: no exact verification, no Stage 2). Writes the per-head thresholds,
  sparsity, L1 and block error to ``--json`` and prints them.
- ``ppl``: for chosen grid keys of that JSON, the perplexity of the last ``--last`` tokens with each
  full layer restricted to the tuned map of its own Q and K (float64 attention over the map,
  sparsity only, as ``scripts/gemma3_map_perplexity.py`` does; the sliding-window layers dense).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/gemma3_block_bound_sweep.py sweep --json /tmp/block_sweep.json
    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/gemma3_block_bound_sweep.py ppl --json /tmp/block_sweep.json --keys 3_1 2_0.9

Grid keys are ``F_q`` (``none_1``: the head's L1 alone). The numbers of the full command (exact
verification, FP16 rounding in the model) come from ``sparge-cupy eval --block-factor F``.

``--predictor`` (every step; default qbar_keys, one pooled query per 128-row block): the
estimate; ``qgroup_keys`` pools the query over groups of 32 rows and averages the groups'
softmaxes over every key (``reference.predict.qgroup_keys_logits``, a kernel on the GPU). The
results of ``bench/results/gemma3_query_groups_16k.md`` were made before it was a predictor,
with this script's former ``--query-group 32`` (the same estimate from unrounded float64 means);
the full command is now ``sparge-cupy eval --steps tuned_qbar --qbar-predictor qgroup_keys``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402

F32 = np.float32
LAYERS = (5, 11, 17)
DEFAULT_GRID = ("none_1", "4_1", "3_1", "3_0.95", "2.5_0.95", "3_0.9", "2.5_0.9", "2_0.9", "2_0.8")


def parse_key(key):
    f, q = key.split("_")
    return (None if f == "none" else float(f)), float(q)


def sweep(args):
    from sparge_cupy import evaluate as ev
    from sparge_cupy import tune as T
    out = {}
    for layer in LAYERS:
        t0 = time.perf_counter()
        d = ev.load_capture(args.tokens, layer)
        inputs, _ = T._prepare_inputs([d["q"]], [d["k"]], [d["v"]], is_causal=True, scale=float(d["scale"]),
                                      layout="HND")
        curves = T._CurveEvaluator(inputs, thetas=T.DEFAULT_THETAS, mode="mass", qk="fp16", pv="fp16",
                                   rebalance=True, attention_sink=True, predictor=args.predictor,
                                   local_window=True)
        H = d["q"].shape[1]
        print(f"layer {layer}: curves {time.perf_counter() - t0:.0f} s", flush=True)
        for key in args.grid:
            factor, quantile = parse_key(key)
            curves.block_quantile = quantile
            ti, thr, ok, sp = T._search_stage1(curves, T.DEFAULT_THETAS, np.full(H, args.l1), "mass",
                                               T.STEPS, None, factor)
            full = ~ok | (sp <= 0)
            r = curves.stage1(ti, thr, full)
            print(f"  {key}: s1 {np.round(r.s1, 3).tolist()} mean {r.s1.mean():.3f} "
                  f"l1 {np.round(r.l1, 4).tolist()} block error {np.round(r.block_l1, 4).tolist()}", flush=True)
            out.setdefault(key, {})[str(layer)] = {
                "theta": np.asarray(T.DEFAULT_THETAS, F32)[ti].tolist(),
                "mass_threshold": np.where(full, 0.0, thr).astype(float).tolist(),
                "s1": r.s1.tolist(), "l1": r.l1.tolist(), "block_l1": r.block_l1.tolist()}
        Path(args.json).write_text(json.dumps(out))
    means = {k: float(np.mean([np.mean(v[str(layer)]["s1"]) for layer in LAYERS])) for k, v in out.items()}
    for k, m in means.items():
        print(f"{k}: mean Stage-1 sparsity over the full layers {m:.3f}")


def ppl(args):
    sys.path.insert(0, str(Path(__file__).parent))
    import gemma3_map_perplexity as G
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from sparge_cupy import hf
    from sparge_cupy import reference as R
    tuned = json.loads(Path(args.json).read_text())
    nll = hf.load_gemma_capture(args.tokens, None)
    ids = np.asarray(nll["token_ids"]).reshape(-1)
    model, _ = hf.load_gemma3_270m(log=print)
    dense = float(np.exp(np.asarray(nll["nll_dense"], np.float64)[-args.last:].mean()))
    print(f"{args.tokens} tokens, last {args.last}: dense perplexity {dense:.4f}", flush=True)
    for key in args.keys:
        per_layer = tuned[key]

        def make(layer, q, k, v, scale, per_layer=per_layer):
            d = per_layer[str(layer)]
            bm = R.predict_block_map(q, k, is_causal=True, scale=scale, simthreshd1=np.array(d["theta"], F32),
                                     predictor=args.predictor, local_window=True,
                                     mass_threshold=np.array(d["mass_threshold"], F32))
            return bm, ""
        record = {}
        AttentionInterface.register(G.NAME, G.map_attention(make, record))
        AttentionMaskInterface.register(G.NAME, sdpa_mask)
        t0 = time.perf_counter()
        p = hf.perplexity(model, ids, G.NAME, last=args.last)["ppl"]
        sp = [float(np.mean(s)) for _, (s, _, _) in sorted(record.items())]
        print(f"{key}: perplexity {p:.4f} ({p / dense - 1:+.2%}), Stage-1 sparsity per layer "
              f"{np.round(sp, 3).tolist()} (mean {np.mean(sp):.3f}), {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--grid", nargs="+", default=list(DEFAULT_GRID), metavar="F_q")
    s.add_argument("--l1", type=float, default=0.05)
    p = sub.add_parser("ppl")
    p.add_argument("--keys", nargs="+", required=True, metavar="F_q")
    p.add_argument("--last", type=int, default=2048)
    for x in (s, p):
        x.add_argument("--json", required=True)
        x.add_argument("--tokens", type=int, default=16384)
        x.add_argument("--predictor", choices=("qbar_keys", "qgroup_keys"), default="qbar_keys",
                       help="the estimate (qgroup_keys: the query pooled over 32-row groups)")
    args = ap.parse_args(argv)
    (sweep if args.what == "sweep" else ppl)(args)


if __name__ == "__main__":
    main()
