"""Grouping a step's newcomers into prefill forwards (pure function; the engine tests check outputs)."""

from hypothesis import given
from hypothesis import strategies as st

from lamp_runtime.hf.prefill_groups import prefill_groups


def padded(lengths, groups):
    return sum(max(lengths[i] for i in g) * len(g) for g in groups)


def test_one_long_row_gets_its_own_forward():
    lengths = [30] * 15 + [600]
    groups = prefill_groups(lengths, forward_cost_tokens=32)
    assert groups == [list(range(15)), [15]]
    assert padded(lengths, groups) == 15 * 30 + 600  # instead of 16 * 600


def test_similar_lengths_share_one_forward():
    assert prefill_groups([20, 24, 21, 23], forward_cost_tokens=32) == [[0, 2, 3, 1]]
    assert prefill_groups([20, 24, 21, 23], forward_cost_tokens=0) == [[0], [2], [3], [1]]


@given(st.lists(st.integers(1, 2000), min_size=1, max_size=40), st.integers(0, 200))
def test_groups_partition_the_rows_and_never_pad_more_than_one_forward(lengths, cost):
    groups = prefill_groups(lengths, cost)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    # padding plus the forward cost of the extra groups never exceeds one padded batch
    one_batch = max(lengths) * len(lengths)
    assert padded(lengths, groups) + cost * (len(groups) - 1) <= one_batch
