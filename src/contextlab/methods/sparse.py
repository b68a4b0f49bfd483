"""Query-aware sparse reads at decode: keep every token, let each decode query read only what it needs.

Eviction removes tokens for good; a sparse read keeps the whole cache and, for every decode query, picks
the slots worth reading. Quest (Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context
LLM Inference", https://arxiv.org/abs/2406.10774) cuts each head's cached keys into pages of ``page`` tokens
and keeps, per page, the elementwise minimum and maximum of its keys. For a query ``q`` the largest score
any key ``k`` of the page can reach is bounded by ``sum_d max(q_d * min_d, q_d * max_d)``; the pages with
the highest bounds are read, up to the budget, together with the newest token.

Pages are cut along each (row, KV head)'s own valid slots, in order (padding and evicted slots are skipped),
so a row pages its tokens the same alone or in a batch. Page metadata grows with every appended token and
is rebuilt from the store whenever another part of a composition moved or removed slots (the store's
``version``). With a quantized store the bounds come from the keys as appended (full precision), while the
read uses the stored (dequantized) keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from contextlab.kernels.sparse_read import page_scores
from contextlab.methods.base import READ_SELECTION, STORAGE, Budget, Method, check_int, check_number, param
from contextlab.methods.policy import LayerPolicy, ReadPlan, Stateful, Step
from contextlab.methods.positions import Rope
from contextlab.store import DenseStore, MemoryTracker, SlotGroup
from contextlab.store.offload import OffloadStore


@dataclass(frozen=True, eq=False)
class SparseReader(Method):
    """What the sparse readers share: the read-selection role, and a ``budget`` of tokens read per decode
    query (subclasses declare the field; ``tokens_only`` ones refuse a ratio)."""

    roles: ClassVar[frozenset[str]] = frozenset({READ_SELECTION})
    tokens_only: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.tokens_only and (not isinstance(self.budget, Budget) or self.budget.tokens is None):
            raise ValueError(f"{self.name}: budget must be a number of tokens (budget=N), got {self.budget!r}")
        if not isinstance(self.budget, Budget):
            raise ValueError(f"{self.name}: budget must be a token count or a ratio, got {self.budget!r}")

    @property
    def sparse_reads(self) -> bool:
        return True


@dataclass(frozen=True, eq=False)
class Quest(SparseReader):
    """Quest: every decode query reads the pages of keys whose min/max bound promises the highest score, up
    to ``budget`` tokens, plus the newest token; the cache keeps every token.

    Tang et al., 2024 (arXiv 2406.10774): "up to 2.23x self-attention speedup" at a 4K-token budget with
    "negligible accuracy loss" on long-dependency tasks. A budget at or above the cached tokens reads
    everything (exactly full attention). Per KV head, a page's score is the largest bound among the query
    heads that share it (grouped-query attention). As in the paper, the first ``dense_layers`` layers read
    everything (their attention is the least sparse). A prompt, or several tokens fed at once after it, is
    read in full; the selection applies to one-token decode steps."""

    name = "quest"
    paper = "Tang et al., 2024, Quest, https://arxiv.org/abs/2406.10774"
    budget: Budget | None = param(  # noqa: RUF009 - a frozen Budget is a safe shared default
        "tokens each decode query reads (budget=N), or the fraction of cached tokens it skips (0.875 reads 1/8)",
        Budget(tokens=2048),
    )
    page: int = param("tokens per page (one min/max key pair of metadata per page and KV head)", 16)
    dense_layers: int = param("first layers that read everything (the paper leaves the first two dense)", 2)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("quest: page", self.page, 1)
        check_int("quest: dense_layers", self.dense_layers, 0)
        if self.budget.tokens is not None and self.budget.tokens < self.page:
            raise ValueError(
                f"quest: a budget of {self.budget.tokens} tokens is smaller than one page of {self.page}; "
                "raise the budget or lower page"
            )

    def read_tokens(self, cached: int) -> int:
        """Tokens a decode query reads out of ``cached`` older tokens (before rounding to pages)."""
        if self.budget.tokens is not None:
            return self.budget.tokens
        return max(cached - math.floor(cached * self.budget.ratio), 1)

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return LayerPolicy() if layer_idx < self.dense_layers else QuestPolicy(self)


def _validity(store: DenseStore, start: int, end: int) -> torch.Tensor:
    """``[B, H, end - start]``: whether each of store columns ``[start, end)`` holds a token, per head."""
    g = store.groups[0]
    b, h = g.keys.shape[:2]
    valid = g.used_valid()
    if valid is None:
        return torch.ones(b, h, end - start, dtype=torch.bool, device=g.keys.device)
    return valid[:, :, start:end].expand(b, h, -1)


def _span(store: DenseStore, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[B, H, T, D]`` of store columns ``[start, end)`` and their validity per head ``[B, H, T]``."""
    return store.groups[0].span(start, end)[0], _validity(store, start, end)


class RankTable(Stateful):
    """Each (row, KV head)'s valid slots numbered in order: ``table [B, H, N]`` maps a rank to its store
    column (-1 where none), ``counts [B, H]`` holds how many are numbered. Kept in step with a store: new
    columns are numbered as they come (:meth:`sync`), and everything is numbered again once the store moved
    or dropped slots (its ``version``), so a row numbers its tokens the same alone or in a batch."""

    def __init__(self, owner: str, unit: int) -> None:
        self.owner, self.unit = owner, unit  # the table grows by whole units (pages, blocks)
        self.table: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.covered = 0  # store columns numbered
        self.version = -1

    def stale(self, store: DenseStore, upto: int) -> bool:
        """Whether the numbering must start again: the store moved or dropped slots since (or shrank)."""
        return store.version != self.version or self.covered > upto

    def sync(self, store: DenseStore, upto: int, on_new=None) -> None:
        """Number store columns ``[0, upto)`` (from scratch when :meth:`stale`); ``on_new(keys [B, H, T, D],
        valid [B, H, T], rank [B, H, T])`` sees every newly numbered span."""
        if store.split:
            raise ValueError(
                f"{self.owner} reads a cache whose KV heads share one slot count; a per-head budget (adakv) splits "
                "them. Compose it with a method that keeps the same number of tokens in every head"
            )
        if self.stale(store, upto):
            self.table = self.counts = None
            self.covered, self.version = 0, store.version
        if upto > self.covered:
            valid = _validity(store, self.covered, upto)
            rank = self._number(valid, self.covered)
            if on_new is not None:
                on_new(store.groups[0].span(self.covered, upto)[0], valid, rank)
            self.covered = upto

    def _number(self, valid: torch.Tensor, first: int) -> torch.Tensor:
        b, h, _ = valid.shape
        if self.counts is None:
            self.counts = torch.zeros(b, h, dtype=torch.long, device=valid.device)
            self.table = torch.full((b, h, 0), -1, dtype=torch.int32, device=valid.device)
        rank = self.counts.unsqueeze(-1) + valid.long().cumsum(-1) - 1  # [B, H, T]
        self.counts = self.counts + valid.sum(-1)
        need = math.ceil(int(self.counts.max()) / self.unit) * self.unit
        if need > self.table.shape[2]:
            self.table = torch.cat([self.table, self.table.new_full((b, h, need - self.table.shape[2]), -1)], dim=2)
        rows, heads, new = valid.nonzero(as_tuple=True)
        self.table[rows, heads, rank[rows, heads, new]] = (new + first).to(torch.int32)
        return rank

    def columns(self, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store columns ``[B, H, K]`` (long) of ``ranks [B, H, K]`` and whether each exists."""
        inside = (ranks >= 0) & (ranks < self.counts.unsqueeze(-1))
        slots = self.table.gather(-1, ranks.clamp(0, self.table.shape[2] - 1)).long()
        return slots.clamp(min=0), inside & (slots >= 0)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.table, self.counts) if t is not None)

    def map_batch(self, fn) -> None:
        if self.table is not None:
            self.table, self.counts = fn(self.table), fn(self.counts)


class QuestPolicy(LayerPolicy):
    """Per-page key bounds of one layer, kept in step with its store; picks pages per decode query.

    State per row and KV head: ``kmin``/``kmax [B, H, P, D]`` (bounds of pages of ``page`` consecutive
    ranks) beside the :class:`RankTable` of its slots."""

    def __init__(self, method: Quest) -> None:
        self.method = method
        self.page = method.page
        self.ranks = RankTable("quest", method.page)
        self.kmin: torch.Tensor | None = None
        self.kmax: torch.Tensor | None = None
        self.last_read = 0  # slots the last selective step read per (row, head), newest token included
        self.chose_bytes = 0

    # -- hooks ----------------------------------------------------------------------------------------
    def before_attend(self, store: DenseStore, step: Step) -> ReadPlan | None:
        self.chose_bytes = 0
        if step.phase != "decode" or step.tokens != 1:
            return None
        older = store.length - 1  # the newest slot is this step's own token
        pages = self._pages(older)
        if older <= pages * self.page:
            return None  # everything fits the budget: full attention, exactly
        self._sync(store, older)
        return self._plan(store, step, pages)

    def after_forward(self, store: DenseStore, step: Step) -> None:
        """Page the slots once the prompt is in and after every later forward, so the metadata is counted
        as soon as it exists (only while the cache is larger than what a query reads)."""
        if step.phase != "prefill" and store.length > self._pages(store.length) * self.page:
            self._sync(store, store.length)

    def map_batch(self, fn) -> None:
        self.ranks.map_batch(fn)
        if self.kmin is not None:
            self.kmin, self.kmax = fn(self.kmin), fn(self.kmax)

    def nbytes(self) -> int:
        return self.ranks.nbytes() + sum(t.nbytes for t in (self.kmin, self.kmax) if t is not None)

    # -- page metadata --------------------------------------------------------------------------------------
    def _pages(self, cached: int) -> int:
        return math.ceil(self.method.read_tokens(cached) / self.page)

    def _sync(self, store: DenseStore, upto: int) -> None:
        """Page store columns ``[0, upto)``: only the new ones, or all of them after slots moved."""
        if self.ranks.stale(store, upto):
            self.kmin = self.kmax = None
        self.ranks.sync(store, upto, self._bound)

    def _bound(self, keys: torch.Tensor, valid: torch.Tensor, rank: torch.Tensor) -> None:
        """Fold newly numbered slots (``keys [B, H, T, D]``) into the bounds of their pages."""
        b, h, _, d = keys.shape
        pages = self.ranks.table.shape[2] // self.page
        if self.kmin is None:
            self.kmin = keys.new_full((b, h, 0, d), float("inf"))
            self.kmax = keys.new_full((b, h, 0, d), float("-inf"))
        more = pages - self.kmin.shape[2]
        if more > 0:
            self.kmin = torch.cat([self.kmin, self.kmin.new_full((b, h, more, d), float("inf"))], dim=2)
            self.kmax = torch.cat([self.kmax, self.kmax.new_full((b, h, more, d), float("-inf"))], dim=2)
        rows, heads, new = valid.nonzero(as_tuple=True)
        flat = (rows * h + heads) * pages + rank[rows, heads, new] // self.page  # [V] page of each valid slot
        picked = keys[rows, heads, new]  # [V, D]
        index = flat.unsqueeze(-1).expand(-1, d)
        self.kmin.view(-1, d).scatter_reduce_(0, index, picked, "amin")
        self.kmax.view(-1, d).scatter_reduce_(0, index, picked, "amax")

    # -- selection ------------------------------------------------------------------------------------------
    def selection_bytes(self) -> int:
        return self.chose_bytes

    def _plan(self, store: DenseStore, step: Step, pages: int) -> ReadPlan:
        total = self.kmin.shape[2]
        self.chose_bytes = self.kmin.nbytes + self.kmax.nbytes
        score = page_scores(step.queries[:, :, 0], self.kmin, self.kmax)  # [B, H, P]: the most promising head
        filled = torch.arange(total, device=score.device) * self.page < self.ranks.counts.unsqueeze(-1)
        score = score.masked_fill(~filled, float("-inf"))
        chosen = score.topk(min(pages, total), dim=-1).indices.sort(dim=-1).values  # [B, H, K] in context order
        chosen_ok = filled.gather(-1, chosen)
        offsets = torch.arange(self.page, device=score.device)
        slots, ok = self.ranks.columns((chosen.unsqueeze(-1) * self.page + offsets).flatten(2))
        ok = ok & chosen_ok.repeat_interleave(self.page, dim=-1)
        return _with_newest(self, slots, ok, store.length - 1)


def _with_newest(policy, slots: torch.Tensor, ok: torch.Tensor, newest: int) -> ReadPlan:
    """A read plan of ``slots [B, H, K]`` (where ``ok``) and the newest slot; records how much it reads."""
    b, h, _ = slots.shape
    last = torch.full((b, h, 1), newest, dtype=torch.long, device=slots.device)
    valid = torch.cat([ok, torch.ones_like(last, dtype=torch.bool)], dim=-1)
    policy.last_read = int(valid.sum(-1).max())
    return ReadPlan(torch.cat([slots, last], dim=-1), valid)


def attention_mass(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``[B, H, S]`` attention each slot gets from one decode query, summed over the ``G`` query heads that
    share its KV head (each head's softmax over the valid slots): ``query [B, H * G, D]``, ``keys [B, H, S,
    D]``, ``valid [B, 1 | H, S]`` or None."""
    b, h, _, d = keys.shape
    scores = torch.einsum("bhgd,bhsd->bhgs", query.float().view(b, h, -1, d), keys.float()) * scaling
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    return scores.softmax(-1).sum(2)


class SelectionPolicy(LayerPolicy):
    """What token-level selectors share: per row, a selection of older slots (``selected [B, H, K]`` store
    columns, ``chosen [B, H, K]`` valid flags) made at one step (``since [B]``: the store length then) and
    read, with every slot appended since, until that row's next selection. Any move of the store's slots
    (its ``version``) forces a new selection for every row."""

    def __init__(self, budget: Budget, follow: bool = False) -> None:
        self.budget = budget
        self.follow = follow  # a reused selection also reads each selected slot's successor, k steps on
        self.selected: torch.Tensor | None = None
        self.chosen: torch.Tensor | None = None
        self.since: torch.Tensor | None = None
        self.version = -1
        self.last_read = 0  # slots the last step read per (row, head), at most
        self.selections = 0  # row selections made (each scores the whole cache)
        self.chose_bytes = 0

    def before_attend(self, store: DenseStore, step: Step) -> ReadPlan | None:
        self.chose_bytes = 0
        if step.phase != "decode" or step.tokens != 1:
            return None
        older = store.length - 1
        keep = self._keep(older)
        if older <= keep:
            return None
        if store.split:
            raise ValueError(
                f"{type(self).__name__} selects per KV head in a cache whose heads share one slot count; a "
                "per-head budget (adakv) splits them"
            )
        b = step.queries.shape[0]
        fresh = self.selected is None or store.version != self.version
        due = torch.ones(b, dtype=torch.bool, device=step.queries.device) if fresh else self._due(step)
        if bool(due.any()):
            return self._select(store, step, keep, due)
        return self._plan(store)

    def selection_bytes(self) -> int:
        return self.chose_bytes

    def _keep(self, cached: int) -> int:
        if self.budget.tokens is not None:
            return self.budget.tokens
        return max(cached - math.floor(cached * self.budget.ratio), 1)

    def _due(self, step: Step) -> torch.Tensor:
        """``[B]``: rows that make a new selection at this step."""
        raise NotImplementedError

    def _select(self, store: DenseStore, step: Step, keep: int, rows: torch.Tensor) -> ReadPlan | None:
        raise NotImplementedError

    def _remember(self, store: DenseStore, step: Step, keep: int, rows: torch.Tensor) -> None:
        """Select, for ``rows [B]``, the ``keep`` older slots that get the most attention mass from this
        step's query, per KV head; the other rows keep their selection."""
        older = store.length - 1
        keys, valid = _span(store, 0, older)
        self.chose_bytes += keys.nbytes
        b = keys.shape[0]
        mass = attention_mass(step.queries[:, :, 0], keys, valid, step.scaling)
        keep = max(keep // 2, 1) if self.follow else keep  # with the successors, the read stays within budget
        top = mass.masked_fill(~valid, float("-inf")).topk(min(keep, older), dim=-1).indices.sort(dim=-1).values
        chosen = valid.gather(-1, top)
        since = torch.full((b,), older, dtype=torch.long, device=keys.device)
        if self.selected is not None and store.version == self.version and not bool(rows.all()):
            width = max(top.shape[-1], self.selected.shape[-1])
            top, old = _pad(top, width, 0), _pad(self.selected, width, 0)
            chosen, old_chosen = _pad(chosen, width, False), _pad(self.chosen, width, False)
            pick = rows.view(b, 1, 1)
            top, chosen = torch.where(pick, top, old), torch.where(pick, chosen, old_chosen)
            since = torch.where(rows, since, self.since)
        self.selected, self.chosen, self.since, self.version = top, chosen, since, store.version
        self.selections += int(rows.sum())

    def _plan(self, store: DenseStore) -> ReadPlan:
        """Each row's selection plus every slot appended since it was made (this step's token included); with
        ``follow``, also the slot ``k`` columns after each selected one, ``k`` decode steps after the selection."""
        b, h, _ = self.selected.shape
        selected, chosen = self.selected, self.chosen
        if self.follow:
            selected, chosen = _with_successors(store, selected, chosen, self.since)
        recent = torch.arange(int(self.since.min()), store.length, device=self.selected.device)
        fresh = (recent.view(1, -1) >= self.since.view(-1, 1)).view(b, 1, -1).expand(b, h, -1)
        indices = torch.cat([selected, recent.expand(b, h, -1)], dim=-1)
        valid = torch.cat([chosen, fresh], dim=-1)
        self.last_read = int(valid.sum(-1).max())
        return ReadPlan(indices, valid)

    def map_batch(self, fn) -> None:
        if self.selected is not None:
            self.selected, self.chosen, self.since = fn(self.selected), fn(self.chosen), fn(self.since)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.selected, self.chosen, self.since) if t is not None)


def _with_successors(
    store: DenseStore, selected: torch.Tensor, chosen: torch.Tensor, since: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``selected [B, H, K]`` (valid where ``chosen``) joined with each selected column moved ``k`` columns on,
    ``k`` being the decode steps since the selection (``store.length - 1 - since [B]``), where that column is
    older than the selection and holds a token; each column appears once (sorted, duplicates invalid).

    Why: a head that copies (an induction head reading a needle's digits) attends one token further at every
    step, so a selection made ``k`` steps ago points ``k`` tokens short of what it now needs."""
    b = selected.shape[0]
    last = since.view(b, 1, 1)
    moved = selected + (store.length - 1 - last)
    inside = chosen & (moved < last)
    width = int(since.max())  # the columns any row's selection was made from
    inside = inside & _validity(store, 0, width).gather(-1, moved.clamp(max=width - 1))
    columns, valid = _once(torch.cat([selected, moved], dim=-1), torch.cat([chosen, inside], dim=-1))
    return columns.masked_fill(~valid, 0), valid


def _moved(step: Step, then: torch.Tensor, similar: float) -> torch.Tensor:
    """``[B]``: rows whose decode query (all query heads, flattened) has a cosine below ``similar`` to
    ``then [B, Hq * D]``, the query that made their selection."""
    now = step.queries[:, :, 0].flatten(1).float()
    return torch.nn.functional.cosine_similarity(now, then, dim=-1) < similar


def _queries_of(step: Step, rows: torch.Tensor, then: torch.Tensor | None) -> torch.Tensor:
    """``then [B, Hq * D]`` with the ``rows [B]`` replaced by this step's decode queries."""
    now = step.queries[:, :, 0].flatten(1).float()
    return now if then is None else torch.where(rows.view(-1, 1), now, then)


def _pad(t: torch.Tensor, width: int, fill) -> torch.Tensor:
    """``t [B, H, K]`` padded with ``fill`` to ``width`` entries on the last axis."""
    if t.shape[-1] == width:
        return t
    return torch.cat([t, t.new_full((*t.shape[:2], width - t.shape[-1]), fill)], dim=-1)


@dataclass(frozen=True, eq=False)
class TokenSelect(SparseReader):
    """TokenSelect: each decode query reads, per KV head, the ``budget`` older tokens with the most attention
    (its query heads' softmax scores summed: a soft vote), plus its own token; a query close to the one that
    made the last selection (cosine >= ``similar``) reuses it, with the tokens appended since.

    Wu et al., 2024 (arXiv 2411.02886): "up to 23.84x speedup in attention computation and up to 2.28x
    acceleration in end-to-end latency". The paper votes across all heads of a layer for one shared selection;
    here the heads sharing a KV head vote (grouped-query attention), so each KV head reads its own tokens.
    Scoring reads every cached key (not the values). The selection cache is per row: a row whose query moved
    away selects again, the others read on (``similar=1.0``: every step selects). A budget at or above the
    cache reads everything (exactly full attention)."""

    name = "tokenselect"
    paper = "Wu et al., 2024, TokenSelect, https://arxiv.org/abs/2411.02886"
    budget: Budget | None = param(  # noqa: RUF009 - a frozen Budget is a safe shared default
        "older tokens each decode query reads (budget=N), or the fraction it skips (0.875 reads 1/8)",
        Budget(tokens=2048),
    )
    similar: float = param("reuse the last selection while the query's cosine to its query is >= this", 0.9)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("tokenselect: similar (cosine)", self.similar, -1.0, 1.0)

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return TokenSelectPolicy(self)


class TokenSelectPolicy(SelectionPolicy):
    def __init__(self, method: TokenSelect) -> None:
        super().__init__(method.budget)
        self.similar = method.similar
        self.query: torch.Tensor | None = None  # [B, Hq * D]: the query that made each row's selection

    def _due(self, step: Step) -> torch.Tensor:
        return _moved(step, self.query, self.similar)

    def _select(self, store: DenseStore, step: Step, keep: int, rows: torch.Tensor) -> ReadPlan:
        self._remember(store, step, keep, rows)
        self.query = _queries_of(step, rows, self.query)
        return self._plan(store)

    def map_batch(self, fn) -> None:
        super().map_batch(fn)
        self.query = None if self.query is None else fn(self.query)

    def nbytes(self) -> int:
        return super().nbytes() + (0 if self.query is None else self.query.nbytes)


@dataclass(frozen=True, eq=False)
class Recycled(SparseReader):
    """Recycled Attention: a full step reads the whole cache, and the ``budget`` tokens it attended to most
    (summed over the query heads of each KV head) are what the steps after it read, with every token appended
    since, until the next full step: ``every`` decode steps later, or, with ``similar`` set, as soon as the
    decode query's cosine to the full step's query falls below ``similar`` (the paper's dynamic schedule).

    Xu et al., 2024 (arXiv 2411.05787): on RULER and long-context language modelling, "comparable speedup to
    baselines which only consider local context while improving the performance by 2x"; the paper also decides
    "when to perform recycled or full attention step based on the query similarities". Here each layer
    compares its own query (all query heads, flattened), per row: a row whose query moved reads everything
    while the others read their selection. The full step's attention weights are computed beside the attention
    itself (a fused kernel would return them), so a full step counts the bytes of the full read only. A budget
    at or above the cache reads everything (exactly full attention).

    ``follow=true`` (our addition, not the paper's): a head that copies a span (an induction head reading a
    needle's digits) attends one token further at every step, so a selection made ``k`` steps ago points ``k``
    tokens short of what the head now needs; on SmolLM2-135M-Instruct a selection one step old already loses
    the needle's next digit (``benchmarks/results/decode_sparse.md``). With ``follow`` the full step keeps the
    top ``budget/2`` tokens and a partial step ``k`` steps later reads each of them and the token ``k`` slots
    after it."""

    name = "recycled"
    paper = "Xu et al., 2024, Recycled Attention, https://arxiv.org/abs/2411.05787"
    budget: Budget | None = param(  # noqa: RUF009 - a frozen Budget is a safe shared default
        "older tokens the partial steps read (budget=N), or the fraction they skip (0.875 reads 1/8)",
        Budget(tokens=2048),
    )
    every: int = param("one full-attention step at least every this many decode steps", 16)
    similar: float | None = param(
        "also a full step when the query's cosine to the last full step's query is below this; None = fixed schedule",
        None,
    )
    follow: bool = param(
        "a partial step k steps after the full step also reads each kept token's k-th successor; the full step "
        "keeps budget/2 tokens so the read stays within the budget (not in the paper: see the class docstring)",
        False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("recycled: every", self.every, 1)
        if not isinstance(self.follow, bool):
            raise ValueError(f"recycled: follow must be true or false, got {self.follow!r}")
        if self.similar is not None:
            check_number("recycled: similar (cosine)", self.similar, -1.0, 1.0)

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return RecycledPolicy(self)


class RecycledPolicy(SelectionPolicy):
    def __init__(self, method: Recycled) -> None:
        super().__init__(method.budget, method.follow)
        self.every, self.similar = method.every, method.similar
        self.steps: torch.Tensor | None = None  # [B] decode steps since each row's last full step
        self.query: torch.Tensor | None = None  # [B, Hq * D] the query of each row's last full step

    def before_attend(self, store: DenseStore, step: Step) -> ReadPlan | None:
        plan = super().before_attend(store, step)
        if step.phase == "decode" and step.tokens == 1 and self.steps is not None:
            self.steps = self.steps + 1
        return plan

    def _due(self, step: Step) -> torch.Tensor:
        rows = step.queries.shape[0]  # a cache saved before per-row counts holds one int for every row
        due = torch.as_tensor(self.steps, device=step.queries.device).expand(rows) >= self.every
        if self.similar is not None:
            due = due | _moved(step, self.query, self.similar)
        return due

    def _select(self, store: DenseStore, step: Step, keep: int, rows: torch.Tensor) -> ReadPlan | None:
        """The full step of ``rows``: they read everything and keep their top tokens for the next steps; the
        other rows read their selection (None when every row reads everything)."""
        self._remember(store, step, keep, rows)
        self.chose_bytes = 0  # the weights come with the full read itself (a fused kernel returns them)
        self.query = _queries_of(step, rows, self.query)
        if self.steps is None:
            self.steps = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
        self.steps = torch.where(rows, 0, self.steps)
        if bool(rows.all()):
            self.last_read = store.length
            return None
        return self._with_full_rows(store, rows)

    def _with_full_rows(self, store: DenseStore, rows: torch.Tensor) -> ReadPlan:
        """Every store column, valid where a full row holds a token or a selective row's plan reads it."""
        partial = self._plan(store)
        b, h, _ = partial.indices.shape
        read = torch.where(rows.view(b, 1, 1), _validity(store, 0, store.length), partial.covers(store.length))
        self.last_read = int(read.sum(-1).max())
        columns = torch.arange(store.length, device=rows.device)
        return ReadPlan(columns.expand(b, h, -1), read)

    def map_batch(self, fn) -> None:
        super().map_batch(fn)
        if self.steps is not None:
            self.steps = fn(self.steps)
        if self.query is not None:
            self.query = fn(self.query)

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.nbytes for t in (self.steps, self.query) if t is not None)


OFFLOADS = ("none", "cpu")
VOTES = ("layer", "head")


@dataclass(frozen=True, eq=False)
class InfLLM(SparseReader):
    """InfLLM: every decode query reads the first ``sink`` tokens, the newest ``local`` tokens, and the memory
    blocks of ``block`` tokens between them whose representative keys score highest, up to ``budget`` tokens.

    Xiao et al., 2024 (arXiv 2402.04617): a sliding window plus "memory units" looked up per step, "without
    any training", up to "1,024K" tokens. A block leaves the local window whole; its ``reps`` representative
    tokens are those the queries of that moment score highest (summed ``q . k`` over the query heads of the KV
    head: the prompt's last ``observe`` queries for blocks formed at the prompt's end, the decode query for
    blocks formed later; the paper scores with the local window's queries). A block's relevance to a query is
    the sum of ``q . k`` over its representatives and over the query heads of the whole layer
    (``vote=layer``, as in the paper's code: every head reads the same blocks) or of its KV head only
    (``vote=head``: each KV head reads its own blocks). Tokens between the last
    whole block and the local window are read too, so a query reads at most ``budget + block - 1`` tokens.
    A budget at or above the cache reads everything (exactly full attention).

    ``offload=cpu``: as in the paper, the memory blocks live in host memory and each step copies to the
    device only the slots it reads there (:class:`~contextlab.store.offload.OffloadStore`: the newest
    ``max(local + block, budget + 1)`` slots stay on the device, so a step that reads everything never
    copies from the host; older ones move to the host a block at a time; the bytes copied are counted).
    The selection and the output are the same as with ``offload=none``. Not from the paper: its GPU-side
    cache of recently used blocks (every step copies what it reads). Offloading is the
    storage of the cache, so it does not compose with a quantized store. When the cache already lives in
    host memory (a CPU-only run) it does nothing and says so."""

    name = "infllm"
    tokens_only = True
    paper = "Xiao et al., 2024, InfLLM, https://arxiv.org/abs/2402.04617"
    budget: Budget | None = param(  # noqa: RUF009 - a frozen Budget is a safe shared default
        "tokens each decode query reads: sink + local + the selected blocks (budget=N)", Budget(tokens=2048)
    )
    block: int = param("tokens per memory block", 128)
    sink: int = param("first tokens always read", 4)
    local: int = param("newest tokens always read (the query's own included)", 1024)
    reps: int = param("representative tokens per block", 4)
    observe: int = param("prompt queries that pick the representatives of blocks formed at the prompt's end", 32)
    offload: str = param("none | cpu (memory blocks in host memory, the read slots copied per step)", "none")
    vote: str = param("layer (all heads of a layer pick the same blocks, as the paper) | head (each KV head)", "layer")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vote not in VOTES:
            raise ValueError(f"infllm: vote must be one of {VOTES}, got {self.vote!r}")
        check_int("infllm: block", self.block, 1)
        check_int("infllm: sink", self.sink, 0)
        check_int("infllm: local", self.local, 1)
        check_int("infllm: observe", self.observe, 1)
        check_int("infllm: reps (representatives per block)", self.reps, 1)
        if self.reps > self.block:
            raise ValueError(f"infllm: reps ({self.reps}) cannot exceed the block size ({self.block})")
        if self.offload not in OFFLOADS:
            raise ValueError(f"infllm: offload must be one of {OFFLOADS}, got {self.offload!r}")
        if self.budget.tokens < self.sink + self.local + self.block:
            raise ValueError(
                f"infllm: a budget of {self.budget.tokens} tokens leaves no room for one block: it must be at least "
                f"sink + local + block = {self.sink} + {self.local} + {self.block} = "
                f"{self.sink + self.local + self.block}"
            )

    @property
    def roles(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({READ_SELECTION, STORAGE}) if self.offload != "none" else frozenset({READ_SELECTION})

    @property
    def blocks_read(self) -> int:
        return (self.budget.tokens - self.sink - self.local) // self.block

    def make_store(self, tracker: MemoryTracker, rope: Rope | None = None) -> DenseStore | None:
        if self.offload == "none":
            return None
        # Until more than ``budget`` tokens are cached a step reads everything (no plan): host-held slots
        # would all be copied back every step, so the device keeps at least budget + 1 of them.
        resident = max(self.local + self.block, self.budget.tokens + 1)
        return OffloadStore(resident, self.block, tracker, host=self.offload)

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return InfLLMPolicy(self)


class InfLLMPolicy(LayerPolicy):
    """Representative keys of the memory blocks of one layer (``reps [B, H, N, R, D]``; ``formed [B, H]``
    blocks so far per row and KV head) beside the :class:`RankTable` of its slots."""

    def __init__(self, method: InfLLM) -> None:
        self.method = method
        self.ranks = RankTable("infllm", method.block)
        self.reps: torch.Tensor | None = None
        self.formed: torch.Tensor | None = None
        self.last_read = 0
        self.chose_bytes = 0

    def before_attend(self, store: DenseStore, step: Step) -> ReadPlan | None:
        self.chose_bytes = 0
        if step.phase != "decode" or step.tokens != 1 or store.length <= self.method.budget.tokens:
            return None
        self._sync(store, store.length - 1, step.queries)
        return self._plan(store, step)

    def selection_bytes(self) -> int:
        return self.chose_bytes

    def after_forward(self, store: DenseStore, step: Step) -> None:
        """Form the prompt's blocks once it is in, with its last queries (when the cache passes the budget)."""
        if step.phase == "prompt_end" and store.length > self.method.budget.tokens:
            self._sync(store, store.length, step.queries[:, :, -self.method.observe :])

    def map_batch(self, fn) -> None:
        self.ranks.map_batch(fn)
        if self.reps is not None:
            self.reps, self.formed = fn(self.reps), fn(self.formed)

    def nbytes(self) -> int:
        return self.ranks.nbytes() + sum(t.nbytes for t in (self.reps, self.formed) if t is not None)

    # -- blocks -----------------------------------------------------------------------------------------------
    def _sync(self, store: DenseStore, upto: int, queries: torch.Tensor) -> None:
        """Number columns ``[0, upto)`` and form every block that has left the local window since."""
        if self.ranks.stale(store, upto):
            self.reps = self.formed = None
        self.ranks.sync(store, upto)
        m = self.method
        ready = ((self.ranks.counts - (m.local - 1) - m.sink).clamp(min=0) // m.block).clamp(min=0)  # [B, H]
        g = store.groups[0]
        b, h, _, d = g.keys.shape
        if self.reps is None:
            self.reps = g.keys.new_zeros(b, h, 0, m.reps, d)
            self.formed = torch.zeros(b, h, dtype=torch.long, device=g.keys.device)
        top = int(ready.max())
        if top > self.reps.shape[2]:
            more = g.keys.new_zeros(b, h, top - self.reps.shape[2], m.reps, d)
            self.reps = torch.cat([self.reps, more], dim=2)
        for index in range(int(self.formed.min()), top):
            rows = (self.formed <= index) & (index < ready)  # [B, H] rows and heads that form this block now
            if bool(rows.any()):
                self.reps[:, :, index] = torch.where(
                    rows[..., None, None], self._representatives(g, queries, index), self.reps[:, :, index]
                )
        self.formed = torch.maximum(self.formed, ready)

    def _representatives(self, g: SlotGroup, queries: torch.Tensor, index: int) -> torch.Tensor:
        """``[B, H, R, D]``: the keys of block ``index`` that ``queries [B, Hq, T, D]`` score highest."""
        m = self.method
        b, h, _, d = g.keys.shape
        ranks = m.sink + index * m.block + torch.arange(m.block, device=g.keys.device)
        slots, ok = self.ranks.columns(ranks.expand(b, h, -1))
        block, _ = g.gather(slots, values=False)  # [B, H, block, D]
        self.chose_bytes += block.nbytes
        q = queries.float().view(b, h, -1, queries.shape[2], d)  # [B, H, G, T, D]
        score = torch.einsum("bhgtd,bhsd->bhs", q, block.float()).masked_fill(~ok, float("-inf"))
        best = score.topk(m.reps, dim=-1).indices.sort(dim=-1).values
        return block.gather(2, best.unsqueeze(-1).expand(b, h, m.reps, d))

    def _plan(self, store: DenseStore, step: Step) -> ReadPlan:
        m = self.method
        counts = self.ranks.counts  # [B, H] older tokens numbered
        b, h = counts.shape
        device = counts.device
        d = self.reps.shape[-1]
        query = step.queries[:, :, 0].float().view(b, h, -1, d)  # [B, H, G, D]
        relevance = torch.einsum("bhgd,bhnrd->bhn", query, self.reps.float())  # [B, H, N]
        self.chose_bytes += self.reps.nbytes
        formed = torch.arange(self.reps.shape[2], device=device) < self.formed.unsqueeze(-1)
        relevance = relevance.masked_fill(~formed, float("-inf"))
        if m.vote == "layer":  # one choice per row: the blocks' relevance summed over every KV head
            relevance = relevance.sum(1, keepdim=True).expand(b, h, -1)
        take = min(m.blocks_read, self.reps.shape[2])
        chosen = relevance.topk(take, dim=-1).indices.sort(dim=-1).values  # [B, H, K]
        chosen_ok = formed.gather(-1, chosen)
        block_ranks = (m.sink + chosen.unsqueeze(-1) * m.block + torch.arange(m.block, device=device)).flatten(2)
        # the sinks, then everything after the last formed block (the local window and a partial block)
        tail_start = m.sink + self.formed * m.block  # [B, H]
        tail = tail_start.unsqueeze(-1) + torch.arange(m.local - 1 + m.block - 1, device=device)
        sinks = torch.arange(m.sink, device=device).expand(b, h, -1)
        ranks = torch.cat([sinks, block_ranks, tail], dim=-1)
        slots, ok = self.ranks.columns(ranks)
        ok = ok & torch.cat(
            [
                torch.ones_like(sinks, dtype=torch.bool),
                chosen_ok.repeat_interleave(m.block, dim=-1),
                ok.new_ones(tail.shape),
            ],
            dim=-1,
        )
        return _with_newest(self, slots, ok, store.length - 1)


INDEXES = ("ivf", "exact")
SEARCH_VOTES = ("sum", "head")


@dataclass(frozen=True, eq=False)
class Retrieval(SparseReader):
    """RetrievalAttention: the prompt's keys are indexed for maximum-inner-product search once it is in; each
    decode query reads the first ``sink`` tokens, everything after the indexed part (the newest ``local``
    prompt tokens and the answer so far), and the indexed keys the search returns, up to ``budget`` tokens.

    Liu et al., 2024 (arXiv 2409.10516): approximate nearest-neighbour search over keys kept in CPU memory
    serves "128K tokens in LLMs with 8B parameters" on a 24 GB GPU. ``index=ivf``: an inverted file built
    here per row and KV head (k-means on the keys, ``clusters`` lists, 0 = about the square root of the
    indexed tokens; a query probes the ``probe`` lists whose centroids score highest and ranks their keys
    exactly); ``index=exact``: every indexed key is ranked (the search's upper bound). A search reads the
    centroids, the probed lists and their keys only.

    ``vote=sum`` searches and ranks with the KV head's query heads summed into one query (the sum of their
    scores). ``vote=head``: each query head probes its own ``probe`` lists (a list probed twice is read
    once) and the candidates are ranked by the heads' softmax over them, summed (TokenSelect's soft vote,
    arXiv 2411.02886), so one sharp retrieval head is not outvoted by the raw scores of its neighbours.
    ``follow=true`` (our addition, not the paper's; the reason is Recycled's ``follow``): each search also
    ranks the successor of every indexed key the previous search retrieved, since a head copying a span
    wants the token after the one it read last.

    Not implemented from the paper: its attention-aware graph index for out-of-distribution queries, and
    keeping the index in host memory. (An inverted file whose lists were built from sampled prompt queries
    and their top keys, tried as a stand-in, read less of full attention's weight than ``ivf`` and found
    fewer needles on SmolLM2; see the README's notes on sparse reads.) A budget at or above the cache reads
    everything (exactly full attention)."""

    name = "retrieval"
    tokens_only = True
    paper = "Liu et al., 2024, RetrievalAttention, https://arxiv.org/abs/2409.10516"
    budget: Budget | None = param(  # noqa: RUF009 - a frozen Budget is a safe shared default
        "tokens each decode query reads: sink + local + the retrieved keys (budget=N)", Budget(tokens=2048)
    )
    index: str = param("ivf (inverted file, k-means) | exact (rank every indexed key)", "ivf")
    clusters: int = param("ivf lists per row and KV head; 0 = about sqrt(indexed tokens)", 0)
    probe: int = param("ivf lists searched per query", 8)
    sink: int = param("first tokens always read", 4)
    local: int = param("newest prompt tokens left out of the index (always read)", 64)
    iterations: int = param("k-means iterations when the index is built", 10)
    vote: str = param(
        "sum (search and rank with the KV head's query heads summed) | head (each query head probes its own "
        "lists; candidates ranked by the heads' softmax over them, summed)",
        "sum",
    )
    follow: bool = param("also rank the successor of every key the previous search retrieved (ivf)", False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.index not in INDEXES:
            raise ValueError(f"retrieval: index must be one of {INDEXES}, got {self.index!r}")
        if self.vote not in SEARCH_VOTES:
            raise ValueError(f"retrieval: vote must be one of {SEARCH_VOTES}, got {self.vote!r}")
        if not isinstance(self.follow, bool):
            raise ValueError(f"retrieval: follow must be true or false, got {self.follow!r}")
        for name, low in (("clusters", 0), ("probe", 1), ("sink", 0), ("local", 1), ("iterations", 1)):
            check_int(f"retrieval: {name}", getattr(self, name), low)
        if self.budget.tokens <= self.sink + self.local:
            raise ValueError(
                f"retrieval: a budget of {self.budget.tokens} tokens leaves nothing to retrieve beside sink + local = "
                f"{self.sink + self.local}; raise the budget"
            )

    @property
    def retrieved(self) -> int:
        return self.budget.tokens - self.sink - self.local

    def build(self, layer_idx: int, num_layers: int) -> LayerPolicy:
        return RetrievalPolicy(self)


class RetrievalPolicy(LayerPolicy):
    """The index of one layer's prompt keys: ranks ``[sink, indexed)`` of every row and KV head. ivf: their
    ``centroids [B, H, C, D]`` and inverted lists, ``members [B, H, M]`` (indexed ranks minus ``sink``, list
    by list, invalid ones last) with ``starts [B, H, C + 1]`` (where each list begins in ``members``)."""

    def __init__(self, method: Retrieval) -> None:
        self.method = method
        self.ranks = RankTable("retrieval", 64)
        self.indexed: torch.Tensor | None = None  # [B, H] ranks below this (and from sink) are in the index
        self.centroids: torch.Tensor | None = None
        self.members: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None
        self.found: torch.Tensor | None = None  # [B, H, K] ranks the last search retrieved (follow), -1 = none
        self.last_read = 0
        self.last_scanned = 0  # indexed keys ranked exactly by the last search (per row and head, at most)
        self.chose_bytes = 0

    def after_forward(self, store: DenseStore, step: Step) -> None:
        if step.phase == "prompt_end" and store.length > self.method.budget.tokens:
            self._build(store, store.length)

    def before_attend(self, store: DenseStore, step: Step) -> ReadPlan | None:
        self.chose_bytes = 0
        if step.phase != "decode" or step.tokens != 1 or store.length <= self.method.budget.tokens:
            return None
        if self.indexed is None or self.ranks.stale(store, store.length - 1):
            self._build(store, store.length - 1)  # counts the keys it clusters in chose_bytes
        else:
            self.ranks.sync(store, store.length - 1)
        return self._plan(store, step)

    def selection_bytes(self) -> int:
        return self.chose_bytes

    def map_batch(self, fn) -> None:
        self.ranks.map_batch(fn)
        for name in ("indexed", "centroids", "members", "starts", "found"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def nbytes(self) -> int:
        state = (self.indexed, self.centroids, self.members, self.starts, self.found)
        return self.ranks.nbytes() + sum(t.nbytes for t in state if t is not None)

    # -- the index --------------------------------------------------------------------------------------------
    def _build(self, store: DenseStore, upto: int) -> None:
        """Index ranks ``[sink, count - local)`` of every row and KV head (the cache's tokens up to ``upto``)."""
        m = self.method
        self.ranks.sync(store, upto)
        self.indexed = (self.ranks.counts - m.local).clamp(min=m.sink)
        self.found = None  # ranks numbered before are no anchors for successors now
        if m.index == "exact":
            return
        width = max(int(self.indexed.max()) - m.sink, 0)
        keys, valid = self._keys(store, m.sink + torch.arange(width, device=self.indexed.device))
        self.chose_bytes += keys.nbytes * m.iterations  # each Lloyd iteration reads every indexed key
        size = int(valid.sum(-1).max())
        clusters = m.clusters or max(1, round(math.sqrt(size)))
        self.centroids, lists = kmeans(keys.float(), valid, clusters, m.iterations)
        lists = lists.masked_fill(~valid, clusters)  # invalid entries sort after every list
        self.members = lists.argsort(dim=-1, stable=True).to(torch.int32)
        sizes = torch.zeros_like(self.centroids[..., 0], dtype=torch.long).scatter_add_(
            -1, lists.clamp(max=clusters - 1), valid.long()
        )
        self.starts = torch.cat([sizes.new_zeros(*sizes.shape[:2], 1), sizes.cumsum(-1)], dim=-1).to(torch.int32)

    def _keys(self, store: DenseStore, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``[B, H, K, D]`` of ``ranks`` (``[K]`` or ``[B, H, K]``) and whether each is an indexed token."""
        b, h = self.indexed.shape
        ranks = ranks.expand(b, h, -1)
        slots, ok = self.ranks.columns(ranks)
        ok = ok & (ranks >= self.method.sink) & (ranks < self.indexed.unsqueeze(-1))
        keys, _ = store.groups[0].gather(slots, values=False)
        return keys, ok

    def _probed(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranks ``[B, H, T]`` in the lists probed for ``query [B, H, G, D]`` (each of the ``G`` queries
        probes the ``probe`` lists whose centroids score highest for it; a list probed twice is read once),
        read from the inverted lists only, and which of them exist (lists differ in size)."""
        near = torch.einsum("bhgd,bhcd->bhgc", query, self.centroids)
        top = near.topk(min(self.method.probe, near.shape[-1]), dim=-1).indices  # [B, H, G, P]
        chosen = torch.zeros_like(near[:, :, 0], dtype=torch.bool).scatter_(-1, top.flatten(2), True)  # [B, H, C]
        probed = (~chosen).long().argsort(dim=-1, stable=True)[..., : int(chosen.sum(-1).max())]
        first = self.starts[..., :-1].long().gather(-1, probed)
        sizes = (self.starts[..., 1:].long().gather(-1, probed) - first) * chosen.gather(-1, probed)  # [B, H, P]
        ends = sizes.cumsum(-1)
        total = int(ends[..., -1].max())
        t = torch.arange(total, device=query.device)
        which = (t.view(1, 1, -1, 1) >= ends.unsqueeze(-2)).sum(-1).clamp(max=probed.shape[-1] - 1)  # [B, H, T]
        at = first.gather(-1, which) + t - (ends - sizes).gather(-1, which)
        exists = t < ends[..., -1:]
        members = self.members.long().gather(-1, at.clamp(0, self.members.shape[-1] - 1))
        return self.method.sink + members, exists

    def _plan(self, store: DenseStore, step: Step) -> ReadPlan:
        m = self.method
        b, h = self.indexed.shape
        d = store.groups[0].keys.shape[-1]
        heads = step.queries[:, :, 0].float().view(b, h, -1, d)  # [B, H, G, D]
        query = heads.sum(2)  # [B, H, D]: the heads' summed query
        if m.index != "exact" and self.centroids is not None:
            candidates, exists = self._probed(heads if m.vote == "head" else query.unsqueeze(2))
            if self.found is not None:  # follow: the successors of what the last search retrieved, each once
                candidates = torch.cat([candidates, self.found + 1], dim=-1)
                candidates, exists = _once(candidates, torch.cat([exists, self.found >= 0], dim=-1))
        else:
            width = max(int(self.indexed.max()) - m.sink, 0)
            candidates = m.sink + torch.arange(width, device=query.device).expand(b, h, -1)
            exists = torch.ones_like(candidates, dtype=torch.bool)
        keys, ok = self._keys(store, candidates)
        ok = ok & exists
        self.last_scanned = int(ok.sum(-1).max())
        self.chose_bytes += keys.nbytes + (0 if self.centroids is None else self.centroids.nbytes)
        if m.vote == "head":  # each query head's softmax over the candidates, summed (TokenSelect's soft vote)
            scores = attention_mass(heads.flatten(1, 2), keys, ok, step.scaling).masked_fill(~ok, float("-inf"))
        else:
            scores = torch.einsum("bhd,bhmd->bhm", query, keys.float()).masked_fill(~ok, float("-inf"))
        found = scores.topk(min(m.retrieved, scores.shape[-1]), dim=-1).indices
        found_ok = ok.gather(-1, found)
        found = candidates.gather(-1, found)
        if m.follow and m.index != "exact":
            self.found = torch.where(found_ok, found, -1)
        found = torch.where(found_ok, found, torch.iinfo(found.dtype).max).sort(dim=-1).values  # context order
        found_ok = found < torch.iinfo(found.dtype).max
        extra = int((self.ranks.counts - self.indexed).max())  # ranks past the index: local window, answer
        tail = self.indexed.unsqueeze(-1) + torch.arange(extra, device=query.device)
        sinks = torch.arange(m.sink, device=query.device).expand(b, h, -1)
        slots, exist = self.ranks.columns(torch.cat([sinks, found.clamp(max=2**31 - 1), tail], dim=-1))
        chosen = torch.cat([exist.new_ones(sinks.shape), found_ok, exist.new_ones(tail.shape)], dim=-1)
        return _with_newest(self, slots, exist & chosen, store.length - 1)


def _once(ranks: torch.Tensor, exists: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ranks [B, H, T]`` sorted, each existing rank once (its repeats, and what did not exist, flagged off)."""
    last = torch.iinfo(ranks.dtype).max
    ranks = torch.where(exists, ranks, last).sort(dim=-1).values
    repeat = torch.zeros_like(exists)
    repeat[..., 1:] = ranks[..., 1:] == ranks[..., :-1]
    return ranks.clamp(max=2**31 - 1), (ranks < last) & ~repeat


def kmeans(
    points: torch.Tensor, valid: torch.Tensor, clusters: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means per row and head: ``points [B, H, M, D]`` (``valid [B, H, M]``) into ``clusters``
    centroids ``[B, H, C, D]`` and each point's list ``[B, H, M]`` (long). Deterministic: the centroids start
    at evenly spaced valid points; a list that empties keeps its centroid."""
    b, h, m, d = points.shape
    rank = valid.long().cumsum(-1) - 1  # [B, H, M]
    size = valid.sum(-1, keepdim=True).clamp(min=1)  # [B, H, 1]
    wanted = (torch.arange(clusters, device=points.device) * size) // clusters  # [B, H, C] ranks to start from
    first = torch.where(valid, rank, m).unsqueeze(-2) == wanted.unsqueeze(-1)  # [B, H, C, M]
    start = first.float().argmax(-1)  # index of each starting point
    centroids = points.gather(2, start.unsqueeze(-1).expand(b, h, clusters, d))
    lists = torch.zeros(b, h, m, dtype=torch.long, device=points.device)
    for _ in range(iterations):  # squared distances, without the points' own norms: [B, H, M, C]
        distance = centroids.pow(2).sum(-1).unsqueeze(2) - 2 * points @ centroids.transpose(-1, -2)
        lists = distance.argmin(-1)
        weight = valid.float().unsqueeze(-1)
        sums = torch.zeros_like(centroids).scatter_add_(2, lists.unsqueeze(-1).expand(b, h, m, d), points * weight)
        counts = torch.zeros(b, h, clusters, device=points.device).scatter_add_(2, lists, valid.float())
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), centroids)
    return centroids, lists
