"""`lamp bench start`: how long a replica takes to become healthy with many registered tasks.

The store is filled directly: one LAMP adapter file (l x r on the embedded backbone's d=576),
hard-linked as every task's v1 (versions are immutable files), and the rows written in one
transaction by the registry's own `make_current_many`, as `put_many` leaves them, without writing
100,000 copies. Measured, variants interleaved `rounds` times:
- the replica's store sync at start (`StoreSync.refresh()` from nothing, in this process), which
  registers every task from its row alone, and the work the start did before on top of it (and
  still does for rows of registry schema 1): reading and checking every task's file;
- a real `lamp serve` (one replica) from launch to its first /healthz 200, on an empty store (SQLite)
  and on the filled one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .server import start_server

HIDDEN = 576
LINKS_PER_FILE = 50_000


@dataclass(frozen=True)
class StartBenchConfig:
    registry: str = "sqlite"
    tasks: int = 100_000
    rounds: int = 1
    length: int = 100
    rank: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("tasks", "rounds", "length", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def fill_store(folder: Path, registry: str | None, config: StartBenchConfig):
    """The store with `config.tasks` tasks (`task-000000`...), each v1 a link to one adapter file."""
    import torch

    from lamp_runtime.adapters import AdapterMeta, LampAdapter, save_adapter

    from ..store.base import AdapterStore, StoredAdapter
    from ..store.files import facts_of
    from ..store.registry import open_store

    g = torch.Generator().manual_seed(config.seed)
    adapter = LampAdapter(AdapterMeta(pool=1), torch.randn(config.length, config.rank, generator=g) * 0.1,
                          torch.rand(config.rank, generator=g) + 0.5,
                          torch.randn(config.rank, HIDDEN, generator=g) * 0.01)
    store = open_store(folder, registry)
    source = save_adapter(adapter, folder.parent / "source.safetensors")
    facts, size, sha = facts_of(adapter, HIDDEN), source.stat().st_size, AdapterStore.sha256_of(source)
    rows = []
    for i in range(config.tasks):
        stored = StoredAdapter.written(f"task-{i:06d}", 1, facts, size, sha, "upload")
        target = store.path_of(stored)
        target.parent.mkdir(exist_ok=True)
        if i % LINKS_PER_FILE == 0:  # a fresh copy: a file takes at most 65,000 links on ext4
            copy = source.with_name(f"source-{i}.safetensors")
            shutil.copyfile(source, copy)
        os.link(copy, target)
        rows.append(stored)
    store.db.make_current_many(rows)
    return store


def _sync_start(store) -> tuple[float, float]:
    """Seconds of a start's sync from rows alone, then of reading and checking every file after it."""
    from lamp_runtime.adapters import AdapterLimits
    from lamp_runtime.adapters.registry import AdapterRegistry
    from lamp_runtime.prompts.cache import PromptCache

    from ..store.sync import StoreSync

    registry = AdapterRegistry()
    sync = StoreSync(store, registry, PromptCache(1 << 20), HIDDEN, AdapterLimits())
    began = time.perf_counter()
    report = sync.refresh()
    rows_s = time.perf_counter() - began
    if report.failed or len(registry) != len(report.loaded):
        raise RuntimeError(f"the start sync failed for {report.failed[:3]}")
    began = time.perf_counter()
    for entry in registry.entries():
        entry.adapter.load()
    return rows_s, time.perf_counter() - began


def _healthy_after(store: Path, log: Path, registry: str | None) -> float:
    began = time.perf_counter()
    server = start_server(store, log, ["--registry", registry] if registry else [])
    elapsed = time.perf_counter() - began
    server.stop()
    return elapsed


def run_start_bench(config: StartBenchConfig) -> dict:
    from lamp_runtime.machine import machine_context

    registry = None if config.registry == "sqlite" else config.registry
    work = Path(tempfile.mkdtemp(prefix="lamp-bench-start-"))
    report = {"bench": "start", "config": asdict(config), "backend": "sqlite" if registry is None else "postgresql",
              "machine": machine_context(), "rounds": []}
    try:
        began = time.perf_counter()
        store = fill_store(work / "store", registry, config)
        report["fill_s"] = round(time.perf_counter() - began, 1)
        for i in range(config.rounds):
            rows_s, files_s = _sync_start(store)
            empty_s = _healthy_after(work / f"empty-{i}", work / "serve.log", None)  # SQLite, no task
            filled_s = _healthy_after(work / "store", work / "serve.log", registry)
            row = {"sync_from_rows_s": round(rows_s, 2), "read_every_file_s": round(files_s, 2),
                   "healthy_empty_s": round(empty_s, 1), "healthy_filled_s": round(filled_s, 1),
                   "load_average": os.getloadavg()}
            report["rounds"].append(row)
            print(f"round {i + 1}: {row}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_after"] = os.getloadavg()
    return report
