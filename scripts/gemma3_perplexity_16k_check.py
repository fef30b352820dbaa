"""Copied-text check for bench/results/gemma3_perplexity_16k.md: does the 16384-token capture
(the first 16384 tokens of pydoc_data.topics, ``$SPARGE_CACHE/gemma3_qkv/*_16384_nll.npz``)
repeat text word for word, and where? Same test as gemma3_perplexity_8k.md: a position counts as
copied when it lies in a 24-token n-gram that occurs more than once inside the window.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python scripts/gemma3_perplexity_16k_check.py [N_TOKENS] [LAST]

Also prints the topics at the window's positions (the Gemma tokenizer of the float32 cache) and
the dense perplexity of the scored span, per 256 tokens, from the capture's stored NLL.
"""
import os
import sys
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402

from sparge_cupy import hf  # noqa: E402

NGRAM = 24


def copied_positions(ids, n=NGRAM):
    seen = defaultdict(list)
    for i in range(ids.size - n + 1):
        seen[ids[i:i + n].tobytes()].append(i)
    cov = np.zeros(ids.size, bool)
    for starts in seen.values():
        if len(starts) > 1:
            for i in starts:
                cov[i:i + n] = True
    return cov


def runs(mask):
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(idx) != 1)
    return [(int(a), int(b)) for a, b in zip(np.r_[idx[0], idx[cuts + 1]], np.r_[idx[cuts], idx[-1]])]


def main():
    n_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    last = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    nll_file = np.load(hf.gemma_capture_path(n_tokens))
    ids = np.asarray(nll_file["token_ids"]).reshape(-1).astype(np.int64)
    cov = copied_positions(ids)
    print(f"{ids.size} tokens; in a repeated {NGRAM}-gram: {int(cov.sum())} (runs {runs(cov)}); "
          f"in the last {last}: {int(cov[-last:].sum())}")
    nll = np.asarray(nll_file["nll_dense"], np.float64)[-last:]
    print(f"dense ppl of the last {last}: {np.exp(nll.mean()):.4f}; last 1024 {np.exp(nll[-1024:].mean()):.2f}; "
          f"last 256 {np.exp(nll[-256:].mean()):.2f}; per 256: "
          + " ".join(f"{np.exp(nll[i:i + 256].mean()):.2f}" for i in range(0, last, 256)))

    import pydoc_data.topics as T
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(hf._gemma_cache() / "tokenizer")
    text = hf.pydoc_text()
    enc = tok(text, return_offsets_mapping=True)
    assert np.array_equal(np.asarray(enc["input_ids"][:ids.size]), ids), "capture is not the first N tokens"
    chars = np.array([o[0] for o in enc["offset_mapping"]])
    char, starts = 0, []
    for k in sorted(T.topics):
        starts.append((int(np.searchsorted(chars, char)), k))
        char += len(T.topics[k]) + 2
    print("topics starting in the window (token: name):",
          ", ".join(f"{t}: {k}" for t, k in starts if t < ids.size))
    print(f"scored span begins {tok.decode(ids[-last:-last + 14])!r}; ends {tok.decode(ids[-14:])!r}")


if __name__ == "__main__":
    main()
