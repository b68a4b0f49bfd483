"""The ``contextlab`` attention function and its registration with transformers.

Registered through transformers' public extension points (``AttentionInterface`` and
``AttentionMaskInterface``); a model opts in with ``model.set_attn_implementation("contextlab")``.
For a layer of a :class:`~contextlab.hf.cache.ContextlabCache` (recognised by the weak reference its
``update`` attaches to the returned keys) the layer attends through its store and policy. Any other layer -
sliding-window layers, or a plain ``DynamicCache`` - goes through transformers' own SDPA path unchanged, so
the implementation is a drop-in for ``"sdpa"``. A contextlab layer hands out empty placeholder keys; if the
reference to it is lost on the way, the function refuses to attend rather than attending to nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from contextlab.hf.cache import LAYER_ATTRIBUTE
from contextlab.hf.compat import attn_implementation, register_attention, sdpa_attention_forward

ATTENTION_NAME = "contextlab"


def contextlab_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: ``query [B, Hq, Tq, D]``, ``key``/``value``
    ``[B, H, S, D]`` as returned by the cache; returns ``([B, Tq, Hq, D], None)``."""
    ref = getattr(key, LAYER_ATTRIBUTE, None)
    layer = ref() if ref is not None else None
    if layer is None:
        if key.shape[-2] == 0:
            raise RuntimeError(
                "contextlab attention got an empty key tensor without its cache layer (the reference the layer "
                "attaches was lost); refusing to attend over nothing"
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("contextlab attention does not support attention-logit softcapping (Gemma 2 style)")
    if dropout and module.training:
        raise ValueError("contextlab attention is for inference; attention dropout is not supported")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise TypeError(f"expected a boolean mask from the contextlab mask function, got {attention_mask.dtype}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query, attention_mask, scale), None


def ensure_registered() -> None:
    """Register the attention and mask functions (idempotent; called before every use)."""
    register_attention(ATTENTION_NAME, contextlab_attention)


@contextmanager
def contextlab_attention_enabled(model) -> Iterator[None]:
    """Switch ``model`` to contextlab attention for the duration of the block, then switch it back."""
    ensure_registered()
    previous = attn_implementation(model)
    if previous == ATTENTION_NAME:
        yield
        return
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        if previous is not None:
            model.set_attn_implementation(previous)
