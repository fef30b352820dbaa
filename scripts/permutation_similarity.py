"""How much does Hilbert-curve token order raise block self-similarity on real images?

What it measures
    SpargeAttn trusts a block's mean only when the block is self-similar (SPEC.md section 1:
    ``sim = || mean_r x_r / ||x_r|| ||^2 > theta``); other blocks become fix blocks, kept whole,
    which costs sparsity. Image and video models store their tokens row-major, so a block of 64
    or 128 tokens is a strip of one or two rows of patches. SPEC.md section 6 reorders the tokens
    along a generalized Hilbert curve (``sparge_cupy.permute``) so that a block is a compact
    patch of the picture instead. This script measures the effect on real photographs:

    - each of scikit-image's sample images (those shipped inside the package, so nothing is
      downloaded) is cut into p x p pixel patches (default 8 x 8); a patch's pixels (all
      channels, values in [0, 1]) flattened make one token: D = p*p*C (192 for RGB, 64 for
      grey), at most 256;
    - the mean token is subtracted (as K smoothing does; without it every pixel token is
      positive and all cosines are close to 1);
    - ``sparge_cupy.reference.block_self_similarity`` on blocks of 64 tokens (the K block) and
      128 tokens (the Q block), in row-major order and in Hilbert order; reported per image: the
      mean similarity, and the share of blocks with sim > theta for theta in {0.3, 0.5, 0.6, 0.8}
      (0.6 is the package default).

    A video-like case follows: T frames that are crops of one image shifted by a few pixels per
    frame (a camera pan), T x H x W tokens in row-major (t, h, w) order, frame by frame along the
    2-D curve, and along the 3-D curve.

    Pixel patches stand in for the Q and K of a vision transformer, whose first layers are close
    to linear maps of them; the numbers show how much locality the order exposes, not the
    sparsity of a particular model.

How to run
    pip install scikit-image        # the sample images; not a dependency of the package
    python scripts/permutation_similarity.py [--patch 8] [--frames 8] [--out PATH]

    Prints the table and writes it, with the command, date, versions and image list, to
    bench/results/permutation_similarity.md. CPU only, a few seconds.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

from sparge_cupy import reference as R
from sparge_cupy.permute import hilbert_permutation

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "permutation_similarity.md"
# Photographs, micrographs and textures of skimage.data; any that needs a download is skipped.
# (skimage.data.cat() is chelsea again, so it is left out.)
IMAGES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "brick",
          "grass", "gravel", "immunohistochemistry", "hubble_deep_field", "retina", "page", "text")
VIDEO_IMAGE = "coffee"
VIDEO_SHIFT = (3, 5)       # pixels per frame (down, right): a slow diagonal pan, not patch-aligned
BLOCKS = {"K": 64, "Q": 128}
THETAS = (0.3, 0.5, 0.6, 0.8)
MAX_D = 256


def load_images(names):
    """``{name: float image [h, w, C] in [0, 1]}`` for the sample images present offline, and the
    names skipped (with the reason)."""
    from skimage import data, util
    images, skipped = {}, {}
    for name in names:
        try:
            img = getattr(data, name)()
        except (AttributeError, ModuleNotFoundError, OSError, ValueError) as err:
            skipped[name] = type(err).__name__
            continue
        img = util.img_as_float64(img)
        if img.ndim == 2:
            img = img[:, :, None]
        images[name] = img[:, :, :3]                       # drop an alpha channel if any
    return images, skipped


def patch_tokens(img, p):
    """Row-major grid of p x p patch tokens: float64 ``[H*W, p*p*C]`` and the grid ``(H, W)``.
    Pixels past the last whole patch are cropped."""
    H, W = img.shape[0] // p, img.shape[1] // p
    C = img.shape[2]
    if p * p * C > MAX_D:
        raise ValueError(f"--patch: {p} x {p} x {C} channels = {p * p * C} > {MAX_D} per token")
    x = img[:H * p, :W * p].reshape(H, p, W, p, C).transpose(0, 2, 1, 3, 4)
    return x.reshape(H * W, p * p * C), (H, W)


def block_stats(tokens):
    """Self-similarity summary of the blocks of ``tokens`` [N, D] in the order given (mean
    token removed first, as K smoothing does)."""
    x = (tokens - tokens.mean(axis=0))[None, None]
    row = {}
    for label, block in BLOCKS.items():
        sim = R.block_self_similarity(x, block)[0, 0].astype(np.float64)
        row[f"mean{block}"] = float(sim.mean())
        for theta in THETAS:
            row[f"{block}>{theta}"] = float((sim > theta).mean())
    return row


def measure_image(tokens, grid):
    perm, _ = hilbert_permutation(1, *grid)
    return {"row-major": block_stats(tokens), "hilbert": block_stats(tokens[perm])}


def video_tokens(img, p, T):
    """T frames of a pan across ``img``: crops shifted by VIDEO_SHIFT pixels per frame, each cut
    into patches. Returns tokens ``[T*H*W, D]`` in row-major (t, h, w) order and ``(T, H, W)``."""
    dy, dx = VIDEO_SHIFT
    h, w = img.shape[0] - dy * (T - 1), img.shape[1] - dx * (T - 1)
    if h < p or w < p:
        raise ValueError(f"--frames: {T} frames shifted by {VIDEO_SHIFT} px leave no whole patch")
    frames = [patch_tokens(img[t * dy: t * dy + h, t * dx: t * dx + w], p) for t in range(T)]
    (H, W) = frames[0][1]
    return np.concatenate([f[0] for f in frames]), (T, H, W)


def measure_video(tokens, grid):
    T, H, W = grid
    perm3, _ = hilbert_permutation(T, H, W)
    perm2, _ = hilbert_permutation(1, H, W)
    per_frame = (np.arange(T)[:, None] * (H * W) + perm2[None, :]).ravel()
    return {"row-major": block_stats(tokens), "2-D per frame": block_stats(tokens[per_frame]),
            "3-D hilbert": block_stats(tokens[perm3])}


COLUMNS = (["mean64", "mean128"] + [f"64>{t}" for t in THETAS] + [f"128>{t}" for t in THETAS])
HEADERS = (["mean sim 64", "mean sim 128"] + [f"64: >{t}" for t in THETAS]
           + [f"128: >{t}" for t in THETAS])


def table(rows):
    """Markdown table; ``rows`` is a list of (name, grid, order, stats)."""
    head = ["input", "tokens (grid)", "order"] + HEADERS
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * len(HEADERS)]
    for name, grid, order, st in rows:
        tokens = f"{int(np.prod(grid))} ({' x '.join(str(g) for g in grid)})" if grid else ""
        lines.append(f"| {name} | {tokens} | {order} | "
                     + " | ".join(f"{st[c]:.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def mean_rows(results, orders):
    """The per-order average over images (each image weighs the same)."""
    return [(f"mean of {len(results)} images", None, order,
             {c: float(np.mean([r[order][c] for r in results])) for c in COLUMNS})
            for order in orders]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patch", type=int, default=8, help="patch side in pixels (default 8)")
    ap.add_argument("--frames", type=int, default=8, help="frames of the video-like case")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    args = ap.parse_args(argv)
    if args.patch < 1 or args.frames < 1:
        ap.error("--patch and --frames must be >= 1")

    images, skipped = load_images(IMAGES)
    if not images:
        sys.exit("no scikit-image sample image could be loaded (pip install scikit-image)")
    rows, per_image = [], []
    for name, img in images.items():
        tokens, grid = patch_tokens(img, args.patch)
        res = measure_image(tokens, grid)
        per_image.append(res)
        rows += [(f"{name} ({img.shape[1]}x{img.shape[0]}, D={tokens.shape[1]})", grid, order, st)
                 for order, st in res.items()]
    rows += mean_rows(per_image, ("row-major", "hilbert"))
    gains = np.array([r["hilbert"]["mean64"] - r["row-major"]["mean64"] for r in per_image])
    summary = (f"Hilbert order raises the mean 64-token block similarity on {int((gains > 0.01).sum())} "
               f"of {len(gains)} images, leaves it within 0.01 on {int((np.abs(gains) <= 0.01).sum())} "
               f"and lowers it on {int((gains < -0.01).sum())}.")

    video_rows = []
    if VIDEO_IMAGE in images:
        tokens, grid = video_tokens(images[VIDEO_IMAGE], args.patch, args.frames)
        for order, st in measure_video(tokens, grid).items():
            video_rows.append((f"{VIDEO_IMAGE} pan, {args.frames} frames", grid, order, st))

    text = table(rows) + ("\n\n" + table(video_rows) if video_rows else "")
    print(text)
    print(summary)
    if skipped:
        print("skipped (not present offline): " + ", ".join(f"{k} ({v})" for k, v in skipped.items()))

    command = "python scripts/permutation_similarity.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    md = [
        "# Block self-similarity of image patch tokens: row-major against Hilbert order",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {datetime.date.today().isoformat()}; numpy {np.__version__}, "
        f"scikit-image {metadata.version('scikit-image')}, CPU only.",
        f"- Images (`skimage.data`, shipped with the package): {', '.join(images)}."
        + (f" Skipped (need a download): {', '.join(skipped)}." if skipped else ""),
        f"- Tokens: {args.patch} x {args.patch} pixel patches, channels flattened (D = "
        f"{args.patch ** 2 * 3} for RGB, {args.patch ** 2} for grey), values in [0, 1], the mean "
        "token subtracted (K smoothing); the grid is the image's whole patches, row-major.",
        "- `sim` is `sparge_cupy.reference.block_self_similarity` (SPEC.md section 1) on blocks of "
        "64 tokens (the K block) and 128 tokens (the Q block). Columns: the mean sim over blocks; "
        "the share of blocks with sim > theta (a self-similar block; the rest become fix blocks). "
        "theta = 0.6 is the package default.",
        "- Orders: `row-major` (as stored), `hilbert` (`sparge_cupy.permute.hilbert_permutation`).",
        "",
        table(rows),
        "",
        summary,
        "",
        "## Video-like input",
        "",
        f"{args.frames} frames cropped from `{VIDEO_IMAGE}`, shifted by {VIDEO_SHIFT[0]} px down "
        f"and {VIDEO_SHIFT[1]} px right per frame (a slow pan). Orders: `row-major` (t, h, w); "
        "`2-D per frame` (frame after frame, each along the 2-D curve); `3-D hilbert` (the 3-D "
        "curve over T x H x W).",
        "",
        table(video_rows) if video_rows else f"(`{VIDEO_IMAGE}` not available)",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
