"""Every error the API promises: right status, a message naming the problem, and a server that
still answers normally afterwards (nothing a client sends takes a replica down or damages the store)."""

from __future__ import annotations

import json
import pickle
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, SoftPromptAdapter, save_adapter

from ..conftest import vocab_prompt
from ..store_state import registry_state
from .conftest import MAX_INPUT_TOKENS, MAX_REQUEST_BYTES, MAX_UPLOAD_BYTES, assert_healthy

pytestmark = pytest.mark.slow


def message(response: httpx.Response) -> str:
    body = response.json()
    assert body["error"]["code"] == response.status_code
    return body["error"]["message"]


def soft_prompt_bytes(prompt: torch.Tensor, tmp_path, name="a.safetensors") -> bytes:
    return save_adapter(SoftPromptAdapter(AdapterMeta(), prompt), tmp_path / name).read_bytes()


# ---- inference ------------------------------------------------------------------------------------


def test_unknown_task_is_404_everywhere(client):
    for response in (client.post("/generate", json={"task_id": "ghost", "input": "x"}),
                     client.post("/generate", json={"task_id": "ghost", "input": "x", "stream": True}),
                     client.post("/v1/completions", json={"model": "ghost", "prompt": "x"})):
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/json")  # not a 200 SSE stream
        assert "unknown task id 'ghost'" in message(response)
    assert_healthy(client)


@pytest.mark.parametrize("body, named", [
    ({"input": "x"}, "task_id"),
    ({"task_id": "plain"}, "input"),
    ({"task_id": "plain", "input": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"task_id": "plain", "input": "x", "temperature": -1}, "temperature"),
    ({"task_id": "plain", "input": "x", "top_p": 0}, "top_p"),
    ({"task_id": "plain", "input": "x", "top_k": 0}, "top_k"),
    ({"task_id": "plain", "input": "x", "stop": [""]}, "stop"),
    ({"task_id": "plain", "input": "x", "max_new_tokens": "many"}, "max_new_tokens"),
    ({"task_id": "plain", "input": "x", "max_tokens": 5}, "max_tokens"),  # a typo'd field is not ignored
    ({"task_id": "plain", "input": "x", "max_new_tokens": 129}, "max_new_tokens"),  # over the server's 128
])
def test_invalid_generate_request_is_422_naming_the_field(client, body, named):
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    assert named in message(response)


def test_malformed_json_and_unsupported_or_invalid_openai_options_are_422(client):
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in message(response)
    for extra, named in (({"best_of": 2}, "best_of"), ({"suffix": "x"}, "suffix"), ({"n": 17}, "n"),
                         ({"logprobs": 21}, "logprobs"), ({"max_tokens": 0}, "only with echo"),
                         ({"echo": True, "stream": True}, "echo is not supported with stream"),
                         ({"prompt": ["a", "b"], "stream": True}, "single prompt")):
        response = client.post("/v1/completions", json={"model": "plain", "prompt": "x", **extra})
        assert response.status_code == 422, (extra, response.text)
        assert named in message(response)
    assert_healthy(client)


def test_input_over_the_token_limit_is_413(client):
    text = "word " * (MAX_INPUT_TOKENS + 50)
    for response in (client.post("/generate", json={"task_id": "plain", "input": text}),
                     client.post("/v1/completions", json={"model": "plain", "prompt": text})):
        assert response.status_code == 413
        assert f"over the limit of {MAX_INPUT_TOKENS}" in message(response)
    assert_healthy(client)


def test_request_body_over_the_byte_limit_is_413(client):
    text = "x" * (MAX_REQUEST_BYTES + 1)
    response = client.post("/generate", json={"task_id": "plain", "input": text})
    assert response.status_code == 413
    assert "request body" in message(response) and str(MAX_REQUEST_BYTES) in message(response)

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(4):
            yield b" " * (MAX_REQUEST_BYTES // 2)

    response = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over the limit" in message(response)
    assert_healthy(client)


def test_overload_is_503_with_retry_after_and_the_server_recovers(server, client):
    def generate(i):
        return httpx.post(f"{server.url}/generate", timeout=180,
                          json={"task_id": "plain", "input": f"Story number {i}:", "max_new_tokens": 8})

    with ThreadPoolExecutor(24) as pool:  # capacity is MAX_BATCH_SIZE running + MAX_QUEUE waiting = 12
        responses = list(pool.map(generate, range(24)))
    statuses = sorted(r.status_code for r in responses)
    # One task alone beyond a full queue: 429 for it (fair scheduling, its share); 503 only once the
    # queue's reserve is full too (Serve's own back-pressure answers 503 as well).
    assert 200 in statuses and set(statuses) <= {200, 429, 503} and len(set(statuses)) > 1, statuses
    for r in (r for r in responses if r.status_code != 200):
        assert r.headers.get("retry-after") == "1", (r.headers, r.text)
        assert ("this task" if r.status_code == 429 else "overloaded") in message(r), message(r)
    assert_healthy(client)


# ---- admin ----------------------------------------------------------------------------------------


def test_admin_auth_401_without_token_403_with_a_wrong_one(client, tmp_path, backbone):
    data = soft_prompt_bytes(vocab_prompt(backbone, 4, seed=61), tmp_path)
    for headers in ({}, {"Authorization": "Basic dXNlcjpwdw=="}, {"Authorization": "Bearer"}):
        response = client.put("/admin/adapters/intruder", files={"adapter": ("a.safetensors", data)}, headers=headers)
        assert response.status_code == 401, headers
        assert "Authorization: Bearer" in message(response)
        assert response.headers["www-authenticate"] == "Bearer"
    for method in ("GET", "DELETE"):
        response = client.request(method, "/admin/adapters/plain", headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 403 and message(response) == "invalid admin token"
    response = client.get("/admin/adapters", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 403
    assert "intruder" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert_healthy(client)


def test_invalid_adapters_are_422_naming_the_problem_and_keep_the_previous_version(admin, client, server,
                                                                                    backbone, tmp_path):
    good = soft_prompt_bytes(vocab_prompt(backbone, 5, seed=71), tmp_path)
    assert admin.put("/admin/adapters/steady", files={"adapter": ("a.safetensors", good)}).status_code == 201
    before = client.post("/generate", json={"task_id": "steady", "input": "Hi", "max_new_tokens": 4}).json()
    index_before = registry_state(server.store)

    nan_prompt = vocab_prompt(backbone, 5, seed=72)
    nan_prompt[0, 0] = float("nan")
    cases = [
        ({"adapter": ("a.safetensors", soft_prompt_bytes(torch.randn(5, 100), tmp_path, "d.safetensors"))},
         None, "hidden size d=100 does not match the backbone's hidden size 576"),
        ({"adapter": ("a.safetensors", pickle.dumps({"prompt": [1.0, 2.0]}))}, None, "not a safetensors file"),
        ({"adapter": ("a.safetensors", soft_prompt_bytes(nan_prompt, tmp_path, "n.safetensors"))}, None, "NaN"),
        ({"adapter": ("a.safetensors", good)}, {"pool": "zero"}, "'pool' must be an integer >= 1"),
        ({"adapter": ("a.safetensors", good)}, {"pool": "999"}, "pool p=999 above the limit"),
        ({"adapter": ("a.safetensors", good), "adapter_model": ("m.safetensors", good)}, None,
         "not both"),
        ({"adapter_config": ("c.json", json.dumps({"peft_type": "PROMPT_TUNING"}).encode())}, None,
         "'adapter_model' is missing"),
        ({"adapter_config": ("c.json", json.dumps({"peft_type": "LORA"}).encode()),
          "adapter_model": ("m.safetensors", good)}, None, "peft_type must be one of"),
        ({"weights": ("a.safetensors", good)}, None, "unexpected form fields ['weights']"),
        ({"pool": (None, "2")}, None, "no adapter in the upload"),
    ]
    for files, data, expected in cases:
        response = admin.put("/admin/adapters/steady", files=files or None, data=data)
        assert response.status_code == 422, (expected, response.text)
        assert expected in message(response), message(response)

    response = admin.put("/admin/adapters/steady", content=good, headers={"content-type": "application/octet-stream"})
    assert response.status_code == 422 and "multipart/form-data" in message(response)
    response = admin.put("/admin/adapters/bad%20id!", files={"adapter": ("a.safetensors", good)})
    assert response.status_code == 422 and "invalid task id 'bad id!'" in message(response)

    assert registry_state(server.store) == index_before  # nothing was written
    after = client.post("/generate", json={"task_id": "steady", "input": "Hi", "max_new_tokens": 4}).json()
    assert (after["adapter_version"], after["text"]) == (before["adapter_version"], before["text"])
    admin.delete("/admin/adapters/steady").raise_for_status()


@pytest.mark.parametrize("extra_rows", [
    8,  # just over the limit: refused after reading, before parsing
    200,  # far over the limit, beyond multipart framing: refused from Content-Length, before reading
])
def test_upload_over_the_size_limit_is_413(admin, client, server, backbone, tmp_path, extra_rows):
    rows = MAX_UPLOAD_BYTES // (backbone.hidden_size * 4) + extra_rows  # float32 rows of 576
    big = soft_prompt_bytes(vocab_prompt(backbone, rows, seed=81), tmp_path)
    assert len(big) > MAX_UPLOAD_BYTES
    response = admin.put("/admin/adapters/huge", files={"adapter": ("a.safetensors", big)})
    assert response.status_code == 413
    assert "adapter upload is" in message(response) and "over the limit" in message(response)
    assert not (server.store / "huge").exists()
    assert_healthy(client)


def test_admin_unknown_task_is_404(admin):
    for method in ("GET", "DELETE"):
        response = admin.request(method, "/admin/adapters/never-registered")
        assert response.status_code == 404
        assert "no adapter registered for task 'never-registered'" in message(response)
