"""Where a layer's keys and values live: stores that grow in place and shrink when tokens are evicted.

Pure tensor code (no transformers). :class:`~contextlab.store.dense.DenseStore` holds full-precision slots;
:class:`~contextlab.store.quantized.QuantizedStore` (same interface) holds old slots as integer codes with
scales and keeps a full-precision window of recent ones (:mod:`contextlab.store.codec` defines the codes);
:class:`~contextlab.store.offload.OffloadStore` keeps old slots in host memory and copies back only the
slots a read names. Both move old slots out of the buffers through :mod:`contextlab.store.prefix`.
"""

from contextlab.store.dense import DenseStore, MemoryTracker, SlotGroup, SlotView

__all__ = ["DenseStore", "MemoryTracker", "SlotGroup", "SlotView"]
