"""Per-head profiles measured on the model itself, kept as small JSON files and reused.

A method that needs to know its model's heads (MInference's pattern per head) measures them once on a
synthetic retrieval prompt made here (a RULER needle task at ``calibration`` tokens: no downloaded pattern
files), and saves what it found in ``<folder>/<method>-<model digest>-<settings digest>.json``. The folder
is ``$CONTEXTLAB_PROFILES`` or ``~/.cache/contextlab/profiles``. A file carries a format version, the model
digest and the settings it was made with, and a checksum of its content: a file for another model, another
setting, or one that was edited or truncated is refused with the reason, never silently replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from contextlab.errors import ContextlabError
from contextlab.fingerprint import weights_digest
from contextlab.methods.base import Method
from contextlab.methods.policy import LayerPolicy, Step
from contextlab.store import DenseStore

VERSION = 1


class ProfileError(ContextlabError):
    """A profile file that cannot be used (another model, corrupt, wrong version)."""


def profile_folder() -> Path:
    return Path(os.environ.get("CONTEXTLAB_PROFILES") or Path.home() / ".cache" / "contextlab" / "profiles")


def model_digest(model) -> str:
    """Architecture and weights in one short digest (:func:`contextlab.fingerprint.weights_digest`)."""
    config = model.config
    parts = [getattr(config, name, None) for name in ("model_type", "num_hidden_layers", "num_attention_heads")]
    hasher = hashlib.sha256(json.dumps(parts, default=str).encode())
    hasher.update(weights_digest(model).encode())
    return hasher.hexdigest()[:16]


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def profile_path(method: str, digest: str, settings: dict) -> Path:
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return profile_folder() / f"{method}-{digest}-{tag}.json"


def save_profile(path: Path, method: str, digest: str, settings: dict, data: dict) -> Path:
    body = {"version": VERSION, "method": method, "model": digest, "settings": settings, "data": data}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**body, "checksum": _checksum(body)}, indent=1))
    tmp.replace(path)  # a reader never sees half a file
    return path


def load_profile(path: Path, method: str, digest: str, settings: dict) -> dict:
    """The ``data`` of a profile file, after checking it belongs to this method, model and settings."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ProfileError(f"cannot read the profile {path}: {error}") from None
    if not isinstance(body, dict) or "checksum" not in body:
        raise ProfileError(f"{path} is not a contextlab profile")
    checksum = body.pop("checksum")
    if _checksum(body) != checksum:
        raise ProfileError(f"{path} failed its checksum: it was edited or damaged after it was written; delete it")
    if body.get("version") != VERSION:
        raise ProfileError(f"{path} is a version {body.get('version')} profile; this contextlab reads {VERSION}")
    if body.get("method") != method:
        raise ProfileError(f"{path} profiles {body.get('method')!r}, not {method!r}")
    if body.get("model") != digest:
        raise ProfileError(
            f"{path} was measured on another model (digest {body.get('model')}, this one {digest}); profile this "
            "model (contextlab profile --model ...) or drop the profile= setting"
        )
    if body.get("settings") != settings:
        raise ProfileError(f"{path} was made with {body.get('settings')}, not {settings}")
    return body["data"]


class Captured(NamedTuple):
    """One layer's prompt attention inputs: post-RoPE ``queries [1, Hq, T, D]``, ``keys`` and ``values``
    ``[1, Hkv, T, D]``, and the layer's score ``scaling`` (not always ``D ** -0.5``: Gemma 3 scales by its
    ``query_pre_attn_scalar``)."""

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float


def capture_prompt(model, tokenizer, tokens: int, seed: int = 0) -> dict[int, Captured]:
    """Per contextlab layer (by its rank among the full-attention layers), its :class:`Captured` attention
    inputs on a synthetic retrieval prompt of about ``tokens`` tokens (RULER's multi-key needle task)."""
    from contextlab.bench.tasks import TASKS
    from contextlab.engine.generate import prefill

    sample = TASKS.get("niah_multikey_1")(tokenizer, tokens, seed, num_samples=1)[0]
    done = prefill(model, tokenizer, [sample.context_ids + sample.question_ids], method=_Capture())
    return {
        layer.layer_idx: Captured(layer.policy.queries, layer.policy.keys, layer.policy.values, layer.policy.scaling)
        for layer in done.cache.compressible
    }


@dataclass(frozen=True, eq=False)
class _Capture(Method):
    """Full attention that keeps each layer's prompt queries and keys (for profiling; not registered)."""

    name = "capture"

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return _CapturePolicy()


class _CapturePolicy(LayerPolicy):
    def __init__(self) -> None:
        self.queries: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.scaling = 0.0

    def after_forward(self, store: DenseStore, step: Step) -> None:
        if step.phase == "prompt_end":
            keys, values = store.groups[0].used()
            self.queries, self.keys, self.values = (t.detach().clone() for t in (step.queries, keys, values))
            self.scaling = float(step.scaling)
