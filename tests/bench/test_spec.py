"""RunSpec: checked when built, frozen, and read back only from its own version's JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from contextlab.bench.cli import _bench_args, _spec_from
from contextlab.bench.spec import RunSpec, SpecMismatchError, resumed_spec


def spec(**overrides) -> RunSpec:
    return RunSpec(**{"model": "reference", "methods": ["full"], "tasks": ["niah_single_1"], **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lengths": [8]}, "at least 16 tokens"),
        ({"methods": []}, "at least one method"),
        ({"samples": 0}, "samples must be a positive integer, got 0"),
        ({"shared_mode": "chat"}, "'chat'"),
        ({"methods": ["snapky:0.5"]}, "did you mean 'snapkv'"),
        ({"tasks": ["niah_singel_1"]}, "did you mean 'niah_single_1'"),
    ],
)
def test_a_bad_spec_fails_when_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        spec(**overrides)


def test_spec_is_frozen_and_replace_checks_again():
    base = spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.samples = 3  # type: ignore[misc]
    assert dataclasses.replace(base, samples=3).samples == 3
    with pytest.raises(ValueError, match="batch_size"):
        dataclasses.replace(base, batch_size=0)


def test_json_round_trip():
    base = spec(lengths=[512, 1024], seed=3, question_aware=False)
    assert RunSpec.from_json(base.to_json()) == base


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(prefill_chunk=512), r"unknown keys \['prefill_chunk'\]"),
        (lambda d: d.pop("shared_mode"), r"missing keys \['shared_mode'\]"),
    ],
)
def test_spec_of_another_version_is_a_clear_value_error(edit, message):
    data = json.loads(spec().to_json())
    edit(data)
    with pytest.raises(ValueError, match=message) as err:
        RunSpec.from_json(json.dumps(data))
    assert "another contextlab version" in str(err.value)
    with pytest.raises(ValueError, match="JSON object"):
        RunSpec.from_json("[1, 2]")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _bench_args(parser)
    return parser.parse_args(list(argv))


def test_cli_flags_build_the_spec_and_omitted_ones_keep_defaults():
    built = _spec_from(
        _args("--model", "reference", "--methods", "full,snapkv:0.5,window=8", "--lengths", "1k,600", "--seed", "0")
    )
    assert built == RunSpec(model="reference", methods=["full", "snapkv:0.5,window=8"], lengths=[1024, 600], seed=0)
    assert _spec_from(_args("--context-only-compression", "--allow-beyond-window")) == RunSpec(
        question_aware=False, allow_beyond_window=True
    )
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        _spec_from(_args("--samples", "0"))


def test_resume_with_nothing_or_the_same_settings_keeps_the_spec():
    stored = spec(methods=["full", "snapkv:0.5"], lengths=[512, 1024])
    assert resumed_spec(stored, {}) is stored
    same = {"methods": ["snapkv:ratio=0.5"], "lengths": [1024], "model": "reference", "samples": stored.samples}
    assert resumed_spec(stored, same) is stored  # a subset, in canonical or typed form, adds nothing


def test_resume_with_different_settings_names_every_difference():
    stored = spec(lengths=[512])
    with pytest.raises(SpecMismatchError) as err:
        resumed_spec(stored, {"methods": ["snapkv:0.5"], "lengths": [2048], "samples": 3})
    message = str(err.value)
    for part in ("methods: the run has ['full']", "lengths: the run has [512]", "samples: the run has 8", "--extend"):
        assert part in message


def test_extend_adds_list_items_but_never_changes_a_setting():
    stored = spec(lengths=[512])
    grown = resumed_spec(stored, {"methods": ["snapkv:0.5", "full"], "lengths": [512, 2048]}, extend=True)
    assert grown.methods == ["full", "snapkv:0.5"] and grown.lengths == [512, 2048] and grown.tasks == stored.tasks
    with pytest.raises(SpecMismatchError, match="seed: the run has 0, given 1") as err:
        resumed_spec(stored, {"methods": ["h2o:0.5"], "seed": 1}, extend=True)
    assert "--extend adds" not in str(err.value)
