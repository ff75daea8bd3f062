"""Properties of the LAMP product on random shapes (tests/runtime/test_prompt_math.py checks it on one
fixed example; pooling already has its property test there)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lamp_runtime.prompts.math import average_pool, compressed_outer_product

SHAPES = dict(length=st.integers(1, 24), rank=st.integers(1, 8), dim=st.integers(1, 16), seed=st.integers(0, 10_000))


def factors(length: int, rank: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(length, rank, generator=g, dtype=torch.float64),
            torch.randn(rank, generator=g, dtype=torch.float64),
            torch.randn(rank, dim, generator=g, dtype=torch.float64))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(**SHAPES)
def test_product_is_the_sum_of_rank_one_terms_and_has_rank_at_most_r(length, rank, dim, seed):
    u, q, v = factors(length, rank, dim, seed)
    product = compressed_outer_product(u, q, v)
    explicit = sum(q[i] * torch.outer(u[:, i], v[i]) for i in range(rank))
    torch.testing.assert_close(product, explicit)
    assert torch.linalg.matrix_rank(product) <= min(rank, length, dim)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(pool=st.integers(1, 10), **SHAPES)
def test_pooling_the_product_equals_the_product_of_pooled_u(length, rank, dim, seed, pool):
    """Pooling averages rows and the product is linear in U's rows: pool(U·diag(Q)·V) = pool(U)·diag(Q)·V."""
    u, q, v = factors(length, rank, dim, seed)
    torch.testing.assert_close(average_pool(compressed_outer_product(u, q, v), pool),
                               compressed_outer_product(average_pool(u, pool), q, v))
