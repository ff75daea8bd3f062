"""Metrics of every replica merged at the ingress, bounded task labels, and what replicas record."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from lamp_runtime.engine.base import StepStats
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams
from serving.metrics.hub import render, snapshot
from serving.metrics.ingress import IngressMetrics
from serving.metrics.labels import OTHER_TASK, TaskLabels
from serving.metrics.replica import ModelMetrics
from serving.metrics.token_cost import TokenCostFit


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def replica_registry(tokens: int, batch_tasks: list[int]) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("lamp_generated_tokens_total", "tokens", registry=registry).inc(tokens)
    histogram = Histogram("lamp_batch_tasks", "tasks", buckets=(1, 2, 4), registry=registry)
    for value in batch_tasks:
        histogram.observe(value)
    return registry


def test_snapshots_of_two_replicas_render_as_one_exposition_with_replica_labels():
    a = snapshot(replica_registry(5, [1, 3]), {"deployment": "LampModel", "replica": "a"})
    b = snapshot(replica_registry(7, [2]), {"deployment": "LampModel", "replica": "b"})
    text = render([a, b]).decode()
    assert text.count("# TYPE lamp_batch_tasks histogram") == 1
    values = samples(text)
    assert values[("lamp_generated_tokens_total", (("deployment", "LampModel"), ("replica", "a")))] == 5
    assert values[("lamp_generated_tokens_total", (("deployment", "LampModel"), ("replica", "b")))] == 7
    assert values[("lamp_batch_tasks_bucket", (("deployment", "LampModel"), ("le", "1.0"), ("replica", "a")))] == 1
    assert values[("lamp_batch_tasks_count", (("deployment", "LampModel"), ("replica", "a")))] == 2
    assert values[("lamp_batch_tasks_bucket", (("deployment", "LampModel"), ("le", "2.0"), ("replica", "b")))] == 1


def test_task_labels_are_bounded():
    labels = TaskLabels(limit=2)
    assert labels.label("made-up", registered=False) == OTHER_TASK
    assert [labels.label(t, True) for t in ("a", "b", "c", "a")] == ["a", "b", OTHER_TASK, "a"]
    metrics = IngressMetrics(task_label_limit=1)
    metrics.count_request("a", True, 200)
    metrics.count_request("b", True, 503)
    metrics.count_request("zzz", False, 404)
    values = samples(render([snapshot(metrics.registry, {})]).decode())
    assert values[("lamp_requests_total", (("status", "200"), ("task", "a")))] == 1
    assert values[("lamp_requests_total", (("status", "503"), ("task", "other")))] == 1
    assert values[("lamp_requests_total", (("status", "404"), ("task", "other")))] == 1


def test_model_metrics_record_steps_results_and_engine_state(backbone, task_adapters):
    engine = DecoderEngine(backbone)
    for task_id, adapter in task_adapters.items():
        engine.registry.register(task_id, adapter)
    metrics = ModelMetrics(engine, registered=lambda: len(engine.registry))
    requests = [GenerationRequest("Hello", task, SamplingParams(max_new_tokens=3)) for task in ("plain", "lamp2")]
    results = engine.generate(requests)
    for result in results:
        metrics.observe_result(result)
    metrics.observe_step(StepStats(batch_size=2, distinct_tasks=2))
    metrics.observe_step(StepStats())  # an idle step: not a batch
    values = samples(render([snapshot(metrics.registry, {})]).decode())
    assert values[("lamp_batch_tasks_count", ())] == 1
    assert values[("lamp_batch_tasks_bucket", (("le", "2.0"),))] == 1
    assert values[("lamp_generated_tokens_total", ())] == sum(r.completion_tokens for r in results)
    assert values[("lamp_soft_prompt_tokens_total", ())] == 8 + 6
    assert values[("lamp_soft_prompt_tokens_saved_total", ())] == 12 - 6
    assert values[("lamp_request_seconds_count", (("task", "plain"),))] == 1
    assert values[("lamp_time_to_first_token_seconds_count", (("task", "lamp2"),))] == 1
    # lamp2 (l=12, p=2) saved 6 positions of every layer's keys and values
    assert values[("lamp_kv_cache_bytes_saved_total", ())] == 6 * engine.kv_bytes_per_token
    assert values[("lamp_kv_cache_bytes", ())] == 0  # nothing in flight
    assert values[("lamp_prompt_cache_misses_total", ())] >= 2
    assert values[("lamp_registered_adapters", ())] == 3
    assert values[("lamp_backbone_bytes", ())] == backbone.weights_bytes
    assert values[("lamp_process_resident_memory_bytes", ())] > 0
    info = [labels for (name, labels) in values if name == "lamp_engine_info"]
    assert [dict(labels) for labels in info] == [{"kind": "hf", "device": "cpu", "core": "llama_template_decoder",
                                                  "threads": str(engine.threads)}]


def test_per_task_latency_labels_are_bounded_and_unknown_tasks_are_other(backbone, task_adapters):
    engine = DecoderEngine(backbone)
    for task_id, adapter in task_adapters.items():
        engine.registry.register(task_id, adapter)
    metrics = ModelMetrics(engine, registered=lambda: len(engine.registry), task_label_limit=1)
    requests = [GenerationRequest("Hi", task, SamplingParams(max_new_tokens=1)) for task in ("plain", "lamp2", None)]
    for result in engine.generate(requests):
        metrics.observe_result(result)
    values = samples(render([snapshot(metrics.registry, {})]).decode())
    assert values[("lamp_request_seconds_count", (("task", "plain"),))] == 1
    assert values[("lamp_request_seconds_count", (("task", OTHER_TASK),))] == 2  # over the limit, and no task


def test_token_cost_fit_recovers_the_marginal_cost_not_the_average():
    fit = TokenCostFit(window=64, min_steps=16)
    for i in range(15):
        fit.add(1 + 10 * i, 0.020 + 0.0005 * (1 + 10 * i))  # 20 ms per step + 0.5 ms per token
    assert fit.seconds_per_token() is None  # too few steps yet
    fit.add(200, 0.020 + 0.0005 * 200)
    assert fit.seconds_per_token() == pytest.approx(0.0005)
    flat = TokenCostFit(window=64, min_steps=16)
    for _ in range(40):
        flat.add(1, 0.02)  # decode at batch 1 only: the slope cannot be told
    assert flat.seconds_per_token() is None
    with pytest.raises(ValueError, match="window"):
        TokenCostFit(window=4, min_steps=16)


def test_prefill_seconds_saved_counts_only_prompts_that_were_computed(backbone, task_adapters):
    engine = DecoderEngine(backbone)  # prompt-KV cache on: the second lamp2 request reuses the prompt
    engine.registry.register("lamp2", task_adapters["lamp2"])
    metrics = ModelMetrics(engine, registered=lambda: len(engine.registry))
    for i in range(40):
        metrics.token_cost.add(1 + 5 * i, 0.01 + 0.001 * (1 + 5 * i))  # 1 ms per token
    params = SamplingParams(max_new_tokens=1)
    first, second = (engine.generate([GenerationRequest("Hi", "lamp2", params)])[0] for _ in range(2))
    assert (first.soft_prompt_tokens_computed, second.soft_prompt_tokens_computed) == (6, 0)
    for result in (first, second):
        metrics.observe_result(result)
    values = samples(render([snapshot(metrics.registry, {})]).decode())
    assert values[("lamp_soft_prompt_tokens_saved_total", ())] == 12
    assert values[("lamp_prefill_seconds_saved_total", ())] == pytest.approx(6 * 0.001, rel=0.02)
