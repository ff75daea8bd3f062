"""Strict loading and saving of adapter files: `.safetensors` of any kind, PEFT folders.

`adapter_from_safetensors` reads the metadata `format` and hands the tensors to the kind
listed under it (KINDS); `load_adapter` reads a file or a PEFT folder, refusing what is
too large before reading it, and validates against the backbone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import AdapterError
from .base import MAX_CONFIG_BYTES, AdapterLimits, AdapterMeta, PromptAdapter
from .ept import EptAdapter
from .lamp import LampAdapter
from .peft import CONFIG_FILE, MODEL_FILE, adapter_from_peft
from .safetensors_io import load_tensors, read_limited
from .soft_prompt import SoftPromptAdapter

# Every kind a `.safetensors` adapter can be, by its metadata `format` (PEFT folders load as soft prompts).
KINDS: dict[str, type[PromptAdapter]] = {kind.kind: kind for kind in (LampAdapter, SoftPromptAdapter, EptAdapter)}


def validate(adapter: PromptAdapter, hidden_size: int, limits: AdapterLimits) -> PromptAdapter:
    """Check an adapter against the backbone's hidden size and the limits; return it."""
    if not isinstance(adapter, PromptAdapter) or type(adapter) not in KINDS.values():
        raise AdapterError(f"unsupported adapter type {type(adapter).__name__}")
    return adapter.validate(hidden_size, limits)


def _formats() -> str:
    names = [repr(kind) for kind in KINDS]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def adapter_from_safetensors(data: bytes, source: str = "adapter", pool: int | None = None) -> PromptAdapter:
    """Parse a `.safetensors` payload of any registered kind (not yet validated against a backbone)."""
    metadata, tensors = load_tensors(data)
    if pool is not None:
        metadata = {**metadata, "pool": str(pool)}
    fmt = metadata.get("format")
    meta = AdapterMeta.from_metadata(metadata, source)
    kind = KINDS.get(fmt)
    if kind is None:
        raise AdapterError(f"{source}: metadata format must be {_formats()}, got {fmt!r}")
    return kind.from_tensors(meta, tensors)


def load_adapter(path: str | Path, hidden_size: int, limits: AdapterLimits | None = None,
                 pool: int | None = None) -> PromptAdapter:
    """Load and validate an adapter from a `.safetensors` file or a PEFT folder."""
    limits = limits or AdapterLimits()
    path = Path(path)
    if path.is_dir():
        config_path, model_path = path / CONFIG_FILE, path / MODEL_FILE
        if not config_path.is_file() or not model_path.is_file():
            raise AdapterError(
                f"{path}: a PEFT folder needs {CONFIG_FILE} and {MODEL_FILE} "
                "(pickled adapter_model.bin is not accepted)"
            )
        adapter = adapter_from_peft(
            read_limited(config_path, MAX_CONFIG_BYTES),
            read_limited(model_path, limits.max_file_bytes), str(path), pool,
        )
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise AdapterError(f"{path.name}: only .safetensors adapters are accepted")
        adapter = adapter_from_safetensors(read_limited(path, limits.max_file_bytes), path.name, pool)
    else:
        raise AdapterError(f"{path}: no such adapter file or folder")
    return validate(adapter, hidden_size, limits)


def save_adapter(adapter: PromptAdapter, path: str | Path) -> Path:
    """Write an adapter in the format `load_adapter` reads (PEFT ones become `soft_prompt`)."""
    from safetensors.torch import save_file

    fmt = SoftPromptAdapter.kind if isinstance(adapter, SoftPromptAdapter) else adapter.kind
    tensors = {k: t.detach().to(torch.float32).contiguous().cpu() for k, t in adapter.tensors().items()}
    save_file(tensors, str(path), metadata=adapter.meta.to_metadata(fmt))
    return Path(path)
