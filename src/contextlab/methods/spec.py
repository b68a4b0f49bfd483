"""The method registry and spec strings.

A spec is ``name``, ``name:VALUE``, ``name:key=value,key=value`` or, equivalently, ``name(key=value,...)``.
A bare ``VALUE`` below 1 or with a decimal point is a ratio (fraction of tokens REMOVED), an integer >= 1 a
token budget: ``snapkv:0.5``, ``snapkv:budget=512``, ``streaming:sink=4,window=1020``,
``adakv:ratio=0.5,scorer=tova``. A bare word fills a wrapper's scorer: ``decode(h2o,budget=512,every=64)``.
``a+b`` composes methods of different families: ``snapkv:0.5+decode(h2o,budget=512)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from contextlab.methods.base import Budget, Method
from contextlab.registry import Registry
from contextlab.specstring import name_and_args, split_spec, split_top

METHODS: Registry[type[Method]] = Registry("method", base=Method)
for _name, _target in [
    ("full", "eviction:Full"),
    ("streaming", "eviction:Streaming"),
    ("snapkv", "eviction:SnapKV"),
    ("pyramidkv", "eviction:PyramidKV"),
    ("tova", "eviction:TOVA"),
    ("h2o", "eviction:H2O"),
    ("knorm", "eviction:KNorm"),
    ("random", "eviction:Random"),
    ("adakv", "eviction:AdaKV"),
    ("decode", "decode:DecodeEviction"),
    ("selfextend", "extension:SelfExtend"),
    ("string", "extension:String"),
    ("lminfinite", "extension:LMInfinite"),
    ("ntk", "extension:NTK"),
    ("yarn", "extension:YaRN"),
    ("linear", "extension:Linear"),
    ("infiniretri", "extension:InfiniRetri"),
    ("kivi", "quantization:KIVI"),
    ("kvquant", "quantization:KVQuant"),
    ("zipcache", "quantization:ZipCache"),
    ("quest", "sparse:Quest"),
    ("tokenselect", "sparse:TokenSelect"),
    ("recycled", "sparse:Recycled"),
    ("infllm", "sparse:InfLLM"),
    ("retrieval", "sparse:Retrieval"),
    ("minference", "sparse_prefill:MInference"),
    ("duo", "sparse_prefill:DuoAttention"),
]:
    METHODS.register(_name, f"contextlab.methods.{_target}")

_BUDGET_KEYS = {"ratio": "ratio", "budget": "tokens", "budget_tokens": "tokens", "tokens": "tokens"}


def build_method(spec: str | Method, **params) -> Method:
    """A method from a registry name or spec string (``a+b`` composes), with keyword overrides
    (``ratio=``, ``budget=``...) for a single method."""
    if isinstance(spec, Method):
        if params:
            raise ValueError("parameters can only be given with a method name, not with a built method")
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method spec must be a non-empty string, got {spec!r}")
    parts = split_top(spec, "+")
    if len(parts) == 1:
        return build_part(spec, **params)
    if params:
        raise ValueError(f"keyword parameters cannot be given with a composition ({spec!r}); put them in the spec")
    for i, part in enumerate(parts):
        if not part.strip():
            raise ValueError(f"part {i + 1} of the composition {spec!r} is empty")
    from contextlab.methods.compose import Composite

    built = []
    for part in parts:
        try:
            built.append(build_part(part))
        except ValueError as err:
            raise ValueError(f"in {part.strip()!r} of {spec!r}: {err}") from None
    return Composite(parts=tuple(built))


def build_part(spec: str, *, need_budget: bool = True, **params) -> Method:
    """One method (no ``+``); ``need_budget=False`` builds a scorer that a wrapper lends its budget to."""
    name, arg_text = name_and_args(spec)
    cls = METHODS.get(name)
    merged = {**_parse_args(arg_text, spec, cls), **params}
    budget_args = {_BUDGET_KEYS[k]: merged.pop(k) for k in list(merged) if k in _BUDGET_KEYS}
    if len(budget_args) > 1:
        raise ValueError(f"give one of ratio or budget for {name!r}, got {sorted(budget_args)}")
    fields = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("bound")}
    if budget_args and "budget" not in fields:
        raise ValueError(f"{name} takes no budget")
    unknown = sorted(set(merged) - fields)
    if unknown:
        takes = sorted((fields - {"budget"}) | ({"ratio", "budget"} if "budget" in fields else set()))
        raise ValueError(f"unknown parameter(s) {unknown} for method {name!r}; it takes {takes or 'no parameters'}")
    if budget_args:
        merged["budget"] = Budget(**budget_args)
    method = cls(**merged)
    if need_budget and "budget" in fields and not (method.compresses or method.sparse_reads):
        raise ValueError(
            f"method {name!r} needs a budget: '{name}:0.5' (fraction removed) or '{name}:budget=512' (tokens kept)"
        )
    return method


def _parse_args(text: str, spec: str, cls: type[Method]) -> dict:
    _, positional, out = split_spec(f"x:{text}")
    budgeted = "budget" in {f.name for f in dataclasses.fields(cls)}
    for value in positional:
        if cls.positional is not None and (isinstance(value, str) or not budgeted):
            out[cls.positional] = value  # a scorer (``decode(h2o)``) or a method's main number (``kivi:4``)
            continue
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


def doc_summary(cls: type) -> str:
    """A class docstring's first paragraph on one line (what listings show)."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def list_methods() -> list[MethodInfo]:
    """Every registered method with its parameters (default and meaning) and paper."""
    infos = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        params = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("bound"):
                continue
            if f.name == "budget" and "help" in f.metadata:
                params["budget"] = ("required", f.metadata["help"])
            elif f.name == "budget":
                params["ratio | budget"] = ("required", "fraction removed | tokens kept")
            else:
                params[f.name] = (repr(f.default), f.metadata.get("help", ""))
        infos.append(MethodInfo(name=name, summary=doc_summary(cls), paper=cls.paper, params=params))
    return infos
