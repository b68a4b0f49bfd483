"""The contextlab KV cache: a ``transformers.Cache`` whose full-attention layers can be compressed
(:class:`~contextlab.hf.layer.CompressibleLayer`) and whose sliding-window layers pass through untouched."""

from __future__ import annotations

from contextlab.hf.compat import Cache, DynamicSlidingWindowLayer, layer_types, text_config
from contextlab.hf.layer import LAYER_ATTRIBUTE, CompressibleLayer, CompressionRequest, MemoryTracker

__all__ = ["LAYER_ATTRIBUTE", "CompressibleLayer", "CompressionRequest", "ContextlabCache", "MemoryTracker"]


class ContextlabCache(Cache):
    """A cache for one generation: compressible full-attention layers, sliding layers untouched."""

    def __init__(self, config) -> None:
        cfg = text_config(config)
        types = layer_types(cfg)
        self.tracker = MemoryTracker()
        layers = []
        for idx, kind in enumerate(types):
            if kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=cfg.sliding_window))
            elif kind == "full_attention":
                layers.append(CompressibleLayer(idx, len(types), self.tracker))
            else:
                raise ValueError(f"layer {idx} has attention type {kind!r}, which contextlab does not support")
        super().__init__(layers=layers)

    @property
    def compressible(self) -> list[CompressibleLayer]:
        return [layer for layer in self.layers if isinstance(layer, CompressibleLayer)]

    def arm(self, request: CompressionRequest) -> None:
        """Compress every compressible layer at the end of the forward that brings it to ``request.length``."""
        for layer in self.compressible:
            layer.request = request

    def kv_bytes(self) -> int:
        """Bytes the cache holds now, all layers (sliding layers included)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressibleLayer):
                total += layer.nbytes()
            elif layer.is_initialized and layer.keys is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    @property
    def peak_bytes(self) -> int:
        """Peak bytes held by the compressible layers plus the current bytes of sliding layers."""
        sliding = self.kv_bytes() - sum(layer.nbytes() for layer in self.compressible)
        return self.tracker.peak + sliding
