"""``sparge-cupy eval`` and its figures on a tiny synthetic stand-in for the Gemma captures (the
loader is monkeypatched): the rows are produced for every step, their numbers are in range and
consistent with each other, the CSV round-trips and merges, and the four figures are written.
The real run is heavy and not part of the tests (see bench/results/gemma3_eval_pydoc.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sparge_cupy import evaluate as ev
from sparge_cupy import reference as R
from sparge_cupy.cli import main

from conftest import make_qkv
from test_cli_viz import assert_png

TOKENS, LAYERS = 300, (5, 11)       # ragged: 300 = 2 query blocks + 44 rows, 4 key blocks + 44


def fake_capture(tokens, layer):
    """What ``hf.load_gemma_capture`` returns, in small: 4 query heads sharing 1 kv head, float16."""
    if layer is None:
        raise FileNotFoundError("no NLL file in the synthetic capture")
    q, k, v = make_qkv(B=1, Hq=4, Hkv=1, Lq=tokens, D=64, seed=int(layer), dtype=np.float16)
    return {"q": q, "k": k, "v": v, "scale": 64 ** -0.5, "tokens": tokens, "layer": layer}


@pytest.fixture
def synthetic(monkeypatch):
    monkeypatch.setattr(ev, "load_capture", fake_capture)


@pytest.fixture(scope="module")
def rows():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "load_capture", fake_capture)
        out, timings = ev.evaluate((TOKENS,), LAYERS, quiet=True)
    assert set(timings) == {f"{TOKENS}/{layer}/{s}" for layer in LAYERS for s in ("truth",) + ev.STEPS}
    return out


def pick(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def test_block_mass_matches_the_reference():
    q, k, _ = make_qkv(B=2, Hq=3, Hkv=1, Lq=203, Lk=331, D=32, seed=3)
    for causal in (True, False):
        got = ev.block_mass(q, k, is_causal=causal, scale=0.2)
        want = R.block_attention_mass(q, k, is_causal=causal, scale=0.2)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12,
                                   err_msg=f"block_mass differs from the reference (is_causal={causal})")


def test_every_step_gives_one_row_per_head_and_setting(rows):
    expected = {("preset", p[0]) for p in ev.PRESETS} | {("tuned", "stage 1"), ("tuned", "stage 1+2"),
                                                          ("tuned_mass", "stage 1"),
                                                          ("tuned_mass", "stage 1+2"),
                                                          ("tuned_qbar", "stage 1"),
                                                          ("tuned_qbar", "stage 1+2"),
                                                          ("oracle", "l1<=0.05")}
    expected |= {("floor", f[0]) for f in ev.FLOORS}
    expected |= {("sweep", f"theta=-1 tau={t:.6g}") for t in ev.SWEEP_TAUS}
    expected |= {("oracle_frontier", f"l1<={b:g}") for b in ev.ORACLE_FRONTIER}
    for layer in LAYERS:
        got = {}
        for r in pick(rows, layer=layer):
            got.setdefault((r["group"], r["setting"]), []).append(r["head"])
        assert set(got) == expected, f"layer {layer}: settings differ: {set(got) ^ expected}"
        bad = {key: heads for key, heads in got.items() if sorted(heads) != [0, 1, 2, 3]}
        assert not bad, f"layer {layer}: expected heads 0-3 once per setting, got {bad}"


def test_numbers_are_in_range(rows):
    for r in rows:
        where = f"{r['group']} {r['setting']} layer {r['layer']} head {r['head']}"
        for col in ("stage1_sparsity", "stage2_sparsity", "total_sparsity", "recall"):
            if r.get(col) is not None and not (isinstance(r[col], float) and math.isnan(r[col])):
                assert 0.0 <= r[col] <= 1.0, f"{where}: {col} = {r[col]} outside [0, 1]"
        for col in ("rel_l1", "rel_l1_sparsity_only"):
            if r.get(col) is not None:
                assert math.isfinite(r[col]) and 0.0 <= r[col] < 1.0, f"{where}: {col} = {r[col]}"


def test_numbers_agree_with_each_other(rows):
    for layer in LAYERS:
        for h in range(4):
            key = dict(layer=layer, head=h)
            floor = {r["setting"]: r["rel_l1"] for r in pick(rows, group="floor", **key)}
            # float32 operands < FP16 < INT8: the floors order as the precision does; every output
            # is rounded to the input dtype (float16: half an ulp is 2^-11 relative at most)
            assert floor["fp32/fp32"] <= 2.0 ** -11, floor
            assert floor["fp32/fp32"] <= floor["fp16/fp16"] < floor["int8+rebalance/fp8"], floor
            oracle = pick(rows, group="oracle", **key)[0]
            assert oracle["rel_l1_sparsity_only"] <= 0.05 + 1e-12, oracle
            # the oracle map with quantization adds at most about the quantization floor
            assert oracle["rel_l1"] <= oracle["rel_l1_sparsity_only"] + 2 * floor["int8+rebalance/fp8"]
            for group in ("tuned", "tuned_mass", "tuned_qbar"):
                s1 = pick(rows, group=group, setting="stage 1", **key)[0]
                s12 = pick(rows, group=group, setting="stage 1+2", **key)[0]
                assert s1["rel_l1"] <= 0.05 and s12["rel_l1"] <= 0.06, (s1, s12)
                assert s12["stage1_sparsity"] == s1["stage1_sparsity"]
                assert s12["total_sparsity"] >= s1["total_sparsity"] - 1e-12
                # the sparsity-only error of the tuned map sits near its quantized error
                assert s1["rel_l1_sparsity_only"] <= s1["rel_l1"] + 2 * floor["int8+rebalance/fp8"]
                rule, other = ("tau", "mass_threshold") if group == "tuned" else ("mass_threshold", "tau")
                assert s1[rule] >= 0 and s1.get(other) is None, s1
                quant = ev.QBAR_QUANT if group == "tuned_qbar" else ev.USER_QUANT
                assert (s1["qk"], s1["pv"]) == (quant["qk"], quant["pv"]), s1
            sweep = sorted(pick(rows, group="sweep", **key), key=lambda r: r["tau"])
            sp = [r["stage1_sparsity"] for r in sweep]
            assert all(a >= b for a, b in zip(sp, sp[1:])), f"sweep sparsity rises with tau: {sp}"
            assert sweep[-1]["rel_l1"] < sweep[0]["rel_l1"]


def test_command_writes_csv_report_and_figures_and_merges(tmp_path, synthetic, capsys):
    out = tmp_path / "res"
    assert main(["eval", "--tokens", str(TOKENS), "--layers", "5", "--device", "cpu",
                 "--out-dir", str(out), "--name", "gemma3_eval_test", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "oracle" in printed and "mean" in printed, printed
    csv_rows = ev.read_csv(out / "gemma3_eval_test.csv")
    assert len(pick(csv_rows, group="tuned", setting="stage 1+2")) == 4
    report = (out / "gemma3_eval_test.md").read_text()
    assert len(pick(csv_rows, group="tuned_mass", setting="stage 1")) == 4
    assert all(r["mass_threshold"] >= 0 for r in pick(csv_rows, group="tuned_mass"))
    for needle in ("## Summary", "| tokens | layer | oracle | tuned s1 | ratio", "mass s1 | mass total |",
                   "the issue's is 0.05), mass threshold: ", "## Runs",
                   "sparge-cupy eval --tokens 300", "--qbar-predictor qgroup_keys",
                   "## Quantization floor", "## Timings"):
        assert needle in report, f"report lacks {needle!r}"
    for what in ("maps", "sweep", "length", "stages"):
        assert_png(out / f"gemma3_eval_test_{what}.png")

    # a second run of one step at another length merges into the same CSV
    assert main(["eval", "--tokens", "200", "--layers", "5", "--steps", "oracle",
                 "--device", "cpu", "--out-dir", str(out), "--name", "gemma3_eval_test", "--merge",
                 "--no-figures", "--quiet"]) == 0
    merged = ev.read_csv(out / "gemma3_eval_test.csv")
    assert len(merged) == len(csv_rows) + 4
    assert {r["tokens"] for r in pick(merged, group="oracle")} == {200, TOKENS}
    report = (out / "gemma3_eval_test.md").read_text()
    assert report.count("- 20") >= 2, "the report lists both runs"


def test_figures_standalone_from_the_csv(tmp_path, rows):
    from sparge_cupy.viz import real_model
    csv_path = ev.write_csv(rows, tmp_path / "x.csv")
    paths = real_model.main(["--csv", str(csv_path), "--figures", "length", "stages"])
    assert [p.name for p in paths] == ["x_length.png", "x_stages.png"]
    for p in paths:
        assert_png(p)


def test_missing_capture_names_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARGE_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--tokens", "4096", "--layers", "5", "--out-dir", str(tmp_path), "--quiet"])
    assert "scripts/extract_gemma_qkv.py --tokens 4096" in str(e.value)


@pytest.mark.parametrize("extra, message", [
    (["--l1", "nan"], "--l1: expected a number in (0, 1), got nan"),
    (["--l1", "0"], "--l1: expected a number in (0, 1), got 0.0"),
    (["--pv-l1", "0.01"], "--pv-l1: expected a bound >= --l1 = 0.05"),
    (["--thetas=abc"], "--thetas: expected comma-separated numbers in [-1, 1], got 'abc'"),
    (["--thetas=5"], "--thetas: expected comma-separated numbers in [-1, 1], got '5'"),
    (["--oracle-frontier", "-1"], "--oracle-frontier: expected numbers in (0, 1), got -1.0"),
    (["--block-factor", "0.5"], "--block-factor: expected a finite number >= 1"),
    (["--block-quantile", "0"], "--block-quantile: expected a number in (0, 1], got 0.0"),
    (["--perplexity", "--steps", "presets"], "--perplexity runs the thresholds of step 'tuned'"),
    (["--perplexity", "--steps", "tuned"], "--perplexity: none of --tokens [512] is in --ppl-tokens [4096]"),
    (["--merge-csv", "nope.csv"], "--merge-csv: no file nope.csv"),
])
def test_bad_options_stop_before_any_work(tmp_path, monkeypatch, extra, message):
    """Every option mistake is one message naming the option, before captures are even looked
    up (no capture exists in this cache)."""
    monkeypatch.setenv("SPARGE_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["eval", "--tokens", "512", "--layers", "5", "--out-dir", str(tmp_path / "o"), "--quiet", *extra])
    assert str(e.value).startswith("eval: ") and message in str(e.value), str(e.value)
    assert not (tmp_path / "o").exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(SystemExit, match="--out-dir: expected a folder"):
        main(["eval", "--tokens", "512", "--out-dir", str(afile), "--quiet"])


def test_perplexity_needs_the_tuned_step(synthetic):
    with pytest.raises(ValueError, match="tuned"):
        ev.evaluate((TOKENS,), (5,), steps=("oracle",), perplexity=True, quiet=True)


@pytest.mark.gpu
def test_gpu_backend_agrees_with_the_reference(rows):
    """The same evaluation through the CuPy kernels: identical row set; block maps equal up to
    near-ties (sparsity within one block per head); errors within the kernel tolerance."""
    cupy = pytest.importorskip("cupy")
    if not cupy.is_available():
        pytest.skip("no CUDA GPU")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "load_capture", fake_capture)
        gpu_rows, _ = ev.evaluate((TOKENS,), LAYERS, steps=("presets", "floors", "tuned", "tuned_qbar"),
                                  use_gpu=True, quiet=True)
    n_valid = int(R.valid_blocks(TOKENS, TOKENS, 128, 64, True).sum())
    for g in gpu_rows:
        key = {k: g[k] for k in ("layer", "head", "group", "setting")}
        c = pick(rows, **key)[0]
        where = f"{key}"
        assert abs(g["stage1_sparsity"] - c["stage1_sparsity"]) <= 1.0 / n_valid + 1e-12, where
        if g["group"] in ("tuned", "tuned_qbar"):   # a search: a neighbouring threshold may win
            assert g["rel_l1"] <= (0.05 if g["setting"] == "stage 1" else 0.06), where
        else:                        # same map, same quantization: the kernel within 2x + a floor
            assert g["rel_l1"] <= 2 * c["rel_l1"] + 1e-3, (where, g["rel_l1"], c["rel_l1"])
