"""Method identity: ``describe()`` round-trips every field, so results rows say exactly what ran."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import contextlab as cl
from contextlab.methods.base import Budget, PrefillMethod

SCORERS = ["snapkv", "tova", "h2o", "knorm", "streaming", "random", "snapkv(window=8,kernel=3)", "h2o(recent=0.25)"]


def _value(field: dataclasses.Field):
    kind = str(field.type)
    if field.name == "budget":
        return st.one_of(
            st.none(),
            st.builds(Budget, ratio=st.floats(0.0, 0.99, allow_nan=False)),
            st.builds(Budget, tokens=st.integers(1, 100_000)),
        )
    if field.name == "scorer":
        return st.sampled_from(SCORERS)
    if field.name == "pooling":
        return st.sampled_from(["avg", "max"])
    if field.name == "keys":
        return st.sampled_from(["tokenwise", "channel"])
    if field.name == "index":
        return st.sampled_from(["ivf", "exact"])
    if field.name == "offload":
        return st.sampled_from(["none", "cpu"])
    if field.name == "vote":
        return st.sampled_from(["layer", "head"])
    if field.name == "share":
        return st.sampled_from(["none", "all"])
    if field.name == "scales":
        return st.sampled_from(["fp16", "e4m3"])
    if field.name == "levels":
        return st.sampled_from(["uniform", "normal"])
    if field.name == "rotate":
        return st.sampled_from(["none", "hadamard"])
    if field.name == "fit":
        return st.sampled_from(["absmax", "mse"])
    if field.name == "score":
        return st.sampled_from(["output", "relative"])
    if field.name == "profile":
        return st.sampled_from(["", "/tmp/profiles/minference.json"])
    if field.name in ("bits", "high", "low"):
        return st.sampled_from([2, 3, 4, 8])
    if kind == "bool":
        return st.booleans()
    if "float" in kind:
        return st.one_of(st.floats(0.0, 1.0, allow_nan=False), st.floats(1.0, 100.0, allow_nan=False))
    if "int" in kind:
        return st.one_of(st.none(), st.integers(0, 5000)) if "None" in kind else st.integers(0, 5000)
    raise AssertionError(f"no strategy for field {field.name} ({kind})")


@st.composite
def methods(draw):
    cls = cl.METHODS.get(draw(st.sampled_from(cl.METHODS.names())))
    kwargs = {f.name: draw(_value(f)) for f in dataclasses.fields(cls) if not f.metadata.get("bound")}
    try:
        method = cls(**kwargs)
    except ValueError:
        assume(False)
    assume(not isinstance(method, PrefillMethod) or method.compresses)  # a scorer alone needs a budget
    return method


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(methods())
def test_describe_round_trips_every_method(method):
    text = method.describe()
    rebuilt = cl.method(text)
    assert rebuilt == method and rebuilt.describe() == text and hash(rebuilt) == hash(method)
    assert dataclasses.replace(method) == method


def test_methods_that_differ_describe_differently():
    assert cl.method("adakv:0.5,scorer=tova") != cl.method("adakv:0.5,scorer=snapkv")
    assert cl.method("adakv:0.5,scorer=tova").describe() == "adakv:ratio=0.5,scorer=tova"
    assert cl.method("adakv:0.5,scorer=snapkv(window=8)").describe() == "adakv:ratio=0.5,scorer=snapkv(window=8)"
    assert cl.method("snapkv:0.5") == cl.method("snapkv:ratio=0.5,window=32")  # defaults are not spelled out


def test_compositions_round_trip_and_add():
    spec = "snapkv:0.5,prefill_chunk=256+decode(h2o(recent=0.25),budget=512,every=32)"
    method = cl.method(spec)
    assert method.describe() == "snapkv:ratio=0.5,prefill_chunk=256+decode:scorer=h2o(recent=0.25),budget=512,every=32"
    assert cl.method(method.describe()) == method
    assert cl.method("snapkv:0.5") + cl.method("decode(h2o,budget=512,every=32)") == cl.method(
        "snapkv:0.5+decode:h2o,budget=512,every=32"
    )


def test_replace_rebuilds_and_validates():
    method = cl.method("snapkv:0.5")
    assert dataclasses.replace(method, window=16).describe() == "snapkv:ratio=0.5,window=16"
    ada = dataclasses.replace(cl.method("adakv:0.5,scorer=tova"), budget=Budget(tokens=64))
    assert ada.scoring.budget == Budget(tokens=64)
