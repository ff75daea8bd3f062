"""The status page's data (`GET /status.json`, drawn by `GET /`): registered tasks, live traffic
and latency by task, and what pooling saved, read from the same metric snapshots `/metrics` shows.

Everything here is computed from the replicas' counters and histograms summed over replicas, so
the page and `/metrics` cannot disagree. Rates and latency quantiles are over the last
`WINDOW_S` seconds: the board keeps a short history of those sums (one point per
`SAMPLE_EVERY_S`, `HISTORY_S` long, sampled by the ingress whether or not anyone watches) and
differences the newest against the one a window ago, as PromQL's `rate` and
`histogram_quantile` would. The history is also the page's chart.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from .metrics.hub import Family
from .store.base import StoredAdapter

WINDOW_S = 60.0
SAMPLE_EVERY_S = 5.0
HISTORY_S = 600.0
MAX_TASKS_SHOWN = 200  # a deployment with 100,000 tasks shows its busiest ones

# Counters and gauges summed over every replica (and the ingress): the page's totals.
TOTALS = {
    "requests": "lamp_requests_total",
    "generated_tokens": "lamp_generated_tokens_total",
    "soft_prompt_tokens": "lamp_soft_prompt_tokens_total",
    "soft_prompt_tokens_saved": "lamp_soft_prompt_tokens_saved_total",
    "prefill_seconds_saved": "lamp_prefill_seconds_saved_total",
    "prefill_seconds": "lamp_prefill_seconds_sum",
    "kv_cache_bytes_saved": "lamp_kv_cache_bytes_saved_total",
    "kv_cache_bytes": "lamp_kv_cache_bytes",
    "prompt_cache_hits": "lamp_prompt_cache_hits_total",
    "prompt_cache_misses": "lamp_prompt_cache_misses_total",
    "prompt_cache_bytes": "lamp_prompt_cache_bytes",
    "prompt_kv_cache_hits": "lamp_prompt_kv_cache_hits_total",
    "prompt_kv_cache_misses": "lamp_prompt_kv_cache_misses_total",
    "prompt_kv_cache_bytes": "lamp_prompt_kv_cache_bytes",
    "prompt_kv_cache_tasks": "lamp_prompt_kv_cache_tasks",
    "prompt_kv_pooling_saved_bytes": "lamp_prompt_kv_cache_pooling_saved_bytes",
    "backbone_bytes": "lamp_backbone_bytes",
    "requests_running": "lamp_requests_running",
    "requests_waiting": "lamp_requests_waiting",
}
RATES = ("requests", "generated_tokens", "soft_prompt_tokens_saved", "prefill_seconds_saved")
LATENCIES = {"latency": "lamp_request_seconds", "ttft": "lamp_time_to_first_token_seconds"}
PROMPT_KV_BY_TASK = {"lamp_task_prompt_kv_hits_total": 0, "lamp_task_prompt_kv_misses_total": 1}


@dataclass
class Sums:
    """One moment's sums over replicas: totals, and per task the latency histograms' buckets."""

    at: float
    totals: dict[str, float] = field(default_factory=dict)
    requests: dict[str, float] = field(default_factory=dict)  # by task, answered 2xx
    buckets: dict[str, dict[str, dict[float, float]]] = field(default_factory=dict)  # kind -> task -> le -> count
    # Each replica's engine (`lamp_engine_info`'s labels: kind, device, the settings it chose, replica).
    engines: list[dict[str, str]] = field(default_factory=list)
    # The fair queue by task (bounded labels): rows waiting now, requests refused since start by reason.
    waiting: dict[str, float] = field(default_factory=dict)
    refused: dict[str, dict[str, float]] = field(default_factory=dict)
    # The prompt-KV cache's lookups by task (bounded labels) since start: task -> [hits, misses].
    prompt_kv: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def of(cls, snapshots: list[list[Family]], at: float) -> "Sums":
        sums = cls(at, totals=dict.fromkeys(TOTALS, 0.0), buckets={kind: {} for kind in LATENCIES})
        by_sample = {sample: key for key, sample in TOTALS.items()}
        histograms = {f"{name}_bucket": kind for kind, name in LATENCIES.items()}
        requests: dict[str, float] = defaultdict(float)
        for families in snapshots:
            for _name, _type, _doc, _unit, samples in families:
                for sample, labels, value in samples:
                    if sample in by_sample:
                        sums.totals[by_sample[sample]] += value
                    if sample == "lamp_engine_info":
                        sums.engines.append(dict(labels))
                    if sample == "lamp_task_requests_waiting":
                        task = labels.get("task", "other")
                        sums.waiting[task] = sums.waiting.get(task, 0.0) + value
                    if sample == "lamp_task_requests_refused_total":
                        per_reason = sums.refused.setdefault(labels.get("task", "other"), {})
                        reason = labels.get("reason", "")
                        per_reason[reason] = per_reason.get(reason, 0.0) + value
                    if sample in PROMPT_KV_BY_TASK:
                        counts = sums.prompt_kv.setdefault(labels.get("task", "other"), [0.0, 0.0])
                        counts[PROMPT_KV_BY_TASK[sample]] += value
                    if sample == "lamp_requests_total" and labels.get("status", "").startswith("2"):
                        requests[labels.get("task", "other")] += value
                    kind = histograms.get(sample)
                    if kind is not None:
                        per_le = sums.buckets[kind].setdefault(labels.get("task", "other"), defaultdict(float))
                        per_le[float(labels["le"])] += value
        sums.requests = dict(requests)
        return sums


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """`histogram_quantile` of cumulative buckets {upper bound: count} (linear within a bucket)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bucket: its bound is all one can say
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def _minus(new: dict[float, float], old: dict[float, float] | None) -> dict[float, float]:
    old = old or {}
    return {le: max(count - old.get(le, 0.0), 0.0) for le, count in new.items()}


class StatusBoard:
    def __init__(self, window_s: float = WINDOW_S, sample_every_s: float = SAMPLE_EVERY_S,
                 history_s: float = HISTORY_S):
        self.window_s = window_s
        self.sample_every_s = sample_every_s
        self._history: deque[Sums] = deque(maxlen=max(2, int(history_s / sample_every_s) + 1))

    def record(self, sums: Sums) -> None:
        """Keep `sums` in the history if the last point is at least one sample interval old."""
        if not self._history or sums.at - self._history[-1].at >= self.sample_every_s:
            self._history.append(sums)

    def _baseline(self, now: Sums) -> Sums | None:
        """The newest recorded point at least a window older than `now` (else the oldest)."""
        older = [s for s in self._history if s.at <= now.at - self.window_s]
        if older:
            return older[-1]
        return self._history[0] if self._history and self._history[0].at < now.at else None

    def view(self, now: Sums, adapters: list[StoredAdapter]) -> dict:
        self.record(now)
        base = self._baseline(now)
        span = now.at - base.at if base is not None else 0.0

        def rate(value: float, before: float) -> float | None:
            return (value - before) / span if span > 0 else None

        tasks = []
        for adapter in adapters:
            tasks.append(self._task_row(adapter.task_id, now, base, rate) | {
                "kind": adapter.kind, "version": adapter.version, "prompt_tokens": adapter.prompt_tokens,
                "pool": adapter.pool, "served_tokens": adapter.pooled_tokens})
        tasks.sort(key=lambda t: (-(t["requests_per_s"] or 0), -t["requests"], t["task_id"]))
        registered = {a.task_id for a in adapters}
        others = [t for t in set(now.requests) | set(now.buckets["latency"]) if t not in registered]
        return {
            "updated_at": now.at,
            "window_s": round(span, 1),
            "tasks_total": len(adapters),
            "tasks": tasks[:MAX_TASKS_SHOWN],
            "other": [self._task_row(t, now, base, rate) for t in sorted(others)],
            "totals": now.totals,
            "engines": now.engines,
            "queue": self._queue_rows(now, base),
            "rates": {k: rate(now.totals[k], base.totals[k]) if base else None for k in RATES},
            "history": [{"at": later.at, **{k: (later.totals[k] - earlier.totals[k]) / (later.at - earlier.at)
                                            for k in RATES}}
                        for earlier, later in zip(self._history, list(self._history)[1:])],
        }

    @staticmethod
    def _queue_rows(now: Sums, base: Sums | None) -> list[dict]:
        """Who waits and who is refused: tasks with rows waiting now or refusals in the window."""
        rows = []
        for task in sorted(set(now.waiting) | set(now.refused)):
            refused = now.refused.get(task, {})
            before = base.refused.get(task, {}) if base else {}
            recent = {reason: n - before.get(reason, 0.0) for reason, n in refused.items()}
            waiting = now.waiting.get(task, 0.0)
            if waiting or any(recent.values()):
                rows.append({"task_id": task, "waiting": waiting, "refused": refused, "refused_recently": recent})
        rows.sort(key=lambda r: (-r["waiting"], -sum(r["refused_recently"].values()), r["task_id"]))
        return rows[:MAX_TASKS_SHOWN]

    @staticmethod
    def _task_row(task_id: str, now: Sums, base: Sums | None, rate) -> dict:
        row = {"task_id": task_id, "requests": now.requests.get(task_id, 0.0),
               "requests_per_s": rate(now.requests.get(task_id, 0.0), base.requests.get(task_id, 0.0))
               if base else None}
        hits, misses = now.prompt_kv.get(task_id, (0.0, 0.0))
        row.update(prompt_kv_hits=hits, prompt_kv_misses=misses,
                   prompt_kv_hit_ratio=hits / (hits + misses) if hits + misses else None)
        for kind in LATENCIES:
            current = now.buckets[kind].get(task_id, {})
            window = _minus(current, base.buckets[kind].get(task_id) if base else None)
            for q in (0.5, 0.95):
                value = quantile(q, window)
                row[f"{kind}_p{int(q * 100)}_ms"] = None if value is None else round(value * 1000, 1)
        return row


def current_sums(snapshots: list[list[Family]]) -> Sums:
    return Sums.of(snapshots, time.time())
