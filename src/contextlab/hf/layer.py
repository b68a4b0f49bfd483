"""The contextlab cache layer: a transformers ``DynamicLayer`` that owns a store and calls a policy.

The layer never decides anything: it appends keys and values to its :class:`~contextlab.store.DenseStore`,
records which new slots are real tokens, asks its :class:`~contextlab.methods.policy.LayerPolicy` what to
read, attends, and hands the forward to the policy (which may evict).

Lengths: ``get_seq_length()`` is LOGICAL (tokens seen, which sets positions). ``get_mask_sizes()`` makes
transformers build a mask over the new tokens only; the layer learns from it which new tokens are padding
and builds each forward's mask from the validity the store keeps for older slots (see
:meth:`ContextlabLayer.attend`). So eviction at any time, per head and per row, needs nothing from
transformers' own mask of the past.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from contextlab.hf import compat
from contextlab.hf.compat import DynamicLayer
from contextlab.kernels._triton import triton_available
from contextlab.kernels.quant_attention import dense_attention_lse, merge_attention, quantized_attention
from contextlab.kernels.sparse_read import gathered_attention
from contextlab.methods.policy import LayerPolicy, Phase, ReadPlan, Step
from contextlab.methods.positions import Rope
from contextlab.store import DenseStore, MemoryTracker, SlotGroup

LAYER_ATTRIBUTE = "contextlab_layer"  # set on the key tensor handed to the attention function


@dataclass
class CacheState:
    """What every layer of one cache shares: the memory tracker and the announced prompt."""

    tracker: MemoryTracker = field(default_factory=MemoryTracker)
    prompt_columns: int | None = None  # padded width of the prompt (phase boundary)
    prompt_lengths: list[int] | None = None  # real tokens of each row's prompt
    new_tokens: int = 0  # tokens expected after the prompt (room is planned for them)
    rope: Rope | None = None  # rotary frequencies of full-attention layers (only when the method remaps)
    native: int | None = None  # the model's trained positions

    transient: int = 0  # trailing tokens of the next forward that are not context (see InfiniRetri)
    segment: bool = False  # the next forward is a segment of a re-encoding prefill (see Step.segment)
    # Scratch space the layers of this cache share within one forward (layers run in order; a policy that
    # reads what lower layers left must reset its own entry at layer 0). Never saved: it lives one forward.
    shared: dict = field(default_factory=dict)

    @property
    def planned(self) -> list[int] | None:
        """Positions each row plans to reach: its prompt plus the tokens announced to follow."""
        return None if self.prompt_lengths is None else [n + self.new_tokens for n in self.prompt_lengths]


class ContextlabLayer(DynamicLayer):
    """A full-attention cache layer driven by a method's policy (see module docstring)."""

    def __init__(
        self,
        make_policy: Callable[[], LayerPolicy],
        layer_idx: int = 0,
        num_layers: int = 1,
        state: CacheState | None = None,
        make_store: Callable[[MemoryTracker, Rope | None], DenseStore | None] | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.make_policy = make_policy
        self.policy = make_policy()
        self.state = state or CacheState()
        store = None if make_store is None else make_store(self.state.tracker, self.state.rope)
        self.store = DenseStore(self.state.tracker) if store is None else store
        self.seen = 0  # logical columns fed so far
        self.row_tokens: torch.Tensor | None = None  # [B, 1] real tokens per row so far
        self.waiting = 0  # tokens appended but not attended yet
        self.read_steps = 0  # one-token decode steps attended
        self.read_bytes = 0  # bytes those steps read from the cache (see :meth:`_bytes_read`)

    # -- transformers' Cache layer interface ---------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.waiting:
            raise RuntimeError(
                "the previous forward cached tokens in a contextlab layer but did not attend through it: run the "
                "model inside contextlab.attention_enabled(model) when it uses a contextlab cache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            columns = self.state.prompt_columns or key_states.shape[2]
            self.store.reserve(self.policy.capacity_hint(columns) + self._answer_room())
        self.store.append(key_states, value_states)
        self.seen += key_states.shape[2]
        self.waiting = key_states.shape[2]
        self._publish()
        return self._placeholders(key_states)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """Mask over the new tokens only (``query_length`` is an int, or the ``cache_position`` tensor in
        older transformers): length = new tokens, offset = tokens seen before them."""
        return compat.query_length(query_length), self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store.clear()
        self.policy = self.make_policy()
        self.seen, self.row_tokens, self.waiting = 0, None, 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        fresh = self.store.fresh
        if tokens_to_remove > 0 or -tokens_to_remove > fresh:
            raise ValueError(
                f"cannot crop {tokens_to_remove} tokens: only the {fresh} tokens appended since the last eviction "
                "can be removed (pass a negative count)"
            )
        if tokens_to_remove == 0:
            return
        n = -tokens_to_remove
        g = self.store.groups[0]
        removed = n if g.valid is None else g.valid[:, 0, g.tail - n : g.tail].sum(-1, keepdim=True)
        self.row_tokens = self.row_tokens - removed
        self.store.crop(n)
        self.seen -= n
        self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])  # host-held slots too

    # -- contextlab -----------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of what this layer holds: the store's used slots (keys, values, per-slot metadata) plus the
        policy's state. Free capacity preallocated for coming tokens is not counted here (it is in the
        cache's peak)."""
        return self.store.used_bytes() + self.policy.nbytes()

    @property
    def kv_heads(self) -> int:
        return self.store.num_heads

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` more tokens (as many as the policy lets the cache grow by)."""
        if self.store.groups:
            self.store.reserve(self.store.length + self.policy.decode_reserve(tokens))

    def attend(self, query: torch.Tensor, new_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of ``query [B, Hq, Tq, D]`` (the newest ``Tq`` tokens) over this layer, as
        ``[B, Tq, Hq, D]``. ``new_mask``: transformers' boolean mask ``[B, 1, Tq, Tq]`` over the new tokens
        (None = no padding)."""
        tq = query.shape[2]
        if tq != self.waiting:
            raise RuntimeError(f"layer {self.layer_idx} cached {self.waiting} new tokens but got {tq} queries")
        self.waiting = 0
        new_valid = None if new_mask is None else new_mask[:, 0, -1, -tq:]  # [B, Tq]: the last query sees all
        positions = self._advance_rows(new_valid, tq, query.shape[0], query.device)
        self.store.mark_new(tq, new_valid, positions, largest=self.seen - 1)  # a row's tokens <= its columns
        step = Step(
            query,
            scaling,
            self._phase(),
            self.state.prompt_lengths,
            self.layer_idx,
            self.num_layers,
            self._answer_room(),
            self.state.rope,
            self.state.native,
            self.state.planned,
            self.state.transient,
            self.state.shared,
            self.state.segment,
        )
        plan = self.policy.before_attend(self.store, step)
        if plan is not None:
            out = self._attend_plan(query, plan, scaling)
        else:
            out = self.policy.attend(self.store, step)
            out = self._attend_groups(query, scaling) if out is None else out
        if step.phase == "decode" and tq == 1:
            self.read_steps += 1
            self.read_bytes += self._bytes_read(plan) + self.policy.selection_bytes()
        self.policy.after_forward(self.store, step)
        self.store.settle(query, scaling)
        if self.state.transient:  # trailing tokens that were not context (read, then evicted) take no position
            tail = self.state.transient
            self.row_tokens = self.row_tokens - (
                tail if new_valid is None else new_valid[:, -tail:].sum(-1, keepdim=True)
            )
        self._publish()
        return out.transpose(1, 2).contiguous()

    # -- saving (see contextlab.engine.persist) ---------------------------------------------------------
    def export(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The layer's whole state: store, policy, token counters."""
        if self.waiting:
            raise RuntimeError("cannot save a cache in the middle of a forward")
        store_meta, store_tensors = self.store.export()
        policy_meta, policy_tensors = self.policy.export_state()
        tensors = {f"store.{k}": v for k, v in store_tensors.items()}
        tensors |= {f"policy.{k}": v for k, v in policy_tensors.items()}
        if self.row_tokens is not None:
            tensors["row_tokens"] = self.row_tokens.clone()
        return {"seen": self.seen, "store": store_meta, "policy": policy_meta}, tensors

    def host_held(self, meta: dict) -> set[str]:
        """Names of an :meth:`export`'s tensors that stay in host memory (offloaded slots)."""
        return {f"store.{name}" for name in self.store.host_held(meta["store"])}

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor], room: int = 0) -> None:
        """Load an :meth:`export` into this (fresh) layer, with ``room`` free slots for coming tokens."""

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.store.restore(meta["store"], part("store."), room)
        self.policy.load_state(meta["policy"], part("policy."))
        self.seen, self.waiting = meta["seen"], 0
        self.row_tokens = tensors.get("row_tokens")
        if self.store.groups:
            g = self.store.groups[0]
            self.lazy_initialization(g.keys, g.values)
        self._publish()

    # -- internals -------------------------------------------------------------------------------------
    def _answer_room(self) -> int:
        return self.policy.decode_reserve(self.state.new_tokens)

    def _phase(self) -> Phase:
        end = self.state.prompt_columns
        if end is None or self.seen > end:
            return "decode"
        if self.state.segment:  # a re-encoding prefill's segment: its cache is dropped, the prompt goes on
            return "prefill"
        return "prompt_end" if self.seen == end else "prefill"

    def _advance_rows(self, valid: torch.Tensor | None, tq: int, batch: int, device) -> torch.Tensor | None:
        """Count the new real tokens of each row; returns their positions ``[B, Tq]`` (a padding token
        repeats the last one) only when the store keeps positions (after an eviction)."""
        if self.row_tokens is None:
            self.row_tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        before = self.row_tokens
        if valid is None:
            self.row_tokens = before + tq
            steps = torch.arange(1, tq + 1, device=device) if self.store.keeps_positions else None
        else:
            steps = valid.long().cumsum(-1)  # [B, Tq]
            self.row_tokens = before + steps[:, -1:]
        return None if steps is None else (before + steps - 1).clamp(min=0)

    def _attend_groups(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        groups = self.store.groups
        if len(groups) == 1 and groups[0].heads is None:
            return self._attend_group(groups[0], query, scaling)
        b, hq, tq, d = query.shape
        h = self.kv_heads
        by_kv_head = query.view(b, h, hq // h, tq, d)
        out = query.new_empty(b, h, hq // h, tq, d)
        for g in groups:
            q = by_kv_head[:, g.heads].reshape(b, -1, tq, d)
            out[:, g.heads] = self._attend_group(g, q, scaling).view(b, g.num_heads, -1, tq, d)
        return out.view(b, hq, tq, d)

    def _attend_group(self, g: SlotGroup, q: torch.Tensor, scaling: float) -> torch.Tensor:
        if g.prefix is not None and q.shape[2] == 1 and g.prefix.direct_read:
            return _attend_codes(g, q, scaling)
        keys, values = g.used()
        tq, total = q.shape[2], g.length
        valid = g.used_valid()  # [B, 1 | Hg, S] or None
        if tq == 1:
            mask = None if valid is None else valid[:, :, None, :]
            return compat.attention(q, keys, values, mask, scaling)
        if valid is None and tq == total:
            return compat.attention(q, keys, values, None, scaling, is_causal=True)
        mask = _causal(tq, total, keys.device)
        if valid is not None:
            mask = mask & valid[:, :, None, :]
        return compat.attention(q, keys, values, mask, scaling)

    def _bytes_read(self, plan: ReadPlan | None) -> int:
        """Bytes of cached slots one decode step read: every held byte without a plan (codes where quantized,
        per-slot metadata included); with one, keys and values of the slots it names, at full precision."""
        if plan is None:
            return self.store.used_bytes()
        keys = self.store.groups[0].keys
        return int(plan.valid.sum()) * 2 * keys.shape[-1] * keys.element_size()

    def _attend_plan(self, query: torch.Tensor, plan: ReadPlan, scaling: float) -> torch.Tensor:
        """Decode attention over the slots a policy selected (``plan.indices [B, H, K]``)."""
        if query.shape[2] != 1 or self.store.split:
            raise RuntimeError("a read plan applies to one decode query over unsplit heads")
        g = self.store.groups[0]
        valid = plan.valid
        slot_valid = g.used_valid()
        if slot_valid is not None:
            valid = valid & slot_valid.expand(*plan.indices.shape[:2], -1).gather(-1, plan.indices)
        if query.is_cuda and triton_available() and g.prefix is None:  # read the slots in place (no copy)
            keys, values = g.used()
            out, _ = gathered_attention(
                query[:, :, 0], keys, values, plan.indices, valid, scaling, backend="triton", trusted=True
            )
            return out.to(query.dtype).unsqueeze(2)
        keys, values = g.gather(plan.indices, valid=valid)  # from a prefix (codes, host memory) only what is read
        return compat.attention(query, keys, values, valid[:, :, None, :], scaling)

    def _publish(self) -> None:
        """Mirror the used slots of a single all-heads group on ``keys``/``values`` for code that inspects
        cache layers (None while heads are split or slots are quantized: reading them back is a copy)."""
        groups = self.store.groups
        single = len(groups) == 1 and groups[0].heads is None and groups[0].prefix is None
        self.keys, self.values = groups[0].used() if single else (None, None)

    def _placeholders(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``update`` returns: empty ``[B, H, 0, D]`` tensors whose key carries a weak reference to
        this layer. The contextlab attention function reads the store through it; any other attention
        function would see no keys at all, and the contextlab one refuses an empty key without a layer."""
        b, h, _, d = like.shape
        keys = like.new_empty(b, h, 0, d)
        setattr(keys, LAYER_ATTRIBUTE, weakref.ref(self))
        return keys, like.new_empty(b, h, 0, d)

    def _map_batch(self, fn) -> None:
        self.store.map_batch(fn)
        self.policy.map_batch(fn)
        if self.row_tokens is not None:
            self.row_tokens = fn(self.row_tokens)
        self._publish()


def _causal(tq: int, total: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, Tq, total]``: query i (the last Tq of total) sees columns <= total - Tq + i."""
    rows = torch.arange(tq, device=device).view(-1, 1) + (total - tq)
    return (torch.arange(total, device=device).view(1, -1) <= rows).view(1, 1, tq, total)


def _attend_codes(g: SlotGroup, q: torch.Tensor, scaling: float) -> torch.Tensor:
    """One decode query per head over a quantized group, read from its codes (the fused Triton kernel on
    CUDA; dequantize-then-attend elsewhere), its exact sink slots (if any) and its full-precision tail,
    merged by log-sum-exp."""
    prefix = g.prefix
    keys, values = prefix.codes()
    spec = prefix.spec
    query = q[:, :, 0]  # [B, Hq, D]
    sinks = prefix.sinks()  # exact sink slots: attended beside the codes, their codes masked out
    coded = quantized_attention(
        query,
        keys,
        values,
        prefix.used_valid() if sinks is None else sinks.coded,
        bits=spec.bits,
        key_group=spec.group,
        value_group=prefix.channels,
        scaling=scaling,
    )
    tail_valid = None if g.valid is None else g.valid[:, :, : g.tail]
    recent = dense_attention_lse(query, g.keys[:, :, : g.tail], g.values[:, :, : g.tail], tail_valid, scaling)
    out, lse = merge_attention(*coded, *recent)
    if sinks is not None:
        exact = dense_attention_lse(query, sinks.keys, sinks.values, sinks.valid, scaling)
        out, _ = merge_attention(out, lse, *exact)
    return out.to(q.dtype).unsqueeze(2)  # [B, Hq, 1, D]
