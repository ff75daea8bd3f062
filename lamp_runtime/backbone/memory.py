"""Will the backbone fit? An estimate of the host memory a load needs, checked before loading, so
that a model too big for the machine is refused with both numbers and what to try instead of
numpy's `_ArrayMemoryError` (or the kernel's OOM killer) half-way through.

The estimate counts what the chosen load path holds at its peak:
- a GGUF loaded tensor by tensor into int4 (gguf_int4.py): Q4_1 matrices at their served size
  (packed 4-bit + bfloat16 scale and zero per 32), other matrices the same after one float32
  tensor at a time, embeddings and norms float32, and the largest tensor's float32 copy;
- any other GGUF: dequantized to a float32 HF folder, which transformers holds twice while
  converting (the dequantized tensors and the model); once converted, the folder's parameters
  (from its safetensors headers) at the load dtype;
- an HF folder: every parameter at the load dtype (int4 loads float32, then quantizes).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .options import BackboneOptions

MARGIN_FRACTION = 0.10  # allocator slack, the tokenizer, activations of the first forward
MARGIN_BYTES = 512 * 1024**2
INT4_BYTES_PER_WEIGHT = 0.5 + 4 / 32  # packed nibbles + bfloat16 (scale, zero) per group of 32
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                           "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
LOAD_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 * 4, "int8": 1.0}  # bitsandbytes: nf4 with a scale per 64


def _with_margin(nbytes: float) -> int:
    return int(nbytes * (1 + MARGIN_FRACTION) + MARGIN_BYTES)


def gguf_parameter_count(path: str | Path) -> int:
    from .gguf_file import gguf_reader

    return sum(int(t.n_elements) for t in gguf_reader(path).tensors)


def gguf_direct_int4_bytes(path: str | Path) -> int:
    """Peak bytes of gguf_int4.load_gguf_int4 for this file (before the margin)."""
    from .gguf_file import gguf_reader

    total, largest = 0.0, 0
    for t in gguf_reader(path).tensors:
        n = int(t.n_elements)
        largest = max(largest, n)
        is_matrix = t.name.startswith("blk.") and len(t.shape) == 2
        if t.name == "output.weight" or is_matrix:
            total += n * INT4_BYTES_PER_WEIGHT
        else:  # embeddings and norms: float32
            total += n * 4
    return int(total + largest * 4)


def safetensors_parameter_count(folder: str | Path) -> int | None:
    """Parameters in a folder's safetensors files, from their headers only (None: no safetensors)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    count = 0
    for file in files:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        count += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return count


def estimate_load_bytes(options: BackboneOptions, direct_int4: bool) -> tuple[int, str] | None:
    """(bytes, what was counted) a load of the resolved `options` needs at its peak, margin
    included; None when the files do not tell (e.g. a folder of .bin files only).
    `direct_int4`: the GGUF goes through gguf_int4 (tensor by tensor)."""
    from .checkpoint import backbone_folder_if_cached, gguf_source

    gguf = gguf_source(options)
    if gguf is not None and direct_int4:
        return _with_margin(gguf_direct_int4_bytes(gguf)), f"{gguf.name} loaded tensor by tensor into int4"
    if gguf is not None:
        folder = backbone_folder_if_cached(gguf)
        if folder is None:
            what = f"{gguf.name} converted to a float32 HF folder (held twice while converting)"
            return _with_margin(gguf_parameter_count(gguf) * 8), what
        # The load reads the converted folder: count its safetensors headers (a few bytes) rather
        # than parse the GGUF's header again (every metadata field: seconds per load, per replica).
        params = safetensors_parameter_count(folder) or gguf_parameter_count(gguf)
        return _with_margin(params * _bytes_per_parameter(options)), f"{gguf.name}'s float32 HF folder"
    params = safetensors_parameter_count(options.path)
    if params is None:
        return None
    return _with_margin(params * _bytes_per_parameter(options)), f"{params / 1e9:.2f} B parameters"


def _bytes_per_parameter(options: BackboneOptions) -> float:
    if options.quantization == "int4":
        return 4  # loaded in float32, then quantized layer by layer (int4.quantize_model)
    if options.quantization in QUANTIZED_BYTES:
        return QUANTIZED_BYTES[options.quantization]
    return LOAD_DTYPE_BYTES[options.dtype]


def available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(needed: int, what: str, available: int | None = None, hint: str = "") -> None:
    """Refuse (ValueError with both numbers) when `needed` bytes exceed the memory available now."""
    available = available_bytes() if available is None else available
    if needed > available:
        raise ValueError(f"backbone does not fit: {what} needs ~{needed / 1024**3:.1f} GiB, "
                         f"{available / 1024**3:.1f} GiB of memory is available"
                         + (f"; {hint}" if hint else ""))
