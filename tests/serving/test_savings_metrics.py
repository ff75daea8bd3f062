"""What pooling saves, read from a running server's `/metrics` after real traffic of a p=1 and a
p=10 version of the same LAMP adapter (l=200): tokens, KV bytes and prefill seconds saved, and
per-task latency series. The prompt-KV cache is off here, so every request's prefill runs its
soft prompt and the time pooling saves is visible in each request's own prefill timing."""

from __future__ import annotations

import statistics
import time

import httpx
import pytest

from lamp_runtime.adapters import save_adapter

from ..conftest import lamp_from_prompt, vocab_prompt
from ..server_process import ServerProcess
from .test_api import metric_samples

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "savings-token"
PROMPT_TOKENS = 200
POOLS = {"save-p1": 1, "save-p10": 10}
WARMUP_ROUNDS = 6  # steps for the server's per-token cost fit (it needs 16 with different sizes)
ROUNDS = 8
INPUT = "Summarise the weather report for tomorrow morning:"
# The estimate (fitted marginal seconds per token x tokens saved) against the measured difference
# of the two versions' prefill times: attention grows with the square of the length and a shared
# 2-core machine is noisy, so a factor of 2 either way (docs/serving.md says the same).
ESTIMATE_FACTOR = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(store=tmp_path_factory.mktemp("store"), admin_token=ADMIN_TOKEN,
                            log_path=tmp_path_factory.mktemp("logs") / "serve.log",
                            extra_args=["--prompt-kv-cache-mb", "0", "--max-batch-size", "1"])
    with process:
        yield process


def metric_sum(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for s in metric_samples(text, name) if all(s.labels.get(k) == v for k, v in labels.items()))


def settled_metrics(url: str, names: tuple[str, ...]) -> dict[str, float]:
    time.sleep(1.5)  # replicas push their registries every 0.5 s
    return {name: metric_sum(url, name) for name in names}


def generate(url: str, task_id: str) -> dict:
    response = httpx.post(f"{url}/generate", timeout=120,
                          json={"task_id": task_id, "input": INPUT, "max_new_tokens": 2})
    response.raise_for_status()
    return response.json()


def test_metrics_show_what_pooling_saved(server, backbone, tmp_path):
    prompt = vocab_prompt(backbone, PROMPT_TOKENS, seed=41)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for task, pool in POOLS.items():
        data = save_adapter(lamp_from_prompt(prompt, rank=8, pool=pool), tmp_path / f"{task}.safetensors").read_bytes()
        httpx.put(f"{server.url}/admin/adapters/{task}", headers=headers, timeout=60,
                  files={"adapter": ("a.safetensors", data)}).raise_for_status()
    for _ in range(WARMUP_ROUNDS):
        for task in POOLS:
            generate(server.url, task)
    names = ("lamp_soft_prompt_tokens_saved_total", "lamp_kv_cache_bytes_saved_total",
             "lamp_prefill_seconds_saved_total", "lamp_prefill_tokens_total", "lamp_prefill_seconds_count")
    before = settled_metrics(server.url, names)
    prefill_ms = {task: [] for task in POOLS}
    input_tokens = 0
    for _ in range(ROUNDS):  # interleaved, so load changes hit both versions alike
        for task in POOLS:
            body = generate(server.url, task)
            prefill_ms[task].append(body["timings_ms"]["prefill"])
            input_tokens = body["usage"]["input_tokens"]
    after = settled_metrics(server.url, names)
    delta = {name: after[name] - before[name] for name in names}

    saved_per_request = PROMPT_TOKENS - PROMPT_TOKENS // 10
    assert delta["lamp_soft_prompt_tokens_saved_total"] == ROUNDS * saved_per_request
    config = backbone.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32 KV
    assert delta["lamp_kv_cache_bytes_saved_total"] == ROUNDS * saved_per_request * kv_bytes_per_token
    # every prefill ran the soft prompt and the input (the prompt-KV cache is off), one step each
    assert delta["lamp_prefill_tokens_total"] == ROUNDS * (PROMPT_TOKENS + PROMPT_TOKENS // 10 + 2 * input_tokens)
    assert delta["lamp_prefill_seconds_count"] == 2 * ROUNDS

    measured = (statistics.median(prefill_ms["save-p1"]) - statistics.median(prefill_ms["save-p10"])) / 1000
    estimated = delta["lamp_prefill_seconds_saved_total"] / ROUNDS
    assert measured > 0, prefill_ms
    assert 1 / ESTIMATE_FACTOR <= estimated / measured <= ESTIMATE_FACTOR, (estimated, measured, prefill_ms)

    for task in POOLS:  # per-task latency series, so a dashboard can put the two side by side
        assert metric_sum(server.url, "lamp_request_seconds_count", task=task) == WARMUP_ROUNDS + ROUNDS
        assert metric_sum(server.url, "lamp_time_to_first_token_seconds_count", task=task) == WARMUP_ROUNDS + ROUNDS
    held = metric_samples(httpx.get(f"{server.url}/metrics", timeout=30).text, "lamp_kv_cache_bytes")
    assert held and all(s.value == 0 for s in held)  # reported, and nothing in flight any more
