"""Methods: frozen dataclasses that build per-layer policies; budgets; what a scorer sees.

Pure tensor code; nothing here imports transformers. Shapes use ``B`` batch, ``H`` KV heads, ``G`` query
heads per KV head, ``Tq`` queries in the current forward, ``S`` cached slots, ``D`` head dim.

Identity: a method IS its :meth:`Method.describe` string. Two methods are equal when they describe the same,
and ``contextlab.method(m.describe())`` rebuilds an equal method, so result rows always say exactly what ran.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from contextlab.methods.policy import LayerPolicy
from contextlab.methods.positions import Rope
from contextlab.store import DenseStore, MemoryTracker

PROTECTED = 1e12  # score of a token that must be kept (sinks, window); scores that use it are float64

# Roles a method takes in a composition; two parts may not take the same role.
PREFILL_EVICTION = "prefill eviction"
DECODE_EVICTION = "decode eviction"
POSITIONS = "position remapping"
STORAGE = "storage"
READ_SELECTION = "read selection"
SPARSE_PREFILL = "sparse prefill"


def param(text: str, default):
    """A method parameter with its help text (shown by ``contextlab methods``)."""
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class Budget:
    """How many tokens each (row, KV head) keeps: ``ratio`` is the fraction REMOVED, ``tokens`` an absolute
    count. Exactly one is set."""

    ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError(
                f"a budget needs exactly one of ratio or tokens, got ratio={self.ratio}, tokens={self.tokens}"
            )
        if self.ratio is not None and (
            isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0
        ):
            raise ValueError(f"ratio (fraction of tokens removed) must be in [0, 1), got {self.ratio!r}")
        if self.tokens is not None and (
            isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1
        ):
            raise ValueError(f"budget_tokens must be a positive integer, got {self.tokens!r}")

    def keep(self, length: int) -> int:
        """Tokens kept out of ``length``: ``length - floor(length * ratio)`` or ``tokens``."""
        if self.tokens is not None:
            if self.tokens > length:
                raise ValueError(f"budget of {self.tokens} tokens is larger than the context ({length} tokens)")
            return self.tokens
        return length - math.floor(length * self.ratio)

    def describe(self) -> str:
        return f"ratio={float(self.ratio)!r}" if self.ratio is not None else f"budget={self.tokens}"


def check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    """Raise ValueError unless ``value`` is an int >= ``minimum`` (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def bound(default=None):
    """A field a method fills when :meth:`Method.bind` measures the model (not a spec parameter)."""
    return field(default=default, repr=False, compare=False, metadata={"bound": True})


def check_number(name: str, value, low: float, high: float) -> None:
    """Raise ValueError unless ``value`` is a number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")


@dataclass(frozen=True, eq=False)
class Method:
    """Base of every method. Subclasses set ``name``/``paper``/``roles`` and override :meth:`build`."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    roles: ClassVar[frozenset[str]] = frozenset()
    positional: ClassVar[str | None] = None  # field that a bare word in a spec fills (``decode(h2o,...)``)

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        """The policy of one attention layer (fresh state per layer and per cache)."""
        return LayerPolicy()

    @property
    def compresses(self) -> bool:
        """True when the method may evict tokens."""
        return False

    @property
    def sparse_reads(self) -> bool:
        """True when decode queries read a subset of the cache chosen per query (the cache keeps every
        token; its ``budget`` counts tokens read, not kept)."""
        return False

    @property
    def splits_heads(self) -> bool:
        """True when the KV heads of one layer may keep different numbers of tokens (per-head storage)."""
        return False

    def prefill_chunk_size(self) -> int | None:
        """Prompt tokens fed per forward (None = the whole prompt at once)."""
        return None

    def prompt_keep(self, length: int) -> int | None:
        """Tokens a prompt of ``length`` keeps after prefill eviction (None = no prefill eviction)."""
        return None

    def repeats_question(self) -> bool:
        """True when the question is appended to every prompt chunk (question-aware, chunked prefill only)."""
        return False

    def reencodes(self) -> bool:
        """True when a chunked prefill keeps token ids, not cache entries: every chunk is fed in a fresh
        cache after the tokens the previous chunk's forward chose (``Step.segment``, ``SELECTED``), and the
        last chunk's cache is the one kept."""
        return False

    def window_for(self, native: int) -> int | None:
        """Longest sequence (prompt + generated tokens) the method serves on a model trained on ``native``
        positions (None = no limit). Methods that do not touch positions serve the native window; ValueError
        when the method's parameters do not suit that window."""
        return native

    def rope_scaling(self, needed: int, native: int) -> dict | None:
        """transformers rope parameters to use for a call reaching ``needed`` positions (None = the model's)."""
        return None

    def bind(self, model, tokenizer) -> Method:
        """This method ready for ``model`` (one that measures the model first returns a copy holding what it
        measured; see :func:`bound`); called before a cache is built. Most methods need nothing: self."""
        return self

    def make_store(self, tracker: MemoryTracker, rope: Rope | None = None) -> DenseStore | None:
        """The store every layer of a cache holds its keys and values in (None = the dense store); ``rope``:
        the layer's rotary frequencies when the method :attr:`needs_rope`."""
        return None

    @property
    def needs_rope(self) -> bool:
        """True when the cache must hand the model's rotary frequencies to the layers (position remaps,
        keys stored before RoPE)."""
        return bool(getattr(self, "remaps_positions", False))

    # -- identity --------------------------------------------------------------------------------------
    def params(self) -> list[str]:
        """``key=value`` texts of every field that differs from its default, in declaration order."""
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default or value is None or f.metadata.get("bound"):
                continue
            out.append(format_param(f, value))
        return out

    def describe(self) -> str:
        """Canonical spec: ``name`` or ``name:key=value,...`` (every non-default field)."""
        params = self.params()
        return self.name if not params else f"{self.name}:{','.join(params)}"

    def nested(self) -> str:
        """Spec as a parameter of another method: ``name`` or ``name(key=value,...)``."""
        params = self.params()
        return self.name if not params else f"{self.name}({','.join(params)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Method) and type(self) is type(other) and self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.describe()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"

    def __add__(self, other: Method) -> Method:
        from contextlab.methods.compose import Composite

        left = self.parts if isinstance(self, Composite) else (self,)
        right = other.parts if isinstance(other, Composite) else (other,)
        return Composite(parts=(*left, *right))


def with_budget(method: PrefillMethod, budget: Budget | None) -> PrefillMethod:
    """A copy of ``method`` with another budget (wrappers lend their budget to their scorer)."""
    return dataclasses.replace(method, budget=budget)


def format_param(f: dataclasses.Field, value) -> str:
    """``key=value`` text of one field, readable back by the spec parser."""
    if isinstance(value, Budget):
        return value.describe()
    if isinstance(value, Method):
        return f"{f.name}={value.nested()}"
    if isinstance(value, bool):
        return f"{f.name}={'true' if value else 'false'}"
    if isinstance(value, (int, float)) and "float" in str(f.type):
        return f"{f.name}={float(value)!r}"
    return f"{f.name}={value}"


@dataclass
class ScoreInputs:
    """Everything a scorer may look at for one layer when it evicts.

    ``queries``: ``[B, H*G, Tq, D]`` post-RoPE queries; they are the newest ``Tq`` slots.
    ``keys``/``values``: ``[B, H, S, D]`` post-RoPE keys and values of every slot (right-aligned view).
    ``valid``: ``[B, 1 | H, S]`` False on padding and unused slots. ``positions``: ``[B, 1 | H, S]`` position
    of each slot's token in its row. ``keep``: ``[B]`` slots each row keeps under the plain budget (before
    per-layer/per-head rules). ``lengths``: ``[B]`` real tokens of each row's prompt. ``prior``: optional
    ``[B, H, S]`` importance carried from earlier evictions (decode-time H2O). ``column_sums``: optional
    ``[B, H, S]`` attention each slot received from these queries, when the forward already computed it.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    keep: torch.Tensor
    lengths: torch.Tensor
    scaling: float
    layer_idx: int
    num_layers: int
    prior: torch.Tensor | None = None
    column_sums: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]


@dataclass(frozen=True, eq=False)
class PrefillMethod(Method):
    """Base of eviction scorers: score every cached token, keep the best per (row, KV head).

    Subclasses override :meth:`score`; per-layer or per-head budget rules override :meth:`keep_counts`.
    Eviction runs once the prompt is in, or with ``prefill_chunk=N`` after every N prompt tokens, scored by
    that chunk's queries, so the cache never holds more than the budget plus one chunk (Finch).
    """

    roles: ClassVar[frozenset[str]] = frozenset({PREFILL_EVICTION})
    budget: Budget | None = field(default=None)
    prefill_chunk: int | None = param(
        "feed the prompt this many tokens at a time and evict after each chunk (Finch); None = all at once", None
    )

    def __post_init__(self) -> None:
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise ValueError(f"budget must be a Budget (ratio or tokens), got {self.budget!r}")
        check_int("prefill_chunk", self.prefill_chunk, 1, allow_none=True)

    @property
    def effective_budget(self) -> Budget | None:
        return self.budget

    @property
    def compresses(self) -> bool:
        return self.effective_budget is not None

    def prefill_chunk_size(self) -> int | None:
        return self.prefill_chunk

    def prompt_keep(self, length: int) -> int | None:
        return self.effective_budget.keep(length) if self.compresses else None

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        from contextlab.methods.prefill import PrefillEvictionPolicy

        return PrefillEvictionPolicy(self, layer_idx, num_layers) if self.compresses else LayerPolicy()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B, H, S]`` importance of each cached token (higher is kept first)."""
        raise NotImplementedError

    def keep_counts(self, inputs: ScoreInputs, scores: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` tokens kept per row and KV head; by default the plain budget for every head."""
        b, h, _ = scores.shape
        return inputs.keep.view(b, 1).expand(b, h)

    def layer_capacity(self, keep: int, length: int, num_layers: int, layer_idx: int) -> int:
        """Upper bound on the slots one layer keeps (to preallocate chunked prefill)."""
        return keep

    @property
    def uses_column_sums(self) -> bool:
        """True when scoring needs the attention every slot received from all of a forward's queries."""
        return False

    # -- decode-time use (see contextlab.methods.decode) -----------------------------------------------------
    def decode_queries(self, every: int) -> int:
        """Recent queries this scorer reads when it evicts during decoding (0 = none)."""
        return 0

    def protected_tokens(self) -> int:
        """Tokens the scorer always keeps (sinks, windows); a decode budget must exceed them."""
        return 0


def select_tokens(scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``counts[b, h]`` best-scored valid tokens, sorted by slot.

    ``scores``: ``[B, H, S]``; ``counts``: ``[B, H]``; ``valid``: ``[B, 1 | H, S]``.
    Returns ``indices [B, H, C]`` (C = max count) and ``kept [B, H, C]`` (False on the slots past a
    row/head's own count, which point at arbitrary tokens and must never be attended to).
    """
    s = scores.shape[-1]
    capacity = int(counts.max())
    masked = scores.double().masked_fill(~valid, float("-inf"))
    # A stable sort breaks exact ties by slot, so a row keeps the same tokens alone or in a batch.
    top = masked.sort(dim=-1, descending=True, stable=True).indices[..., :capacity]  # [B, H, C], best first
    kept = torch.arange(capacity, device=scores.device).view(1, 1, -1) < counts.unsqueeze(-1)
    # Sort kept slots by position, dropped slots after them.
    order = torch.where(kept, top, top + s).argsort(dim=-1)
    return top.gather(-1, order), kept.gather(-1, order)
