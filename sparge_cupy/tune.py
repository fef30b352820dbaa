"""Per-head tuning of SpargeAttn's thresholds (SPEC.md section 5), and ``python -m sparge_cupy.tune``.

Given a few inputs of one attention layer, find for every query head the thresholds
(theta = ``simthreshd1``, tau = ``cdfthreshd`` or ``topk``, lambda = ``pvthreshd``) with the highest
sparsity whose relative L1 error stays under ``l1`` with Stage 1 alone and under ``pv_l1`` once Stage 2
is on. Errors are measured like SPEC.md section 4 says, per head, against dense float64 attention on
the same inputs, with the quantization the user will run (``qk``, ``pv``, ``rebalance``); over several
inputs a head's error is the **largest** over the inputs (every input must meet the bound) and its
sparsity is pooled (kept blocks over valid blocks, summed over the inputs).

The head's relative L1 is a mean over all its rows, so one threshold per head may leave a few
query blocks with errors several times the bound (on Gemma 3 at 16K tokens, tuned at 0.05, single
query blocks reach 0.36 while the oracle's map stays under 0.16). ``block_factor`` F bounds them
too. A query block's relative L1 is ``sum |O - O_ref| / sum |O_ref|`` over its ``block_q`` rows
(per batch element); the **block error** of a head is the ``block_quantile`` quantile q of these
over its query blocks (``numpy.quantile``, method "higher": at least a share q of the blocks are
at or below it; q = 1, the default, is the largest), the largest over the inputs. With F, the
block error must stay at most ``F * l1`` with Stage 1 and ``F * pv_l1`` with Stage 2: in the
search a setting's error is ``max(L1, block error / F)`` against the head's bound (None: the
head's L1 alone, as before). Both evaluators measure it and the exact check enforces it. Whatever
F, the block error is reported (``stage1_block_l1``, ``block_l1``).

The search, for all heads of the layer at once (the API takes per-head thresholds, so one call
evaluates a different candidate for every head):

1. theta on a grid (``thetas``); for each theta, tau by bisection on ``x = -log10(1 - tau)`` over
   tau in [0.5, 0.9999] (some heads of real models need tau = 0.998; ``topk`` mode bisects topk in
   [0.02, 1] linearly; ``mass`` mode, the mass threshold rule ``nk * P^ >= t`` of
   :func:`reference.select_mass_threshold`, bisects ``log10 t`` over t in [1e-3, 1e3]). Per head
   keep the theta and tau of highest Stage-1 sparsity that meet ``l1``. A head that no (theta,
   tau) makes sparser within ``l1`` keeps every block (saved as theta = -1, tau = 1, topk = 1 or
   mass threshold 0, which the API turns into exactly the full map).
2. lambda by bisection on ``log2(lambda)`` over [0.5, 64] against ``pv_l1``, the Stage-1 map fixed;
   a head whose Stage 2 skips nothing keeps lambda = inf (filter off).
3. A head whose total sparsity (SPEC.md section 4) stays below ``min_sparsity`` (default 0.1) runs
   dense: every valid block, filter off (``dense`` flag, thresholds -1, 1, inf).

Two evaluators answer "error and sparsity of these per-head thresholds":

- ``"exact"``: on CuPy arrays the public API (:func:`sparge_cupy.predict_block_map`, then
  :func:`sparge_cupy.block_sparse_attn`: the GPU kernels, milliseconds per call; the default
  there), on NumPy arrays what the API runs there (the reference's ``predict_block_map`` and
  ``block_sparse_attention``, output rounded to the input dtype), which also takes the
  reference-only ``qk = pv = "fp32"`` (no quantization) for measurements.
- ``"curves"`` (NumPy only, the default there; the reference takes tens of seconds per call at 4K
  tokens). Per query block, keeping a set of key blocks gives ``O = sum_j N_j / sum_j l_j`` over
  per-block partial sums, and for a fixed theta the blocks TopCdf/TopK/the mass threshold keep grow
  as a prefix of one order (the fix blocks, then the compressed map's ranking), so one pass over the
  data gives the error of *every* tau at once; likewise the Stage 2 skips of a query row group grow
  as a prefix of its blocks ordered by ``rowmax - running max``, so one more pass gives the error
  of every lambda.
  The maps, block counts and skip counts are exactly the reference's; the values differ from the
  reference only in where P is rounded to fp8/fp16 (relative to the row's maximum over every
  valid key instead of its running maximum over the kept ones) and in float32 summation order.
  That difference is small near the bounds tuning uses (about 3% of the error at 0.05-0.1) but
  grows with the error: where a map drops the blocks holding a row's maximum the two scales
  differ, and the curves' value can be far from the exact one (0.39 against 0.47 in one eval
  sweep row at theta -1, tau 0.9: the sweep's high-error rows are approximate). The chosen
  thresholds are then checked with the exact evaluator (``verify=True``): a head that misses a
  bound there is searched again against a
  bound tightened by the gap (at most ``MAX_ROUNDS`` times); one that still misses ``l1`` keeps
  every block, one that misses ``pv_l1`` turns Stage 2 off. The numbers saved are the exact ones.

Results save to a small JSON file keyed by layer name (schema below, :func:`save_tuning`,
:func:`load_tuning`); ``LayerTuning.kwargs()`` gives the arguments of :func:`sparge_cupy.sparge_attn`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from . import _checks as ck
from .config import CONFIG
from .reference.predict import PREDICTORS

SCHEMA = "sparge-cupy/tuning"
SCHEMA_VERSION = 1
DEFAULT_THETAS = (-1.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
MODES = ("cdf", "topk", "mass")
RULE_KEYWORDS = {"cdf": "cdfthreshd", "topk": "topk", "mass": "mass_threshold"}   # API keyword per mode
EVALUATORS = ("exact", "curves")
TAU_RANGE = (0.5, 0.9999)          # bisected on x = -log10(1 - tau)
TOPK_RANGE = (0.02, 1.0)           # bisected linearly
MASS_RANGE = (1e-3, 1e3)           # bisected on log10(t); a full head saves t = 0
FULL_THRESHOLD = {"cdf": 1.0, "topk": 1.0, "mass": 0.0}   # the value that keeps every valid block
LAMBDA_RANGE = (0.5, 64.0)         # bisected on log2(lambda)
STEPS = 12                         # bisection steps: x to 3.7 / 4096, log2(lambda) to 7 / 4096
MAX_ROUNDS = 3                     # verify-and-tighten rounds of the curves evaluator
F32 = np.float32


# ---------------------------------------------------------------------------------------------
# The result and its file.

@dataclass
class LayerTuning:
    """Tuned thresholds of one layer, one entry per query head, and what they achieved.

    Thresholds (arrays [Hq], ready for :func:`sparge_cupy.sparge_attn`): ``simthreshd1``;
    ``cdfthreshd`` (mode "cdf"), ``topk`` (mode "topk") or ``mass_threshold`` (mode "mass"), the
    others None; ``pvthreshd`` (inf = Stage 2 off). ``dense`` [Hq] bool: the head runs with every
    valid block and no filter (its thresholds are then -1, 1 (mass: 0), inf, which the API turns
    into exactly that). ``meets_bound``: the saved error is within the bounds (False only where
    even the dense quantized head exceeds ``l1``, or with ``block_factor`` its block error exceeds
    ``block_factor * l1``: see ``quant_floor_l1``). Files written before the mass mode have no
    ``mass_threshold`` field.

    Achieved, per head (errors: largest over the tuning inputs; sparsity: pooled over them):
    ``stage1_sparsity``, ``stage2_sparsity`` (skipped / visited row-group P V products),
    ``total_sparsity`` (SPEC.md section 4), ``stage1_l1`` (Stage 2 off), ``l1`` (as saved, Stage 2
    on), ``quant_floor_l1`` (every valid block, no filter: the error of quantization alone),
    ``stage1_block_l1`` and ``block_l1`` (the block error: the ``block_quantile`` quantile of the
    query blocks' relative L1, 1 = the largest; Stage 2 off / on). ``block_factor``: the
    per-query-block bound factor it was tuned with (None: none). Files written before the
    per-block bound have none of these (None, quantile 1).
    """
    layer: str
    simthreshd1: np.ndarray
    cdfthreshd: np.ndarray | None
    topk: np.ndarray | None
    pvthreshd: np.ndarray
    dense: np.ndarray
    meets_bound: np.ndarray
    stage1_sparsity: np.ndarray
    stage2_sparsity: np.ndarray
    total_sparsity: np.ndarray
    stage1_l1: np.ndarray
    l1: np.ndarray
    quant_floor_l1: np.ndarray
    l1_bound: float
    pv_l1_bound: float
    min_sparsity: float
    qk: str = "int8"
    pv: str = "fp8"
    rebalance: bool = True
    attention_sink: bool = True
    local_window: bool = False
    mode: str = "cdf"
    mass_threshold: np.ndarray | None = None
    predictor: str = "paper"
    block_factor: float | None = None
    block_quantile: float = 1.0
    stage1_block_l1: np.ndarray | None = None
    block_l1: np.ndarray | None = None
    thetas: tuple = DEFAULT_THETAS
    aggregate: str = "max over inputs"
    evaluator: str = "exact"
    backend: str = "reference"
    verified: bool = True
    inputs: list = field(default_factory=list)   # [{"tokens_q", "tokens_k", "is_causal", "scale"}]
    seconds: float = 0.0

    @property
    def heads(self):
        return len(self.simthreshd1)

    def kwargs(self):
        """Keyword arguments of :func:`sparge_cupy.sparge_attn` that run this layer as tuned."""
        kw = {"simthreshd1": self.simthreshd1.copy(),
              "pvthreshd": None if np.isinf(self.pvthreshd).all() else self.pvthreshd.copy(),
              "attention_sink": self.attention_sink, "qk": self.qk, "pv": self.pv,
              "rebalance": self.rebalance}
        if self.local_window:
            kw["local_window"] = True
        kw.update(_rule_kwargs(self.mode, self.threshold))
        if self.predictor != "paper":
            kw["predictor"] = self.predictor
        return kw

    @property
    def threshold(self):
        """The selection rule's per-head thresholds (tau, topk or the mass threshold)."""
        return getattr(self, RULE_KEYWORDS[self.mode])

    def to_json(self):
        """A dict of plain JSON values: per-head arrays as lists (float32 thresholds written with
        the shortest decimal that reads back to the same float32; inf as null)."""
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = [_json_number(x) for x in v]
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @classmethod
    def from_json(cls, d):
        kw = dict(d)
        for name in ("simthreshd1", "cdfthreshd", "topk", "mass_threshold"):
            kw[name] = None if kw.get(name) is None else np.asarray(kw[name], dtype=F32)
        kw["pvthreshd"] = np.asarray([np.inf if x is None else x for x in kw["pvthreshd"]], dtype=F32)
        for name in ("dense", "meets_bound"):
            kw[name] = np.asarray(kw[name], dtype=bool)
        for name in ("stage1_sparsity", "stage2_sparsity", "total_sparsity", "stage1_l1", "l1",
                     "quant_floor_l1", "stage1_block_l1", "block_l1"):
            if kw.get(name) is not None:
                kw[name] = np.asarray([np.nan if x is None else x for x in kw[name]], dtype=np.float64)
        kw["thetas"] = tuple(kw["thetas"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in known})

    def table(self):
        """A per-head text table."""
        thr = self.threshold
        name = {"cdf": "tau", "topk": "topk", "mass": "t"}[self.mode]
        nan = np.full(self.heads, np.nan)
        blk1 = nan if self.stage1_block_l1 is None else self.stage1_block_l1
        blk = nan if self.block_l1 is None else self.block_l1
        share = "every query block" if self.block_quantile == 1 else f"{self.block_quantile:.0%} of query blocks"
        per_block = "" if self.block_factor is None else f", {share} <= {self.block_factor:g} x"
        lines = [f"layer {self.layer}: l1 <= {self.l1_bound}, pv_l1 <= {self.pv_l1_bound}{per_block} "
                 f"({self.qk}/{self.pv}{', rebalanced' if self.rebalance else ''}; errors: {self.aggregate})",
                 f"{'head':>4} {'theta':>6} {name:>8} {'lambda':>7} "
                 f"{'s1':>6} {'s2':>6} {'total':>6} {'l1_s1':>7} {'l1':>7} {'floor':>7} {'blk_s1':>7} {'blk':>7}  note"]
        for h in range(self.heads):
            note = "dense" if self.dense[h] else ""
            if not self.meets_bound[h]:
                note += " bound missed (quantization floor)"
            lines.append(f"{h:>4} {self.simthreshd1[h]:>6.2f} {thr[h]:>8.5f} {self.pvthreshd[h]:>7.2f} "
                         f"{self.stage1_sparsity[h]:>6.3f} {self.stage2_sparsity[h]:>6.3f} "
                         f"{self.total_sparsity[h]:>6.3f} {self.stage1_l1[h]:>7.4f} {self.l1[h]:>7.4f} "
                         f"{self.quant_floor_l1[h]:>7.4f} {blk1[h]:>7.4f} {blk[h]:>7.4f}  {note}")
        lines.append(f"mean  stage1 {self.stage1_sparsity.mean():.3f}  stage2 {self.stage2_sparsity.mean():.3f}  "
                     f"total {self.total_sparsity.mean():.3f}  ({self.evaluator} evaluator on "
                     f"{self.backend}{', verified exactly' if self.verified else ''}, {self.seconds:.1f} s)")
        return "\n".join(lines)


def _rule_kwargs(mode, thr):
    """``{keyword: per-head float32 thresholds}`` of the selection rule of ``mode``."""
    return {RULE_KEYWORDS[mode]: np.asarray(thr, F32).copy()}


def _json_number(x):
    if x.dtype == np.bool_:
        return bool(x)
    if not math.isfinite(x):
        return None
    if x.dtype == np.float32:
        return float(str(x))          # the shortest decimal that reads back to this float32
    return round(float(x), 6) if x.dtype.kind == "f" else x.item()


def _dumps(doc):
    """JSON with one line per field (per-head lists stay on one line)."""
    layers = ",\n".join(
        f"  {json.dumps(name)}: {{\n" + ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in layer.items())
        + "\n  }" for name, layer in doc["layers"].items())
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "layers")
    return "{\n" + head + ',\n "layers": {\n' + layers + "\n }\n}\n"


def save_tuning(path, results):
    """Write ``results`` ({layer name: LayerTuning} or a list of them) as JSON.

    File schema (version 1)::

        {"schema": "sparge-cupy/tuning", "version": 1,
         "config": {"block_q": 128, "block_k": 64, "pv_group_rows": 16},
         "layers": {"<layer name>": {<the LayerTuning fields>}}}

    Per-head fields are lists of length Hq; ``pvthreshd`` holds null for inf (Stage 2 off).
    """
    if not isinstance(results, dict):
        results = {r.layer: r for r in results}
    doc = {"schema": SCHEMA, "version": SCHEMA_VERSION,
           "config": {"block_q": CONFIG.block_q, "block_k": CONFIG.block_k,
                      "pv_group_rows": CONFIG.pv_group_rows},
           "layers": {name: r.to_json() for name, r in results.items()}}
    Path(path).write_text(_dumps(doc))


def load_tuning(path):
    """Read a file of :func:`save_tuning`: {layer name: LayerTuning}."""
    try:
        doc = json.loads(Path(path).read_text())
    except ValueError as e:         # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not readable as a sparge-cupy tuning file (JSON: {e})") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{path}: not a sparge-cupy tuning file (schema {schema!r})")
    if doc.get("version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: tuning schema version {doc.get('version')}, this code reads {SCHEMA_VERSION}")
    geom = (doc["config"]["block_q"], doc["config"]["block_k"], doc["config"]["pv_group_rows"])
    if geom != (CONFIG.block_q, CONFIG.block_k, CONFIG.pv_group_rows):
        raise ValueError(f"{path}: tuned for blocks {geom}, this build uses "
                         f"{(CONFIG.block_q, CONFIG.block_k, CONFIG.pv_group_rows)}")
    return {name: LayerTuning.from_json(d) for name, d in doc["layers"].items()}


HF_SETTINGS_FORMAT = "sparge-cupy.hf-settings/1"


def to_hf_settings(results, meta=None):
    """The tuned layers in the settings format of :mod:`sparge_cupy.hf` (``load_settings``).

    Per layer: the per-head thresholds (dense heads as theta = -1, tau = 1, topk = 1 or
    mass_threshold = 0, lambda null: every block, no filter), or ``{"dense": true}`` when every
    head of the layer is dense (the integration then runs the model's own attention there). The
    options (``qk``, ``pv``, ``rebalance``, ``attention_sink``, ``local_window``, ``predictor``) are global in that
    format, so every layer must have been tuned with the same ones. Layer names must name an index
    (``"5"``, ``"model.layers.5.self_attn"``).
    """
    if not isinstance(results, dict):
        results = {r.layer: r for r in results}
    options, layers = None, {}
    for name, r in results.items():
        opts = {"qk": r.qk, "rebalance": bool(r.rebalance), "pv": r.pv,
                "attention_sink": bool(r.attention_sink), "local_window": bool(r.local_window),
                "predictor": r.predictor}
        if options is None:
            options = opts
        elif opts != options:
            raise ValueError(f"results: layer {name!r} was tuned with {opts}, another layer with {options}; "
                             "the hf settings hold one set of options")
        if r.dense.all():
            layers[name] = {"dense": True}
            continue
        entry = {"simthreshd1": [_json_number(x) for x in r.simthreshd1]}
        entry[RULE_KEYWORDS[r.mode]] = [_json_number(x) for x in r.threshold]
        entry["pvthreshd"] = [_json_number(x) for x in r.pvthreshd]
        layers[name] = entry
    bounds = sorted({(r.l1_bound, r.pv_l1_bound) for r in results.values()})
    return {"format": HF_SETTINGS_FORMAT, "options": options or {}, "layers": layers,
            "meta": {"source": "sparge_cupy.tune", "l1_pv_l1_bounds": bounds, **(meta or {})}}


# ---------------------------------------------------------------------------------------------
# Inputs and metrics.

@dataclass
class _Input:
    q: object            # HND, NumPy or CuPy
    k: object
    v: object
    is_causal: bool
    scale: float
    ref: object          # dense float64 output, HND, on the inputs' device
    den: np.ndarray      # [Hq] sum |ref| per head
    den_blk: np.ndarray | None = None   # [B, Hq, nq] sum |ref| per query block


def _xp(x):
    if ck.array_module_name(x) == "cupy":
        import cupy
        return cupy
    return np


def _dense_reference(q, k, v, *, is_causal, scale):
    """Dense float64 attention (HND) on the inputs' device: the truth every error is measured on."""
    if _xp(q) is np:
        from .reference import exact_attention
        return exact_attention(q, k, v, is_causal=is_causal, scale=scale)
    import cupy as cp
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qg = q.astype(cp.float64).reshape(B, Hkv, g, Lq, D)
    k64, v64 = k.astype(cp.float64), v.astype(cp.float64)
    out = cp.empty((B, Hq, Lq, D), cp.float64)
    rows = max(1, (1 << 27) // max(1, B * Hq * Lk))        # 1 GiB of float64 scores at a time
    for r0 in range(0, Lq, rows):
        r1 = min(Lq, r0 + rows)
        s = (qg[:, :, :, r0:r1].reshape(B, Hkv, g * (r1 - r0), D) @ k64.swapaxes(-1, -2)) * scale
        s = s.reshape(B, Hkv, g, r1 - r0, Lk)
        if is_causal:
            mask = cp.arange(Lk)[None, :] <= cp.arange(r0, r1)[:, None] + (Lk - Lq)
            s = cp.where(mask, s, -cp.inf)
        m = s.max(axis=-1, keepdims=True)
        m = cp.where(cp.isfinite(m), m, 0.0)
        p = cp.exp(s - m)
        l = p.sum(axis=-1, keepdims=True)
        o = (p.reshape(B, Hkv, g * (r1 - r0), Lk) @ v64).reshape(B, Hkv, g, r1 - r0, D)
        out[:, :, r0:r1] = cp.where(l > 0, o / cp.where(l > 0, l, 1.0), 0.0).reshape(B, Hq, r1 - r0, D)
    return out


def _per_block_l1_num(out, ref, bq=CONFIG.block_q):
    """``sum |out - ref|`` over each query block's rows: NumPy ``[B, Hq, nq]`` (the last block
    may be partial)."""
    xp = _xp(ref)
    d = xp.abs(out.astype(xp.float64) - ref).sum(axis=-1)                      # [B, H, L]
    B, H, L = d.shape
    pad = -L % bq
    if pad:
        d = xp.concatenate([d, xp.zeros((B, H, pad), xp.float64)], axis=-1)
    num = d.reshape(B, H, -1, bq).sum(axis=-1)
    return np.asarray(num.get() if xp is not np else num, dtype=np.float64)


def _block_stat(num_blk, den_blk, quantile=1.0):
    """Per head ``[H]``: the block error, the ``quantile`` quantile (method "higher"; 1: the
    largest) of the relative L1 of the query blocks ``[B, H, nq]`` (a block whose reference is all
    zero counts as 0)."""
    rel = np.where(den_blk > 0, num_blk / np.where(den_blk > 0, den_blk, 1.0), 0.0)
    if quantile == 1.0:
        return rel.max(axis=(0, 2))
    return np.quantile(rel.transpose(1, 0, 2).reshape(rel.shape[1], -1), quantile, axis=1, method="higher")


@dataclass
class _Eval:
    """Per input and head ``[n_inputs, Hq]``: L1 numerator and denominator, Stage-1 block counts,
    Stage-2 row-group counts, P V block products done, block error (see the module docstring)."""
    num: np.ndarray
    den: np.ndarray
    kept: np.ndarray
    valid: np.ndarray
    groups: np.ndarray
    skipped: np.ndarray
    pv_done: np.ndarray
    blk: np.ndarray

    @property
    def l1(self):              # largest over the inputs
        return (self.num / np.where(self.den > 0, self.den, 1.0)).max(axis=0)

    @property
    def block_l1(self):        # the block error, largest over the inputs
        return self.blk.max(axis=0)

    def error(self, block_factor):
        """The error the search bounds: L1, or with a per-block factor F ``max(L1, block_l1 / F)``
        (so ``error <= bound`` says both ``L1 <= bound`` and every block ``<= F * bound``)."""
        return self.l1 if block_factor is None else np.maximum(self.l1, self.block_l1 / block_factor)

    @property
    def s1(self):
        return 1.0 - self.kept.sum(0) / self.valid.sum(0)

    @property
    def s2(self):
        g = self.groups.sum(0)
        return np.where(g > 0, self.skipped.sum(0) / np.where(g > 0, g, 1), 0.0)

    @property
    def total(self):
        return 1.0 - (self.kept.sum(0) + self.pv_done.sum(0)) / (2.0 * self.valid.sum(0))

    @staticmethod
    def stack(per_input):
        return _Eval(*(np.stack([getattr(e, f.name) for e in per_input]) for f in fields(_Eval)))


def _stats_eval(x, out, stats, block_quantile=1.0):
    """One input's _Eval row from an output and the API's stats dict."""
    num_blk = _per_block_l1_num(out, x.ref)
    return _Eval(num=num_blk.sum(axis=(0, 2)), den=x.den,
                 kept=np.asarray(stats["kept_blocks"]).sum(0).astype(np.float64),
                 valid=np.asarray(stats["valid_blocks"]).sum(0).astype(np.float64),
                 groups=np.asarray(stats["pv_groups"]).sum(0).astype(np.float64),
                 skipped=np.asarray(stats["pv_skipped"]).sum(0).astype(np.float64),
                 pv_done=np.asarray(stats["pv_blocks_computed"]).sum(0).astype(np.float64),
                 blk=_block_stat(num_blk, x.den_blk, block_quantile))


# ---------------------------------------------------------------------------------------------
# Evaluator 1: the public API (GPU kernels on CuPy arrays, the reference on NumPy arrays).

class _ExactEvaluator:
    name = "exact"

    def __init__(self, inputs, *, thetas, mode, qk, pv, rebalance, attention_sink, predictor="paper",
                 local_window=False, block_quantile=1.0):
        self.inputs, self.thetas, self.mode = inputs, np.asarray(thetas, F32), mode
        self.block_quantile = block_quantile
        self.opts = dict(qk=qk, pv=pv, rebalance=rebalance)
        self.sink, self.predictor, self.local = attention_sink, predictor, local_window
        self.gpu = _xp(inputs[0].q) is not np
        self._maps = None

    def _map(self, x, theta_idx, thr, dense):
        sel = _rule_kwargs(self.mode, thr)
        if self.gpu:
            from . import api
            bm = api.predict_block_map(x.q, x.k, is_causal=x.is_causal, scale=x.scale,
                                       simthreshd1=self.thetas[theta_idx], attention_sink=self.sink,
                                       local_window=self.local, predictor=self.predictor, **sel)
        else:
            from . import reference as R
            bm = R.predict_block_map(x.q, x.k, is_causal=x.is_causal, scale=x.scale,
                                     simthreshd1=self.thetas[theta_idx], attention_sink=self.sink,
                                     local_window=self.local, predictor=self.predictor, **sel)
        if dense.any():                      # every block; the kernel ignores causally invalid ones
            bm[:, _xp(bm).asarray(np.flatnonzero(dense))] = True
        return bm

    def _attend(self, x, bm, lam):
        if self.gpu:
            from . import api
            out, stats = api.block_sparse_attn(x.q, x.k, x.v, bm, is_causal=x.is_causal, scale=x.scale,
                                               pvthreshd=None if np.isinf(lam).all() else lam,
                                               return_stats=True, **self.opts)
        else:                                # the reference, as the API runs it (output in the input dtype)
            from . import reference as R
            out, stats = R.block_sparse_attention(x.q, x.k, x.v, bm, is_causal=x.is_causal, scale=x.scale,
                                                  pvthreshd=np.asarray(lam, F32), return_stats=True, **self.opts)
            out = out.astype(x.q.dtype)
        return _stats_eval(x, out, stats, self.block_quantile)

    def stage1(self, theta_idx, thr, dense):
        inf = np.full(len(thr), np.inf, F32)
        return _Eval.stack([self._attend(x, self._map(x, theta_idx, thr, dense), inf) for x in self.inputs])

    def set_stage1(self, theta_idx, thr, dense):
        self._maps = [self._map(x, theta_idx, thr, dense) for x in self.inputs]

    def stage2(self, lam):
        return _Eval.stack([self._attend(x, bm, np.asarray(lam, F32)) for x, bm in zip(self.inputs, self._maps)])


# ---------------------------------------------------------------------------------------------
# Evaluator 2: error curves over every tau and every lambda from per-block partial sums (NumPy).

class _CurveInput:
    """The curves of one input; see the module docstring. Shapes: B batch, H query heads, nq query
    blocks, nk key blocks, A thetas, G rows per Stage-2 group, ng groups per query block."""

    def __init__(self, x, *, thetas, mode, qk, pv, rebalance, attention_sink, predictor="paper",
                 local_window=False, cfg=CONFIG):
        from . import reference as R
        self.x, self.mode, self.pv, self.cfg = x, mode, pv, cfg
        self.thetas, self.sink, self.predictor = np.asarray(thetas, F32), attention_sink, predictor
        self.local = local_window
        q, k, v = x.q, x.k, x.v
        B, H, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        bq, bk = cfg.block_q, cfg.block_k
        self.B, self.H, self.Lq, self.Lk, self.Hkv = B, H, Lq, Lk, Hkv
        self.nq, self.nk = R.num_blocks(Lq, bq), R.num_blocks(Lk, bk)
        self.valid = R.valid_blocks(Lq, Lk, bq, bk, x.is_causal)
        self.n_valid_row = self.valid.sum(axis=1)                        # a prefix of every row
        self.out_dtype = np.dtype(q.dtype)
        self.q_op, self.dq, self.k_op, self.dk, _ = R.quantized_operands(
            q, k, scale=x.scale, qk=qk, rebalance=rebalance, cfg=cfg)
        if pv == "fp8":
            self.v_op, dv = R.quantize_v_fp8(v, cfg)
            self.v_scale = np.repeat(dv, H // Hkv, axis=1).astype(np.float64) / cfg.fp8_max  # [B,H,1,D]
        else:
            self.v_op = R.round_fp16(v) if pv == "fp16" else np.asarray(v, F32)
            self.v_scale = None

        # Stage 1 per theta: the order in which the rule adds blocks, and the fix blocks. ``rank``:
        # TopCdf's cumulative sum of the ranked P^; the mass threshold's ranked nk * P^ (-inf: not
        # finite), non-increasing along the order, so the kept set is the prefix where rank >= t.
        A = len(thetas)
        self.order = np.empty((A, B, H, self.nq, self.nk), np.int64)
        self.rank = np.empty((A, B, H, self.nq, self.nk), F32)
        self.n_finite = np.empty((A, B, H, self.nq), np.int64)
        self.kept_at = np.empty((A, B, H, self.nq, self.nk + 1), np.int64)  # kept blocks after c selected
        base = np.empty((A, B, H, self.nq, self.nk), bool)
        adds = np.empty((A, B, H, self.nq, self.nk), bool)
        local = R.local_blocks(Lq, Lk, bq, bk) & self.valid if local_window else None
        for a, theta in enumerate(thetas):
            _, det = R.predict_block_map(q, k, is_causal=x.is_causal, scale=x.scale,
                                         simthreshd1=np.full(H, theta, F32), cdfthreshd=np.ones(H, F32),
                                         attention_sink=attention_sink, return_details=True,
                                         predictor=predictor, cfg=cfg)
            p_hat, q_fix, k_fix = det["p_hat"], det["q_fix"], det["k_fix"]
            finite = self.valid & ~k_fix[:, :, None, :]
            b_a = (q_fix[..., None] | k_fix[:, :, None, :]) & self.valid
            if attention_sink:
                b_a[..., 0] |= self.valid[:, 0]
            if local_window:
                b_a |= local
            if mode == "mass":
                # P^ descending, lower j first, finite columns first (a finite P^ = 0 kept at t = 0
                # must not fall behind a masked one): the first is select_mass_threshold's argmax
                order = np.argsort(np.where(finite, -p_hat, np.inf), axis=-1, kind="stable")
                scaled = np.where(finite, (F32(self.nk) * p_hat).astype(F32), -np.inf).astype(F32)
                self.rank[a] = np.take_along_axis(scaled, order, axis=-1)
            else:
                order = np.argsort(-p_hat, axis=-1, kind="stable")       # as select_topcdf/topk
                self.rank[a] = np.cumsum(np.take_along_axis(p_hat, order, axis=-1), axis=-1, dtype=F32)
            self.order[a] = order
            self.n_finite[a] = finite.sum(axis=-1)
            base[a] = b_a
            adds[a] = np.take_along_axis(self.valid & ~b_a, order, axis=-1)
            self.kept_at[a] = b_a.sum(-1)[..., None] + np.concatenate(
                [np.zeros(adds[a].shape[:-1] + (1,), np.int64), np.cumsum(adds[a], axis=-1)], axis=-1)

        # One pass over the query blocks: the Stage-1 error of every prefix, for every theta.
        self.E1 = np.zeros((A, B, H, self.nq, self.nk + 1))
        for i in range(self.nq):
            nb = int(self.n_valid_row[i])
            if nb == 0:
                continue
            N, l, _, o_ref = self._partials(i, nb)
            bi, hi = np.arange(B)[:, None], np.arange(H)[None, :]
            for a in range(A):
                w = base[a][:, :, i, :nb].astype(np.float64)
                acc = np.einsum("bhj,bhjrd->bhrd", w, N)
                den = np.einsum("bhj,bhjr->bhr", w, l)[..., None]
                E = self.E1[a][:, :, i]
                E[:, :, 0] = self._err(acc, den, o_ref)
                add = adds[a][:, :, i]
                last = int(np.max(np.nonzero(add.any(axis=(0, 1)))[0], initial=-1)) + 1
                for c in range(last):
                    j = np.minimum(self.order[a][:, :, i, c], nb - 1)
                    on = add[:, :, c]
                    acc += np.where(on[..., None, None], N[bi, hi, j], 0.0)
                    den += np.where(on[..., None], l[bi, hi, j], 0.0)[..., None]
                    E[:, :, c + 1] = self._err(acc, den, o_ref)
                E[:, :, last + 1:] = E[:, :, last:last + 1]

    # -- the partial sums of one query block, with the surrogate's rounding ----------------------
    def _partials(self, i, nb):
        """``N [B,H,nb,rows,D]`` (P rounded as the kernel rounds it, times V as quantized),
        ``l [B,H,nb,rows]`` (unrounded P), per-block row maxima of the log2 logits ``[B,H,nb,rows]``
        and the float64 reference rows ``[B,H,rows,D]``."""
        cfg = self.cfg
        bq, bk = cfg.block_q, cfg.block_k
        B, H, Hkv, Lq, Lk = self.B, self.H, self.Hkv, self.Lq, self.Lk
        g = H // Hkv
        r0, r1 = i * bq, min(Lq, (i + 1) * bq)
        rows = r1 - r0
        n_keys = min(Lk, nb * bk)
        D = self.q_op.shape[-1]
        qi = self.q_op[:, :, r0:r1].reshape(B, Hkv, g * rows, D)
        s = (qi @ self.k_op[:, :, :n_keys].swapaxes(-1, -2)).reshape(B, H, rows, n_keys)
        # the kernel's factor per (query block, key block): (dq_i dk_j) scale log2(e), in float32
        dk = np.repeat(self.dk[:, :, :nb], g, axis=1)
        f = ((self.dq[:, :, i, None] * dk) * F32(self.x.scale) * F32(cfg.log2e)).astype(F32)
        s = (s * np.repeat(f, bk, axis=-1)[..., None, :n_keys]).astype(F32)
        if self.x.is_causal:
            s = np.where(np.arange(n_keys)[None, :] <= np.arange(r0, r1)[:, None] + (Lk - Lq), s, -np.inf)
        pad = nb * bk - n_keys
        if pad:
            s = np.concatenate([s, np.full(s.shape[:3] + (pad,), -np.inf, F32)], axis=-1)
        blk_max = s.reshape(B, H, rows, nb, bk).max(axis=-1).transpose(0, 1, 3, 2)
        m = s.max(axis=-1, keepdims=True)
        p = np.exp2(s - np.where(np.isfinite(m), m, F32(0))).astype(F32)
        if self.pv == "fp8":
            from .reference import round_e4m3
            p_op = round_e4m3(p * F32(cfg.fp8_max))
        elif self.pv == "fp16":
            from .reference import round_fp16
            p_op = round_fp16(p)
        else:
            p_op = p
        l = p.reshape(B, H, rows, nb, bk).sum(axis=-1, dtype=F32).transpose(0, 1, 3, 2)
        v = self.v_op[:, :, :n_keys]
        if pad:
            v = np.concatenate([v, np.zeros(v.shape[:2] + (pad, v.shape[3]), F32)], axis=2)
        p_op = p_op.reshape(B, Hkv, g * rows, nb * bk)
        N = np.empty((B, H, nb, rows, v.shape[-1]), F32)
        for j in range(nb):
            pj = np.ascontiguousarray(p_op[..., j * bk:(j + 1) * bk])
            N[:, :, j] = (pj @ v[:, :, j * bk:(j + 1) * bk]).reshape(B, H, rows, -1)
        return N, l, blk_max, self.x.ref[:, :, r0:r1]

    def _out(self, acc, den):
        with np.errstate(divide="ignore", invalid="ignore"):
            o = np.where(den > 0, acc / np.where(den > 0, den, 1.0), 0.0)
        if self.v_scale is not None:       # O_d = acc_d dv_d / (448 l)
            B, H, _, D = self.v_scale.shape
            o = o * self.v_scale.reshape((B, H) + (1,) * (o.ndim - 3) + (D,))
        if self.out_dtype != np.float32:     # the user's output dtype rounds once more
            o = o.astype(self.out_dtype).astype(np.float64)
        return o

    def _err(self, acc, den, o_ref):
        """L1 numerator per (b, h)."""
        return np.abs(self._out(acc, den) - o_ref).sum(axis=(-2, -1))

    # -- Stage 1 ----------------------------------------------------------------------------------
    def _selected(self, theta_idx, thr):
        """Blocks the rule selects per (b, h, query block): ``[B, H, nq]``; ``theta_idx`` per head
        as a gather index."""
        H = self.H
        hh = np.arange(H)
        rank = self.rank[theta_idx, :, hh].transpose(1, 0, 2, 3)           # [B, H, nq, nk]
        n_fin = self.n_finite[theta_idx, :, hh].transpose(1, 0, 2)
        thr = np.asarray(thr, F32)[None, :, None]
        if self.mode == "cdf":
            bound = (thr[..., None] * rank[..., -1:]).astype(F32)
            n = np.maximum((rank <= bound).sum(axis=-1), 1)
        elif self.mode == "mass":
            n = np.maximum((rank >= thr[..., None]).sum(axis=-1), 1)
        else:
            nv = self.n_valid_row[None, None, :]
            n = np.floor((thr * nv.astype(F32)).astype(F32)).astype(np.int64)
            n = np.where(nv > 0, np.maximum(n, 1), 0)
        return np.minimum(n, n_fin)

    def stage1_rows(self, theta_idx, thr, dense):
        """``(num [B, H, nq], kept [H])`` of these thresholds (dense heads: every valid block):
        the L1 numerator per query block, the kept blocks per head."""
        theta_idx = np.asarray(theta_idx)
        n = self._selected(theta_idx, thr)
        hh = np.arange(self.H)
        E = self.E1[theta_idx, :, hh].transpose(1, 0, 2, 3)               # [B, H, nq, nk+1]
        K = self.kept_at[theta_idx, :, hh].transpose(1, 0, 2, 3)
        n = np.where(dense[None, :, None], self.nk, n)
        num = np.take_along_axis(E, n[..., None], axis=-1)[..., 0]
        kept = np.take_along_axis(K, n[..., None], axis=-1)[..., 0].sum(axis=(0, 2))
        return num, kept.astype(np.float64)

    def block_map(self, theta_idx, thr, dense):
        """The exact Stage-1 map of these thresholds (the reference's predictor)."""
        from . import reference as R
        sel = _rule_kwargs(self.mode, thr)
        bm = R.predict_block_map(self.x.q, self.x.k, is_causal=self.x.is_causal, scale=self.x.scale,
                                 simthreshd1=self.thetas[theta_idx], attention_sink=self.sink,
                                 local_window=self.local, predictor=self.predictor, cfg=self.cfg, **sel)
        bm[:, dense] = True
        return bm & self.valid

    # -- Stage 2 ----------------------------------------------------------------------------------
    def set_stage1(self, theta_idx, thr, dense):
        """Fix the map and build, per query row group, the error after skipping its c most
        skippable blocks (c = 0..nk) and the sorted ``delta = rowmax - running max``."""
        cfg = self.cfg
        G = cfg.pv_group_rows
        ng = cfg.block_q // G
        B, H, nq, nk = self.B, self.H, self.nq, self.nk
        bm = self.block_map(theta_idx, thr, dense)
        _, kept = self.stage1_rows(theta_idx, thr, dense)
        if not np.array_equal(bm.sum(axis=(0, 2, 3)), kept.astype(np.int64)):
            raise RuntimeError("tune: the curves' block counts differ from the reference's map "
                               f"({kept} != {bm.sum(axis=(0, 2, 3))}): an internal error")
        self.map = bm
        self.ds = np.full((B, H, nq, ng, nk), np.inf, F32)                 # sorted deltas, inf = never
        self.E2 = np.zeros((B, H, nq, ng, nk + 1))
        rows_real = np.minimum(cfg.block_q, self.Lq - np.arange(nq) * cfg.block_q)
        self.real_groups = -(-rows_real // G)                                # [nq]
        bi, hi, gi = np.arange(B)[:, None, None], np.arange(H)[None, :, None], np.arange(ng)[None, None, :]
        for i in range(nq):
            nb = int(self.n_valid_row[i])
            if nb == 0:
                continue
            N, l, blk_max, o_ref = self._partials(i, nb)
            rows = N.shape[3]
            keep = bm[:, :, i, :nb]
            # running maximum over the kept blocks in increasing j: Stage 2's delta per group
            m_prev = np.full((B, H, rows), -np.inf, F32)
            delta_g = np.full((B, H, ng, nb), np.inf, F32)
            for j in range(nb):
                rm = blk_max[:, :, j]
                with np.errstate(invalid="ignore"):
                    d = np.where(np.isneginf(m_prev), np.inf, rm - m_prev).astype(F32)
                d = np.concatenate([d, np.full((B, H, ng * G - rows), -np.inf, F32)], axis=-1)
                dg = d.reshape(B, H, ng, G).max(axis=-1)
                on = keep[:, :, j]
                delta_g[:, :, :, j] = np.where(on[..., None], dg, np.inf)
                m_prev = np.where(on[..., None], np.maximum(m_prev, rm), m_prev)
            order = np.argsort(delta_g, axis=-1, kind="stable")             # most skippable first
            ds = np.take_along_axis(delta_g, order, axis=-1)
            self.ds[:, :, i, :, :nb] = ds
            # the error per group as blocks are skipped in that order
            pad_rows = ng * G - rows
            Ng = np.concatenate([N, np.zeros(N.shape[:3] + (pad_rows, N.shape[4]), F32)], axis=3) if pad_rows else N
            lg = np.concatenate([l, np.zeros(l.shape[:3] + (pad_rows,), F32)], axis=3) if pad_rows else l
            Ng = Ng.reshape(B, H, nb, ng, G, -1)
            lg = lg.reshape(B, H, nb, ng, G)
            ref = np.concatenate([o_ref, np.zeros(o_ref.shape[:2] + (pad_rows, o_ref.shape[3]))], axis=2) \
                if pad_rows else o_ref
            ref = ref.reshape(B, H, ng, G, -1)
            w = keep.astype(np.float64)
            acc = np.einsum("bhj,bhjgrd->bhgrd", w, Ng)
            den = np.einsum("bhj,bhjgr->bhgr", w, lg)[..., None]
            E = self.E2[:, :, i]
            E[..., 0] = self._err(acc, den, ref)
            n_skippable = int((ds < np.inf).sum(axis=-1).max(initial=0))   # -inf: skippable
            for c in range(n_skippable):
                j = order[..., c]
                on = ds[..., c] < np.inf
                acc -= np.where(on[..., None, None], Ng[bi, hi, j, gi], 0.0)
                den -= np.where(on[..., None], lg[bi, hi, j, gi], 0.0)[..., None]
                den = np.maximum(den, 0.0)
                E[..., c + 1] = self._err(acc, den, ref)
            E[..., n_skippable + 1:] = E[..., n_skippable:n_skippable + 1]
        self.visited = (bm.sum(axis=-1) * self.real_groups[None, None, :])   # [B, H, nq]
        from . import reference as R
        self.mask_skips = R.mask_skips(bm, self.Lq, self.Lk, self.x.is_causal, G, cfg)

    def stage2_rows(self, lam):
        """``(num [B, H, nq], kept, visited groups, skipped groups, P V products done)`` ([H] each)."""
        lam = np.asarray(lam, F32)[None, :, None, None, None]
        ng = self.ds.shape[3]
        real = (np.arange(ng)[None, :] < self.real_groups[:, None])[None, None, :, :]   # [1,1,nq,ng]
        n = ((self.ds <= -lam) & np.isfinite(lam)).sum(axis=-1) * real
        num = np.take_along_axis(self.E2, n[..., None], axis=-1)[..., 0].sum(axis=3)   # [B, H, nq]
        # the skips the causal mask makes (delta -inf) are not Stage 2's: reference.mask_skips
        skipped = n.sum(axis=-1) - self.mask_skips * np.isfinite(lam[..., 0, 0])          # [B, H, nq]
        pv_done = ((self.visited - skipped) / np.maximum(self.real_groups, 1)[None, None, :]).sum(axis=(0, 2))
        return (num, self.map.sum(axis=(0, 2, 3)).astype(np.float64),
                self.visited.sum(axis=(0, 2)).astype(np.float64), skipped.sum(axis=(0, 2)).astype(np.float64),
                pv_done)


class _CurveEvaluator:
    name = "curves"

    def __init__(self, inputs, *, thetas, mode, qk, pv, rebalance, attention_sink, predictor="paper",
                 local_window=False, block_quantile=1.0, log=None):
        self.inputs, self.block_quantile = [], block_quantile
        for n, x in enumerate(inputs):
            t = time.perf_counter()
            c = _CurveInput(x, thetas=thetas, mode=mode, qk=qk, pv=pv, rebalance=rebalance,
                            attention_sink=attention_sink, predictor=predictor, local_window=local_window)
            self.inputs.append(c)
            if log:
                log(f"  curves of input {n}: {time.perf_counter() - t:.1f} s")

    def _valid(self, c):
        return np.full(c.H, c.B * c.valid.sum(), np.float64)

    def stage1(self, theta_idx, thr, dense):
        rows = []
        for c in self.inputs:
            num, kept = c.stage1_rows(np.asarray(theta_idx), thr, np.asarray(dense, bool))
            valid = self._valid(c)
            z = np.zeros(c.H)
            rows.append(_Eval(num.sum(axis=(0, 2)), c.x.den, kept, valid, z, z, kept,
                              _block_stat(num, c.x.den_blk, self.block_quantile)))
        return _Eval.stack(rows)

    def set_stage1(self, theta_idx, thr, dense):
        for c in self.inputs:
            c.set_stage1(np.asarray(theta_idx), thr, np.asarray(dense, bool))

    def stage2(self, lam):
        rows = []
        for c in self.inputs:
            num, kept, groups, skipped, pv_done = c.stage2_rows(lam)
            rows.append(_Eval(num.sum(axis=(0, 2)), c.x.den, kept, self._valid(c), groups, skipped, pv_done,
                              _block_stat(num, c.x.den_blk, self.block_quantile)))
        return _Eval.stack(rows)


# ---------------------------------------------------------------------------------------------
# The search.

def _thr(u, mode):
    """Threshold per head from the bisection variable u in [0, 1] (0: sparsest)."""
    u = np.asarray(u, np.float64)
    if mode == "cdf":
        x_lo, x_hi = (-math.log10(1.0 - t) for t in TAU_RANGE)
        return (1.0 - 10.0 ** -(x_lo + u * (x_hi - x_lo))).astype(F32)
    if mode == "mass":                 # u = 0: the largest threshold (sparsest)
        y_hi, y_lo = (math.log10(t) for t in MASS_RANGE)
        return (10.0 ** (y_lo + u * (y_hi - y_lo))).astype(F32)
    return (TOPK_RANGE[0] + u * (TOPK_RANGE[1] - TOPK_RANGE[0])).astype(F32)


def _lam(u):
    y_lo, y_hi = (math.log2(t) for t in LAMBDA_RANGE)
    return (2.0 ** (y_lo + np.asarray(u, np.float64) * (y_hi - y_lo))).astype(F32)


def _bisect(evaluate, bound, H, steps, block_factor=None):
    """Smallest u in [0, 1] per head with ``evaluate(u).error(block_factor) <= bound`` (assuming
    feasibility grows with u). Returns ``(u, feasible)``; u = 1 where infeasible."""
    lo, hi = np.zeros(H), np.ones(H)
    ok_hi = evaluate(hi).error(block_factor) <= bound
    ok_lo = evaluate(lo).error(block_factor) <= bound
    hi = np.where(ok_lo, lo, hi)
    active = ok_hi & ~ok_lo
    for _ in range(steps):
        if not active.any():
            break
        mid = (lo + hi) / 2
        ok = evaluate(mid).error(block_factor) <= bound
        hi = np.where(active & ok, mid, hi)
        lo = np.where(active & ~ok, mid, lo)
    return hi, ok_hi | ok_lo


def _search_stage1(ev, thetas, bound, mode, steps, log, block_factor=None):
    """Per head: (theta index, tau or topk, feasible, sparsity) of highest Stage-1 sparsity."""
    H = len(bound)
    no_dense = np.zeros(H, bool)
    best_sp = np.full(H, -np.inf)
    best_ti, best_thr = np.zeros(H, np.int64), np.ones(H, F32)
    for a, theta in enumerate(thetas):
        ti = np.full(H, a)
        u, feasible = _bisect(lambda uu: ev.stage1(ti, _thr(uu, mode), no_dense), bound, H, steps,
                              block_factor)
        r = ev.stage1(ti, _thr(u, mode), no_dense)
        ok = feasible & (r.error(block_factor) <= bound)
        sp = np.where(ok, r.s1, -np.inf)
        better = sp > best_sp
        best_sp = np.where(better, sp, best_sp)
        best_ti = np.where(better, a, best_ti)
        best_thr = np.where(better, _thr(u, mode), best_thr).astype(F32)
        if log:
            log(f"  theta {theta:+.2f}: stage-1 sparsity " + " ".join(
                f"{s:.3f}" if np.isfinite(s) else "  -  " for s in sp))
    return best_ti, best_thr, np.isfinite(best_sp), np.maximum(best_sp, 0.0)


def _search_stage2(ev, bound, steps, block_factor=None):
    H = len(bound)
    u, feasible = _bisect(lambda uu: ev.stage2(_lam(uu)), bound, H, steps, block_factor)
    lam = np.where(feasible, _lam(u), np.inf).astype(F32)
    r = ev.stage2(lam)
    lam = np.where((r.error(block_factor) <= bound) & (r.s2 > 0), lam, np.inf).astype(F32)
    return lam


def _prepare_inputs(qs, ks, vs, *, is_causal, scale, layout):
    n = len(qs)
    if not (n == len(ks) == len(vs)) or n == 0:
        raise ValueError(f"qs, ks, vs: expected lists of one non-zero length, got {len(qs)}, {len(ks)}, {len(vs)}")
    causal = list(is_causal) if isinstance(is_causal, (list, tuple)) else [is_causal] * n
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * n
    if len(causal) != n or len(scales) != n:
        raise ValueError(f"is_causal, scale: expected one value or {n} values (one per input)")
    inputs, Hq, xp_name = [], None, None
    for q, k, v, c, s in zip(qs, ks, vs, causal, scales):
        name = ck.check_same_module(q, k, v)
        if xp_name not in (None, name):
            raise TypeError(f"qs: expected arrays of one library, got {xp_name} and {name}")
        xp_name = name
        shapes = ck.check_qkv(q, k, v, layout)
        ck.check_flag("is_causal", c)
        s = ck.check_scale(s, shapes.D)
        xp = _xp(q)
        if layout == "NHD":
            q, k, v = (xp.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
        if Hq not in (None, shapes.Hq):
            raise ValueError(f"qs: every input of a layer has the same query heads, got {Hq} and {shapes.Hq}")
        Hq = shapes.Hq
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not bool(xp.isfinite(x.astype(xp.float32)).all()):
                raise ValueError(f"{name}: expected finite values (input {len(inputs)} has NaN or Inf)")
        ref = _dense_reference(q, k, v, is_causal=bool(c), scale=s)
        den_blk = _per_block_l1_num(xp.zeros_like(ref), ref)
        inputs.append(_Input(q, k, v, bool(c), s, ref, den_blk.sum(axis=(0, 2)), den_blk))
    return inputs, xp_name


def check_bounds(l1, pv_l1, block_factor, block_quantile, *, stage2=True, names=None):
    """The error bounds of :func:`tune_layer` checked (a ValueError naming the parameter, as
    ``names`` spells it: e.g. eval's options); returns ``(pv_l1, block_factor, block_quantile)``
    as tuning uses them: without Stage 2 the whole result's bound is l1's."""
    name = (names or {}).get
    for key, val in (("l1", l1), ("pv_l1", pv_l1)):
        if isinstance(val, bool) or not (isinstance(val, (int, float)) and 0 < val < 1):
            raise ValueError(f"{name(key, key)}: expected a number in (0, 1), got {val!r}")
    if stage2 and pv_l1 < l1:
        raise ValueError(f"{name('pv_l1', 'pv_l1')}: expected a bound >= {name('l1', 'l1')} = {l1} "
                         f"(Stage 2 adds error), got {pv_l1}")
    if block_factor is not None:
        if isinstance(block_factor, bool) or not (isinstance(block_factor, (int, float))
                                                  and 1 <= block_factor < math.inf):
            raise ValueError(f"{name('block_factor', 'block_factor')}: expected a finite number >= 1 "
                             f"(a query block's L1 bound in units of the head's; None: no block "
                             f"bound), got {block_factor!r}")
        block_factor = float(block_factor)
    if isinstance(block_quantile, bool) or not (isinstance(block_quantile, (int, float))
                                                and 0 < block_quantile <= 1):
        raise ValueError(f"{name('block_quantile', 'block_quantile')}: expected a number in (0, 1], "
                         f"got {block_quantile!r}")
    return (pv_l1 if stage2 else max(pv_l1, l1)), block_factor, float(block_quantile)


def tune_layer(qs, ks, vs, *, is_causal=False, scale=None, layout="HND", l1=0.05, pv_l1=0.06,
               layer="layer", mode="cdf", qk="int8", pv="fp8", rebalance=True, attention_sink=True,
               thetas=DEFAULT_THETAS, min_sparsity=0.1, stage2=True, evaluator=None, verify=True,
               steps=STEPS, predictor="paper", local_window=False, block_factor=None,
               block_quantile=1.0, log=None):
    """Tune one layer's per-head thresholds on a few inputs (see the module docstring).

    Args:
      qs, ks, vs: lists of arrays, one triple per input, all NumPy or all CuPy, in ``layout``
        (HND ``[B, H, L, D]`` or NHD); every input has the same query heads.
      is_causal, scale: one value, or one per input (scale None: D^-1/2).
      l1: bound on the relative L1 error with Stage 1 alone; pv_l1 (> l1): with Stage 2 on.
      mode: "cdf" (tune tau), "topk" or "mass" (the mass threshold rule, ``mass_threshold``).
      predictor: the Stage-1 estimate, "paper", "qbar_keys" or "qgroup_keys" (all on NumPy and
        CuPy inputs).
      qk, pv, rebalance, attention_sink, local_window: as the user will run (qk = pv = "fp32",
        no quantization, exists on NumPy inputs only: for measurements).
      thetas: the theta grid. min_sparsity: heads below this total sparsity run dense.
      stage2: also tune lambda (else lambda = inf).
      block_factor: None, or F >= 1: the block error (every query block's relative L1 when
        ``block_quantile`` = 1) must also stay at most ``F * l1`` with Stage 1 and ``F * pv_l1``
        with Stage 2 (see the module docstring).
      block_quantile: q in (0, 1]: the block error is the q quantile over the query blocks.
      evaluator: "exact" (the public API: GPU kernels on CuPy, the reference on NumPy) or "curves"
        (NumPy only); default "exact" on CuPy inputs, "curves" on NumPy inputs.
      verify: with the curves evaluator, check the result with the exact one and tighten until it
        holds (the saved numbers are then exact).
      log: a callable taking one line of progress text, or None.
    Returns a :class:`LayerTuning`.
    """
    t0 = time.perf_counter()
    mode = ck.check_choice("mode", mode, MODES)
    qk = ck.check_choice("qk", qk, ck.QK_MODES + ("fp32",))
    pv = ck.check_choice("pv", pv, ck.PV_MODES + ("fp32",))
    for name, val in (("rebalance", rebalance), ("attention_sink", attention_sink),
                      ("local_window", local_window), ("stage2", stage2), ("verify", verify)):
        ck.check_flag(name, val)
    pv_l1, block_factor, block_quantile = check_bounds(l1, pv_l1, block_factor, block_quantile,
                                                       stage2=stage2)
    if isinstance(min_sparsity, bool) or not (isinstance(min_sparsity, (int, float))
                                              and 0 <= min_sparsity <= 1):
        raise ValueError(f"min_sparsity: expected a number in [0, 1], got {min_sparsity!r}")
    thetas = tuple(float(t) for t in thetas)
    if not thetas or any(not -1.0 <= t <= 1.0 for t in thetas):
        raise ValueError(f"thetas: expected values in [-1, 1], got {thetas}")
    inputs, xp_name = _prepare_inputs(qs, ks, vs, is_causal=is_causal, scale=scale, layout=layout)
    predictor = ck.check_predictor(predictor, xp_name)
    if evaluator is None:
        evaluator = "exact" if xp_name == "cupy" else "curves"
    evaluator = ck.check_choice("evaluator", evaluator, EVALUATORS)
    if evaluator == "curves" and xp_name != "numpy":
        raise ValueError("evaluator: 'curves' runs on NumPy inputs only; use 'exact' on CuPy arrays")
    if "fp32" in (qk, pv) and xp_name != "numpy":
        raise ValueError(f"qk, pv: 'fp32' (no quantization) exists only in the NumPy reference, got "
                         f"qk={qk!r}, pv={pv!r} on CuPy arrays")
    H = inputs[0].q.shape[1]
    common = dict(thetas=thetas, mode=mode, qk=qk, pv=pv, rebalance=rebalance, attention_sink=attention_sink,
                  predictor=predictor, local_window=bool(local_window), block_quantile=block_quantile)
    if log:
        log(f"tuning {layer}: {len(inputs)} input(s), {H} heads, {evaluator} evaluator on "
            f"{'GPU' if xp_name == 'cupy' else 'CPU'} (dense references {time.perf_counter() - t0:.1f} s)")
    ev = _CurveEvaluator(inputs, log=log, **common) if evaluator == "curves" else _ExactEvaluator(inputs, **common)
    exact = ev if evaluator == "exact" else (_ExactEvaluator(inputs, **common) if verify else None)

    # ``full``: Stage 1 keeps every valid block (no Stage-1 gain, or no tau meets l1); such a head
    # may still gain from Stage 2. ``dense`` at the end: full and lambda = inf.
    all_full = np.ones(H, bool)
    floor = ev.stage1(np.zeros(H, np.int64), np.ones(H, F32), all_full)
    bound1 = np.full(H, float(l1))
    bound2 = np.full(H, float(pv_l1))
    bf = block_factor

    def err(r):                                     # what the bounds bound (see _Eval.error)
        return r.error(bf)

    ti, thr, ok1, sp1 = _search_stage1(ev, thetas, bound1, mode, steps, log, bf)
    full = ~ok1 | (sp1 <= 0)
    lam = np.full(H, np.inf, F32)

    def stage2_for(heads):
        nonlocal lam
        heads = heads & ~(full & (err(floor) > l1))   # quantization alone misses l1: nothing to gain
        if not stage2 or not heads.any():
            return
        ev.set_stage1(ti, thr, full)
        lam = np.where(heads, _search_stage2(ev, bound2, steps, bf), lam).astype(F32)

    stage2_for(np.ones(H, bool))
    # Check with the judge (the exact evaluator when there is one). Where the curves' choice misses
    # a bound exactly, tighten that head's bound by the gap and search again (MAX_ROUNDS times);
    # then settle: heads still missing l1 keep every block, heads missing pv_l1 or below
    # min_sparsity turn Stage 2 off (and below min_sparsity keep every block). Settling only adds
    # full heads and infinite lambdas, so the loop ends.
    judge = exact if exact is not None else ev
    rounds = 0
    while True:
        r1 = judge.stage1(ti, thr, full)
        judge.set_stage1(ti, thr, full)
        r2 = judge.stage2(lam)
        bad1 = ~full & (err(r1) > l1)
        bad2 = ~bad1 & np.isfinite(lam) & (err(r2) > pv_l1)
        small = ~(full & np.isinf(lam)) & ~bad1 & (r2.total < min_sparsity)
        if not (bad1 | bad2 | small).any():
            break
        if judge is not ev and rounds < MAX_ROUNDS and (bad1 | bad2).any():
            rounds += 1
            if log:
                log(f"  verify round {rounds}: heads {np.flatnonzero(bad1 | bad2).tolist()} miss a "
                    f"bound exactly; tightening by the gap")
            cur1 = ev.stage1(ti, thr, full)
            ev.set_stage1(ti, thr, full)
            cur2 = ev.stage2(lam)
            if bad1.any():
                bound1 = np.where(bad1, bound1 - np.maximum(err(r1) - err(cur1), 0) - 0.02 * l1, bound1)
                t2, th2, ok2, sp2 = _search_stage1(ev, thetas, bound1, mode, steps, None, bf)
                ti = np.where(bad1, t2, ti)
                thr = np.where(bad1, th2, thr).astype(F32)
                full |= bad1 & (~ok2 | (sp2 <= 0))
                lam = np.where(bad1, np.inf, lam).astype(F32)
            if bad2.any():
                bound2 = np.where(bad2, bound2 - np.maximum(err(r2) - err(cur2), 0) - 0.02 * pv_l1, bound2)
            stage2_for(bad1 | bad2)
            continue
        full |= bad1 | small
        lam = np.where(bad1 | bad2 | small, np.inf, lam).astype(F32)
    verified = judge is not ev or evaluator == "exact"

    fl = judge.stage1(np.zeros(H, np.int64), np.ones(H, F32), all_full) if judge is not ev else floor
    dense = full & np.isinf(lam)
    thr_saved = np.where(full, F32(FULL_THRESHOLD[mode]), thr).astype(F32)
    theta_saved = np.where(full, F32(-1), np.asarray(thetas, F32)[ti]).astype(F32)
    meets = (err(r1) <= l1) & (err(r2) <= pv_l1)
    return LayerTuning(
        layer=layer, simthreshd1=theta_saved,
        **{RULE_KEYWORDS[m]: thr_saved if m == mode else None for m in MODES},
        pvthreshd=lam, dense=dense, meets_bound=meets,
        stage1_sparsity=r2.s1, stage2_sparsity=r2.s2, total_sparsity=r2.total,
        stage1_l1=r1.l1, l1=r2.l1, quant_floor_l1=fl.l1,
        block_factor=bf, block_quantile=block_quantile, stage1_block_l1=r1.block_l1, block_l1=r2.block_l1,
        l1_bound=float(l1), pv_l1_bound=float(pv_l1), min_sparsity=float(min_sparsity),
        qk=qk, pv=pv, rebalance=rebalance, attention_sink=attention_sink,
        local_window=bool(local_window), mode=mode, thetas=thetas,
        evaluator=evaluator, backend="gpu" if xp_name == "cupy" else "reference", verified=verified,
        predictor=predictor,
        inputs=[{"tokens_q": int(x.q.shape[2]), "tokens_k": int(x.k.shape[2]), "batch": int(x.q.shape[0]),
                 "is_causal": x.is_causal, "scale": x.scale} for x in inputs],
        seconds=round(time.perf_counter() - t0, 2))


# ---------------------------------------------------------------------------------------------
# The command: python -m sparge_cupy.tune (and ``sparge-cupy tune`` through add_arguments/run).

def load_npz_input(path):
    """``(q, k, v, is_causal, scale, layout)`` from an .npz holding arrays ``q``, ``k``, ``v`` and
    optionally 0-d ``is_causal``, ``scale`` and ``layout`` (default False, None, "HND")."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not readable as an .npz of arrays q, k, v ({e})") from e
    if not hasattr(z, "files"):
        raise ValueError(f"{path}: expected an .npz archive (numpy.savez) of arrays q, k, v, "
                         f"got a single array of shape {z.shape}")
    with z:
        missing = [n for n in ("q", "k", "v") if n not in z.files]
        if missing:
            raise ValueError(f"{path}: expected arrays q, k, v; missing {missing} (has {z.files})")
        q, k, v = (_npz_bf16(z[n]) for n in ("q", "k", "v"))
        causal = _npz_scalar(z, "is_causal", path, "b") if "is_causal" in z.files else None
        scale = _npz_scalar(z, "scale", path, "f") if "scale" in z.files else None
        layout = _npz_scalar(z, "layout", path, "U") if "layout" in z.files else "HND"
    return q, k, v, causal, scale, layout


def _npz_bf16(x):
    """numpy.savez stores ml_dtypes' bfloat16 as 2-byte void ("|V2"): read it back as bfloat16."""
    if x.dtype.kind == "V" and x.dtype.itemsize == 2 and x.dtype.fields is None:
        import ml_dtypes
        return x.view(ml_dtypes.bfloat16)
    return x


def _npz_scalar(z, name, path, kind):
    """The file's one-element entry ``name`` as a bool (``kind`` "b": a bool, or an integer 0 or
    1), a float ("f": a real number) or a str ("U"); a ValueError naming it otherwise."""
    x = z[name]
    want = {"b": "True / False (or 0 / 1)", "f": "a real number", "U": "a string"}[kind]
    if x.size != 1:
        raise ValueError(f"{path}: {name}: expected one value, {want}; got an array of shape {x.shape}")
    x = x.reshape(())
    if kind == "b" and (x.dtype.kind == "b" or (x.dtype.kind in "iu" and int(x) in (0, 1))):
        return bool(x)
    if kind == "f" and x.dtype.kind in "iuf":
        return float(x)
    if kind == "U" and x.dtype.kind in "US":
        return x.item().decode() if x.dtype.kind == "S" else str(x)
    raise ValueError(f"{path}: {name}: expected {want}, got {x.item()!r} ({x.dtype})")


def load_npz_layer(path):
    """``(q, k, v, is_causal, scale, layout, notes)`` of :func:`load_npz_input` with q, k, v as
    contiguous HND arrays (``layout``: the file's), float64 cast to float32 (the API takes fp16,
    bf16 and fp32; ``notes`` says so)."""
    q, k, v, causal, scale, layout = load_npz_input(path)
    if layout not in ("HND", "NHD"):
        raise ValueError(f"{path}: layout must be 'HND' or 'NHD', got {layout!r}")
    if layout == "NHD":
        q, k, v = (x.transpose(0, 2, 1, 3) if x.ndim == 4 else x for x in (q, k, v))
    notes = []
    if any(x.dtype == np.float64 for x in (q, k, v)):
        q, k, v = (x.astype(np.float32) if x.dtype == np.float64 else x for x in (q, k, v))
        notes.append(f"{path}: float64 arrays cast to float32 (the API takes fp16, bf16 and fp32)")
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    return q, k, v, causal, scale, layout, notes


def _gpu_available():
    try:
        import cupy
        return bool(cupy.is_available())
    except Exception:   # no CuPy, or a CuPy without a working driver: run on the CPU
        return False


def add_block_bound_arguments(p, scope=""):
    """``--block-factor`` and ``--block-quantile`` (tune_layer's ``block_factor``,
    ``block_quantile``) on parser ``p``, shared by ``sparge-cupy tune`` and ``eval``; ``scope``
    prefixes their help (e.g. "tuned steps: ")."""
    p.add_argument("--block-factor", type=float, default=None, metavar="F",
                   help=f"{scope}also bound every query block's relative L1 by F x --l1 (Stage 1) and "
                        "F x --pv-l1 (Stage 2); default: the head's L1 alone")
    p.add_argument("--block-quantile", type=float, default=1.0, metavar="Q",
                   help=f"{scope}with --block-factor: bound the Q quantile of the query blocks' L1 "
                        "instead of the largest (default %(default)s: every block)")


def add_arguments(p):
    """The ``tune`` options, on an argparse parser (``sparge-cupy tune`` adds them to its subparser)."""
    p.add_argument("--inputs", nargs="+", required=True, metavar="NPZ",
                   help="npz files of one layer: arrays q, k, v; optional is_causal, scale, layout")
    p.add_argument("--layer", required=True, help="name the result is saved under")
    p.add_argument("--out", default="tuning.json", help="JSON file; an existing file keeps its other layers")
    p.add_argument("--l1", type=float, default=0.05, help="bound on relative L1 with Stage 1 alone")
    p.add_argument("--pv-l1", type=float, default=0.06, help="bound with Stage 2 on (>= --l1)")
    p.add_argument("--mode", choices=MODES, default="cdf",
                   help="tune tau (cdf), topk, or the mass threshold t of the rule nk * P^ >= t (mass)")
    p.add_argument("--predictor", choices=PREDICTORS, default="paper",
                   help="Stage-1 estimate (qbar_keys: pooled Q against every key; qgroup_keys: Q pooled "
                        "over 32-row groups against every key; default %(default)s)")
    p.add_argument("--qk", choices=ck.QK_MODES + ("fp32",), default="int8",
                   help="QK^T operands (fp32: unquantized, CPU reference only)")
    p.add_argument("--pv", choices=ck.PV_MODES + ("fp32",), default="fp8",
                   help="P V operands (fp32: unquantized, CPU reference only)")
    p.add_argument("--no-rebalance", action="store_true", help="tune without channel rebalancing")
    p.add_argument("--no-sink", action="store_true", help="tune without the attention sink block")
    p.add_argument("--local-window", action="store_true",
                   help="tune with each query block's own key blocks always kept (local_window)")
    add_block_bound_arguments(p)
    p.add_argument("--no-stage2", action="store_true", help="leave lambda at inf")
    p.add_argument("--thetas", default=",".join(str(t) for t in DEFAULT_THETAS),
                   help="comma-separated theta grid (write --thetas=-1,0.5: a leading minus needs the =)")
    p.add_argument("--min-sparsity", type=float, default=0.1, help="heads below this total run dense")
    p.add_argument("--causal", choices=("auto", "yes", "no"), default="auto",
                   help="causal mask (auto: the file's is_causal, else no)")
    p.add_argument("--scale", type=float, default=None, help="softmax scale (default: the file's, else D^-0.5)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="gpu: CuPy arrays and the kernels; cpu: the NumPy reference (auto: gpu if found)")
    p.add_argument("--evaluator", choices=EVALUATORS, default=None,
                   help="default: exact on the GPU, curves on the CPU")
    p.add_argument("--no-verify", action="store_true", help="CPU curves only, no exact check (faster)")
    p.add_argument("--hf-settings", default=None, metavar="JSON",
                   help="also write every layer of --out in the format of sparge_cupy.hf.load_settings")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def parse_thetas(text):
    """A ``--thetas`` value: comma-separated numbers in [-1, 1]; a ValueError naming the option."""
    try:
        thetas = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        thetas = ()
    if not thetas or not all(-1 <= t <= 1 for t in thetas):
        raise ValueError(f"--thetas: expected comma-separated numbers in [-1, 1], got {text!r}")
    return thetas


def _check_outputs(args):
    """What can be wrong with --out and --hf-settings, found before the tuning runs: the existing
    tuning file (unreadable, or someone else's), a folder, the same file twice; the hf settings
    need a layer name holding its index and the quantization modes the kernels run."""
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out: expected a file, got the folder {out}")
    results = load_tuning(out) if out.is_file() else {}
    if args.hf_settings:
        from .hf import layer_index
        hf = Path(args.hf_settings)
        if hf.is_dir():
            raise ValueError(f"--hf-settings: expected a file, got the folder {hf}")
        if hf.resolve() == out.resolve():
            raise ValueError(f"--hf-settings: expected a file other than --out ({out}): the tuning "
                             "file and the hf settings are different formats")
        try:
            layer_index(args.layer)
        except ValueError:
            raise ValueError(f"--layer: --hf-settings keys layers by index, so the name must hold "
                             f"one (5, \"layers.5\", \"model.layers.5.self_attn\"), got "
                             f"{args.layer!r}") from None
        for name in ("qk", "pv"):
            if getattr(args, name) == "fp32":
                raise ValueError(f"--{name}: 'fp32' exists in the reference only; --hf-settings "
                                 f"needs one the kernels run ({', '.join(ck.QK_MODES if name == 'qk' else ck.PV_MODES)})")
    return results


def run(args):
    """Run ``tune`` from parsed arguments; prints the per-head table, returns 0."""
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    if args.device == "gpu" and not _gpu_available():
        raise ValueError("--device gpu, but CuPy finds no GPU (use --device cpu or auto)")
    thetas = parse_thetas(args.thetas)
    results = _check_outputs(args)
    use_gpu = args.device == "gpu" or (args.device == "auto" and _gpu_available())
    if use_gpu:
        import cupy
    qs, ks, vs, causal, scales = [], [], [], [], []
    for path in args.inputs:
        q, k, v, c, s, _, notes = load_npz_layer(path)
        for note in notes if log else ():
            log(note)
        if use_gpu:
            q, k, v = (cupy.asarray(x) for x in (q, k, v))
        qs.append(q)
        ks.append(k)
        vs.append(v)
        if args.causal == "auto" and c is None and log:
            log(f"{path}: no is_causal in the file; tuning non-causal (pass --causal yes for a decoder)")
        causal.append({"yes": True, "no": False}.get(args.causal, bool(c)))
        scales.append(args.scale if args.scale is not None else s)
    result = tune_layer(qs, ks, vs, is_causal=causal, scale=scales, l1=args.l1, pv_l1=args.pv_l1,
                        layer=args.layer, mode=args.mode, qk=args.qk, pv=args.pv,
                        rebalance=not args.no_rebalance, attention_sink=not args.no_sink,
                        thetas=thetas, min_sparsity=args.min_sparsity, stage2=not args.no_stage2,
                        evaluator=args.evaluator, verify=not args.no_verify,
                        predictor=args.predictor, local_window=args.local_window,
                        block_factor=args.block_factor, block_quantile=args.block_quantile, log=log)
    results[args.layer] = result
    hf_doc = None
    if args.hf_settings:            # checked by the reader before anything is written
        from .hf import SpargeSettings
        hf_doc = to_hf_settings(results)
        SpargeSettings.from_dict(hf_doc)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_tuning(args.out, results)
    print(result.table())
    print(f"saved layer {args.layer!r} to {args.out} ({len(results)} layer(s) in the file)")
    if hf_doc is not None:
        Path(args.hf_settings).parent.mkdir(parents=True, exist_ok=True)
        Path(args.hf_settings).write_text(json.dumps(hf_doc, indent=1) + "\n")
        print(f"wrote the hf settings of {len(results)} layer(s) to {args.hf_settings}")
    return 0


def main(argv=None):
    """``python -m sparge_cupy.tune --inputs a.npz b.npz --layer NAME --l1 0.05 --pv-l1 0.06 --out tuning.json``"""
    p = argparse.ArgumentParser(prog="python -m sparge_cupy.tune",
                                description="Tune SpargeAttn's per-head thresholds of one layer (SPEC.md section 5).")
    return run(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
