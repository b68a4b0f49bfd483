"""Registered task generators: ``TASKS.get(name)(tokenizer, length, seed, **params) -> list[Sample]``."""

from __future__ import annotations

import functools
from collections.abc import Callable

from contextlab.bench.tasks.base import Sample
from contextlab.bench.tasks.datasets import infinitebench, longbench, longbench_v2, loogle
from contextlab.bench.tasks.needlebench import (
    ancestral_trace,
    needlebench_multi_reasoning,
    needlebench_multi_retrieval,
    needlebench_single,
)
from contextlab.bench.tasks.qa import qa_single_hop, qa_two_hop
from contextlab.bench.tasks.ruler import NIAH_PRESETS, common_words, frequent_words, niah, variable_tracking
from contextlab.bench.tasks.scbench import scbench_kv, scbench_multitask
from contextlab.bench.tasks.threading import litm_kv, needle_threads
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

TASKS.register("needlebench_single", needlebench_single)
TASKS.register("needlebench_multi_retrieval", needlebench_multi_retrieval)
TASKS.register("needlebench_multi_reasoning", needlebench_multi_reasoning)
TASKS.register("needlebench_atc", ancestral_trace)
TASKS.register("threading_single", functools.partial(needle_threads, num_threads=1))
TASKS.register("threading_multi", functools.partial(needle_threads, num_threads=3))
TASKS.register("threading_single_backward", functools.partial(needle_threads, num_threads=1, direction="backward"))
TASKS.register("threading_multi_backward", functools.partial(needle_threads, num_threads=3, direction="backward"))
TASKS.register("litm_kv", litm_kv)
# Real benchmarks from local files: pass path=... (and subset=...) as task parameters.
TASKS.register("longbench", longbench)
TASKS.register("longbench_v2", longbench_v2)
TASKS.register("infinitebench", infinitebench)
TASKS.register("loogle", loogle)
DATASET_TASKS = ("longbench", "longbench_v2", "infinitebench", "loogle")
TASKS.register("scbench_kv", scbench_kv)
TASKS.register("scbench_multitask", scbench_multitask)
SHARED_CONTEXT_TASKS = ("scbench_kv", "scbench_multitask")

RULER_TASKS = (*NIAH_PRESETS, "vt", "cwe", "fwe", "qa_1", "qa_2")
NEEDLEBENCH_TASKS = (
    "needlebench_single",
    "needlebench_multi_retrieval",
    "needlebench_multi_reasoning",
    "needlebench_atc",
)
THREADING_TASKS = ("threading_single", "threading_multi", "threading_single_backward", "threading_multi_backward")
SYNTHETIC_TASKS = (*RULER_TASKS, *NEEDLEBENCH_TASKS, *THREADING_TASKS, "litm_kv", "scbench_kv", "scbench_multitask")

__all__ = [
    "DATASET_TASKS",
    "NEEDLEBENCH_TASKS",
    "RULER_TASKS",
    "SHARED_CONTEXT_TASKS",
    "SYNTHETIC_TASKS",
    "TASKS",
    "THREADING_TASKS",
    "Sample",
    "TaskGenerator",
]
