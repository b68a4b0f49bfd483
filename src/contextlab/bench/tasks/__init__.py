"""Registered task generators: ``TASKS.get(name)(tokenizer, length, seed, **params) -> list[Sample]``."""

from __future__ import annotations

import functools
from collections.abc import Callable

from contextlab.bench.tasks.base import Sample
from contextlab.bench.tasks.qa import qa_single_hop, qa_two_hop
from contextlab.bench.tasks.ruler import NIAH_PRESETS, common_words, frequent_words, niah, variable_tracking
from contextlab.registry import Registry

TaskGenerator = Callable[..., list[Sample]]

TASKS: Registry[TaskGenerator] = Registry("task")
for _name in NIAH_PRESETS:
    TASKS.register(_name, functools.partial(niah, spec=_name))
TASKS.register("vt", variable_tracking)
TASKS.register("cwe", common_words)
TASKS.register("fwe", frequent_words)
TASKS.register("qa_1", qa_single_hop)
TASKS.register("qa_2", qa_two_hop)

RULER_TASKS = (*NIAH_PRESETS, "vt", "cwe", "fwe", "qa_1", "qa_2")

__all__ = ["RULER_TASKS", "TASKS", "Sample", "TaskGenerator"]
