"""A GGUF file's reader, shared by the questions one load asks of the same file.

gguf's `GGUFReader` parses every metadata field when it is built (a tokenizer's tens of thousands
of strings, each a numpy view), and a direct int4 load asks its file four questions (architecture,
memory estimate, the tensors, the random-weights mark). Within `shared_gguf_readers()` (what
`load_backbone` runs in) those share one reader per unchanged file (same path, size and mtime),
dropped when the block ends; outside it every call parses afresh and nothing is kept, so a process
that only asked once (a settings check) holds no parsed header. `gguf_tensor_data` reads only the
tensor table, for a load that needs the quantized blocks and no metadata.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_local = threading.local()


@contextmanager
def shared_gguf_readers() -> Iterator[None]:
    """Readers built inside the block are shared by path; nested blocks share the outer one's."""
    if getattr(_local, "readers", None) is not None:
        yield
        return
    _local.readers = {}
    try:
        yield
    finally:
        _local.readers = None


def gguf_reader(path: str | os.PathLike):
    """The `GGUFReader` of `path`: the shared one inside `shared_gguf_readers()`, else a new one."""
    from gguf import GGUFReader

    resolved = Path(path).resolve()
    readers = getattr(_local, "readers", None)
    if readers is None:
        return GGUFReader(str(resolved))
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in readers:
        readers[key] = GGUFReader(str(resolved))
    return readers[key]


def kept_readers() -> int:
    """How many readers this thread keeps now (0 outside `shared_gguf_readers()`)."""
    return len(getattr(_local, "readers", None) or {})


# GGUF metadata value types (gguf's GGUFValueType) -> their size in bytes; 8 is a string, 9 an array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _Header:
    """A little-endian GGUF's metadata, walked by lengths: each key with its type and where its
    value starts (the tokenizer's strings are stepped over, not decoded, where `GGUFReader` builds
    a numpy view of every field on construction: seconds for a 49k-token vocabulary)."""

    def __init__(self, path: str | os.PathLike):
        import struct

        import numpy as np

        self.data = np.memmap(Path(path), mode="r")
        self.raw = memoryview(self.data)
        magic, version, self.n_tensors, n_kv = struct.unpack_from("<IIQQ", self.raw, 0)
        if magic != 0x46554747 or version < 2:  # "GGUF"
            raise ValueError(f"{path} is not a little-endian GGUF file of version 2 or later")
        self.keys: dict[bytes, tuple[int, int]] = {}  # key -> (value type, value offset)
        offset = 24
        for _ in range(n_kv):
            key_end = self.string_end(offset)
            (kind,) = struct.unpack_from("<I", self.raw, key_end)
            self.keys[bytes(self.raw[offset + 8:key_end])] = (kind, key_end + 4)
            offset = self.value_end(key_end + 4, kind)
        self.end = offset  # where the tensor table starts

    def string_end(self, at: int) -> int:
        import struct

        (length,) = struct.unpack_from("<Q", self.raw, at)
        return at + 8 + length

    def value_end(self, at: int, kind: int) -> int:
        import struct

        if kind == _STRING:
            return self.string_end(at)
        if kind == _ARRAY:
            item_kind, count = struct.unpack_from("<IQ", self.raw, at)
            at += 12
            if item_kind in _SCALAR_BYTES:
                return at + count * _SCALAR_BYTES[item_kind]
            for _ in range(count):
                at = self.value_end(at, item_kind)
            return at
        return at + _SCALAR_BYTES[kind]

    def scalar(self, key: str):
        """An integer, float or bool metadata value; None when absent or of another type."""
        import struct

        kind, at = self.keys.get(key.encode(), (None, 0))
        if kind not in _SCALAR_FORMATS:
            return None
        return struct.unpack_from("<" + _SCALAR_FORMATS[kind], self.raw, at)[0]


# GGUFValueType -> struct format, for the scalar types
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_scalar(path: str | os.PathLike, key: str):
    """One scalar metadata value of a GGUF (e.g. `general.file_type`), read without decoding the
    rest of the metadata; None when the key is absent or not a scalar."""
    return _Header(path).scalar(key)


def gguf_tensor_data(path: str | os.PathLike, ggml_type: int) -> dict[str, "np.ndarray"]:
    """The tensors of one GGML type (e.g. Q4_1) in a little-endian GGUF file, by name, as read-only
    memory-mapped uint8 arrays of GGUFReader's byte shape ([rows..., bytes per row]).

    Reads the tensor table only: the metadata is skipped by its lengths (_Header)."""
    import struct

    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    header = _Header(path)
    data, raw, offset = header.data, header.raw, header.end
    alignment = header.scalar("general.alignment") or 32
    string_end = header.string_end
    n_tensors = header.n_tensors
    table = []
    for _ in range(n_tensors):
        name_end = string_end(offset)
        name = bytes(raw[offset + 8:name_end]).decode("utf-8")
        (n_dims,) = struct.unpack_from("<I", raw, name_end)
        dims = struct.unpack_from(f"<{n_dims}Q", raw, name_end + 4)
        kind, relative = struct.unpack_from("<IQ", raw, name_end + 4 + 8 * n_dims)
        offset = name_end + 4 + 8 * n_dims + 12
        table.append((name, dims, kind, relative))
    start = -(-offset // alignment) * alignment
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    found = {}
    for name, dims, kind, relative in table:
        if kind != ggml_type:
            continue
        shape = tuple(reversed(dims))
        row_bytes = shape[-1] // block_size * type_size
        count = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
        found[name] = data[start + relative:start + relative + count].reshape(*shape[:-1], row_bytes)
    return found
