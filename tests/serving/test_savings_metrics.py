"""What pooling saves, read from a running server's `/metrics` after real traffic of a p=1 and a
p=10 version of the same LAMP adapter (l=200), through the measurement `lamp bench savings` runs
(serving/bench/savings.py): tokens and KV bytes saved (exact counts), the prefill-seconds estimate
reported, and per-task latency series. The prompt-KV cache is off here, so every request's prefill
runs its soft prompt. How close the estimate comes to the measured time difference is a timing:
the bench reports it (docs/bench/savings.json), this test does not assert it."""

from __future__ import annotations

import httpx
import pytest

from serving.bench.savings import SERVER_ARGS, SavingsBenchConfig, measure_savings, savings_adapters, task_names

from ..server_process import ServerProcess
from .test_api import metric_samples

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "savings-token"
CONFIG = SavingsBenchConfig(length=200, pool=10, rank=8, rounds=8, warmup=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(store=tmp_path_factory.mktemp("store"), admin_token=ADMIN_TOKEN,
                            log_path=tmp_path_factory.mktemp("logs") / "serve.log",
                            extra_args=SERVER_ARGS)
    with process:
        yield process


def metric_sum(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for s in metric_samples(text, name) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_show_what_pooling_saved(server, backbone):
    files = savings_adapters(backbone.model.get_input_embeddings().weight, CONFIG)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        result = measure_savings(client, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, files, CONFIG.rounds,
                                 CONFIG.warmup)

    saved_per_request = CONFIG.length - CONFIG.length // CONFIG.pool
    assert result["tokens_saved_per_request"] == saved_per_request
    config = backbone.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32 KV
    assert result["kv_bytes_saved_per_request"] == saved_per_request * kv_bytes_per_token
    # every prefill ran the soft prompt and the input (the prompt-KV cache is off), one step each
    assert result["prefills"] == result["requests"] == 2 * CONFIG.rounds
    assert result["prefill_tokens"] == CONFIG.rounds * (
        CONFIG.length + CONFIG.length // CONFIG.pool + 2 * result["input_tokens"])
    assert result["estimated_saved_ms"] > 0  # the estimate is reported (its accuracy: the bench)
    assert {task: len(times) for task, times in result["prefill_ms"].items()} == dict.fromkeys(files, CONFIG.rounds)

    for task in task_names(CONFIG.pool):  # per-task latency series, so a dashboard can put the two side by side
        assert metric_sum(server.url, "lamp_request_seconds_count", task=task) == CONFIG.warmup + CONFIG.rounds
        assert metric_sum(server.url, "lamp_time_to_first_token_seconds_count", task=task) == \
            CONFIG.warmup + CONFIG.rounds
    held = metric_samples(httpx.get(f"{server.url}/metrics", timeout=30).text, "lamp_kv_cache_bytes")
    assert held and all(s.value == 0 for s in held)  # reported, and nothing in flight any more


@pytest.mark.parametrize("field, value, message", [
    ("pool", 1, "pool must be in 2..length"), ("pool", 300, "pool must be in 2..length"),
    ("rank", 201, "rank must be <= length"), ("rounds", 0, "rounds must be >= 1"),
    ("warmup", 7, "warmup must be >= 8"),
])
def test_the_bench_refuses_settings_that_measure_nothing(field, value, message):
    with pytest.raises(ValueError, match=message):
        SavingsBenchConfig(**{field: value})
