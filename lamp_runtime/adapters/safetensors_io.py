"""Strict reading of safetensors bytes: the header is checked before any tensor is built.

We parse the header ourselves (8-byte little-endian length + JSON) so that a pickle, a zip, a
truncated upload or a file with overlapping/out-of-range offsets is rejected with a message that
says what is wrong, instead of an opaque library error. Tensors are then materialised with
`safetensors.torch.load`, which never executes code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes

from ..errors import AdapterError

# Floating dtypes an adapter may be stored in; everything is converted to float32 on the host.
ALLOWED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER_BYTES = 1 << 20


def read_limited(path: Path, max_bytes: int) -> bytes:
    """Read a whole file, refusing it before reading when it is larger than `max_bytes`."""
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterError(f"{path.name}: file is {size} bytes, over the limit of {max_bytes} bytes")
    return path.read_bytes()


def parse_header(data: bytes) -> tuple[dict[str, str], dict[str, dict]]:
    """Validate the safetensors header of `data`; return (metadata, tensor entries)."""
    if len(data) < 8:
        raise AdapterError(f"not a safetensors file: only {len(data)} bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise AdapterError(
            f"not a safetensors file (or truncated): header length {header_len} does not fit "
            f"in {len(data)} bytes; only safetensors adapters are accepted, never pickle or zip"
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"not a safetensors file: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterError("not a safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError("safetensors metadata must map strings to strings")
    payload = len(data) - 8 - header_len
    end_max = 0
    for name, entry in header.items():
        if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - entry.keys():
            raise AdapterError(f"tensor {name!r}: malformed header entry")
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise AdapterError(
                f"tensor {name!r}: dtype {dtype} not allowed (use one of {sorted(ALLOWED_DTYPES)})"
            )
        # Checked before any arithmetic: a hostile header must be an AdapterError, not a TypeError.
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
            raise AdapterError(f"tensor {name!r}: shape must be a list of integers >= 0, got {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise AdapterError(f"tensor {name!r}: data_offsets must be [start, end] integers >= 0, got {offsets!r}")
        start, end = offsets
        numel = 1
        for dim in shape:
            numel *= dim
        if end - start != numel * ALLOWED_DTYPES[dtype] or end > payload:
            raise AdapterError(
                f"tensor {name!r}: data offsets {start}..{end} do not match shape {entry['shape']} "
                f"within a {payload}-byte payload (truncated file?)"
            )
        end_max = max(end_max, end)
    if end_max != payload:
        raise AdapterError(f"safetensors payload is {payload} bytes but tensors use {end_max} (corrupt file)")
    return metadata, header


def load_tensors(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Validated load of safetensors bytes -> (metadata, float32 tensors on the CPU)."""
    metadata, _ = parse_header(data)
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as exc:  # the header passed our checks, so this is corrupt data
        raise AdapterError(f"cannot read safetensors data: {exc}") from None
    return metadata, {name: t.to(torch.float32) for name, t in tensors.items()}


def _is_count(value) -> bool:
    """A JSON integer >= 0 (bool is an int subclass in Python but never a valid dimension)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
