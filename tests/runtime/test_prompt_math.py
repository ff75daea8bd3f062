import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lamp_runtime.prompts.math import average_pool, compressed_outer_product, pooled_length


def test_compressed_outer_product_equals_factor_product_and_explicit_sum():
    g = torch.Generator().manual_seed(0)
    u, q, v = torch.randn(7, 3, generator=g), torch.randn(3, generator=g), torch.randn(3, 5, generator=g)
    explicit = sum(q[i] * torch.outer(u[:, i], v[i, :]) for i in range(3))
    c = compressed_outer_product(u, q, v)
    assert c.shape == (7, 5)
    torch.testing.assert_close(c, u @ torch.diag(q) @ v)
    torch.testing.assert_close(c, explicit)


def test_pool_one_is_identity():
    prompt = torch.randn(5, 4)
    assert average_pool(prompt, 1) is prompt


def test_pool_divisible_blocks_are_means():
    prompt = torch.arange(12.0).reshape(6, 2)
    pooled = average_pool(prompt, 2)
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]))


def test_pool_last_partial_block_averages_what_is_left():
    prompt = torch.arange(10.0).reshape(5, 2)  # rows 0..4, p=2 -> blocks {0,1} {2,3} {4}
    pooled = average_pool(prompt, 2)
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]))


def test_pool_rejects_non_positive_block():
    with pytest.raises(ValueError, match="pool must be >= 1"):
        average_pool(torch.zeros(3, 2), 0)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 40), pool=st.integers(1, 12), dim=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_pool_properties(length, pool, dim, seed):
    prompt = torch.randn(length, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pooled = average_pool(prompt, pool)
    assert pooled.shape == (math.ceil(length / pool), dim) == (pooled_length(length, pool), dim)
    for k in range(pooled.shape[0]):
        block = prompt[k * pool : (k + 1) * pool]
        torch.testing.assert_close(pooled[k], block.mean(dim=0))
    # pooling a constant prompt keeps the constant
    const = torch.full((length, dim), 3.5, dtype=torch.float64)
    torch.testing.assert_close(average_pool(const, pool), torch.full_like(pooled, 3.5))
