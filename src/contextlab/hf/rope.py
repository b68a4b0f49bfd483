"""A model's rotary embedding as window-extension methods need it.

- :func:`rope_of`: the rotary frequencies of the full-attention layers, for position remaps (Self-Extend,
  STRING, LM-Infinite), which rotate cached post-RoPE keys by position differences. Only RoPE types with
  static frequencies qualify (default, linear, llama3, yarn); a dynamic or LongRoPE model changes its
  frequencies with the sequence length, so a cached key's rotation could not be undone.
- :func:`scaled_rope`: RoPE scaling methods (NTK, YaRN, linear) swap the frequencies and attention scaling of
  the model's rotary module(s) for the call, computed by transformers' own rope-parameter functions, and
  restore the originals afterwards, even on error.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from contextlab.hf.compat import layer_types, text_config
from contextlab.methods.base import Method
from contextlab.methods.positions import Rope

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
FULL = "full_attention"


def native_window(config) -> int | None:
    """The model's trained positions (``max_position_embeddings``)."""
    return getattr(text_config(config), "max_position_embeddings", None)


def rope_parameters(config) -> dict:
    """The rope parameters of the full-attention layers (models with per-layer-type parameters nest them)."""
    params = getattr(text_config(config), "rope_parameters", None)
    if params is None:
        raise ValueError("this model has no rope_parameters in its config; position methods need RoPE")
    if FULL in params and isinstance(params[FULL], dict):
        return params[FULL]
    return params


def _per_type(config) -> bool:
    params = getattr(text_config(config), "rope_parameters", None) or {}
    return FULL in params and isinstance(params[FULL], dict)


def rope_of(config, method: Method) -> Rope:
    """Rotary frequencies of the full-attention layers; ValueError naming the rope type when ``method``
    cannot work with it."""
    cfg = text_config(config)
    params = rope_parameters(cfg)
    kind = params.get("rope_type", "default")
    if kind not in STATIC_ROPE_TYPES:
        raise ValueError(
            f"{method.describe()} rotates cached keys by position differences, which needs RoPE frequencies "
            f"that do not change with the length; this model's rope type is {kind!r} (supported: "
            f"{', '.join(STATIC_ROPE_TYPES)})"
        )
    inv_freq, _ = _frequencies(cfg, kind)
    return Rope(inv_freq.float())


def _frequencies(cfg, kind: str, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    extra = {"layer_type": FULL} if _per_type(cfg) else {}
    if kind == "default":
        params = rope_parameters(cfg)
        base = params["rope_theta"]
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=seq_len, **extra)


def scaled_frequencies(config, scaling: dict, needed: int) -> tuple[torch.Tensor, float]:
    """Frequencies and attention scaling of the full-attention layers under ``scaling`` (a rope-parameter
    update such as ``{"rope_type": "yarn", "factor": 4.0}``), from transformers' formulas."""
    cfg = copy.deepcopy(text_config(config))
    base = rope_parameters(cfg)
    if base.get("rope_type", "default") != "default":
        raise ValueError(
            f"{scaling['rope_type']} scaling rescales a plain RoPE; this model's full-attention layers already use "
            f"rope type {base['rope_type']!r}"
        )
    merged = {**base, **scaling}
    if scaling["rope_type"] == "dynamic":
        # transformers' dynamic NTK grows the base by (factor * n / native - factor + 1) ** (d / (d - 2)); with
        # factor 1 at n = native * s that is s ** (d / (d - 2)): NTK-aware scaling by s, fixed for the call.
        needed = round(scaling["original_max_position_embeddings"] * scaling["factor"])
        merged["factor"] = 1.0
    if _per_type(cfg):
        cfg.rope_parameters = {**cfg.rope_parameters, FULL: merged}
    else:
        cfg.rope_parameters = merged
    return _frequencies(cfg, scaling["rope_type"], seq_len=needed)


def _rotary_slots(model) -> list[tuple[torch.nn.Module, str, str]]:
    """(module, frequency attribute, scaling attribute) of every rotary module serving full attention."""
    slots = []
    for module in model.modules():
        if hasattr(module, f"{FULL}_inv_freq"):
            slots.append((module, f"{FULL}_inv_freq", f"{FULL}_attention_scaling"))
        elif hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
            slots.append((module, "inv_freq", "attention_scaling"))
    return slots


@contextmanager
def scaled_rope(model, method: Method, needed: int) -> Iterator[None]:
    """Run the block with ``method``'s RoPE scaling for a call reaching ``needed`` positions (no change when
    the method scales nothing)."""
    native = native_window(model.config)
    scaling = method.rope_scaling(needed, native) if native else None
    if scaling is None:
        yield
        return
    if "sliding_attention" in layer_types(model.config) and not _per_type(model.config):
        raise ValueError(
            f"{method.describe()}: this model shares one RoPE between sliding-window and full-attention layers; "
            "scaling it would move the sliding layers too"
        )
    inv_freq, attention = scaled_frequencies(model.config, scaling, needed)
    slots = _rotary_slots(model)
    if not slots:
        raise ValueError(f"{method.describe()}: found no rotary embedding module in this model to rescale")
    saved = [(m, f, a, getattr(m, f), getattr(m, a)) for m, f, a in slots]
    try:
        for m, f, a, old, _ in saved:
            setattr(m, f, inv_freq.to(device=old.device, dtype=old.dtype))
            setattr(m, a, attention)
        yield
    finally:
        for m, f, a, old, scale in saved:
            setattr(m, f, old)
            setattr(m, a, scale)
