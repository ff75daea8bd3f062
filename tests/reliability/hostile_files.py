"""Byte builders for hostile adapter uploads: well-formed safetensors with bad content, and files
that only pretend to be safetensors (raw headers, pickles, zips, truncations).

Shared by the unit tests of the parser and the HTTP tests, so both try exactly the same bytes.
"""

from __future__ import annotations

import io
import json
import pickle
import struct

import torch
from safetensors.torch import save

HIDDEN = 576  # the embedded backbone's hidden size


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def raw_safetensors(header: dict, payload: bytes) -> bytes:
    """A file with exactly this JSON header: for entries the safetensors writer would refuse."""
    text = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(text)) + text + payload


def lamp(l: int = 6, r: int = 3, d: int = HIDDEN, seed: int = 0, **meta) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lamp.U": torch.randn(l, r, generator=g) * 0.1, "lamp.Q": torch.rand(r, generator=g) + 0.5,
            "lamp.V": torch.randn(r, d, generator=g) * 0.02}


def lamp_file(tensors: dict[str, torch.Tensor] | None = None, **metadata: str) -> bytes:
    return safetensors_bytes(tensors if tensors is not None else lamp(), {"format": "lamp", **metadata})


def soft_prompt_file(prompt: torch.Tensor, **metadata: str) -> bytes:
    return safetensors_bytes({"prompt": prompt}, {"format": "soft_prompt", **metadata})


def with_value(tensors: dict[str, torch.Tensor], name: str, value: float) -> dict[str, torch.Tensor]:
    poisoned = {k: v.clone() for k, v in tensors.items()}
    poisoned[name].view(-1)[0] = value
    return poisoned


def pickle_file() -> bytes:
    return pickle.dumps({"lamp.U": [[0.1]], "__reduce__": "os.system"})


def zip_file() -> bytes:
    """What `torch.save` writes (a zip holding a pickle): must never be unpickled."""
    buffer = io.BytesIO()
    torch.save({"prompt": torch.zeros(2, HIDDEN)}, buffer)
    return buffer.getvalue()


def entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


# Hostile headers: (id, header dict, payload bytes, words the error must contain).
MALFORMED_HEADERS = [
    ("offsets-one-number", {"prompt": entry(offsets=[0])}, 4, "data_offsets must be [start, end]"),
    ("offsets-string", {"prompt": entry(offsets="ab")}, 4, "data_offsets must be [start, end]"),
    ("offsets-null", {"prompt": entry(offsets=None)}, 4, "data_offsets must be [start, end]"),
    ("offsets-negative", {"prompt": entry(offsets=[-4, 0])}, 4, "data_offsets must be [start, end]"),
    ("offsets-float", {"prompt": entry(offsets=[0.0, 4.0])}, 4, "data_offsets must be [start, end]"),
    ("dtype-list", {"prompt": entry(dtype=["F32"])}, 4, "dtype ['F32'] not allowed"),
    ("dtype-f64", {"prompt": entry(dtype="F64", offsets=(0, 8))}, 8, "dtype F64 not allowed"),
    ("dtype-int", {"prompt": entry(dtype="I32")}, 4, "dtype I32 not allowed"),
    ("shape-number", {"prompt": entry(shape=1)}, 4, "shape must be a list of integers"),
    ("shape-null-dim", {"prompt": entry(shape=[None])}, 4, "shape must be a list of integers"),
    ("shape-negative", {"prompt": entry(shape=[-1, -1])}, 4, "shape must be a list of integers"),
    ("shape-bool", {"prompt": entry(shape=[True])}, 4, "shape must be a list of integers"),
    ("shape-lies", {"prompt": entry(shape=[2, HIDDEN])}, 4, "do not match shape"),
    ("entry-not-object", {"prompt": [1, 2, 3]}, 4, "malformed header entry"),
    ("entry-missing-key", {"prompt": {"dtype": "F32", "shape": [1]}}, 4, "malformed header entry"),
    ("metadata-not-strings", {"__metadata__": {"pool": 2}, "prompt": entry()}, 4, "map strings to strings"),
    ("unused-payload", {"prompt": entry()}, 64, "tensors use 4"),
    ("overlapping", {"a": entry(), "b": entry()}, 4, None),  # two tensors on the same bytes
]
