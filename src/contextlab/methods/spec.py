"""The method registry and spec strings.

A spec is ``name``, ``name:VALUE`` or ``name:key=value,key=value``. A bare ``VALUE`` below 1 or with a
decimal point is a ratio (fraction of tokens REMOVED), an integer >= 1 a token budget:
``snapkv:0.5``, ``snapkv:budget=512``, ``streaming:sink=4,window=1020``, ``adakv:ratio=0.5,scorer=tova``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from contextlab.methods.base import Budget, PrefillMethod
from contextlab.registry import Registry
from contextlab.specstring import split_spec

METHODS: Registry[type[PrefillMethod]] = Registry("method", base=PrefillMethod)
for _name, _cls in [
    ("full", "Full"),
    ("streaming", "Streaming"),
    ("snapkv", "SnapKV"),
    ("pyramidkv", "PyramidKV"),
    ("tova", "TOVA"),
    ("h2o", "H2O"),
    ("knorm", "KNorm"),
    ("random", "Random"),
    ("adakv", "AdaKV"),
]:
    METHODS.register(_name, f"contextlab.methods.eviction:{_cls}")

_BUDGET_KEYS = {"ratio": "ratio", "budget": "tokens", "budget_tokens": "tokens", "tokens": "tokens"}


def build_method(spec: str | PrefillMethod, **params) -> PrefillMethod:
    """A method from a registry name or spec string, with keyword overrides (``ratio=``, ``budget=``...)."""
    if isinstance(spec, PrefillMethod):
        if params:
            raise ValueError("parameters can only be given with a method name, not with a built method")
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method spec must be a non-empty string, got {spec!r}")
    if "+" in spec:
        raise ValueError(
            f"method composition ({spec!r}) needs a second family (e.g. KV quantization), and none is registered yet"
        )
    name, _, arg_text = spec.strip().partition(":")
    cls = METHODS.get(name)
    merged = {**_parse_args(arg_text, spec), **params}
    budget_args = {_BUDGET_KEYS[k]: merged.pop(k) for k in list(merged) if k in _BUDGET_KEYS}
    if len(budget_args) > 1:
        raise ValueError(f"give one of ratio or budget for {name!r}, got {sorted(budget_args)}")
    fields = {f.name for f in dataclasses.fields(cls)} - {"budget"}
    unknown = sorted(set(merged) - fields)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for method {name!r}; it takes "
            f"{sorted(fields | {'ratio', 'budget'}) if cls.name != 'full' else 'no parameters'}"
        )
    budget = Budget(**budget_args) if budget_args else None
    method = cls(budget=budget, **merged)
    if budget is None and cls.name not in ("full",) and not method.compresses:
        raise ValueError(
            f"method {name!r} needs a budget: '{name}:0.5' (fraction removed) or '{name}:budget=512' (tokens kept)"
        )
    return method


def _parse_args(text: str, spec: str) -> dict:
    _, positional, out = split_spec(f"x:{text}")
    for value in positional:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"cannot read {value!r} in method spec {spec!r}: expected a ratio, a budget or key=value")
        is_ratio = isinstance(value, float) or value == 0
        out["ratio" if is_ratio else "budget"] = float(value) if is_ratio else value
    return out


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    paper: str
    params: dict[str, tuple[str, str]]  # name -> (default, help)


def list_methods() -> list[MethodInfo]:
    """Every registered method with its parameters (default and meaning) and paper."""
    infos = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        params = {} if name == "full" else {"ratio | budget": ("required", "fraction removed | tokens kept")}
        for f in dataclasses.fields(cls):
            if f.name != "budget":
                params[f.name] = (repr(f.default), f.metadata.get("help", ""))
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        infos.append(MethodInfo(name=name, summary=summary, paper=cls.paper, params=params))
    return infos
