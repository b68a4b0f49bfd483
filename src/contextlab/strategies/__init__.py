"""Input-level strategies (rag, xl3m, coa, wim, router): registered and spelled like methods.

``build("rag:k=8,chunk=256+snapkv:0.5")`` gives a :class:`Strategy` whose reads run under ``snapkv:0.5``;
a spec that names no strategy gives the :class:`~contextlab.methods.base.Method` ``build_method`` makes.
A strategy goes first in a composition; everything after its ``+`` is its read method.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from contextlab.methods.base import Method
from contextlab.methods.spec import MethodInfo, build_method, doc_summary
from contextlab.registry import Registry
from contextlab.specstring import name_and_args, split_spec, split_top
from contextlab.strategies.base import Strategy, StrategyError

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", base=Strategy)
for _name, _target in [
    ("rag", "retrieval:RAG"),
    ("xl3m", "retrieval:XL3M"),
    ("coa", "agents:ChainOfAgents"),
    ("wim", "agents:WritingInMargins"),
    ("router", "router:Router"),
]:
    STRATEGIES.register(_name, f"contextlab.strategies.{_target}")

__all__ = ["STRATEGIES", "Strategy", "StrategyError", "build", "build_strategy", "is_strategy", "list_strategies"]


def is_strategy(spec: object) -> bool:
    """Whether a spec string (or built object) is an input-level strategy."""
    if isinstance(spec, Strategy):
        return True
    if not isinstance(spec, str) or not spec.strip():
        return False
    try:
        return name_and_args(split_top(spec, "+")[0])[0].strip().lower() in STRATEGIES
    except ValueError:
        return False


def build(spec: str | Method | Strategy) -> Method | Strategy:
    """A strategy or a method from a spec; an unknown name lists both kinds."""
    if isinstance(spec, (Method, Strategy)):
        return spec
    if is_strategy(spec):
        return build_strategy(spec)
    parts = split_top(spec, "+") if isinstance(spec, str) else []
    for part in parts[1:]:
        if name_and_args(part)[0].strip().lower() in STRATEGIES:
            raise ValueError(
                f"{spec!r}: an input-level strategy goes first, its read method after: 'rag:k=8+snapkv:0.5'"
            )
    try:
        return build_method(spec)
    except ValueError as err:
        name = name_and_args(parts[0])[0] if parts else ""
        if str(err).startswith("unknown method") and name:
            raise ValueError(f"{err}; input-level strategies: {', '.join(STRATEGIES.names())}") from None
        raise


def build_strategy(spec: str) -> Strategy:
    """A strategy from ``name:k=v,...`` optionally followed by ``+`` and its read method."""
    head, *rest = split_top(spec, "+")
    name, positional, params = split_spec(head)
    cls = STRATEGIES.get(name)
    if positional:
        raise ValueError(f"{spec!r}: give a strategy's parameters as key=value (e.g. '{name}:k=8')")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "read"}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for strategy {name!r}; it takes {sorted(fields)}")
    for key, value in params.items():
        params[key] = _typed(name, key, value, fields[key])
    read = "+".join(part.strip() for part in rest) or "full"
    if rest and not all(part.strip() for part in rest):
        raise ValueError(f"a part of {spec!r} after '+' is empty")
    return cls(**params, read=read)


def _typed(strategy: str, key: str, value, f: dataclasses.Field):
    """A spec value checked against the field's type (``4`` for a float field is 4.0)."""
    kinds = _kinds(f.type)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not any(isinstance(value, k) and not (k is int and isinstance(value, bool)) for k in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{strategy}: {key} must be {names}, got {value!r}")
    return value


def _kinds(hint) -> tuple[type, ...]:
    if isinstance(hint, str):  # postponed annotations: "int | None"
        mapping = {"int": int, "float": float, "str": str, "bool": bool}
        return tuple(mapping[p.strip()] for p in hint.split("|") if p.strip() in mapping)
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(a for a in args if a is not type(None))


def list_strategies() -> list[MethodInfo]:
    """Every registered strategy with its parameters (default and meaning) and paper."""
    infos = []
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        params = {f.name: (repr(f.default), f.metadata.get("help", "")) for f in dataclasses.fields(cls)}
        infos.append(MethodInfo(name=name, summary=doc_summary(cls), paper=cls.paper, params=params))
    return infos
