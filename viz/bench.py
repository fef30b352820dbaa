"""Benchmark throughput: dense-equivalent TOPS per method, from the CSVs of ``bench/run_bench.py``.

One row of panels per (head dim D, causal) found in the CSVs:

- left: TOPS against sequence length L at density 1.0 (every block kept), one line per method;
- right: TOPS against density (the kept share of the valid blocks, as measured, not as asked) at
  the largest L of that panel, one line per method. Baselines run dense only (SDPA,
  sageattention) are drawn as a dotted horizontal line at their density-1.0 TOPS: the time to
  beat. Our rows are thick lines with circles; the kernel-only row (``*_kernel``) is dashed.

TOPS is dense-equivalent (SPEC.md section 4): ``4 B H (visible pairs) D / time``, so a sparse row
is credited with the work it skipped and a higher line is a shorter time on the same problem.
Rows whose ``status`` is not ``ok`` (a failed correctness gate, an error) are left out, listed in
a note under the panels and printed. Rows repeated across CSVs (same method, D, causal, L,
density) keep the last one read, whatever its status (a rerun replaces a failed row). The card
comes from the ``card`` column and the date from the file names (``<tag>_<YYYY-MM-DD>_<card>.csv``, as ``run_bench.py`` writes them).

Run ``python viz/bench.py CSV [CSV ...] [--out PATH]`` (or ``python -m sparge_cupy.viz.bench``):
draws the CSVs into one PNG and prints its path; matplotlib only, no GPU.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import textwrap
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

REQUIRED = ("card", "method", "B", "H", "L", "D", "causal", "density", "dtype", "status", "tops")
DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")


def read_bench_csvs(paths):
    """The rows of ``run_bench.py`` CSVs, typed: L, D, B, H int; causal bool; density float;
    tops float or None. Each row also gets ``source`` (the file name)."""
    rows = []
    for path in map(Path, paths):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"{path}: expected run_bench.py columns, missing {', '.join(missing)}")
            for r in reader:
                line = reader.line_num
                typed = {c: _typed(path, line, c, r[c], conv) for c, conv in _TYPES.items()}
                rows.append(dict(r, source=path.name, **typed))
    return rows


def _flag(x):
    return {"true": True, "false": False}[x.strip().lower()]


def _finite(x):
    v = float(x)
    if not math.isfinite(v):
        raise ValueError
    return v


def _tops(x):
    """TOPS, or None where there is none (an empty or NaN cell: the row is left out)."""
    v = float(x) if x.strip() else math.nan
    return v if math.isfinite(v) else None


_TYPES = {"B": int, "H": int, "L": int, "D": int, "causal": _flag, "density": _finite, "tops": _tops}
_KINDS = {int: "an integer", _flag: "True or False", _finite: "a finite number", _tops: "a number"}


def _typed(path, line, column, value, conv):
    try:
        return conv(value if value is not None else "")
    except (KeyError, ValueError):
        raise ValueError(f"{path}, line {line}: {column}: expected {_KINDS[conv]}, got {value!r}") from None


def bench_series(rows):
    """What the figure draws, from typed rows (:func:`read_bench_csvs`).

    Returns a dict: ``series``, a list of dicts (``D``, ``causal``, ``panel`` "L" or "density",
    ``method``, ``x``, ``y`` (TOPS), ``dense_only``: the method has no row below density 1);
    ``left_out``, the rows whose status is not ok (and that no later row of the same method, D,
    causal, L and density replaced); ``methods`` in the order first seen.
    """
    last = {}
    for r in rows:                                  # the last one read wins, ok or not
        last[(r["method"], r["D"], r["causal"], r["L"], r["density"])] = r
    ok = {key: r for key, r in last.items() if r["status"] == "ok" and r["tops"] is not None}
    left_out = [r for key, r in last.items() if key not in ok]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    series = []
    for D, causal in sorted({(r["D"], r["causal"]) for r in ok.values()}, key=lambda p: (-p[0], p[1])):
        panel = [r for r in ok.values() if (r["D"], r["causal"]) == (D, causal)]
        L_max = max(r["L"] for r in panel)
        for method in methods:
            mine = [r for r in panel if r["method"] == method]
            dense = sorted((r for r in mine if r["density"] == 1.0), key=lambda r: r["L"])
            at_max = sorted((r for r in mine if r["L"] == L_max), key=lambda r: r["density"])
            dense_only = all(r["density"] == 1.0 for r in mine)
            for name, pts in (("L", dense), ("density", at_max)):
                if pts:
                    series.append(dict(D=D, causal=causal, panel=name, method=method,
                                       x=[r[name] for r in pts], y=[r["tops"] for r in pts],
                                       dense_only=dense_only, L=L_max if name == "density" else None))
    return {"series": series, "left_out": left_out, "methods": methods}


def _left_out_lines(left_out):
    """One line per (method, D, causal, status): the L and densities it covers."""
    groups = {}
    for r in left_out:
        key = (r["method"], r["D"], r["causal"], r["status"])
        groups.setdefault(key, []).append(r)
    lines = []
    for (method, D, causal, status), rs in groups.items():
        status = status if status != "ok" else "no TOPS value"
        Ls = ", ".join(str(L) for L in sorted({r["L"] for r in rs}))
        dens = ", ".join(f"{d:g}" for d in sorted({r["density"] for r in rs}, reverse=True))
        lines.append(f"{method}, D={D} {'causal' if causal else 'non-causal'}, L={Ls}, "
                     f"density {dens}: {status}")
    return lines


def _length_label(L):
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def _one(values, what):
    vals = sorted({str(v) for v in values})
    return vals[0] if len(vals) == 1 else f"{what} " + "/".join(vals)


def plot_bench(csv_paths, *, path, title=None):
    """Draw the CSVs of ``run_bench.py`` (see the module docstring) and save a PNG.

    ``csv_paths``: one or more CSVs of one card; ``path``: the PNG to write; ``title``: the first
    line of the figure title (default: the card and the dates of the files). Returns
    :func:`bench_series`'s dict with ``path`` (a :class:`pathlib.Path`) added.
    """
    csv_paths = [Path(p) for p in ([csv_paths] if isinstance(csv_paths, (str, Path)) else csv_paths)]
    if not csv_paths:
        raise ValueError("csv_paths: expected at least one CSV of bench/run_bench.py, got none")
    rows = read_bench_csvs(csv_paths)
    cards = sorted({r["card"] for r in rows})
    if len(cards) != 1:
        raise ValueError(f"csv_paths: expected the rows of one card, got {len(cards)}: "
                         f"{', '.join(cards) or 'no rows'} (draw one figure per card)")
    dtypes = sorted({r["dtype"] for r in rows})
    if len(dtypes) != 1:
        raise ValueError(f"csv_paths: expected the rows of one dtype, got {len(dtypes)}: "
                         f"{', '.join(dtypes)} (draw one figure per dtype)")
    drawn = bench_series(rows)
    series, methods = drawn["series"], drawn["methods"]
    if not series:
        raise ValueError(f"csv_paths: no row with status ok in {', '.join(p.name for p in csv_paths)}")
    panels = list(dict.fromkeys((s["D"], s["causal"]) for s in series))
    colours = colormaps["tab10"]
    colour = {m: colours(i % 10) for i, m in enumerate(methods)}
    ours = {m: m.startswith("sparge") for m in methods}
    # ours thick with circles, the kernel-only row dashed (operands quantized outside the timing)
    style = {m: dict(color=colour[m], linewidth=2.2 if ours[m] else 1.4, markersize=5,
                     marker="o" if ours[m] else "s", linestyle="--" if m.endswith("_kernel") else "-")
             for m in methods}

    notes = _left_out_lines(drawn["left_out"])
    for line in notes:
        print(f"left out: {line}")
    wrapped = [w for line in notes for w in textwrap.wrap(line, 140, subsequent_indent="    ")]
    ncol = min(len(methods), 5)
    # the bottom row holds the legend and the note on left-out rows (inches: legend + note lines)
    foot = 0.25 * -(-len(methods) // ncol) + (0.16 * (len(wrapped) + 1) if wrapped else 0) + 0.2
    fig = Figure(figsize=(13.5, 3.9 * len(panels) + 0.9 + foot), dpi=110, layout="constrained")
    grid = fig.add_gridspec(len(panels) + 1, 2, height_ratios=[3.9] * len(panels) + [foot])
    for row, (D, causal) in enumerate(panels):
        ax_L, ax_d = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1])
        mask = "causal" if causal else "non-causal"
        here = [s for s in series if (s["D"], s["causal"]) == (D, causal)]
        L_max = next(s["L"] for s in here if s["panel"] == "density")
        for s in here:
            if s["panel"] == "L":
                ax_L.plot(s["x"], s["y"], **style[s["method"]])
            elif s["dense_only"] and not ours[s["method"]]:
                ax_d.axhline(s["y"][0], color=colour[s["method"]], linestyle=":", linewidth=1.4)
            else:
                ax_d.plot(s["x"], s["y"], **style[s["method"]])
        Ls = sorted({x for s in here if s["panel"] == "L" for x in s["x"]})
        ax_L.set_xscale("log", base=2)
        ax_L.xaxis.set_major_locator(FixedLocator(Ls))
        ax_L.xaxis.set_minor_locator(NullLocator())
        ax_L.set_xticklabels([_length_label(L) for L in Ls])
        if len(Ls) == 1:
            ax_L.set_xlim(Ls[0] / 1.5, Ls[0] * 1.5)
        ax_L.set_xlabel("sequence length L (Lq = Lk)")
        ax_L.set_ylabel("dense-equivalent TOPS")
        ax_L.set_ylim(bottom=0)
        ax_L.set_title(f"D={D}, {mask}: density 1.0 (all blocks), TOPS vs L", fontsize=10)

        dens = sorted({round(x, 2) for s in here if s["panel"] == "density" and not s["dense_only"]
                       for x in s["x"]} | {1.0})
        ax_d.set_xscale("log")
        ax_d.set_yscale("log")
        ax_d.xaxis.set_major_locator(FixedLocator(dens))
        ax_d.xaxis.set_minor_locator(NullLocator())
        ax_d.set_xticklabels([f"{d:g}" for d in dens])
        ax_d.set_xlim(min(dens) / 1.15, 1.15)
        ax_d.invert_xaxis()   # sparser to the right, where the speed-up grows
        ax_d.yaxis.set_major_formatter("{x:.0f}")
        ax_d.yaxis.set_minor_formatter("{x:.0f}")
        ax_d.set_xlabel("density (kept share of the valid blocks); dotted: baselines run dense")
        ax_d.set_ylabel("dense-equivalent TOPS (log)")
        ax_d.set_title(f"D={D}, {mask}: TOPS vs density at L={_length_label(L_max)}", fontsize=10)
        for ax in (ax_L, ax_d):
            ax.grid(True, which="both", alpha=0.3)
            ax.tick_params(axis="y", which="minor", labelsize=7)

    foot_ax = fig.add_subplot(grid[-1, :])
    foot_ax.axis("off")
    shown = [m for m in methods if any(s["method"] == m for s in series)]
    foot_ax.legend(handles=[Line2D([], [], label=m, **style[m]) for m in shown], loc="upper center",
                   ncol=ncol, fontsize=9, frameon=False)
    if wrapped:
        foot_ax.text(0.0, 0.0, "left out (status not ok, or no TOPS):\n" + "\n".join(wrapped), fontsize=7.5,
                     color="0.3", va="bottom", ha="left", family="monospace",
                     transform=foot_ax.transAxes)
    if title is None:
        dates = sorted({m.group(1) for p in csv_paths if (m := DATE.search(p.name))})
        title = f"{cards[0]}, {', '.join(dates) or 'undated'}"
    fig.suptitle(f"Attention throughput: {title}\nB={_one((r['B'] for r in rows), 'B')}, "
                 f"H={_one((r['H'] for r in rows), 'H')}, {_one((r['dtype'] for r in rows), 'dtype')}, "
                 f"random inputs, fixed random block maps; dense-equivalent TOPS = "
                 f"4 B H (visible pairs) D / time (SPEC.md section 4)", fontsize=11)
    from sparge_cupy.viz import save_figure
    return {**drawn, "path": save_figure(fig, path)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", nargs="+", help="CSVs written by bench/run_bench.py (one card)")
    parser.add_argument("--out", default="bench.png", help="PNG to write (default %(default)s)")
    parser.add_argument("--title", default=None, help="first title line (default: card and date)")
    args = parser.parse_args(argv)
    path = plot_bench(args.csv, path=args.out, title=args.title)["path"]
    print(path)
    return path


if __name__ == "__main__":
    main()
