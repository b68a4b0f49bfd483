"""What a benchmark run measures: model x methods x tasks x lengths x samples, and how."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

from contextlab.bench.tasks import SHARED_CONTEXT_TASKS, TASKS
from contextlab.errors import ContextlabError
from contextlab.specstring import split_spec
from contextlab.strategies import Strategy, build

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
    # An OpenAI-compatible server to evaluate instead of a local model (``model`` is then the name it serves)
    # and the local tokenizer that builds the prompts (named model, folder or hub id; default: ``model``).
    endpoint: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        """Raise ValueError naming the first problem with the spec."""
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.endpoint!r}")
        if self.tokenizer is not None and self.endpoint is None:
            raise ValueError("tokenizer is for endpoint runs (the local model's own tokenizer is used otherwise)")
        if not self.methods or not self.tasks or not self.lengths:
            raise ValueError("a run needs at least one method, one task and one length")
        for spec in self.methods:
            if isinstance(build(spec), Strategy) and self.endpoint is not None:
                raise ValueError(
                    f"{spec}: input-level strategies run against a local model; an endpoint would answer the whole "
                    "prompt under its own method"
                )
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
        data = {**{k: None for k in ADDED_IN_V2}, **data}  # runs from before endpoints existed
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted(known - set(data))
        problems = [f"{kind} keys {keys}" for kind, keys in (("unknown", unknown), ("missing", missing)) if keys]
        if problems:
            raise ValueError(f"run spec from another contextlab version: {'; '.join(problems)}")
        return cls(**data)


LIST_FIELDS = ("methods", "tasks", "lengths")  # the fields --extend may grow
ADDED_IN_V2 = ("endpoint", "tokenizer")  # fields a version-1 run spec lacks (read as None)


class SpecMismatchError(ContextlabError):
    """``--resume`` with settings that differ from the run's stored spec."""


def resumed_spec(stored: RunSpec, given: dict, extend: bool = False) -> RunSpec:
    """The spec a resumed run continues with. ``given`` holds the settings passed again on resume (field ->
    value); each must equal the stored one, except that with ``extend`` the list fields (methods, tasks,
    lengths) may add items, which become new cells of the run. Anything else that differs is refused with
    every difference named, so a resume never silently ignores what it was told."""
    grown, differences = {}, []
    for name, value in given.items():
        old = getattr(stored, name)
        if name in LIST_FIELDS:
            added = [v for v in value if _canonical(name, v) not in {_canonical(name, o) for o in old}]
            if not added:
                continue
            if extend:
                grown[name] = [*old, *added]
                continue
            differences.append(f"{name}: the run has {old}, given {value} (new: {added})")
        elif value != old:
            differences.append(f"{name}: the run has {old!r}, given {value!r}")
    if differences:
        hint = "; --extend adds new methods, tasks or lengths to a run" if not extend else ""
        raise SpecMismatchError(
            "--resume continues a run with its stored settings, and these differ: "
            + "; ".join(differences)
            + f". Leave them out to resume as stored, or start a new run{hint}"
        )
    return replace(stored, **grown) if grown else stored


def _canonical(name: str, value):
    if name == "methods":
        return build(value).describe()
    return TaskSpec.parse(value).key if name == "tasks" else value
