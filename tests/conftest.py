"""Shared fixtures: tiny random-weight models built from configs (never downloaded) and a byte tokenizer."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from contextlab.reference.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_byte_tokenizer

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

ARCH_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**COMMON),
    # Gemma 3: one sliding layer (window 24) between full ones, so sliding layers are exercised.
    "gemma3": lambda: Gemma3TextConfig(
        **COMMON,
        head_dim=16,
        sliding_window=24,
        query_pre_attn_scalar=16,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    ),
}
ARCHS = list(ARCH_CONFIGS)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCH_CONFIGS[arch](), dtype=dtype).to(device).eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="session", params=ARCHS)
def arch_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny Qwen2 and the byte tokenizer saved as a local model folder (for CLI and harness runs)."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_model("qwen2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def offload_on_cpu(monkeypatch):
    """Run the offloading store's mechanism on CPU, where host and device memory are one and it would
    otherwise stay dense."""
    monkeypatch.setattr("contextlab.store.offload.separate_memory", lambda device, host: True)


@pytest.fixture(autouse=True, scope="session")
def profile_folder(tmp_path_factory):
    """Profiles measured during the tests (minference) go to a temporary folder, not the user's cache."""
    folder = tmp_path_factory.mktemp("profiles")
    before = os.environ.get("CONTEXTLAB_PROFILES")
    os.environ["CONTEXTLAB_PROFILES"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("CONTEXTLAB_PROFILES", None)
    else:
        os.environ["CONTEXTLAB_PROFILES"] = before
