"""The prompt-KV cache over HTTP: a task with a 200-token soft prompt answers exactly like the
uncached reference, cold (its first request), warm and in concurrent mixed batches, and the
server's metrics count the reuse."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lamp_runtime.adapters import save_adapter

from ..conftest import lamp_from_prompt, vocab_prompt
from .conftest import engine_alone
from .test_api import metric_samples

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
INPUTS = ["The weather today is", "My favourite food is", "Tell me about the sea:"]


def generate(url: str, task_id: str, text: str) -> str:
    response = httpx.post(f"{url}/generate", timeout=120,
                          json={"task_id": task_id, "input": text, "max_new_tokens": NEW_TOKENS})
    response.raise_for_status()
    return response.json()["text"]


@pytest.fixture()
def kv_tasks(admin):
    yield ("kv-long", "kv-short")
    for task in ("kv-long", "kv-short"):  # the server is shared: leave its task list as it was
        admin.delete(f"/admin/adapters/{task}")


def test_long_prompt_answers_equal_the_reference_cold_warm_and_concurrent(admin, server, backbone, tmp_path, kv_tasks):
    long = lamp_from_prompt(vocab_prompt(backbone, 200, seed=31), rank=8, pool=1)  # 200 served tokens
    short = lamp_from_prompt(vocab_prompt(backbone, 2, seed=32), rank=2, pool=1)  # 2 served tokens
    for task, adapter in (("kv-long", long), ("kv-short", short)):
        data = save_adapter(adapter, tmp_path / f"{task}.safetensors").read_bytes()
        admin.put(f"/admin/adapters/{task}", files={"adapter": ("a.safetensors", data)}).raise_for_status()
    cases = [(task, text) for text in INPUTS for task in ("kv-long", "kv-short")]
    expected = engine_alone(backbone, {"kv-long": long, "kv-short": short}, cases, NEW_TOKENS)

    cold = generate(server.url, "kv-long", INPUTS[0])  # the task's first request builds its prompt KV
    warm = [generate(server.url, task, text) for task, text in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        concurrent = list(pool.map(lambda case: generate(server.url, *case), cases))
    assert cold == expected[0]
    assert warm == expected
    assert concurrent == expected

    time.sleep(1.0)  # replicas push their metrics every 0.5 s
    text = admin.get("/metrics").text
    hits = sum(s.value for s in metric_samples(text, "lamp_prompt_kv_cache_hits_total"))
    misses = sum(s.value for s in metric_samples(text, "lamp_prompt_kv_cache_misses_total"))
    cached = sum(s.value for s in metric_samples(text, "lamp_prompt_kv_cache_bytes"))
    assert misses >= 2 and hits >= len(cases) * 2 - 1  # each version computed once, then reused
    config = backbone.config
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    assert cached >= 202 * per_token  # both prompts' float32 keys and values


def metric_value(text: str, name: str, **labels) -> float:
    return sum(s.value for s in metric_samples(text, name) if all(s.labels.get(k) == v for k, v in labels.items()))


def settled_metrics(admin) -> str:
    """/metrics once two reads a push apart agree (replicas push every 0.5 s)."""
    text = admin.get("/metrics").text
    for _ in range(30):
        time.sleep(1.0)
        later = admin.get("/metrics").text
        if metric_value(later, "lamp_prompt_kv_cache_misses_total") == metric_value(
                text, "lamp_prompt_kv_cache_misses_total") and metric_value(
                later, "lamp_prompt_kv_cache_hits_total") == metric_value(text, "lamp_prompt_kv_cache_hits_total"):
            return later
        text = later
    raise AssertionError("the prompt-KV counters kept changing for 30 s")


@pytest.fixture()
def counted_tasks(admin):
    yield ("kvm-pooled", "kvm-plain")
    for task in ("kvm-pooled", "kvm-plain"):
        admin.delete(f"/admin/adapters/{task}")


def test_metrics_count_prompt_kv_by_task_resident_tasks_and_bytes_pooling_saves(admin, server, backbone, tmp_path,
                                                                                  counted_tasks):
    pooled = lamp_from_prompt(vocab_prompt(backbone, 40, seed=41), rank=4, pool=4)  # l = 40 -> 10 cached
    plain = lamp_from_prompt(vocab_prompt(backbone, 8, seed=42), rank=2, pool=1)
    before = settled_metrics(admin)
    for task, adapter in zip(counted_tasks, (pooled, plain)):
        data = save_adapter(adapter, tmp_path / f"{task}.safetensors").read_bytes()
        admin.put(f"/admin/adapters/{task}", files={"adapter": ("a.safetensors", data)}).raise_for_status()
    for task, requests in zip(counted_tasks, (3, 2)):
        for i in range(requests):
            generate(server.url, task, INPUTS[i])
    after = settled_metrics(admin)

    for task, hits in zip(counted_tasks, (2, 1)):  # one miss each (the first request), then hits
        assert metric_value(after, "lamp_task_prompt_kv_hits_total", task=task) == hits
        assert metric_value(after, "lamp_task_prompt_kv_misses_total", task=task) == 1
    assert (metric_value(after, "lamp_prompt_kv_cache_tasks")
            - metric_value(before, "lamp_prompt_kv_cache_tasks")) == 2
    config = backbone.config
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    saved = (metric_value(after, "lamp_prompt_kv_cache_pooling_saved_bytes")
             - metric_value(before, "lamp_prompt_kv_cache_pooling_saved_bytes"))
    assert saved == (40 - 10) * per_token  # the plain task saves nothing
    for name in ("hits", "misses"):  # the by-task series sum to the cache's totals
        assert sum(s.value for s in metric_samples(after, f"lamp_task_prompt_kv_{name}_total")) == metric_value(
            after, f"lamp_prompt_kv_cache_{name}_total")
