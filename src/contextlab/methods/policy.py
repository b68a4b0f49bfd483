"""The method lifecycle: what a method does to one layer's cache, hook by hook.

A method builds one :class:`LayerPolicy` per attention layer (``Method.build``). The cache layer in
``contextlab.hf`` owns a store and calls the policy's hooks at fixed points of every forward; it never
decides anything itself. Policies are pure tensor code (no transformers):

- :meth:`LayerPolicy.before_attend`: which slots this forward's queries read (None = every slot);
- :meth:`LayerPolicy.attend`: compute this forward's attention itself (None = the layer's SDPA), e.g. to
  get attention statistics in the same pass (H2O on CPU) or, later, sparse prefill patterns;
- :meth:`LayerPolicy.after_forward`: after the layer attended, with this forward's queries; the place for
  prefill eviction (at the prompt's end, or after every chunk when chunked), decode eviction every N
  appended tokens, and per-slot metadata kept for later selection;
- :meth:`LayerPolicy.capacity_hint` / :meth:`LayerPolicy.decode_reserve`: how much room the store should
  preallocate, so a bounded cache never over-allocates.

A composite method's policy (:class:`CompositePolicy`) calls its parts in order; each part sees the store
as the previous part left it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from contextlab.methods.positions import Rope
from contextlab.store import DenseStore

Phase = Literal["prefill", "prompt_end", "decode"]
SELECTED = "selected"  # Step.shared: positions [B, K] a re-encoding method keeps after a segment (-1 = none)


@dataclass
class Step:
    """One forward through one layer, as its policy sees it.

    ``queries``: ``[B, Hq, Tq, D]`` post-RoPE queries of this forward (the newest ``Tq`` slots).
    ``phase``: ``"prefill"`` (more of the prompt follows), ``"prompt_end"`` (this forward completed the
    prompt) or ``"decode"`` (tokens after the prompt: generated tokens, or a question fed later).
    ``prompt_lengths``: real tokens of each row's prompt (None when no prompt was announced).
    ``answer_room``: free slots to keep after the prompt's eviction for the tokens that will follow.
    ``rope``: the layer's rotary frequencies (for position remaps; None when no part of the method remaps);
    ``native``: the model's trained positions; ``planned``: each row's prompt + tokens to follow.
    ``shared``: scratch space of the cache, common to its layers within one forward (layers run in order, so
    a layer sees what the layers below it left there this forward; see InfiniRetri's ``share=all``).
    ``segment``: this forward is a segment of a re-encoding prefill (:meth:`Method.reencodes`) that more
    segments follow: the method leaves in ``shared[SELECTED]`` the positions whose tokens the engine feeds
    again, in a fresh cache, before the next segment.
    """

    queries: torch.Tensor
    scaling: float
    phase: Phase
    prompt_lengths: list[int] | None
    layer_idx: int
    num_layers: int
    answer_room: int = 0
    rope: Rope | None = None
    native: int | None = None
    planned: list[int] | None = None
    transient: int = 0  # trailing tokens of this forward that are not context (a repeated question)
    shared: dict | None = None
    segment: bool = False

    @property
    def tokens(self) -> int:
        return self.queries.shape[2]


@dataclass
class ReadPlan:
    """The slots a forward reads instead of all of them: ``indices [B, H, K]`` (columns of the store's
    view) and ``valid [B, H, K]`` (False = ignore that entry)."""

    indices: torch.Tensor
    valid: torch.Tensor

    def covers(self, columns: int) -> torch.Tensor:
        """``[B, H, columns]`` bool: which store columns the plan reads (an index named twice, or named by a
        padding entry as well, counts once)."""
        b, h, _ = self.indices.shape
        hits = torch.zeros(b, h, columns, dtype=torch.int32, device=self.indices.device)
        return hits.scatter_add_(-1, self.indices, self.valid.int()) > 0


class LayerPolicy:
    """A policy that does nothing: full attention over everything cached."""

    def before_attend(self, store: DenseStore, step: Step) -> ReadPlan | None:
        return None

    def attend(self, store: DenseStore, step: Step) -> torch.Tensor | None:
        """``[B, Hq, Tq, D]`` attention output computed by the policy, or None to let the layer attend."""
        return None

    def after_forward(self, store: DenseStore, step: Step) -> None:
        return None

    def selection_bytes(self) -> int:
        """Bytes the last :meth:`before_attend` read to choose what to read (page bounds, representative keys,
        scored keys); the slots it then reads are counted by the layer."""
        return 0

    def capacity_hint(self, columns: int) -> int:
        """Slots to preallocate for a prompt of ``columns`` columns (the store grows beyond if needed)."""
        return columns

    def decode_reserve(self, tokens: int) -> int:
        """Slots to keep free for ``tokens`` coming tokens (a bounded cache needs fewer)."""
        return tokens

    def nbytes(self) -> int:
        """Bytes of state the policy holds (buffered queries, accumulated scores...)."""
        return 0

    def map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch axis of any per-row state (beam reordering, row selection)."""
        return None

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The policy's running state (counters, carried scores, buffered queries) as JSON-able scalars and
        named tensors, to save a cache. Attributes that are methods or scorers are rebuilt from the spec."""
        return export_attributes(self)

    def load_state(self, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_state` on a freshly built policy of the same method."""
        load_attributes(self, scalars, tensors)


class Stateful:
    """State a policy holds in a helper object (a rank table): saved and loaded with the policy's own."""

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return export_attributes(self)

    def load_state(self, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        load_attributes(self, scalars, tensors)


def export_attributes(owner) -> tuple[dict, dict[str, torch.Tensor]]:
    """Tensors, plain scalars and nested :class:`Stateful` helpers among ``owner``'s attributes."""
    scalars, tensors = {}, {}
    for name, value in vars(owner).items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.clone()
        elif value is None or isinstance(value, (bool, int, float, str)):
            scalars[name] = value
        elif isinstance(value, Stateful):
            own_scalars, own_tensors = value.export_state()
            scalars[name] = {"nested": own_scalars}
            tensors.update({f"{name}.{k}": v for k, v in own_tensors.items()})
    return scalars, tensors


def load_attributes(owner, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
    for name, value in scalars.items():
        if name not in vars(owner):
            raise ValueError(f"saved policy state {name!r} does not belong to {type(owner).__name__}")
        if isinstance(value, dict):
            mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
            getattr(owner, name).load_state(value["nested"], mine)
        else:
            setattr(owner, name, value)
    for name, value in tensors.items():
        if "." not in name:
            setattr(owner, name, value)


class CompositePolicy(LayerPolicy):
    """The parts' policies, called in order."""

    def __init__(self, parts: list[LayerPolicy]) -> None:
        self.parts = parts

    def before_attend(self, store: DenseStore, step: Step) -> ReadPlan | None:
        for part in self.parts:
            plan = part.before_attend(store, step)
            if plan is not None:
                return plan  # composition allows one reading rule, so the first plan is the only one
        return None

    def selection_bytes(self) -> int:
        return sum(part.selection_bytes() for part in self.parts)

    def attend(self, store: DenseStore, step: Step) -> torch.Tensor | None:
        # A position remap attends first: another part's attention (H2O's one-pass column sums) would use
        # the true positions; that part then scores from its own fallback.
        for part in sorted(self.parts, key=lambda p: not getattr(p, "remaps_positions", False)):
            out = part.attend(store, step)
            if out is not None:
                return out
        return None

    def after_forward(self, store: DenseStore, step: Step) -> None:
        for part in self.parts:
            part.after_forward(store, step)

    def capacity_hint(self, columns: int) -> int:
        return min(part.capacity_hint(columns) for part in self.parts)

    def decode_reserve(self, tokens: int) -> int:
        return min(part.decode_reserve(tokens) for part in self.parts)

    def nbytes(self) -> int:
        return sum(part.nbytes() for part in self.parts)

    def map_batch(self, fn) -> None:
        for part in self.parts:
            part.map_batch(fn)

    def export_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        scalars, tensors = {}, {}
        for i, part in enumerate(self.parts):
            own_scalars, own_tensors = part.export_state()
            scalars[f"p{i}"] = own_scalars
            tensors.update({f"p{i}.{k}": v for k, v in own_tensors.items()})
        return scalars, tensors

    def load_state(self, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        for i, part in enumerate(self.parts):
            mine = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"p{i}.")}
            part.load_state(scalars[f"p{i}"], mine)
