"""The tuner's per-query-block bound (``tune_layer(block_factor=F)``, sparge_cupy/tune.py), on the CPU.

The head's relative L1 is a mean over every row; ``block_factor`` F also bounds each query block's
own relative L1 (its ``block_q`` rows) by ``F * l1`` with Stage 1 and ``F * pv_l1`` with Stage 2
(with ``block_quantile`` q: at least a share q of the query blocks).
Every check below recomputes the per-block errors on an independent path: the public API
(``sparge_attn``, reference backend) against ``reference.dense_attention``, split into query blocks
here, never through the tuner's own helpers.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_qkv

import sparge_cupy
from sparge_cupy import CONFIG
from sparge_cupy import evaluate as ev
from sparge_cupy import reference as R
from sparge_cupy import tune as T
from sparge_cupy.cli import main

F32 = np.float32
L1, PV_L1 = 0.05, 0.06
FACTOR = 2.0
SCALE = 0.125
TOL = 1e-6            # the saved errors are the exact evaluator's: the same computation as below


@pytest.fixture(scope="module")
def ragged():
    """Causal GQA input, batch 2, 700 tokens: 6 query blocks, the last one partial (60 rows)."""
    q, k, v = make_qkv(B=2, Hq=4, Hkv=2, Lq=700, D=64, seed=11)
    return q, k, v


@pytest.fixture(scope="module")
def mean_only(ragged):
    q, k, v = ragged
    return T.tune_layer([q], [k], [v], is_causal=True, scale=SCALE, l1=L1, pv_l1=PV_L1, mode="mass",
                        thetas=(-1.0, 0.5))


@pytest.fixture(scope="module")
def per_block(ragged):
    q, k, v = ragged
    return T.tune_layer([q], [k], [v], is_causal=True, scale=SCALE, l1=L1, pv_l1=PV_L1, mode="mass",
                        thetas=(-1.0, 0.5), block_factor=FACTOR, layer="blk")


def block_errors(tuned, q, k, v, *, stage2):
    """Relative L1 per (batch, head, query block) ``[B, H, nq]`` and per head, of the tuned
    thresholds through the public API, against float64 dense attention."""
    kw = tuned.kwargs()
    if not stage2:
        kw["pvthreshd"] = None
    out = sparge_cupy.sparge_attn(q, k, v, is_causal=True, scale=SCALE, **kw).astype(np.float64)
    ref = R.dense_attention(q, k, v, is_causal=True, scale=SCALE).astype(np.float64)
    B, H, L, _ = ref.shape
    bq = CONFIG.block_q
    diff, mag = np.abs(out - ref).sum(-1), np.abs(ref).sum(-1)         # [B, H, L]
    starts = np.arange(0, L, bq)
    num, den = np.add.reduceat(diff, starts, axis=-1), np.add.reduceat(mag, starts, axis=-1)
    return num / den, diff.sum(axis=(0, 2)) / mag.sum(axis=(0, 2))


@pytest.mark.parametrize("stage2", [False, True])
def test_every_query_block_meets_the_bound_in_the_public_api(ragged, per_block, stage2):
    q, k, v = ragged
    assert per_block.verified and per_block.meets_bound.all() and per_block.block_factor == FACTOR
    blk, head = block_errors(per_block, q, k, v, stage2=stage2)
    bound = PV_L1 if stage2 else L1
    assert blk.shape[2] == 6
    worst = blk.max(axis=(0, 2))
    assert (worst <= FACTOR * bound).all(), f"largest query-block L1 per head {worst} > {FACTOR} x {bound}"
    assert (head <= bound).all(), f"head L1 {head} > {bound}"
    saved = per_block.block_l1 if stage2 else per_block.stage1_block_l1
    np.testing.assert_allclose(saved, worst, rtol=TOL, err_msg="saved largest block L1 is the exact one")
    assert per_block.stage1_sparsity.mean() > 0.05, "the bound left nothing to skip: the test is vacuous"


def test_the_block_bound_is_tighter_than_the_mean_bound(ragged, mean_only, per_block):
    """Negative control: tuned on the mean alone, some query block exceeds F * l1 (so the option
    has something to do here), and it reports that block's error; with the factor the same input
    keeps fewer blocks free, never more."""
    q, k, v = ragged
    blk, _ = block_errors(mean_only, q, k, v, stage2=False)
    worst = blk.max(axis=(0, 2))
    assert (worst > FACTOR * L1).any(), f"no query block above {FACTOR} x {L1} without the bound: {worst}"
    np.testing.assert_allclose(mean_only.stage1_block_l1, worst, rtol=TOL)
    assert mean_only.block_factor is None
    assert (per_block.stage1_block_l1 <= mean_only.stage1_block_l1 + TOL).all()
    assert (per_block.stage1_sparsity <= mean_only.stage1_sparsity + TOL).all()
    assert per_block.stage1_sparsity.mean() < mean_only.stage1_sparsity.mean()


def test_curves_measure_the_block_errors_of_the_exact_evaluator(ragged):
    """Both evaluators report the same largest per-block L1, up to a small part of the smallest
    per-block quantization floor (they differ only in where P is rounded)."""
    q, k, v = ragged
    inputs, _ = T._prepare_inputs([q], [k], [v], is_causal=True, scale=SCALE, layout="HND")
    common = dict(thetas=(-1.0, 0.5), mode="mass", qk="int8", pv="fp8", rebalance=True,
                  attention_sink=True)
    curves, exact = T._CurveEvaluator(inputs, **common), T._ExactEvaluator(inputs, **common)
    H = q.shape[1]
    floor = exact.stage1(np.zeros(H, int), np.ones(H, F32), np.ones(H, bool))
    rng = np.random.default_rng(1)
    for _ in range(2):
        ti = rng.integers(0, 2, H)
        thr = (10.0 ** rng.uniform(-1, 0.5, H)).astype(F32)
        lam = (2.0 ** rng.uniform(0, 5, H)).astype(F32)
        a, b = curves.stage1(ti, thr, np.zeros(H, bool)), exact.stage1(ti, thr, np.zeros(H, bool))
        assert (b.block_l1 > b.l1).all(), "the largest block is above the mean"
        np.testing.assert_allclose(a.block_l1, b.block_l1, rtol=0, atol=0.2 * floor.l1.min())
        curves.set_stage1(ti, thr, np.zeros(H, bool))
        exact.set_stage1(ti, thr, np.zeros(H, bool))
        a, b = curves.stage2(lam), exact.stage2(lam)
        np.testing.assert_allclose(a.block_l1, b.block_l1, rtol=0, atol=0.2 * floor.l1.min())


def test_a_quantile_bounds_that_share_of_the_blocks_and_lets_the_rest_go(ragged, mean_only, per_block):
    """block_quantile q: at least a share q of the (batch, query block) errors within F * bound, the
    saved block error is that quantile of the independent per-block errors, and the tuning lies
    between the mean-only one and the every-block one."""
    q, k, v = ragged
    quant = 0.75
    tuned = T.tune_layer([q], [k], [v], is_causal=True, scale=SCALE, l1=L1, pv_l1=PV_L1, mode="mass",
                         thetas=(-1.0, 0.5), block_factor=FACTOR, block_quantile=quant)
    assert tuned.verified and tuned.meets_bound.all() and tuned.block_quantile == quant
    for stage2, bound, saved in ((False, L1, tuned.stage1_block_l1), (True, PV_L1, tuned.block_l1)):
        blk, _ = block_errors(tuned, q, k, v, stage2=stage2)
        per_head = blk.transpose(1, 0, 2).reshape(blk.shape[1], -1)          # [H, B * nq] = [4, 12]
        within = (per_head <= FACTOR * bound + TOL).mean(axis=1)
        assert (within >= quant).all(), f"share of query blocks within {FACTOR} x {bound}: {within}"
        want = np.sort(per_head, axis=1)[:, int(np.ceil(quant * (per_head.shape[1] - 1)))]
        np.testing.assert_allclose(saved, want, rtol=TOL, err_msg="saved block error is the quantile")
    assert (tuned.stage1_sparsity >= per_block.stage1_sparsity - TOL).all()
    assert (tuned.stage1_sparsity <= mean_only.stage1_sparsity + TOL).all()
    assert tuned.stage1_sparsity.mean() > per_block.stage1_sparsity.mean()


def test_the_factor_round_trips_and_old_files_load(tmp_path, per_block):
    path = tmp_path / "t.json"
    T.save_tuning(path, [per_block])
    back = T.load_tuning(path)["blk"]
    assert back.block_factor == FACTOR and back.block_quantile == 1.0
    np.testing.assert_allclose(back.block_l1, per_block.block_l1, rtol=1e-5)
    np.testing.assert_allclose(back.stage1_block_l1, per_block.stage1_block_l1, rtol=1e-5)
    doc = json.loads(path.read_text())
    for name in ("block_factor", "block_quantile", "stage1_block_l1", "block_l1"):
        del doc["layers"]["blk"][name]                   # a file written before the option
    path.write_text(json.dumps(doc))
    old = T.load_tuning(path)["blk"]
    assert old.block_factor is None and old.block_l1 is None and old.stage1_block_l1 is None
    assert "blk_s1" in old.table()


def test_bad_factor_names_the_argument(ragged):
    q, k, v = ragged
    q, k, v = (x[:, :, :200] for x in (q, k, v))
    for bad in (0.5, float("inf"), "2"):
        with pytest.raises(ValueError, match="block_factor"):
            T.tune_layer([q], [k], [v], is_causal=True, block_factor=bad)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="block_quantile"):
            T.tune_layer([q], [k], [v], is_causal=True, block_factor=2.0, block_quantile=bad)


def test_tune_command_line_passes_the_factor(tmp_path, ragged, capsys):
    q, k, v = (x[:1, :, :400] for x in ragged)
    npz = tmp_path / "layer.npz"
    np.savez(npz, q=q, k=k, v=v, scale=SCALE, is_causal=True)
    out = tmp_path / "t.json"
    assert T.main(["--inputs", str(npz), "--layer", "x", "--out", str(out), "--device", "cpu",
                   "--mode", "mass", "--thetas=-1", "--block-factor", "1.2", "--quiet"]) == 0
    assert "every query block <= 1.2 x" in capsys.readouterr().out
    got = T.load_tuning(out)["x"]
    assert got.block_factor == 1.2 and (got.stage1_block_l1 <= 1.2 * L1 + TOL).all()


def test_eval_command_tunes_with_the_factor(tmp_path, monkeypatch, capsys):
    """``sparge-cupy eval --block-factor``: the tuned rows carry the largest block L1 within the
    bound, the report shows them and the command line in its runs."""
    def capture(tokens, layer):
        q, k, v = make_qkv(B=1, Hq=4, Hkv=1, Lq=tokens, D=64, seed=3, dtype=np.float16)
        return {"q": q, "k": k, "v": v, "scale": 64 ** -0.5, "tokens": tokens, "layer": layer}
    monkeypatch.setattr(ev, "load_capture", capture)
    out = tmp_path / "res"
    assert main(["eval", "--tokens", "300", "--layers", "5", "--steps", "tuned_qbar", "--device", "cpu",
                 "--block-factor", "1.5", "--out-dir", str(out), "--name", "e", "--no-figures",
                 "--quiet"]) == 0
    rows = [r for r in ev.read_csv(out / "e.csv") if r["group"] == "tuned_qbar"]
    assert len(rows) == 8
    for r in rows:
        assert r["block_l1"] <= 1.5 * r["bound"] + TOL, r
    report = (out / "e.md").read_text()
    assert "--block-factor 1.5" in report and "## Per query block (tuned steps)" in report
