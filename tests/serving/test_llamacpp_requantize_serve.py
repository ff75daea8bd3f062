"""`lamp serve --engine llamacpp --llamacpp-requantize Q4_0`, end to end: a real server on a free
port serves the embedded GGUF requantized by llama.cpp (the file made once in the lamp cache),
answers concurrent mixed-task requests like the llama.cpp engine built in this process on the same
requantized file one request at a time, says what it serves on /metrics and /status.json, and
warns in its log that adapters trained on the original weights can lose their accuracy there."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ..requires import require_module
from ..server_process import launched_over

require_module("llama_cpp", "the llama.cpp engine needs llama-cpp-python (make setup builds it)")

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "requantize-admin-token"
NEW_TOKENS = 8
CASES = [("plain", "The capital of France is"), ("lamp2", "Write a haiku about the sea:"), ("lamp3", "1, 2, 3,"),
         ("plain", "Water boils at")]


@pytest.fixture(scope="module")
def launched_server(tmp_path_factory, task_adapters):
    args = ["--engine", "llamacpp", "--dtype", "auto", "--quantization", "auto", "--max-batch-size", "4",
            "--max-new-tokens", "32", "--max-input-tokens", "128", "--llamacpp-row-cells", "256",
            "--llamacpp-requantize", "Q4_0"]
    yield from launched_over(tmp_path_factory, task_adapters, args, ADMIN_TOKEN)


@pytest.fixture(scope="module")
def reference(launched_server, task_adapters):
    """The requantized llama.cpp engine in this process, one request at a time (built while the
    server starts; the first of the two to start makes the file, under a file lock)."""
    from lamp_runtime.engine.base import EngineConfig
    from lamp_runtime.llamacpp.engine import build_llamacpp_engine
    from lamp_runtime.llamacpp.options import LlamaCppOptions
    from lamp_runtime.requests import GenerationRequest, SamplingParams

    engine = build_llamacpp_engine(config=EngineConfig(max_batch_size=2, threads=1),
                                   options=LlamaCppOptions(row_cells=256, probe=False, requantize="Q4_0"))
    for task_id, adapter in task_adapters.items():
        engine.registry.register(task_id, adapter)
    answers = {case: engine.generate([GenerationRequest(case[1], case[0], SamplingParams(max_new_tokens=NEW_TOKENS))])[0].text
               for case in CASES}
    engine.close()
    return answers


@pytest.fixture(scope="module")
def server(launched_server, reference):
    return launched_server.start(timeout=600.0)


def test_requantized_weights_answer_like_the_engine_on_the_same_file(server, reference):
    def generate(case):
        response = httpx.post(f"{server.url}/generate", timeout=300,
                              json={"task_id": case[0], "input": case[1], "max_new_tokens": NEW_TOKENS})
        assert response.status_code == 200, response.text
        return response.json()["text"]

    with ThreadPoolExecutor(len(CASES)) as pool:
        assert list(pool.map(generate, CASES)) == [reference[case] for case in CASES]


def test_the_server_says_it_serves_requantized_weights_and_warns(server):
    metrics = httpx.get(f"{server.url}/metrics", timeout=60).text
    info = [line for line in metrics.splitlines() if line.startswith("lamp_engine_info{")]
    assert any('kind="llamacpp"' in line and 'weights="Q4_0 requantized"' in line for line in info), info
    engines = httpx.get(f"{server.url}/status.json", timeout=60).json()["engines"]
    assert engines and all(e["weights"] == "Q4_0 requantized" for e in engines), engines
    assert "requantized to Q4_0: adapters trained on its own weights can lose their accuracy" in server.log_path.read_text(errors="replace")
