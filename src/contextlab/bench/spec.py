"""What a benchmark run measures: model x methods x tasks x lengths x samples, and how."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from contextlab.bench.tasks import SHARED_CONTEXT_TASKS, TASKS
from contextlab.methods.spec import build_method
from contextlab.specstring import split_spec

# The main job (`make bench`): SmolLM2-135M-Instruct, a real instruction-following model that installs
# offline from PyPI, at the KV ratio where methods part ways (0.75 removed), sized to finish in <= 10
# minutes on 2 CPU cores (measured: see benchmarks/results/default_suite.md).
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_METHODS = (
    "full",
    *(f"{m}:0.75" for m in ("streaming", "snapkv", "pyramidkv", "tova", "h2o", "knorm", "adakv")),
)
DEFAULT_TASKS = ("niah_single_2",)
DEFAULT_LENGTHS = (1024, 2048)
DEFAULT_SAMPLES = 8
# Needle answers are 7 digits, one token each for SmolLM2: 16 new tokens hold the answer with room to spare.
DEFAULT_MAX_NEW_TOKENS = 16
SHARED_MODES = ("turns", "requests")


@dataclass(frozen=True)
class TaskSpec:
    """A registered task and its parameters, e.g. ``vt:num_hops=4`` or ``longbench:path=f.jsonl``."""

    name: str
    params: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> TaskSpec:
        name, positional, params = split_spec(text)
        if positional:
            raise ValueError(f"task spec {text!r}: give parameters as key=value")
        TASKS.get(name)  # unknown name -> ValueError with a suggestion
        return cls(name=name, params=params)

    @property
    def key(self) -> str:
        """Stable text form, used as the task column of the results."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))

    @property
    def shared_context(self) -> bool:
        return self.name in SHARED_CONTEXT_TASKS


@dataclass(frozen=True)
class RunSpec:
    """One benchmark run's settings, checked when built (a bad method, task or length fails here, before any
    model loads). Frozen: change a setting with ``dataclasses.replace(spec, samples=4)``."""

    model: str = DEFAULT_MODEL
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    device: str | None = None
    batch_size: int = 8
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    question_aware: bool = True
    shared_mode: str = "turns"
    allow_beyond_window: bool = False

    def __post_init__(self) -> None:
        """Raise ValueError naming the first problem with the spec."""
        if not self.methods or not self.tasks or not self.lengths:
            raise ValueError("a run needs at least one method, one task and one length")
        for spec in self.methods:
            build_method(spec)
        for task in self.tasks:
            TaskSpec.parse(task)
        if any(n < 16 for n in self.lengths):
            raise ValueError(f"lengths must be at least 16 tokens, got {self.lengths}")
        for name, value in (
            ("samples", self.samples),
            ("batch_size", self.batch_size),
            ("max_new_tokens", self.max_new_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.shared_mode not in SHARED_MODES:
            raise ValueError(f"shared_mode must be one of {SHARED_MODES}, got {self.shared_mode!r}")

    @property
    def task_specs(self) -> list[TaskSpec]:
        return [TaskSpec.parse(t) for t in self.tasks]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        """The spec :meth:`to_json` wrote; a spec from another contextlab version (keys this one does not know,
        or lacks) is refused with both lists named rather than half-read."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a run spec is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted(known - set(data))
        problems = [f"{kind} keys {keys}" for kind, keys in (("unknown", unknown), ("missing", missing)) if keys]
        if problems:
            raise ValueError(f"run spec from another contextlab version: {'; '.join(problems)}")
        return cls(**data)
