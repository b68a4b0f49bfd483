"""Every place where contextlab depends on a transformers or torch version lives here.

Supported: transformers 5.x (tested on the oldest claimed, 5.0, and the newest, see README) and torch
>= 2.4. Everything else in ``contextlab.hf`` goes through these names.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface, Cache, DynamicLayer, PreTrainedConfig
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TRANSFORMERS_VERSION = Version(transformers.__version__)
TORCH_VERSION = Version(torch.__version__.split("+")[0])
MIN_TRANSFORMERS = Version("5.0.0")
SDPA_HAS_GQA = Version("2.5") <= TORCH_VERSION

__all__ = [
    "Cache",
    "DynamicLayer",
    "DynamicSlidingWindowLayer",
    "attn_implementation",
    "layer_types",
    "query_length",
    "register_attention",
    "sdpa",
    "sdpa_attention_forward",
]

if TRANSFORMERS_VERSION < MIN_TRANSFORMERS:  # pragma: no cover - guarded by pyproject too
    raise ImportError(f"contextlab needs transformers >= {MIN_TRANSFORMERS}, found {TRANSFORMERS_VERSION}")


def register_attention(name: str, attention_fn, mask_fn=sdpa_mask) -> None:
    """Register an attention function and its mask function under ``name`` (idempotent).

    Both are needed: for an attention name without a mask function, transformers builds no mask at all.
    """
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, mask_fn)


def query_length(arg) -> int:
    """Cache layers' ``get_mask_sizes`` receive the query length (transformers >= 5.x later releases) or
    the ``cache_position`` tensor (5.0 and early 5.x); both give the number of new tokens."""
    return int(arg.shape[0]) if isinstance(arg, torch.Tensor) else int(arg)


def attn_implementation(model) -> str | None:
    """The attention implementation a model currently dispatches to."""
    return getattr(model.config, "_attn_implementation", None)


def text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The decoder config of a model (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter else config


def layer_types(config: PreTrainedConfig) -> list[str]:
    """``"full_attention"`` or ``"sliding_attention"`` per decoder layer."""
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return list(types)
    window = getattr(cfg, "sliding_window", None)
    kind = "sliding_attention" if window is not None and getattr(cfg, "use_sliding_window", True) else "full_attention"
    return [kind] * cfg.num_hidden_layers


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention reading each KV head once (GQA) where torch allows it.

    ``query``: ``[B, Hq, Tq, D]``; ``key``/``value``: ``[B, H, S, D]``; ``mask``: boolean, broadcastable
    to ``[B, Hq, Tq, S]``, True = attend.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and not SDPA_HAS_GQA:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    extra = {"enable_gqa": True} if groups > 1 and SDPA_HAS_GQA else {}
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, is_causal=is_causal, **extra
    )
