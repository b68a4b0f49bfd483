"""Which models contextlab runs on, and the reason when it does not.

Methods read and write post-RoPE keys of standard multi-head / grouped-query attention, so a model needs
RoPE and ordinary K/V projections. Multi-head latent attention (MLA) caches a compressed latent instead
of keys, and linear-attention or state-space layers keep no per-token keys at all.
"""

from __future__ import annotations

import torch

from contextlab.errors import ContextlabError
from contextlab.hf.compat import layer_types, text_config

SUPPORTED_MODEL_TYPES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "gemma3_text": "Gemma 3 (text; sliding-window layers pass through uncompressed)",
}


class UnsupportedModelError(ContextlabError):
    """The model's architecture cannot be served by contextlab; the message says why."""


def unsupported_reason(config) -> str | None:
    """None if supported, else every reason the model is refused."""
    cfg = text_config(config)
    model_type = getattr(cfg, "model_type", "unknown")
    reasons = []
    if getattr(cfg, "kv_lora_rank", None) is not None or getattr(cfg, "qk_rope_head_dim", None) is not None:
        reasons.append("it uses multi-head latent attention (MLA), which caches a latent instead of keys")
    if getattr(cfg, "rope_parameters", None) is None and getattr(cfg, "rope_theta", None) is None:
        reasons.append("it has no rotary position embedding (RoPE)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        reasons.append(f"model type {model_type!r} is not among the supported ones: {supported}")
    return "; ".join(reasons) if reasons else None


def check_supported(config) -> None:
    reason = unsupported_reason(config)
    if reason:
        raise UnsupportedModelError(f"contextlab cannot run this model: {reason}")


def output_projections(model) -> list[torch.Tensor]:
    """The attention output projection's weight ``[hidden, Hq * D]`` of each full-attention decoder layer, in
    order (the layers a contextlab cache compresses). Every supported architecture names it
    ``self_attn.o_proj``."""
    decoder = model.get_decoder()
    types = layer_types(model.config)
    if len(decoder.layers) != len(types):
        raise UnsupportedModelError(
            f"the decoder has {len(decoder.layers)} layers but its config lists {len(types)} layer types"
        )
    weights = []
    for index, (layer, kind) in enumerate(zip(decoder.layers, types, strict=True)):
        if kind != "full_attention":
            continue
        projection = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if projection is None:
            raise UnsupportedModelError(f"decoder layer {index} has no self_attn.o_proj (attention output projection)")
        weights.append(projection.weight)
    return weights
