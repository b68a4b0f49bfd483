"""Device and memory checks run before any expensive work and refuse with the reason."""

from __future__ import annotations

import pytest
import torch

import contextlab as cl
from contextlab.engine import resources
from contextlab.engine.resources import MemoryEstimate, available_bytes, check_device, check_memory, estimate_prefill
from contextlab.errors import DeviceError, MemoryEstimateError
from contextlab.methods.spec import build_method

# tiny llama (conftest): 3 layers, 2 KV heads of 16 dims, hidden 64, MLP 128, float32
KV_PER_TOKEN_LAYER = 2 * 2 * 16 * 4
ACT_PER_TOKEN = (4 * 64 + 3 * 128) * 4


def test_cpu_and_none_are_accepted():
    assert check_device(None) is None
    assert check_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda_is_refused(device):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        check_device(device)


@pytest.mark.parametrize(("device", "message"), [("xla", "not supported"), ("tpu", "cannot read device")])
def test_unknown_devices_are_refused(device, message):
    with pytest.raises(DeviceError, match=message):
        check_device(device)


def test_a_missing_gpu_index_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"1 GPU\(s\), cuda:0..0"):
        check_device("cuda:3")


def test_host_memory_is_reported():
    free = available_bytes(torch.device("cpu"))
    assert free is None or free > 0


def test_estimate_without_eviction_holds_every_layer(llama):
    est = estimate_prefill(llama, build_method("full"), batch=2, tokens=1000)
    assert est.cache_bytes == 3 * 2 * 1000 * KV_PER_TOKEN_LAYER
    assert est.activation_bytes == 2 * 1000 * ACT_PER_TOKEN


def test_estimate_with_eviction_holds_one_layer_or_what_is_kept(llama):
    # snapkv:0.9 keeps 100 of 1000 tokens: one layer of 1000 (1000 slots) beats three layers of 100 (300)
    est = estimate_prefill(llama, build_method("snapkv:0.9"), batch=1, tokens=1000)
    assert est.cache_bytes == 1000 * KV_PER_TOKEN_LAYER
    # snapkv:0.1 keeps 900: three layers of 900 beat one layer of 1000
    est = estimate_prefill(llama, build_method("snapkv:0.1"), batch=1, tokens=1000)
    assert est.cache_bytes == 3 * 900 * KV_PER_TOKEN_LAYER


def test_estimate_with_chunked_prefill_counts_one_chunk_of_activations(llama):
    est = estimate_prefill(llama, build_method("snapkv:0.9,prefill_chunk=128"), batch=1, tokens=1000)
    assert est.activation_bytes == 128 * ACT_PER_TOKEN
    assert est.cache_bytes == 3 * 100 * KV_PER_TOKEN_LAYER  # what is kept, in every layer


def test_check_memory_refuses_with_the_estimate(llama, monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda device: 2**20)
    need = MemoryEstimate(3 * 4096 * KV_PER_TOKEN_LAYER, 4096 * ACT_PER_TOKEN).total
    assert need > 2**20
    with pytest.raises(MemoryEstimateError, match=r"needs at least .* GiB on cpu .* only 0.0 GiB is free"):
        check_memory(llama, build_method("full"), 1, 4096)
    check_memory(llama, build_method("full"), 1, 16)  # a small prompt fits


def test_generate_refuses_before_prefill(llama, tokenizer, monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda device: 1000)
    with pytest.raises(MemoryEstimateError, match="prefilling 1 row"):
        cl.generate(llama, tokenizer, "some context " * 20, "q?", max_new_tokens=2)


def test_unknown_free_memory_is_not_checked(llama, monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda device: None)
    check_memory(llama, build_method("full"), 1, 10**9)
