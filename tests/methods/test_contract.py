"""One contract over EVERY registered method, the composite examples and chunked prefill, on every
supported architecture.

- lossless settings (ratio 0, decode budgets above every length, chunked prefill at 100%): greedy tokens
  equal vanilla ``model.generate`` and logits match full attention;
- ratio 0.5 and budget=N: the kept count per layer/head is what was asked (or the method's own rule);
- ``kept_positions`` are sorted, unique and in range; ``kv_bytes`` equals the bytes of what is held.
"""

from __future__ import annotations

import math

import pytest
import torch

import contextlab as cl
from contextlab.hf.attention import contextlab_attention_enabled
from contextlab.hf.cache import ContextlabCache, ContextlabLayer
from contextlab.hf.compat import cache_kwarg
from contextlab.methods.base import PrefillMethod
from contextlab.methods.compose import Composite
from contextlab.methods.eviction import AdaKV, PyramidKV
from contextlab.methods.extension import InfiniRetri, LMInfinite
from contextlab.methods.quantization import KIVI, KVQuant, ZipCache
from contextlab.methods.sparse import InfLLM, Quest, Retrieval
from contextlab.methods.sparse_prefill import DuoAttention
from contextlab.store.codec import outlier_count, words
from tests.conftest import ARCHS, tiny_model

CONTEXT = "In the beginning was the word, and the word was long. " * 4  # 220 bytes
QUESTION = "\nWhat was long?"
NEVER = "budget=4096,every=2"  # a decode budget above every length used here: evicts nothing

# Composite examples (lossless spec, lossy spec), run beside every registered method.
COMPOSITES = {
    "snapkv+decode(h2o)": (f"snapkv:0.0+decode(h2o,{NEVER})", "snapkv:0.5+decode(h2o,budget=24,every=8)"),
    "streaming+decode(tova)": (f"streaming:0.0+decode(tova,{NEVER})", "streaming:0.5+decode(tova,budget=24,every=4)"),
    "pyramidkv+decode(knorm)": (
        f"pyramidkv:0.0+decode(knorm,{NEVER})",
        "pyramidkv:0.5+decode(knorm,budget=30,every=3)",
    ),
    "snapkv+quest": ("snapkv:0.0+quest:0.0", "snapkv:0.5+quest:budget=32,page=8"),
}
CHUNKED = {"snapkv chunked": ("snapkv:0.0,prefill_chunk=16", "snapkv:0.5,prefill_chunk=64")}
# Window extension: defaults are full attention inside the window (STRING only with its offset past the
# prompt); the lossy settings remap positions inside the tiny models' window, so every architecture runs
# the remapped path (LM-Infinite also evicts down to sink + window - 1).
EXTENSION = {
    "selfextend": ("selfextend", "selfextend:group=2,window=32"),
    "string": ("string:shift=1.0", "string:offset=64,local=8"),
    "lminfinite": ("lminfinite", "lminfinite:sink=4,window=64"),
    "ntk": ("ntk", "ntk:factor=2"),
    "yarn": ("yarn", "yarn:factor=2"),
    "linear": ("linear", "linear:factor=2"),
    # token ids kept and fed again with the next segment (its default): a budget above the prompt re-encodes
    # every token, exact
    "infiniretri": ("infiniretri:budget=1000,chunk=64", "infiniretri:budget=40,chunk=64"),
}
# InfiniRetri keeping KV entries between segments, attending at ranks
KV_REUSE = {
    "infiniretri kv reuse": (
        "infiniretri:budget=1000,chunk=1000,share=none,sink=0,reencode=false",
        "infiniretri:budget=40,chunk=64,share=none,sink=0,reencode=false",
    )
}
# Decode-time sparse reads whose budget is no ratio: InfLLM reads sink + local + whole blocks.
SPARSE = {
    "infllm": ("infllm:budget=4096,block=16,local=64", "infllm:budget=60,block=8,sink=4,local=32"),
    "retrieval": ("retrieval:budget=4096,local=16", "retrieval:budget=60,local=16,clusters=4"),
    "retrieval by head": (
        "retrieval:budget=4096,local=16,vote=head,follow=true",
        "retrieval:budget=60,local=16,clusters=4,probe=2,vote=head",
    ),
    "minference": (  # every shape as wide as the prompt: exact; then small shapes on every head
        "minference:min_length=1,local=4096,vertical=4096,slash=4096,blocks=64,recall=0.0,calibration=1024",
        "minference:min_length=1,sink=4,local=16,vertical=8,slash=8,blocks=2,last=16,recall=0.0,calibration=1024",
    ),
    "duo": ("duo:retrieval=1.0,calibration=1024", "duo:sink=4,window=16,every=4,last=16,calibration=1024"),
    # sparse prefill under a quantized store, and under a decode-time sparse reader
    "minference+kivi": (
        "minference:min_length=1,local=4096,vertical=4096,slash=4096,blocks=64,recall=0.0,calibration=1024"
        "+kivi:group=16,residual=512",
        "minference:min_length=1,sink=4,local=16,vertical=8,slash=8,blocks=2,last=16,recall=0.0,calibration=1024"
        "+kivi:bits=4,group=16,residual=16",
    ),
    "duo+quest": (  # every head keeps everything: the reader reads one slot count per layer
        "duo:retrieval=1.0,calibration=1024+quest:0.0",
        "duo:retrieval=0.0,sink=4,window=16,every=4,last=16,calibration=1024+quest:budget=16,page=4",
    ),
    "infllm offloaded": (  # the host is this machine's memory: the same bytes, counted once
        "infllm:budget=4096,block=16,local=64,offload=cpu",
        "infllm:budget=60,block=8,sink=4,local=32,offload=cpu",
    ),
}
# KV quantization (alone and under eviction): lossless = a full-precision window longer than every sequence
# here, so nothing is quantized; lossy = real codes (the tiny models' head dim is 16, hence group 16).
QUANTIZATION = {
    "kivi": ("kivi:group=16,residual=512", "kivi:bits=4,group=32,residual=16"),  # values: one scale per token
    "kivi float8 scales": ("kivi:scales=e4m3,group=16,residual=512", "kivi:bits=4,group=16,residual=16,scales=e4m3"),
    "kivi float8 fitted scales": (  # clipped scales, uniform codes: the layout decode reads directly
        "kivi:scales=e4m3,fit=mse,group=16,residual=512",
        "kivi:bits=2,group=16,residual=16,scales=e4m3,fit=mse",
    ),
    "kivi float8 normal levels": (
        "kivi:scales=e4m3,fit=mse,levels=normal,group=16,residual=512",
        "kivi:bits=2,group=16,residual=16,sink=1,scales=e4m3,levels=normal,rotate=hadamard,fit=mse",
    ),
    "kvquant": ("kvquant:group=16,residual=512", "kvquant:bits=3,group=16,residual=16"),  # normal levels
    "kvquant uniform levels": (
        "kvquant:group=16,residual=512,levels=uniform",
        "kvquant:bits=3,group=16,residual=16,levels=uniform",
    ),
    "kivi rotated": (
        "kivi:group=16,residual=512,sink=1,levels=normal,rotate=hadamard",
        "kivi:bits=2,group=16,residual=16,sink=1,levels=normal,rotate=hadamard",
    ),
    "kvquant rotated": (
        "kvquant:group=16,residual=512,rotate=hadamard",
        "kvquant:bits=2,group=16,residual=16,rotate=hadamard",
    ),
    "kivi normal levels": (
        "kivi:group=16,residual=512,levels=normal",
        "kivi:bits=2,group=16,residual=16,levels=normal",
    ),
    "zipcache": ("zipcache:group=16,residual=512", "zipcache:group=16,residual=16"),
    "zipcache channel keys": (
        "zipcache:keys=channel,group=16,residual=512",
        "zipcache:keys=channel,group=16,residual=16",
    ),
    "snapkv+zipcache": (
        "snapkv:0.0+zipcache:group=16,residual=512",
        "snapkv:0.5+zipcache:high=8,low=3,group=16,residual=8",
    ),
    "snapkv+kvquant": ("snapkv:0.0+kvquant:group=16,residual=512", "snapkv:0.5+kvquant:bits=4,group=16,residual=8"),
    "snapkv+kivi": ("snapkv:0.0+kivi:group=16,residual=512", "snapkv:0.5+kivi:bits=2,group=16,residual=8"),
    "adakv+kivi": ("adakv:0.0+kivi:bits=2,group=16,residual=512", "adakv:0.5+kivi:bits=2,group=16,residual=8"),
    "quest+kivi": ("quest:0.0+kivi:group=16,residual=512", "quest:budget=32,page=8+kivi:bits=4,group=32,residual=16"),
    "decode(h2o)+kivi": (
        f"decode(h2o,{NEVER})+kivi:group=16,residual=512",
        "decode(h2o,budget=24,every=8)+kivi:bits=3,group=16,residual=8",
    ),
}
SPECIAL = {**EXTENSION, **QUANTIZATION, **SPARSE, **KV_REUSE}


def _lossless(name: str) -> str:
    if name in SPECIAL:
        return SPECIAL[name][0]
    if name in COMPOSITES or name in CHUNKED:
        return {**COMPOSITES, **CHUNKED}[name][0]
    return {"full": "full", "decode": f"decode(h2o,{NEVER})"}.get(name, f"{name}:0.0")


def _lossy(name: str, budget: str) -> str:
    if name in SPECIAL:
        return SPECIAL[name][1]
    if name in COMPOSITES or name in CHUNKED:
        return {**COMPOSITES, **CHUNKED}[name][1]
    return {"full": "full", "decode": f"decode(snapkv,{budget.replace('0.5', 'budget=60')},every=4)"}.get(
        name, f"{name}:{budget}"
    )


pytestmark = pytest.mark.usefixtures("offload_on_cpu")  # "infllm offloaded" runs its mechanism on CPU
CASES = [
    *cl.METHODS.names(),
    *COMPOSITES,
    *CHUNKED,
    *(q for q in {**QUANTIZATION, **SPARSE, **KV_REUSE} if q not in cl.METHODS),
]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("name", CASES)
def test_lossless_settings_match_vanilla_generate(model, tokenizer, name):
    spec = _lossless(name)
    ids = tokenizer(CONTEXT + QUESTION)["input_ids"]
    vanilla = model.generate(
        torch.tensor([ids]),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    eos = vanilla.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in vanilla else len(vanilla)
    for aware in (True, False):
        out = cl.generate(model, tokenizer, CONTEXT, QUESTION, method=spec, max_new_tokens=6, question_aware=aware)
        assert out.tokens == vanilla[:eos], f"{spec} (question_aware={aware})"


@pytest.mark.parametrize("name", CASES)
def test_lossless_settings_logits_match_full_attention(model, tokenizer, name):
    method = cl.method(_lossless(name)).bind(model, tokenizer)  # what generate does before building a cache
    ctx = torch.tensor([tokenizer(CONTEXT)["input_ids"]])
    question = torch.tensor([tokenizer(QUESTION, add_special_tokens=False)["input_ids"]])
    n = ctx.shape[1]
    chunk = method.prefill_chunk_size() or n
    with torch.no_grad():
        reference = model(torch.cat([ctx, question], dim=1)).logits
        with contextlab_attention_enabled(model):
            cache = ContextlabCache(model.config, method)
            cache.begin_prompt(n, [n])
            kwargs = {cache_kwarg(model): cache}
            logits = [model(part, **kwargs).logits for part in ctx.split(chunk, dim=1)]
            logits.append(model(question, **kwargs).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), reference, atol=1e-4, rtol=1e-4)


def _prefill_part(method) -> PrefillMethod | None:
    parts = method.parts if isinstance(method, Composite) else (method,)
    return next((p for p in parts if isinstance(p, PrefillMethod)), None)


def _duo_part(method) -> DuoAttention | None:
    parts = method.parts if isinstance(method, Composite) else (method,)
    return next((p for p in parts if isinstance(p, DuoAttention)), None)


def _expected_counts(method, layer: ContextlabLayer, heads: int, n: int) -> torch.Tensor | None:
    """[H] expected kept counts of a layer after the prompt, or None where AdaKV's rule is checked instead."""
    if isinstance(method, LMInfinite):
        return torch.full((heads,), min(n, method.sink + method.window - 1))
    if isinstance(method, InfiniRetri):  # reencode: the kept ids, then the whole last chunk
        return torch.full((heads,), method.prompt_keep(n))
    duo = _duo_part(method)
    if duo is not None:  # streaming heads: sink + window; retrieval heads: everything
        streaming = torch.tensor(duo.streaming[layer.layer_idx])
        return torch.where(streaming, min(n, duo.sink + duo.window), n)
    prefill = _prefill_part(method)
    if prefill is None or not prefill.compresses:
        return torch.full((heads,), n)
    keep = prefill.prompt_keep(n)
    if isinstance(prefill, PyramidKV):
        count = prefill.layer_keep(torch.tensor([keep]), torch.tensor([n]), layer.layer_idx, layer.num_layers)
        return count.expand(heads)
    if isinstance(prefill, AdaKV):
        return None
    return torch.full((heads,), keep)


@pytest.mark.parametrize("budget", ["0.5", "budget=40"])
@pytest.mark.parametrize("name", CASES)
def test_kept_counts_positions_and_bytes(model, tokenizer, name, budget):
    spec = _lossy(name, budget)
    method = cl.method(spec).bind(model, tokenizer)  # duo: which heads stream on this model
    out = cl.generate(model, tokenizer, CONTEXT, QUESTION, method=spec, max_new_tokens=2)
    n = out.prompt_tokens[0]
    cache_layers = ContextlabCache(model.config).layers
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    reencoded = isinstance(method, InfiniRetri) and method.reencode  # a plain cache of fewer tokens
    evicted = (_prefill_part(method) is not None and _prefill_part(method).compresses) or isinstance(
        method, (LMInfinite, InfiniRetri)
    )
    evicted = evicted and not reencoded
    duo = _duo_part(method)
    evicted = evicted or (duo is not None and duo.compresses)
    expected_bytes = 0
    for layer, kept in zip(cache_layers, out.kept_positions, strict=True):
        assert kept.shape[:2] == (1, model.config.num_key_value_heads)
        counts = (kept >= 0).sum(-1)[0]  # [H]
        for row in kept[0]:
            valid = row[row >= 0]
            assert torch.equal(valid, valid.unique(sorted=True)), "positions must be sorted and unique"
            assert int(valid.min()) >= 0 and int(valid.max()) < n
        if not isinstance(layer, ContextlabLayer):
            assert torch.all(counts == min(n, model.config.sliding_window - 1)), "sliding layers untouched"
            expected_bytes += 2 * int(counts.sum()) * head_dim * itemsize
            continue
        cut = evicted and (duo is None or any(duo.streaming[layer.layer_idx]))
        expected_bytes += sum(_head_bytes(method, int(c), head_dim, itemsize, cut) for c in counts)
        expected_bytes += sum(_read_selection_bytes(method, layer, int(c), head_dim, itemsize) for c in counts)
        expected_bytes += _zipcache_seen_bytes(method, counts)
        expected = _expected_counts(method, layer, len(counts), n)
        if expected is None:  # AdaKV: the layer's total is H x budget, each head at least alpha x budget
            keep = method.prompt_keep(n)
            assert int(counts.sum()) == keep * len(counts)
            assert int(counts.min()) >= int(keep * _prefill_part(method).alpha)
        else:
            assert torch.equal(counts, expected), f"{spec}: layer {layer.layer_idx} kept {counts.tolist()}"
    assert out.kv_bytes == expected_bytes
    assert out.kv_bytes_full == 2 * n * head_dim * itemsize * model.config.num_key_value_heads * len(cache_layers) - (
        _sliding_savings(model, n, head_dim, itemsize)
    )
    if evicted or reencoded:
        assert out.kv_bytes < out.kv_bytes_full


def _read_selection_bytes(method, layer, count: int, head_dim: int, itemsize: int) -> int:
    """Metadata of one KV head once the prompt is in, for the sparse readers that keep some then (only when
    the cache is larger than what a query reads): the store column of every numbered slot (int32, in whole
    pages or blocks) and a count (int64); Quest adds a min and a max key per page, InfLLM its blocks'
    representative keys and a count of formed blocks, retrieval its index (where it ends, centroids, lists).
    Quest's first ``dense_layers`` read everything and keep nothing."""
    parts = method.parts if isinstance(method, Composite) else (method,)
    reader = next((p for p in parts if isinstance(p, (Quest, InfLLM, Retrieval))), None)
    if isinstance(reader, Quest) and layer.layer_idx < reader.dense_layers:
        return 0
    if isinstance(reader, Quest) and count > math.ceil(reader.read_tokens(count) / reader.page) * reader.page:
        pages = math.ceil(count / reader.page)
        return 2 * pages * head_dim * itemsize + pages * reader.page * 4 + 8
    if isinstance(reader, InfLLM) and count > reader.budget.tokens:
        blocks = max(0, (count - (reader.local - 1) - reader.sink) // reader.block)
        table = math.ceil(count / reader.block) * reader.block * 4
        return table + 8 + blocks * reader.reps * head_dim * itemsize + 8
    if isinstance(reader, Retrieval) and count > reader.budget.tokens:
        table = math.ceil(count / 64) * 64 * 4
        indexed = count - reader.local - reader.sink  # float32 centroids, inverted lists (int32) and their starts
        return table + 8 + 8 + reader.clusters * head_dim * 4 + indexed * 4 + (reader.clusters + 1) * 4
    return 0


def _zipcache_part(method) -> ZipCache | None:
    parts = method.parts if isinstance(method, Composite) else (method,)
    return next((p for p in parts if isinstance(p, ZipCache)), None)


def _zipcache_seen_bytes(method, counts: torch.Tensor) -> int:
    """ZipCache also counts, per full-precision slot of a row, how many probes saw it (float32, per layer)."""
    zip_part = _zipcache_part(method)
    if zip_part is None:
        return 0
    assert len(set(counts.tolist())) == 1, "one slot group per layer in these specs"
    count = int(counts[0])
    return 4 * (count - max(0, (count - zip_part.residual) // zip_part.group * zip_part.group))


def _head_bytes(method, count: int, head_dim: int, itemsize: int, evicted: bool) -> int:
    """Bytes one KV head of a layer holds for ``count`` slots: key and value, plus the position once evicted
    (int16: every prompt here is far below 32768 tokens); a quantized store holds whole groups beyond the
    residual as codes with float16 scales/zeros (or float8 scales), and its exact sink slots."""
    positions = 2 * count if evicted else 0
    zip_part = _zipcache_part(method)
    if zip_part is not None:  # two tiers of codes, chosen once for the whole prompt
        g, tokenwise = zip_part.group, zip_part.keys == "tokenwise"
        coded = max(0, (count - zip_part.residual) // g * g)
        high = round(zip_part.salient * coded) if tokenwise else round(zip_part.salient * coded / g) * g
        tail = count - coded
        slots = coded + (coded // g * head_dim * 2 if tokenwise else 0)  # tier flags, channel normalizers (fp16)
        key_meta = 2 * 2 if tokenwise else 2 * 2 * head_dim // g  # scale + zero per token, or per channel per g
        tiers = 0
        for bits, n in ((zip_part.high, high), (zip_part.low, coded - high)):
            per_token = (
                2 * words(head_dim, bits) * 4 + key_meta + 2 * 2 * head_dim // zip_part.spec().channels(head_dim)
            )
            tiers += n * per_token
        return slots + tiers + tail * (2 * head_dim * itemsize + 4) + positions  # + running score (fp32)
    parts = method.parts if isinstance(method, Composite) else (method,)
    quant = next((p.spec() for p in parts if isinstance(p, (KIVI, KVQuant))), None)
    if quant is None:
        return count * 2 * head_dim * itemsize + positions
    coded = max(0, (count - quant.residual) // quant.group * quant.group)
    codes = 2 * coded * words(head_dim, quant.bits) * 4  # int32 words
    per_group = 2 * 2 if quant.scales == "fp16" else 1  # fp16 scale and zero, or one float8 scale
    scales = per_group * (coded // quant.group * head_dim + coded * head_dim // quant.channels(head_dim))
    # Outliers: an int16 index and a float16 value each, per key group and per value token.
    outliers = 4 * outlier_count(quant.outliers, quant.group * head_dim) * (coded // quant.group)
    outliers += 4 * outlier_count(quant.outliers, head_dim) * coded
    # Exact sink slots (once anything is coded): key and value in the cache's dtype and an int32 slot index.
    sinks = quant.sink * (2 * head_dim * itemsize + 4) if coded else 0
    return codes + scales + outliers + sinks + (count - coded) * 2 * head_dim * itemsize + positions


def _sliding_savings(model, n: int, head_dim: int, itemsize: int) -> int:
    """Bytes a plain cache saves on sliding layers (they hold at most window - 1 tokens)."""
    types = getattr(model.config, "layer_types", None) or []
    window = getattr(model.config, "sliding_window", None) or n + 1
    sliding = sum(t == "sliding_attention" for t in types)
    return 2 * sliding * (n - min(n, window - 1)) * head_dim * itemsize * model.config.num_key_value_heads
