"""Adapter files in and out of the store: uploads, bundled `prompts/` files, stored versions.

Everything that enters the store is parsed and validated against the backbone's hidden size and
`AdapterLimits` once, then written in our own safetensors format (PEFT checkpoints become
`soft_prompt` files) and read back once, to check the file holds exactly the validated tensors,
before the store records it with its sha256 and the facts a replica registers it by. A replica
registers a version from that record alone (`stored_reference`: no file opened) and reads the file
on a resident miss (`load_stored`), checking its hash and its shapes against this backbone, not the
values again: the hash says they are the bytes that were validated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch

from lamp_runtime.adapters import (
    MAX_CONFIG_BYTES,
    AdapterLimits,
    AdapterMeta,
    PromptAdapter,
    adapter_from_peft,
    adapter_from_safetensors,
    load_adapter,
    parse_pool,
    save_adapter,
    validate,
)
from lamp_runtime.adapters.base import check_fit
from lamp_runtime.adapters.peft import CONFIG_FILE, MODEL_FILE
from lamp_runtime.adapters.registry import is_valid_task_id
from lamp_runtime.adapters.safetensors_io import read_limited
from lamp_runtime.adapters.stored import StoredAdapterRef
from lamp_runtime.errors import AdapterError

from .base import AdapterFacts, AdapterStore, NewAdapter, StoredAdapter

log = logging.getLogger(__name__)


def parse_pool_field(value: str | None) -> int | None:
    """The optional `pool` form field: absent/empty means 'keep the file's own pool'."""
    if value is None or not value.strip():
        return None
    return parse_pool(value, "form field 'pool'")


def adapter_from_upload(adapter: bytes | None, adapter_config: bytes | None, adapter_model: bytes | None,
                        pool: int | None, hidden_size: int, limits: AdapterLimits) -> PromptAdapter:
    """One `.safetensors` (field `adapter`) or a PEFT pair (`adapter_config` + `adapter_model`)."""
    peft_parts = (adapter_config is not None, adapter_model is not None)
    if adapter is not None and any(peft_parts):
        raise AdapterError("send either field 'adapter' or fields 'adapter_config' + 'adapter_model', not both")
    if adapter is not None:
        parsed = adapter_from_safetensors(adapter, "field 'adapter'", pool)
    elif all(peft_parts):
        parsed = adapter_from_peft(adapter_config, adapter_model, "PEFT upload", pool)
    elif any(peft_parts):
        missing = "adapter_model" if adapter_config is not None else "adapter_config"
        raise AdapterError(f"a PEFT upload needs both 'adapter_config' and 'adapter_model'; {missing!r} is missing")
    else:
        raise AdapterError("no adapter in the upload: send file field 'adapter' (.safetensors) "
                           "or 'adapter_config' + 'adapter_model' (PEFT prompt tuning)")
    return validate(parsed, hidden_size, limits)


def facts_of(adapter: PromptAdapter, hidden_size: int) -> AdapterFacts:
    """What the store records of a validated adapter: all a replica registers it by (sync.py)."""
    return AdapterFacts(kind=adapter.kind, prompt_tokens=adapter.prompt_tokens, pooled_tokens=adapter.pooled_tokens,
                        pool=adapter.meta.pool, hidden_size=hidden_size, host_bytes=adapter.host_bytes,
                        metadata=json.dumps(adapter.meta.to_metadata(adapter.kind), sort_keys=True))


def store_adapter(store: AdapterStore, task_id: str, adapter: PromptAdapter, hidden_size: int,
                  limits: AdapterLimits, source: str = "upload",
                  bundled_sha: str | None = None) -> StoredAdapter | None:
    """Write a validated adapter as the next version of `task_id` (see AdapterStore.put)."""
    return store.put(task_id, lambda path: save_adapter(adapter, path), facts_of(adapter, hidden_size), source=source,
                     verify=partial(_verify, adapter=adapter, hidden_size=hidden_size, limits=limits),
                     bundled_sha=bundled_sha)


def store_adapters(store: AdapterStore, adapters: list[tuple[str, PromptAdapter]], hidden_size: int,
                   limits: AdapterLimits) -> list[StoredAdapter | Exception]:
    """Write many validated adapters (a batch registration; see AdapterStore.put_many)."""
    items = [NewAdapter(task_id, partial(save_adapter, adapter), facts_of(adapter, hidden_size),
                        verify=partial(_verify, adapter=adapter, hidden_size=hidden_size, limits=limits))
             for task_id, adapter in adapters]
    return store.put_many(items)


def _verify(path: Path, adapter: PromptAdapter, hidden_size: int, limits: AdapterLimits) -> None:
    """The written file holds exactly the validated adapter (so its hash stands for that validation),
    and fits this backbone."""
    written = adapter_from_safetensors(read_limited(path, limits.max_file_bytes), path.name)
    written.check_fits(hidden_size, limits)
    same = type(written) is type(adapter) and written.meta.pool == adapter.meta.pool and all(
        torch.equal(a, b) for a, b in zip(written.tensors().values(), adapter.tensors().values()))
    if not same:
        raise AdapterError(f"{path}: the written file does not read back as the validated adapter")


def load_stored(path: Path, expected_sha256: str, hidden_size: int, limits: AdapterLimits) -> PromptAdapter:
    """Read one stored version, refusing it if its bytes are not the ones the store recorded when
    it validated and wrote them; only the shapes are checked again (against this backbone)."""
    data = read_limited(path, limits.max_file_bytes)
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise AdapterError(f"{path}: content hash {actual[:12]}… does not match the store's record "
                           f"({expected_sha256[:12]}…)")
    return adapter_from_safetensors(data, path.name).check_fits(hidden_size, limits)


def stored_reference(stored: StoredAdapter, hidden_size: int, limits: AdapterLimits,
                     load: Callable[[], PromptAdapter]) -> StoredAdapterRef:
    """A version registered from its record alone (`stored.registers_from_row`): its facts checked
    against this backbone and these limits, its file not opened; `load` reads and hash-checks it
    when a request first needs its factors (engine/resident.py)."""
    check_fit(stored.hidden_size, stored.prompt_tokens, stored.pool, hidden_size, limits)
    try:
        meta = _recorded_meta(stored.metadata)
    except (ValueError, AdapterError) as exc:
        raise AdapterError(f"{stored.task_id} v{stored.version}: its recorded metadata is damaged ({exc})") from None
    return StoredAdapterRef(stored.kind, stored.prompt_tokens, stored.pooled_tokens, meta, stored.host_bytes, load)


@lru_cache(maxsize=4096)
def _recorded_meta(text: str) -> AdapterMeta:
    """Parsed once per distinct text: tasks tuned the same way record the same metadata, and a start
    parses it for each of 100,000 rows. The shared AdapterMeta is frozen and never changed."""
    metadata = json.loads(text)
    if not isinstance(metadata, dict):
        raise ValueError(f"a JSON object was expected, got {type(metadata).__name__}")
    return AdapterMeta.from_metadata(metadata, "recorded metadata")


@dataclass(frozen=True)
class BundledAdapter:
    task_id: str
    path: Path

    def sha256(self, limits: AdapterLimits) -> str:
        digest = hashlib.sha256()
        if self.path.is_dir():
            digest.update(read_limited(self.path / CONFIG_FILE, MAX_CONFIG_BYTES))
            digest.update(read_limited(self.path / MODEL_FILE, limits.max_file_bytes))
        else:
            digest.update(read_limited(self.path, limits.max_file_bytes))
        return digest.hexdigest()


def discover_bundled(prompts_dir: Path | None) -> list[BundledAdapter]:
    """Top-level `*.safetensors` (task id = file stem) and PEFT folders (task id = folder name).

    Other entries (the training data under `prompts/data`, notes) are not adapters and are skipped.
    """
    if prompts_dir is None or not prompts_dir.is_dir():
        return []
    found = []
    for path in sorted(prompts_dir.iterdir()):
        if path.is_file() and path.suffix == ".safetensors":
            task_id = path.stem
        elif path.is_dir() and (path / CONFIG_FILE).is_file():
            task_id = path.name
        else:
            continue
        if not is_valid_task_id(task_id):
            log.warning("skipping bundled adapter %s: %r is not a valid task id", path, task_id)
            continue
        found.append(BundledAdapter(task_id, path))
    return found


def import_bundled(store: AdapterStore, prompts_dir: Path | None, hidden_size: int,
                   limits: AdapterLimits) -> list[StoredAdapter]:
    """Register every bundled adapter whose content was not imported before.

    A task whose bundled file is unchanged since its last import is left alone, so an adapter an
    operator uploaded (or deleted) over the admin API survives restarts; a retrained bundled file
    (new content) becomes a new version. A broken bundled file is logged and skipped: it must not
    keep the server, and the adapters that are fine, from starting.
    """
    imported = []
    for bundled in discover_bundled(prompts_dir):
        try:
            sha = bundled.sha256(limits)
            if store.bundled_sha(bundled.task_id) == sha:
                continue
            adapter = load_adapter(bundled.path, hidden_size, limits)
            stored = store_adapter(store, bundled.task_id, adapter, hidden_size, limits,
                                   source=f"bundled:{bundled.path.name}", bundled_sha=sha)
        except (AdapterError, OSError) as exc:
            log.error("bundled adapter %s not registered: %s", bundled.path, exc)
            continue
        if stored is not None:
            imported.append(stored)
            log.info("registered bundled adapter %s as %s v%d", bundled.path.name, stored.task_id, stored.version)
    return imported
