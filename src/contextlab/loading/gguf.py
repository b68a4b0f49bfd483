"""GGUF files as ordinary transformers folders, converted once and cached.

transformers reads a GGUF with ``from_pretrained(folder, gguf_file=...)`` by dequantizing every tensor
(tens of seconds), and refuses ``save_pretrained`` on the result. We convert once: load through the GGUF
path, rebuild a plain model from its config, copy the state dict in, and save safetensors (fp32: the
dequantized values exactly) + config + tokenizer + generation config into a cache folder keyed by the
file's sha256. Later loads read that folder in seconds. The folder is written under a temporary name and
renamed at the end, so a conversion killed halfway never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from contextlab.errors import ContextlabError
from contextlab.hf.support import SUPPORTED_MODEL_TYPES, UnsupportedModelError

# GGUF's ``general.architecture`` -> the transformers model type contextlab runs it as.
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma3": "gemma3_text",
}
MANIFEST = "contextlab-gguf.json"
FORMAT = 2  # bump when the converted folder's contents change; older folders are converted again
MODELS_EXTRA = "pip install 'contextlab[models]'  (installs gguf and accelerate)"


class ModelFileError(ContextlabError):
    """A model file or package is missing, corrupt or unusable; the message names it and the fix."""


def cache_root() -> Path:
    """Where converted models live: ``$CONTEXTLAB_CACHE`` or ``~/.cache/contextlab``."""
    return Path(os.environ.get("CONTEXTLAB_CACHE") or Path.home() / ".cache" / "contextlab")


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def require_gguf_packages() -> None:
    """Raise one line naming the extra when ``gguf`` or ``accelerate`` is missing."""
    missing = [name for name in ("gguf", "accelerate") if not _importable(name)]
    if missing:
        raise ModelFileError(f"loading a GGUF file needs {' and '.join(missing)}: {MODELS_EXTRA}")


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file; a truncated or foreign file raises ModelFileError."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as err:  # the reader raises struct/Value/Key errors on damaged files
        raise ModelFileError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); it may be truncated or "
            "corrupt: download or reinstall it"
        ) from err


def check_gguf_architecture(path: Path, architecture: str) -> str:
    """The transformers model type for a GGUF architecture, or UnsupportedModelError naming the file."""
    if architecture not in GGUF_ARCHITECTURES:
        known = ", ".join(sorted(GGUF_ARCHITECTURES))
        raise UnsupportedModelError(
            f"{path.name}: GGUF architecture {architecture!r} is not supported by contextlab "
            f"(supported GGUF architectures: {known})"
        )
    model_type = GGUF_ARCHITECTURES[architecture]
    assert model_type in SUPPORTED_MODEL_TYPES, model_type
    return model_type


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file to convert: its path, the sha256 it must have (None: not checked), whether that sha256
    was already checked by whoever located the file (then it is not hashed again), and whether its chat
    template is kept (False for base models whose file carries one anyway)."""

    path: Path
    expected_sha256: str | None = None
    keep_chat_template: bool = True
    name: str | None = None
    sha256_verified: bool = False


def converted_folder(source: GGUFSource, *, root: Path | None = None, progress: bool = True) -> Path:
    """A transformers folder holding ``source`` dequantized; converted on first use, then reused."""
    path = source.path
    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}")
    require_gguf_packages()
    digest = source.expected_sha256 if source.sha256_verified and source.expected_sha256 else sha256_file(path)
    if source.expected_sha256 and digest != source.expected_sha256:
        raise ModelFileError(
            f"{path} has sha256 {digest[:16]}..., expected {source.expected_sha256[:16]}...: the file is "
            "truncated or corrupt; reinstall its package"
        )
    check_gguf_architecture(path, gguf_architecture(path))
    base = root or cache_root()
    folder = base / "models" / f"{source.name or path.stem}-{digest[:16]}"
    if _complete(folder):
        return folder
    _convert(path, folder, digest, keep_chat_template=source.keep_chat_template, progress=progress)
    return folder


def _convert(path: Path, folder: Path, digest: str, *, keep_chat_template: bool, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"contextlab: converting {path.name} once into {folder} (later loads take seconds)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        plain = type(loaded)(loaded.config)  # a model transformers will serialise, same weights
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        _drop_gguf_quantization(tmp / "config.json")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if not keep_chat_template:
            tokenizer.chat_template = None
        tokenizer.save_pretrained(tmp)
        _generation_config(loaded, tokenizer).save_pretrained(tmp)
        manifest = {
            "format": FORMAT,
            "source": str(path),
            "sha256": digest,
            "dtype": "float32",
            "chat_template": keep_chat_template,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        tmp.chmod(0o755)
        if folder.exists() and not _complete(folder):
            # Incomplete (copied in part, or written in place by an older version); a finished folder appears
            # at once with its manifest, by the rename below.
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:
            if not _complete(folder):  # else a concurrent conversion finished first: keep it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(folder: Path) -> bool:
    """A converted folder is complete when its manifest (written last, then renamed in) has this FORMAT."""
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _drop_gguf_quantization(config_path: Path) -> None:
    """The saved weights are plain fp32: the config must not say they are GGUF-quantized."""
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _generation_config(model, tokenizer):
    from transformers import GenerationConfig

    config = GenerationConfig.from_model_config(model.config)
    config.do_sample = False
    if tokenizer.eos_token_id is not None:
        config.eos_token_id = _eos_ids(model.config.eos_token_id, tokenizer)
    return config


def _eos_ids(config_eos, tokenizer) -> list[int]:
    """The config's EOS ids plus the chat template's end-of-turn token, which chat models emit."""
    ids = config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else []
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return [*ids, tokenizer.eos_token_id] if tokenizer.eos_token_id not in ids else ids
