"""Remapped attention: rotations, the fused path against the reference path, and both against a brute-force
definition that applies RoPE to pre-RoPE vectors at each pair's remapped positions."""

from __future__ import annotations

import pytest
import torch

from contextlab.methods.extension import LMInfinite, SelfExtend, String
from contextlab.methods.positions import Branch, Far, Near, Rope, remapped_attention, rotate

D = 16
ROPE = Rope(1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float) / D)))


def rope_at(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Plain RoPE (rotate_half layout) of pre-RoPE ``x [..., T, D]`` at positions ``pos [..., T]``."""
    angles = pos.double()[..., None] * ROPE.inv_freq.double()
    cos = torch.cat([angles.cos(), angles.cos()], -1).float()
    sin = torch.cat([angles.sin(), angles.sin()], -1).float()
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_rotating_a_post_rope_vector_moves_it_to_the_new_position():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 5, D)
    pos = torch.tensor([0, 7, 100, 4000, 12345])
    shift = torch.tensor([3, -7, 900, -3999, 20000])
    moved = rotate(rope_at(x0, pos), shift, ROPE)
    torch.testing.assert_close(moved, rope_at(x0, pos + shift), atol=2e-4, rtol=1e-4)


def test_rotation_leaves_dims_beyond_the_rotary_dim_alone():
    x = torch.randn(1, 1, 4, D + 8)
    out = rotate(x, torch.tensor([1, 2, 3, 4]), ROPE)
    torch.testing.assert_close(out[..., D:], x[..., D:])
    assert not torch.allclose(out[..., :D], x[..., :D])


def brute_force(q0, k0, v, valid, q_pos, k_pos, method, native, scaling):
    """Attention from pre-RoPE ``q0``/``k0``: each (query, key) pair scored with RoPE at the positions the
    method's paper assigns to that pair, one softmax per query."""
    b, hq, tq, _ = q0.shape
    h, s = k0.shape[1], k0.shape[2]
    g = hq // h
    out = torch.zeros(b, hq, tq, D)
    for bi in range(b):
        for head in range(hq):
            kv = head // g
            for i in range(tq):
                qp = int(q_pos[bi, i])
                logits = torch.full((s,), float("-inf"))
                for j in range(s - tq + i + 1):
                    if not valid[bi, min(kv, valid.shape[1] - 1), j]:
                        continue
                    kp = int(k_pos[bi, min(kv, k_pos.shape[1] - 1), j])
                    where = method(qp, kp)
                    if where is None:
                        continue
                    qn, kn = where
                    qv = rope_at(q0[bi, head, i], torch.tensor(qn))
                    kv_vec = rope_at(k0[bi, kv, j], torch.tensor(kn))
                    logits[j] = (qv * kv_vec).sum() * scaling
                probs = torch.softmax(logits, -1).nan_to_num(0.0)
                out[bi, head, i] = probs @ v[bi, kv]
    return out


def selfextend_pair(g, w):
    def where(qp, kp):
        if qp - kp < w:
            return qp, kp
        return qp // g + w - w // g, kp // g

    return where


def string_pair(s, local):
    def where(qp, kp):
        return (qp, kp) if qp - kp < s else (qp - s + local, kp)

    return where


def lminfinite_pair(sink, w):
    def where(qp, kp):
        if qp - kp < w:
            return qp, kp
        return (w - 1, 0) if kp < sink else None

    return where


CASES = [
    (SelfExtend(group=3, window=6), selfextend_pair(3, 6)),
    (String(offset=9, local=4), string_pair(9, 4)),
    (LMInfinite(sink=2, window=7), lminfinite_pair(2, 7)),
]


def _setup(seed=0, b=2, h=2, g=2, s=30, tq=30, per_head=False):
    torch.manual_seed(seed)
    q0, k0, v = torch.randn(b, h * g, tq, D), torch.randn(b, h, s, D), torch.randn(b, h, s, D)
    valid = torch.ones(b, h if per_head else 1, s, dtype=torch.bool)
    valid[1, :, :4] = False  # row 1 is left-padded by 4
    if per_head:
        valid[0, 1, :7] = False  # ragged heads: head 1 of row 0 holds fewer slots (padded view)
    k_pos = (valid[:, :1].long().cumsum(-1) - 1).clamp(min=0).expand(-1, valid.shape[1], -1).clone()
    k_pos[0, :, 10:] += 5  # row 0 had tokens evicted: positions jump (still non-decreasing)
    q_pos = k_pos[:, 0, -tq:]
    return q0, k0, v, valid, q_pos, k_pos


@pytest.mark.parametrize("method,pair", CASES, ids=lambda c: getattr(c, "name", ""))
@pytest.mark.parametrize("tq,per_head", [(30, False), (1, False), (30, True)])
def test_fused_and_reference_paths_match_the_paper_definition(method, pair, tq, per_head):
    q0, k0, v, valid, q_pos, k_pos = _setup(tq=tq, per_head=per_head)
    q = rope_at(q0, q_pos[:, None, :])
    k = rope_at(k0, k_pos)
    native, scaling = 12, 0.3
    branches = method.branches(q_pos, k_pos, int(q_pos.max()), (q_pos.amax(-1) + 1).tolist(), native)
    assert branches is not None
    expected = brute_force(q0, k0, v, valid, q_pos, k_pos, pair, native, scaling)
    for backend in ("reference", "fused"):
        out = remapped_attention(q, k, v, valid, q_pos, k_pos, branches, ROPE, scaling, backend=backend)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4, msg=backend)


def test_an_exact_branch_alone_is_causal_attention():
    q0, k0, v, valid, _, _ = (t[:1] for t in _setup())
    valid = torch.ones_like(valid)
    k_pos = torch.arange(30).view(1, 1, 30)
    q, k = rope_at(q0, k_pos[:, 0][:, None]), rope_at(k0, k_pos)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    for backend in ("reference", "fused"):
        out = remapped_attention(q, k, v, valid, k_pos[:, 0], k_pos, [Branch(Near(10**6))], ROPE, 0.3, backend=backend)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_query_with_nothing_to_attend_gets_zeros_not_nan():
    q0, k0, v, valid, q_pos, k_pos = _setup()
    branches = [Branch(Far(1000))]  # no pair is that far: nothing is attended
    for backend in ("reference", "fused"):
        out = remapped_attention(q0, k0, v, valid, q_pos, k_pos, branches, ROPE, 0.3, backend=backend)
        assert torch.equal(out, torch.zeros_like(out))


def _distance_seen(method, qp: int, kp: int, native: int) -> int:
    q_pos, k_pos = torch.tensor([[qp]]), torch.tensor([[[kp, qp]]])
    valid = torch.tensor([[[True, False]]])  # only the far key is attended
    branches = method.branches(q_pos, k_pos, qp, [qp + 1], native)
    stats = {}
    x = torch.randn(1, 1, 1, D)
    remapped_attention(
        x, torch.randn(1, 1, 2, D), torch.randn(1, 1, 2, D), valid, q_pos, k_pos, branches, ROPE, 1.0, stats=stats
    )
    return stats["max_distance"]


def test_known_answers_for_the_distance_each_method_assigns():
    # Self-Extend (Jin et al., 2024, Sec. 3): q // G + W - W // G - k // G = 25 + 16 - 4 - 2
    assert _distance_seen(SelfExtend(group=4, window=16), 100, 10, 64) == 35
    # STRING: d - S + local = 90 - 40 + 8
    assert _distance_seen(String(offset=40, local=8), 100, 10, 64) == 58
    # LM-Infinite: a sink beyond the window is seen at the window's edge
    assert _distance_seen(LMInfinite(sink=4, window=16), 100, 2, 64) == 15
