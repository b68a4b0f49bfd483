"""Compute kernels: a plain PyTorch reference, a fast PyTorch path and a Triton kernel per operation."""

from __future__ import annotations

from contextlab.kernels.colsum import attention_column_sums, attention_column_sums_reference

__all__ = ["attention_column_sums", "attention_column_sums_reference"]
