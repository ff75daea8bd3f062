"""The Prometheus metrics of a model replica, names prefixed `lamp_`.

Each process keeps its own `CollectorRegistry`; hub.py gathers the registries of all replicas so
the ingress `/metrics` shows every replica (see there why). Values that already
exist elsewhere (prompt-cache counters, registered adapters, memory) are read when collected
instead of being mirrored into extra metric objects.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from lamp_runtime.engine.base import EngineObserver
from lamp_runtime.prompts.prompt_kv import PromptKVStats

from .labels import TaskLabels
from .process import ProcessCollector
from .token_cost import TokenCostFit

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TASKS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class EngineCollector:
    """Prompt cache, backbone, adapters and queue state of a model replica, read at collection time
    from the engine's `stats()` snapshot (the engine contract; nothing of the engine's insides)."""

    def __init__(self, engine, registered: Callable[[], int], task_labels: TaskLabels):
        self.engine = engine
        self.registered = registered
        self.task_labels = task_labels

    def collect(self):
        stats = self.engine.stats()
        cache = stats.prompt_cache
        yield from _cache_counters("lamp_prompt_cache", cache, ("Prompt cache lookups served from the cache",
                                                                "Prompt cache lookups that built the prompt",
                                                                "Prompts evicted from the cache"))
        yield _gauge("lamp_prompt_cache_bytes", "Device bytes held by cached prompts", cache.bytes)
        resident = stats.adapter_cache
        yield from _cache_counters("lamp_adapter_cache", resident, (
            "Requests whose adapter's factors were in memory", "Adapter factors read from the store for a request",
            "Adapter factors dropped from memory"))
        yield _gauge("lamp_adapter_cache_bytes", "Host bytes of adapter factors held for the tasks being served",
                     resident.bytes)
        kv = stats.prompt_kv
        if kv is not None:
            unit = stats.prompt_kv_unit  # a block-granular prefix cache (vLLM's) counts prompt tokens
            yield from _cache_counters("lamp_prompt_kv_cache", kv, (f"Soft-prompt keys/values reused ({unit})",
                                                                    f"Soft-prompt keys/values computed ({unit})",
                                                                    "Prompt-KV entries evicted"))
            yield _gauge("lamp_prompt_kv_cache_bytes", "Bytes held by cached soft-prompt keys/values", kv.bytes)
        if isinstance(kv, PromptKVStats):  # a cache of whole prompts (not vLLM's prefix blocks)
            yield from self._prompt_kv_detail(kv)
        if stats.kv_cache_bytes is not None:
            yield _gauge("lamp_kv_cache_bytes", "Keys/values held by the requests in flight (positions in use)",
                         stats.kv_cache_bytes)
        yield _gauge("lamp_backbone_bytes", "Bytes of backbone weights held by this replica", stats.backbone_bytes)
        yield _gauge("lamp_registered_adapters", "Adapters registered in this replica", self.registered())
        yield _gauge("lamp_requests_waiting", "Requests queued for the engine", stats.waiting)
        yield _gauge("lamp_requests_running", "Requests in the running batch", stats.running)
        if stats.cuda_allocated_bytes is not None:
            yield _gauge("lamp_cuda_memory_allocated_bytes", "CUDA memory allocated by tensors",
                         stats.cuda_allocated_bytes)
        if stats.cuda_reserved_bytes is not None:
            yield _gauge("lamp_cuda_memory_reserved_bytes", "CUDA memory reserved by the caching allocator",
                         stats.cuda_reserved_bytes)
        if stats.compute_threads is not None:
            yield _gauge("lamp_engine_compute_threads", "Threads the engine computes with now (the llama.cpp "
                         "engine chooses them from its measured step times)", stats.compute_threads)
        yield from self._per_task(stats.tasks)
        labels = {"kind": stats.kind, "device": stats.device, **stats.settings}
        info = GaugeMetricFamily("lamp_engine_info", "The replica's engine: its kind, device and the settings it "
                                 "chose (always 1)", labels=list(labels))
        info.add_metric(list(labels.values()), 1)
        yield info


    def _prompt_kv_detail(self, kv: PromptKVStats):
        """Tasks resident, bytes pooling saves, and hits / misses by task (summed by bounded label)."""
        yield _gauge("lamp_prompt_kv_cache_tasks", "Task versions whose soft-prompt keys/values are cached",
                     kv.entries)
        yield _gauge("lamp_prompt_kv_cache_pooling_saved_bytes", "Bytes the cached soft-prompt keys/values would "
                     "take more at their unpooled lengths (l instead of ceil(l/p) positions each)",
                     kv.pooling_saved_bytes)
        hits = CounterMetricFamily("lamp_task_prompt_kv_hits", "Requests whose soft-prompt keys/values were "
                                   "reused from the prompt-KV cache, by task (bounded labels)", labels=["task"])
        misses = CounterMetricFamily("lamp_task_prompt_kv_misses", "Requests whose soft-prompt keys/values were "
                                     "computed for the prompt-KV cache, by task (bounded labels)", labels=["task"])
        sums: dict[str, list[int]] = {}
        registry = self.engine.registry
        for task_id, counts in kv.by_task.items():
            total = sums.setdefault(self.task_labels.label(task_id, task_id in registry), [0, 0])
            total[0] += counts.hits
            total[1] += counts.misses
        for task, (hit, miss) in sorted(sums.items()):
            hits.add_metric([task], hit)
            misses.add_metric([task], miss)
        yield hits
        yield misses

    def _per_task(self, tasks):
        """The fair queue's per-task counts, summed by bounded task label."""
        waiting = GaugeMetricFamily("lamp_task_requests_waiting", "Batch rows waiting, by task (bounded labels)",
                                    labels=["task"])
        admitted = CounterMetricFamily("lamp_task_requests_admitted", "Requests that entered the batch, by task",
                                       labels=["task"])
        refused = CounterMetricFamily("lamp_task_requests_refused", "Requests refused at submission, by task and "
                                      "reason (task_share, task_limit: 429; queue_full: 503)", labels=["task", "reason"])
        served = CounterMetricFamily("lamp_task_tokens_served", "Tokens served, by task and kind (prompt: "
                                     "prefilled context, generated: sampled)", labels=["task", "kind"])
        paused = CounterMetricFamily("lamp_task_rows_paused", "Running rows paused to let a task below its share of "
                                     "the batch in, by task (fair rows; they resume later)", labels=["task"])
        sums: dict[tuple, float] = {}
        registry = self.engine.registry
        for task_id, s in tasks.items():
            task = self.task_labels.label(task_id, task_id in registry)
            for key, value in ((("w", task), s.waiting), (("a", task), s.admitted), (("s", task), s.paused),
                               (("p", task, "prompt"), s.prompt_tokens), (("p", task, "generated"), s.generated_tokens),
                               *((("r", task, reason), n) for reason, n in s.refused.items())):
                sums[key] = sums.get(key, 0) + value
        families = {"w": waiting, "a": admitted, "r": refused, "p": served, "s": paused}
        for (kind, *labels), value in sorted(sums.items()):
            families[kind].add_metric(labels, value)
        yield from families.values()


def _cache_counters(prefix: str, stats, docs: tuple[str, str, str]):
    """`<prefix>_{hits,misses,evictions}` counters of a cache's stats."""
    for name, doc in zip(("hits", "misses", "evictions"), docs):
        family = CounterMetricFamily(f"{prefix}_{name}", doc)
        family.add_metric([], getattr(stats, name))
        yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


class ModelMetrics:
    """What a model replica measures: request latencies by task, batch composition, token counts,
    and what pooling saved (tokens, prefill seconds, KV bytes)."""

    def __init__(self, engine, registered: Callable[[], int], task_label_limit: int = 64):
        self.registry = CollectorRegistry()
        self.engine = engine
        self.task_labels = TaskLabels(task_label_limit)
        self.token_cost = TokenCostFit()
        r = self.registry
        self.queue_seconds = Histogram("lamp_queue_seconds", "Time from submission to joining the batch",
                                       buckets=SECONDS_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("lamp_time_to_first_token_seconds",
                                      "Time from submission to the first token, by task (bounded labels)",
                                      ["task"], buckets=SECONDS_BUCKETS, registry=r)
        self.request_seconds = Histogram("lamp_request_seconds",
                                         "Time from submission to the last token, by task (bounded labels)",
                                         ["task"], buckets=SECONDS_BUCKETS, registry=r)
        self.prefill_seconds = Histogram("lamp_prefill_seconds",
                                         "Seconds of each step that prefilled newcomers (its one forward "
                                         "carries the running rows' decode too)", buckets=SECONDS_BUCKETS, registry=r)
        self.prefill_tokens = Counter("lamp_prefill_tokens_total", "Positions prefilled (computed, not padding)",
                                      registry=r)
        self.batch_size = Histogram("lamp_batch_size", "Requests in the batch, per decode step",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_tasks = Histogram("lamp_batch_tasks", "Distinct tasks in the batch, per decode step",
                                     buckets=BATCH_TASKS_BUCKETS, registry=r)
        self.generated_tokens = Counter("lamp_generated_tokens_total", "Completion tokens generated", registry=r)
        self.soft_prompt_tokens = Counter("lamp_soft_prompt_tokens_total",
                                          "Soft-prompt tokens prepended (after pooling)", registry=r)
        self.soft_prompt_tokens_saved = Counter("lamp_soft_prompt_tokens_saved_total",
                                                "Soft-prompt tokens saved by pooling (l - ceil(l/p))", registry=r)
        self.prefill_seconds_saved = Counter(
            "lamp_prefill_seconds_saved_total", "Prefill seconds pooling saved: tokens saved x this replica's fitted "
            "marginal seconds per token, for requests whose prefill ran their soft prompt", registry=r)
        self.kv_cache_bytes_saved = Counter(
            "lamp_kv_cache_bytes_saved_total", "KV-cache bytes the unpooled prompts would have held in addition: "
            "tokens saved x bytes per position (all layers), summed over requests", registry=r)
        self.prefill_forwards = Counter("lamp_prefill_forwards_total",
                                        "Prefill forward passes (a step's newcomers, grouped by length)", registry=r)
        self.prefill_padding = Counter("lamp_prefill_padding_tokens_total",
                                       "Padded positions computed in prefill beyond the real tokens", registry=r)
        self.aborted = Counter("lamp_aborted_requests_total",
                               "Requests aborted before finishing (client disconnected)", registry=r)
        r.register(EngineCollector(engine, registered, self.task_labels))
        r.register(ProcessCollector())

    @property
    def observer(self) -> EngineObserver:
        """What the engine calls: `observe_step` per step, `observe_result` per finished sample."""
        return EngineObserver(on_step=self.observe_step, on_finish=self.observe_result)

    def observe_step(self, stats) -> None:
        """Engine-loop callback (its thread); prometheus_client metrics are thread-safe."""
        self.prefill_forwards.inc(stats.prefill_forwards)
        self.prefill_padding.inc(stats.prefill_padding)
        self.token_cost.add(stats.computed_tokens, stats.seconds)
        if stats.prefilled:
            self.prefill_seconds.observe(stats.seconds)
            self.prefill_tokens.inc(stats.prefill_tokens)
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
            self.batch_tasks.observe(stats.distinct_tasks)

    def observe_result(self, result) -> None:
        if result.finish_reason == "abort":  # client went away: its timings say nothing about us
            self.aborted.inc()
            return
        task = self.task_labels.label(result.task_id, result.task_id in self.engine.registry)
        self.queue_seconds.observe(result.queue_ms / 1000)
        self.ttft_seconds.labels(task).observe(result.ttft_ms / 1000)
        self.request_seconds.labels(task).observe(result.total_ms / 1000)
        self.generated_tokens.inc(result.completion_tokens)
        self.soft_prompt_tokens.inc(result.soft_prompt_tokens)
        saved = result.soft_prompt_tokens_saved
        if saved:
            self.soft_prompt_tokens_saved.inc(saved)
            self.kv_cache_bytes_saved.inc(saved * self.engine.kv_bytes_per_token)
            per_token = self.token_cost.seconds_per_token() if result.soft_prompt_tokens_computed else None
            if per_token:
                # a prompt partly reused (vLLM's block-granular prefix cache) saved in proportion
                share = result.soft_prompt_tokens_computed / result.soft_prompt_tokens
                self.prefill_seconds_saved.inc(per_token * saved * share)
