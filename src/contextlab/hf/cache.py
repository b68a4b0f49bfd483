"""The contextlab KV cache: a ``transformers.Cache`` whose full-attention layers are
:class:`~contextlab.hf.layer.ContextlabLayer` (a store driven by the method's per-layer policy) and whose
sliding-window layers pass through untouched."""

from __future__ import annotations

from contextlab.hf.compat import Cache, DynamicSlidingWindowLayer, layer_types, text_config
from contextlab.hf.layer import LAYER_ATTRIBUTE, CacheState, ContextlabLayer
from contextlab.hf.rope import rope_of
from contextlab.methods.base import Method
from contextlab.methods.eviction import Full
from contextlab.store import MemoryTracker

__all__ = ["LAYER_ATTRIBUTE", "CacheState", "ContextlabCache", "ContextlabLayer", "MemoryTracker"]


class ContextlabCache(Cache):
    """A cache for one generation under ``method`` (default: full attention)."""

    def __init__(self, config, method: Method | None = None) -> None:
        cfg = text_config(config)
        types = layer_types(cfg)
        method = method or Full()
        self.method, self.config = method, config
        self.state = CacheState(native=getattr(cfg, "max_position_embeddings", None))
        if method.needs_rope:
            self.state.rope = rope_of(cfg, method)
        full = [i for i, kind in enumerate(types) if kind == "full_attention"]
        layers = []
        for idx, kind in enumerate(types):
            if kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=cfg.sliding_window))
            elif kind == "full_attention":
                rank = full.index(idx)
                policy = lambda r=rank: method.build(r, len(full))  # noqa: E731
                layers.append(ContextlabLayer(policy, rank, len(full), self.state, method.make_store))
            else:
                raise ValueError(f"layer {idx} has attention type {kind!r}, which contextlab does not support")
        super().__init__(layers=layers)

    @property
    def tracker(self) -> MemoryTracker:
        return self.state.tracker

    @property
    def compressible(self) -> list[ContextlabLayer]:
        return [layer for layer in self.layers if isinstance(layer, ContextlabLayer)]

    def begin_prompt(self, columns: int, lengths: list[int], new_tokens: int = 0) -> None:
        """Announce the prompt: ``columns`` padded columns, ``lengths`` real tokens per row, and about
        ``new_tokens`` tokens to follow (their room is allocated with the prompt's, so decoding starts
        without a copy). Layers call their policy's prompt-end hook when they have seen ``columns`` tokens."""
        self.state.prompt_columns, self.state.prompt_lengths = columns, list(lengths)
        self.state.new_tokens = new_tokens

    def reserve(self, tokens: int) -> None:
        """Preallocate room for ``tokens`` more tokens in every layer (bounded by each policy)."""
        for layer in self.compressible:
            layer.reserve(tokens)

    def kv_bytes(self) -> int:
        """Bytes of the tokens the cache holds now, all layers (sliding layers included), per-slot metadata
        and policy state included; free preallocated capacity is not (see :attr:`peak_bytes`)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, ContextlabLayer):
                total += layer.nbytes()
            elif layer.is_initialized and layer.keys is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def read_bytes_per_step(self) -> float:
        """Mean bytes one decode step read from the cache, all layers: what each contextlab layer read (the
        slots a sparse read named and what choosing them took, or everything it held) plus what sliding
        layers hold now (each step reads their whole window). 0 before any decode step."""
        layers = self.compressible
        steps = max((layer.read_steps for layer in layers), default=0)
        if not steps:
            return 0.0
        sliding = self.kv_bytes() - sum(layer.nbytes() for layer in layers)
        return sum(layer.read_bytes for layer in layers) / steps + sliding

    @property
    def peak_bytes(self) -> int:
        """Peak bytes allocated by the contextlab layers' stores (capacity included) plus the current bytes of
        sliding layers."""
        sliding = self.kv_bytes() - sum(layer.nbytes() for layer in self.compressible)
        return self.tracker.peak + sliding
