"""One contract over EVERY registered method and every supported architecture.

- budget 100% (ratio 0): greedy tokens equal vanilla ``model.generate`` and logits match full attention;
- ratio 0.5 and budget=N: the kept count per layer/head is what was asked (or the method's own rule);
- ``kept_positions`` are sorted, unique and in range; ``kv_bytes`` equals the bytes of what is held.
"""

from __future__ import annotations

import pytest
import torch

import contextlab as cl
from contextlab.hf.attention import contextlab_attention_enabled
from contextlab.hf.cache import CompressibleLayer, CompressionRequest, ContextlabCache
from contextlab.methods.eviction import AdaKV, PyramidKV
from tests.conftest import ARCHS, tiny_model

METHOD_NAMES = cl.METHODS.names()
CONTEXT = "In the beginning was the word, and the word was long. " * 4  # 220 bytes
QUESTION = "\nWhat was long?"


def _spec(name: str, budget: str) -> str:
    return name if name == "full" else f"{name}:{budget}"


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_no_compression_matches_vanilla_generate(model, tokenizer, name):
    spec = _spec(name, "0.0")
    ids = tokenizer(CONTEXT + QUESTION)["input_ids"]
    vanilla = model.generate(
        torch.tensor([ids]),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    for aware in (True, False):
        out = cl.generate(model, tokenizer, CONTEXT, QUESTION, method=spec, max_new_tokens=6, question_aware=aware)
        eos = vanilla.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in vanilla else len(vanilla)
        assert out.tokens == vanilla[:eos], f"{spec} (question_aware={aware})"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_no_compression_logits_match_full_attention(model, tokenizer, name):
    method = cl.method(_spec(name, "0.0"))
    ctx = torch.tensor([tokenizer(CONTEXT)["input_ids"]])
    question = torch.tensor([tokenizer(QUESTION, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        reference = model(torch.cat([ctx, question], dim=1)).logits
        with contextlab_attention_enabled(model):
            cache = ContextlabCache(model.config)
            if method.compresses:
                n = ctx.shape[1]
                cache.arm(
                    CompressionRequest(
                        method,
                        n,
                        torch.ones(1, n, dtype=torch.bool),
                        torch.arange(n)[None],
                        torch.tensor([n]),
                    )
                )
            first = model(ctx, past_key_values=cache).logits
            second = model(question, past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), reference, atol=1e-4, rtol=1e-4)


def _expected_counts(method, layer: CompressibleLayer, heads: int, n: int, keep: int) -> torch.Tensor | None:
    """[H] expected kept counts for a layer, or None where the rule is checked differently (AdaKV)."""
    if isinstance(method, PyramidKV):
        count = method.layer_keep(torch.tensor([keep]), torch.tensor([n]), layer.layer_idx, layer.num_layers)
        return count.expand(heads)
    if isinstance(method, AdaKV):
        return None
    return torch.full((heads,), n if not method.compresses else keep)


@pytest.mark.parametrize("budget", ["0.5", "budget=40"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_kept_counts_positions_and_bytes(model, tokenizer, name, budget):
    spec = _spec(name, budget)
    method = cl.method(spec)
    out = cl.generate(model, tokenizer, CONTEXT, QUESTION, method=spec, max_new_tokens=2)
    n = out.prompt_tokens[0]
    keep = method.budget.keep(n) if method.compresses else n
    cache_layers = ContextlabCache(model.config).layers
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    head_dim = getattr(model.config, "head_dim", None) or head_dim
    held_slots = 0
    for layer, kept in zip(cache_layers, out.kept_positions, strict=True):
        assert kept.shape[:2] == (1, model.config.num_key_value_heads)
        counts = (kept >= 0).sum(-1)[0]  # [H]
        held_slots += int(counts.sum())
        for row in kept[0]:
            valid = row[row >= 0]
            assert torch.equal(valid, valid.unique(sorted=True)), "positions must be sorted and unique"
            assert int(valid.min()) >= 0 and int(valid.max()) < n
        if not isinstance(layer, CompressibleLayer):
            assert torch.all(counts == min(n, model.config.sliding_window - 1)), "sliding layers untouched"
            continue
        expected = _expected_counts(method, layer, len(counts), n, keep)
        if expected is None:  # AdaKV: the layer's total is H x budget, each head at least alpha x budget
            assert int(counts.sum()) == keep * len(counts)
            assert int(counts.min()) >= int(keep * method.alpha)
        else:
            assert torch.equal(counts, expected), f"{spec}: layer {layer.layer_idx} kept {counts.tolist()}"
    itemsize = next(model.parameters()).element_size()
    assert out.kv_bytes == 2 * held_slots * head_dim * itemsize
    assert out.kv_bytes_full == 2 * n * head_dim * itemsize * model.config.num_key_value_heads * len(cache_layers) - (
        _sliding_savings(model, n, head_dim, itemsize)
    )
    if method.compresses:
        assert out.kv_bytes < out.kv_bytes_full


def _sliding_savings(model, n: int, head_dim: int, itemsize: int) -> int:
    """Bytes a plain cache saves on sliding layers (they hold at most window - 1 tokens)."""
    types = getattr(model.config, "layer_types", None) or []
    window = getattr(model.config, "sliding_window", None) or n + 1
    sliding = sum(t == "sliding_attention" for t in types)
    return 2 * sliding * (n - min(n, window - 1)) * head_dim * itemsize * model.config.num_key_value_heads
