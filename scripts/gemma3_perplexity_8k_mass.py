"""Perplexity at 8K with the mass threshold rule (bench/results/gemma3_perplexity_8k.md, second row).

What `sparge-cupy eval --steps tuned --perplexity` does for TopCdf, with mode="mass": tune each full
layer (5, 11, 17) of the capture in $SPARGE_CACHE (made by gemma3_perplexity_8k_capture.py) with
sparge_cupy.tune.tune_layer (INT8+rebalance QK^T, FP8 P V, L1 <= 0.05 Stage 1, <= 0.06 Stage 2,
NumPy reference on the CPU), then the model's perplexity of the last 2048 tokens with the "sparge"
attention implementation running those settings (dense: the capture's stored NLL).

    SPARGE_CACHE=/tmp/sc8k HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/gemma3_perplexity_8k_mass.py OUT.json
"""
import json
import sys
import time

import numpy as np

from sparge_cupy import hf
from sparge_cupy.tune import to_hf_settings, tune_layer

N, LAST, LAYERS = 8192, 2048, (5, 11, 17)


def main(out):
    t0 = time.perf_counter()
    tunings, res = {}, {"tokens": N, "last": LAST, "mode": "mass", "layers": {}}
    for layer in LAYERS:
        d = hf.load_gemma_capture(N, layer)
        t = time.perf_counter()
        r = tune_layer([d["q"]], [d["k"]], [d["v"]], is_causal=True, scale=d["scale"], l1=0.05,
                       pv_l1=0.06, layer=str(layer), mode="mass", log=None)
        tunings[str(layer)] = r
        res["layers"][str(layer)] = {
            "tune_s": round(time.perf_counter() - t, 1),
            "theta": np.asarray(r.simthreshd1).tolist(), "mass_threshold": np.asarray(r.threshold).tolist(),
            "lambda": [None if not np.isfinite(x) else float(x) for x in np.asarray(r.pvthreshd)],
            "stage1_sparsity": np.asarray(r.stage1_sparsity).tolist(),
            "total_sparsity": np.asarray(r.total_sparsity).tolist(),
            "l1_stage1": np.asarray(r.stage1_l1).tolist(), "l1": np.asarray(r.l1).tolist()}
        print(layer, res["layers"][str(layer)], flush=True)
    nll = hf.load_gemma_capture(N, None)
    ids = np.asarray(nll["token_ids"]).reshape(-1)
    res["ppl_dense"] = float(np.exp(np.asarray(nll["nll_dense"])[-LAST:].mean()))
    model, _ = hf.load_gemma3_270m()
    settings = hf.SpargeSettings.from_dict(to_hf_settings(tunings))
    settings.collect_stats = True
    hf.register(settings)
    t = time.perf_counter()
    res["ppl_sparge"] = hf.perplexity(model, ids, "sparge", last=LAST)["ppl"]
    res["sparge_forward_s"] = round(time.perf_counter() - t, 1)
    res["run_sparsity"] = {str(k): {n: s[n] for n in ("stage1_sparsity", "stage2_sparsity", "total_sparsity")
                                    if n in s} for k, s in settings.summary().items() if "stage1_sparsity" in s}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: v for k, v in res.items() if k != "layers"}, indent=1))
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
