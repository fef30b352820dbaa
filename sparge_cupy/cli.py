"""The ``sparge-cupy`` command (also ``python -m sparge_cupy``).

``sparge-cupy demo [--out DIR] [--cpu] [--inputs NPZ]``: SpargeAttn on the shipped real input (one
attention layer of all-MiniLM-L6-v2, ``sparge_cupy.data``), or on a layer of your own (``--inputs``:
the npz format of ``sparge-cupy tune``), with the default settings, on the GPU when CuPy finds
one and the GPU path works, on the NumPy reference otherwise. Prints the sparsity of both stages,
the error against dense float64 split into quantization only, sparsity only and both, the runtime,
and the paths of the two figures of ``sparge_cupy.viz`` it writes.

``sparge-cupy info``: version, the configuration, and whether a GPU is found.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .config import CONFIG

DEFAULT_OUT = "sparge_demo_out"
GPU_RUNS = 10  # timed GPU calls after one warm-up (compilation) call; the median is printed


# --------------------------------------------------------------------------------------------
# Backends: the same public functions on CuPy arrays (GPU) or NumPy arrays (reference).


def gpu_status():
    """(available, description): whether CuPy imports and sees a CUDA device."""
    try:
        import cupy
    except ImportError as e:
        return False, f"CuPy not importable ({e})"
    try:
        if not cupy.is_available():
            return False, f"CuPy {cupy.__version__} found no CUDA device"
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return True, f"{name} (CuPy {cupy.__version__}, {cupy.cuda.runtime.getDeviceCount()} device(s))"
    except Exception as e:  # a broken driver or runtime: report it, run on the CPU
        return False, f"CuPy {cupy.__version__} could not query the GPU ({type(e).__name__}: {e})"


class _Backend:
    """Runs the public API on the GPU (CuPy arrays) or the reference (NumPy arrays).

    A GPU call that raises NotImplementedError or ImportError (the GPU path is missing or
    incomplete) is run on the reference instead, and the backend stays there; ``notes`` says so.
    """

    def __init__(self, use_gpu):
        self.use_gpu = use_gpu
        self.notes = []

    @property
    def name(self):
        return "GPU (CuPy)" if self.use_gpu else "NumPy reference (CPU)"

    def call(self, fn_name, *arrays, **kw):
        """``(result as NumPy, seconds)`` of ``sparge_cupy.<fn_name>(*arrays, **kw)``; on the GPU
        the median of ``GPU_RUNS`` calls after a warm-up one (which compiles the kernels)."""
        from . import api
        fn = getattr(api, fn_name)
        if self.use_gpu:
            try:
                return self._gpu_call(fn, arrays, kw)
            except (NotImplementedError, ImportError) as e:
                self.use_gpu = False
                self.notes.append(f"the GPU path raised {type(e).__name__} in {fn_name} ({e}); "
                                  "fell back to the NumPy reference")
        t0 = time.perf_counter()
        res = fn(*arrays, **kw)
        return res, time.perf_counter() - t0

    @staticmethod
    def _gpu_call(fn, arrays, kw):
        import cupy
        dev = tuple(cupy.asarray(a) for a in arrays)
        res = fn(*dev, **kw)
        cupy.cuda.Device().synchronize()
        times = []
        for _ in range(GPU_RUNS):
            t0 = time.perf_counter()
            res = fn(*dev, **kw)
            cupy.cuda.Device().synchronize()
            times.append(time.perf_counter() - t0)
        return _to_host(res), float(np.median(times))


def _to_host(res):
    if isinstance(res, tuple):
        return tuple(_to_host(r) for r in res)
    if isinstance(res, dict):
        return {k: _to_host(v) for k, v in res.items()}
    return res.get() if hasattr(res, "get") and not isinstance(res, np.ndarray) else res


# --------------------------------------------------------------------------------------------
# demo


def load_demo_inputs(path=None, *, is_causal=None, scale=None):
    """``(q, k, v, is_causal, scale, description, notes)`` of the demo: the shipped MiniLM layer
    (non-causal, the model's scale) or the npz at ``path`` (arrays q, k, v and optionally 0-d
    is_causal, scale, layout, as ``sparge-cupy tune`` reads them), as HND arrays. ``is_causal``
    and ``scale`` given here override the file's; float64 arrays are cast to float32 (the API
    takes fp16, bf16 and fp32)."""
    if path is None:
        from .data import load_default_qkv
        data = load_default_qkv()
        q, k, v = data["q"], data["k"], data["v"]
        file_causal, file_scale = False, data["scale"]     # an encoder (bidirectional) layer
        what, notes = _input_line(data), []
    else:
        from .tune import load_npz_layer
        q, k, v, file_causal, file_scale, layout, notes = load_npz_layer(path)
        what = (f"{Path(path).name}, q {list(q.shape)} k {list(k.shape)} {q.dtype} HND"
                + (" (from NHD)" if layout == "NHD" else ""))
    is_causal = bool(file_causal) if is_causal is None else is_causal
    scale = file_scale if scale is None else scale
    if scale is None and getattr(q, "ndim", 0) == 4:
        scale = q.shape[-1] ** -0.5
    return q, k, v, is_causal, scale, what, notes


def run_demo(out_dir=DEFAULT_OUT, *, cpu=False, simthreshd1=CONFIG.simthreshd1, cdfthreshd=None,
             topk=None, pvthreshd=None, figures=True, inputs=None, is_causal=None, scale=None):
    """Run the demo and return its numbers as a dict (``format_demo`` prints them).

    ``inputs``: an npz path (see :func:`load_demo_inputs`) instead of the shipped layer;
    ``is_causal`` and ``scale`` override its own.

    Keys: ``input`` (a description), ``shape``, ``backend``, ``notes`` (list of str),
    ``settings``, ``stage1_sparsity``, ``stage2_sparsity``, ``total_sparsity``, ``kept_blocks``,
    ``valid_blocks``, ``recall``, ``errors`` (``quantization``, ``sparsity``, ``both``: each the
    dict of ``reference.error_metrics``), ``runtime_s``, ``runtime_what``, ``figures`` (paths).
    """
    from . import reference as R

    q, k, v, is_causal, scale, what, input_notes = load_demo_inputs(inputs, is_causal=is_causal,
                                                                    scale=scale)
    if cdfthreshd is None and topk is None:
        cdfthreshd = CONFIG.cdfthreshd
    select = {"cdfthreshd": cdfthreshd} if topk is None else {"topk": topk}
    quant = {"qk": "int8", "pv": "fp8", "rebalance": True}   # the API's defaults

    notes = list(input_notes)
    use_gpu = False
    if cpu:
        notes.append("--cpu given: running the NumPy reference")
    else:
        use_gpu, gpu_text = gpu_status()
        notes.append(f"GPU: {gpu_text}" if use_gpu else f"no GPU ({gpu_text}): running the NumPy reference")
    backend = _Backend(use_gpu)

    # (c) both: prediction + quantized sparse attention, as a user calls it.
    (out, stats), seconds = backend.call("sparge_attn", q, k, v, is_causal=is_causal, scale=scale,
                                         simthreshd1=simthreshd1, pvthreshd=pvthreshd,
                                         return_stats=True, **select, **quant)
    backend_name = backend.name
    block_map, _ = backend.call("predict_block_map", q, k, is_causal=is_causal, scale=scale,
                                simthreshd1=simthreshd1, **select)
    # (a) quantization only: every block kept and Stage 2 off, the same quantization.
    every = np.ones_like(block_map)
    out_quant, _ = backend.call("block_sparse_attn", q, k, v, every, is_causal=is_causal,
                                scale=scale, pvthreshd=None, **quant)
    notes += backend.notes
    if backend.name != backend_name:
        notes.append("numbers below mix backends: see the line above")

    ref = R.dense_attention(q, k, v, is_causal=is_causal, scale=scale)
    # (b) sparsity only (both stages): the predicted map and the Stage 2 filter on the reference
    # with rounding off ("fp32" modes).
    Hq = q.shape[1]
    lam = np.full((Hq,), np.inf if pvthreshd is None else pvthreshd, dtype=np.float32)
    out_sparse = R.block_sparse_attention(q, k, v, block_map, is_causal=is_causal, scale=scale,
                                          pvthreshd=lam, qk="fp32", pv="fp32")
    mass = R.block_attention_mass(q, k, is_causal=is_causal, scale=scale)
    fix_share = _fix_share(q, k, is_causal=is_causal, scale=scale, simthreshd1=simthreshd1)

    figures_written = []
    if figures:
        from .viz.block_maps import plot_block_maps
        from .viz.error_sparsity import DEFAULT_THETAS, plot_error_sparsity
        out_dir = Path(out_dir)
        title = what
        figures_written.append(plot_block_maps(
            q, k, is_causal=is_causal, scale=scale, simthreshd1=simthreshd1, **select,
            title=f"Stage 1 on {title}", path=out_dir / "block_maps.png"))
        thetas = sorted(set(DEFAULT_THETAS) | set(np.atleast_1d(simthreshd1).tolist()))
        figures_written.append(plot_error_sparsity(
            q, k, v, is_causal=is_causal, scale=scale, thetas=thetas,
            title=f"Error vs sparsity on {title}", path=out_dir / "error_sparsity.png"))

    return {
        "input": what + f", {'causal' if is_causal else 'non-causal'}, scale {scale:.4g}",
        "default_input": inputs is None,
        "shape": tuple(int(n) for n in q.shape),
        "backend": backend_name,
        "notes": notes,
        "settings": {"simthreshd1": simthreshd1, **select, "pvthreshd": pvthreshd, **quant,
                     "blocks": f"{CONFIG.block_q}x{CONFIG.block_k}"},
        "stage1_sparsity": float(stats["stage1_sparsity"]),
        "stage2_sparsity": float(stats["stage2_sparsity"]),
        "total_sparsity": float(stats["total_sparsity"]),
        "kept_blocks": int(np.sum(stats["kept_blocks"])),
        "valid_blocks": int(np.sum(stats["valid_blocks"])),
        "fix_share": fix_share,
        "recall": float((mass * block_map).sum() / mass.sum()),
        "errors": {"quantization": R.error_metrics(out_quant, ref),
                   "sparsity": R.error_metrics(out_sparse, ref),
                   "both": R.error_metrics(out, ref)},
        "runtime_s": seconds,
        "runtime_what": ("prediction + attention, median of %d calls after a warm-up" % GPU_RUNS
                         if backend_name.startswith("GPU") else "prediction + attention, one call"),
        "figures": [str(p) for p in figures_written],
    }


def _fix_share(q, k, *, is_causal, scale, simthreshd1):
    """Share of the valid blocks that Stage 1 keeps whole as fix blocks (from the reference)."""
    from . import reference as R
    Hq = q.shape[1]
    theta = np.broadcast_to(np.asarray(simthreshd1, dtype=np.float32), (Hq,))
    _, det = R.predict_block_map(q, k, is_causal=is_causal, scale=scale, simthreshd1=theta,
                                 cdfthreshd=np.ones((Hq,), np.float32), return_details=True)
    fix = (det["q_fix"][..., :, None] | det["k_fix"][..., None, :]) & det["valid"]
    return float(fix.sum() / (det["valid"].sum() * q.shape[0] * Hq))


def _input_line(data):
    q = data["q"]
    return (f"{data.get('model', 'default input')} layer {data.get('layer', '?')}, "
            f"q/k/v {list(q.shape)} {q.dtype} HND")


def _fmt_setting(value):
    if value is None:
        return "off"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(f"{float(x):g}" for x in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_demo(res):
    """The demo's printed report."""
    s = res["settings"]
    sel = (f"cdfthreshd {_fmt_setting(s['cdfthreshd'])}" if "cdfthreshd" in s
           else f"topk {_fmt_setting(s['topk'])}")
    err = res["errors"]
    lines = [
        f"sparge-cupy {__version__} demo",
        f"input     {res['input']}",
        f"backend   {res['backend']}",
        *[f"          {n}" for n in res["notes"]],
        f"settings  simthreshd1 {_fmt_setting(s['simthreshd1'])}, {sel}, "
        f"pvthreshd {_fmt_setting(s['pvthreshd'])}, qk {s['qk']}, pv {s['pv']}, "
        f"rebalance {s['rebalance']}, blocks {s['blocks']}",
        "",
        f"sparsity  stage 1  {res['stage1_sparsity']:7.1%}   "
        f"({res['kept_blocks']} of {res['valid_blocks']} valid blocks kept)",
        f"          stage 2  {res['stage2_sparsity']:7.1%}   "
        + ("(filter off: pvthreshd None)" if s["pvthreshd"] is None else "(of visited P V groups)"),
        f"          total    {res['total_sparsity']:7.1%}   (QK^T and P V block products skipped)",
        f"fix       {res['fix_share']:.1%} of valid blocks kept whole as fix blocks "
        "(Q or K block not self-similar)",
        f"recall    {res['recall']:.1%} of the true attention mass lies in the kept blocks",
        *(([("note      no block skipped at these thresholds: at 512 tokens few blocks are "
              "self-similar above theta; try --tuned") if res.get("default_input", True) else
            ("note      no block skipped at these thresholds: lower --simthreshd1 / --cdfthreshd, "
             "or tune them per head with sparge-cupy tune")]) if res["stage1_sparsity"] == 0 else []),
        "",
        f"{'error vs dense float64':<26}{'rel L1':>9}  {'cosine':>8}  {'RMSE':>9}",
    ]
    rows = (("(a) quantization only", "quantization",
             f"all blocks, Stage 2 off, {s['qk']} QK / {s['pv']} PV"),
            ("(b) sparsity only", "sparsity", "both stages, fp32 reference (no rounding)"),
            ("(c) both", "both", "sparge_attn as called"))
    for label, key, what in rows:
        e = err[key]
        lines.append(f"  {label:<24}{e['rel_l1']:9.3e}  {e['cosine']:.6f}  {e['rmse']:9.3e}   {what}")
    lines += ["",
              f"runtime   {res['runtime_s'] * 1e3:.1f} ms  ({res['runtime_what']}, {res['backend']})"]
    if res["figures"]:
        lines.append("figures   " + "\n          ".join(res["figures"]))
    return "\n".join(lines)


TUNED_FILE, TUNED_LAYER = "minilm_l6_tuning.json", "minilm_l6.layer3"


def tuned_thresholds():
    """Per-head thresholds tuned for the default input (relative L1 <= 0.05 with Stage 1, <= 0.06
    with Stage 2), made by ``sparge-cupy tune`` and shipped in ``sparge_cupy.data``."""
    from importlib import resources

    from .tune import load_tuning
    with resources.as_file(resources.files("sparge_cupy.data") / TUNED_FILE) as path:
        kw = load_tuning(path)[TUNED_LAYER].kwargs()
    return {name: kw[name] for name in ("simthreshd1", "cdfthreshd", "pvthreshd")}


def _cmd_demo(args, parser):
    thresholds = dict(simthreshd1=args.simthreshd1, cdfthreshd=args.cdfthreshd, topk=args.topk,
                      pvthreshd=args.pvthreshd)
    if args.tuned:
        if args.cdfthreshd is not None or args.topk is not None or args.pvthreshd is not None \
                or args.simthreshd1 != CONFIG.simthreshd1:
            parser.error("--tuned sets the thresholds: give no --simthreshd1/--cdfthreshd/--topk/--pvthreshd")
        if args.inputs is not None:
            parser.error("--tuned: the shipped thresholds are tuned for the shipped input, not for "
                         "--inputs (tune yours with sparge-cupy tune)")
        thresholds = dict(tuned_thresholds(), topk=None)
    causal = {"yes": True, "no": False}.get(args.causal)
    try:
        res = run_demo(args.out, cpu=args.cpu, figures=not args.no_figures, inputs=args.inputs,
                       is_causal=causal, scale=args.scale, **thresholds)
    except (ValueError, TypeError, OSError) as e:   # bad input or thresholds: the message names it
        parser.error(str(e))
    print(format_demo(res))
    return 0


def _cmd_tune(args, parser):
    from . import tune
    try:
        return tune.run(args)
    except (ValueError, TypeError, OSError) as e:   # bad inputs or options: the message names them
        parser.error(str(e))


# --------------------------------------------------------------------------------------------
# info


def _cmd_info(args, parser):
    import sparge_cupy
    print(f"sparge-cupy {__version__}  ({Path(sparge_cupy.__file__).parent})")
    print("config (sparge_cupy.CONFIG):")
    for field in dataclasses.fields(CONFIG):
        print(f"  {field.name:<16} {getattr(CONFIG, field.name)!r}")
    ok, text = gpu_status()
    print(f"GPU       {'found: ' if ok else 'none: '}{text}")
    has_gpu_path = importlib.util.find_spec("sparge_cupy._gpu") is not None
    print(f"GPU path  {'present (sparge_cupy._gpu)' if has_gpu_path else 'missing: CuPy arrays are refused'}")
    print(f"numpy     {np.__version__}")
    try:
        from .data import load_default_qkv
        data = load_default_qkv()
        print(f"data      {_input_line(data)}")
    except (OSError, KeyError) as e:
        print(f"data      default input not readable ({type(e).__name__}: {e})")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="sparge-cupy",
        description="SpargeAttn (training-free sparse + quantized attention) on CuPy, "
                    "with an exact NumPy reference.")
    parser.add_argument("--version", action="version", version=f"sparge-cupy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,tune,eval,info}")

    demo = sub.add_parser("demo", help="run SpargeAttn on the shipped real input (or --inputs), "
                                       "print sparsity and error, write figures")
    demo.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                      help="directory for the figures (default ./%(default)s)")
    demo.add_argument("--cpu", action="store_true", help="use the NumPy reference even if a GPU is found")
    demo.add_argument("--inputs", default=None, metavar="NPZ",
                      help="a layer of your own instead of the shipped one: an npz with arrays q, k, v "
                           "([B, H, L, D]) and optionally 0-d is_causal, scale, layout ('HND' or 'NHD')")
    demo.add_argument("--causal", choices=("auto", "yes", "no"), default="auto",
                      help="causal mask (auto: the file's is_causal, else no)")
    demo.add_argument("--scale", type=float, default=None,
                      help="softmax scale (default: the file's, else D^-0.5)")
    demo.add_argument("--no-figures", action="store_true",
                      help="print the numbers only (the figures sweep theta on the reference: "
                           "slow at many thousand tokens)")
    demo.add_argument("--simthreshd1", type=float, default=CONFIG.simthreshd1, metavar="THETA",
                      help="self-similarity threshold theta (default %(default)s)")
    group = demo.add_mutually_exclusive_group()
    group.add_argument("--cdfthreshd", type=float, default=None, metavar="TAU",
                       help=f"TopCdf threshold tau (default {CONFIG.cdfthreshd})")
    group.add_argument("--topk", type=float, default=None, metavar="FRACTION",
                       help="keep this fraction of each row's blocks instead of TopCdf")
    demo.add_argument("--pvthreshd", type=float, default=None, metavar="LAMBDA",
                      help="Stage 2 filter threshold lambda in log2 units (default: filter off)")
    demo.add_argument("--tuned", action="store_true",
                      help="per-head thresholds tuned for this input (sparge_cupy/data/"
                           f"{TUNED_FILE}: relative L1 <= 0.05 with Stage 1, <= 0.06 with Stage 2)")
    demo.set_defaults(handler=_cmd_demo)

    from . import tune
    tune_p = sub.add_parser("tune", help="tune per-head thresholds of one layer under an error "
                                         "bound (SPEC.md section 5); writes a JSON file")
    tune.add_arguments(tune_p)
    tune_p.set_defaults(handler=_cmd_tune)

    from . import evaluate
    eval_p = sub.add_parser("eval", help="measure sparsity and error on Gemma 3 270M's real attention "
                                         "(presets, tuned, oracle, quantization floors, perplexity); "
                                         "writes a CSV, a report and figures")
    evaluate.add_arguments(eval_p)
    eval_p.set_defaults(handler=lambda args, parser: evaluate.run(args))

    info = sub.add_parser("info", help="print the version, the configuration and the GPU found")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, parser)


if __name__ == "__main__":
    sys.exit(main())
