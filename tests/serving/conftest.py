"""One real `lamp serve` shared by the end-to-end API, admin and error tests of this package.

It starts once (package scope, ~20-40 s here) with bundled adapters of every kind in a temporary
`prompts/` folder, a temporary store, an admin token, and small limits so the limit errors are
cheap to provoke. Tests that change adapters use task ids of their own.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import save_file

from lamp_runtime.adapters import load_adapter, save_adapter
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..conftest import vocab_prompt
from ..server_process import ServerProcess

ADMIN_TOKEN = "test-admin-token"
MAX_BATCH_SIZE = 4
MAX_QUEUE = 8  # above the 6 concurrent requests of the batching test, so only the overload test hits it
MAX_INPUT_TOKENS = 256
MAX_REQUEST_BYTES = 64 * 1024
MAX_UPLOAD_BYTES = 256 * 1024
BUNDLED_TASKS = ("lamp2", "lamp3", "peft6", "plain")


def write_peft_folder(folder, prompt: torch.Tensor) -> None:
    """A PEFT prompt-tuning checkpoint as `save_pretrained` writes it (config + safetensors)."""
    folder.mkdir(parents=True)
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": prompt.shape[0],
              "token_dim": prompt.shape[1], "base_model_name_or_path": "SmolLM2-135M-Instruct"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": prompt.contiguous()}, str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="package")
def prompts_dir(tmp_path_factory, backbone, task_adapters):
    folder = tmp_path_factory.mktemp("prompts")
    for task_id, adapter in task_adapters.items():
        save_adapter(adapter, folder / f"{task_id}.safetensors")
    write_peft_folder(folder / "peft6", vocab_prompt(backbone, 6, seed=4))
    (folder / "data").mkdir()  # like the repo's prompts/data: not an adapter, must be skipped
    (folder / "data" / "train.jsonl").write_text("{}\n")
    return folder


@pytest.fixture(scope="package")
def bundled_adapters(prompts_dir, backbone):
    """The bundled adapters as the server loads them (from the files), by task id."""
    return {task: load_adapter(prompts_dir / (task if task == "peft6" else f"{task}.safetensors"),
                               backbone.hidden_size) for task in BUNDLED_TASKS}


@pytest.fixture(scope="package")
def server(tmp_path_factory, prompts_dir):
    process = ServerProcess(
        store=tmp_path_factory.mktemp("store"), prompts=prompts_dir, admin_token=ADMIN_TOKEN,
        log_path=tmp_path_factory.mktemp("logs") / "serve.log",
        extra_args=["--max-batch-size", str(MAX_BATCH_SIZE), "--max-queue", str(MAX_QUEUE),
                    "--batch-wait-ms", "50", "--max-input-tokens", str(MAX_INPUT_TOKENS),
                    "--max-new-tokens", "128", "--max-request-bytes", str(MAX_REQUEST_BYTES),
                    "--max-upload-bytes", str(MAX_UPLOAD_BYTES)],
    )
    with process:
        yield process


def engine_alone(backbone, adapters: dict, cases: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
    """Greedy texts of each (task, input) run on its own through the engine, every prompt computed
    with its input (no prompt-KV cache): the reference."""
    engine = DecoderEngine(backbone, config=EngineConfig(max_batch_size=1, prompt_kv_cache_bytes=0))
    for task_id, adapter in adapters.items():
        engine.registry.register(task_id, adapter)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return [engine.generate([GenerationRequest(text, task, params)])[0].text for task, text in cases]


def assert_healthy(client: httpx.Client, task_id: str = "plain") -> None:
    """The server still answers a normal request after whatever the test did to it."""
    response = client.post("/generate", json={"task_id": task_id, "input": "Hello", "max_new_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1 or response.json()["finish_reason"] == "stop"
