"""Inference over HTTP against the real server: cross-task batching, streaming, OpenAI client, metrics."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import BUNDLED_TASKS, engine_alone

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
CASES = [("plain", "The capital of France is"), ("lamp2", "Write a haiku about the sea:"), ("lamp3", "1, 2, 3,"),
         ("peft6", "Once upon a time"), ("lamp2", "The best way to learn is"), ("plain", "Water boils at")]


@pytest.fixture(scope="module")
def reference(backbone, bundled_adapters):
    return engine_alone(backbone, bundled_adapters, CASES, NEW_TOKENS)


def metric_samples(text: str, name: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_bundled_adapters_of_every_kind_are_registered_at_start(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert sorted(m["id"] for m in models["data"]) == sorted(BUNDLED_TASKS)  # prompts/data was skipped


def test_concurrent_tasks_share_batches_and_match_the_engine_alone(client, server, reference):
    def generate(case):
        task, text = case
        response = httpx.post(f"{server.url}/generate", timeout=120,
                              json={"task_id": task, "input": text, "max_new_tokens": NEW_TOKENS})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(CASES)) as pool:
        bodies = list(pool.map(generate, CASES))
    assert [b["text"] for b in bodies] == reference
    for (task, _), body in zip(CASES, bodies, strict=True):
        assert body["task_id"] == task
        assert body["finish_reason"] in ("length", "stop")
        assert body["usage"]["completion_tokens"] <= NEW_TOKENS
        assert body["usage"]["input_tokens"] > 0
        assert set(body["timings_ms"]) == {"queue", "prefill", "decode", "total"}
    assert {b["usage"]["soft_prompt_tokens"] for b in bodies} == {8, 6, 4}  # plain 8, lamp2 12/2, lamp3 10/3, peft 6

    # The replicas push metrics every 0.5 s: wait for the batches above to show up at /metrics.
    deadline = time.monotonic() + 15
    while True:
        text = client.get("/metrics").text
        mixed = sum(s.value for s in metric_samples(text, "lamp_batch_tasks_count")) - \
            sum(s.value for s in metric_samples(text, "lamp_batch_tasks_bucket") if s.labels["le"] == "1.0")
        if mixed > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert mixed > 0, "no batch step held more than one task"


def test_metrics_expose_every_required_series(client):
    client.post("/generate", json={"task_id": "lamp2", "input": "Hi", "max_new_tokens": 2}).raise_for_status()
    time.sleep(1.0)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names = {s.name for family in text_string_to_metric_families(response.text) for s in family.samples}
    for name in ("lamp_queue_seconds_bucket", "lamp_time_to_first_token_seconds_bucket", "lamp_request_seconds_count",
                 "lamp_batch_size_bucket", "lamp_batch_tasks_bucket", "lamp_requests_total",
                 "lamp_generated_tokens_total", "lamp_soft_prompt_tokens_total", "lamp_soft_prompt_tokens_saved_total",
                 "lamp_prompt_cache_hits_total", "lamp_prompt_cache_misses_total", "lamp_prompt_cache_evictions_total",
                 "lamp_prompt_cache_bytes", "lamp_backbone_bytes", "lamp_registered_adapters",
                 "lamp_process_resident_memory_bytes"):
        assert name in names, name
    ok = [s for s in metric_samples(response.text, "lamp_requests_total")
          if s.labels["task"] == "lamp2" and s.labels["status"] == "200"]
    assert ok and ok[0].value >= 1
    saved = sum(s.value for s in metric_samples(response.text, "lamp_soft_prompt_tokens_saved_total"))
    assert saved >= 6  # each lamp2 request saves 12 - 6 tokens by pooling
    backbone_samples = metric_samples(response.text, "lamp_backbone_bytes")
    assert backbone_samples and all(s.labels["deployment"] == "LampModel" and s.labels["replica"]
                                    for s in backbone_samples)


def test_generate_streams_one_event_per_token(server, reference):
    task, text = CASES[1]
    with httpx.stream("POST", f"{server.url}/generate", timeout=120,
                      json={"task_id": task, "input": text, "max_new_tokens": NEW_TOKENS, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["finish_reason"] in ("length", "stop")
    assert final["usage"]["completion_tokens"] <= NEW_TOKENS
    assert len(events) - 1 >= 2  # tokens arrive as separate events, not one blob
    assert all("finish_reason" not in e for e in events[:-2])
    assert "".join(e["delta"] for e in events[:-1]) == reference[1]


def test_official_openai_client_completions_and_streaming(server, reference):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0)
    task, text = CASES[2]
    assert {m.id for m in client.models.list().data} >= set(BUNDLED_TASKS)

    completion = client.completions.create(model=task, prompt=text, max_tokens=NEW_TOKENS, temperature=0)
    assert completion.choices[0].text == reference[2]
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage.completion_tokens <= NEW_TOKENS
    assert completion.model == task

    chunks = list(client.completions.create(model=task, prompt=text, max_tokens=NEW_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference[2]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= NEW_TOKENS

    batch = client.completions.create(model="lamp3", prompt=[CASES[2][1], "Hello"], max_tokens=NEW_TOKENS,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == reference[2]

    with pytest.raises(openai.NotFoundError, match="unknown task id 'no-such-task'"):
        client.completions.create(model="no-such-task", prompt="x", max_tokens=2)


def total(client: httpx.Client, name: str) -> float:
    return sum(s.value for s in metric_samples(client.get("/metrics").text, name))


def test_abandoned_stream_is_aborted_and_frees_its_slot(server, client):
    aborted_before = total(client, "lamp_aborted_requests_total")
    with httpx.stream("POST", f"{server.url}/generate", timeout=120,
                      json={"task_id": "lamp3", "input": "Count from one to a thousand: one, two,",
                            "max_new_tokens": 128, "stream": True}) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    deadline = time.monotonic() + 20
    while total(client, "lamp_aborted_requests_total") == aborted_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert total(client, "lamp_aborted_requests_total") == aborted_before + 1
    response = client.post("/generate", json={"task_id": "plain", "input": "Hello", "max_new_tokens": 2})
    assert response.status_code == 200
