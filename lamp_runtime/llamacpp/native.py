"""The ctypes layer over llama.cpp (llama-cpp-python's low-level `llama_cpp.llama_cpp`): loading a
model with given kernel settings, a context with a KV stream per sequence, a sequence's cells
copied to and from host memory, and a preallocated batch.

A `Batch` owns every array llama.cpp reads (numpy arrays kept alive as its attributes) and a
`llama_batch` struct pointing at them, built once: a step writes rows into the arrays and sets
`n_tokens`, with no allocation. (Handing llama.cpp the address of a temporary array reads freed
memory, and answers then change from run to run.)
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

_init_lock = threading.Lock()
_callback = None  # the ctypes log callback: it must outlive every call into llama.cpp
_ERRORS: list[str] = []  # llama.cpp's last error lines: quoted when a load fails
GGML_LOG_LEVEL_ERROR = 4


def lib():
    """The ctypes bindings, with llama.cpp's backend started once and its info logs silenced
    (its errors are kept and quoted in ours)."""
    global _callback
    from llama_cpp import llama_cpp as L

    with _init_lock:
        if _callback is None:
            _callback = L.llama_log_callback(_log)
            L.llama_log_set(_callback, ctypes.c_void_p(0))
            L.llama_backend_init()
    return L


def _log(level, text, user_data):
    if level == GGML_LOG_LEVEL_ERROR:
        _ERRORS.append(text.decode(errors="replace").rstrip())
        del _ERRORS[:-20]


def last_errors() -> str:
    return " | ".join(_ERRORS[-3:])


@dataclass(frozen=True)
class KernelSettings:
    """The per-host choices the probe decides (probe.py): weight repacking and micro-batch size."""

    weight_repack: bool = True  # llama.cpp's extra buffer types (CPU_REPACK, AMX): weights repacked at load
    n_ubatch: int = 512  # rows per micro-batch of one llama_decode

    def as_dict(self) -> dict[str, str]:
        """As /status.json and /metrics show it."""
        return {"weight_repack": "on" if self.weight_repack else "off", "n_ubatch": str(self.n_ubatch)}


def load_model(path: str, settings: KernelSettings):
    """A llama_model_p for the GGUF at `path` (mmap'ed; no copy beyond what repacking needs)."""
    L = lib()
    params = L.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = settings.weight_repack
    _ERRORS.clear()
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ValueError(f"llama.cpp cannot load {path}: {last_errors() or 'no reason given'}")
    return model


def weight_type(model) -> str:
    """The model's weight type as llama.cpp describes it ("Q4_1", "Q4_K - Medium"): the words of
    llama_model_desc after the architecture and size."""
    text = ctypes.create_string_buffer(128)
    lib().llama_model_desc(model, text, len(text))
    return text.value.decode(errors="replace").split(" ", 2)[-1]


GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
KV_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16}


def new_context(model, n_ctx: int, n_batch: int, n_ubatch: int, n_seq_max: int, threads: int,
                flash_attention: bool = True, kv_type: str = "f16", unified: bool = False):
    """A context of `n_seq_max` sequences, each with a KV stream of its own (n_ctx / n_seq_max
    cells), with `threads` ggml threads for decode and prefill alike. A row of a decode then
    attends over its own sequence's cells only; `unified=True` puts every sequence in one cache of
    `n_ctx` cells instead (cells shareable by seq_cp, but each row's attention spans every used
    cell: 3.3x the step time at 64 rows, bench/llamacpp_kv_layout.py).

    Flash attention is on by default, for decode speed: a decode row attends through the flash
    kernel faster than through the matrix path (bare-loop decode 0.86-0.94x with it off), while a
    prefill row's attention over many cached cells costs more through it (warm prefill after 200
    vs 2 cached cells 1.11-1.35x on, about flat off): docs/llamacpp.md, "Attention kernels", has
    the runs. With a stream per sequence both keep the exactness tests
    (tests/runtime/test_llamacpp_engine.py runs them with it off too); in the unified cache of
    earlier versions a sequence's logits changed with what else decoded in the batch unless it was
    on. Its CPU kernel sums values in float16 in the cache's cell order, so when rows land in other
    cells (another batch composition) answers may still part at near ties.
    """
    L = lib()
    params = L.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = min(n_ubatch, n_batch)
    params.n_seq_max = n_seq_max
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = unified
    params.type_k = params.type_v = KV_TYPES[kv_type]
    params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attention else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.no_perf = True
    params.embeddings = False
    _ERRORS.clear()
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} KV cells: {last_errors()}")
    return ctx


def read_seq_state(ctx, seq_id: int) -> np.ndarray:
    """A copy, in host memory, of sequence `seq_id`'s cells (positions, keys, values of every layer):
    llama.cpp's state format, which `write_seq_state` puts into another sequence's stream."""
    L = lib()
    size = L.llama_state_seq_get_size(ctx, seq_id)
    data = np.empty(size, dtype=np.uint8)
    written = L.llama_state_seq_get_data(ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq_id)
    if written != size:
        raise RuntimeError(f"llama.cpp wrote {written} of sequence {seq_id}'s {size} state bytes {last_errors()}")
    return data


def write_seq_state(ctx, data: np.ndarray, seq_id: int) -> None:
    """Replace sequence `seq_id`'s cells by a `read_seq_state` copy (taken from any sequence)."""
    L = lib()
    _ERRORS.clear()
    read = L.llama_state_seq_set_data(ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), data.nbytes, seq_id)
    if read != data.nbytes:
        raise RuntimeError(f"llama.cpp restored {read} of {data.nbytes} state bytes into sequence {seq_id}: "
                           f"{last_errors() or 'no reason given'}")


class Batch:
    """A reusable llama_batch of up to `capacity` rows: token ids (`width` 0) or embedding rows."""

    def __init__(self, capacity: int, width: int = 0):
        L = lib()
        self.capacity, self.width = capacity, width
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)  # one sequence per row
        self.logits = np.zeros(capacity, dtype=np.int8)
        self._seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)()
        base = self.seq.ctypes.data
        for i in range(capacity):
            self._seq_ptrs[i] = ctypes.cast(base + 4 * i, ctypes.POINTER(ctypes.c_int32))
        struct = L.llama_batch()
        struct.n_tokens = 0
        if width:
            self.embd = np.zeros((capacity, width), dtype=np.float32)
            self.tokens = None
            struct.embd = self.embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            struct.token = ctypes.POINTER(ctypes.c_int32)()
        else:
            self.tokens = np.zeros(capacity, dtype=np.int32)
            self.embd = None
            struct.token = self.tokens.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
            struct.embd = ctypes.POINTER(ctypes.c_float)()
        struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        struct.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        struct.seq_id = self._seq_ptrs
        struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = struct
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, count: int, seq_id: int, start_pos: int, output: str = "last") -> slice:
        """Reserve `count` rows of sequence `seq_id` at positions start_pos.. ; `output` says which
        rows return logits ("last", "all" or "none"). Returns the rows' slice (fill tokens/embd)."""
        i, j = self.n, self.n + count
        if j > self.capacity:
            raise RuntimeError(f"batch of {j} rows over its capacity of {self.capacity}")
        self.pos[i:j] = np.arange(start_pos, start_pos + count, dtype=np.int32)
        self.seq[i:j] = seq_id
        self.logits[i:j] = 1 if output == "all" else 0
        if output == "last":
            self.logits[j - 1] = 1
        self.n = j
        return slice(i, j)

    def decode(self, ctx) -> None:
        L = lib()
        self.struct.n_tokens = self.n
        code = L.llama_decode(ctx, self.struct)
        if code != 0:
            reason = {1: "no KV cells left for the batch", 2: "aborted"}.get(code, "error")
            raise RuntimeError(f"llama_decode of {self.n} rows failed ({code}: {reason}) {last_errors()}")
