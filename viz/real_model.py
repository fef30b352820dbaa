"""SpargeAttn on a real model (Gemma 3 270M on real text): the four figures of ``sparge-cupy eval``.

Each is drawn from the CSV that ``sparge-cupy eval`` writes (``sparge_cupy.evaluate``), the maps
also from the cached Q/K captures (``scripts/extract_gemma_qkv.py``):

- ``<name>_maps.png`` (:func:`plot_maps`): per layer and head, at the largest token count whose
  captures are cached, the true block attention mass with the predicted map on it: blocks Stage 1
  keeps in a blue-to-yellow scale of their mass, blocks it drops in white-to-red (a red block is
  attention the prediction missed), causally masked blocks grey, fix blocks (Q or K block not
  self-similar) marked by red triangles along the edges. The thresholds are the tuned ones of
  that token count (else of the largest tuned one).
- ``<name>_sweep.png`` (:func:`plot_sweep`): per head, Stage-1 sparsity against relative L1 as tau
  sweeps (theta = -1), with the user's INT8/FP8 quantization and without rounding; the oracle's
  frontier and its point at the tuning bound; the tuned point and the presets; the quantization
  floor and the bound as vertical lines.
- ``<name>_length.png`` (:func:`plot_length`): per layer, sparsity against sequence length (4K, 8K,
  16K): oracle, tuned Stage 1 and tuned total, means over heads and each head thin.
- ``<name>_stages.png`` (:func:`plot_stages`): per head, what Stage 1 and Stage 2 each skip after
  tuning, against the oracle; below, the error each adds on top of quantization.

Run ``python viz/real_model.py --csv bench/results/gemma3_eval_pydoc.csv [--out-dir DIR]``: draws
the four from that CSV (the maps need the cached captures) and prints the PNG paths.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout: make sparge_cupy importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from sparge_cupy import evaluate as ev  # noqa: E402
from sparge_cupy import reference as R  # noqa: E402
from sparge_cupy.config import CONFIG  # noqa: E402
from sparge_cupy.viz.block_maps import FIX_MARK, _mark_fix_blocks, _style_axes  # noqa: E402

INVALID_GREY = 0.85
MASS_DECADES = 5                 # colour scales span the largest mass down 10^-5
MASS_LEVELS = 2 * MASS_DECADES   # two colours a decade: readable, and the PNG stays small
KEPT_CMAP, DROPPED_CMAP = "viridis", "Reds"
COLOURS = {"oracle": "black", "tuned": "#1f77b4", "total": "#d62728", "quant": "#1f77b4",
           "fp32": "#9ecae1", "preset": "0.45", "floor": "#ff7f0e"}
DPI = 90
MAPS_DPI = 80          # the 16K maps hold ~100K distinct cells: keeps the PNG under 300 KB


def _heads(rows):
    return [r for r in rows if isinstance(r["head"], int)]


def _layers(rows, n=None):
    return sorted({r["layer"] for r in _heads(rows) if isinstance(r["layer"], int)
                   and (n is None or r["tokens"] == n) and r["group"] != "perplexity"})


def _pick(rows, **match):
    return [r for r in _heads(rows) if all(r[k] == v for k, v in match.items())]


def _one(rows, col, **match):
    sel = _pick(rows, **match)
    return sel[0][col] if sel else math.nan


def _save(fig, path, dpi=DPI):
    from sparge_cupy.viz import save_figure
    return save_figure(fig, path, dpi=dpi)


# --------------------------------------------------------------------------------------------
# (a) predicted against true block maps


def map_inputs(rows, tokens=None):
    """What :func:`plot_maps` draws, per layer: the predicted map with its details, the true mass,
    the thresholds and where they come from. ``tokens``: the token count (default: the largest
    one of the CSV whose captures load)."""
    counts = sorted({r["tokens"] for r in rows}, reverse=True) if tokens is None else [tokens]
    for n in counts:
        layers = _layers(rows)
        try:
            data = {layer: ev.load_capture(n, layer) for layer in layers}
            break
        except FileNotFoundError:
            continue
    else:
        raise FileNotFoundError(f"tokens: no cached capture of {counts} tokens for the maps; make it "
                                "with HF_HUB_OFFLINE=1 python scripts/extract_gemma_qkv.py --tokens N")
    tuned_at = sorted({r["tokens"] for r in _pick(rows, group="tuned")})
    source = n if n in tuned_at else max([t for t in tuned_at if t < n] or tuned_at or [None])
    out = {"tokens": n, "threshold_tokens": source, "layers": {}}
    for layer, d in data.items():
        q, k = d["q"], d["k"]
        H = q.shape[1]
        if source is None:       # no tuning in the CSV: the defaults
            theta = np.full(H, CONFIG.simthreshd1, np.float32)
            tau = np.full(H, CONFIG.cdfthreshd, np.float32)
        else:
            theta = np.array([_one(rows, "theta", tokens=source, layer=layer, group="tuned",
                                   setting="stage 1", head=h) for h in range(H)], np.float32)
            tau = np.array([_one(rows, "tau", tokens=source, layer=layer, group="tuned",
                                 setting="stage 1", head=h) for h in range(H)], np.float32)
        bm, det = R.predict_block_map(q, k, is_causal=True, scale=d["scale"], simthreshd1=theta,
                                      cdfthreshd=tau, return_details=True)
        mass = ev.block_mass(q, k, is_causal=True, scale=d["scale"])
        _, det_default = R.predict_block_map(q, k, is_causal=True, scale=d["scale"],
                                             simthreshd1=np.full(H, CONFIG.simthreshd1, np.float32),
                                             cdfthreshd=np.ones(H, np.float32), return_details=True)
        out["layers"][layer] = {"block_map": bm[0], "q_fix": det["q_fix"][0], "k_fix": det["k_fix"][0],
                                "valid": det["valid"], "mass": mass[0], "theta": theta, "tau": tau,
                                "default_q_fix": det_default["q_fix"][0].mean(axis=-1),
                                "default_k_fix": float(det_default["k_fix"][0].mean())}
    return out


def _cmap(name):
    return colormaps[name].resampled(MASS_LEVELS)


def _overlay(mass, keep, valid, norm):
    """RGBA image: kept blocks coloured by mass on KEPT_CMAP, dropped ones on DROPPED_CMAP."""
    m = np.clip(norm(np.where(mass > 0, mass, norm.vmin)), 0.0, 1.0)
    img = np.where(keep[..., None], _cmap(KEPT_CMAP)(m), _cmap(DROPPED_CMAP)(m))
    img[~valid] = (INVALID_GREY, INVALID_GREY, INVALID_GREY, 1.0)
    return img


def plot_maps(rows, path, *, tokens=None, heads=None):
    """The predicted map on the true block attention mass, one panel per (layer, head)."""
    src = map_inputs(rows, tokens)
    n = src["tokens"]
    layers = list(src["layers"])
    H = next(iter(src["layers"].values()))["mass"].shape[0]
    heads = list(range(H)) if heads is None else list(heads)
    nq, nk = next(iter(src["layers"].values()))["mass"].shape[1:]
    aspect = CONFIG.block_q / CONFIG.block_k
    panel_w = 3.0
    panel_h = panel_w * nq * aspect / nk
    fig = Figure(figsize=(panel_w * len(heads) + 1.6, (panel_h + 0.45) * len(layers) + 1.0),
                 layout="constrained")
    axes = fig.subplots(len(layers), len(heads), squeeze=False)
    vmax = max(float(d["mass"][:, d["valid"]].max()) for d in src["layers"].values())
    norm = LogNorm(vmin=vmax * 10.0 ** -MASS_DECADES, vmax=vmax)
    q_notes, k_notes = [], []
    for a, layer in enumerate(layers):
        d = src["layers"][layer]
        for b, h in enumerate(heads):
            ax = axes[a, b]
            keep = d["block_map"][h] & d["valid"]
            ax.imshow(_overlay(d["mass"][h], keep, d["valid"], norm), aspect=aspect,
                      interpolation="nearest")
            _mark_fix_blocks(ax, d["q_fix"][h], d["k_fix"][h], 4.0)
            sp = 1.0 - keep.sum() / d["valid"].sum()
            recall = (d["mass"][h] * keep).sum() / d["mass"][h].sum()
            oracle = _one(rows, "stage1_sparsity", tokens=n, layer=layer, group="oracle", head=h)
            ax.set_title(f"layer {layer} head {h}: sparsity {sp:.0%}"
                         + (f" (oracle {oracle:.0%})" if math.isfinite(oracle) else "")
                         + f"\nrecall {recall:.1%}, "
                         + (f"tau {d['tau'][h]:.4f}" if d["tau"][h] < 1 else "tuned dense")
                         + ("" if d["theta"][h] == -1 else f", theta {d['theta'][h]:g}"), fontsize=8.5,
                         pad=12 if d["k_fix"][h].any() else 4)
            _style_axes(ax, nq, nk, xlabel=a == len(layers) - 1, ylabel=b == 0)
        q_notes.append(f"L{layer} " + "/".join(f"{x:.0%}".rstrip("%") for x in d["default_q_fix"][heads]) + "%")
        k_notes.append(f"L{layer} {d['default_k_fix']:.0%}")
    where = (f"thresholds tuned at {ev.token_label(src['threshold_tokens'])} tokens"
             if src["threshold_tokens"] not in (None, n) else
             "tuned thresholds" if src["threshold_tokens"] == n else "default thresholds")
    fig.suptitle(f"Gemma 3 270M, {ev.token_label(n)} tokens of real text: Stage 1's predicted block map "
                 f"on the true block attention mass ({where}, blocks {CONFIG.block_q}x{CONFIG.block_k})\n"
                 f"not self-similar at the default theta {CONFIG.simthreshd1} (kept whole there): K blocks "
                 + ", ".join(k_notes) + "; Q blocks per head " + ", ".join(q_notes), fontsize=10)
    from matplotlib.cm import ScalarMappable
    for cmap, label in ((KEPT_CMAP, "kept block: true mass"), (DROPPED_CMAP, "dropped block: true mass (missed)")):
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=_cmap(cmap)), ax=axes[:, -1], shrink=0.45, pad=0.01,
                          aspect=25)
        cb.set_label(label, fontsize=8)
        cb.ax.tick_params(labelsize=7)
    fig.legend(handles=[Patch(facecolor=str(INVALID_GREY), label="causally masked"),
                        Line2D([], [], marker="<", color=FIX_MARK, linestyle="none",
                               label="fix block row (Q) / column (K) at these thresholds")],
               loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return _save(fig, path, dpi=MAPS_DPI)


# --------------------------------------------------------------------------------------------
# (b) sparsity against error as thresholds sweep


def plot_sweep(rows, path, *, tokens=None):
    """Per head: Stage-1 sparsity against relative L1 (see the module docstring)."""
    have = sorted({r["tokens"] for r in _pick(rows, group="sweep")})
    if not have:
        raise ValueError("rows: no sweep rows (run sparge-cupy eval with the sweep step)")
    n = max(have) if tokens is None else tokens
    layers = _layers(rows, n)
    heads = sorted({r["head"] for r in _pick(rows, tokens=n, group="sweep")})
    fig = Figure(figsize=(3.1 * len(heads) + 0.4, 2.55 * len(layers) + 1.3), layout="constrained")
    axes = fig.subplots(len(layers), len(heads), squeeze=False, sharex=True, sharey=True)
    bound = next((r["bound"] for r in _pick(rows, tokens=n, group="oracle")), math.nan)
    for a, layer in enumerate(layers):
        for b, h in enumerate(heads):
            ax = axes[a, b]
            key = dict(tokens=n, layer=layer, head=h)
            sw = sorted(_pick(rows, group="sweep", **key), key=lambda r: r["tau"])
            ax.plot([r["rel_l1"] for r in sw], [r["stage1_sparsity"] for r in sw], "-", color=COLOURS["quant"],
                    lw=1.4, marker=".", ms=3)
            ax.plot([r["rel_l1_sparsity_only"] for r in sw], [r["stage1_sparsity"] for r in sw], "--",
                    color=COLOURS["fp32"], lw=1.2)
            fr = sorted(_pick(rows, group="oracle_frontier", **key) + _pick(rows, group="oracle", **key),
                        key=lambda r: r["bound"])
            ax.plot([r["rel_l1_sparsity_only"] for r in fr], [r["stage1_sparsity"] for r in fr], "-",
                    color=COLOURS["oracle"], lw=1.0, marker="o", ms=2.5)
            o = _pick(rows, group="oracle", **key)
            if o:
                ax.plot(o[0]["rel_l1_sparsity_only"], o[0]["stage1_sparsity"], "*", color=COLOURS["oracle"], ms=10)
            for r in _pick(rows, group="preset", **key):
                ax.plot(r["rel_l1"], r["stage1_sparsity"], "s", mfc="none", mec=COLOURS["preset"], ms=5)
            t1 = _pick(rows, group="tuned", setting="stage 1", **key)
            if t1:
                ax.plot(t1[0]["rel_l1"], t1[0]["stage1_sparsity"], "D", color=COLOURS["tuned"], ms=6,
                        mec="white", zorder=5)
            t2 = _pick(rows, group="tuned", setting="stage 1+2", **key)
            if t2:
                ax.plot(t2[0]["rel_l1"], t2[0]["total_sparsity"], "^", color=COLOURS["total"], ms=6,
                        mec="white", zorder=5)
            floor = _one(rows, "rel_l1", group="floor", setting="int8+rebalance/fp8", **key)
            if math.isfinite(floor):
                ax.axvline(floor, color=COLOURS["floor"], lw=1.0, ls=":")
            if math.isfinite(bound):
                ax.axvline(bound, color="0.3", lw=0.8, ls="-.")
            ax.set_xscale("log")
            ax.set_xlim(5e-3, 0.6)
            ax.set_ylim(-0.02, 1.0)
            ax.grid(True, which="major", color="0.9", lw=0.6)
            ax.tick_params(labelsize=7.5)
            ax.set_title(f"layer {layer} head {h}", fontsize=9)
            if b == 0:
                ax.set_ylabel("sparsity", fontsize=8.5)
            if a == len(layers) - 1:
                ax.set_xlabel("relative L1 vs float64 dense", fontsize=8.5)
    handles = [
        Line2D([], [], color=COLOURS["quant"], marker=".", label="tau sweep, theta = -1, INT8+rebalance / FP8"),
        Line2D([], [], color=COLOURS["fp32"], ls="--", label="same maps, no rounding (sparsity error alone)"),
        Line2D([], [], color=COLOURS["oracle"], marker="o", ms=3, label="oracle (float64) at other bounds"),
        Line2D([], [], color=COLOURS["oracle"], marker="*", ls="none", ms=10, label=f"oracle at L1 <= {bound:g}"),
        Line2D([], [], color=COLOURS["tuned"], marker="D", ls="none", label="tuned, Stage 1"),
        Line2D([], [], color=COLOURS["total"], marker="^", ls="none", label="tuned, Stage 1+2 (total sparsity)"),
        Line2D([], [], color=COLOURS["preset"], marker="s", mfc="none", ls="none",
               label=f"presets (default theta {CONFIG.simthreshd1} tau {CONFIG.cdfthreshd}; theta -1 tau .9/.95/.98)"),
        Line2D([], [], color=COLOURS["floor"], ls=":", label="quantization floor (all blocks kept)"),
        Line2D([], [], color="0.3", ls="-.", label="tuning bound"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Gemma 3 270M, {ev.token_label(n)} tokens of real text: Stage-1 sparsity against error "
                 "as the thresholds sweep, per head", fontsize=10.5)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# (c) sparsity against sequence length


def plot_length(rows, path):
    """Per layer: sparsity against the token count (oracle, tuned Stage 1, tuned total)."""
    layers = _layers(rows)
    fig = Figure(figsize=(3.6 * len(layers) + 0.4, 3.9), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False, sharey=True)[0]
    series = (("oracle", "oracle", None, "stage1_sparsity", "-"),
              ("tuned", "tuned", "stage 1", "stage1_sparsity", "-"),
              ("total", "tuned", "stage 1+2", "total_sparsity", "--"))
    all_n = sorted({r["tokens"] for r in _heads(rows) if r["group"] in ("oracle", "tuned")})
    for ax, layer in zip(axes, layers):
        heads = sorted({r["head"] for r in _pick(rows, layer=layer, group="oracle")}
                       | {r["head"] for r in _pick(rows, layer=layer, group="tuned")})
        for colour_key, group, setting, col, ls in series:
            match = dict(layer=layer, group=group, **({} if setting is None else {"setting": setting}))
            ns = [n for n in all_n if _pick(rows, tokens=n, **match)]
            if not ns:
                continue
            for h in heads:
                ax.plot(ns, [_one(rows, col, tokens=n, head=h, **match) for n in ns], ls,
                        color=COLOURS[colour_key], lw=0.6, alpha=0.35)
            means = [np.mean([r[col] for r in _pick(rows, tokens=n, **match)]) for n in ns]
            ax.plot(ns, means, ls, color=COLOURS[colour_key], lw=2.2, marker="o", ms=5)
            for x, y in zip(ns, means):
                ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7.5,
                            color=COLOURS[colour_key],
                            bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_n, [ev.token_label(n) for n in all_n])
        ax.minorticks_off()
        ax.set_xlim(min(all_n) / 1.25, max(all_n) * 1.25)
        ax.set_ylim(0, 1)
        ax.grid(True, color="0.9", lw=0.6)
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("tokens", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("sparsity (mean over heads; thin: each head)", fontsize=9)
    bound = next((r["bound"] for r in _pick(rows, group="oracle")), math.nan)
    handles = [Line2D([], [], color=COLOURS["oracle"], lw=2, marker="o", label=f"oracle, L1 <= {bound:g}"),
               Line2D([], [], color=COLOURS["tuned"], lw=2, marker="o", label="tuned Stage 1 (INT8/FP8)"),
               Line2D([], [], color=COLOURS["total"], lw=2, ls="--", marker="o",
                      label="tuned total, Stage 1+2")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle("Gemma 3 270M on real text: sparsity against sequence length", fontsize=10.5)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# (d) Stage 1 against Stage 2


def plot_stages(rows, path):
    """Per head and token count: Stage-1 and Stage-2 contributions to the total sparsity after
    tuning, the oracle's Stage-1 sparsity as a tick; below, the errors (floor, Stage 1, Stage 1+2)."""
    t2 = _pick(rows, group="tuned", setting="stage 1+2")
    if not t2:
        raise ValueError("rows: no tuned rows (run sparge-cupy eval with the tuned step)")
    counts = sorted({r["tokens"] for r in t2})
    keys = sorted({(r["layer"], r["head"]) for r in t2})
    fig = Figure(figsize=(max(7.0, 0.55 * len(keys) * len(counts) ** 0.5 + 2), 6.4), layout="constrained")
    ax, ax_err = fig.subplots(2, 1, sharex=True, height_ratios=[1.5, 1])
    width = 0.8 / len(counts)
    shades = np.linspace(1.0, 0.55, len(counts))
    for c, n in enumerate(counts):
        xs = np.arange(len(keys)) + (c - (len(counts) - 1) / 2) * width
        get = lambda col, **m: np.array([_one(rows, col, tokens=n, layer=L, head=h, **m) for L, h in keys])
        s1 = get("stage1_sparsity", group="tuned", setting="stage 1+2")
        tot = get("total_sparsity", group="tuned", setting="stage 1+2")
        orc = get("stage1_sparsity", group="oracle")
        blue, red = np.array([0.12, 0.47, 0.71]) * shades[c], np.array([0.84, 0.15, 0.16]) * shades[c]
        ax.bar(xs, s1, width * 0.92, color=blue, label=f"{ev.token_label(n)}: Stage 1")
        ax.bar(xs, tot - s1, width * 0.92, bottom=s1, color=red, label=f"{ev.token_label(n)}: + Stage 2")
        ax.plot(xs, orc, "_", color="black", ms=width * 34, mew=2.0,
                label="oracle Stage 1 (float64)" if c == 0 else None)
        floor = get("rel_l1", group="floor", setting="int8+rebalance/fp8")
        e1 = get("rel_l1", group="tuned", setting="stage 1")
        e2 = get("rel_l1", group="tuned", setting="stage 1+2")
        ax_err.bar(xs, floor, width * 0.92, color=np.array([1.0, 0.5, 0.05]) * shades[c],
                   label=f"{ev.token_label(n)}: quantization floor")
        ax_err.plot(xs, e1, "D", color=blue, ms=4, label=f"{ev.token_label(n)}: Stage 1")
        ax_err.plot(xs, e2, "^", color=red, ms=4.5, label=f"{ev.token_label(n)}: Stage 1+2")
    b1 = next((r["bound"] for r in _pick(rows, group="tuned", setting="stage 1")), math.nan)
    b2 = next((r["bound"] for r in t2), math.nan)
    for b, ls in ((b1, "-."), (b2, ":")):
        if math.isfinite(b):
            ax_err.axhline(b, color="0.3", lw=0.8, ls=ls)
    ax.set_ylabel("sparsity after tuning", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(True, axis="y", color="0.9", lw=0.6)
    ax.legend(fontsize=7.5, ncol=len(counts) + 1, loc="upper left", frameon=False)
    ax_err.set_ylabel(f"relative L1\n(bounds {b1:g} / {b2:g})", fontsize=9)
    ax_err.grid(True, axis="y", color="0.9", lw=0.6)
    ax_err.legend(fontsize=7.5, ncol=len(counts), loc="upper left", frameon=False)
    ax_err.set_ylim(0, max(0.075, b2 * 1.35 if math.isfinite(b2) else 0.075))
    ax_err.set_xticks(np.arange(len(keys)), [f"L{L}\nh{h}" for L, h in keys], fontsize=8)
    for a_ in (ax, ax_err):
        a_.tick_params(labelsize=8)
        for edge in range(1, len(keys)):
            if keys[edge][0] != keys[edge - 1][0]:
                a_.axvline(edge - 0.5, color="0.6", lw=0.8)
    fig.suptitle("Gemma 3 270M on real text: what Stage 1 and Stage 2 each skip after tuning "
                 "(INT8+rebalance / FP8), per layer (L) and head (h)", fontsize=10.5)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------


FIGURES = ("maps", "sweep", "length", "stages")


def plot_all(rows, out_dir, *, name=ev.DEFAULT_NAME, which=FIGURES):
    """The figures of ``which`` that the rows allow, as ``<out_dir>/<name>_<what>.png``."""
    out_dir = Path(out_dir)
    paths = []
    jobs = {"maps": plot_maps, "sweep": plot_sweep, "length": plot_length, "stages": plot_stages}
    for what, fn in ((w, jobs[w]) for w in FIGURES if w in which):
        try:
            paths.append(fn(rows, out_dir / f"{name}_{what}.png"))
        except (ValueError, FileNotFoundError) as e:      # nothing to draw: say so, draw the rest
            print(f"figure {what} skipped: {e}", file=sys.stderr)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", default=f"bench/results/{ev.DEFAULT_NAME}.csv",
                        help="the CSV of sparge-cupy eval (default %(default)s)")
    parser.add_argument("--out-dir", default=None, help="where the PNGs go (default: beside the CSV)")
    parser.add_argument("--name", default=None, help="file name prefix (default: the CSV's name)")
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES),
                        help="which figures to draw (default all)")
    args = parser.parse_args(argv)
    csv_path = Path(args.csv)
    rows = ev.read_csv(csv_path)
    paths = plot_all(rows, args.out_dir or csv_path.parent, name=args.name or csv_path.stem,
                     which=args.figures)
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()
