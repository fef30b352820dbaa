"""The transformers integration (sparge_cupy.hf) on tiny random models: no download, CPU only.

Skipped where torch or transformers is not installed (they are maintainer tools, not
dependencies). The models are built from a config with random weights: a 2-layer Gemma 3 (one full
layer, one sliding-window layer, GQA 4:1, like Gemma 3 270M in miniature) and a 2-layer Llama.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparge_cupy import hf  # noqa: E402

L_SEQ = 300        # ragged: 2 full query blocks of 128 + 44 rows, 4 key blocks of 64 + 44
VOCAB = 97


def tiny_model(kind="gemma3", *, seed=0, dtype=torch.float32):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                  max_position_embeddings=4096, attn_implementation="eager")
    if kind == "gemma3":
        config = transformers.Gemma3TextConfig(layer_types=["full_attention", "sliding_attention"],
                                               sliding_window=64, query_pre_attn_scalar=64, **common)
        cls = transformers.Gemma3ForCausalLM
    else:
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    return cls(config).eval().to(dtype)


def input_ids(L=L_SEQ, seed=1):
    return torch.randint(0, VOCAB, (1, L), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, implementation, **kw):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits.double()


def _fp16_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain attention with what the all-blocks sparge path rounds rounded the same way (Q, K, V and
    the unnormalised probabilities to fp16, float32 arithmetic) on the layers where sparge runs;
    "sdpa" exactly on the others. The same-precision reference of the tolerance below."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if attention_mask is not None or kwargs.get("sliding_window") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    r = lambda t: t.half().float()  # noqa: E731
    g = query.shape[1] // key.shape[1]
    k, v = r(key).repeat_interleave(g, 1), r(value).repeat_interleave(g, 1)
    s = r(query) @ k.transpose(-1, -2) * scaling
    Lq, Lk = s.shape[-2:]
    s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(Lk - Lq + 1), -math.inf)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    out = (r(p) @ v) / p.sum(-1, keepdim=True)
    return out.transpose(1, 2).contiguous(), None


def _register_fp16_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("fp16_reference", _fp16_reference)
    AttentionMaskInterface.register("fp16_reference", sdpa_mask)


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_all_blocks_fp16_matches_eager(kind):
    """Every block kept (tau = 1), fp16 QK^T and PV: the logits differ from eager float32 attention
    by at most twice what a plain fp16-rounded attention does, plus a float32 floor (the
    flash-attention rule)."""
    model, ids = tiny_model(kind), input_ids()
    settings = hf.register(hf.SpargeSettings(default=hf.LayerSettings(cdfthreshd=1.0), qk="fp16",
                                             pv="fp16", collect_stats=True))
    _register_fp16_reference()
    exact = logits(model, ids, "eager")
    same_precision = logits(model, ids, "fp16_reference")
    got = logits(model, ids, "sparge")
    ref_err = (same_precision - exact).abs().max().item()
    tol = 2 * ref_err + 8 * np.finfo(np.float32).eps * exact.abs().max().item()
    err = (got - exact).abs().max().item()
    assert err <= tol, (f"{kind}: max |sparge - eager| = {err:.3g} > {tol:.3g} "
                        f"(fp16 reference {ref_err:.3g})")
    assert ref_err > 0   # the reference does round: the bound is not vacuous

    summary = settings.summary()
    assert summary[0]["sparge_calls"] == 1 and summary[0]["stage1_sparsity"] == 0.0
    if kind == "gemma3":   # layer 1 has a 64-token window: the exact fallback
        assert summary[1] == {"calls": 1, "sparge_calls": 0, "fallbacks": {"sliding window": 1}}
    else:
        assert summary[1]["sparge_calls"] == 1


def test_negative_control_dropped_block_fails_tolerance():
    """The tolerance above catches a real error: dropping key blocks (topk, every block trusted to
    the prediction: theta = -1) breaks it."""
    model, ids = tiny_model(), input_ids()
    _register_fp16_reference()
    exact = logits(model, ids, "eager")
    ref_err = (logits(model, ids, "fp16_reference") - exact).abs().max().item()
    tol = 2 * ref_err + 8 * np.finfo(np.float32).eps * exact.abs().max().item()
    hf.register({"default": {"topk": 0.3, "simthreshd1": -1.0}, "options": {"qk": "fp16", "pv": "fp16"}})
    assert (logits(model, ids, "sparge") - exact).abs().max().item() > tol


def test_sparsifying_thresholds_run_and_report_stats():
    model, ids = tiny_model(), input_ids(L=1000)
    # Random tokens make few blocks self-similar; theta = -1 trusts every block to the prediction.
    settings = hf.register({"layers": {"0": {"topk": 0.25, "simthreshd1": -1.0,
                                             "pvthreshd": [4.0, 6.0, None, 8.0]}}})
    settings.collect_stats = True
    got = logits(model, ids, "sparge")      # random weights attend broadly: no accuracy claim here
    assert torch.isfinite(got).all()
    s = settings.summary()[0]
    assert s["sparge_calls"] == 1
    # topk 0.25 keeps a quarter of each row's valid blocks, plus fix blocks and the sink column
    assert 0.2 < s["stage1_sparsity"] < 0.8, s
    assert 0.0 <= s["stage2_sparsity"] <= 1.0 and s["total_sparsity"] >= s["stage1_sparsity"] / 2
    assert len(s["stage1_sparsity_per_head"]) == 4
    rec = [r for r in settings.stats if r["layer"] == 0][0]
    assert rec["Lq"] == rec["Lk"] == 1000
    assert np.asarray(rec["kept_blocks"]).shape == (1, 4)
    settings.reset_stats()
    assert settings.stats == []


def test_tuned_layers_differ_from_default():
    """A layer's entry replaces the default for that layer only: a dense default plus a sparse
    layer 0 changes the logits; dense for every layer reproduces "sdpa" bit for bit."""
    model, ids = tiny_model("llama"), input_ids()
    sdpa = logits(model, ids, "sdpa")
    hf.register({"default": {"dense": True}})
    assert torch.equal(logits(model, ids, "sparge"), sdpa)
    settings = hf.register({"default": {"dense": True},
                            "layers": {"model.layers.0.self_attn": {"topk": 0.3}}})
    settings.collect_stats = True
    assert not torch.equal(logits(model, ids, "sparge"), sdpa)
    assert [r["path"] for r in settings.stats] == ["sparge", "sdpa"]
    assert settings.stats[1]["reason"] == "dense in settings"


def test_padding_mask_falls_back_to_sdpa_exactly():
    model, ids = tiny_model(), input_ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0                                     # left padding: not plain causal
    settings = hf.register(hf.SpargeSettings(collect_stats=True))
    sdpa = logits(model, ids, "sdpa", attention_mask=mask)
    got = logits(model, ids, "sparge", attention_mask=mask)
    assert torch.equal(got, sdpa)
    assert {r["reason"] for r in settings.stats} == {"explicit mask (padding, window or custom)",
                                                     "sliding window"}


def test_decoding_step_falls_back_and_prefill_runs_sparge():
    model, ids = tiny_model(), input_ids(L=200)
    settings = hf.register(hf.SpargeSettings(collect_stats=True))
    model.set_attn_implementation("sparge")
    with torch.no_grad():   # greedy: the prefill, then one decoding step on the cache
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                             min_new_tokens=2, do_sample=False)
    assert out.shape == (1, 202)
    full_layer = [(r["path"], r["reason"]) for r in settings.stats if r["layer"] == 0]
    assert full_layer == [("sparge", None), ("sdpa", "single query (decoding)")]


def test_bfloat16_model_runs():
    model, ids = tiny_model(dtype=torch.bfloat16), input_ids()
    hf.register({"default": {"cdfthreshd": 1.0}})
    exact = logits(model.float(), ids, "eager")
    got = logits(model.to(torch.bfloat16), ids, "sparge")
    rel_l1 = ((got - exact).abs().sum() / exact.abs().sum()).item()
    assert rel_l1 < 0.05, f"bf16 model with sparge: relative L1 {rel_l1:.3f} against float32 eager"


def test_gradients_refused():
    model, ids = tiny_model(), input_ids()
    hf.register()
    model.set_attn_implementation("sparge")
    with pytest.raises(RuntimeError, match="inference only"):
        model(ids, use_cache=False)


def test_token_nll_and_perplexity_match_cross_entropy():
    model, ids = tiny_model(), input_ids()
    lg = logits(model, ids, "eager")
    ce = torch.nn.functional.cross_entropy(lg[0, :-1], ids[0, 1:], reduction="none").numpy()
    nll = hf.token_nll(model, ids[0].numpy(), attn_implementation="eager", chunk=128)
    np.testing.assert_allclose(nll, ce, rtol=1e-5, atol=1e-5)
    last = hf.token_nll(model, ids[0].numpy(), attn_implementation="eager", last=50)
    np.testing.assert_allclose(last, ce[-50:], rtol=1e-5, atol=1e-5)
    ppl = hf.perplexity(model, ids[0].numpy(), "eager", last=50)
    assert ppl["tokens"] == 50 and math.isclose(ppl["ppl"], math.exp(ce[-50:].mean()), rel_tol=1e-5)
    assert model.config._attn_implementation == "eager"   # restored


def test_capture_attention_inputs_recomputes_the_output():
    model, ids = tiny_model(), input_ids()
    model.set_attn_implementation("sdpa")
    cap = hf.capture_attention_inputs(model, ids[0].numpy(), [0])
    c = cap["layers"][0]
    assert c["q"].shape == (1, 4, L_SEQ, 64) and c["k"].shape == c["v"].shape == (1, 1, L_SEQ, 64)
    q, k, v = (torch.from_numpy(c[n]).double() for n in "qkv")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat(1, 4, 1, 1), v.repeat(1, 4, 1, 1),
                                                           is_causal=True, scale=64 ** -0.5)
    np.testing.assert_allclose(c["out"], ref.transpose(1, 2).numpy(), atol=1e-5)
    assert cap["calls"][0]["mask"] is None and cap["calls"][1]["sliding_window"] == 64
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="layer"):
        hf.capture_attention_inputs(model, ids[0].numpy(), [7])


def test_settings_file_round_trip(tmp_path):
    d = {"options": {"qk": "fp16", "pv": "fp16", "rebalance": False},
         "default": {"simthreshd1": 0.5, "cdfthreshd": 0.95},
         "layers": {"5": {"simthreshd1": [0.5, 0.6, 0.6, 0.4], "cdfthreshd": [0.99, 0.998, 0.97, 0.98],
                          "pvthreshd": [12, 14, None, 10]},
                    "model.layers.11.self_attn": {"topk": 0.4},
                    17: {"dense": True}},
         "meta": {"model": "tiny"}}
    s = hf.SpargeSettings.from_dict(d)
    assert sorted(s.layers) == [5, 11, 17] and s.qk == "fp16" and s.rebalance is False
    assert s.for_layer(11).topk == 0.4 and s.for_layer(11).cdfthreshd is None
    assert s.for_layer(3) is s.default and s.for_layer(None) is s.default
    kw = s.for_layer(5).kwargs(4)
    np.testing.assert_array_equal(kw["pvthreshd"], np.array([12, 14, np.inf, 10], np.float32))
    path = s.save(tmp_path / "tuned.json")
    again = hf.load_settings(path)
    assert again.to_dict() == s.to_dict() and json.loads(path.read_text())["meta"] == {"model": "tiny"}


@pytest.mark.parametrize("bad, match", [
    ({"layers": {"5": {"cdfthreshd": 0.9, "topk": 0.3}}}, "at most one"),
    ({"layers": {"5": {"tau": 0.9}}}, "unknown keys"),
    ({"layers": {"attn": {"topk": 0.3}}}, "layer index"),
    ({"layers": {"5": {"topk": 0.3}, "layers.5": {"topk": 0.2}}}, "given twice"),
    ({"options": {"qk": "int8", "block": 64}}, "unknown keys"),
    ({"default": {"simthreshd1": "high"}}, "simthreshd1"),
    ({"format": "other/2"}, "format"),
    ({"options": {"qk": "int4"}}, r"settings\.options\.qk: expected one of \('int8', 'fp16'\)"),
    ({"options": {"rebalance": "yes"}}, r"settings\.options\.rebalance: expected a bool"),
    ({"options": {"predictor": "oracle"}}, r"settings\.options\.predictor"),
    ({"default": {"cdfthreshd": 1.5}}, r"settings\.default\.cdfthreshd: expected values in \(0.0, 1.0\], got 1.5"),
    ({"default": {"simthreshd1": math.nan}}, r"settings\.default\.simthreshd1: expected values"),
    ({"layers": {"3": {"pvthreshd": [2.0, 0.0]}}}, r"settings\.layers\['3'\]\.pvthreshd: expected values in \(0.0, inf\]"),
    ({"layers": {"3": {"mass_threshold": -1}}}, r"mass_threshold: expected values in \[0.0, inf\]"),
    ({"layers": [{"topk": 0.5}]}, r"settings\.layers: expected an object \(null for none\), got list"),
    ({"options": "fp16"}, r"settings\.options: expected an object"),
    ({"meta": [1, 2]}, r"settings\.meta: expected an object"),
    ({"layers": {"3": {"dense": "yes"}}}, r"settings\.layers\['3'\]\.dense: expected true or false, got 'yes'"),
])
def test_settings_errors_name_the_key(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        hf.SpargeSettings.from_dict(bad)


def test_settings_objects_checked_when_made():
    with pytest.raises(ValueError, match=r"^qk: expected one of"):
        hf.SpargeSettings(qk="int4")
    with pytest.raises(ValueError, match=r"^topk: expected values in \(0.0, 1.0\]"):
        hf.LayerSettings(cdfthreshd=None, topk=0.0)
    assert hf.LayerSettings(pvthreshd=(None, 3.0)).kwargs(2)["pvthreshd"].tolist() == [math.inf, 3.0]


def test_autocast_mixed_dtypes_run_in_the_autocast_dtype():
    """Under torch.autocast the rotary embedding hands q and k over in float32 and v in bf16;
    "sdpa" runs that in bf16, and so does "sparge" (it raised before): both within bf16's
    rounding of float32 eager."""
    model, ids = tiny_model("llama"), input_ids()
    hf.register({"default": {"cdfthreshd": 1.0}})
    exact = logits(model, ids, "eager")
    for impl in ("sdpa", "sparge"):
        model.set_attn_implementation(impl)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids, use_cache=False).logits.double()
        rel_l1 = ((got - exact).abs().sum() / exact.abs().sum()).item()
        assert rel_l1 < 0.05, (impl, rel_l1)


def test_wrong_head_count_raises_at_call():
    model, ids = tiny_model(), input_ids()
    hf.register({"default": {"cdfthreshd": [0.9, 0.9]}})            # 2 values, 4 heads
    with pytest.raises(ValueError, match="cdfthreshd"):
        logits(model, ids, "sparge")


def test_full_attention_layers_from_config():
    from types import SimpleNamespace
    assert hf.full_attention_layers(tiny_model().config) == [0]
    old = SimpleNamespace(num_hidden_layers=12, layer_types=None, sliding_window=512,
                          sliding_window_pattern=6)
    assert hf.full_attention_layers(old) == [5, 11]
    assert hf.full_attention_layers(tiny_model("llama").config) == [0, 1]
