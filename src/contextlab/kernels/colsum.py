"""Attention column sums: how much causal attention each cached key received over one prefill forward.

H2O-style eviction scores a key by the softmax probability it received, summed over every query of the
prefill and averaged over the query heads that share its KV head. SDPA never materialises those
probabilities, so they are recomputed here, ``chunk`` queries at a time (memory ``O(chunk * S)``).

Shapes (``G = Hq // H`` query heads per KV head, ``Hv`` in ``{1, H}``):

- ``queries``: ``[B, Hq, Tq, D]`` post-RoPE queries of this forward; query ``j`` sits at slot ``S - Tq + j``.
- ``keys``: ``[B, H, S, D]`` post-RoPE keys of every cached slot.
- ``valid``: ``[B, Hv, S]`` bool, False on padding or unused slots (never attended to; a query in such a
  slot contributes nothing).
- result: ``[B, H, S]`` float32.

Inputs may be fp32, fp16 or bf16; everything is computed in fp32.
"""

from __future__ import annotations

from bisect import bisect_left

import torch

from contextlab.kernels._triton import triton_available

BACKENDS = ("auto", "reference", "torch", "triton")
# The torch path scores at most this many logits per block, so a block stays in the CPU's last-level cache
# (measured on a 2-core Zen 4 with 32 MiB L3: blocks of 128 MiB run ~1.5x slower than blocks of 8 MiB).
BLOCK_LOGITS = 2**21


def check_inputs(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, chunk: int) -> None:
    """Raise ``ValueError`` naming the first problem with the shapes, dtypes or devices of the inputs."""
    if queries.dim() != 4 or keys.dim() != 4 or valid.dim() != 3:
        raise ValueError(
            f"expected queries [B, Hq, Tq, D], keys [B, H, S, D] and valid [B, Hv, S]; got queries "
            f"{tuple(queries.shape)}, keys {tuple(keys.shape)}, valid {tuple(valid.shape)}"
        )
    (b, hq, tq, d), (bk, h, s, dk), (bv, hv, sv) = queries.shape, keys.shape, valid.shape
    if not b == bk == bv:
        raise ValueError(f"batch sizes differ: queries {b}, keys {bk}, valid {bv}")
    if d != dk:
        raise ValueError(f"head dims differ: queries {d}, keys {dk}")
    if h == 0 or hq % h != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    if tq > s:
        raise ValueError(f"more queries ({tq}) than cached slots ({s}): queries must be the last Tq slots")
    if hv not in (1, h) or sv != s:
        raise ValueError(f"valid must be [B, 1 or H={h}, S={s}]; got {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor; got {valid.dtype}")
    if not (queries.is_floating_point() and keys.is_floating_point()):
        raise ValueError(f"queries and keys must be floating point; got {queries.dtype} and {keys.dtype}")
    if not queries.device == keys.device == valid.device:
        raise ValueError(f"devices differ: queries {queries.device}, keys {keys.device}, valid {valid.device}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")


def attention_column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    *,
    chunk: int = 512,
    backend: str = "auto",
) -> torch.Tensor:
    """``[B, H, S]`` float32: causal softmax attention each key received, summed over the ``Tq`` queries and
    averaged over the ``G`` query heads of its KV head (shapes in the module docstring).

    ``backend``: ``"reference"`` (plain masked softmax), ``"torch"`` (fast PyTorch path), ``"triton"``
    (two-pass kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``), or ``"auto"`` (Triton for CUDA tensors
    when triton imports, else the fast PyTorch path). ``chunk`` bounds memory to ``O(chunk * S)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    check_inputs(queries, keys, valid, chunk)
    if backend == "auto":
        backend = "triton" if queries.is_cuda and triton_available() else "torch"
    if backend == "reference":
        return attention_column_sums_reference(queries, keys, valid, scaling, chunk=chunk)
    if backend == "torch":
        return attention_column_sums_torch(queries, keys, valid, scaling, chunk=chunk)
    from contextlab.kernels.colsum_triton import attention_column_sums_triton

    return attention_column_sums_triton(queries, keys, valid, scaling)


def attention_column_sums_reference(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float, *, chunk: int = 512
) -> torch.Tensor:
    """Readable reference for :func:`attention_column_sums`: a masked fp32 softmax per chunk of queries."""
    check_inputs(queries, keys, valid, chunk)
    b, h, s = keys.shape[:3]
    tq, offset = queries.shape[2], s - queries.shape[2]
    total = torch.zeros(b, h, s, dtype=torch.float32, device=keys.device)
    for start in range(0, tq, chunk):
        end = min(tq, start + chunk)
        total[..., : offset + end] += _chunk_sums_reference(queries, keys, valid, scaling, start, end)
    return total


def _chunk_sums_reference(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float, start: int, end: int
) -> torch.Tensor:
    """``[B, H, K]`` column sums of queries ``start..end-1`` over the ``K`` keys the last of them can see."""
    (b, hq, tq, d), h, s = queries.shape, keys.shape[1], keys.shape[2]
    offset = s - tq
    limit = offset + end
    q = queries[:, :, start:end].float().reshape(b, h, hq // h, end - start, d)  # [B, H, G, n, D]
    logits = torch.einsum("bhgtd,bhsd->bhgts", q, keys[:, :, :limit].float()).mul_(scaling)  # [B, H, G, n, K]
    q_slots = torch.arange(offset + start, limit, device=keys.device)
    causal = torch.arange(limit, device=keys.device).view(1, -1) <= q_slots.view(-1, 1)  # [n, K]
    allowed = causal & valid[:, :, None, :limit]  # [B, Hv, n, K]
    probs = logits.masked_fill_(~allowed[:, :, None], float("-inf")).softmax(dim=-1)
    # A query seeing no valid key (a NaN row) sits in an invalid slot itself; such queries vote for nothing.
    probs = probs.masked_fill_(~valid[:, :, None, offset + start : limit, None], 0.0)
    return probs.sum(dim=3).mean(dim=2)


def attention_column_sums_torch(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float, *, chunk: int = 512
) -> torch.Tensor:
    """Fast PyTorch path for :func:`attention_column_sums`, the default on CPU.

    Per block of queries: one batched GEMM per KV head (the ``G`` query heads stacked as rows), a causal
    bias on the diagonal block only, an in-place softmax, and the column sums as one mat-vec with the query
    weights. Blocks hold at most ``chunk`` queries, fewer when needed to stay cache-sized.
    """
    return _blocked(queries, keys, None, valid, scaling, chunk)[0]


def attention_and_column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    *,
    chunk: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output ``[B, Hq, Tq, D]`` (in ``values``' dtype) AND the column sums ``[B, H, S]`` of
    :func:`attention_column_sums`, from one pass over the probabilities: on CPU, computing them once costs
    far less than SDPA followed by a second pass. Rows of invalid queries are garbage (finite) and must be
    ignored. ``values``: ``[B, H, S, D]``."""
    if values.shape != keys.shape:
        raise ValueError(f"values must have the keys' shape {tuple(keys.shape)}; got {tuple(values.shape)}")
    total, out = _blocked(queries, keys, values, valid, scaling, chunk)
    return out.to(values.dtype), total


def _blocked(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor | None,
    valid: torch.Tensor,
    scaling: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The blocked loop of :func:`attention_column_sums_torch`; with ``values`` it also multiplies each
    block's probabilities by the values (the attention output, ``[B, Hq, Tq, D]`` fp32)."""
    check_inputs(queries, keys, valid, chunk)
    (b, hq, tq, d), h, s = queries.shape, keys.shape[1], keys.shape[2]
    g, offset = hq // h, s - tq
    all_valid = bool(valid.all())
    q, k = _scaled_fp32_inputs(queries, keys, valid, scaling, all_valid)
    v = None
    if values is not None:
        v = values.float() if all_valid else values.float().masked_fill(~valid[..., None], 0.0)  # no NaN * 0
    out = None if values is None else torch.empty(b, h, g, tq, values.shape[-1], device=keys.device)
    invalid_slots = [] if all_valid else (~valid).any(dim=1).any(dim=0).nonzero().flatten().tolist()
    n_max = min(chunk, max(16, BLOCK_LOGITS // max(1, b * hq * s)))
    logits_buffer = torch.empty(b * hq * n_max * s, dtype=torch.float32, device=keys.device)
    causal = torch.full((n_max, n_max), float("-inf"), device=keys.device).triu_(1)  # [n, n]
    total = torch.zeros(b, h, s, dtype=torch.float32, device=keys.device)
    for start in range(0, tq, n_max):
        end = min(tq, start + n_max)
        n, first, limit = end - start, offset + start, offset + end
        qc = q[:, :, :, start:end].reshape(b, h, g * n, d)  # [B, H, G*n, D]
        logits = logits_buffer[: b * hq * n * limit].view(b, h, g * n, limit)
        torch.matmul(qc, k[:, :, :limit].transpose(-1, -2), out=logits)  # [B, H, G*n, K]
        diagonal_bias = causal[:n, :n] if all_valid else _diagonal_bias(causal[:n, :n], valid[:, :, first:limit])
        logits.view(b, h, g, n, limit)[..., first:].add_(diagonal_bias)
        _mask_invalid_keys(logits, valid, invalid_slots, first)
        torch.softmax(logits, dim=-1, out=logits)  # in place (row-wise kernel): no second [G*n, K] tensor
        weights = valid[:, :, None, first:limit].expand(b, h, g, n).reshape(b, h, 1, g * n) / g  # [B, H, 1, G*n]
        total[..., :limit] += torch.matmul(weights, logits).squeeze(-2)
        if v is not None:
            out[:, :, :, start:end] = torch.matmul(logits, v[:, :, :limit]).view(b, h, g, n, -1)
    return total, None if out is None else out.view(b, hq, tq, -1)


def _scaled_fp32_inputs(
    queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float, all_valid: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``scaling * queries`` as ``[B, H, G, Tq, D]`` and fp32 keys ``[B, H, S, D]``, with the vectors of
    invalid slots zeroed: unused slots may hold garbage (NaN) that an additive -inf mask would not erase."""
    (b, hq, tq, d), h, s = queries.shape, keys.shape[1], keys.shape[2]
    q = queries.float().mul(scaling).view(b, h, hq // h, tq, d)  # [B, H, G, Tq, D], a fresh tensor
    k = keys.float()  # may alias ``keys``: never modified in place
    if all_valid:
        return q, k
    q.masked_fill_(~valid[:, :, None, s - tq :, None], 0.0)
    return q, k.masked_fill(~valid[..., None], 0.0)


def _diagonal_bias(causal: torch.Tensor, valid_block: torch.Tensor) -> torch.Tensor:
    """``[B, Hv, 1, n, n]`` additive mask of a diagonal block whose queries and keys are the same slots
    (``valid_block`` ``[B, Hv, n]``): causal, -inf on invalid keys, and no mask at all on the rows of invalid
    queries so that their softmax stays finite (their weight is zero)."""
    bias = causal.masked_fill(~valid_block[:, :, None, :], float("-inf"))  # [B, Hv, n, n]
    return bias.masked_fill_(~valid_block[:, :, :, None], 0.0).unsqueeze(2)


def _mask_invalid_keys(logits: torch.Tensor, valid: torch.Tensor, invalid_slots: list[int], first: int) -> None:
    """Set to -inf the logits of invalid keys before slot ``first`` (the diagonal block is masked apart),
    touching only the columns between the first and the last such key."""
    count = bisect_left(invalid_slots, first)
    if count == 0:
        return
    lo, hi = invalid_slots[0], invalid_slots[count - 1] + 1
    logits[..., lo:hi].masked_fill_(~valid[:, :, None, lo:hi], float("-inf"))
