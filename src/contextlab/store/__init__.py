"""Where a layer's keys and values live: stores that grow in place and shrink when tokens are evicted.

Pure tensor code (no transformers). :class:`~contextlab.store.dense.DenseStore` is the only store today;
a quantized store (integer codes + scales + an fp residual window) implements the same interface.
"""

from contextlab.store.dense import DenseStore, MemoryTracker, SlotGroup, SlotView

__all__ = ["DenseStore", "MemoryTracker", "SlotGroup", "SlotView"]
