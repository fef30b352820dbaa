"""viz/bench.py on a small synthetic CSV of bench/run_bench.py: the figure is written, rows that
failed their gate or raised are left out of every drawn series, and the series are the ok rows."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from sparge_cupy.viz.bench import bench_series, plot_bench, read_bench_csvs

from test_cli_viz import assert_png, repo_env

FIELDS = ["card", "method", "B", "H", "Hkv", "L", "D", "causal", "density", "dtype", "status",
          "rel_l1", "ms", "tops", "predict_ms", "extra_mb"]
CARD = "Test GPU 80GB"


def row(method, L, D, causal, density, tops, status="ok"):
    r = dict(card=CARD, method=method, B=2, H=4, Hkv=4, L=L, D=D, causal=causal, density=density,
             dtype="float16", status=status, rel_l1=0.01 if status != "ERROR" else "")
    if tops is not None:      # a FAIL row with a number: its status alone must leave it out
        r.update(ms=1000.0 / tops, tops=tops)
    return r


def write_csv(path, rows, fields=FIELDS):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def bench_csv(tmp_path):
    rows = []
    for causal in (False, True):
        for L in (1000, 4096, 8192):          # 1000: a length that is not a power of two
            rows.append(row("sdpa_cudnn", L, 128, causal, 1.0, 500.0 + L / 100))
            rows.append(row("sparge_int8_fp8", L, 128, causal, 1.0, 450.0 + L / 100))
        for d in (0.5, 0.2512, 0.1):
            rows.append(row("sparge_int8_fp8", 8192, 128, causal, d, 450.0 / d))
    rows.append(row("sparge_int8_fp8", 8192, 64, False, 1.0, 300.0))
    rows.append(row("sparge_int8_fp8", 8192, 64, False, 0.5, 560.0))
    # a failed gate and an error: same panels, must not be drawn
    rows.append(row("broken_fail", 8192, 128, False, 1.0, 9999.0, status="FAIL"))
    rows.append(row("sparge_int8_fp8", 8192, 128, False, 0.25, 9999.0, status="FAIL"))
    rows.append(row("flex_attention", 4096, 128, True, 1.0, None,
                    status="ERROR RuntimeError: flex_attention setup failed"))
    return write_csv(tmp_path / "bench_test_2026-01-02_Test_GPU.csv", rows)


def test_figure_written_failed_rows_left_out(bench_csv, tmp_path, capsys):
    drawn = plot_bench([bench_csv], path=tmp_path / "out" / "bench.png")
    assert_png(drawn["path"])
    series = drawn["series"]
    assert {s["method"] for s in series} == {"sdpa_cudnn", "sparge_int8_fp8"}, series
    assert all(9999.0 not in s["y"] for s in series), "a FAIL row's TOPS was drawn"
    assert {(r["method"], r["status"].split()[0]) for r in drawn["left_out"]} == {
        ("broken_fail", "FAIL"), ("sparge_int8_fp8", "FAIL"), ("flex_attention", "ERROR")}
    printed = capsys.readouterr().out
    assert printed.count("left out:") == 3 and "flex_attention setup failed" in printed

    # panels: (D, causal) with D=128 first; L panel at density 1, density panel at the largest L
    assert list(dict.fromkeys((s["D"], s["causal"]) for s in series)) == [
        (128, False), (128, True), (64, False)]
    by = {(s["D"], s["causal"], s["panel"], s["method"]): s for s in series}
    ours_L = by[(128, False, "L", "sparge_int8_fp8")]
    assert ours_L["x"] == [1000, 4096, 8192] and ours_L["y"] == [460.0, 490.96, 531.92]
    ours_d = by[(128, False, "density", "sparge_int8_fp8")]
    assert ours_d["L"] == 8192 and ours_d["x"] == [0.1, 0.2512, 0.5, 1.0]   # 0.25's FAIL row gone
    assert ours_d["y"] == [4500.0, 450.0 / 0.2512, 900.0, 531.92] and not ours_d["dense_only"]
    assert by[(128, True, "density", "sdpa_cudnn")]["dense_only"]
    assert by[(64, False, "density", "sparge_int8_fp8")]["x"] == [0.5, 1.0]


def test_rows_of_two_csvs_merge_and_the_last_one_wins(bench_csv, tmp_path):
    rerun = write_csv(tmp_path / "bench_rerun_2026-01-03_Test_GPU.csv",
                      [row("sparge_int8_fp8", 8192, 64, False, 1.0, 333.0)],
                      fields=FIELDS + ["quant_ms"])       # a newer CSV: one more column
    drawn = bench_series(read_bench_csvs([bench_csv, rerun]))
    (s,) = [s for s in drawn["series"] if (s["D"], s["panel"]) == (64, "L")]
    assert s["y"] == [333.0]


def test_a_rerun_replaces_a_failed_row(bench_csv, tmp_path):
    rerun = write_csv(tmp_path / "bench_rerun_2026-01-03_Test_GPU.csv",
                      [row("flex_attention", 4096, 128, True, 1.0, 321.0)])
    drawn = bench_series(read_bench_csvs([bench_csv, rerun]))
    assert not [r for r in drawn["left_out"] if r["method"] == "flex_attention"]
    (s,) = [s for s in drawn["series"]
            if (s["method"], s["D"], s["causal"], s["panel"]) == ("flex_attention", 128, True, "L")]
    assert s["y"] == [321.0]
    # and the other way round: a later failure replaces an ok row
    broke = write_csv(tmp_path / "bench_broke_2026-01-04_Test_GPU.csv",
                      [row("sparge_int8_fp8", 8192, 64, False, 1.0, None, status="ERROR x")])
    drawn = bench_series(read_bench_csvs([bench_csv, broke]))
    assert [(r["method"], r["L"], r["D"]) for r in drawn["left_out"]
            if r["status"] == "ERROR x"] == [("sparge_int8_fp8", 8192, 64)]


def test_issue_targets_from_csv(tmp_path):
    """bench/targets.py: a target holds or not from the rows; missing rows are not a pass."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import targets
    rows = []
    for L in (16384, 32768):
        for causal in (False, True):
            rows.append(dict(row("sdpa_cudnn", L, 128, causal, 1.0, 600.0), predict_ms=""))
            rows.append(dict(row("sparge_e2e_tau0.9", L, 128, causal, 1.0, 650.0 if causal else 720.0),
                             predict_ms=0.01))
            rows.append(row("sparge_int8_fp8_kernel", L, 128, causal, 1.0, 730.0))
    path = write_csv(tmp_path / "t.csv", rows)
    got = {(t, w.split(":")[0].split(",")[0]): ok for t, w, _, ok in targets.check(targets.load([path]))}
    assert got["1 dense > cuDNN", "D128 L16K non-causal"] and got["5 causal > cuDNN", "D128 L32K causal"]
    assert got["1 dense > 700 TOPS", "D128 L32K non-causal"]
    assert not got["1 dense > cuDNN", "D64 L16K non-causal"]              # no D 64 row: not met
    # (e2e - kernel) / kernel: 730 / 720 - 1 = 1.4% (under 3%), causal 730 / 650 - 1 = 12%
    assert got["4 prediction overhead", "D128 L32K non-causal"]
    assert not got["4 prediction overhead", "D128 L32K causal"]



def test_readme_table_from_csv(tmp_path):
    """bench/targets.py --readme-table: TOPS per method and density, a failed or missing row blank."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import targets
    rows = [row("sdpa_cudnn", 16384, 128, False, 1.0, 590.4),
            row("sparge_int8_fp8", 16384, 128, False, 1.0, 672.0),
            row("sparge_int8_fp8", 16384, 128, False, 0.4987, 1259.0),     # measured density
            row("sparge_int8_fp8", 16384, 128, False, 0.1, 9999.0, status="FAIL rel_l1"),
            row("sdpa_flash", 16384, 128, True, 1.0, 300.0),               # not shown causal
            row("sparge_int8_fp8", 16384, 64, False, 1.0, 1.0)]            # not D 128
    path = write_csv(tmp_path / "t.csv", rows)
    lines = targets.readme_table(targets.load([path])).splitlines()
    assert lines[0] == "| method | L | causal | density 1.0 | 0.5 | 0.25 | 0.1 |", lines
    assert lines[2:] == ["| PyTorch SDPA, cuDNN | 16K | no | 590 |  |  |  |",
                         "| **block_sparse_attn**, int8 QK / fp8 PV (default) | 16K | no | 672 | 1259 |  |  |"], lines

def test_one_card_per_figure_and_named_columns(bench_csv, tmp_path):
    other = write_csv(tmp_path / "other.csv", [dict(row("sdpa_cudnn", 8192, 128, False, 1.0, 1.0),
                                                    card="Other GPU")])
    with pytest.raises(ValueError, match="one card.*Other GPU, Test GPU 80GB"):
        plot_bench([bench_csv, other], path=tmp_path / "x.png")
    bf16 = write_csv(tmp_path / "bf16.csv", [dict(row("sdpa_cudnn", 8192, 128, False, 1.0, 1.0),
                                                  dtype="bfloat16")])
    with pytest.raises(ValueError, match="one dtype, got 2: bfloat16, float16"):
        plot_bench([bench_csv, bf16], path=tmp_path / "x.png")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import targets
    with pytest.raises(ValueError, match="one dtype, got bfloat16, float16"):
        targets.load([bench_csv, bf16])
    bad = tmp_path / "bad.csv"
    bad.write_text("card,method,L\nx,y,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv: .*missing B, H, D, causal"):
        plot_bench([bad], path=tmp_path / "x.png")


def test_runs_standalone_as_a_file(bench_csv, tmp_path):
    script = Path(__file__).resolve().parent.parent / "viz" / "bench.py"
    out = tmp_path / "fig.png"
    res = subprocess.run([sys.executable, str(script), str(bench_csv), "--out", str(out)],
                         capture_output=True, text=True, env=repo_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(out)
    assert_png(out)


def test_clock_sampler_windows_of_nvidia_smi_samples(tmp_path):
    """bench/gpu_clocks.py: samples parsed from nvidia-smi's CSV as it is being written (a partial
    last line waits), summarised per time window; junk lines and an empty window give nothing."""
    import datetime as dt
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_clocks
    t0 = dt.datetime(2026, 12, 5, 21, 42, 54, 250000)
    stamp = lambda s: (t0 + dt.timedelta(seconds=s)).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]  # noqa: E731
    path = tmp_path / "smi.csv"
    path.write_text(f"{stamp(0.0)}, 1980, 120.5, 40, 0x0000000000000000\n"
                    f"{stamp(0.1)}, 1785, 701.6, 63, 0x0000000000000004\n"
                    "[N/A], [N/A], [N/A], [N/A], [N/A]\n"
                    f"{stamp(0.2)}, 1770, 699.0, 64, 0x0000000000000004\n"
                    f"{stamp(0.3)}, 1755, 6")                       # being written
    clocks = gpu_clocks.ClockSampler(path=str(path))
    base = t0.timestamp()
    got = clocks.window(base + 0.05, base + 0.25)
    assert got == {"sm_mhz": 1777.5, "sm_mhz_min": 1770.0, "power_w": 700.3, "power_capped": 1.0}, got
    assert clocks.window(base + 0.25, base + 0.35) == {}          # the partial line is not a sample
    with open(path, "a") as f:
        f.write(f"96.4, 64, 0x0000000000000004\n{stamp(0.4)}, 1980, 300.0, 60, 0x0000000000000001\n")
    got = clocks.window(base - 1, base + 1)
    assert got == {"sm_mhz": 1785.0, "sm_mhz_min": 1755.0, "power_w": 696.4, "power_capped": 0.6}, got
    assert clocks.window(base + 0.3, base + 0.3)["power_w"] == 696.4
    clocks.close()
    assert path.exists()                                            # a given file is not removed
    assert gpu_clocks.parse_sample("timestamp, clocks.sm [MHz], power.draw [W], x, y") is None


def test_clock_sampler_without_nvidia_smi(monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_clocks
    monkeypatch.setenv("PATH", "")                                # no nvidia-smi to start
    clocks = gpu_clocks.ClockSampler()
    assert clocks.proc is None and clocks.window(0, 1e12) == {}
    clocks.close()
    assert not Path(clocks.path).exists()                           # its own file is removed


def test_timing_consistency_of_a_run(tmp_path):
    """bench/targets.py: block_sparse_attn minus its quantization time against the kernel alone,
    the largest gap per head dim over kernels of 5 ms or more, with the clock columns if present."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import targets
    fields = FIELDS + ["quant_ms", "sm_mhz", "power_capped"]

    def pair(L, d, kernel_ms, e2e_ms, quant_ms=1.0, **clock):
        k = dict(row("sparge_int8_fp8_kernel", L, 128, False, d, 1000.0 / kernel_ms), quant_ms=quant_ms,
                 **clock)
        return [k, dict(row("sparge_int8_fp8", L, 128, False, d, 1000.0 / e2e_ms), **clock)]

    rows = (pair(16384, 1.0, 10.0, 11.2, sm_mhz=1700, power_capped=1.0)    # gap +2%
            + pair(16384, 0.5, 5.0, 4.6, sm_mhz=1800, power_capped=0.5)      # gap -28%
            + pair(16384, 0.1, 1.0, 3.0)                                     # under 5 ms: left out
            + pair(4096, 1.0, 20.0, 30.0))                                   # under 8K: left out
    (D, text), = targets.consistency(targets.load([write_csv(tmp_path / "c.csv", rows, fields)]))
    assert D == 128
    assert text == ("largest gap -28.0% of the kernel (L16K nc d=0.5) over 2 cases; our rows' SM "
                    "clock median 1800 MHz, 75% of their samples at the power cap"), text


def test_results_name_the_commit(monkeypatch, tmp_path):
    """bench/provenance.py: SPARGE_COMMIT wins (the device's copy has no .git); a folder outside
    any repository gives "unknown", not an empty string or a crash."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import provenance
    monkeypatch.setenv("SPARGE_COMMIT", "abc1234")
    assert provenance.git_commit(tmp_path) == "abc1234"
    monkeypatch.delenv("SPARGE_COMMIT")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.git_commit(tmp_path) == "unknown"


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_3:
        /*0010*/                   I2FP.F32.S32 R2, R3 ;
        /*0020*/               @P0 BRA `(.L_x_9) ;
        /*0030*/                   FFMA.FTZ R4, R2, R5, R6 ;
.L_x_9:
        /*0040*/                   MUFU.EX2 R4, R4 ;
        /*0050*/              @!P1 BRA `(.L_x_3) ;
        /*0060*/                   EXIT ;
.L_x_5:
        /*0070*/                   CALL.REL.NOINC `(.L_x_8) ;
        /*0080*/                   BRA `(.L_x_9) ;
"""


def test_sass_listing_loops_and_mix():
    """bench/sass.py: labels become addresses, a backward branch makes a loop, a slow path after
    EXIT that branches back is not one, and opcodes are counted without their modifiers."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import sass
    insns = sass.parse_listing(SASS)
    assert [a for a, _, _ in insns] == list(range(0, 0x90, 0x10))
    assert insns[2] == (0x20, "BRA", "@P0 0x40")
    assert [(insns[lo][0], insns[hi][0]) for lo, hi in sass.loops(insns)] == [(0x10, 0x50)]
    lo, hi = sass.loops(insns)[0]
    assert sass.mix(insns[lo:hi + 1]) == {"I2FP": 1, "BRA": 2, "FFMA": 1, "MUFU": 1}


def test_bad_cells_named_and_rows_without_tops_left_out(tmp_path, capsys):
    """A cell that cannot be read names the file, line and column; an ok row with an empty or
    NaN TOPS is left out and listed as such (not as "ok"); causal may be any case of True/False."""
    good = [row("sparge_int8_fp8", 8192, 128, "true", 1.0, 500.0),
            row("sparge_int8_fp8", 8192, 128, "FALSE", 1.0, 510.0),
            dict(row("sdpa_cudnn", 8192, 128, False, 1.0, None), tops="nan"),
            row("sdpa_flash", 8192, 128, False, 1.0, None)]
    drawn = plot_bench([write_csv(tmp_path / "b.csv", good)], path=tmp_path / "b.png")
    assert {(s["method"], s["causal"]) for s in drawn["series"]} == {("sparge_int8_fp8", True),
                                                                     ("sparge_int8_fp8", False)}
    out = capsys.readouterr().out
    assert out.count("density 1: no TOPS value") == 2, out
    for col, value, kind in (("density", "nan", "a finite number"), ("L", "", "an integer"),
                             ("causal", "yes", "True or False")):
        bad = [row("sparge_int8_fp8", 8192, 128, False, 1.0, 500.0), row("x", 8192, 128, False, 1.0, 1.0)]
        bad[1][col] = value
        path = write_csv(tmp_path / f"bad_{col}.csv", bad)
        with pytest.raises(ValueError, match=rf"bad_{col}\.csv, line 3: {col}: expected {kind}, got {value!r}"):
            read_bench_csvs([path])


def test_figure_paths(bench_csv, tmp_path):
    """The figure lands exactly at the returned path: ".png" added to a name without an
    extension; a folder or an extension matplotlib cannot write raises, naming path."""
    got = plot_bench([bench_csv], path=tmp_path / "fig")["path"]
    assert got == tmp_path / "fig.png" and got.exists() and not (tmp_path / "fig").exists()
    assert plot_bench([bench_csv], path=tmp_path / "f.pdf")["path"].read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError, match=r"^path: expected a file name for the figure, got the folder"):
        plot_bench([bench_csv], path=tmp_path)
    with pytest.raises(ValueError, match=r"^path: expected a file name ending in one of .*\.png.*, got '.*bench_2026\.12\.05' \(add \.png\)"):
        plot_bench([bench_csv], path=tmp_path / "bench_2026.12.05")
