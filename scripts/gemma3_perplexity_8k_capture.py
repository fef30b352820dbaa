"""Capture for bench/results/gemma3_perplexity_8k.md: Q, K, V of Gemma 3 270M's full layers and the
dense per-token NLL on 8192 tokens of CPython's pydoc_data.topics that start at the topic "class"
(token 12066 of the joined text; BOS first, then 8191 text tokens), instead of the first 8192
tokens (whose end repeats the topic "assignment" word for word, tokens ~7860-8310).

Writes the files of scripts/extract_gemma_qkv.py (same checks) under the names of an 8192-token
capture, into $SPARGE_CACHE/gemma3_qkv, so that `SPARGE_CACHE=... sparge-cupy eval --tokens 8192`
reads them. Run with SPARGE_CACHE set to a folder of its own (not the default cache, whose 8192
files are the first-8192-token capture), holding a link to the Gemma float32 cache folder:

    mkdir -p /tmp/sc8k/gemma3_qkv
    ln -s ~/.cache/sparge_cupy/gemma3-270m-q4km-*-tf* /tmp/sc8k/
    SPARGE_CACHE=/tmp/sc8k HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/gemma3_perplexity_8k_capture.py
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402

from sparge_cupy import hf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import extract_gemma_qkv as X  # noqa: E402

START_TOPIC, N = "class", 8192


def topic_start_token(tok, text, topic):
    import pydoc_data.topics as T
    char = 0
    for k in sorted(T.topics):
        if k == topic:
            break
        char += len(T.topics[k]) + 2
    offs = np.array([o[0] for o in tok(text, return_offsets_mapping=True)["offset_mapping"]])
    return int(np.searchsorted(offs, char))


def main():
    assert os.environ.get("SPARGE_CACHE"), "set SPARGE_CACHE to a folder of its own"
    model, tok = hf.load_gemma3_270m("sdpa")
    text = hf.pydoc_text()
    all_ids = np.asarray(tok(text)["input_ids"], np.int64)
    start = topic_start_token(tok, text, START_TOPIC)
    ids = np.concatenate([all_ids[:1], all_ids[start:start + N - 1]])    # BOS + 8191 tokens
    print(f"cut: BOS + tokens {start}..{start + N - 2} of {all_ids.size} (topic {START_TOPIC!r} on); "
          f"begins {tok.decode(ids[1:12])!r}, ends {tok.decode(ids[-12:])!r}")
    out = hf.gemma_capture_path(N, 5).parent
    out.mkdir(parents=True, exist_ok=True)
    run = X.extract(model, ids, N, out, 2048)
    print({k: v for k, v in run.items() if k in ("ppl_dense", "timings_s")})


if __name__ == "__main__":
    main()
