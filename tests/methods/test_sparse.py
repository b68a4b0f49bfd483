"""Sparse reads at decode (quest, tokenselect, recycled): Quest's bound and pages against plain references,
metadata kept in step with the store, the selectors' choices and refresh rules, and whole generations (full
budget = full attention; a batch = rows one by one; composed with eviction and quantization)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import contextlab as cl
from contextlab.hf.cache import ContextlabCache
from contextlab.hf.compat import cache_kwarg
from contextlab.kernels.sparse_read import page_bounds
from contextlab.methods.policy import ReadPlan, Step
from contextlab.methods.sparse import (
    Quest,
    QuestPolicy,
    TokenSelect,
    TokenSelectPolicy,
    _with_successors,
    attention_mass,
    kmeans,
)
from contextlab.store import DenseStore

CONTEXT = "The archive holds many ledgers; the seventh is bound in green leather and kept apart. " * 6
CONTEXTS = [CONTEXT[:300], CONTEXT[:420], CONTEXT]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    pages=st.integers(1, 6),
    page=st.integers(1, 8),
    dim=st.integers(1, 16),
)
def test_the_page_bound_is_never_below_a_real_score(seed, heads, groups, pages, page, dim):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, heads, pages, page, dim, generator=gen) * 3
    query = torch.randn(1, heads, groups, dim, generator=gen) * 3
    bound = page_bounds(query, keys.amin(3), keys.amax(3))  # [1, H, G, P]
    scores = torch.einsum("bhgd,bhpsd->bhgps", query, keys)  # every real q.k
    assert torch.all(bound >= scores.amax(-1) - 1e-4)
    # ... and it is reached when a page holds one key
    single = page_bounds(query, keys[:, :, :, 0], keys[:, :, :, 0])
    torch.testing.assert_close(single, scores[..., 0], atol=1e-4, rtol=1e-4)


def _store(keys: torch.Tensor, valid: torch.Tensor | None) -> DenseStore:
    store = DenseStore()
    store.append(keys, keys.clone())
    store.mark_new(keys.shape[2], valid, None)
    return store


def _step(query: torch.Tensor) -> Step:
    return Step(query, 1.0, "decode", None, 0, 1)


def _reference_pages(keys, valid_row, query, page: int, pages: int) -> set[int]:
    """Store columns Quest reads for one row and KV head, computed slot by slot."""
    columns = [c for c in range(keys.shape[0] - 1) if valid_row[c]]  # the newest slot is read anyway
    chunks = [columns[i : i + page] for i in range(0, len(columns), page)]
    bounds = []
    for chunk in chunks:
        k = keys[chunk]
        per_head = [(torch.maximum(q * k.amin(0), q * k.amax(0))).sum() for q in query]
        bounds.append(max(float(b) for b in per_head))
    best = sorted(range(len(chunks)), key=lambda i: -bounds[i])[:pages]
    return {c for i in best for c in chunks[i]} | {keys.shape[0] - 1}


def test_pages_match_a_slot_by_slot_reference_with_padding():
    gen = torch.Generator().manual_seed(3)
    b, h, g, s, d, page = 2, 2, 2, 90, 8, 8
    keys = torch.randn(b, h, s, d, generator=gen)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, :13] = False  # a left-padded row
    valid[0, 40:43] = False  # and holes
    query = torch.randn(b, h * g, 1, d, generator=gen)
    method = Quest(budget=cl.methods.base.Budget(tokens=24), page=page)
    plan = QuestPolicy(method).before_attend(_store(keys, valid), _step(query))
    for row in range(b):
        for head in range(h):
            read = {int(i) for i, ok in zip(plan.indices[row, head], plan.valid[row, head], strict=True) if ok}
            q = query[row, head * g : (head + 1) * g, 0]
            assert read == _reference_pages(keys[row, head], valid[row], q, page, 3), (row, head)


def test_metadata_grown_token_by_token_equals_metadata_built_at_once():
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 2, 70, 4, generator=gen)
    valid = torch.rand(2, 70, generator=gen) > 0.2
    method = Quest(budget=cl.methods.base.Budget(tokens=8), page=4)
    once, grown = QuestPolicy(method), QuestPolicy(method)
    once._sync(_store(keys, valid), 70)
    store = _store(keys[:, :, :30], valid[:, :30])
    grown._sync(store, 30)
    for t in range(30, 70):
        store.append(keys[:, :, t : t + 1], keys[:, :, t : t + 1])
        store.mark_new(1, valid[:, t : t + 1], None)
        grown._sync(store, t + 1)
    for name in ("kmin", "kmax"):
        assert torch.equal(getattr(once, name), getattr(grown, name)), name
    for name in ("table", "counts"):
        assert torch.equal(getattr(once.ranks, name), getattr(grown.ranks, name)), name


def test_metadata_is_rebuilt_after_another_part_evicts():
    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(1, 1, 64, 4, generator=gen)
    method = Quest(budget=cl.methods.base.Budget(tokens=8), page=4)
    policy = QuestPolicy(method)
    store = _store(keys, None)
    policy._sync(store, 64)
    kept = torch.arange(0, 64, 2).view(1, 1, -1)
    store.keep(kept, torch.ones_like(kept, dtype=torch.bool))
    policy._sync(store, store.length)
    fresh = QuestPolicy(method)
    fresh._sync(store, store.length)
    assert int(policy.ranks.counts) == 32 and torch.equal(policy.kmax, fresh.kmax)
    assert torch.equal(policy.ranks.table, fresh.ranks.table)


@pytest.mark.parametrize(
    "spec",
    [
        "quest:0.0",
        "quest:budget=4096",
        "snapkv:0.5+quest:budget=4096,page=4",
        "tokenselect:0.0",
        "tokenselect:budget=4096",
        "recycled:0.0,every=3",
        "recycled:0.0,similar=0.9",
        "recycled:0.0,every=3,follow=true",
        "infllm:budget=4096,block=16,local=64",
        "retrieval:budget=4096,local=16",
        "retrieval:budget=4096,local=16,vote=head,follow=true",
        "snapkv:0.5+recycled:budget=4096",
    ],
)
def test_a_budget_above_the_context_is_full_attention(llama, tokenizer, spec):
    reference = "snapkv:0.5" if spec.startswith("snapkv") else "full"
    full = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", method=reference, max_new_tokens=20)
    quest = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", method=spec, max_new_tokens=20)
    assert quest.tokens == full.tokens
    assert quest.kv_bytes == full.kv_bytes  # no metadata while every query reads everything


def _decode(model, cache, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill ``ids`` into ``cache`` then decode greedily; the logits of every decode step."""
    out = []
    with torch.no_grad(), cl.attention_enabled(model):
        logits = model(ids, **{cache_kwarg(model): cache}).logits[:, -1:]
        for _ in range(steps):
            logits = model(logits.argmax(-1), **{cache_kwarg(model): cache}).logits[:, -1:]
            out.append(logits)
    return out


def _decoded(model, tokenizer, spec: str, steps: int) -> tuple[ContextlabCache, int]:
    """A cache of ``spec`` after CONTEXT's prompt and ``steps`` greedy decode steps, and the prompt length."""
    ids = torch.tensor([tokenizer(CONTEXT)["input_ids"]])
    cache = ContextlabCache(model.config, cl.method(spec))
    cache.begin_prompt(ids.shape[1], [ids.shape[1]], new_tokens=steps)
    _decode(model, cache, ids, steps)
    return cache, ids.shape[1]


def test_a_small_budget_reads_only_its_pages_and_stays_close_to_full(llama, tokenizer):
    ids = torch.tensor([tokenizer(CONTEXT)["input_ids"]])
    n = ids.shape[1]
    runs = {}
    for spec in ("full", "quest:budget=64,page=8,dense_layers=0"):
        cache = ContextlabCache(llama.config, cl.method(spec))
        cache.begin_prompt(n, [n], new_tokens=8)
        runs[spec] = (_decode(llama, cache, ids, 8), cache)
    cache = runs["quest:budget=64,page=8,dense_layers=0"][1]
    for layer in cache.compressible:
        assert layer.policy.last_read == 64 + 1  # 8 pages of 8 tokens and the newest token
        assert layer.policy.ranks.counts.max() == layer.store.length  # every token paged (and still cached)
        pages = math.ceil(layer.store.length / 8)
        assert layer.policy.kmin.shape == (1, layer.kv_heads, pages, layer.store.groups[0].keys.shape[-1])
        table = layer.kv_heads * pages * 8 * 4  # the store column of every paged slot, int32
        assert layer.policy.nbytes() == layer.policy.kmin.nbytes * 2 + table + layer.policy.ranks.counts.nbytes
    first = [
        torch.softmax(x[0, -1], -1) for x in (runs["full"][0][0], runs["quest:budget=64,page=8,dense_layers=0"][0][0])
    ]
    assert float((first[0] - first[1]).abs().sum()) < 0.5  # the read pages carry most of the attention


def _recording(choose, plans: dict, key):
    def wrapped(store, step):
        plan = choose(store, step)
        if plan is not None:
            plans[key] = plan
        return plan

    return wrapped


def test_a_decode_step_counts_the_slots_it_reads_and_what_choosing_them_read(llama, tokenizer):
    ids = torch.tensor([tokenizer(CONTEXT)["input_ids"]])
    n = ids.shape[1]
    for spec in ("full", "quest:budget=64,page=8,dense_layers=0"):
        cache = ContextlabCache(llama.config, cl.method(spec))
        cache.begin_prompt(n, [n], new_tokens=1)
        plans = {}
        for layer in cache.compressible:  # record each layer's read plan
            layer.policy.before_attend = _recording(layer.policy.before_attend, plans, layer.layer_idx)
        _decode(llama, cache, ids, 1)
        for layer in cache.compressible:
            keys = layer.store.groups[0].keys
            per_head_slot = 2 * keys.shape[-1] * keys.element_size()
            assert layer.read_steps == 1
            if spec == "full":  # everything held: n prompt slots and the new token
                assert layer.read_bytes == (n + 1) * layer.kv_heads * per_head_slot
            else:  # at most 8 pages of 8 and the newest token per head, after reading every page's bounds
                read = plans[layer.layer_idx].valid.sum((0, 2))  # [H]
                assert int(read.min()) >= 57 and int(read.max()) <= 65
                bounds = layer.policy.kmin.nbytes + layer.policy.kmax.nbytes
                assert layer.read_bytes == int(read.sum()) * per_head_slot + bounds
        per_step = cache.read_bytes_per_step()
        assert per_step == sum(layer.read_bytes for layer in cache.compressible)
    out = cl.generate(
        llama, tokenizer, CONTEXT, "Which ledger?", method="quest:budget=64,page=8,dense_layers=0", max_new_tokens=4
    )
    full = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", max_new_tokens=4)
    assert 0 < out.read_bytes_per_step < full.read_bytes_per_step / 2


QUEST = "quest:budget=32,page=8,dense_layers=0"  # every layer of the tiny models selects
INFLLM = "infllm:budget=68,block=8,sink=4,local=32"
RETRIEVAL = "retrieval:budget=48,local=16,clusters=4,probe=2"
VOTED = "retrieval:budget=48,local=16,clusters=4,probe=1,vote=head,follow=true"


@pytest.mark.parametrize(
    "spec",
    [
        QUEST,
        "tokenselect:budget=32",
        "recycled:budget=32,every=4",
        "recycled:budget=32,similar=0.9",
        "recycled:budget=32,every=6,follow=true",
        INFLLM,
        RETRIEVAL,
        VOTED,
    ],
)
def test_a_batch_reads_like_its_rows_one_by_one(llama, tokenizer, spec):
    batch = cl.generate(llama, tokenizer, CONTEXTS, "Which ledger?", method=spec, max_new_tokens=24)
    for i, ctx in enumerate(CONTEXTS):
        single = cl.generate(llama, tokenizer, ctx, "Which ledger?", method=spec, max_new_tokens=24)
        assert batch.token_ids[i] == single.tokens, f"row {i}"


@pytest.mark.parametrize(
    "reader",
    [
        QUEST,
        "tokenselect:budget=32",
        "recycled:budget=32,every=4",
        "recycled:budget=32,follow=true",
        INFLLM,
        RETRIEVAL,
        VOTED,
    ],
)
def test_sparse_reads_compose_with_eviction_and_quantization(llama, tokenizer, reader):
    for spec in (f"snapkv:0.5+{reader}", f"{reader}+kivi:bits=4,group=16,residual=16"):
        out = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", method=spec, max_new_tokens=12)
        assert len(out.tokens) > 0 and out.method == cl.method(spec).describe()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quest:budget=8,page=16", "smaller than one page of 16"),
        ("quest:page=0", "page must be an integer >= 1"),
        ("quest:dense_layers=-1", "dense_layers must be an integer >= 0"),
        ("quest:budget=64+decode(snapkv,budget=64)+quest:budget=32", "read selection"),
        ("quest:budget=64+tokenselect:budget=64", "read selection"),
        ("tokenselect:similar=2", "similar \\(cosine\\) must be a number in"),
        ("recycled:every=0", "every must be an integer >= 1"),
        ("recycled:similar=1.5", "similar \\(cosine\\) must be a number in"),
        ("recycled:follow=3", "follow must be true or false"),
        ("infllm:budget=100,local=1024", "leaves no room for one block"),
        ("infllm:0.5", "budget must be a number of tokens"),
        ("infllm:reps=200", "cannot exceed the block size"),
        ("infllm:offload=gpu", "offload must be one of"),
        ("infllm:vote=row", "vote must be one of"),
        ("infllm:offload=cpu+kivi:bits=4", "storage"),
        ("retrieval:budget=60", "leaves nothing to retrieve"),
        ("retrieval:index=hnsw", "index must be one of"),
        ("retrieval:vote=layer", "vote must be one of"),
        ("retrieval:follow=2", "follow must be true or false"),
    ],
)
def test_bad_settings_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        cl.method(spec)


@pytest.mark.parametrize(
    "reader",
    [QUEST, "tokenselect:budget=32", "recycled:budget=32", INFLLM, RETRIEVAL],
)
def test_per_head_budgets_are_refused_with_a_clear_message(reader):
    """AdaKV's per-head budgets and duo's streaming heads give KV heads different slot counts: refused when
    the spec is built, not at the first decode step."""
    for splitting in ("adakv:0.5", "duo:retrieval=0.5"):
        with pytest.raises(ValueError, match="keeps a different number of tokens per head"):
            cl.method(f"{splitting}+{reader}")
    cl.method(f"adakv:0.0+{reader}")  # nothing evicted: every head keeps everything


def test_attention_mass_is_each_heads_softmax_summed_over_its_group():
    gen = torch.Generator().manual_seed(11)
    query, keys = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 3, 20, 8, generator=gen)
    valid = torch.rand(2, 1, 20, generator=gen) > 0.3
    mass = attention_mass(query, keys, valid, 0.5)
    for b in range(2):
        for h in range(3):
            expected = torch.zeros(20)
            for q in query[b, 2 * h : 2 * h + 2]:
                scores = (keys[b, h] @ q * 0.5).masked_fill(~valid[b, 0], float("-inf"))
                expected += scores.softmax(-1)
            torch.testing.assert_close(mass[b, h], expected)


def test_tokenselect_reads_the_tokens_with_the_most_attention():
    gen = torch.Generator().manual_seed(13)
    keys = torch.randn(2, 2, 50, 8, generator=gen)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[0, :7] = False
    query = torch.randn(2, 4, 1, 8, generator=gen)
    policy = TokenSelectPolicy(TokenSelect(budget=cl.methods.base.Budget(tokens=10)))
    plan = policy.before_attend(_store(keys, valid), Step(query, 0.3, "decode", None, 0, 1))
    mass = attention_mass(query[:, :, 0], keys[:, :, :49], valid[:, None, :49], 0.3)
    for b in range(2):
        for h in range(2):
            read = {int(i) for i, ok in zip(plan.indices[b, h], plan.valid[b, h], strict=True) if ok}
            top = set(mass[b, h].masked_fill(~valid[b, :49], -1).topk(10).indices.tolist())
            assert read == top | {49}


@pytest.mark.parametrize(("similar", "selections"), [(1.0, 12), (-1.0, 1)])
def test_tokenselect_reuses_its_selection_while_queries_stay_similar(llama, tokenizer, similar, selections):
    cache, _ = _decoded(llama, tokenizer, f"tokenselect:budget=32,similar={similar}", 12)
    for layer in cache.compressible:
        assert layer.policy.selections == selections
        assert layer.policy.last_read == (32 + 1 if similar == 1.0 else 32 + 12)  # + every token since


def test_recycled_reads_everything_every_few_steps_and_its_top_tokens_between(llama, tokenizer):
    ids = torch.tensor([tokenizer(CONTEXT)["input_ids"]])
    reads, chosen = [], []
    cache = ContextlabCache(llama.config, cl.method("recycled:budget=32,every=4"))
    cache.begin_prompt(ids.shape[1], [ids.shape[1]], new_tokens=10)
    layer = cache.compressible[0]
    with torch.no_grad(), cl.attention_enabled(llama):
        logits = llama(ids, **{cache_kwarg(llama): cache}).logits[:, -1:]
        for _ in range(10):
            logits = llama(logits.argmax(-1), **{cache_kwarg(llama): cache}).logits[:, -1:]
            reads.append(layer.policy.last_read)
            chosen.append(layer.policy.selection_bytes())
    n = ids.shape[1]
    full = [n + 1 + i for i in range(10)]  # the whole cache at step i
    assert reads == [full[0], 34, 35, 36, full[4], 34, 35, 36, full[8], 34]
    assert layer.policy.selections == 3
    assert chosen == [0] * 10  # a full step's weights come with its read; the steps between choose nothing


@pytest.mark.parametrize(("similar", "full_steps"), [(1.0, 10), (-1.0, 1)])
def test_recycled_reads_everything_again_when_the_query_moves(llama, tokenizer, similar, full_steps):
    """similar = 1: every new query differs from the last full step's, so every step reads everything;
    similar = -1: no query is that far, so only the fixed schedule (every = 100) applies."""
    cache, n = _decoded(llama, tokenizer, f"recycled:budget=32,every=100,similar={similar}", 10)
    for layer in cache.compressible:
        assert layer.policy.selections == full_steps  # each full step of a row selects its top tokens
        assert layer.policy.last_read == (n + 10 if similar == 1.0 else 32 + 10)


def test_successors_of_a_selection_are_read_once_and_only_where_older_tokens_are():
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 6] = False  # an evicted (or padding) slot is never read
    store = _store(torch.zeros(2, 1, 12, 2), valid)
    selected = torch.tensor([[[1, 3, 7]], [[2, 3, 6]]])
    chosen = torch.tensor([[[True, True, True]], [[True, True, False]]])
    since = torch.tensor([9, 8])  # selected at store lengths 10 and 9: now (length 12) 2 and 3 steps on
    columns, ok = _with_successors(store, selected, chosen, since)
    read = [sorted(int(c) for c, v in zip(columns[b, 0], ok[b, 0], strict=True) if v) for b in range(2)]
    # row 0: successors 3 (already read), 5, 9 (not older than the selection: it is read as a recent token)
    # row 1: successors 5, 6 (no token there), and none for the unchosen entry
    assert read == [[1, 3, 5, 7], [2, 3, 5]]
    assert int(ok.sum()) == 7  # each column once


def test_recycled_follow_reads_half_its_budget_and_their_successors(llama, tokenizer):
    """follow: the full step keeps budget/2 tokens; k steps on, each head reads those, their k-th successors
    that are older than the selection (each column once) and the tokens appended since the selection."""
    cache, _ = _decoded(llama, tokenizer, "recycled:budget=32,every=100,follow=true", 8)
    for layer in cache.compressible:
        policy, length = layer.policy, layer.store.length
        since = int(policy.since[0])
        k = length - 1 - since
        assert policy.selected.shape[-1] == 16 and k == 7
        reads = []
        for head in policy.selected[0].tolist():
            kept = set(head)
            reads.append(len(kept | {c + k for c in kept if c + k < since}) + length - since)
        assert policy.last_read == max(reads) > 16 + length - since  # some successor was not kept already


def test_a_plan_covers_the_columns_its_valid_entries_name_once():
    plan = ReadPlan(
        torch.tensor([[[3, 0, 3, 5], [0, 0, 2, 1]]]),
        torch.tensor([[[True, False, True, True], [True, False, True, False]]]),
    )
    assert plan.covers(6).tolist() == [
        [[False, False, False, True, False, True], [True, False, True, False, False, False]]
    ]


def test_recycled_resumes_from_a_saved_single_step_count():
    """Caches saved before per-row step counts hold one int for the batch; a loaded one keeps its schedule."""
    policy = cl.method("recycled:budget=4,every=3").build(0, 1)
    scalars, tensors = policy.export_state()
    scalars["steps"] = 2
    policy.load_state(scalars, tensors)
    step = _step(torch.randn(2, 2, 1, 4))  # two rows
    assert policy._due(step).tolist() == [False, False]
    policy.steps = 3
    assert policy._due(step).tolist() == [True, True]


def test_recycled_full_step_of_one_row_leaves_the_other_on_its_selection():
    gen = torch.Generator().manual_seed(19)
    keys = torch.randn(2, 2, 60, 8, generator=gen)
    valid = torch.ones(2, 60, dtype=torch.bool)
    valid[1, :5] = False  # row 1 is left-padded
    store = _store(keys, valid)
    policy = cl.method("recycled:budget=10,every=50,similar=0.5").build(0, 1)
    first = torch.randn(2, 4, 1, 8, generator=gen)
    assert policy.before_attend(store, _step(first)) is None  # no selection yet: both rows read everything
    store.append(keys[:, :, :1], keys[:, :, :1])
    store.mark_new(1, None, None)
    later = first.clone()
    later[1] = -first[1]  # row 1's query turns around (cosine -1), row 0's stays
    plan = policy.before_attend(store, _step(later))
    read = [
        {int(i) for i, ok in zip(plan.indices[b, h], plan.valid[b, h], strict=True) if ok}
        for b in range(2)
        for h in range(2)
    ]
    selected = [{int(i) for i in policy.selected[0, h]} for h in range(2)]
    assert read[0] == selected[0] | {59, 60} and read[1] == selected[1] | {59, 60}  # selection + tokens since
    assert read[2] == read[3] == set(range(5, 61))  # row 1 reads every slot it holds
    assert policy.selections == 3 and policy.steps.tolist() == [2, 1]  # steps taken since each full one


def test_infllm_reads_sinks_the_block_a_query_needs_and_the_local_window():
    gen = torch.Generator().manual_seed(17)
    b, h, g, s, d = 1, 2, 2, 200, 8
    keys = torch.randn(b, h, s, d, generator=gen) * 0.1
    needle = torch.randn(d, generator=gen)
    keys[:, :, 4 + 5 * 16 + 3] = needle * 3  # one token of block 5 (blocks of 16 after 4 sinks)
    method = cl.method("infllm:budget=76,block=16,sink=4,local=40,reps=2")
    policy = method.build(0, 1)
    store = _store(keys, None)
    prompt = torch.randn(b, h * g, 3, d, generator=gen)
    prompt[:, :, -1] = needle  # the prompt's last query looks for the needle
    policy.after_forward(store, Step(prompt, 1.0, "prompt_end", None, 0, 1))
    # blocks that left the local window: (200 - 39 - 4) // 16 = 9
    assert policy.formed.tolist() == [[9, 9]] and policy.reps.shape == (1, 2, 9, 2, d)
    store.append(keys[:, :, :1], keys[:, :, :1])  # the decode token
    query = needle.view(1, 1, 1, d).expand(b, h * g, 1, d)
    plan = policy.before_attend(store, Step(query, 1.0, "decode", None, 0, 1))
    for head in range(h):
        read = {int(i) for i, ok in zip(plan.indices[0, head], plan.valid[0, head], strict=True) if ok}
        block5 = set(range(4 + 5 * 16, 4 + 6 * 16))
        tail = set(range(4 + 9 * 16, 201))  # after the last formed block: the local window and a partial block
        assert set(range(4)) | block5 | tail <= read  # sinks, the needle's block, the tail (and the newest)
        assert len(read) == 4 + 2 * 16 + len(tail)  # budget 76 = 4 sinks + 40 local + 2 blocks of 16
        assert len(read) <= 76 + 16 - 1 + 1


@pytest.mark.parametrize("vote", ["layer", "head"])
def test_infllm_votes_for_blocks_per_layer_or_per_head(vote):
    """Head 0's needle sits in block 5, head 1's in block 2; two blocks fit the budget. Voting per head, each
    head reads its own needle's block; voting per layer, both heads read the same two blocks: both needles'."""
    gen = torch.Generator().manual_seed(23)
    b, h, g, s, d = 1, 2, 2, 200, 8
    keys = torch.randn(b, h, s, d, generator=gen) * 0.1
    needles = torch.randn(h, d, generator=gen)
    for head, block in ((0, 5), (1, 2)):
        keys[:, head, 4 + block * 16 + 3] = needles[head] * 3
    policy = cl.method(f"infllm:budget=76,block=16,sink=4,local=40,reps=2,vote={vote}").build(0, 1)
    store = _store(keys, None)
    prompt = needles.repeat_interleave(g, 0).view(1, h * g, 1, d)  # each head's last prompt query seeks its needle
    policy.after_forward(store, Step(prompt, 1.0, "prompt_end", None, 0, 1))
    store.append(keys[:, :, :1], keys[:, :, :1])
    plan = policy.before_attend(store, Step(prompt, 1.0, "decode", None, 0, 1))
    blocks = []
    for head in range(h):
        read = {int(i) for i, ok in zip(plan.indices[0, head], plan.valid[0, head], strict=True) if ok}
        blocks.append({k for k in range(9) if set(range(4 + k * 16, 4 + (k + 1) * 16)) <= read})
    assert all(len(chosen) == 2 for chosen in blocks)
    assert 5 in blocks[0] and 2 in blocks[1]
    if vote == "layer":
        assert blocks[0] == blocks[1] == {2, 5}


@pytest.mark.usefixtures("offload_on_cpu")
def test_infllm_offloaded_reads_the_same_and_copies_only_the_host_slots_it_reads(llama, tokenizer):
    ids = torch.tensor([tokenizer(CONTEXT)["input_ids"]])
    n, steps = ids.shape[1], 6
    runs = {}
    for offload in ("none", "cpu"):
        cache = ContextlabCache(llama.config, cl.method(f"{INFLLM},offload={offload}"))
        cache.begin_prompt(n, [n], new_tokens=steps)
        runs[offload] = (_decode(llama, cache, ids, steps), cache)
    for here, there in zip(runs["none"][0], runs["cpu"][0], strict=True):
        assert torch.equal(here, there)
    for layer in runs["cpu"][1].compressible:
        g = layer.store.groups[0]
        assert g.quantized > 0 and g.tail < 68 + 1 + 8  # resident: budget + 1 slots, and up to a block more
        # per step only the slots read on the host cross: the sinks and 4 blocks (the rest of the budget is the
        # resident local window; a plan's padding entries are not copied), far from the whole cache
        per_slot = 2 * layer.kv_heads * g.keys.shape[-1] * g.keys.element_size()
        assert 0 < layer.store.moved_bytes <= steps * per_slot * (4 + 4 * 8) < steps * per_slot * g.quantized


def test_infllm_offload_on_a_cpu_only_run_changes_nothing_and_says_so(llama, tokenizer):
    with pytest.warns(RuntimeWarning, match="offloading to cpu does nothing here"):
        out = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", method=f"{INFLLM},offload=cpu", max_new_tokens=8)
    resident = cl.generate(llama, tokenizer, CONTEXT, "Which ledger?", method=INFLLM, max_new_tokens=8)
    assert out.tokens == resident.tokens and out.kv_bytes == resident.kv_bytes


@pytest.mark.usefixtures("offload_on_cpu")
@pytest.mark.parametrize("spec", [INFLLM, f"snapkv:0.5+{INFLLM}"])
def test_infllm_offloaded_batches_match_the_resident_cache(llama, tokenizer, spec):
    here = cl.generate(llama, tokenizer, CONTEXTS, "Which ledger?", method=spec, max_new_tokens=16)
    there = cl.generate(llama, tokenizer, CONTEXTS, "Which ledger?", method=f"{spec},offload=cpu", max_new_tokens=16)
    assert here.token_ids == there.token_ids


def test_kmeans_finds_separated_clusters_and_ignores_invalid_points():
    gen = torch.Generator().manual_seed(19)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(60) % 3
    points = (centres[truth] + torch.randn(60, 2, generator=gen) * 0.5).view(1, 1, 60, 2)
    valid = torch.ones(1, 1, 60, dtype=torch.bool)
    points[0, 0, :6] = 1000.0  # invalid garbage must not pull a centroid
    valid[0, 0, :6] = False
    centroids, lists = kmeans(points, valid, 3, 10)
    assert centroids.abs().max() < 20
    found = lists[0, 0, 6:]
    for c in range(3):  # each true cluster lands in exactly one list, and lists differ
        assert found[truth[6:] == c].unique().numel() == 1
    assert found.unique().numel() == 3


@pytest.mark.parametrize("index", ["exact", "ivf:probe=all"])
def test_retrieval_reads_sinks_the_best_keys_and_everything_past_the_index(index):
    gen = torch.Generator().manual_seed(23)
    b, h, g, s, d = 2, 2, 2, 120, 8
    keys = torch.randn(b, h, s, d, generator=gen)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, :9] = False  # a padded row
    spec = "retrieval:budget=40,sink=4,local=16" + (",index=exact" if index == "exact" else ",clusters=5,probe=5")
    policy = cl.method(spec).build(0, 1)
    store = _store(keys, valid)
    query = torch.randn(b, h * g, 1, d, generator=gen)
    plan = policy.before_attend(store, Step(query, 1.0, "decode", None, 0, 1))
    for row in range(b):
        columns = [c for c in range(s - 1) if valid[row, c]]  # the newest slot is read anyway
        indexed = columns[4 : len(columns) - 16]
        for head in range(h):
            read = {int(i) for i, ok in zip(plan.indices[row, head], plan.valid[row, head], strict=True) if ok}
            q = query[row, head * g : (head + 1) * g, 0].sum(0)
            best = sorted(indexed, key=lambda c, q=q, head=head, row=row: -float(keys[row, head, c] @ q))[:20]
            assert read == set(columns[:4]) | set(best) | set(columns[-16:]) | {s - 1}, (row, head)


def _retrieval_case(seed: int, spec: str, padded: tuple[int, int] = (0, 11), scale: float = 1.0):
    """Random keys ``[2, 2, 150, 8]`` (row ``padded[0]`` left-padded by ``padded[1]`` slots) in a store, a
    retrieval policy of ``spec`` (sink 4, local 16, budget 40 in these tests) and the generator."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 2, 150, 8, generator=gen) * scale
    valid = torch.ones(2, 150, dtype=torch.bool)
    valid[padded[0], : padded[1]] = False
    return gen, keys, valid, cl.method(spec).build(0, 1), _store(keys, valid)


def _listed(policy, row: int, head: int, lists) -> list[int]:
    """The indexed ranks filed in ``lists`` of one row and head's inverted file (sink 4 before them)."""
    starts, members = policy.starts.long(), policy.members.long()
    return [int(r) + 4 for c in lists for r in members[row, head, starts[row, head, c] : starts[row, head, c + 1]]]


def _read(plan: ReadPlan, row: int, head: int) -> set[int]:
    return {int(i) for i, ok in zip(plan.indices[row, head], plan.valid[row, head], strict=True) if ok}


def _expected(columns: list[int], best) -> set[int]:
    """What a retrieval step of these tests reads: the 4 sinks, the ``best`` indexed ranks, the 16 local
    slots and the newest slot (column 149)."""
    return set(columns[:4]) | {columns[r] for r in best} | set(columns[-16:]) | {149}


def test_retrieval_ivf_scans_only_the_lists_it_probes():
    gen, keys, valid, policy, store = _retrieval_case(29, "retrieval:budget=40,sink=4,local=16,clusters=6,probe=2")
    b, h, s, d = keys.shape
    query = torch.randn(b, h * 2, 1, d, generator=gen)
    plan = policy.before_attend(store, Step(query, 1.0, "decode", None, 0, 1))
    scanned = 0
    for row in range(b):
        columns = [c for c in range(s - 1) if valid[row, c]]
        for head in range(h):
            q = query[row, head * 2 : (head + 1) * 2, 0].sum(0)
            ranks = _listed(policy, row, head, (policy.centroids[row, head] @ q).topk(2).indices.tolist())
            scanned = max(scanned, len(ranks))
            best = sorted(ranks, key=lambda r, q=q, row=row, head=head: -float(keys[row, head, columns[r]] @ q))[:20]
            assert _read(plan, row, head) == _expected(columns, best), (row, head)
    indexed = len(range(4, 150 - 16))
    assert policy.last_scanned == scanned < indexed  # two lists of six, not the whole index
    # this first step also built the index: every indexed key read once per Lloyd iteration (10 by default)
    built = b * h * (int(policy.indexed.max()) - 4) * d * 4 * 10
    assert policy.selection_bytes() == built + b * h * scanned * d * 4 + policy.centroids.nbytes
    policy.before_attend(store, Step(query, 1.0, "decode", None, 0, 1))  # the index stands: the search alone
    assert policy.selection_bytes() == b * h * scanned * d * 4 + policy.centroids.nbytes


def test_retrieval_by_head_probes_each_heads_lists_and_ranks_by_their_summed_softmax():
    spec = "retrieval:budget=40,sink=4,local=16,clusters=7,probe=1,vote=head"
    gen, keys, valid, policy, store = _retrieval_case(43, spec, padded=(0, 9), scale=2.0)
    b, h, s, d = keys.shape
    query = torch.randn(b, h * 3, 1, d, generator=gen)
    plan = policy.before_attend(store, Step(query, 0.5, "decode", None, 0, 1))
    scanned = 0
    for row in range(b):
        columns = [c for c in range(s - 1) if valid[row, c]]
        for head in range(h):
            heads = query[row, head * 3 : (head + 1) * 3, 0]  # [G, D]
            probed = {int((policy.centroids[row, head] @ q).argmax()) for q in heads}  # one list per query head
            ranks = _listed(policy, row, head, probed)
            scanned = max(scanned, len(ranks))
            candidate_keys = keys[row, head, [columns[r] for r in ranks]]  # [M, D]
            mass = (heads @ candidate_keys.T * 0.5).softmax(-1).sum(0)  # each head's softmax, summed
            best = [ranks[i] for i in mass.topk(min(20, len(ranks))).indices.tolist()]
            assert _read(plan, row, head) == _expected(columns, best), (row, head)
    assert policy.last_scanned == scanned


def test_retrieval_follow_also_ranks_the_successors_of_what_the_last_search_retrieved():
    spec = "retrieval:budget=40,sink=4,local=16,clusters=6,probe=1,follow=true"
    gen, keys, valid, policy, store = _retrieval_case(41, spec, padded=(1, 13))
    b, h, s, d = keys.shape
    retrieved = []
    for step in range(2):
        query = torch.randn(b, h * 2, 1, d, generator=gen)
        plan = policy.before_attend(store, Step(query, 1.0, "decode", None, 0, 1))
        found = []
        for row in range(b):
            columns = [c for c in range(s - 1) if valid[row, c]]
            end = len(columns) - 16  # ranks [4, end) are indexed
            for head in range(h):
                q = query[row, head * 2 : (head + 1) * 2, 0].sum(0)
                ranks = set(_listed(policy, row, head, [int((policy.centroids[row, head] @ q).argmax())]))
                if step == 1:  # the successors of the first search's keys, where they are indexed
                    ranks |= {r + 1 for r in retrieved[row * h + head] if r + 1 < end}
                best = sorted(ranks, key=lambda r, q=q, row=row, head=head: -float(keys[row, head, columns[r]] @ q))
                found.append(sorted(best[:20]))
                read = _read(plan, row, head)
                assert len(read) == int(plan.valid[row, head].sum())  # no slot named twice
                assert read == _expected(columns, best[:20]), (step, row, head)
                kept = policy.found[row, head]
                assert sorted(int(r) for r in kept[kept >= 0]) == found[-1]
        retrieved = found


def test_quest_leaves_its_first_layers_dense(llama, tokenizer):
    cache = ContextlabCache(llama.config, cl.method("quest:budget=32,page=8"))  # dense_layers=2 by default
    assert [type(layer.policy).__name__ for layer in cache.compressible] == ["LayerPolicy"] * 2 + ["QuestPolicy"] * (
        len(cache.compressible) - 2
    )


def test_a_read_plan_naming_every_slot_is_full_attention(llama, tokenizer, monkeypatch):
    """The gathered-read path itself (not the "budget covers everything, read densely" shortcut): a plan that
    names every slot, shuffled per head and with ignored padding entries, gives full attention's logits."""
    generator = torch.Generator().manual_seed(0)

    def every_slot(self, store, step):
        if step.phase != "decode":
            return None
        b, h = step.queries.shape[0], store.groups[0].keys.shape[1]
        order = torch.stack([torch.randperm(store.length, generator=generator) for _ in range(b * h)])
        padding = torch.zeros(b * h, 3, dtype=torch.long)  # slot 0 again, flagged invalid
        indices = torch.cat([order, padding], dim=-1).view(b, h, -1)
        valid = torch.cat([torch.ones_like(order, dtype=torch.bool), padding.bool()], dim=-1).view(b, h, -1)
        return ReadPlan(indices, valid)

    ids = torch.tensor([tokenizer(CONTEXT)["input_ids"]])
    n = ids.shape[1]
    logits = {}
    for spec in ("full", "tokenselect:budget=8"):
        if spec != "full":
            monkeypatch.setattr(TokenSelectPolicy, "before_attend", every_slot)
        cache = ContextlabCache(llama.config, cl.method(spec))
        cache.begin_prompt(n, [n], new_tokens=6)
        logits[spec] = _decode(llama, cache, ids, 6)
    for full, planned in zip(logits["full"], logits["tokenselect:budget=8"], strict=True):
        torch.testing.assert_close(planned, full, rtol=1e-4, atol=1e-4)
