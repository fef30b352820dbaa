"""The ``sparge-cupy`` command and the figures: they run on a CPU-only machine, print finite numbers
in range, and write non-empty PNGs.

``demo`` runs twice: in-process through ``sparge_cupy.cli.main`` and as ``python -m sparge_cupy demo``
in a subprocess (the way a newcomer runs it); each ``viz/`` script runs standalone as a file.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sparge_cupy
import sparge_cupy.viz
from sparge_cupy import CONFIG
from sparge_cupy.cli import main
from sparge_cupy.viz.block_maps import (DROPPED, INVALID, SELECTED, block_map_summary,
                                        plot_block_maps)
from sparge_cupy.viz.error_sparsity import error_sparsity_sweep, plot_error_sparsity

from conftest import assert_equal, make_qkv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|nan|inf)"


def repo_env():
    """Environment for subprocesses: the package importable even if not installed."""
    import os
    env = dict(os.environ)
    root = str(Path(sparge_cupy.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MPLBACKEND"] = "Agg"
    return env


def assert_png(path):
    path = Path(path)
    assert path.is_file(), f"figure not written: {path}"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path}: not a PNG (starts {data[:8]!r})"
    assert len(data) > 10_000, f"{path}: only {len(data)} bytes, expected a drawn figure"


def parse_demo(text):
    """The numbers of the demo's report, by name; fails naming the line that is missing."""
    def grab(pattern, name):
        m = re.search(pattern, text, flags=re.MULTILINE)
        assert m, f"demo output has no {name} line (pattern {pattern!r}):\n{text}"
        return m

    out = {}
    for stage in ("stage 1", "stage 2", "total"):
        out[stage] = float(grab(rf"{stage}\s+{NUM}%", stage).group(1)) / 100
    out["fix"] = float(grab(rf"^fix\s+{NUM}%", "fix").group(1)) / 100
    out["recall"] = float(grab(rf"^recall\s+{NUM}%", "recall").group(1)) / 100
    for label in ("quantization only", "sparsity only", "both"):
        m = grab(rf"\) {label}\s+{NUM}\s+{NUM}\s+{NUM}", label)
        out[label] = {"rel_l1": float(m.group(1)), "cosine": float(m.group(2)),
                      "rmse": float(m.group(3))}
    out["runtime_ms"] = float(grab(rf"^runtime\s+{NUM} ms", "runtime").group(1))
    m = grab(r"^figures\s+(\S+)\n\s+(\S+)", "figures")
    out["figures"] = [m.group(1), m.group(2)]
    out["backend"] = grab(r"^backend\s+(.+)$", "backend").group(1)
    return out


def check_demo_numbers(nums):
    for key in ("stage 1", "stage 2", "total", "fix", "recall"):
        assert 0.0 <= nums[key] <= 1.0, f"{key}: {nums[key]} outside [0, 1]"
    for label in ("quantization only", "sparsity only", "both"):
        e = nums[label]
        assert all(math.isfinite(x) for x in e.values()), f"{label}: non-finite error {e}"
        assert 0.0 <= e["rel_l1"] < 0.5, f"{label}: relative L1 {e['rel_l1']} out of range"
        assert 0.9 < e["cosine"] <= 1.0 + 1e-9, f"{label}: cosine {e['cosine']} out of range"
        assert e["rmse"] >= 0.0
    # INT8 QK^T with channel rebalancing and FP8 P V: SPEC.md section 3 expects ~0.015
    assert nums["quantization only"]["rel_l1"] < 0.05
    if nums["stage 1"] == 0.0 and nums["stage 2"] == 0.0:
        # every block kept, no rounding: the fp32 mirror is dense attention up to float32 rounding
        assert nums["sparsity only"]["rel_l1"] < 1e-5
        assert nums["recall"] == pytest.approx(1.0)
    assert math.isfinite(nums["runtime_ms"]) and nums["runtime_ms"] > 0


@pytest.fixture(scope="module")
def demo_in_process(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo") / "figs"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--out", str(out_dir)])
    return rc, buf.getvalue(), out_dir


def test_demo_in_process(demo_in_process):
    rc, text, out_dir = demo_in_process
    assert rc == 0
    nums = parse_demo(text)
    check_demo_numbers(nums)
    assert [Path(p).name for p in nums["figures"]] == ["block_maps.png", "error_sparsity.png"]
    for p in nums["figures"]:
        assert Path(p).parent == out_dir
        assert_png(p)


def test_demo_subprocess_default_out_dir(tmp_path):
    """``python -m sparge_cupy demo`` from a fresh directory writes ./sparge_demo_out/."""
    proc = subprocess.run([sys.executable, "-m", "sparge_cupy", "demo"], cwd=tmp_path,
                          env=repo_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    nums = parse_demo(proc.stdout)
    check_demo_numbers(nums)
    for p in nums["figures"]:
        assert Path(p).parts[0] == "sparge_demo_out"
        assert_png(tmp_path / p)


def test_demo_agrees_with_run_demo_on_cpu(tmp_path):
    """--cpu takes the reference, and the printed numbers are those of run_demo."""
    from sparge_cupy.cli import format_demo, run_demo
    res = run_demo(tmp_path, cpu=True, simthreshd1=0.3, cdfthreshd=0.9, figures=False)
    assert res["backend"].startswith("NumPy reference")
    assert res["figures"] == []
    nums = parse_demo(format_demo(res) + "\nfigures   a\n          b")
    check_demo_numbers(nums)
    # theta 0.3 and tau 0.9 leave blocks out on the default input: Stage 1 is sparse, and
    # dropping blocks is what (b) measures, so it is no longer at float32 rounding
    assert res["stage1_sparsity"] > 0.1
    assert res["errors"]["sparsity"]["rel_l1"] > 1e-3
    assert res["kept_blocks"] == round((1 - res["stage1_sparsity"]) * res["valid_blocks"])
    assert res["recall"] < 1.0


def test_demo_rejects_bad_thresholds(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--cpu", "--cdfthreshd", "1.5"])
    assert exc.value.code == 2
    assert "cdfthreshd" in capsys.readouterr().err



def test_demo_on_an_npz_of_your_own(tmp_path, capsys):
    """--inputs: an NHD, causal GQA layer from a file; the printed numbers are those of the API
    called directly on the same (transposed) arrays, and the file's is_causal is used."""
    from sparge_cupy import reference as R
    q, k, v = make_qkv(1, 4, 2, 300, 300, 64, layout="NHD", seed=7)
    path = tmp_path / "layer.npz"
    np.savez(path, q=q, k=k, v=v, is_causal=np.array(True), layout=np.array("NHD"))
    assert main(["demo", "--inputs", str(path), "--no-figures", "--cpu", "--simthreshd1", "0.3",
                 "--cdfthreshd", "0.9"]) == 0
    text = capsys.readouterr().out
    assert "layer.npz, q [1, 4, 300, 64] k [1, 2, 300, 64] float32 HND (from NHD), causal, scale 0.125" in text
    nums = parse_demo(text + "\nfigures   a\n          b")
    check_demo_numbers(nums)
    qh, kh, vh = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
    out, stats = sparge_cupy.sparge_attn(qh, kh, vh, is_causal=True, simthreshd1=0.3, cdfthreshd=0.9,
                                         return_stats=True)
    want = R.error_metrics(out, R.dense_attention(qh, kh, vh, is_causal=True))
    assert nums["both"]["rel_l1"] == pytest.approx(want["rel_l1"], rel=1e-3), (nums["both"], want)
    assert nums["stage 1"] == pytest.approx(float(stats["stage1_sparsity"]), abs=1e-3)
    assert nums["stage 1"] > 0          # theta 0.3, tau 0.9 drop blocks on this input


def test_demo_inputs_casts_float64_and_overrides(tmp_path):
    from sparge_cupy.cli import run_demo
    q, k, v = make_qkv(1, 2, 2, 200, 200, 80, dtype=np.float64, seed=8)
    path = tmp_path / "f64.npz"
    np.savez(path, q=q, k=k, v=v, is_causal=np.array(True), scale=np.array(0.05))
    res = run_demo(tmp_path, cpu=True, figures=False, inputs=path, is_causal=False, scale=0.2)
    assert "non-causal, scale 0.2" in res["input"] and "float32" in res["input"], res["input"]
    assert any("float64 arrays cast to float32" in n for n in res["notes"]), res["notes"]
    res_file = run_demo(tmp_path, cpu=True, figures=False, inputs=path)
    assert "causal, scale 0.05" in res_file["input"] and "non-causal" not in res_file["input"]


QKV = {n: np.zeros((1, 2, 8, 16), np.float32) for n in "qkv"}


def test_input_file_entries_one_element_and_bf16(tmp_path):
    """--inputs files: one-element is_causal / scale / layout entries of any shape, 0 / 1 for
    is_causal, bytes for layout, and bfloat16 arrays (numpy.savez stores ml_dtypes' bfloat16 as
    2-byte void) read back as bfloat16."""
    import ml_dtypes
    from sparge_cupy.tune import load_npz_input
    q, k, v = make_qkv(1, 2, 2, 130, 130, 64, seed=3)
    path = tmp_path / "bf16.npz"
    np.savez(path, q=q.astype(ml_dtypes.bfloat16), k=k, v=v, is_causal=np.array([1]),
             scale=np.array([[0.1]]), layout=np.array(b"HND"))
    q2, k2, v2, causal, scale, layout = load_npz_input(path)
    assert q2.dtype == ml_dtypes.bfloat16 and k2.dtype == np.float32
    assert_equal(q2.astype(np.float32), q.astype(ml_dtypes.bfloat16).astype(np.float32), what="q")
    assert (causal, scale, layout) == (True, 0.1, "HND")


@pytest.mark.parametrize("arrays, message", [
    (dict(q=np.zeros((1, 2, 8, 16), np.float32), k=np.zeros((1, 2, 8, 16), np.float32)),
     r"expected arrays q, k, v; missing \['v'\]"),
    (dict(q=np.zeros((2, 8, 16), np.float32), k=np.zeros((2, 8, 16), np.float32),
          v=np.zeros((2, 8, 16), np.float32)), r"q: expected 4 dimensions"),
    (dict(q=np.zeros((1, 2, 8, 16), np.int32), k=np.zeros((1, 2, 8, 16), np.int32),
          v=np.zeros((1, 2, 8, 16), np.int32)), r"q: expected dtype one of .* got int32"),
    ("not an npz", r"not readable as an \.npz of arrays q, k, v"),
    (None, r"No such file"),
    (dict(QKV, is_causal=np.array("False")), r"is_causal: expected True / False \(or 0 / 1\), got 'False'"),
    (dict(QKV, is_causal=np.array(2)), r"is_causal: expected True / False \(or 0 / 1\), got 2"),
    (dict(QKV, scale=np.array([0.1, 0.2])), r"scale: expected one value, a real number; got an array of shape \(2,\)"),
    (dict(QKV, scale=np.array("0.1")), r"scale: expected a real number, got '0.1'"),
    (dict(QKV, layout=np.array(1)), r"layout: expected a string, got 1"),
])
def test_demo_and_tune_refuse_bad_input_files(tmp_path, capsys, arrays, message):
    path = tmp_path / "bad.npz"
    if isinstance(arrays, dict):
        np.savez(path, **arrays)
    elif arrays is not None:
        path.write_text(arrays)
    for argv in (["demo", "--inputs", str(path), "--no-figures"],
                 ["tune", "--inputs", str(path), "--layer", "x", "--out", str(tmp_path / "t.json")]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
    with pytest.raises(SystemExit):
        main(["demo", "--inputs", str(path), "--tuned"])
    assert "--tuned: the shipped thresholds are tuned for the shipped input" in capsys.readouterr().err

def test_info(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"sparge-cupy {sparge_cupy.__version__}" in text
    assert f"block_q          {CONFIG.block_q}" in text
    assert re.search(r"^GPU\s+(found|none)", text, flags=re.MULTILINE)


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


@pytest.mark.parametrize("script, name", [("block_maps.py", "block_maps"),
                                          ("error_sparsity.py", "error_sparsity")])
def test_viz_script_runs_standalone(tmp_path, script, name):
    """STYLE.md: every viz/ script runs standalone on CPU, writes one PNG, prints its path."""
    path = Path(sparge_cupy.viz.__file__).parent / script
    out = tmp_path / f"{name}.png"
    proc = subprocess.run([sys.executable, str(path), "--out", str(out)], cwd=tmp_path,
                          env=repo_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]   # one PNG, nothing else


def test_block_map_summary_properties():
    """Categories partition the map; tau = 1 keeps every valid block (sparsity 0, recall 1)."""
    q, k, _ = make_qkv(Hq=4, Hkv=2, Lq=300, Lk=333, D=64, seed=3)
    s = block_map_summary(q, k, is_causal=True, simthreshd1=0.5, cdfthreshd=0.8)
    cat, bm, valid = s["category"], s["block_map"], s["valid"]
    assert np.array_equal(cat != DROPPED, bm | ~valid)          # kept or masked, never both
    assert np.all(cat[..., ~valid] == INVALID) and not bm[..., ~valid].any()
    assert np.all(bm[cat == SELECTED])
    assert np.all((s["recall"] >= 0) & (s["recall"] <= 1 + 1e-12))
    full = block_map_summary(q, k, is_causal=True, simthreshd1=0.5, cdfthreshd=1.0)
    assert full["overall_sparsity"] == 0.0
    assert full["overall_recall"] == pytest.approx(1.0)


def test_plot_block_maps_ragged_causal_gqa(tmp_path):
    q, k, _ = make_qkv(Hq=4, Hkv=2, Lq=200, Lk=333, D=64, layout="NHD", seed=4)
    path = plot_block_maps(q, k, is_causal=True, layout="NHD", simthreshd1=[0.2, 0.4, 0.6, 0.8],
                           topk=0.5, heads=[0, 3], path=tmp_path / "sub" / "maps.png")
    assert path == tmp_path / "sub" / "maps.png"
    assert_png(path)
    with pytest.raises(ValueError, match="heads"):
        plot_block_maps(q, k, layout="NHD", heads=[4], path=tmp_path / "x.png")


def test_error_sparsity_sweep_properties(tmp_path):
    q, k, v = make_qkv(Hq=2, Lq=300, D=64, seed=5)
    sweep = error_sparsity_sweep(q, k, v, is_causal=True, thetas=(0.0, 0.5), taus=(0.5, 0.9, 0.99),
                                 topks=(0.3,))
    pts = sweep["points"]
    assert len(pts) == 2 * 3 + 1
    for p in pts:
        assert 0.0 <= p["sparsity"] <= 1.0 and 0.0 <= p["recall"] <= 1.0 + 1e-12
        assert math.isfinite(p["rel_l1"]) and math.isfinite(p["rel_l1_fp32"])
    assert sweep["floor_fp32"] < 1e-5        # all blocks, no rounding: dense up to float32
    assert 0.0 < sweep["floor"] < 0.05       # quantization alone
    for theta in (0.0, 0.5):                 # raising tau never drops blocks (SPEC.md section 1)
        s = [p["sparsity"] for p in pts if p["curve"] == f"theta={theta:g}"]
        assert s == sorted(s, reverse=True), f"theta={theta}: sparsity not monotone in tau: {s}"
    with pytest.raises(ValueError, match="taus"):
        error_sparsity_sweep(q, k, v, taus=(0.5, 1.0))
    assert_png(plot_error_sparsity(q, k, v, is_causal=True, taus=(0.5, 0.9), topks=(),
                                   path=tmp_path / "es.png"))


@pytest.mark.gpu
def test_demo_on_gpu_or_clear_fallback(tmp_path, capsys):
    cupy = pytest.importorskip("cupy")
    if not cupy.is_available():
        pytest.skip("no CUDA GPU")
    assert main(["demo", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    nums = parse_demo(text)
    check_demo_numbers(nums)
    assert nums["backend"] == "GPU (CuPy)" or "fell back to the NumPy reference" in text


def test_demo_tuned_meets_the_tuning_bound(tmp_path):
    """--tuned runs the shipped per-head thresholds: the overall relative L1 is a weighted mean of
    the per-head ones, each tuned to <= 0.06 with both stages, so it cannot exceed 0.06."""
    from sparge_cupy.cli import run_demo, tuned_thresholds
    res = run_demo(tmp_path, cpu=True, figures=False, **tuned_thresholds())
    assert res["stage1_sparsity"] > 0.1 and res["total_sparsity"] > res["stage1_sparsity"]
    assert res["errors"]["both"]["rel_l1"] <= 0.06


def test_tune_refuses_bad_outputs_and_options_before_tuning(tmp_path, capsys):
    """Mistakes in --out / --hf-settings / --thetas / --min-sparsity / --device are reported as
    usage errors naming the option, before the tuning runs (nothing written)."""
    from sparge_cupy.tune import _gpu_available
    q, k, v = make_qkv(1, 2, 2, 200, 200, 64, seed=3)
    inp = tmp_path / "in.npz"
    np.savez(inp, q=q, k=k, v=v)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"schema": "other"}')
    base = ["tune", "--inputs", str(inp), "--layer", "5", "--quiet"]
    cases = [
        (["--out", str(tmp_path / "t.json"), "--hf-settings", str(tmp_path / "t.json")],
         "--hf-settings: expected a file other than --out"),
        (["--out", str(tmp_path)], "--out: expected a file, got the folder"),
        (["--out", str(corrupt)], r"corrupt\.json: not readable as a sparge-cupy tuning file \(JSON"),
        (["--out", str(foreign)], r"foreign\.json: not a sparge-cupy tuning file"),
        (["--out", str(tmp_path / "t.json"), "--thetas=abc"], "--thetas: expected comma-separated numbers"),
        (["--out", str(tmp_path / "t.json"), "--min-sparsity", "nan"], "min_sparsity: expected a number in"),
        (["--out", str(tmp_path / "t.json"), "--hf-settings", str(tmp_path / "h.json"), "--qk", "fp32"],
         "--qk: 'fp32' exists in the reference only"),
    ]
    if not _gpu_available():
        cases.append((["--out", str(tmp_path / "t.json"), "--device", "gpu"], "--device gpu, but CuPy finds no GPU"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2, extra
        assert re.search(message, capsys.readouterr().err), (extra, message)
    with pytest.raises(SystemExit):
        main(["tune", "--inputs", str(inp), "--layer", "attn_foo", "--out", str(tmp_path / "t.json"),
              "--hf-settings", str(tmp_path / "h.json")])
    assert "--layer: --hf-settings keys layers by index" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "h.json").exists()
