"""A GGUF file's reader, shared by the questions one load asks of the same file.

gguf's `GGUFReader` parses every metadata field when it is built (a tokenizer's tens of thousands
of strings, each a numpy view), and a direct int4 load asks its file four questions (architecture,
memory estimate, the tensors, the random-weights mark). Within `shared_gguf_readers()` (what
`load_backbone` runs in) those share one reader per unchanged file (same path, size and mtime),
dropped when the block ends; outside it every call parses afresh and nothing is kept, so a process
that only asked once (a settings check) holds no parsed header.
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
