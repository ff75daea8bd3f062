"""Split one step's newcomers into prefill forwards so that padding does not swamp the work.

The newcomers of a step are prefilled as left-padded batches: one 600-token request among
fifteen 30-token ones would make every row 600 positions long (9x the real tokens). Sorted by
length, rows are cut into groups wherever a separate forward is cheaper than the padding it
saves, counting a forward's fixed cost as `forward_cost_tokens` positions (a forward's fixed cost
over its cost per token, measured in docs/benchmarks.md with docs/bench/prefill.json).
"""

from __future__ import annotations


def prefill_groups(lengths: list[int], forward_cost_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, grouped; every group is padded to its longest row.

    Rows are taken shortest first. Adding a row of length w to a group of n rows padded to width g
    costs w * (n + 1) positions together, or g * n + w + forward_cost_tokens apart, so the row
    joins while (w - g) * n <= forward_cost_tokens.
    """
    groups: list[list[int]] = []
    width = 0
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        if groups and (lengths[i] - width) * len(groups[-1]) <= forward_cost_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
        width = lengths[i]
    return groups
