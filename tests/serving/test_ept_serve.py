"""A decoder EPT adapter (joint prompt + low-rank offset on the first input embeddings) served over
HTTP: uploaded through the admin API, answered concurrently with other tasks, equal to the engine
alone (which tests/runtime/test_ept_engine.py checks against a direct transformers computation)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, EptAdapter, save_adapter

from ..conftest import vocab_prompt
from .conftest import engine_alone

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
INPUTS = ["The capital of France is", "Hi", "List three colours:"]  # "Hi" is shorter than the offset's 4 rows


@pytest.fixture()
def ept_task(admin):
    yield "ept-http"
    admin.delete("/admin/adapters/ept-http")  # the server is shared: leave its task list as it was


def test_ept_adapter_served_over_http_equals_the_engine_alone(server, admin, backbone, bundled_adapters, ept_task,
                                                              tmp_path):
    g = torch.Generator().manual_seed(21)
    ept = EptAdapter(AdapterMeta(), vocab_prompt(backbone, 5, seed=22), torch.randn(4, 2, generator=g) * 0.05,
                     torch.randn(2, backbone.hidden_size, generator=g) * 0.05)
    data = save_adapter(ept, tmp_path / "ept.safetensors").read_bytes()
    stored = admin.put(f"/admin/adapters/{ept_task}", files={"adapter": ("ept.safetensors", data)})
    assert stored.status_code == 201, stored.text
    assert (stored.json()["kind"], stored.json()["pooled_tokens"]) == ("ept", 5)
    cases = [(ept_task, text) for text in INPUTS] + [("lamp2", text) for text in INPUTS]
    expected = engine_alone(backbone, {ept_task: ept, "lamp2": bundled_adapters["lamp2"]}, cases, NEW_TOKENS)

    def generate(case):
        task, text = case
        response = httpx.post(f"{server.url}/generate", timeout=120,
                              json={"task_id": task, "input": text, "max_new_tokens": NEW_TOKENS})
        response.raise_for_status()
        return response.json()

    with ThreadPoolExecutor(len(cases)) as pool:
        bodies = list(pool.map(generate, cases))
    assert [b["text"] for b in bodies] == expected
    assert {b["usage"]["soft_prompt_tokens"] for b in bodies[:len(INPUTS)]} == {5}
