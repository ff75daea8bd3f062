"""Adapter administration over HTTP: register, generate, re-register, delete; uploads of every form."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from safetensors import safe_open

from lamp_runtime.adapters import load_adapter, save_adapter

from ..conftest import lamp_from_prompt, vocab_prompt
from ..store_state import registry_state
from .conftest import engine_alone, write_peft_folder

pytestmark = pytest.mark.slow

TEXT = "The weather today is"


def adapter_bytes(adapter, tmp_path, name="a.safetensors") -> bytes:
    return save_adapter(adapter, tmp_path / name).read_bytes()


def put(admin: httpx.Client, task_id: str, data: bytes, pool: str | None = None) -> httpx.Response:
    return admin.put(f"/admin/adapters/{task_id}", files={"adapter": ("a.safetensors", data)},
                     data={"pool": pool} if pool is not None else None)


def generate(client: httpx.Client, task_id: str, max_new_tokens: int = 8) -> httpx.Response:
    return client.post("/generate", json={"task_id": task_id, "input": TEXT, "max_new_tokens": max_new_tokens})


def test_register_generate_reregister_delete(admin, client, backbone, server, tmp_path):
    first = lamp_from_prompt(vocab_prompt(backbone, 12, seed=21), rank=6, pool=2)
    second = lamp_from_prompt(vocab_prompt(backbone, 9, seed=22), rank=5, pool=1)
    expected = engine_alone(backbone, {"v1": first, "v2": second}, [("v1", TEXT), ("v2", TEXT)], 8)

    created = put(admin, "news", adapter_bytes(first, tmp_path))
    assert created.status_code == 201, created.text
    body = created.json()
    assert {k: body[k] for k in ("task_id", "version", "kind", "prompt_tokens", "pooled_tokens")} == \
        {"task_id": "news", "version": 1, "kind": "lamp", "prompt_tokens": 12, "pooled_tokens": 6}
    assert body["bytes"] > 0
    assert (server.store / "news" / "v1.safetensors").stat().st_size == body["bytes"]

    reply = generate(client, "news")
    assert reply.status_code == 200, reply.text
    assert (reply.json()["adapter_version"], reply.json()["text"]) == (1, expected[0])

    again = put(admin, "news", adapter_bytes(second, tmp_path))
    assert again.status_code == 201 and again.json()["version"] == 2
    reply = generate(client, "news")
    assert (reply.json()["adapter_version"], reply.json()["text"]) == (2, expected[1])
    assert admin.get("/admin/adapters/news").json()["version"] == 2
    assert "news" in [a["task_id"] for a in admin.get("/admin/adapters").json()["adapters"]]

    deleted = admin.delete("/admin/adapters/news")
    assert deleted.status_code == 200 and deleted.json() == {"task_id": "news", "deleted_version": 2}
    gone = generate(client, "news")
    assert gone.status_code == 404 and "unknown task id 'news'" in gone.json()["error"]["message"]
    assert admin.get("/admin/adapters/news").status_code == 404
    assert "news" not in [m["id"] for m in client.get("/v1/models").json()["data"]]

    # Versions never repeat, even after a delete: caches and clients can trust (task, version).
    back = put(admin, "news", adapter_bytes(first, tmp_path))
    assert back.json()["version"] == 3
    assert generate(client, "news").json()["adapter_version"] == 3
    admin.delete("/admin/adapters/news").raise_for_status()


def test_running_request_finishes_on_the_version_it_started_with(admin, server, backbone, tmp_path):
    old = lamp_from_prompt(vocab_prompt(backbone, 10, seed=31), rank=5, pool=1)
    new = lamp_from_prompt(vocab_prompt(backbone, 10, seed=32), rank=5, pool=1)
    tokens = 24
    expected_old = engine_alone(backbone, {"t": old}, [("t", TEXT)], tokens)[0]
    assert put(admin, "swap", adapter_bytes(old, tmp_path)).status_code == 201

    events, first_token = [], threading.Event()

    def stream():
        with httpx.stream("POST", f"{server.url}/generate", timeout=120,
                          json={"task_id": "swap", "input": TEXT, "max_new_tokens": tokens, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    first_token.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_token.wait(60)
    assert put(admin, "swap", adapter_bytes(new, tmp_path)).json()["version"] == 2
    reader.join(120)
    final = events[-1]
    assert final["adapter_version"] == 1
    if final["finish_reason"] == "length":  # still running when v2 arrived, unless it finished that fast
        assert final["usage"]["completion_tokens"] == tokens
    assert "".join(e["delta"] for e in events) == expected_old
    after = httpx.post(f"{server.url}/generate", json={"task_id": "swap", "input": TEXT, "max_new_tokens": 2})
    assert after.json()["adapter_version"] == 2
    admin.delete("/admin/adapters/swap").raise_for_status()


def test_peft_upload_is_normalised_and_pool_field_applies(admin, client, backbone, server, tmp_path):
    write_peft_folder(tmp_path / "peft", vocab_prompt(backbone, 6, seed=41))
    files = {"adapter_config": ("adapter_config.json", (tmp_path / "peft" / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors",
                               (tmp_path / "peft" / "adapter_model.safetensors").read_bytes())}
    created = admin.put("/admin/adapters/peft-up", files=files, data={"pool": "2"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["kind"], body["prompt_tokens"], body["pooled_tokens"]) == ("soft_prompt", 6, 3)
    stored = server.store / "peft-up" / f"v{body['version']}.safetensors"
    with safe_open(str(stored), "pt") as f:
        assert f.metadata()["format"] == "soft_prompt" and f.metadata()["pool"] == "2"
        assert list(f.keys()) == ["prompt"]
    expected = engine_alone(backbone, {"p": load_adapter(tmp_path / "peft", backbone.hidden_size, pool=2)},
                            [("p", TEXT)], 8)
    reply = generate(client, "peft-up")
    assert reply.json()["text"] == expected[0]
    assert reply.json()["usage"]["soft_prompt_tokens"] == 3
    admin.delete("/admin/adapters/peft-up").raise_for_status()


def test_bundled_adapters_are_in_the_store_with_their_source(admin):
    adapters = {a["task_id"]: a for a in admin.get("/admin/adapters").json()["adapters"]}
    assert adapters["plain"]["source"] == "bundled:plain.safetensors"
    assert adapters["peft6"]["source"] == "bundled:peft6"
    assert adapters["lamp3"]["pooled_tokens"] == 4


def test_index_on_disk_is_valid_json_naming_existing_files(admin, server, backbone, tmp_path):
    data = adapter_bytes(lamp_from_prompt(vocab_prompt(backbone, 4, seed=51), rank=2, pool=1), tmp_path)
    for _ in range(3):
        assert put(admin, "churn", data).status_code == 201
    index = registry_state(server.store)
    for task_id, entry in index["tasks"].items():
        assert (server.store / task_id / f"v{entry['version']}.safetensors").is_file()
    assert index["last_versions"]["churn"] == 3
    # Only the current version and the one before it are kept on disk.
    assert sorted(p.name for p in (server.store / "churn").iterdir()) == ["v2.safetensors", "v3.safetensors"]
    admin.delete("/admin/adapters/churn").raise_for_status()
    assert not (server.store / "churn").exists()

