"""Method specs, the registry and budget validation."""

from __future__ import annotations

import pytest

import contextlab as cl
from contextlab.methods.base import Budget
from contextlab.methods.eviction import TOVA, AdaKV, SnapKV, Streaming


@pytest.mark.parametrize(
    ("spec", "params", "budget"),
    [
        ("snapkv:0.5", {}, Budget(ratio=0.5)),
        ("snapkv:budget=512", {}, Budget(tokens=512)),
        ("snapkv:512", {}, Budget(tokens=512)),
        ("snapkv", {"ratio": 0.25}, Budget(ratio=0.25)),
        ("snapkv:ratio=0.75,window=16", {}, Budget(ratio=0.75)),
        ("streaming:sink=4,window=1020", {}, Budget(tokens=1024)),
    ],
)
def test_specs(spec, params, budget):
    assert cl.method(spec, **params).effective_budget == budget


def test_spec_parameters_reach_the_method():
    m = cl.method("snapkv:ratio=0.75,window=16,kernel=5,pooling=max")
    assert (m.window, m.kernel, m.pooling) == (16, 5, "max")
    ada = cl.method("adakv:ratio=0.5,scorer=tova")
    assert isinstance(ada, AdaKV) and isinstance(ada.scoring, TOVA) and ada.scoring.budget == ada.budget
    assert isinstance(cl.method(SnapKV(budget=Budget(ratio=0.5))), SnapKV)
    assert isinstance(cl.method("streaming:0.5"), Streaming)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("snapk:0.5", "did you mean 'snapkv'"),
        ("snapkv", "needs a budget"),
        ("snapkv:1.0", "must be in [0, 1)"),
        ("snapkv:-0.1", "must be in [0, 1)"),
        ("snapkv:ratio=0.5,budget=10", "one of ratio or budget"),
        ("snapkv:0.5,windw=3", "unknown parameter"),
        ("full:0.5", "takes no budget"),
        ("snapkv:0.5+zipkv", "unknown method 'zipkv'"),
        ("snapkv:0.5+", "part 2 of the composition"),
        ("snapkv:0.5+tova:0.5", "both take the prefill eviction role"),
        ("full+snapkv:0.5", "adds nothing"),
        ("decode(h2o,budget=64,every=0)", "every must be"),
        ("decode(h2o,ratio=0.5)", "needs a token budget"),
        ("decode(snapkv,budget=16)", "not above the 32 tokens"),
        ("decode(streaming(sink=8),budget=8)", "not above the 9 tokens"),
        ("decode(pyramidkv,budget=64)", "needs a scoring method"),
        ("snapkv:0.5,prefill_chunk=0", "prefill_chunk must be"),
        ("decode(h2o(budget=3),budget=64)", "not to its scorer"),
        ("snapkv(0.5", "unbalanced"),
        ("adakv:0.5,scorer=full", "scoring method"),
        ("streaming:sink=4,window=0", "window must be"),
        ("snapkv:budget=0", "positive integer"),
        ("", "non-empty"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        cl.method(spec)


def test_budget_keep_rule():
    assert Budget(ratio=0.5).keep(101) == 51
    assert Budget(ratio=0.0).keep(7) == 7
    assert Budget(tokens=5).keep(7) == 5
    with pytest.raises(ValueError, match="larger than the context"):
        Budget(tokens=8).keep(7)


def test_list_methods_covers_the_registry_with_papers_and_parameters():
    infos = {m.name: m for m in cl.list_methods()}
    assert (
        set(infos)
        == set(cl.METHODS.names())
        >= {"full", "streaming", "snapkv", "pyramidkv", "tova", "h2o", "knorm", "random", "adakv"}
    )
    for info in infos.values():
        assert info.paper and info.summary
    assert "window" in infos["snapkv"].params and "ratio | budget" in infos["snapkv"].params
