"""A cache layer over a quantized store: decode reads the codes directly (the fused kernel on CUDA, the
reference elsewhere) and agrees with attention over the dequantized slots; prefill reads the copy."""

from __future__ import annotations

import pytest
import torch

from contextlab.hf import compat
from contextlab.hf.layer import ContextlabLayer
from contextlab.methods.policy import LayerPolicy
from contextlab.store.quantized import QuantizedStore, QuantSpec

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _layer(spec: QuantSpec) -> ContextlabLayer:
    return ContextlabLayer(LayerPolicy, make_store=lambda tracker, rope: QuantizedStore(spec, tracker, rope))


def _step(
    layer: ContextlabLayer, n: int, gen: torch.Generator, device: str, dtype: torch.dtype, loud: float = 1.0
) -> torch.Tensor:
    b, h, g, d = 2, 2, 3, 32
    k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype) for _ in range(2))
    k[:, :, 0] *= loud  # an attention sink's outlier key (the prompt's first token)
    q = torch.randn(b, h * g, n, d, generator=gen).to(device, dtype)
    layer.update(k, v)
    return layer.attend(q, None, d**-0.5), q


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("bits", "sink"), [(2, 0), (4, 0), (2, 2)])
def test_decode_over_codes_matches_attention_over_the_dequantized_cache(device, bits, sink):
    """With ``sink`` exact slots, decode attends to them beside the codes (whose copies of them are masked)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(bits)
    layer = _layer(QuantSpec(bits=bits, group=16, residual=16, sink=sink))
    _step(layer, 200, gen, device, dtype, loud=8.0)  # the prompt: 176 slots quantized, 24 in full precision
    compared = 0
    for _ in range(20):
        before = layer.store.groups[0].quantized
        out, q = _step(layer, 1, gen, device, dtype)
        g = layer.store.groups[0]
        assert g.prefix is not None and g.tail < 32
        if g.quantized != before:
            continue  # slots attended in full precision were quantized after the step
        compared += 1
        keys, values = g.used()  # dequantized copy + full-precision tail
        expected = compat.attention(q, keys, values, None, q.shape[-1] ** -0.5).transpose(1, 2)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert compared >= 15
