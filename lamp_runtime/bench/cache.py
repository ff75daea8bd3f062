"""`lamp bench cache`: what a prompt-cache miss costs against a hit, and the memory per task.

With 10, 1,000 and 10,000 registered LAMP tasks: a miss looks the task up, rebuilds its prompt
(U·diag(Q)·V, one GEMM), pools it and moves it to the device; a hit only looks it up and pins
the cached tensor. Host memory per task is what the registry keeps (the factors); device memory
per cached task is the pooled prompt. No model is loaded: only the hidden size matters here.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import psutil
import torch
from tqdm import tqdm

from ..adapters import AdapterMeta, LampAdapter
from ..adapters.registry import AdapterRegistry
from ..backbone.hf import DTYPES
from ..engine.base import EngineConfig
from ..errors import require_at_least
from ..prompts.cache import PromptCache
from ..prompts.math import pooled_length
from ..prompts.prepared import prepare
from .stats import interleaved, safe_ratio, summarize
from .workload import gaussian_prompt, lamp_from_prompt, load_average, machine_context

# Distinct factor sets to draw from: SVDs of 10,000 prompts would dominate the bench's run time
# while telling nothing more (cost depends on shapes only); each task still gets its own copy.
FACTOR_SETS = 16
HOT_TASKS = 8


@dataclass(frozen=True)
class CacheBenchConfig:
    task_counts: tuple[int, ...] = (10, 1000, 10000)
    length: int = 100
    rank: int = 16
    pool: int = 4
    hidden_size: int = 576
    samples: int = 200
    repeats: int = 5
    cache_bytes: int = EngineConfig.prompt_cache_bytes
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        if not self.task_counts or any(not isinstance(n, int) or n < HOT_TASKS + 1 for n in self.task_counts):
            raise ValueError(f"task_counts must be integers >= {HOT_TASKS + 1} (the hot set plus one), "
                             f"got {list(self.task_counts)}")
        require_at_least(self, 1, "length", "rank", "pool", "hidden_size", "samples", "repeats", "cache_bytes")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; use one of {sorted(DTYPES)}")


def task_id(index: int) -> str:
    return f"cache-task-{index}"


class _Population:
    """N registered tasks, their own prompt cache, and a cursor over the cold tasks."""

    def __init__(self, count: int, factor_sets: list[LampAdapter], config: CacheBenchConfig, device):
        rss_before = psutil.Process().memory_info().rss
        begin = time.perf_counter()
        self.registry = AdapterRegistry()
        meta = AdapterMeta(pool=config.pool)
        for index in tqdm(range(count), desc=f"register {count} tasks", unit="task", leave=False):
            base = factor_sets[index % len(factor_sets)]
            self.registry.register(task_id(index), LampAdapter(meta, base.u.clone(), base.q.clone(), base.v.clone()))
        self.register_seconds = time.perf_counter() - begin
        self.rss_bytes = psutil.Process().memory_info().rss - rss_before
        self.count = count
        self.device = device
        self.cache = PromptCache(config.cache_bytes, device, DTYPES[config.dtype])
        self.hot = [task_id(i) for i in range(HOT_TASKS)]
        for task in self.hot:
            self._lookup(task)
        self._next_cold = HOT_TASKS

    def _lookup(self, task: str) -> float:
        """What the engine does per request: resolve the task, acquire its prompt, release it."""
        begin = time.perf_counter()
        entry = self.registry.get(task)
        self.cache.acquire(entry.cache_key, lambda: prepare(entry.adapter))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.cache.release(entry.cache_key)
        return time.perf_counter() - begin

    def miss(self) -> float:
        task = task_id(self._next_cold)
        self._next_cold = self._next_cold + 1 if self._next_cold + 1 < self.count else HOT_TASKS
        self.cache.discard(self.registry.get(task).cache_key)  # make sure it is cold; untimed
        return self._lookup(task)

    def hit(self, index: int) -> float:
        return self._lookup(self.hot[index % len(self.hot)])

    def fill(self) -> dict:
        """Touch every task once, as a long tail of traffic would: how much of it stays cached."""
        evictions_before = self.cache.stats().evictions
        for index in tqdm(range(self.count), desc=f"touch {self.count} tasks", unit="task", leave=False):
            self._lookup(task_id(index))
        stats = self.cache.stats()
        return {"entries": stats.entries, "bytes": stats.bytes, "evictions": stats.evictions - evictions_before}


def run_cache_bench(config: CacheBenchConfig) -> dict:
    started = time.perf_counter()
    context = machine_context()
    device = torch.device(config.device)
    factor_sets = [
        lamp_from_prompt(gaussian_prompt(config.hidden_size, config.length, seed=config.seed + i),
                         rank=min(config.rank, config.length, config.hidden_size), pool=config.pool)
        for i in range(FACTOR_SETS)
    ]
    populations = {n: _Population(n, factor_sets, config, device) for n in config.task_counts}

    def measure(count) -> dict:
        population = populations[count]
        misses, hits = [], []
        for index in range(config.samples):  # alternated, so both see the same moment's noise
            misses.append(population.miss())
            hits.append(population.hit(index))
        return {"miss_s": misses, "hit_s": hits}

    samples = interleaved(list(config.task_counts), measure, config.repeats, warmup=1, seed=config.seed,
                          description="bench cache")
    prompt_tokens = pooled_length(config.length, config.pool)
    element = torch.empty((), dtype=DTYPES[config.dtype]).element_size()
    device_bytes = prompt_tokens * config.hidden_size * element
    rows = []
    for count in config.task_counts:
        population = populations[count]
        miss = summarize([1e6 * s for run in samples[count] for s in run["miss_s"]])
        hit = summarize([1e6 * s for run in samples[count] for s in run["hit_s"]])
        host = sum(e.adapter.host_bytes for e in population.registry.entries())
        rows.append({
            "tasks": count,
            "miss_us": miss.median,
            "hit_us": hit.median,
            "miss_vs_hit": safe_ratio(miss.median, hit.median),
            "host_bytes_per_task": host / count,
            "host_rss_bytes_per_task": population.rss_bytes / count,
            "device_bytes_per_cached_task": device_bytes,
            "tasks_that_fit": min(count, config.cache_bytes // device_bytes),
            "after_touching_all": population.fill(),
            "register_seconds": population.register_seconds,
            "spread": {"miss_us": miss.as_dict(), "hit_us": hit.as_dict()},
        })
    return {
        "bench": "cache",
        "config": dataclasses.asdict(config),
        "machine": context,
        "soft_prompt_tokens": prompt_tokens,
        "rows": rows,
        "notes": {
            "miss_us": "registry lookup + U·diag(Q)·V + average pool + move to device/dtype + pin + unpin",
            "hit_us": "registry lookup + cache lookup + pin + unpin",
            "host_bytes_per_task": "factor bytes the registry keeps per task (U, Q, V in float32)",
            "host_rss_bytes_per_task": "process RSS growth while registering, per task (includes Python "
                                       "object overhead; noisy for small counts)",
            "device_bytes_per_cached_task": "pooled prompt tokens x hidden size x element size",
        },
        "elapsed_s": time.perf_counter() - started,
        "load_average_end": load_average(),
    }


TABLE_COLUMNS = (
    ("tasks", "tasks", ","), ("miss_us", "miss µs", ".1f"), ("miss_iqr", "miss IQR", "s"), ("hit_us", "hit µs", ".1f"),
    ("hit_iqr", "hit IQR", "s"), ("miss_vs_hit", "miss/hit", ".1f"), ("host_kb", "host KB/task", ".1f"),
    ("rss_kb", "RSS KB/task", ".1f"), ("device_kb", "device KB/task", ".1f"), ("tasks_that_fit", "fit in cache", ","),
)


def table_rows(report: dict) -> list[dict]:
    out = []
    for row in report["rows"]:
        miss, hit = row["spread"]["miss_us"], row["spread"]["hit_us"]
        out.append({**row, "miss_iqr": f"{miss['q1']:.1f}-{miss['q3']:.1f}", "hit_iqr": f"{hit['q1']:.1f}-{hit['q3']:.1f}",
                    "host_kb": row["host_bytes_per_task"] / 1024, "rss_kb": row["host_rss_bytes_per_task"] / 1024,
                    "device_kb": row["device_bytes_per_cached_task"] / 1024})
    return out
