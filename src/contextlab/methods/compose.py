"""Composition: ``a+b`` runs methods of different families on one cache, in order.

``snapkv:0.5+decode(h2o,budget=512)`` evicts the prompt with SnapKV, then keeps generation bounded with
H2O; ``selfextend+snapkv:0.5`` evicts at true positions and attends at Self-Extend's. Each part takes roles
(prefill eviction, decode eviction, position remapping, storage, read selection); two parts taking
the same role make no sense together and are refused at construction, with both parts named.
"""

from __future__ import annotations

from dataclasses import dataclass

from contextlab.methods.base import POSITIONS, Method
from contextlab.methods.policy import CompositePolicy, LayerPolicy
from contextlab.methods.positions import Rope
from contextlab.store import DenseStore, MemoryTracker


@dataclass(frozen=True, eq=False)
class Composite(Method):
    """Several methods of different families applied to one cache, in the order given."""

    name = "+"
    paper = "see each part"
    parts: tuple[Method, ...] = ()

    def __post_init__(self) -> None:
        if len(self.parts) < 2:
            raise ValueError(f"a composition needs at least two parts, got {len(self.parts)}")
        for part in self.parts:
            if not isinstance(part, Method) or isinstance(part, Composite):
                raise ValueError(f"composition parts must be single methods, got {part!r}")
            if not part.roles:
                raise ValueError(f"{part.describe()!r} adds nothing to a composition; leave it out")
        rotating = [p for p in self.parts if p.needs_rope and not getattr(p, "remaps_positions", False)]
        rescaling = [p for p in self.parts if getattr(p, "rescales_rope", False)]
        if rotating and rescaling:
            raise ValueError(
                f"{rotating[0].describe()!r} rotates stored keys with the model's own RoPE, which "
                f"{rescaling[0].describe()!r} changes for the call; they cannot be composed"
            )
        splitting = [p for p in self.parts if p.splits_heads]
        readers = [p for p in self.parts if p.sparse_reads]
        if splitting and readers:
            raise ValueError(
                f"{readers[0].describe()!r} reads caches whose KV heads share one slot count, and "
                f"{splitting[0].describe()!r} keeps a different number of tokens per head; compose the reader "
                "with a method that keeps the same number in every head (snapkv, pyramidkv, streaming, ...)"
            )
        chunked = [p for p in self.parts if p.prefill_chunk_size() is not None]
        if len({p.prefill_chunk_size() for p in chunked}) > 1:
            raise ValueError(
                f"{chunked[0].describe()!r} and {chunked[1].describe()!r} feed the prompt in chunks of different "
                "sizes; give prefill_chunk to one of them"
            )
        for i, first in enumerate(self.parts):
            for second in self.parts[i + 1 :]:
                shared = first.roles & second.roles
                if shared:
                    raise ValueError(
                        f"{first.describe()!r} and {second.describe()!r} cannot be composed: both take the "
                        f"{', '.join(sorted(shared))} role"
                    )

    @property
    def roles(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(p.roles for p in self.parts))

    @property
    def compresses(self) -> bool:
        return any(p.compresses for p in self.parts)

    @property
    def sparse_reads(self) -> bool:
        return any(p.sparse_reads for p in self.parts)

    def prefill_chunk_size(self) -> int | None:
        return next((c for c in (p.prefill_chunk_size() for p in self.parts) if c is not None), None)

    def prompt_keep(self, length: int) -> int | None:
        return next((k for k in (p.prompt_keep(length) for p in self.parts) if k is not None), None)

    def repeats_question(self) -> bool:
        return any(p.repeats_question() for p in self.parts)

    def reencodes(self) -> bool:
        return any(p.reencodes() for p in self.parts)

    def window_for(self, native: int) -> int | None:
        extenders = [p for p in self.parts if POSITIONS in p.roles]
        return extenders[0].window_for(native) if extenders else native

    def rope_scaling(self, needed: int, native: int) -> dict | None:
        return next((r for r in (p.rope_scaling(needed, native) for p in self.parts) if r is not None), None)

    def bind(self, model, tokenizer) -> Method:
        parts = tuple(p.bind(model, tokenizer) for p in self.parts)
        return self if all(a is b for a, b in zip(parts, self.parts, strict=True)) else Composite(parts)

    def make_store(self, tracker: MemoryTracker, rope: Rope | None = None) -> DenseStore | None:
        return next((s for s in (p.make_store(tracker, rope) for p in self.parts) if s is not None), None)

    @property
    def needs_rope(self) -> bool:
        return any(p.needs_rope for p in self.parts)

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return CompositePolicy([p.build(layer_idx, num_layers) for p in self.parts])

    def describe(self) -> str:
        return "+".join(p.describe() for p in self.parts)

    def nested(self) -> str:
        raise ValueError("a composition cannot be a parameter of another method")
