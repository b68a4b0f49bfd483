"""Every place where contextlab depends on a transformers or torch version lives here.

Supported: transformers 5.x (tested on the oldest claimed, 5.0, and the newest, see README) and torch
>= 2.4. Everything else in ``contextlab.hf`` goes through these names.
"""

from __future__ import annotations

import functools
import inspect

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
    "attention",
    "attn_implementation",
    "cache_kwarg",
    "layer_types",
    "query_length",
    "register_attention",
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


def cache_kwarg(model) -> str:
    """Name of the cache argument of ``model.forward``: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated and removed in 5.40) or ``past_key_values`` (earlier 5.x)."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


@functools.cache
def _forward_takes_cache(cls: type) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention for grouped-query layouts, reading each KV head once where it can.

    ``query``: ``[B, Hq, Tq, D]``; ``key``/``value``: ``[B, H, S, D]`` with ``Hq = H * G``; ``mask``: boolean,
    ``[B, 1 | H, Tq, S]`` (per KV head), True = attend. Returns ``[B, Hq, Tq, D]``.

    - one query (decode): the G query heads of each KV head are folded into the query axis, so each KV
      head is read once under its own mask, on every backend;
    - no mask: SDPA's ``enable_gqa`` (flash / efficient kernels on CUDA read each KV head once);
    - a mask and several queries: on CUDA, ``enable_gqa`` with a mask falls back to the math kernel (all
      Tq x S scores in fp32), so K/V are expanded to the query heads instead and the memory-efficient
      kernel takes the mask; on CPU ``enable_gqa`` with a mask is fine.
    """
    b, hq, tq, d = query.shape
    h = key.shape[1]
    groups = hq // h
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if groups > 1 and tq == 1:
        out = sdpa(query.view(b, h, groups, d), key, value, attn_mask=mask, scale=scale)  # [B, H, G, D]
        return out.view(b, hq, 1, d)
    if mask is not None and mask.shape[1] > 1 and groups > 1:
        mask = mask.repeat_interleave(groups, dim=1)  # per KV head -> per query head
    if groups > 1 and (not SDPA_HAS_GQA or (mask is not None and query.device.type == "cuda")):
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        groups = 1
    extra = {"enable_gqa": True} if groups > 1 else {}
    return sdpa(query, key, value, attn_mask=mask, scale=scale, is_causal=is_causal, **extra)
