"""Load a model and tokenizer: the bundled reference model, a local folder, or a hub id."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from contextlab.hf.support import check_supported

REFERENCE_NAME = "reference"


def reference_path() -> Path:
    """Folder of the reference model shipped inside the package."""
    return Path(str(resources.files("contextlab").joinpath("assets", "reference")))


def resolve(path_or_id: str) -> str:
    if path_or_id == REFERENCE_NAME:
        path = reference_path()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the bundled reference model is missing from {path}")
        return str(path)
    return path_or_id


def load(path_or_id: str, *, dtype: str | torch.dtype = "auto", device: str | None = None, **kwargs):
    """``(model, tokenizer)`` from ``"reference"``, a local folder, or a hub id (plain transformers loading).

    The architecture is checked from the config before any weights are read, so an unsupported model is
    refused at once with the reason. Set ``HF_HUB_OFFLINE=1`` to make sure nothing is downloaded; local
    folders never need the network. Extra keyword arguments go to ``from_pretrained``.
    """
    source = resolve(path_or_id)
    trust = kwargs.pop("trust_remote_code", False)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
