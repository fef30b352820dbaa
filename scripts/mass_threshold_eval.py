"""The mass threshold rule against the paper's TopCdf and the oracle on Gemma 3's full layers.

For every token count N, full-attention layer (5, 11, 17) and quantization (``int8``: INT8 QK^T
with rebalancing and FP8 P V, the API's defaults; ``fp32``: no quantization), per query head:

- rules (``--rules``): ``cdf``, ``mass``, ``qbar_keys``: :func:`sparge_cupy.tune.tune_layer` with
  ``mode="cdf"`` (the paper's TopCdf), ``mode="mass"`` (``mass_threshold``) or ``mode="mass"``
  with ``predictor="qbar_keys"`` (reference only), Stage 1 only (L1 <= ``--l1``), theta = -1 (the
  predictor study found theta = -1 best on this model), curves evaluator verified exactly: the
  saved sparsity and L1 are the reference's (``predict_block_map`` + ``block_sparse_attention``).
- ``oracle``: :func:`reference.oracle_block_map` at the same bound (float64, no quantization,
  Lagrange allocation), as in ``sparge-cupy eval`` and the predictor study.
- transfer: the thresholds tuned at ``--transfer-from`` tokens (per layer, head, quantization and
  rule) run unchanged at the other token counts, measured exactly with the tuner's exact
  evaluator (the reference); ``--joint-from 4096 8192``: tuned on those inputs together (each
  within the bound) and run at ``--tokens`` (the held-out use; only that is run then).

The commands of ``bench/results/mass_threshold_gemma3.md`` are listed in its "Runs" section; the
16K runs take about 30 minutes on 2 cores (the float64 reference and the curves).

Writes a JSON of every per-head row and a Markdown report. Usage (from the repository root)::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python scripts/mass_threshold_eval.py --tokens 4096 8192 \\
        --out bench/results/mass_threshold_gemma3
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from sparge_cupy import reference as R
from sparge_cupy import tune as T
from sparge_cupy.hf import load_gemma_capture

F32 = np.float32
QUANTS = {"int8": dict(qk="int8", pv="fp8", rebalance=True),
          "fp32": dict(qk="fp32", pv="fp32", rebalance=False)}
RULES = ("cdf", "mass", "qbar_keys")
# rule -> (tuner mode, predictor): TopCdf and the mass threshold on the paper's compressed map, and
# the mass threshold on the reference-only qbar-keys estimate
RULE_SPEC = {"cdf": ("cdf", "paper"), "mass": ("mass", "paper"), "qbar_keys": ("mass", "qbar_keys")}
RULE_NAMES = {"cdf": "TopCdf (paper)", "mass": "mass threshold", "qbar_keys": "qbar-keys + mass threshold"}
KEY = ("tokens", "layer", "head", "quant", "rule", "tuned_at")      # one row per key
THETAS = (-1.0,)


def measure_layer(N, layer, quants, rules, l1, transfer, log):
    """Rows of one (N, layer); ``transfer`` maps (layer, quant, rule) to the LayerTuning to apply."""
    d = load_gemma_capture(N, layer)
    q, k, v, scale = d["q"], d["k"], d["v"], float(d["scale"])
    rows, tunings = [], {}
    t = time.perf_counter()
    _, info = R.oracle_block_map(q, k, v, is_causal=True, scale=scale, l1=l1, verify=False)
    log(f"{N}/{layer}: oracle {info['sparsity'].round(3)} ({time.perf_counter() - t:.0f} s)")
    for h in range(q.shape[1]):
        rows.append(dict(tokens=N, layer=layer, head=h, quant="fp32", rule="oracle", tuned_at=N,
                         stage1_sparsity=float(info["sparsity"][h]), l1=float(info["l1"][h]),
                         threshold=None))
    for qname in quants:
        for rule in rules:
            t = time.perf_counter()
            mode, predictor = RULE_SPEC[rule]
            r = T.tune_layer([q], [k], [v], is_causal=True, scale=scale, l1=l1, pv_l1=l1,
                             layer=str(layer), mode=mode, predictor=predictor, thetas=THETAS,
                             stage2=False, **QUANTS[qname])
            tunings[(layer, qname, rule)] = r
            log(f"{N}/{layer}/{qname}/{rule}: s1 {r.stage1_sparsity.round(3)} l1 "
                f"{r.stage1_l1.round(4)} thr {r.threshold} ({time.perf_counter() - t:.0f} s)")
            for h in range(r.heads):
                rows.append(dict(tokens=N, layer=layer, head=h, quant=qname, rule=rule, tuned_at=N,
                                 stage1_sparsity=float(r.stage1_sparsity[h]), l1=float(r.stage1_l1[h]),
                                 threshold=float(r.threshold[h]), dense=bool(r.dense[h]),
                                 floor_l1=float(r.quant_floor_l1[h])))
            src = transfer.get((layer, qname, rule))
            if src is None:
                continue
            t = time.perf_counter()
            inputs, _ = T._prepare_inputs([q], [k], [v], is_causal=True, scale=scale, layout="HND")
            ev = T._ExactEvaluator(inputs, thetas=THETAS, mode=mode, predictor=predictor,
                                   attention_sink=True, **QUANTS[qname])
            e = ev.stage1(np.zeros(src.heads, np.int64), src.threshold, np.asarray(src.dense, bool))
            log(f"{N}/{layer}/{qname}/{rule}: tuned at {src.inputs[0]['tokens_q']}: s1 "
                f"{e.s1.round(3)} l1 {e.l1.round(4)} ({time.perf_counter() - t:.0f} s)")
            for h in range(src.heads):
                rows.append(dict(tokens=N, layer=layer, head=h, quant=qname, rule=rule,
                                 tuned_at=src.inputs[0]["tokens_q"], stage1_sparsity=float(e.s1[h]),
                                 l1=float(e.l1[h]), threshold=float(src.threshold[h]),
                                 dense=bool(src.dense[h])))
    return rows, tunings


def joint_transfer(src_tokens, tokens, layers, quants, rules, l1, log):
    """Thresholds tuned on the ``src_tokens`` inputs together (every input within ``l1``, as
    ``tune_layer`` does over its inputs), run unchanged at each of ``tokens``: rows with
    ``tuned_at`` "4096+8192"."""
    tag = "+".join(str(n) for n in src_tokens)
    rows = []
    for layer in layers:
        src = [load_gemma_capture(n, layer) for n in src_tokens]
        dst = {n: load_gemma_capture(n, layer) for n in tokens}
        for qname in quants:
            for rule in rules:
                mode, predictor = RULE_SPEC[rule]
                t = time.perf_counter()
                r = T.tune_layer([d["q"] for d in src], [d["k"] for d in src], [d["v"] for d in src],
                                 is_causal=True, scale=[float(d["scale"]) for d in src], l1=l1,
                                 pv_l1=l1, layer=str(layer), mode=mode, predictor=predictor,
                                 thetas=THETAS, stage2=False, **QUANTS[qname])
                log(f"{tag}/{layer}/{qname}/{rule}: joint s1 {r.stage1_sparsity.round(3)} "
                    f"({time.perf_counter() - t:.0f} s)")
                for n, d in dst.items():
                    inputs, _ = T._prepare_inputs([d["q"]], [d["k"]], [d["v"]], is_causal=True,
                                                  scale=float(d["scale"]), layout="HND")
                    ev = T._ExactEvaluator(inputs, thetas=THETAS, mode=mode, predictor=predictor,
                                           attention_sink=True, **QUANTS[qname])
                    e = ev.stage1(np.zeros(r.heads, np.int64), r.threshold, np.asarray(r.dense, bool))
                    log(f"{n}/{layer}/{qname}/{rule}: tuned at {tag}: s1 {e.s1.round(3)} l1 "
                        f"{e.l1.round(4)} ({time.perf_counter() - t:.0f} s)")
                    rows += [dict(tokens=n, layer=layer, head=h, quant=qname, rule=rule, tuned_at=tag,
                                  stage1_sparsity=float(e.s1[h]), l1=float(e.l1[h]),
                                  threshold=float(r.threshold[h]), dense=bool(r.dense[h]))
                             for h in range(r.heads)]
    return rows


def _mean(rows, **match):
    sel = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return (float(np.mean([r["stage1_sparsity"] for r in sel])) if sel else float("nan")), sel


def markdown(rows, runs, l1):
    tokens = sorted({r["tokens"] for r in rows})
    quants = [qn for qn in QUANTS if any(r["quant"] == qn and r["rule"] != "oracle" for r in rows)]
    out = ["# The mass threshold rule against TopCdf and the oracle (Gemma 3 270M full layers)", "",
           "Made by `scripts/mass_threshold_eval.py` (its docstring defines every column). Per query "
           "head of layers 5, 11, 17 of Gemma 3 270M (4 query heads, 1 kv head, D = 256, causal) on the "
           "first N tokens of CPython's `pydoc_data.topics` (`sparge_cupy.hf.load_gemma_capture`, the "
           "captures of `bench/results/predictor_study.md` and `gemma3_eval_pydoc.md`). Stage 1 only, "
           f"relative L1 <= {l1:g} against float64 dense attention; theta = -1 for every rule; "
           "errors and sparsities of the tuned rules are the reference's exact ones (the tuner "
           "verifies the curves' choice and tightens where it misses).", "", "## Runs", ""]
    for run_ in runs:
        out += [f"- {run_['date']}: `{run_['command']}` ({run_['seconds']:.0f} s)",
                f"  - machine: {run_['machine']}; numpy {run_['numpy']}"]
    out += ["", f"## Mean Stage-1 sparsity over 3 layers x 4 heads at L1 <= {l1:g}", "",
            "oracle: float64, no quantization (the same oracle for both quantization rows, so the "
            "int8 rows include the quantization floor's cost). `% oracle` = mean / oracle mean.", ""]
    body = []
    for qn in quants:
        for n in tokens:
            o, _ = _mean(rows, tokens=n, rule="oracle")
            c, _ = _mean(rows, tokens=n, quant=qn, rule="cdf", tuned_at=n)
            m, sel = _mean(rows, tokens=n, quant=qn, rule="mass", tuned_at=n)
            if not sel:
                continue
            worst = max(r["l1"] for r in sel)
            qk, qsel = _mean(rows, tokens=n, quant=qn, rule="qbar_keys", tuned_at=n)
            body.append([qn, n, f"{o:.3f}", f"{c:.3f} ({c / o:.0%})" if c == c else "not run",
                         f"{m:.3f} ({m / o:.0%})", f"{m / c:.2f}x" if c > 0 else "-", f"{worst:.4f}",
                         f"{qk:.3f} ({qk / o:.0%}), max L1 {max(r['l1'] for r in qsel):.4f}"
                         if qsel else "not run"])
    out += _table(["quant", "tokens", "oracle", "TopCdf (paper)", "mass threshold", "mass / TopCdf",
                   "max L1 (mass)", "qbar-keys + mass threshold (reference only)"], body) + [""]
    sources = sorted({r["tuned_at"] for r in rows if r["tuned_at"] != r["tokens"]}, key=str)
    if sources:
        out += ["## Transfer: thresholds tuned on other lengths, run unchanged", "",
                "Per layer, head, quantization and rule the thresholds tuned on the input(s) of "
                "`tuned on` tokens (several: all within the bound at once, as `tune_layer` does over "
                "its inputs), unchanged; measured exactly (reference predictor and attention). `own` "
                "= the rule tuned on that input itself; `-` where it was not run.", ""]
        body = []
        for source in sources:
            for qn in quants:
                for rule in RULES:
                    for n in tokens:
                        got, sel = _mean(rows, tokens=n, quant=qn, rule=rule, tuned_at=source)
                        if not sel or n == source:
                            continue
                        own, own_sel = _mean(rows, tokens=n, quant=qn, rule=rule, tuned_at=n)
                        l1s = np.array([r["l1"] for r in sel])
                        o, _ = _mean(rows, tokens=n, rule="oracle")
                        body.append([source, qn, RULE_NAMES[rule], n, f"{own:.3f}" if own_sel else "-",
                                     f"{got:.3f} ({got / o:.0%})", f"{l1s.mean():.4f}",
                                     f"{l1s.max():.4f}", f"{int((l1s > l1).sum())}/{l1s.size}"])
        out += _table(["tuned on", "quant", "rule", "run at", "own tuning", "sparsity (% oracle)",
                       "L1 mean", "L1 max", f"heads over {l1:g}"], body) + [""]
    out += ["## Per head (tuned on the input itself)", "",
            "s1 = Stage-1 sparsity, t = tuned mass threshold (nk * P^ >= t), tau = tuned TopCdf "
            "threshold; floor = L1 with every block kept (int8 rows).", ""]
    body = []
    for qn in quants:
        for n in tokens:
            for layer in sorted({r["layer"] for r in rows}):
                for h in sorted({r["head"] for r in rows}):
                    key = dict(tokens=n, layer=layer, head=h)
                    pick = {rule: [r for r in rows if r.items() >= {**key, "quant": qn, "rule": rule,
                                                                    "tuned_at": n}.items()]
                            for rule in RULES}
                    o = [r for r in rows if r.items() >= {**key, "rule": "oracle"}.items()]
                    if not (pick["mass"] and o):
                        continue
                    c = pick["cdf"][0] if pick["cdf"] else {"stage1_sparsity": "-", "threshold": "-"}
                    m = pick["mass"][0]
                    body.append([qn, n, layer, h, f"{o[0]['stage1_sparsity']:.3f}",
                                 _fmt(c["stage1_sparsity"], ".3f"), _fmt(c["threshold"], ".5f"),
                                 f"{m['stage1_sparsity']:.3f}", f"{m['threshold']:.4g}",
                                 f"{m['l1']:.4f}", f"{m.get('floor_l1', float('nan')):.4f}"])
    out += _table(["quant", "tokens", "layer", "head", "oracle s1", "TopCdf s1", "tau", "mass s1", "t",
                   "mass L1", "floor L1"], body) + [""]
    over = [r for r in rows if r["rule"] != "oracle" and r["tuned_at"] == r["tokens"] and r["l1"] > l1]
    out += ["## Notes", "",
            "- Runs written elsewhere (`--out /tmp/...`) are merged into this file by the script's "
            "`--merge` rule: rows keyed by (tokens, layer, head, quant, rule, tuned_at), the later run "
            "wins; every run that made a row is listed above.",
            "- A threshold of 0 marks a head the tuner keeps whole (no threshold meets the bound). "
            + ("Tuned on their own input, these exceed the bound because quantization alone does "
               "(floor L1 above it): " + "; ".join(
                   f"{r['tokens']} {r['quant']} {RULE_NAMES[r['rule']]} layer {r['layer']} head "
                   f"{r['head']} (L1 {r['l1']:.4f})" for r in over) + "." if over else "")]
    return "\n".join(out) + "\n"


def _fmt(x, spec):
    return x if isinstance(x, str) else format(x, spec)


def _table(header, body):
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in body])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--layers", type=int, nargs="+", default=[5, 11, 17])
    p.add_argument("--quant", nargs="+", choices=list(QUANTS), default=list(QUANTS))
    p.add_argument("--rules", nargs="+", choices=RULES, default=["cdf", "mass"])
    p.add_argument("--l1", type=float, default=0.05)
    p.add_argument("--transfer-from", type=int, default=4096)
    p.add_argument("--out", default="bench/results/mass_threshold_gemma3",
                   help="prefix of the .json and .md written")
    p.add_argument("--joint-from", type=int, nargs="+", default=None, metavar="N",
                   help="also tune on these token counts together and run at every --tokens "
                        "(the held-out use)")
    p.add_argument("--merge", action="store_true", help="keep the rows of an existing JSON that "
                   "this run does not measure again (same tokens, layer, head, quant, rule, tuned_at)")
    args = p.parse_args(argv)

    def log(line):
        print(line, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    tokens = sorted(args.tokens, key=lambda n: n != args.transfer_from)   # the source first
    out = Path(args.out)
    rows = []
    transfer = {}                 # filled at --transfer-from (pass it in --tokens for the transfer)
    if args.joint_from:
        rows += joint_transfer(args.joint_from, tokens, args.layers, args.quant, args.rules, args.l1, log)
        tokens = []                   # the held-out runs only
    for n in tokens:
        for layer in args.layers:
            r, tunings = measure_layer(n, layer, args.quant, args.rules, args.l1,
                                       transfer if n != args.transfer_from else {}, log)
            rows += r
            if n == args.transfer_from:
                transfer.update(tunings)
    old = (json.loads(out.with_suffix(".json").read_text())
           if args.merge and out.with_suffix(".json").is_file() else {})   # read last: runs may overlap
    runs = old.get("runs", [])
    new = {tuple(r[c] for c in KEY) for r in rows}
    rows = [r for r in old.get("rows", []) if tuple(r[c] for c in KEY) not in new] + rows
    runs.append({"command": "OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python scripts/mass_threshold_eval.py "
                            + " ".join(argv if argv is not None else sys.argv[1:]),
                 "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.perf_counter() - t0,
                 "machine": f"{platform.processor() or platform.machine()}, "
                            f"{__import__('os').cpu_count()} cores", "numpy": np.__version__})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=0) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, runs, args.l1))
    print(out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
