"""Stage 1 at a glance: the predicted block map next to the true block attention mass, per head.

Left panel of each pair: which (query block i, key block j) pairs Stage 1 keeps, coloured by why
(chosen by TopCdf/TopK, kept whole as a fix block, kept by the attention sink) with the fix blocks
marked along the axes (a red triangle at query block i: Q block i is not self-similar, so its row is
kept; at key block j: K block j is not self-similar, so its column is kept). Right panel: the true
attention mass of each block (float64, ``reference.block_attention_mass``) on a log colour scale,
dropped blocks faded (and crossed out on small maps); its title gives the recall, the share of the true mass that the kept
blocks hold. Sparsity counts as SPEC.md section 4: 1 - kept / causally valid blocks.

Run ``python viz/block_maps.py [--out PATH]``: draws the default input
(``sparge_cupy.data.load_default_qkv``) with the default thresholds and prints the PNG's path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout: make sparge_cupy importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matplotlib.colors import ListedColormap, LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import ScaledTranslation  # noqa: E402

from sparge_cupy import reference as R  # noqa: E402
from sparge_cupy.config import CONFIG  # noqa: E402
from sparge_cupy.viz import default_input_title, prepare, save_figure  # noqa: E402

# Categories of the predicted map, in the order of the colour map below.
DROPPED, SELECTED, FIX, SINK, INVALID = range(5)
CATEGORY_COLOURS = ("#ffffff", "#1f4e9c", "#f5a623", "#59a14f", "#d0d0d0")
CATEGORY_LABELS = ("dropped", "kept: TopCdf / TopK selection", "kept: fix block (not self-similar)",
                   "kept: attention sink", "causally masked")
FIX_MARK = "#d62728"
MAX_HEADS = 12
CROSS_MAX_BLOCKS = 16   # larger maps only fade dropped blocks: crosses would hide the mass


def block_map_summary(q, k, *, is_causal=False, scale=None, layout="HND",
                      simthreshd1=CONFIG.simthreshd1, cdfthreshd=None, topk=None,
                      attention_sink=True):
    """Everything the figure shows, as arrays (for one call to the reference).

    Returns a dict: ``block_map`` bool ``[B, Hq, nq, nk]``; ``category`` int ``[B, Hq, nq, nk]``
    (DROPPED, SELECTED, FIX, SINK, INVALID); ``q_fix`` ``[B, Hq, nq]``, ``k_fix`` ``[B, Hq, nk]``;
    ``mass`` float64 ``[B, Hq, nq, nk]``; per (b, h) ``sparsity`` and ``recall``; the overall
    ``sparsity`` and ``recall`` as floats (``overall_*``); and the per-head thresholds used.
    """
    q, k, _, scale, theta, tau, kk = prepare(q, k, layout=layout, is_causal=is_causal, scale=scale,
                                             simthreshd1=simthreshd1, cdfthreshd=cdfthreshd,
                                             topk=topk)
    block_map, det = R.predict_block_map(q, k, is_causal=is_causal, scale=scale,
                                         simthreshd1=theta, cdfthreshd=tau, topk=kk,
                                         attention_sink=attention_sink, return_details=True)
    valid = det["valid"]
    fix = (det["q_fix"][..., :, None] | det["k_fix"][..., None, :]) & valid
    category = np.full(block_map.shape, DROPPED, dtype=np.int8)
    category[block_map] = SINK            # overwritten below unless the sink is the only reason
    category[block_map & fix] = FIX
    category[det["selected"]] = SELECTED
    category[..., ~valid] = INVALID

    mass = R.block_attention_mass(q, k, is_causal=is_causal, scale=scale)
    kept_mass = (mass * block_map).sum(axis=(2, 3))
    total_mass = mass.sum(axis=(2, 3))
    n_valid = int(valid.sum())
    kept = block_map.sum(axis=(2, 3))
    return {
        "block_map": block_map, "category": category, "q_fix": det["q_fix"], "k_fix": det["k_fix"],
        "mass": mass, "valid": valid,
        "sparsity": 1.0 - kept / n_valid,
        "recall": np.where(total_mass > 0, kept_mass / np.where(total_mass > 0, total_mass, 1), 1.0),
        "overall_sparsity": float(1.0 - kept.sum() / (n_valid * kept.size)),
        "overall_recall": float(kept_mass.sum() / total_mass.sum()) if total_mass.sum() else 1.0,
        "simthreshd1": theta, "cdfthreshd": tau, "topk": kk,
    }


def _threshold_text(theta, tau, kk, h=None):
    """'theta=0.6, tau=0.98' for head h, or for all heads when they share the values."""
    pick = (lambda a: a[h]) if h is not None else (lambda a: a[0])
    text = f"theta={pick(theta):.3g}, "
    text += f"tau={pick(tau):.4g}" if tau is not None else f"topk={pick(kk):.3g}"
    return text


def _uniform(*arrays):
    return all(a is None or np.all(a == a[0]) for a in arrays)


def _pick_heads(heads, Hq):
    if heads is None:
        if Hq <= MAX_HEADS:
            return list(range(Hq))
        return sorted(set(np.linspace(0, Hq - 1, MAX_HEADS).round().astype(int).tolist()))
    heads = [int(h) for h in np.atleast_1d(heads)]
    bad = [h for h in heads if not 0 <= h < Hq]
    if not heads or bad:
        raise ValueError(f"heads: expected query head indices in [0, {Hq}), got {heads}")
    return heads


def _mark_fix_blocks(ax, q_fix, k_fix, size):
    """Red triangles just outside the map: on the right edge at each fix Q row (pointing at the
    row), on the top edge at each fix K column."""
    rows = np.flatnonzero(q_fix)
    cols = np.flatnonzero(k_fix)
    kw = dict(color=FIX_MARK, linestyle="none", markersize=size, clip_on=False, zorder=5)
    gap = (size / 2 + 1.5) / 72                       # inches: half a marker and a hair off the edge
    if rows.size:
        shift = ScaledTranslation(gap, 0, ax.figure.dpi_scale_trans)
        ax.plot(np.ones(rows.size), rows, marker="<", transform=ax.get_yaxis_transform() + shift,
                **kw)
    if cols.size:
        shift = ScaledTranslation(0, gap, ax.figure.dpi_scale_trans)
        ax.plot(cols, np.ones(cols.size), marker="v", transform=ax.get_xaxis_transform() + shift,
                **kw)


def _style_axes(ax, nq, nk, *, xlabel, ylabel):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.tick_params(labelsize=7, length=2)
    ax.set_xlim(-0.5, nk - 0.5)
    ax.set_ylim(nq - 0.5, -0.5)
    if xlabel:
        ax.set_xlabel("key block j", fontsize=8)
    if ylabel:
        ax.set_ylabel("query block i", fontsize=8)


def plot_block_maps(q, k, *, is_causal=False, scale=None, layout="HND",
                    simthreshd1=CONFIG.simthreshd1, cdfthreshd=None, topk=None,
                    attention_sink=True, heads=None, batch=0, title=None, path):
    """Draw predicted block maps beside the true block attention mass and save a PNG.

    Args:
      q, k: as for :func:`sparge_cupy.predict_block_map` (NumPy or CuPy, HND or NHD).
      simthreshd1, cdfthreshd, topk, attention_sink: Stage 1 settings (scalars or one per query
        head); ``cdfthreshd`` defaults to ``CONFIG.cdfthreshd`` unless ``topk`` is given.
      heads: query heads to draw; default all, or 12 spread evenly when there are more.
      batch: which batch entry to draw.
      title: first line of the figure title; the input's shape is used when None.
      path: where to write the PNG (parent directories are created).
    Returns:
      ``path`` as a :class:`pathlib.Path`.
    """
    summary = block_map_summary(q, k, is_causal=is_causal, scale=scale, layout=layout,
                                simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
                                attention_sink=attention_sink)
    B, Hq, nq, nk = summary["block_map"].shape
    if not 0 <= int(batch) < B:
        raise ValueError(f"batch: expected an index in [0, {B}), got {batch}")
    heads = _pick_heads(heads, Hq)
    theta, tau, kk = summary["simthreshd1"], summary["cdfthreshd"], summary["topk"]
    uniform = _uniform(theta, tau, kk)

    pairs_per_row = min(len(heads), 3)
    n_rows = -(-len(heads) // pairs_per_row)
    aspect = CONFIG.block_q / CONFIG.block_k          # cells drawn in token proportions
    panel_w = 2.3 if len(heads) > 2 else 3.4
    panel_h = min(3.2, max(1.2, panel_w * nq * aspect / nk))
    maps_w, side_w, legend_h = pairs_per_row * 2 * panel_w, 1.2, 0.75
    maps_h = n_rows * (panel_h + 0.75)
    fig = Figure(figsize=(maps_w + side_w, maps_h + legend_h + 0.7), dpi=110, layout="constrained")
    upper, lower = fig.subfigures(2, 1, height_ratios=[maps_h, legend_h], hspace=0.0)
    top, side = upper.subfigures(1, 2, width_ratios=[maps_w, side_w], wspace=0.0)
    grid = top.subfigures(n_rows, pairs_per_row, squeeze=False, wspace=0.04, hspace=0.04)

    mass = summary["mass"][batch]
    positive = mass[:, summary["valid"]][heads]
    positive = positive[positive > 0]
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = max(float(positive.min()) if positive.size else vmax * 1e-6, vmax * 1e-6)
    norm = LogNorm(vmin=vmin, vmax=vmax)
    cat_cmap = ListedColormap(CATEGORY_COLOURS)
    mass_cmap = _with_bad("viridis", CATEGORY_COLOURS[INVALID])   # masked: causally invalid
    marker_size = max(3.0, min(8.0, 150.0 * panel_w / max(nq, nk) / 10))
    image = None
    for n, h in enumerate(heads):
        r, c = divmod(n, pairs_per_row)
        sub = grid[r, c]
        head_title = f"head {h}" + ("" if uniform else f"  ({_threshold_text(theta, tau, kk, h)})")
        sub.suptitle(head_title, fontsize=10, fontweight="bold")
        ax_map, ax_mass = sub.subplots(1, 2, sharey=True)
        cat = summary["category"][batch, h]
        ax_map.imshow(cat, cmap=cat_cmap, vmin=-0.5, vmax=len(CATEGORY_COLOURS) - 0.5,
                      aspect=aspect, interpolation="nearest")
        _mark_fix_blocks(ax_map, summary["q_fix"][batch, h], summary["k_fix"][batch, h],
                         marker_size)
        ax_map.set_title(f"predicted: sparsity {summary['sparsity'][batch, h]:.0%}", fontsize=8.5,
                         pad=2 * marker_size + 4)

        shown = np.ma.masked_where(~summary["valid"] | (mass[h] <= 0), mass[h])
        image = ax_mass.imshow(shown, cmap=mass_cmap, norm=norm, aspect=aspect,
                               interpolation="nearest")
        # dropped blocks: faded on the mass panel, and crossed out while the cells are large
        fade = np.zeros(cat.shape + (4,))
        fade[cat == DROPPED] = (1.0, 1.0, 1.0, 0.55)
        ax_mass.imshow(fade, aspect=aspect, interpolation="nearest")
        dropped = np.argwhere(cat == DROPPED)
        if dropped.size and max(nq, nk) <= CROSS_MAX_BLOCKS:
            ax_mass.plot(dropped[:, 1], dropped[:, 0], marker="x", color="0.1",
                         markersize=marker_size, markeredgewidth=1.1, linestyle="none")
        ax_mass.set_title(f"true mass: recall {summary['recall'][batch, h]:.1%}", fontsize=8.5,
                          pad=2 * marker_size + 4)
        last_row = r == n_rows - 1 or n + pairs_per_row >= len(heads)
        _style_axes(ax_map, nq, nk, xlabel=last_row, ylabel=c == 0)
        _style_axes(ax_mass, nq, nk, xlabel=last_row, ylabel=False)
        ax_mass.tick_params(labelleft=False)

    head_line = _threshold_text(theta, tau, kk) if uniform else "per-head thresholds"
    settings = (f"{head_line}, {'causal' if is_causal else 'non-causal'}, blocks "
                f"{CONFIG.block_q}x{CONFIG.block_k}, attention sink {'on' if attention_sink else 'off'}"
                f"  |  all heads: sparsity {summary['overall_sparsity']:.1%}, "
                f"recall of true mass {summary['overall_recall']:.1%}")
    if title is None:
        shape = [int(n) for n in q.shape]
        title = (f"SpargeAttn Stage 1: predicted block map vs true block attention mass "
                 f"(q {shape}, {layout})")
    fig.suptitle(f"{title}\n{settings}", fontsize=11)

    cax = side.add_axes([0.12, 0.2, 0.16, 0.6])
    cbar = side.colorbar(image, cax=cax)
    cbar.set_label("true block attention mass (log scale)", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    handles = [Patch(facecolor=CATEGORY_COLOURS[i], edgecolor="0.4", label=CATEGORY_LABELS[i])
               for i in (SELECTED, FIX, SINK, DROPPED, INVALID)]
    handles.append(_line_handle("<", FIX_MARK, "fix block row (Q) / column (K)"))
    handles.append(_line_handle("x", "0.2", "dropped block (mass panel: faded, crossed)"))
    lower.legend(handles=handles, loc="center", ncol=4, fontsize=8, frameon=False)

    return save_figure(fig, path)


def _with_bad(cmap_name, colour):
    from matplotlib import colormaps
    return colormaps[cmap_name].with_extremes(bad=colour)


def _line_handle(marker, colour, label):
    from matplotlib.lines import Line2D
    return Line2D([], [], marker=marker, color=colour, linestyle="none", markersize=7, label=label)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="block_maps.png", help="PNG to write (default %(default)s)")
    parser.add_argument("--heads", type=int, nargs="+", default=None, help="query heads to draw")
    parser.add_argument("--simthreshd1", type=float, default=CONFIG.simthreshd1, help="theta")
    parser.add_argument("--cdfthreshd", type=float, default=None,
                        help=f"tau (default {CONFIG.cdfthreshd} unless --topk)")
    parser.add_argument("--topk", type=float, default=None, help="topk fraction instead of tau")
    args = parser.parse_args(argv)

    from sparge_cupy.data import load_default_qkv
    data = load_default_qkv()
    path = plot_block_maps(data["q"], data["k"], is_causal=False, scale=data["scale"],
                           simthreshd1=args.simthreshd1, cdfthreshd=args.cdfthreshd,
                           topk=args.topk, heads=args.heads, path=args.out,
                           title=f"Stage 1 on {default_input_title(data)}")
    print(path)
    return path


if __name__ == "__main__":
    main()
