"""Blocked local attention equals the dense masked definition, and scales linearly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssdd_diffusers.models.local_attention import (
    LocalSelfAttention,
    _window_attention_bias_op,
    blocked_attention_bias,
    dense_relative_bias,
    local_attention,
    window_layout,
)


def dense_attention(q, k, v, table):
    """Reference: attention over all H*W tokens with the upstream dense additive bias."""
    batch, height, width, heads, dim = q.shape
    flat = lambda t: t.reshape(batch, height * width, heads, dim).transpose(1, 2)  # noqa: E731
    bias = dense_relative_bias(table, height, width)
    out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=bias[None])
    return out.transpose(1, 2).reshape(batch, height, width, heads * dim)


@pytest.mark.parametrize(
    "height,width,window",
    [
        (16, 16, 8),
        (32, 32, 8),
        (24, 40, 8),
        (8, 24, 4),
        (4, 4, 8),
        (3, 7, 8),
        (1, 5, 4),
        (40, 9, 4),
        (31, 33, 8),
    ],
)
@pytest.mark.parametrize("block", [4, 8])
def test_local_equals_dense(height, width, window, block):
    generator = torch.Generator().manual_seed(height * 100 + width)
    shape = (2, height, width, 3, 8)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    table = torch.randn(2 * window - 1, 2 * window - 1, 3, generator=generator)
    expected = dense_attention(q, k, v, table)
    got = local_attention(q, k, v, table, block=block)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_bias_and_inputs_receive_exact_gradients():
    generator = torch.Generator().manual_seed(0)
    shape = (1, 20, 12, 2, 4)
    q, k, v = (torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3))
    table = torch.randn(7, 7, 2, generator=generator, requires_grad=True)
    weights = torch.randn(1, 20, 12, 8, generator=generator)
    grads_local = torch.autograd.grad(
        (local_attention(q, k, v, table, block=4) * weights).sum(), (q, k, v, table)
    )
    grads_dense = torch.autograd.grad((dense_attention(q, k, v, table) * weights).sum(), (q, k, v, table))
    for a, b in zip(grads_local, grads_dense):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max().item() < 1e-4
    # Every in-window offset of a 20x12 grid is used, so the whole table gets gradient.
    assert (grads_local[3].abs() > 0).all()


def test_no_tokens_by_tokens_tensor_and_linear_size():
    """The per-call bias/mask tensors grow linearly with the token count (never N x N)."""
    sizes = []
    for side in (32, 64, 128):
        layout = window_layout(side, side, 8, 8, torch.device("cpu"))
        tokens = side * side
        index_elems = layout.bias_index.numel()
        mask_elems = 0 if layout.key_valid is None else layout.key_valid.numel()
        assert index_elems + mask_elems < tokens * tokens / 4
        sizes.append((index_elems + mask_elems * layout.bias_index.shape[0]) / tokens)
    # bias elements per token are bounded by a constant (no growth with N)
    assert max(sizes) / min(sizes) < 1.2
    assert all(math.isfinite(s) for s in sizes)


def test_half_precision_has_no_nan():
    generator = torch.Generator().manual_seed(1)
    shape = (1, 12, 20, 2, 8)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    table = torch.randn(7, 7, 2, generator=generator)
    expected = dense_attention(q, k, v, table)
    for dtype in (torch.bfloat16, torch.float16):
        got = local_attention(q.to(dtype), k.to(dtype), v.to(dtype), table.to(dtype), block=4)
        assert torch.isfinite(got).all()
        assert (got.float() - expected).abs().max().item() < 0.1


@pytest.mark.parametrize(
    "height,width,window,block", [(32, 32, 8, 8), (16, 16, 8, 8), (24, 9, 4, 4), (3, 7, 8, 8)]
)
def test_opaque_bias_op_matches_gather_and_its_fake_shape(height, width, window, block):
    """The op compiled inference uses for the bias (folded into a constant with frozen weights)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    table = torch.randn(2 * window - 1, 2 * window - 1, 3)
    layout = window_layout(height, width, window, block, torch.device("cpu"))
    expected = blocked_attention_bias(table, layout, torch.float32)
    got = _window_attention_bias_op(table, height, width, block, torch.float32)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    with FakeTensorMode() as mode:
        fake = _window_attention_bias_op(mode.from_tensor(table), height, width, block, torch.float16)
    assert fake.shape == expected.shape and fake.dtype == torch.float16
    assert fake.stride() == got.stride()  # Inductor asserts the real strides against the fake's


def test_inductor_compiled_attention_matches_eager():
    """Compiled inference (Inductor, default settings) with the padded-halo bias op, against eager."""
    torch.manual_seed(0)
    attention = LocalSelfAttention(dim=16, num_heads=2, window=4, block_size=4).eval()
    table = torch.randn(7, 7, 2)
    tokens = torch.randn(1, 12, 9, 16)  # 12 x 9 grid: padded keys, per-block bias
    compiled = torch.compile(attention, backend="inductor", dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens, table), attention(tokens, table), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_padded_keys_get_exactly_zero_weight(dtype):
    """Through SDPA itself: with values 1 at padded keys and 0 elsewhere, the output (the total weight
    on padded keys) is exactly 0, for large logits too, and no NaN appears."""
    window, block, heads, head_dim = 4, 4, 3, 8
    layout = window_layout(13, 18, window, block, torch.device("cpu"))  # padded keys on both axes
    assert layout.key_valid is not None and not layout.key_valid.all()
    generator = torch.Generator().manual_seed(2)
    table = torch.randn(2 * window - 1, 2 * window - 1, heads, generator=generator)
    bias = blocked_attention_bias(table, layout, dtype)
    blocks, _, q_len, k_len = bias.shape
    shape = (2, blocks * heads)
    q = 6 * torch.randn(*shape, q_len, head_dim, generator=generator)
    k = 6 * torch.randn(*shape, k_len, head_dim, generator=generator)  # padded keys hold values too
    padded = (~layout.key_valid).to(dtype)[None, :, None, :, None].expand(2, blocks, heads, k_len, head_dim)
    out = F.scaled_dot_product_attention(
        q.to(dtype),
        k.to(dtype),
        padded.reshape(*shape, k_len, head_dim),
        attn_mask=bias.view(1, -1, q_len, k_len),
    )
    assert torch.isfinite(out).all()
    assert (out == 0).all()


def test_sdpa_bias_does_not_grow_with_batch(monkeypatch):
    """The bias SDPA receives is (1, blocks * heads, Q, K) for any batch: never repeated per image."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, **kwargs):
        seen.append((query.shape[0], tuple(attn_mask.shape), attn_mask.untyped_storage().nbytes()))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    table = torch.randn(15, 15, 4)
    layout = window_layout(32, 32, 8, 8, torch.device("cpu"))
    for batch in (1, 8):
        q = torch.randn(batch, 32, 32, 4, 8)
        with torch.no_grad():
            local_attention(q, q, q, table, block=8, bias_cache={})
    (b1, shape1, bytes1), (b8, shape8, bytes8) = seen
    assert (b1, b8) == (1, 8)
    assert shape1 == shape8 == (1, layout.num_blocks * 4, 64, 22 * 22)
    assert bytes1 == bytes8 == math.prod(shape1) * 4
