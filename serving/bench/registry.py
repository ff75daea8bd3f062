"""`lamp bench registry`: many adapters registered through a real `lamp serve`'s admin API.

One server (one replica, the embedded backbone) with an empty store; adapters are registered with
the batch route up to each task count in `tasks`; there it measures:
- single `PUT /admin/adapters/{task}` latency, p50/p99 over `samples` uploads (flat = O(1) in tasks);
- a replica's sync cost per change: a `StoreSync` in this process, caught up, then one change and one
  `refresh()` (what each replica does per change), p50 over `samples`;
- a page of `GET /admin/adapters` and of `/v1/models` (limit 100, from the middle);
- the server's resident memory (every process it started: Ray, ingress, replica) after serving
  `requests` generations for tasks drawn at random.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from .server import start_server

TABLE_COLUMNS = (
    ("tasks", "tasks", "d"), ("batch_ms_per_adapter", "batch ms/adapter", ".2f"),
    ("put_p50_ms", "PUT p50 ms", ".1f"), ("put_p99_ms", "PUT p99 ms", ".1f"),
    ("sync_p50_ms", "sync/change p50 ms", ".2f"), ("page_ms", "page ms", ".1f"),
    ("models_page_ms", "/v1/models page ms", ".1f"), ("server_rss_mb", "server RSS MB", ".0f"),
    ("generate_p50_ms", "generate p50 ms", ".0f"),
)


@dataclass(frozen=True)
class RegistryBenchConfig:
    registry: str = "sqlite"
    tasks: tuple[int, ...] = (1000, 10000, 100000)
    batch: int = 500
    samples: int = 30
    requests: int = 40
    length: int = 100
    rank: int = 8
    store: str | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.tasks or sorted(self.tasks) != list(self.tasks) or self.tasks[0] < 1:
            raise ValueError(f"tasks must be increasing positive counts, got {self.tasks}")
        for name in ("batch", "samples", "requests", "length", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _adapter_files(config: RegistryBenchConfig, count: int = 16) -> list[bytes]:
    """A few distinct LAMP adapters (l x r factors on the embedded backbone's hidden size), cycled."""
    import torch

    from lamp_runtime.adapters import AdapterMeta, LampAdapter, save_adapter

    files = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            g = torch.Generator().manual_seed(config.seed * 1000 + i)
            adapter = LampAdapter(AdapterMeta(pool=1), torch.randn(config.length, config.rank, generator=g) * 0.1,
                                  torch.rand(config.rank, generator=g) + 0.5,
                                  torch.randn(config.rank, 576, generator=g) * 0.01)
            files.append(save_adapter(adapter, Path(tmp) / f"{i}.safetensors").read_bytes())
    return files


def _register_batch(client: httpx.Client, start: int, count: int, files: list[bytes]) -> float:
    parts = [(f"adapter.task-{i:06d}", ("a.safetensors", files[i % len(files)])) for i in range(start, start + count)]
    began = time.perf_counter()
    response = client.post("/admin/adapters", files=parts)
    elapsed = time.perf_counter() - began
    response.raise_for_status()
    body = response.json()
    if body["failed"]:
        raise RuntimeError(f"batch registration failed for {body['failed']} adapters: {body['results'][:3]}")
    return elapsed


def _sync_cost(store, config: RegistryBenchConfig, files: list[bytes], samples: int) -> list[float]:
    """Seconds per `StoreSync.refresh()` that applies one change, with the registry at its size."""
    from lamp_runtime.adapters import AdapterLimits, load_adapter
    from lamp_runtime.adapters.registry import AdapterRegistry
    from lamp_runtime.prompts.cache import PromptCache

    from ..store.files import facts_of
    from ..store.sync import StoreSync

    limits = AdapterLimits()
    sync = StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), 576, limits)
    sync._cursor = store.change_key()  # caught up, as a running replica is: only later changes count
    sync._seen_key = sync._cursor
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        path.write_bytes(files[0])
        facts = facts_of(load_adapter(path, 576, limits), 576)
        for i in range(samples):
            store.put(f"sync-probe-{i % 4}", lambda p: shutil.copyfile(path, p), facts)
            began = time.perf_counter()
            report = sync.refresh()
            times.append(time.perf_counter() - began)
            if len(report.loaded) != 1:
                raise RuntimeError(f"a sync after one change loaded {report.loaded}")
    return times


def run_registry_bench(config: RegistryBenchConfig, on_progress=None) -> dict:
    """The report; `on_progress(report)` gets it after each task count too (`complete` False), so
    a long run that is stopped still leaves what it measured."""
    from lamp_runtime.bench.workload import machine_context

    from ..store.registry import open_store

    rng = random.Random(config.seed)
    files = _adapter_files(config)
    folder = Path(config.store) if config.store else Path(tempfile.mkdtemp(prefix="lamp-bench-registry-"))
    folder.mkdir(parents=True, exist_ok=True)
    registry = None if config.registry == "sqlite" else config.registry
    context = machine_context()
    rows = []
    backend = "sqlite" if registry is None else "postgresql"
    report = {"bench": "registry", "config": asdict(config), "backend": backend, "machine": context,
              "adapter_bytes": len(files[0]), "complete": False,
              "rows": rows}
    server = start_server(folder / "store", folder / "serve.log", [
        "--max-upload-bytes", str(64 << 20), *(["--registry", registry] if registry else [])])
    try:
        store = open_store(folder / "store", registry)
        with httpx.Client(base_url=server.url, headers=server.admin_headers, timeout=600) as client:
            registered, batch_seconds = 0, 0.0
            began = time.perf_counter()
            for target in config.tasks:
                window_s, window_n = 0.0, 0
                while registered < target:
                    count = min(config.batch, target - registered)
                    elapsed = _register_batch(client, registered, count, files)
                    window_s, window_n = window_s + elapsed, window_n + count
                    registered += count
                    print(f"registered {registered}/{config.tasks[-1]}", file=sys.stderr, flush=True)
                batch_seconds += window_s
                rows.append(_measure(client, server, store, config, files, rng, target, window_s / max(window_n, 1)))
                report.update(load_after=os.getloadavg(), elapsed_s=round(time.perf_counter() - began, 1),
                              batch_registration_s=round(batch_seconds, 1))
                print(rows[-1], file=sys.stderr, flush=True)
                if on_progress is not None:
                    on_progress(report)
    finally:
        server.stop()
        if not config.store:
            shutil.rmtree(folder, ignore_errors=True)
    report["complete"] = True
    return report


def _measure(client, server, store, config, files, rng, tasks: int, batch_s_per_adapter: float) -> dict:
    puts = []
    for i in range(config.samples):
        began = time.perf_counter()
        client.put(f"/admin/adapters/task-{rng.randrange(tasks):06d}",
                   files={"adapter": ("a.safetensors", files[i % len(files)])}).raise_for_status()
        puts.append(time.perf_counter() - began)
    sync = _sync_cost(store, config, files, config.samples)
    middle = f"task-{tasks // 2:06d}"
    began = time.perf_counter()
    page = client.get("/admin/adapters", params={"limit": 100, "after": middle}).json()
    page_s = time.perf_counter() - began
    began = time.perf_counter()
    models = client.get("/v1/models", params={"limit": 100, "after": middle}).json()
    models_s = time.perf_counter() - began
    if page["total"] < tasks or models["total"] != page["total"]:
        raise RuntimeError(f"the server lists {page['total']} tasks, expected at least {tasks}")
    generations = []
    for _ in range(config.requests):
        task = f"task-{rng.randrange(tasks):06d}"
        began = time.perf_counter()
        client.post("/generate", json={"task_id": task, "input": "Hello", "max_new_tokens": 2}).raise_for_status()
        generations.append(time.perf_counter() - began)
    return {
        "tasks": tasks, "batch_ms_per_adapter": round(batch_s_per_adapter * 1000, 3),
        "put_p50_ms": round(_percentile(puts, 0.5) * 1000, 2), "put_p99_ms": round(_percentile(puts, 0.99) * 1000, 2),
        "sync_p50_ms": round(_percentile(sync, 0.5) * 1000, 3), "sync_p99_ms": round(_percentile(sync, 0.99) * 1000, 3),
        "page_ms": round(page_s * 1000, 2), "models_page_ms": round(models_s * 1000, 2),
        "server_rss_mb": round(server.rss_bytes() / 2**20, 1),
        "generate_p50_ms": round(_percentile(generations, 0.5) * 1000, 1),
        "load_average": os.getloadavg(),
    }
