"""A preallocated KV cache with one slot per running request: rows join and leave without
copying the others.

keys / values: [layers, slots, kv_heads, capacity, head_dim]. The running batch is always slots
0..B-1, so a decode step reads `keys[l, :B, :, :T]`, a view, never a copy. A request that leaves
hands its slot to the last row (one row's KV is moved, not the batch's: at batch 16 with 300
positions on SmolLM2 in float32 that is 14 MB instead of the ~220 MB `kv_batch.select_rows` copies).
Positions are written in place (`index_copy_` on a flat view). Slots (doubling, up to `slots`) and
positions (in chunks) grow when the batch needs them, and the memory is given back when the batch
empties, so it follows the work: one short request on a 7B model does not hold 16 slots.
"""

from __future__ import annotations

import torch

GROWTH_CHUNK = 256  # positions added at a time (a reallocation copies the used part once)


class KVSlots:
    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", chunk: int = GROWTH_CHUNK):
        if min(layers, slots, kv_heads, head_dim, chunk) < 1:
            raise ValueError("KVSlots sizes must be >= 1")
        self.layers, self.max_slots, self.kv_heads, self.head_dim = layers, slots, kv_heads, head_dim
        self.dtype, self.device, self.chunk = dtype, torch.device(device), chunk
        self.release_memory()

    def _empty(self, slots: int, capacity: int) -> torch.Tensor:
        return torch.zeros(self.layers, slots, self.kv_heads, capacity, self.head_dim, dtype=self.dtype,
                           device=self.device)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def bytes_per_position(self) -> int:
        """KV bytes one token position holds (all layers, keys and values)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    def reserve(self, slots: int, positions: int, used_slots: int, used_positions: int) -> None:
        """Make room for `slots` slots of `positions` positions, keeping the first `used_positions`
        of the first `used_slots` slots."""
        if slots > self.max_slots:
            raise ValueError(f"{slots} KV slots asked for, {self.max_slots} at most")
        if slots <= self.slots and positions <= self.capacity:
            return
        new_slots = max(self.slots, min(self.max_slots, 1 << (slots - 1).bit_length()))
        capacity = max(self.capacity, -(-positions // self.chunk) * self.chunk)
        keys, values = self._empty(new_slots, capacity), self._empty(new_slots, capacity)
        if used_slots and used_positions:
            keys[:, :used_slots, :, :used_positions] = self.keys[:, :used_slots, :, :used_positions]
            values[:, :used_slots, :, :used_positions] = self.values[:, :used_slots, :, :used_positions]
        self._set(keys, values, capacity)

    def _set(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        self.keys, self.values, self.capacity = keys, values, capacity
        # Per layer, [slots * kv_heads * capacity, head_dim] views for index_copy_ (made once, not per write).
        self._flat = [(keys[i].view(-1, self.head_dim), values[i].view(-1, self.head_dim)) for i in range(self.layers)]

    def release_memory(self) -> None:
        """Drop every slot (the batch is empty)."""
        self._set(self._empty(0, 0), self._empty(0, 0), 0)

    def write(self, layer: int, flat_index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store rows of [n, kv_heads? -> flattened] keys/values at `flat_index` (see `flat_positions`)."""
        flat_keys, flat_values = self._flat[layer]
        flat_keys.index_copy_(0, flat_index, keys.reshape(-1, self.head_dim))
        flat_values.index_copy_(0, flat_index, values.reshape(-1, self.head_dim))

    def flat_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Indices into a layer's flattened [slots * kv_heads * capacity, head_dim] view for writing
        `positions` [R, N] of `slots` [R], every kv head: shape [R * N * kv_heads], ordered (row,
        position, head) like keys computed as [R, N, kv_heads, head_dim]."""
        heads = torch.arange(self.kv_heads, device=positions.device)
        index = ((slots[:, None, None] * self.kv_heads + heads[None, None, :]) * self.capacity
                 + positions[:, :, None])
        return index.reshape(-1)

    def load(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put a prefix [layers, kv_heads, m, head_dim] (a task's prompt KV) at positions 0..m-1."""
        m = keys.shape[2]
        self.keys[:, slot, :, :m] = keys
        self.values[:, slot, :, :m] = values

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of positions 0..length-1 of a slot: [layers, kv_heads, length, head_dim] each."""
        return self.keys[:, slot, :, :length].clone(), self.values[:, slot, :, :length].clone()

    def move(self, source: int, target: int, length: int) -> None:
        """Copy one slot's first `length` positions to another slot (a row taking a freed slot)."""
        if source != target and length:
            self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
            self.values[:, target, :, :length] = self.values[:, source, :, :length]
