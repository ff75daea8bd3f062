"""`lamp bench savings`: what pooling saves as `/metrics` reports it, against what it measurably saves.

One real `lamp serve` (one replica, the embedded backbone; the prompt-KV cache off, so every
prefill runs its soft prompt; batch size 1, so each step is one request's) serves two versions of
one LAMP adapter of length l: pool 1 and pool p. Requests alternate between them, so load changes
hit both alike. Measured per request, from the counters' differences over the measured rounds:
the soft-prompt tokens and KV bytes saved (exact counts), and the prefill seconds saved as the
replica estimates them (`lamp_prefill_seconds_saved_total`, serving/metrics/token_cost.py) next to
the measured difference of the two versions' median prefill times (each response's
`timings_ms.prefill`). tests/serving/test_savings_metrics.py runs `measure_savings` too and checks
the exact counts; the estimate's accuracy is a timing, so it is reported here, not asserted there.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .server import start_server

INPUT = "Summarise the weather report for tomorrow morning:"
COUNTERS = ("lamp_soft_prompt_tokens_saved_total", "lamp_kv_cache_bytes_saved_total",
            "lamp_prefill_seconds_saved_total", "lamp_prefill_tokens_total", "lamp_prefill_seconds_count")
SETTLE_TIMEOUT_S = 30.0
SETTLE_POLL_S = 0.6  # replicas push their metrics every 0.5 s
# What `measure_savings` assumes of the server: every prefill runs its soft prompt (no prompt-KV
# cache) and each step is one request's (batch 1).
SERVER_ARGS = ("--prompt-kv-cache-mb", "0", "--max-batch-size", "1")


@dataclass(frozen=True)
class SavingsBenchConfig:
    length: int = 200
    pool: int = 10
    rank: int = 8
    rounds: int = 30
    warmup: int = 8  # per version; the per-token cost fit needs 16 steps of different sizes
    seed: int = 41

    def __post_init__(self):
        for name in ("length", "rank", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.pool <= self.length:
            raise ValueError(f"pool must be in 2..length ({self.length}), got {self.pool}")
        if self.rank > self.length:
            raise ValueError(f"rank must be <= length ({self.length}), got {self.rank}")
        if self.warmup < 8:
            raise ValueError(f"warmup must be >= 8 per version (the estimate needs 16 steps), got {self.warmup}")


def task_names(pool: int) -> tuple[str, str]:
    """The two versions' task ids: unpooled first."""
    return "savings-p1", f"savings-p{pool}"


def savings_adapters(embedding_weight, config: SavingsBenchConfig) -> dict[str, bytes]:
    """The pool-1 and pool-p versions of one LAMP adapter made from real token embeddings."""
    from lamp_runtime.adapters import save_adapter
    from lamp_runtime.bench.workload import lamp_from_prompt, vocabulary_prompt

    prompt = vocabulary_prompt(embedding_weight, config.length, config.seed)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task, pool in zip(task_names(config.pool), (1, config.pool)):
            adapter = lamp_from_prompt(prompt, rank=config.rank, pool=pool)
            files[task] = save_adapter(adapter, Path(tmp) / f"{task}.safetensors").read_bytes()
    return files


def metric_sums(client: httpx.Client, names: tuple[str, ...]) -> dict[str, float]:
    """Each metric's samples summed over every label (replicas, tasks) at the ingress `/metrics`."""
    wanted = set(names)
    sums = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name in wanted:
                sums[sample.name] += sample.value
    return sums


def settled_counters(client: httpx.Client, prefills: int) -> dict[str, float]:
    """The counters once `/metrics` shows `prefills` prefills and two reads a push apart agree
    (a replica pushes its metrics every 0.5 s: a read right after a response can miss it)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        now = metric_sums(client, COUNTERS)
        if now["lamp_prefill_seconds_count"] >= prefills and now == last:
            return now
        last = now
        time.sleep(SETTLE_POLL_S)
    raise RuntimeError(f"/metrics did not settle on {prefills} prefills within {SETTLE_TIMEOUT_S:.0f} s: {last}")


def _generate(client: httpx.Client, task: str) -> dict:
    response = client.post("/generate", json={"task_id": task, "input": INPUT, "max_new_tokens": 2})
    response.raise_for_status()
    return response.json()


def measure_savings(client: httpx.Client, admin_headers: dict, files: dict[str, bytes], rounds: int,
                    warmup: int, prefills_before: int = 0) -> dict:
    """Register `files` (unpooled version first), warm up, then `rounds` interleaved requests of each.

    `client` talks to a server started with `SERVER_ARGS` that served `prefills_before` prefills
    so far. Returns the per-request savings and both versions' prefill times.
    """
    for task, data in files.items():
        client.put(f"/admin/adapters/{task}", headers=admin_headers,
                   files={"adapter": ("a.safetensors", data)}).raise_for_status()
    for _ in range(warmup):
        for task in files:
            _generate(client, task)
    before = settled_counters(client, prefills_before + warmup * len(files))
    prefill_ms: dict[str, list[float]] = {task: [] for task in files}
    input_tokens = 0
    for i in range(rounds):
        for task in files:
            body = _generate(client, task)
            prefill_ms[task].append(body["timings_ms"]["prefill"])
            input_tokens = body["usage"]["input_tokens"]
        print(f"round {i + 1}/{rounds}", file=sys.stderr, flush=True)
    after = settled_counters(client, prefills_before + (warmup + rounds) * len(files))
    delta = {name: after[name] - before[name] for name in COUNTERS}
    unpooled, pooled = files
    medians = {task: statistics.median(times) for task, times in prefill_ms.items()}
    measured_ms = medians[unpooled] - medians[pooled]
    estimated_ms = delta["lamp_prefill_seconds_saved_total"] / rounds * 1000
    return {
        "requests": rounds * len(files), "input_tokens": input_tokens,
        "prefills": delta["lamp_prefill_seconds_count"], "prefill_tokens": delta["lamp_prefill_tokens_total"],
        "tokens_saved_per_request": delta["lamp_soft_prompt_tokens_saved_total"] / rounds,
        "kv_bytes_saved_per_request": delta["lamp_kv_cache_bytes_saved_total"] / rounds,
        "prefill_ms_p50": {task: round(ms, 2) for task, ms in medians.items()},
        "prefill_ms": {task: [round(ms, 2) for ms in times] for task, times in prefill_ms.items()},
        "measured_saved_ms": round(measured_ms, 2), "estimated_saved_ms": round(estimated_ms, 2),
        "estimate_over_measured": round(estimated_ms / measured_ms, 3) if measured_ms > 0 else None,
    }


def run_savings_bench(config: SavingsBenchConfig) -> dict:
    import torch

    from lamp_runtime.backbone.checkpoint import backbone_folder
    from lamp_runtime.backbone.embedding_table import load_embedding_table
    from lamp_runtime.backbone.options import BackboneOptions
    from lamp_runtime.bench.workload import machine_context

    folder, _ = backbone_folder(BackboneOptions())
    files = savings_adapters(load_embedding_table(folder, torch.float32).weight, config)
    work = Path(tempfile.mkdtemp(prefix="lamp-bench-savings-"))
    context = machine_context()
    server = start_server(work / "store", work / "serve.log", list(SERVER_ARGS))
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            result = measure_savings(client, server.admin_headers, files, config.rounds, config.warmup)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"bench": "savings", "config": asdict(config), "machine": context, "load_after": os.getloadavg(),
            **result}
