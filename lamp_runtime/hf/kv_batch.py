"""Row surgery on a transformers DynamicCache so requests can join and leave a running batch.

Rows are left-padded: a joining request's shorter cache gets zero keys/values on the left, masked
out by the 2-D attention mask. Position ids are passed explicitly per row, so padding never shifts
a request's rotary positions. This is the only module that touches the cache's internals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _layers(cache):
    return cache.layers


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - t.shape[-2]
    return t if missing == 0 else F.pad(t, (0, 0, missing, 0))


def merge(cache_a, mask_a: torch.Tensor, cache_b, mask_b: torch.Tensor):
    """Append the rows of (cache_b, mask_b) to (cache_a, mask_a); returns (cache_a, mask)."""
    length = max(mask_a.shape[1], mask_b.shape[1])
    for layer_a, layer_b in zip(_layers(cache_a), _layers(cache_b)):
        layer_a.keys = torch.cat([_pad_left(layer_a.keys, length), _pad_left(layer_b.keys, length)])
        layer_a.values = torch.cat([_pad_left(layer_a.values, length), _pad_left(layer_b.values, length)])
    mask = torch.cat([F.pad(mask_a, (length - mask_a.shape[1], 0)), F.pad(mask_b, (length - mask_b.shape[1], 0))])
    return cache_a, mask


def select_rows(cache, mask: torch.Tensor, rows: torch.Tensor):
    """Keep only `rows` of the batch, then drop left columns that are padding in every kept row."""
    mask = mask[rows]
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in _layers(cache):
        layer.keys = layer.keys[rows, :, start:]
        layer.values = layer.values[rows, :, start:]
    return cache, mask[:, start:]
