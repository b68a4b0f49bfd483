"""Compressed caches on disk: save a prefilled (evicted and/or quantized) cache, load it in another process,
and ask it follow-up questions as if it had never left memory (CacheGen's reuse of a context's KV,
arXiv 2310.07240; SCBench's shared-context setting).

File layout (version 1), little-endian::

    magic    16 bytes  b"CONTEXTLAB-KV\\x00\\x00\\x00"
    version   4 bytes  uint32
    header    8 bytes  uint64 length of the JSON header
    blob      8 bytes  uint64 length of the tensor blob
    sha256   32 bytes  of header + blob
    header   JSON: format version, library versions, method spec, model and tokenizer fingerprints, dtype,
             cache state, one entry per layer (store groups, policy scalars, counters)
    blob     safetensors bytes: every tensor (codes, scales, full-precision slots, metadata, policy state,
             the prompt's ids, mask and last logits), only the used slots (no preallocated capacity)

Loading refuses, naming the mismatch: another magic or version, a truncated file, a checksum mismatch
(corrupted or tampered), a model whose configuration or weights differ, a tokenizer that differs, a
dtype that differs.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import safetensors.torch
import torch
import transformers

from contextlab.engine.steps import Prefilled
from contextlab.fingerprint import weights_digest
from contextlab.hf.cache import ContextlabCache, ContextlabLayer
from contextlab.hf.compat import text_config
from contextlab.hf.rope import native_window
from contextlab.methods.spec import build_method

MAGIC = b"CONTEXTLAB-KV\x00\x00\x00"
VERSION = 3  # 2: the weights digest samples every parameter (contextlab.fingerprint); 3: kvquant reads its
# codes on non-uniform levels by default (a version-2 "kvquant" cache holds uniform codes)
PREAMBLE = struct.Struct("<16sIQQ32s")
SLIDING_ATTRS = ("cumulative_length", "is_initialized")
CONFIG_FIELDS = ("model_type", "num_hidden_layers", "num_key_value_heads", "head_dim", "hidden_size", "vocab_size")
VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache"}


def save_cache(source, path, *, model=None, tokenizer=None) -> Path:
    """Write the cache of ``source`` (what :func:`contextlab.prefill` returns, or a
    :class:`~contextlab.engine.session.Session`, whose model and tokenizer are then fingerprinted too) to
    ``path``. ``model`` / ``tokenizer``: also record their fingerprints (weights digest, vocabulary digest),
    so loading with another model or tokenizer is refused. Returns the path."""
    prefilled, model, tokenizer = _unpack(source, model, tokenizer)
    cache = prefilled.cache
    native = native_window(cache.config) or 4096
    if cache.method.rope_scaling(2 * native, native) is not None:
        raise ValueError(
            f"{cache.method.describe()} rescales the model's RoPE for one call; its cache cannot be saved and "
            "continued at another call's RoPE"
        )
    header: dict = {
        "format": "contextlab-kv-cache",
        "version": VERSION,
        "versions": {"contextlab": _version(), "transformers": transformers.__version__, "torch": torch.__version__},
        "method": cache.method.describe(),
        "model": config_fingerprint(cache.config),
        "weights": None if model is None else weights_digest(model),
        "tokenizer": None if tokenizer is None else tokenizer_digest(tokenizer),
        "dtype": str(prefilled.last_logits.dtype if not cache.compressible else _cache_dtype(cache)),
        "state": _state_meta(cache),
        "prefilled": {
            "seconds": prefilled.seconds,
            "copies": prefilled.copies,
            "dropped": prefilled.dropped,
            "refed": prefilled.refed,
        },
        "layers": [],
    }
    tensors = {
        "input_ids": prefilled.input_ids,
        "attention_mask": prefilled.attention_mask,
        "last_logits": prefilled.last_logits,
    }
    if prefilled.origins is not None:
        tensors["origins"] = prefilled.origins
    for i, layer in enumerate(cache.layers):
        meta, own = _export_layer(layer)
        header["layers"].append(meta)
        tensors.update({f"layer{i}.{k}": v for k, v in own.items()})
    blob = safetensors.torch.save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    text = json.dumps(header, sort_keys=True).encode()
    digest = hashlib.sha256(text + blob).digest()
    path = Path(path)
    path.write_bytes(PREAMBLE.pack(MAGIC, VERSION, len(text), len(blob), digest) + text + blob)
    return path


def load_cache(path, model, *, tokenizer=None, room: int = 256) -> Prefilled:
    """Read a cache written by :func:`save_cache` for ``model`` (and ``tokenizer`` when given), on the
    model's device, with ``room`` preallocated slots per layer for the tokens that follow. Returns a
    :class:`~contextlab.engine.steps.Prefilled` to continue from (``Session.from_prefilled``, or
    ``model.generate`` as after :func:`contextlab.prefill`)."""
    header, tensors = read_cache_file(path)
    _check_matches(header, model, tokenizer)
    device = next(model.parameters()).device
    cache = ContextlabCache(model.config, build_method(header["method"]))
    held = {  # offloaded slots go straight to host memory, never through the device
        f"layer{i}.{name}"
        for i, (layer, meta) in enumerate(zip(cache.layers, header["layers"], strict=False))
        if isinstance(layer, ContextlabLayer) and meta["kind"] == "contextlab"
        for name in layer.host_held(meta)
    }
    tensors = {k: v if k in held else v.to(device) for k, v in tensors.items()}
    _restore_state(cache, header["state"])
    if len(header["layers"]) != len(cache.layers):
        raise ValueError(f"the file has {len(header['layers'])} layers, the model's cache {len(cache.layers)}")
    for i, (layer, meta) in enumerate(zip(cache.layers, header["layers"], strict=True)):
        prefix = f"layer{i}."
        _restore_layer(layer, meta, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, room)
    info = header["prefilled"]
    return Prefilled(
        cache,
        tensors["input_ids"],
        tensors["attention_mask"],
        tensors["last_logits"],
        info["seconds"],
        info["copies"],
        info.get("dropped", 0),  # files written before re-encoding prefills lack these
        info.get("refed", 0),
        tensors.get("origins"),
    )


def read_cache_file(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header and tensors of a cache file, after checking magic, version, lengths and checksum."""
    data = Path(path).read_bytes()
    if len(data) < PREAMBLE.size:
        raise ValueError(f"{path} is not a contextlab cache file (only {len(data)} bytes)")
    magic, version, header_len, blob_len, digest = PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{path} is not a contextlab cache file (wrong magic bytes)")
    if version != VERSION:
        raise ValueError(f"{path} is a version {version} cache file; this contextlab reads version {VERSION}")
    body = data[PREAMBLE.size :]
    if len(body) != header_len + blob_len:
        raise ValueError(
            f"{path} is truncated or has trailing bytes: expected {header_len + blob_len} bytes after the "
            f"preamble, found {len(body)}"
        )
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{path} failed its checksum: the file was corrupted or modified after it was saved")
    header = json.loads(body[:header_len])
    return header, safetensors.torch.load(body[header_len:])


# -- fingerprints -----------------------------------------------------------------------------------------
def config_fingerprint(config) -> dict:
    """A digest of the model configuration (volatile fields left out) and a few readable fields."""
    cfg = text_config(config)
    items = {k: v for k, v in cfg.to_dict().items() if k not in VOLATILE and not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()
    return {"digest": digest, **{k: getattr(cfg, k, None) for k in CONFIG_FIELDS}}


def tokenizer_digest(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    special = json.dumps(tokenizer.all_special_tokens, ensure_ascii=False)
    return hashlib.sha256((vocab + special).encode()).hexdigest()


def _check_matches(header: dict, model, tokenizer) -> None:
    dtype = str(next(model.parameters()).dtype)
    if header["dtype"] != dtype:
        raise ValueError(f"this cache holds {header['dtype']} keys and values but the model runs in {dtype}")
    saved, mine = header["model"], config_fingerprint(model.config)
    if saved["digest"] != mine["digest"]:
        differ = [f"{k}: saved {saved[k]!r}, model {mine[k]!r}" for k in CONFIG_FIELDS if saved[k] != mine[k]]
        detail = "; ".join(differ) or "other configuration fields differ"
        raise ValueError(f"this cache was saved for another model configuration ({detail})")
    if header["weights"] is not None and header["weights"] != weights_digest(model):
        raise ValueError("this cache was saved for a model with other weights (same configuration)")
    if tokenizer is not None and header["tokenizer"] is not None and header["tokenizer"] != tokenizer_digest(tokenizer):
        raise ValueError("this cache was saved with another tokenizer (vocabulary or special tokens differ)")


# -- cache state and layers -------------------------------------------------------------------------------
def _unpack(source, model, tokenizer) -> tuple[Prefilled, object, object]:
    if isinstance(source, Prefilled):
        return source, model, tokenizer
    state = getattr(source, "state", None)
    if isinstance(state, Prefilled):  # a Session
        return state, model or source.model, tokenizer or source.tokenizer
    raise TypeError(
        f"save_cache needs what contextlab.prefill returns or a Session (they carry the prompt's mask), got "
        f"{type(source).__name__}"
    )


def _cache_dtype(cache: ContextlabCache) -> str:
    for layer in cache.compressible:
        if layer.store.groups:
            return str(layer.store.groups[0].keys.dtype)
    raise ValueError("the cache is empty: prefill a context before saving it")


def _state_meta(cache: ContextlabCache) -> dict:
    s = cache.state
    return {
        "prompt_columns": s.prompt_columns,
        "prompt_lengths": s.prompt_lengths,
        "new_tokens": s.new_tokens,
        "transient": s.transient,
    }


def _restore_state(cache: ContextlabCache, meta: dict) -> None:
    s = cache.state
    s.prompt_columns, s.prompt_lengths = meta["prompt_columns"], meta["prompt_lengths"]
    s.new_tokens, s.transient = meta["new_tokens"], meta["transient"]


def _export_layer(layer) -> tuple[dict, dict[str, torch.Tensor]]:
    if isinstance(layer, ContextlabLayer):
        meta, tensors = layer.export()
        return {"kind": "contextlab", **meta}, tensors
    attrs = {name: getattr(layer, name) for name in SLIDING_ATTRS if hasattr(layer, name)}
    tensors = {} if layer.keys is None or not layer.is_initialized else {"keys": layer.keys, "values": layer.values}
    return {"kind": "sliding", "attrs": attrs}, tensors


def _restore_layer(layer, meta: dict, tensors: dict[str, torch.Tensor], room: int) -> None:
    kind = "contextlab" if isinstance(layer, ContextlabLayer) else "sliding"
    if meta["kind"] != kind:
        raise ValueError(f"the file holds a {meta['kind']} layer where the model has a {kind} layer")
    if kind == "contextlab":
        layer.restore(meta, tensors, room)
        return
    if "keys" in tensors:
        layer.lazy_initialization(tensors["keys"], tensors["values"])
        layer.keys, layer.values = tensors["keys"], tensors["values"]
    for name, value in meta["attrs"].items():
        setattr(layer, name, value)


def _version() -> str:
    from contextlab import __version__

    return __version__
