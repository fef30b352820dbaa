"""Stage-1 predictors against the oracle on Gemma 3's full-attention layers, at equal L1.

Reproduces ``bench/results/predictor_study.md`` (its "Commands" section lists every run):

    OPENBLAS_NUM_THREADS=1 python scripts/predictor_study.py --tokens 4096 8192 --quant fp32 int8 \
        --cache /tmp/ps/cache --out /tmp/ps/study.json          # curves, sweeps: the main table
    python scripts/predictor_study.py --table /tmp/ps/study.json --verify "qbar-keys G=128" \
        --tokens 4096 8192 --quant fp32                          # rebuild and measure chosen maps
    python scripts/predictor_study.py --cache /tmp/ps/cache --heldout 4096 8192 16384   # lengths
    python scripts/predictor_study.py --gpu-cost                 # CuPy prototype timing (GPU)

How a predictor is measured (the idea of ``sparge_cupy.tune``'s "curves" evaluator). A predictor is
(a) a per-block score that ranks the key blocks of every query block (row) i, (b) the blocks it
always keeps (sink, local window, the paper's fix blocks) and (c) a rule with one parameter per head
that decides how many of each row's ranked blocks to keep: TopCdf (``cdf``: tau, per row) or one
threshold on the score shared by all rows of the head (``thr``). For a fixed ranking the kept set of
a row is a prefix of that ranking, and keeping a set of blocks gives
``O_t = sum_j N_tj / sum_j l_tj`` over per-block partial sums, so one pass over the data gives
``E_i(c)``, the L1 numerator of row i with its first c ranked blocks, for every c. Each rule's
parameter moves every row's prefix length at known breakpoints (the ranked scores for ``thr``,
the cumulative shares for ``cdf``); sweeping all breakpoints of a head in order gives the error and
the kept blocks at *every* parameter value, and the reported point is the sparsest one within the
bound (the same exhaustive 1-D search for every predictor and rule). Partial sums are computed like
the tuner does (``_CurveInput._partials``: the kernel's quantization for int8/fp8, none for fp32;
the output rounded to the input dtype, float16). The paper's predictor is searched over the tuner's
theta grid as well; the oracle rows use the true block mass (``cdf`` = the "mass threshold" oracle,
``lagrange`` = ``reference.oracle``'s allocation on these curves).

``--verify`` rebuilds the chosen maps with the public functions (``reference.predict_block_map``,
``reference.predictors.predict_block_map_v2``) and measures them with ``reference.exact_attention``
(fp32) or ``reference.block_sparse_attention`` (int8/fp8): the maps' block counts must match the
curves' and the errors agree to rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from sparge_cupy import CONFIG  # noqa: E402
from sparge_cupy import reference as R  # noqa: E402
from sparge_cupy.reference import predictors as P  # noqa: E402

F32 = np.float32
THETAS = (-1.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)     # sparge_cupy.tune.DEFAULT_THETAS
LAYERS = (5, 11, 17)


# ---------------------------------------------------------------------------------------------
# Predictor variants: a ranking score, the candidates, the forced blocks, the rules to sweep.

@dataclass
class Variant:
    name: str
    kind: str                      # "paper" | "oracle" | "v2"
    params: dict = field(default_factory=dict)
    rules: tuple = ("cdf", "thr")
    cost: str = ""                 # estimated prediction cost, see cost_note()


# name -> (kind, params); v2 params go to reference.predictors.block_scores (plus local_blocks)
STUDY = {
    "oracle (true mass)": ("oracle", {}),
    # idea 2: better estimates of the block mass from block statistics
    "lognormal G=128": ("v2", dict(q_group=128, k_sub=64, variance=1.0)),
    "lognormal G=16": ("v2", dict(q_group=16, k_sub=64, variance=1.0)),
    "lognormal G=16 ksub=4": ("v2", dict(q_group=16, k_sub=4, variance=1.0)),
    "lognormal G=128 ksub=16": ("v2", dict(q_group=128, k_sub=16, variance=1.0)),
    "box (Quest) G=128": ("v2", dict(q_group=128, k_sub=64, variance=0.0, box=1.0)),
    "qbar-keys G=128": ("v2", dict(q_group=128, k_sub=1, variance=0.0)),
    "qbar-keys G=32": ("v2", dict(q_group=32, k_sub=1, variance=0.0)),
    # idea 3: the local window always kept; idea 4: value-aware error estimate
    "qbar-keys G=128 local2": ("v2", dict(q_group=128, k_sub=1, variance=0.0, local_blocks=2)),
    "qbar-keys G=128 contrib": ("v2", dict(q_group=128, k_sub=1, variance=0.0, score="contribution")),
}


def variants(names=None):
    v = [Variant(f"paper theta={t:+.1f}", "paper", {"theta": t}) for t in THETAS]
    for name, (kind, params) in STUDY.items():
        v.append(Variant(name, kind, params, rules=("cdf", "thr", "lagrange") if kind == "oracle" else ("cdf", "thr")))
    if names:
        keep = [x for x in v if any(n == x.name or (n.endswith("*") and x.name.startswith(n[:-1]))
                                    for n in names)]
        for n in names:                # ad hoc: "v2:q_group=16,k_sub=8,variance=1"
            if n.startswith("v2:"):
                kv = dict(item.split("=") for item in n[3:].split(",") if item)
                keep.append(Variant(n, "v2", {a: _value(b) for a, b in kv.items()}))
        return keep
    return v


def _value(text):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def variant_arrays(var, q, k, v, *, scale, valid, mass_true):
    """``(score, candidates, base)`` float64/bool ``[H, nq, nk]`` of one variant (batch 1)."""
    H = q.shape[1]
    nq, nk = valid.shape
    if var.kind == "paper":
        _, det = R.predict_block_map(q, k, is_causal=True, scale=scale,
                                     simthreshd1=np.full(H, var.params["theta"], F32),
                                     cdfthreshd=np.ones(H, F32), attention_sink=True,
                                     return_details=True)
        p_hat, q_fix, k_fix = det["p_hat"][0], det["q_fix"][0], det["k_fix"][0]
        cand = valid & ~k_fix[:, None, :]
        base = (q_fix[..., None] | k_fix[:, None, :]) & valid
        base[..., 0] |= valid[:, 0]
        return p_hat.astype(np.float64), cand, base
    if var.kind == "oracle":
        return mass_true[0], np.broadcast_to(valid, (H, nq, nk)).copy(), np.zeros((H, nq, nk), bool)
    p = dict(var.params)
    local = p.pop("local_blocks", 0)
    s = P.block_scores(q, k, v, is_causal=True, scale=scale, **p)[0]
    base = np.broadcast_to(P.forced_blocks(q.shape[2], k.shape[2], is_causal=True,
                                           local_blocks=local, attention_sink=True), (H, nq, nk)).copy()
    return np.where(valid, s, 0.0), np.broadcast_to(valid, (H, nq, nk)).copy(), base


# ---------------------------------------------------------------------------------------------
# Curves.

class Ranking:
    """The order in which a variant adds blocks per row, and the kept count after c picks."""

    def __init__(self, score, cand, base, valid):
        H, nq, nk = score.shape
        s = np.where(cand, score, -np.inf)
        self.order = np.argsort(-s, axis=-1, kind="stable")                # candidates first
        self.sorted = np.take_along_axis(s, self.order, axis=-1)
        self.n_cand = cand.sum(-1)
        pos = np.arange(nk)[None, None, :]
        self.adds = np.take_along_axis(valid & ~base, self.order, axis=-1) & (pos < self.n_cand[..., None])
        self.base = base
        self.kept_at = base.sum(-1)[..., None] + np.concatenate(
            [np.zeros((H, nq, 1), np.int64), np.cumsum(self.adds, axis=-1)], axis=-1)
        self.E = np.zeros((H, nq, nk + 1))
        self.n_valid = valid.sum(-1)

    def breakpoints(self, rule):
        """``u [H, nq, nk]``: row i takes its (c+1)-th ranked block once the parameter reaches
        ``u[..., c]`` (c >= 1; the first is always taken). thr: u = -score; cdf: u = share."""
        if rule == "thr":
            return -self.sorted
        if rule == "thrn":             # threshold on the score relative to a uniform row
            return -self.sorted * self.n_valid[None, :, None]
        s = np.where(np.isfinite(self.sorted), self.sorted, 0.0)
        csum = np.cumsum(s, axis=-1)
        tot = csum[..., -1:]
        return np.where(tot > 0, csum / np.where(tot > 0, tot, 1.0), 1.0)


def curve_input(q, k, v, ref, *, scale, quant):
    """A ``sparge_cupy.tune._CurveInput`` holding only what its ``_partials``/``_err`` use (the
    tuner's own kernel-rounding model of the partial sums), without its per-theta precomputation."""
    from sparge_cupy import tune as T
    c = object.__new__(T._CurveInput)
    qk, pv = {"fp32": ("fp32", "fp32"), "int8": ("int8", "fp8"), "fp16": ("fp16", "fp16")}[quant]
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    c.x = T._Input(q, k, v, True, scale, ref, None)
    c.pv, c.cfg = pv, CONFIG
    c.B, c.H, c.Lq, c.Lk, c.Hkv = B, H, Lq, Lk, Hkv
    c.nq, c.nk = R.num_blocks(Lq, CONFIG.block_q), R.num_blocks(Lk, CONFIG.block_k)
    c.out_dtype = np.dtype(q.dtype)
    c.q_op, c.dq, c.k_op, c.dk, _ = R.quantized_operands(q, k, scale=scale, qk=qk, rebalance=True)
    if pv == "fp8":
        c.v_op, dv = R.quantize_v_fp8(v)
        c.v_scale = np.repeat(dv, H // Hkv, axis=1).astype(np.float64) / CONFIG.fp8_max
    else:
        c.v_op = R.round_fp16(v) if pv == "fp16" else np.asarray(v, F32)
        c.v_scale = None
    return c


def fill_curves(ci, rankings, n_valid_row, log=None):
    """One pass over the query blocks: ``E`` of every ranking (see the module docstring)."""
    H = ci.H
    hi = np.arange(H)
    t0 = time.perf_counter()
    for i in range(ci.nq):
        nb = int(n_valid_row[i])
        if nb == 0:
            continue
        N, l, _, o_ref = ci._partials(i, nb)
        N, l, o_ref = N[0].astype(np.float64), l[0].astype(np.float64), o_ref[0]   # batch 1
        for rk in rankings:
            w = rk.base[:, i, :nb].astype(np.float64)
            acc = np.einsum("hj,hjrd->hrd", w, N)
            den = np.einsum("hj,hjr->hr", w, l)[..., None]
            E = rk.E[:, i]
            E[:, 0] = ci._err(acc[None], den[None], o_ref[None])[0]
            add = rk.adds[:, i]
            last = int(np.max(np.nonzero(add.any(axis=0))[0], initial=-1)) + 1
            for c in range(last):
                j = np.minimum(rk.order[:, i, c], nb - 1)
                on = add[:, c]
                acc += np.where(on[:, None, None], N[hi, j], 0.0)
                den += np.where(on[:, None], l[hi, j], 0.0)[..., None]
                E[:, c + 1] = ci._err(acc[None], den[None], o_ref[None])[0]
            E[:, last + 1:] = E[:, last:last + 1]
        if log and (i + 1) % 16 == 0:
            log(f"    row block {i + 1}/{ci.nq} ({time.perf_counter() - t0:.0f} s)")


def sweep(E, kept_at, n_cand, u, budget):
    """The sparsest parameter of one head: ``(kept, err, u_choice)``.

    Rows' prefix lengths start at min(1, n_cand); as the parameter rises past ``u[i, c]`` row i
    takes its (c+1)-th block. All breakpoints in increasing order (a row's own are increasing),
    tie groups taken together; the first point of the sweep within ``budget`` keeps the fewest
    blocks (kept only grows along the sweep)."""
    nq, nk = u.shape
    rows = np.arange(nq)
    n0 = np.minimum(1, n_cand)
    err0, kept0 = E[rows, n0].sum(), kept_at[rows, n0].sum()
    c = np.arange(nk)[None, :]
    ii, cc = np.nonzero((c >= 1) & (c < n_cand[:, None]))
    uu = u[ii, cc]
    o = np.argsort(uu, kind="stable")
    ii, cc, uu = ii[o], cc[o], uu[o]
    err = err0 + np.cumsum(E[ii, cc + 1] - E[ii, cc])
    kept = kept0 + np.cumsum(kept_at[ii, cc + 1] - kept_at[ii, cc])
    if err0 <= budget or not uu.size:
        first = uu[0] if uu.size else 1.0
        return int(kept0), float(err0), float(first - abs(first) * 1e-6 - 1e-300)
    end = np.ones(uu.size, bool)
    end[:-1] = uu[1:] > uu[:-1]                       # last element of a tie group
    ok = np.nonzero(end & (err <= budget))[0]
    k = int(ok[0]) if ok.size else uu.size - 1
    nxt = uu[k + 1] if k + 1 < uu.size else None
    u_choice = uu[k] if nxt is None else 0.5 * (uu[k] + nxt)
    return int(kept[k]), float(err[k]), float(u_choice)


def lagrange(E, kept_at, n_cand, budget):
    from sparge_cupy.reference.oracle import _allocate_lagrange
    n = _allocate_lagrange(E, n_cand, budget)
    rows = np.arange(len(n))
    return int(kept_at[rows, n].sum()), float(E[rows, n].sum())


# ---------------------------------------------------------------------------------------------
# One layer.

def study_layer(N, layer, quants, var_list, l1, log, cache=None):
    from sparge_cupy.hf import load_gemma_capture
    d = load_gemma_capture(N, layer)
    q, k, v, scale = d["q"], d["k"], d["v"], float(d["scale"])
    H = q.shape[1]
    t0 = time.perf_counter()
    ref = R.exact_attention(q, k, v, is_causal=True, scale=scale)
    den = np.abs(ref).sum(axis=(0, 2, 3))
    valid = R.valid_blocks(q.shape[2], k.shape[2], CONFIG.block_q, CONFIG.block_k, True)
    n_valid_row = valid.sum(1)
    mass_true = R.block_attention_mass(q, k, is_causal=True, scale=scale)
    log(f"N={N} layer {layer}: reference and true mass {time.perf_counter() - t0:.0f} s")
    arrays = {}
    for var in var_list:
        arrays[var.name] = variant_arrays(var, q, k, v, scale=scale, valid=valid, mass_true=mass_true)
    out = []
    for quant in quants:
        t1 = time.perf_counter()
        ci = curve_input(q, k, v, ref, scale=scale, quant=quant)
        ranks = {name: Ranking(*a, valid) for name, a in arrays.items()}
        fill_curves(ci, list(ranks.values()), n_valid_row, log)
        log(f"  {quant}: curves of {len(ranks)} rankings {time.perf_counter() - t1:.0f} s")
        rk0 = next(iter(ranks.values()))
        floor = np.array([rk0.E[h][np.arange(len(n_valid_row)), -1].sum() for h in range(H)]) / den
        if cache:
            save_curves(cache, N, layer, quant, ranks, den)
        for var in var_list:
            rk = ranks[var.name]
            for rule in var.rules:
                heads = []
                for h in range(H):
                    budget = l1 * den[h]
                    if rule == "lagrange":
                        kept, err = lagrange(rk.E[h], rk.kept_at[h], rk.n_cand[h], budget)
                        u = None
                    else:
                        kept, err, u = sweep(rk.E[h], rk.kept_at[h], rk.n_cand[h],
                                             rk.breakpoints(rule)[h], budget)
                    heads.append({"kept": kept, "l1": err / den[h], "u": u,
                                  "sparsity": 1 - kept / int(valid.sum())})
                out.append({"tokens": N, "layer": layer, "quant": quant, "variant": var.name,
                            "kind": var.kind, "params": var.params, "rule": rule, "heads": heads,
                            "floor": floor.tolist(), "valid": int(valid.sum())})
    return out


def _cache_path(cache, N, layer, quant):
    return os.path.join(cache, f"curves_{N}_L{layer:02d}_{quant}.npz")


def save_curves(cache, N, layer, quant, ranks, den):
    """Every ranking's curves, kept counts and breakpoints, for :func:`transfer`."""
    os.makedirs(cache, exist_ok=True)
    arrs = {"den": den, "names": np.array(list(ranks))}
    for n, rk in enumerate(ranks.values()):
        arrs.update({f"{n}_E": rk.E, f"{n}_kept_at": rk.kept_at, f"{n}_n_cand": rk.n_cand,
                     f"{n}_bp_thr": rk.breakpoints("thr"), f"{n}_bp_cdf": rk.breakpoints("cdf"),
                     f"{n}_bp_thrn": rk.breakpoints("thrn")})
    path = _cache_path(cache, N, layer, quant)
    old = {}
    if os.path.isfile(path):          # keep the rankings of earlier runs that this one lacks
        with np.load(path) as z:
            names_old = list(z["names"])
            for n, name in enumerate(names_old):
                if name not in ranks:
                    old[name] = {key: z[f"{n}_{key}"] for key in ("E", "kept_at", "n_cand", "bp_thr", "bp_cdf", "bp_thrn") if f"{n}_{key}" in z.files}
    base = len(ranks)
    for m, (name, d) in enumerate(old.items()):
        arrs.update({f"{base + m}_{key}": val for key, val in d.items()})
    arrs["names"] = np.array(list(ranks) + list(old))
    np.savez(path, **arrs)


def apply_parameter(E, kept_at, n_cand, bp, u):
    """Kept blocks and error numerator of one head at parameter u (the rows' prefix lengths)."""
    nq, nk = bp.shape
    c = np.arange(nk)[None, :]
    n = np.minimum(1, n_cand) + ((c >= 1) & (c < n_cand[:, None]) & (bp <= u)).sum(-1)
    rows = np.arange(nq)
    return int(kept_at[rows, n].sum()), float(E[rows, n].sum())


def transfer(records, cache, src, dst, l1, quant="fp32"):
    """Parameters tuned at ``src`` tokens applied to the ``dst`` input of the same layer and head:
    ``{(variant, rule): {"sparsity", "max_l1", "over"}}`` (mean over layers x heads; heads over
    the bound), next to the sparsity ``dst``'s own tuning reaches."""
    recs = records + best_paper(records)
    out = {}
    for r in recs:
        if r["tokens"] != src or r["quant"] != quant or r["rule"] == "lagrange":
            continue
        path = _cache_path(cache, dst, r["layer"], quant)
        if not os.path.isfile(path):
            continue
        with np.load(path) as z:
            names = list(z["names"])
            den = z["den"]
            res = out.setdefault((r["variant"], r["rule"]), {"sparsity": [], "l1": []})
            for h, hd in enumerate(r["heads"]):
                name = r["variant"] if r["variant"] != "paper (best theta)" else f"paper theta={hd['theta']:+.1f}"
                if name not in names:
                    continue
                n = names.index(name)
                E, K, nc = z[f"{n}_E"][h], z[f"{n}_kept_at"][h], z[f"{n}_n_cand"][h]
                bp = z[f"{n}_bp_{r['rule']}"][h]
                kept, err = apply_parameter(E, K, nc, bp, hd["u"])
                res["sparsity"].append(1 - kept / _n_valid(dst))
                res["l1"].append(err / den[h])
    return {key: {"sparsity": float(np.mean(v["sparsity"])), "max_l1": float(np.max(v["l1"])),
                  "over": int(np.sum(np.array(v["l1"]) > l1)), "n": len(v["l1"])}
            for key, v in out.items() if v["l1"]}


def _steps(E, kept_at, n_cand, u):
    """The sweep of one head and input as step functions: sorted breakpoints, the error and kept
    count after each, and the values before the first."""
    nq, nk = u.shape
    rows = np.arange(nq)
    n0 = np.minimum(1, n_cand)
    c = np.arange(nk)[None, :]
    ii, cc = np.nonzero((c >= 1) & (c < n_cand[:, None]))
    o = np.argsort(u[ii, cc], kind="stable")
    ii, cc = ii[o], cc[o]
    err0, kept0 = E[rows, n0].sum(), kept_at[rows, n0].sum()
    return (u[ii, cc], err0 + np.cumsum(E[ii, cc + 1] - E[ii, cc]),
            kept0 + np.cumsum(kept_at[ii, cc + 1] - kept_at[ii, cc]), err0, kept0)


def joint_sweep(items):
    """One parameter for several inputs of one head: the smallest (sparsest) value at which every
    input meets its budget, as the tuner does over its inputs. ``items``: ``(E, kept_at, n_cand, u,
    budget)`` with the breakpoints ``u`` already in common units. Returns the chosen value (the
    midpoint to the next breakpoint) or None when no value meets every budget."""
    steps = [_steps(E, K, nc, u) + (b,) for E, K, nc, u, b in items]
    cand = np.concatenate([[-np.inf], np.unique(np.concatenate([st[0] for st in steps]))])
    ok = np.ones(cand.size, bool)
    for uu, err, kept, err0, kept0, budget in steps:
        idx = np.searchsorted(uu, cand, side="right") - 1
        ok &= np.where(idx < 0, err0, err[np.maximum(idx, 0)]) <= budget
    f = np.nonzero(ok)[0]
    if not f.size:
        return None
    f = int(f[0])
    if f == 0:
        return float(cand[1] - abs(cand[1]) * 1e-6 - 1e-300) if cand.size > 1 else 0.0
    return float(cand[f]) if f + 1 == cand.size else 0.5 * float(cand[f] + cand[f + 1])


def heldout(records, cache, train, test, l1, variants_rules, quants=("fp32", "int8")):
    """Tune one parameter per (layer, head) on the ``train`` lengths jointly (every input within
    ``l1``), run it on the ``test`` length. Threshold rules in the module's units (``nk * score``),
    TopCdf's tau as is. Returns rows of a table."""
    rows = []
    for quant in quants:
        for var, rule in variants_rules:
            sp, l1s, own = [], [], []
            for layer in LAYERS:
                paths = {N: _cache_path(cache, N, layer, quant) for N in list(train) + [test]}
                if not all(os.path.isfile(pth) for pth in paths.values()):
                    continue
                zs = {N: np.load(pth) for N, pth in paths.items()}
                if not all(var in list(z["names"]) for z in zs.values()):
                    continue
                idx = {N: list(z["names"]).index(var) for N, z in zs.items()}

                def item(N, h):
                    z, n = zs[N], idx[N]
                    nk = R.num_blocks(N, CONFIG.block_k)
                    bp = z[f"{n}_bp_{rule}"][h] * (nk if rule == "thr" else 1)
                    return (z[f"{n}_E"][h], z[f"{n}_kept_at"][h], z[f"{n}_n_cand"][h], bp,
                            l1 * z["den"][h])
                for h in range(len(zs[test]["den"])):
                    u = joint_sweep([item(N, h) for N in train])
                    E, K, nc, bp, budget = item(test, h)
                    if u is None:               # no common value: the head runs dense
                        kept, err = int(K[:, -1].sum()), float(E[:, -1].sum())
                    else:
                        kept, err = apply_parameter(E, K, nc, bp, u)
                    sp.append(1 - kept / _n_valid(test))
                    l1s.append(err / zs[test]["den"][h])
                    kept_own, _, _ = sweep(E, K, nc, bp, budget)
                    own.append(1 - kept_own / _n_valid(test))
            if sp:
                l1s = np.array(l1s)
                rows.append({"quant": quant, "variant": var, "rule": rule, "own": float(np.mean(own)),
                             "sparsity": float(np.mean(sp)), "l1_mean": float(l1s.mean()),
                             "l1_max": float(l1s.max()), "over": int((l1s > l1).sum()), "n": len(l1s)})
    return rows


def heldout_markdown(rows, train, test, l1, oracle=None):
    lines = [f"| quant | predictor | rule | tuned on {test} itself | tuned on {'+'.join(map(str, train))}, "
             f"run on {test}: sparsity | L1 mean | L1 max | heads over {l1} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quant']} | {r['variant']} | {r['rule']} | {r['own']:.3f} | {r['sparsity']:.3f} | "
                     f"{r['l1_mean']:.4f} | {r['l1_max']:.4f} | {r['over']}/{r['n']} |")
    return "\n".join(lines)


def _n_valid(N):
    return int(R.valid_blocks(N, N, CONFIG.block_q, CONFIG.block_k, True).sum())


# ---------------------------------------------------------------------------------------------
# Verification of chosen maps with the public functions.

def chosen_map(rec, q, k, v, scale):
    """The block map of a study record, rebuilt with the public functions."""
    us = np.array([hd["u"] for hd in rec["heads"]])
    p = dict(rec["params"])
    if rec["kind"] == "paper":
        if rec["rule"] != "cdf":
            raise ValueError("only the paper's own rule is rebuilt")
        tau = np.clip(us, 0.0, 1.0).astype(F32)
        theta = [hd.get("theta", p.get("theta")) for hd in rec["heads"]]
        return R.predict_block_map(q, k, is_causal=True, scale=scale, cdfthreshd=tau,
                                   simthreshd1=np.asarray(theta, F32))
    local = p.pop("local_blocks", 0)
    rule = {"thr": "threshold", "cdf": "cdf"}[rec["rule"]]
    nk = R.num_blocks(k.shape[2], CONFIG.block_k)
    thr = -us * nk if rule == "threshold" else us      # the module's threshold is on nk * score
    return P.predict_block_map_v2(q, k, v, is_causal=True, scale=scale, threshold=thr, rule=rule,
                                  local_blocks=local, **p)


def verify(records, names, log, quants=("fp32", "int8"), tokens=None):
    """Rebuild the chosen maps of the named variants and measure them exactly (in place)."""
    from sparge_cupy.hf import load_gemma_capture
    done = []
    for rec in records:
        if rec["variant"] not in names or rec["kind"] == "oracle" or (rec["kind"] == "paper" and rec["rule"] != "cdf"):
            continue
        if rec["quant"] not in quants or (tokens and rec["tokens"] not in tokens):
            continue
        d = load_gemma_capture(rec["tokens"], rec["layer"])
        q, k, v, scale = d["q"], d["k"], d["v"], float(d["scale"])
        t0 = time.perf_counter()
        bm = chosen_map(rec, q, k, v, scale)
        ref = R.exact_attention(q, k, v, is_causal=True, scale=scale)
        if rec["quant"] == "fp32":
            o = R.exact_attention(q, k, v, is_causal=True, scale=scale, block_map=bm)
        else:
            qk, pv = {"int8": ("int8", "fp8"), "fp16": ("fp16", "fp16")}[rec["quant"]]
            o = R.block_sparse_attention(q, k, v, bm, is_causal=True, scale=scale,
                                         pvthreshd=np.full(q.shape[1], np.inf, F32), qk=qk, pv=pv)
            o = o.astype(q.dtype)
        l1 = np.abs(o - ref).sum(axis=(0, 2, 3)) / np.abs(ref).sum(axis=(0, 2, 3))
        kept = bm.sum(axis=(0, 2, 3))
        for h, hd in enumerate(rec["heads"]):
            hd["verified_l1"] = float(l1[h])
            hd["verified_kept"] = int(kept[h])
        log(f"verify {rec['tokens']} L{rec['layer']} {rec['quant']} {rec['variant']} {rec['rule']}: "
            f"kept {kept.tolist()} vs {[hd['kept'] for hd in rec['heads']]}, "
            f"l1 {np.round(l1, 4).tolist()} vs {[round(hd['l1'], 4) for hd in rec['heads']]} "
            f"({time.perf_counter() - t0:.0f} s)")
        done.append(rec)
    return done


# ---------------------------------------------------------------------------------------------
# Tables.

def best_paper(records):
    """Per (tokens, layer, quant, head): the paper predictor's best theta under its own rule (cdf),
    as the tuner picks it; also the best theta with the threshold rule."""
    out = []
    keys = sorted({(r["tokens"], r["layer"], r["quant"]) for r in records})
    for key in keys:
        for rule in ("cdf", "thr"):
            recs = [r for r in records if (r["tokens"], r["layer"], r["quant"]) == key
                    and r["kind"] == "paper" and r["rule"] == rule]
            if not recs:
                continue
            H = len(recs[0]["heads"])
            heads = []
            for h in range(H):
                best = max(recs, key=lambda r: r["heads"][h]["sparsity"])
                heads.append(dict(best["heads"][h], theta=best["params"]["theta"]))
            out.append(dict(recs[0], variant="paper (best theta)", params={}, heads=heads))
    return out


def summarize(records):
    """{(variant, rule): {(tokens, quant): mean sparsity over layers x heads}} and oracle means."""
    recs = records + best_paper(records)
    table = {}
    for r in recs:
        key = (r["variant"], r["rule"])
        table.setdefault(key, {}).setdefault((r["tokens"], r["quant"]), []).extend(
            hd["sparsity"] for hd in r["heads"])
    return {key: {tq: float(np.mean(s)) for tq, s in d.items()} for key, d in table.items()}


def cost(kind, params):
    """Estimated prediction cost relative to causal dense attention of the same head (FLOPs of the
    logit products, exponentials), both in percent: the logits of ``Lq / G`` pooled queries
    against ``Lk / s`` pooled keys are ``1 / (2 G s)`` of attention's ``2 Lq Lk D`` FLOPs (causal
    halves both) per product, and ``1 / (G s)`` of its ``Lq Lk / 2`` exponentials."""
    if kind == "oracle":
        return "needs QK^T (> 100%)"
    if kind == "paper":
        G, ks, nprod = 128, 64, 1
    else:
        G, ks = params.get("q_group", 128), params.get("k_sub", 1)
        nprod = 1 + 2 * bool(params.get("variance", 0.0)) + 2 * bool(params.get("box", 0.0))
    flops = nprod / (2 * G * ks)
    exps = 1 / (G * ks)
    qd = params.get("q_detail") if kind == "v2" else None
    if qd:
        flops += 1 / (2 * qd * CONFIG.block_k)
        exps += 1 / (qd * CONFIG.block_k)
    return f"{100 * flops:.2g}% / {100 * exps:.2g}%"


def markdown(records):
    means = summarize(records)
    tqs = sorted({(r["tokens"], r["quant"]) for r in records}, key=lambda x: (x[1] != "fp32", x))
    ora = means.get(("oracle (true mass)", "lagrange"), {})
    lines = ["| predictor | rule | " + " | ".join(f"{t} {qq}" for t, qq in tqs) + " | cost: FLOPs / exp |",
             "|---|---|" + "---|" * len(tqs) + "---|"]
    info = {r["variant"]: (r["kind"], r["params"]) for r in records}
    info["paper (best theta)"] = ("paper", {})
    order = sorted(means, key=lambda kr: (not kr[0].startswith("oracle"), not kr[0].startswith("paper (best"),
                                          not kr[0].startswith("paper"), kr))
    for key in order:
        cells = []
        for tq in tqs:
            m = means[key].get(tq)
            o = ora.get((tq[0], "fp32"))
            cells.append("-" if m is None else (f"{m:.3f}" + (f" ({100 * m / o:.0f}%)" if o else "")))
        c = cost(*info[key[0]]) if key[0] in info else "-"
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {c} |")
    return "\n".join(lines)


def per_head_markdown(records, variant_rules):
    """Per (tokens, layer, head) sparsity of chosen variants, and the quantization floor."""
    recs = records + best_paper(records)
    cols = [(v, r) for v, r in variant_rules]
    keys = sorted({(r["tokens"], r["quant"], r["layer"]) for r in recs}, key=lambda x: (x[1] != "fp32", x))
    lines = ["| tokens | quant | layer | head | floor L1 | " + " | ".join(f"{v} {r}" for v, r in cols) + " |",
             "|---|---|---|---|---|" + "---|" * len(cols)]
    for (N, qq, layer) in keys:
        sel = {(r["variant"], r["rule"]): r for r in recs
               if (r["tokens"], r["quant"], r["layer"]) == (N, qq, layer)}
        any_r = next(iter(sel.values()))
        for h in range(len(any_r["heads"])):
            cells = []
            for c in cols:
                r = sel.get(c)
                cells.append("-" if r is None else f"{r['heads'][h]['sparsity']:.3f}")
            lines.append(f"| {N} | {qq} | {layer:02d} | {h} | {any_r['floor'][h]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Cost on a GPU: an unfused CuPy prototype of the recommended predictor against the kernels.

_MASS_KERNEL = r"""
#include <cuda_fp16.h>
#define NEG_INF (-__int_as_float(0x7f800000))
extern "C" __global__ void qbar_keys_mass(const __half* __restrict__ a, float* __restrict__ mass,
                                          int L, int nq, int nk, float scale_log2, int causal) {
    // one thread block per (b, h, query block i); a: [B*Hq*nq, L] logits qbar_i . k_u (fp16)
    const int BQ = 128, BK = 64;
    extern __shared__ float sums[];                 // [nk] block sums, then [32] reduction scratch
    float* red = sums + nk;
    const long row = blockIdx.x;
    const int i = (int)(row % nq);
    const __half* ar = a + row * (long)L;
    const int n_keys = causal ? min(L, (i + 1) * BQ) : L;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarp = blockDim.x >> 5;
    // the share of the block's rows that see key u (causal diagonal): log2(((i+1) BQ - u) / BQ)
    float m = NEG_INF;
    for (int u = threadIdx.x; u < n_keys; u += blockDim.x) {
        float x = __half2float(ar[u]) * scale_log2;
        if (causal && u >= i * BQ) x += __log2f((float)((i + 1) * BQ - u) / BQ);
        m = fmaxf(m, x);
    }
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        float w = threadIdx.x < nwarp ? red[threadIdx.x] : NEG_INF;
        for (int o = 16; o; o >>= 1) w = fmaxf(w, __shfl_xor_sync(0xffffffff, w, o));
        if (threadIdx.x == 0) red[0] = w;
    }
    __syncthreads();
    m = red[0];
    const int nkv = (n_keys + BK - 1) / BK;
    for (int j = warp; j < nk; j += nwarp) {       // one warp per key block: 2 keys a lane
        float acc = 0.f;
        if (j < nkv) {
            for (int u = j * BK + lane; u < min(n_keys, (j + 1) * BK); u += 32) {
                float x = __half2float(ar[u]) * scale_log2;
                if (causal && u >= i * BQ) x += __log2f((float)((i + 1) * BQ - u) / BQ);
                acc += exp2f(x - m);
            }
        }
        for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
        if (lane == 0) sums[j] = acc;
    }
    __syncthreads();
    float tot = 0.f;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) tot += sums[j];
    for (int o = 16; o; o >>= 1) tot += __shfl_xor_sync(0xffffffff, tot, o);
    __syncthreads();
    if (lane == 0) red[warp] = tot;
    __syncthreads();
    if (threadIdx.x == 0) { float t = 0.f; for (int w = 0; w < nwarp; ++w) t += red[w]; red[0] = t; }
    __syncthreads();
    tot = red[0];
    for (int j = threadIdx.x; j < nk; j += blockDim.x) mass[row * nk + j] = sums[j] / tot;
}
"""


def gpu_predict_qbar_keys(q, k, *, scale, threshold, is_causal=True):
    """CuPy prototype of ``predict_block_map_v2`` with its defaults (q_group=128, k_sub=1,
    variance=0, rule threshold, sink): pooled Q, smoothed K, one cuBLAS product ``qbar K^T``
    (fp16 in, fp32 accumulation), one kernel for the causal share, softmax and block sums, then the
    threshold. Lengths multiple of 128; returns ``(block_map, mass)``."""
    import cupy as cp
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    g, nq, nk = Hq // Hkv, L // 128, L // 64
    qbar = q.reshape(B, Hq, nq, 128, D).mean(axis=3, dtype=cp.float32).astype(cp.float16)
    ks = (k - k.mean(axis=2, keepdims=True, dtype=cp.float32)).astype(cp.float16)
    a = cp.matmul(qbar.reshape(B, Hkv, g * nq, D), ks.swapaxes(-1, -2))   # [B, Hkv, g nq, L]
    mass = cp.empty((B, Hq, nq, nk), cp.float32)
    from sparge_cupy import _compile
    kern = getattr(gpu_predict_qbar_keys, "_k", None) or cp.RawKernel(
        _MASS_KERNEL, "qbar_keys_mass", options=_compile.base_options())
    gpu_predict_qbar_keys._k = kern
    kern((B * Hq * nq,), (256,), (a, mass, np.int32(L), np.int32(nq), np.int32(nk),
                                  np.float32(scale / np.log(2.0)), np.int32(is_causal)),
         shared_mem=(nk + 32) * 4)
    keep = mass >= cp.asarray(threshold, cp.float32)[None, :, None, None]
    top = mass.argmax(axis=-1)
    keep |= cp.arange(nk)[None, None, None, :] == top[..., None]
    keep[..., 0] = True
    if is_causal:
        keep &= cp.asarray(R.valid_blocks(L, L, 128, 64, True))[None, None]
    return keep, mass


def _time_ms(fn, reps=10, warm=3):
    import cupy as cp
    for _ in range(warm):
        fn()
    cp.cuda.Device().synchronize()
    ts = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(ts))


def gpu_cost(shapes, log):
    """Markdown table: the prototype's time against the attention kernel and the paper's predictor."""
    import cupy as cp
    import sparge_cupy as S
    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    lines = [f"device: {dev}", "",
             "| B | Hq | Hkv | L | D | attention int8/fp8, all blocks (ms) | torch SDPA flash (ms) | "
             "paper predict_block_map (ms) | qbar-keys prototype (ms) | of which qbar K^T (ms) | "
             "prototype / attention | prototype / SDPA | check vs NumPy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for (B, Hq, Hkv, L, D) in shapes:
        scale = D ** -0.5
        qh = rng.standard_normal((B, Hq, L, D), dtype=np.float32).astype(np.float16)
        kh = rng.standard_normal((B, Hkv, L, D), dtype=np.float32).astype(np.float16)
        q, k = cp.asarray(qh), cp.asarray(kh)
        v = cp.asarray(rng.standard_normal((B, Hkv, L, D), dtype=np.float32).astype(np.float16))
        full = cp.ones((B, Hq, L // 128, L // 64), bool)
        thr = np.full(Hq, 1e-3, np.float32)
        t_attn = _time_ms(lambda: S.block_sparse_attn(q, k, v, full, is_causal=True))
        t_pred = _time_ms(lambda: S.predict_block_map(q, k, is_causal=True, simthreshd1=-1.0,
                                                      cdfthreshd=0.95))
        t_proto = _time_ms(lambda: gpu_predict_qbar_keys(q, k, scale=scale, threshold=thr))
        qbar = q.reshape(B, Hq, L // 128, 128, D).mean(axis=3, dtype=cp.float32).astype(cp.float16)
        kT = k.swapaxes(-1, -2).copy()
        t_gemm = _time_ms(lambda: cp.matmul(qbar.reshape(B, Hkv, -1, D), kT))
        try:
            import torch
            import torch.nn.functional as Fn
            tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
            tk, tv = (x.repeat_interleave(Hq // Hkv, dim=1).contiguous() for x in (tk, tv))
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                t_sdpa = _time_ms(lambda: Fn.scaled_dot_product_attention(tq, tk, tv, is_causal=True))
        except Exception as e:       # no torch, or no flash kernel for this shape
            log(f"sdpa: {e}")
            t_sdpa = float("nan")
        check = "-"
        if B * Hq * L <= 4 * 8192:   # the prototype's masses against the NumPy estimate
            _, mass = gpu_predict_qbar_keys(q, k, scale=scale, threshold=thr)
            ref = P.estimate_block_mass(qh, kh, is_causal=True, scale=scale)
            check = f"max abs {float(np.abs(cp.asnumpy(mass) - ref).max()):.1e}"
        lines.append(f"| {B} | {Hq} | {Hkv} | {L} | {D} | {t_attn:.3f} | {t_sdpa:.3f} | {t_pred:.3f} | "
                     f"{t_proto:.3f} | {t_gemm:.3f} | {100 * t_proto / t_attn:.1f}% | "
                     f"{100 * t_proto / t_sdpa:.1f}% | {check} |")
        log(lines[-1])
        q = k = v = full = qbar = kT = None     # free before the next shape
        cp.get_default_memory_pool().free_all_blocks()
    return "\n".join(lines)



def transfer_markdown(records, cache, src, dst, l1):
    lines = [f"| predictor | rule | quant | own tuning at {dst} | tuned at {src}, run at {dst}: sparsity | max L1 | heads over {l1} |",
             "|---|---|---|---|---|---|---|"]
    means = summarize(records)
    for quant in sorted({r["quant"] for r in records}, key=lambda x: x != "fp32"):
        res = transfer(records, cache, src, dst, l1, quant)
        for key in sorted(res, key=lambda kr: (not kr[0].startswith("paper (best"), kr)):
            r = res[key]
            own = means.get(key, {}).get((dst, quant))
            lines.append(f"| {key[0]} | {key[1]} | {quant} | {'-' if own is None else f'{own:.3f}'} | "
                         f"{r['sparsity']:.3f} | {r['max_l1']:.4f} | {r['over']}/{r['n']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    p.add_argument("--quant", nargs="+", default=["fp32"], choices=["fp32", "int8", "fp16"])
    p.add_argument("--variants", nargs="*", default=None, help="names (a trailing * matches a prefix)")
    p.add_argument("--l1", type=float, default=0.05)
    p.add_argument("--extra-rules", nargs="*", default=[], choices=["thrn"],
                   help="also sweep these rules (thrn: threshold on score x valid blocks of the row)")
    p.add_argument("--out", default=None, help="JSON file (records are appended to an existing one)")
    p.add_argument("--verify", nargs="*", default=None, help="variant names whose chosen maps to verify")
    p.add_argument("--table", default=None, help="print the tables of a JSON file and exit")
    p.add_argument("--cache", default=None, help="folder for the curves (needed by --transfer)")
    p.add_argument("--transfer", nargs=2, type=int, default=None, metavar=("SRC", "DST"),
                   help="with --table and --cache: parameters tuned at SRC tokens applied at DST")
    p.add_argument("--heldout", nargs="+", type=int, default=None, metavar="N",
                   help="with --cache: tune on all but the last length jointly, run on the last")
    p.add_argument("--gpu-cost", action="store_true",
                   help="time the CuPy prototype against the kernels (needs a CUDA GPU) and exit")
    args = p.parse_args(argv)

    def log(s):
        print(s, file=sys.stderr, flush=True)

    if args.gpu_cost:
        text = gpu_cost([(1, 4, 1, 8192, 256), (1, 4, 1, 16384, 256), (1, 4, 1, 32768, 256),
                         (4, 32, 8, 16384, 128)], log)
        print(text)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "predictor_gpu_cost.md"), "w") as f:
                f.write(text + "\n")
        return 0
    if args.heldout:
        train, test = args.heldout[:-1], args.heldout[-1]
        vr = [("paper theta=-1.0", "cdf"), ("paper theta=-1.0", "thr"), ("oracle (true mass)", "cdf"),
              ("oracle (true mass)", "thr"), ("qbar-keys G=128", "cdf"), ("qbar-keys G=128", "thr"),
              ("qbar-keys G=128 local2", "thr")]
        print(heldout_markdown(heldout(None, args.cache, train, test, args.l1, vr), train, test, args.l1))
        return 0
    if args.table:
        doc = json.loads(open(args.table).read())
        records = doc["records"]
        if args.verify is not None:
            extra = [r for r in best_paper(records) if r["variant"] in args.verify]
            verify(records + extra, set(args.verify), log, quants=args.quant, tokens=args.tokens)
            doc.setdefault("verified", [])
            keyf = lambda r: (r["tokens"], r["layer"], r["quant"], r["variant"], r["rule"])  # noqa: E731
            have = {keyf(r) for r in extra if "verified_l1" in r["heads"][0]}
            doc["verified"] = [r for r in doc["verified"] if keyf(r) not in have] + [
                r for r in extra if "verified_l1" in r["heads"][0]]
            with open(args.table, "w") as f:
                json.dump(doc, f)
        print(markdown(records))
        if args.transfer:
            print()
            print(transfer_markdown(records, args.cache, *args.transfer, args.l1))
        return 0
    var_list = variants(args.variants)
    for var in var_list:
        var.rules = tuple(var.rules) + tuple(r for r in args.extra_rules if r not in var.rules)
    records = []
    t0 = time.perf_counter()
    for N in args.tokens:
        for layer in args.layers:
            records += study_layer(N, layer, args.quant, var_list, args.l1, log, cache=args.cache)
    if args.verify is not None:
        verify(records, set(args.verify), log)
    meta = {"date": time.strftime("%Y-%m-%d"), "l1": args.l1, "seconds": round(time.perf_counter() - t0, 1),
            "argv": sys.argv[1:], "config": [CONFIG.block_q, CONFIG.block_k]}
    if args.out:
        old = json.loads(open(args.out).read())["records"] if os.path.isfile(args.out) else []
        keyf = lambda r: (r["tokens"], r["layer"], r["quant"], r["variant"], r["rule"])  # noqa: E731
        new_keys = {keyf(r) for r in records}
        merged = [r for r in old if keyf(r) not in new_keys] + records
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "records": merged}, f, indent=None)
        records = merged
    print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
