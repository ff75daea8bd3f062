"""Batch registration (POST /admin/adapters) and cursor pages of GET /admin/adapters and /v1/models,
on the package's shared server."""

from __future__ import annotations

import httpx
import pytest

from lamp_runtime.adapters import save_adapter

from ..conftest import lamp_from_prompt, vocab_prompt

pytestmark = pytest.mark.slow

TEXT = "The weather today is"


def adapter_bytes(backbone, tmp_path, seed: int) -> bytes:
    adapter = lamp_from_prompt(vocab_prompt(backbone, 6, seed=seed), rank=3, pool=1)
    return save_adapter(adapter, tmp_path / f"s{seed}.safetensors").read_bytes()


def all_pages(client: httpx.Client, path: str, key: str, limit: int) -> tuple[list[str], list[dict]]:
    ids, pages, after = [], [], None
    while True:
        body = client.get(path, params={"limit": limit, **({"after": after} if after else {})}).json()
        pages.append(body)
        ids += [entry["task_id" if key == "adapters" else "id"] for entry in body[key]]
        if not body["has_more"]:
            return ids, pages
        after = body["last_id"]


def test_a_batch_stores_each_adapter_whole_or_not_at_all_and_pages_list_them(admin, client, backbone, tmp_path):
    good = {f"batch-{i}": adapter_bytes(backbone, tmp_path, 300 + i) for i in range(5)}
    files = [(f"adapter.{task}", ("a.safetensors", data)) for task, data in good.items()]
    files += [("adapter.batch-bad", ("a.safetensors", b"not a safetensors file")),
              ("adapter.bad id", ("a.safetensors", good["batch-0"]))]
    response = admin.post("/admin/adapters", files=files, data={"pool.batch-1": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["registered"], body["failed"]) == (5, 2)
    statuses = {r["task_id"]: r["status"] for r in body["results"]}
    assert statuses == {**dict.fromkeys(good, 201), "batch-bad": 422, "bad id": 422}
    assert "not a safetensors file" in next(r["error"] for r in body["results"] if r["task_id"] == "batch-bad")
    assert next(r for r in body["results"] if r["task_id"] == "batch-1")["adapter"]["pooled_tokens"] == 3

    # Registered means servable, on the very next request.
    for task in good:
        reply = client.post("/generate", json={"task_id": task, "input": TEXT, "max_new_tokens": 2})
        assert reply.status_code == 200 and reply.json()["adapter_version"] == 1, reply.text
    assert client.post("/generate", json={"task_id": "batch-bad", "input": TEXT}).status_code == 404

    # Pages of 2 walk the whole list once, in id order, each page with the same total.
    ids, pages = all_pages(admin, "/admin/adapters", "adapters", limit=2)
    whole = admin.get("/admin/adapters").json()
    assert ids == sorted(ids) == [a["task_id"] for a in whole["adapters"]] and not whole["has_more"]
    assert set(good) <= set(ids) and {p["total"] for p in pages} == {len(ids)} and len(pages) == -(-len(ids) // 2)
    model_ids, model_pages = all_pages(client, "/v1/models", "data", limit=3)
    assert model_ids == ids and model_pages[0]["object"] == "list" and model_pages[0]["first_id"] == ids[0]

    for bad in ({"limit": 0}, {"limit": 10_001}, {"limit": "x"}):
        assert client.get("/v1/models", params=bad).status_code == 422
    for task in good:
        admin.delete(f"/admin/adapters/{task}").raise_for_status()


def test_a_batch_needs_the_admin_token_and_named_fields(server, admin, backbone, tmp_path):
    data = adapter_bytes(backbone, tmp_path, 320)
    assert httpx.post(f"{server.url}/admin/adapters", files={"adapter.x": ("a", data)}).status_code == 401
    unnamed = admin.post("/admin/adapters", files={"adapter": ("a", data)})
    assert unnamed.status_code == 422 and "'<field>.<task id>'" in unnamed.json()["error"]["message"]
    assert admin.post("/admin/adapters", json={}).status_code == 422
