"""Helpers of the GPU tests: checks of the kernels against the NumPy reference whose tolerances
come from the problem (flash-attention's rule), and the one allowed source of block-map
differences (near-ties of the selection, where the reference's float32 BLAS / exp / pairwise sums
and the kernel's float64 sums round differently)."""
from __future__ import annotations

import numpy as np

from sparge_cupy import reference as R

OUT_EPS = {"float16": float(np.finfo(np.float16).eps), "float32": float(np.finfo(np.float32).eps),
           "bfloat16": 2.0 ** -7}


def rel_l1(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.abs(b).sum()
    return float(np.abs(a - b).sum() / den) if den else float(np.abs(a).sum())


def round_to(x, dtype_name):
    """``x`` as an output of ``dtype_name`` would hold it (bf16: round to nearest even; fp16:
    saturated, reference.to_output)."""
    from sparge_cupy import reference as R
    x = np.asarray(x, np.float32)
    if dtype_name == "bfloat16":
        import ml_dtypes
        return x.astype(ml_dtypes.bfloat16).astype(np.float64)
    return R.to_output(x, dtype_name).astype(np.float64)


def check_attention(out, mirror, dense, dtype_name):
    """The kernel's output against the blocked mirror (same quantized operands) and the float64
    truth, all HND. Returns the metrics; raises AssertionError naming the failed rule.

    Rules: (1) every element at most twice the mirror's largest error against the truth, plus a
    floor of 4 output ulps of max|O| (flash-attention's rule, the mirror being the same-precision
    reference); (2) relative L1 against the truth at most 5% above the mirror's; (3) kernel and
    mirror agree ten times better than either agrees with the truth (they compute the same
    function with the same quantized operands; only exp2, summation order and output rounding
    differ), up to 2 output ulps.
    """
    out = np.asarray(out, np.float64)
    mirror = round_to(mirror, dtype_name)
    dense = np.asarray(dense, np.float64)
    eps = OUT_EPS[dtype_name]
    if not np.isfinite(out).all():
        raise AssertionError(f"output: {int((~np.isfinite(out)).sum())} non-finite elements")
    scale = max(float(np.abs(dense).max()), 1e-30)
    err_k, err_m = np.abs(out - dense), np.abs(mirror - dense)
    m = {"max_err": float(err_k.max()), "mirror_max_err": float(err_m.max()),
         "rel_l1": rel_l1(out, dense), "mirror_rel_l1": rel_l1(mirror, dense),
         "rel_l1_vs_mirror": rel_l1(out, mirror)}
    bound = 2.0 * m["mirror_max_err"] + 4 * eps * scale
    if m["max_err"] > bound:
        i = np.unravel_index(int(err_k.argmax()), err_k.shape)
        raise AssertionError(f"max error {m['max_err']:.3g} > 2 x mirror's {m['mirror_max_err']:.3g}"
                             f" + floor (at {i}: got {out[i]!r}, mirror {mirror[i]!r}, "
                             f"truth {dense[i]!r})")
    if m["rel_l1"] > 1.05 * m["mirror_rel_l1"] + eps:
        raise AssertionError(f"relative L1 {m['rel_l1']:.4g} > 1.05 x mirror's {m['mirror_rel_l1']:.4g}")
    if m["rel_l1_vs_mirror"] > 0.1 * m["mirror_rel_l1"] + 2 * eps:
        raise AssertionError(f"kernel vs mirror relative L1 {m['rel_l1_vs_mirror']:.3g} > 0.1 x "
                             f"mirror's error {m['mirror_rel_l1']:.3g} + 2 ulps")
    return m


def _near(a, b, rel):
    return np.abs(a - b) <= rel * np.maximum(np.abs(a), np.abs(b)) + 1e-30


def unexplained_map_rows(gpu_map, ref_map, details, *, theta, tau=None, topk=None,
                         mass_threshold=None, rel=1e-5):
    """Rows (b, h, i) where the two maps differ for a reason other than a near-tie: a similarity
    within ``rel`` of theta, two P^ values at the cut within ``rel`` of each other, (TopCdf)
    a cumulative sum within ``rel`` of its bound, or (mass threshold) an ``nk * P^`` within
    ``rel`` of the threshold."""
    gpu_map, ref_map = np.asarray(gpu_map, bool), np.asarray(ref_map, bool)
    rows = np.argwhere((gpu_map != ref_map).any(axis=-1))
    p_hat, q_sim, k_sim = details["p_hat"], details["q_sim"], details["k_sim"]
    bad = []
    for b, h, i in rows:
        if _near(q_sim[b, h, i], theta[h], rel) or _near(k_sim[b, h], theta[h], rel).any():
            continue
        p = p_hat[b, h, i]
        order = np.argsort(-p, kind="stable")
        ps = p[order]
        if mass_threshold is not None:
            t = np.float32(mass_threshold[h])
            scaled = np.float32(p.size) * ps
            if np.isfinite(t) and _near(scaled, t, rel).any():
                continue
            cut = max(int((scaled >= t).sum()), 1)
        elif tau is not None:
            csum = np.cumsum(ps, dtype=np.float32)
            bound = np.float32(tau[h]) * csum[-1]
            if _near(csum, bound, rel).any():
                continue
            cut = max(int((csum <= bound).sum()), 1)
        else:
            n_valid = int(details["valid"][i].sum())
            cut = max(int(np.floor(np.float32(topk[h]) * np.float32(n_valid))), 1)
        if 0 < cut < ps.size and _near(ps[cut - 1], ps[cut], rel):
            continue
        bad.append((int(b), int(h), int(i)))
    return bad


def reference_map(q, k, *, layout, is_causal, scale, theta, tau=None, topk=None,
                  mass_threshold=None, sink=True, local=False):
    return R.predict_block_map(R.to_hnd(q, layout), R.to_hnd(k, layout), is_causal=is_causal,
                               scale=scale, simthreshd1=theta, cdfthreshd=tau, topk=topk,
                               mass_threshold=mass_threshold, attention_sink=sink,
                               local_window=local, return_details=True)
