"""Attention weights for scoring, computed apart from the model's attention (SDPA does not return them).

Queries are the last ``Tq`` of the ``S`` cached slots, so query ``j`` sits at column ``S - Tq + j``.
Every helper masks invalid keys (padding, unused slots; ``valid`` is ``[B, 1 | H, S]``) and future keys, and
zeroes the rows of padding queries.
"""

from __future__ import annotations

import torch

from contextlab.kernels.colsum import attention_column_sums
from contextlab.methods.base import ScoreInputs


def _grouped(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    b, hq, t, d = queries.shape
    return queries.view(b, num_kv_heads, hq // num_kv_heads, t, d)  # [B, H, G, Tq, D]


def attention_probs(inputs: ScoreInputs, first_query: int, last_query: int) -> torch.Tensor:
    """``[B, H, G, n, K]`` fp32 attention of queries ``first_query..last_query-1`` (indices into this
    forward's queries) over the first ``K`` cached keys, where ``K`` is the last key any of them can see
    (plus one); later keys get no attention from these queries."""
    keys, valid = inputs.keys, inputs.valid
    s, tq = keys.shape[2], inputs.queries.shape[2]
    limit = s - tq + last_query
    q = _grouped(inputs.queries[:, :, first_query:last_query], keys.shape[1]).float()
    logits = torch.einsum("bhgtd,bhsd->bhgts", q, keys[:, :, :limit].float()).mul_(inputs.scaling)
    q_cols = torch.arange(s - tq + first_query, limit, device=keys.device)
    visible = torch.arange(limit, device=keys.device).view(1, -1) <= q_cols.view(-1, 1)  # [n, K]
    allowed = visible.view(1, 1, 1, *visible.shape) & valid[:, :, None, None, :limit]  # [B, 1 | H, 1, n, K]
    probs = logits.masked_fill_(~allowed, float("-inf")).softmax(dim=-1)
    # Padding queries see no key at all (NaN rows): they vote for nothing.
    return probs.masked_fill_(~valid[:, :, q_cols][:, :, None, :, None], 0.0)


def window_attention(inputs: ScoreInputs, window: int) -> torch.Tensor:
    """Attention of the last ``window`` queries (the observation window): ``[B, H, G, w, S]``."""
    tq = inputs.queries.shape[2]
    return attention_probs(inputs, max(0, tq - window), tq)


def accumulated_attention(inputs: ScoreInputs, chunk: int = 512) -> torch.Tensor:
    """``[B, H, S]`` attention each key received, summed over every query of this forward and averaged
    over the query heads of its group, ``chunk`` queries at a time (memory ``O(chunk * S)``): the column
    sums of :mod:`contextlab.kernels.colsum` (Triton on CUDA, a blocked PyTorch path on CPU), or those the
    forward's own attention already produced (``inputs.column_sums``)."""
    if inputs.column_sums is not None:
        return inputs.column_sums
    return attention_column_sums(inputs.queries, inputs.keys, inputs.valid, inputs.scaling, chunk=chunk)
