"""Error against sparsity as the Stage 1 thresholds sweep, quantization and sparsity apart.

Left: relative L1 error against dense float64 (SPEC.md section 4) as a function of Stage 1
sparsity, one curve per theta (``simthreshd1``) as tau (``cdfthreshd``) sweeps, and one for TopK.
Each is drawn twice: solid with quantization on (the kernel's modes, INT8 QK^T and FP8 P V by
default), dashed with quantization off (the reference's "fp32" modes: no rounding), so the dashed
curve is the sparsity error alone. The horizontal line is the quantization floor: all blocks kept,
quantization on. Right: the sparsity each tau gives, tau on a ``-log10(1 - tau)`` scale (the
scale tuning searches on: 0.9, 0.99, 0.999 are equally spaced). Stage 2 is off throughout.

Run ``python viz/error_sparsity.py [--out PATH]``: draws the default input
(``sparge_cupy.data.load_default_qkv``) and prints the PNG's path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout: make sparge_cupy importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matplotlib import colormaps  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from sparge_cupy import reference as R  # noqa: E402
from sparge_cupy.config import CONFIG  # noqa: E402
from sparge_cupy.viz import default_input_title, prepare, save_figure  # noqa: E402

DEFAULT_THETAS = (0.0, round(CONFIG.simthreshd1 / 2, 3), CONFIG.simthreshd1)
DEFAULT_TAUS = tuple(1.0 - np.logspace(-0.3, -3.0, 10))   # 0.5 ... 0.999, even in -log10(1-tau)
DEFAULT_TOPKS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
QUANT_OFF = {"qk": "fp32", "pv": "fp32"}


def _nines(tau):
    return -np.log10(1.0 - np.asarray(tau, dtype=np.float64))


def error_sparsity_sweep(q, k, v, *, is_causal=False, scale=None, layout="HND",
                         thetas=DEFAULT_THETAS, taus=DEFAULT_TAUS, topks=DEFAULT_TOPKS,
                         topk_theta=None, attention_sink=True, qk="int8", pv="fp8",
                         rebalance=True):
    """Run the sweep on the reference; returns the numbers the figure draws.

    Args:
      q, k, v: as for :func:`sparge_cupy.sparge_attn` (NumPy or CuPy, HND or NHD).
      thetas: simthreshd1 values, one TopCdf curve each, swept over ``taus`` (each in (0, 1)).
      topks: TopK fractions, one curve at ``topk_theta`` (default the smallest theta); () for none.
      qk, pv, rebalance: the quantization of the "on" curves.
    Returns:
      a dict: ``points``, a list of dicts (``curve``, ``theta``, ``tau`` or ``topk``,
      ``sparsity`` (Stage 1), ``recall`` (share of the true block mass kept), ``rel_l1`` with
      quantization on, ``rel_l1_fp32`` with it off); ``floor`` (relative L1 of all blocks kept,
      quantization on) and ``floor_fp32`` (all blocks, quantization off: float32 rounding only).
    """
    taus = [float(t) for t in taus]
    if any(not 0.0 < t < 1.0 for t in taus):
        raise ValueError(f"taus: expected values in (0, 1) (the -log10(1 - tau) axis), got {taus}")
    q, k, v, scale, _, _, _ = prepare(q, k, v, layout=layout, is_causal=is_causal, scale=scale,
                                      simthreshd1=0.0, cdfthreshd=None, topk=None)
    Hq = q.shape[1]
    ref = R.dense_attention(q, k, v, is_causal=is_causal, scale=scale)
    mass = R.block_attention_mass(q, k, is_causal=is_causal, scale=scale)
    total_mass = mass.sum()
    no_filter = np.full((Hq,), np.inf, dtype=np.float32)
    cache = {}

    def rel_l1(block_map, quant_on):
        key = (block_map.tobytes(), quant_on)  # many settings give the same map: run it once
        if key not in cache:
            modes = dict(qk=qk, pv=pv) if quant_on else QUANT_OFF
            out = R.block_sparse_attention(q, k, v, block_map, is_causal=is_causal, scale=scale,
                                           pvthreshd=no_filter, rebalance=rebalance, **modes)
            cache[key] = R.relative_l1(out, ref)
        return cache[key]

    def point(curve, theta, **sel):
        per_head = {name: np.full((Hq,), value, dtype=np.float32) for name, value in sel.items()}
        block_map = R.predict_block_map(q, k, is_causal=is_causal, scale=scale,
                                        simthreshd1=np.full((Hq,), theta, dtype=np.float32),
                                        attention_sink=attention_sink,
                                        **{"cdfthreshd": None, "topk": None, **per_head})
        valid = R.valid_blocks(q.shape[2], k.shape[2], CONFIG.block_q, CONFIG.block_k, is_causal)
        kept = (block_map & valid).sum()
        named = {"tau" if n == "cdfthreshd" else n: float(x) for n, x in sel.items()}
        return {"curve": curve, "theta": float(theta), **named,
                "sparsity": float(1.0 - kept / (valid.sum() * q.shape[0] * Hq)),
                "recall": float((mass * block_map).sum() / total_mass) if total_mass else 1.0,
                "rel_l1": rel_l1(block_map, True), "rel_l1_fp32": rel_l1(block_map, False)}

    points = [point(f"theta={theta:g}", theta, cdfthreshd=tau) for theta in thetas for tau in taus]
    topk_theta = min(thetas) if topk_theta is None else topk_theta
    points += [point(f"topk, theta={topk_theta:g}", topk_theta, topk=kk) for kk in topks]
    nq, nk = R.num_blocks(q.shape[2], CONFIG.block_q), R.num_blocks(k.shape[2], CONFIG.block_k)
    every = np.ones((q.shape[0], Hq, nq, nk), dtype=bool)
    return {"points": points, "floor": rel_l1(every, True), "floor_fp32": rel_l1(every, False),
            "qk": qk, "pv": pv, "is_causal": is_causal}


def plot_error_sparsity(q, k, v, *, is_causal=False, scale=None, layout="HND",
                        thetas=DEFAULT_THETAS, taus=DEFAULT_TAUS, topks=DEFAULT_TOPKS,
                        topk_theta=None, attention_sink=True, qk="int8", pv="fp8",
                        rebalance=True, title=None, path):
    """Draw error against sparsity (see the module docstring) and save a PNG.

    Keywords as in :func:`error_sparsity_sweep`; ``title`` is the first line of the figure title
    (the input's shape when None); ``path`` where to write the PNG. Returns ``path`` as a
    :class:`pathlib.Path`.
    """
    sweep = error_sparsity_sweep(q, k, v, is_causal=is_causal, scale=scale, layout=layout,
                                 thetas=thetas, taus=taus, topks=topks, topk_theta=topk_theta,
                                 attention_sink=attention_sink, qk=qk, pv=pv, rebalance=rebalance)
    points = sweep["points"]
    curves = list(dict.fromkeys(p["curve"] for p in points))
    colours = colormaps["tab10"]

    fig = Figure(figsize=(13.5, 5.6), dpi=110, layout="constrained")
    ax, ax_tau = fig.subplots(1, 2, width_ratios=[1.45, 1])
    for c, curve in enumerate(curves):
        pts = [p for p in points if p["curve"] == curve]
        is_topk = "topk" in pts[0]
        pts.sort(key=lambda p: (p["sparsity"], p.get("tau", p.get("topk"))))
        x = [p["sparsity"] for p in pts]
        colour = "black" if is_topk else colours(c)
        marker = "s" if is_topk else "o"
        ax.plot(x, [p["rel_l1"] for p in pts], color=colour, marker=marker, markersize=5,
                linestyle="-", label=curve)
        ax.plot(x, [p["rel_l1_fp32"] for p in pts], color=colour, marker=marker, markersize=5,
                markerfacecolor="white", linestyle="--")
        if not is_topk:
            ax_tau.plot(_nines([p["tau"] for p in pts]), x, color=colour, marker="o",
                        markersize=5, label=curve)
    ax.axhline(sweep["floor"], color="0.35", linestyle=":", linewidth=1.5)
    ax.annotate(f"quantization floor {sweep['floor']:.3g}\n(all blocks kept, {qk} QK / {pv} PV)",
                xy=(1.0, sweep["floor"]), xycoords=("axes fraction", "data"),
                xytext=(-4, 4), textcoords="offset points", ha="right", va="bottom", fontsize=8,
                color="0.25")
    # symlog: the fp32 mirror with every block kept is exact to float32 rounding (~1e-7), which
    # on a log axis would squeeze the range that matters; below linthresh the axis is linear.
    linthresh = 10 ** np.floor(np.log10(max(sweep["floor"], 1e-6) / 10))
    ax.set_yscale("symlog", linthresh=linthresh, linscale=0.3)
    top = max([sweep["floor"]] + [max(p["rel_l1"], p["rel_l1_fp32"]) for p in points])
    ax.set_ylim(0, top * 1.6)
    ax.set_xlim(-0.02, max(0.1, max(p["sparsity"] for p in points) * 1.08))
    ax.set_xlabel("Stage 1 sparsity (1 - kept / valid blocks)")
    ax.set_ylabel(f"relative L1 error vs dense float64 (log above {linthresh:g})")
    ax.set_title("error against sparsity as the thresholds sweep", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    style = [Line2D([], [], color="0.3", marker="o", linestyle="-",
                    label=f"quantization on ({qk} QK, {pv} PV): sparsity + quantization"),
             Line2D([], [], color="0.3", marker="o", markerfacecolor="white", linestyle="--",
                    label="quantization off (fp32 mirror): sparsity error alone"),
             Line2D([], [], color="0.35", linestyle=":", label="quantization alone (all blocks)")]
    ax.legend(handles=style, loc="lower right", fontsize=8)

    tau_ticks = [0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]
    ax_tau.set_xticks(_nines(tau_ticks), [f"{t:g}" for t in tau_ticks], fontsize=8)
    ax_tau.set_xlabel("tau (cdfthreshd), on a -log10(1 - tau) scale")
    ax_tau.set_ylabel("Stage 1 sparsity")
    ax_tau.set_ylim(-0.02, max(0.1, max(p["sparsity"] for p in points) * 1.08))
    ax_tau.set_title("sparsity as tau sweeps, per theta", fontsize=10)
    ax_tau.grid(True, alpha=0.3)
    handles, _ = ax_tau.get_legend_handles_labels()
    handles += [Line2D([], [], color="black", marker="s", label=c + " (left only)")
                for c in curves if c.startswith("topk")]
    ax_tau.legend(handles=handles, fontsize=8, title="curves (colour in both panels)",
                  title_fontsize=8, loc="upper right")

    if title is None:
        title = f"SpargeAttn error vs sparsity (q {[int(n) for n in q.shape]}, {layout})"
    fig.suptitle(f"{title}\n{'causal' if is_causal else 'non-causal'}, blocks "
                 f"{CONFIG.block_q}x{CONFIG.block_k}, Stage 2 off, attention sink "
                 f"{'on' if attention_sink else 'off'}", fontsize=11)
    return save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="error_sparsity.png",
                        help="PNG to write (default %(default)s)")
    args = parser.parse_args(argv)

    from sparge_cupy.data import load_default_qkv
    data = load_default_qkv()
    path = plot_error_sparsity(data["q"], data["k"], data["v"], is_causal=False,
                               scale=data["scale"], path=args.out,
                               title=f"Error vs sparsity on {default_input_title(data)}")
    print(path)
    return path


if __name__ == "__main__":
    main()
