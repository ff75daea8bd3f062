"""Hostile adapter uploads and task ids over HTTP: every one is a 4xx whose message names the
problem; the store is byte-for-byte unchanged (no file, no folder, no temporary file, nothing
outside it) and no replica registers anything."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from ..store_state import registry_state, store_files
from .conftest import MAX_UPLOAD_BYTES, REPLICAS
from .hostile_files import (
    HIDDEN,
    MALFORMED_HEADERS,
    lamp,
    lamp_file,
    pickle_file,
    raw_safetensors,
    safetensors_bytes,
    soft_prompt_file,
    with_value,
    zip_file,
)
from .traffic import registered_per_replica, wait_for_replicas

pytestmark = pytest.mark.slow

GOOD = lamp_file()
PEFT_CONFIG = json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": HIDDEN}).encode()


def peft(config: bytes, model: bytes) -> dict:
    return {"adapter_config": ("adapter_config.json", config), "adapter_model": ("adapter_model.safetensors", model)}


def adapter(data: bytes) -> dict:
    return {"adapter": ("adapter.safetensors", data)}


def cases() -> list:
    u3 = lamp()
    u3["lamp.U"] = u3["lamp.U"][None]
    mismatched = lamp()
    mismatched["lamp.Q"] = mismatched["lamp.Q"][:2]
    ept = {"ept.prompt": torch.zeros(4, HIDDEN), "ept.A": torch.zeros(3, 2), "ept.B": torch.zeros(3, HIDDEN)}
    good = GOOD
    found = [
        ("nan", adapter(lamp_file(with_value(lamp(), "lamp.U", float("nan")))), "'lamp.U' contains NaN or Inf"),
        ("inf", adapter(lamp_file(with_value(lamp(), "lamp.Q", float("inf")))), "'lamp.Q' contains NaN or Inf"),
        ("minus-inf", adapter(soft_prompt_file(with_value({"p": torch.zeros(4, HIDDEN)}, "p", -float("inf"))["p"])),
         "'prompt' contains NaN or Inf"),
        ("huge-value", adapter(lamp_file(with_value(lamp(), "lamp.V", 1e30))), "above the limit"),
        ("wrong-hidden-size", adapter(lamp_file(lamp(d=100))), "hidden size d=100 does not match"),
        ("huge-l", adapter(lamp_file(lamp(l=1025, r=1))), "prompt length l=1025 outside 1..1024"),
        ("huge-r", adapter(lamp_file(lamp(l=4, r=257))), "rank r=257 outside 1..256"),
        ("zero-l", adapter(lamp_file(lamp(l=0))), "prompt length l=0"),
        ("huge-pool", adapter(lamp_file(pool="65")), "pool p=65 above the limit"),
        ("rank-mismatch", adapter(lamp_file(mismatched)), "LAMP rank mismatch"),
        ("factor-3d", adapter(lamp_file(u3)), "LAMP factors must be U [l, r], Q [r], V [r, d]"),
        ("extra-tensor", adapter(lamp_file({**lamp(), "evil": torch.zeros(1)})), "unexpected ['evil']"),
        ("missing-tensor", adapter(lamp_file({k: v for k, v in lamp().items() if k != "lamp.Q"})),
         "missing ['lamp.Q']"),
        ("soft-prompt-1d", adapter(soft_prompt_file(torch.zeros(HIDDEN))), "prompt must be [l, d]"),
        ("ept-shapes", adapter(safetensors_bytes(ept, {"format": "ept"})), "EPT tensors must be"),
        ("format-unknown", adapter(lamp_file(format="exe")), "metadata format must be"),
        ("no-metadata", adapter(safetensors_bytes(lamp(), None)), "metadata format must be"),
        ("pool-negative", adapter(lamp_file(pool="-3")), "pool must be an integer >= 1"),
        ("pool-word", adapter(lamp_file(pool="two")), "pool must be an integer >= 1"),
        ("pickle", adapter(pickle_file()), "not a safetensors file"),
        ("zip", adapter(zip_file()), "not a safetensors file"),
        ("truncated", adapter(good[: len(good) - 100]), "truncated"),
        ("empty", adapter(b""), "only 0 bytes"),
        ("header-length-lie", adapter(b"\xff" * 8 + good[8:]), "header length"),
        ("peft-config-not-json", peft(b"{oops", GOOD), "not valid JSON"),
        ("peft-lora", peft(json.dumps({"peft_type": "LORA"}).encode(), GOOD), "peft_type must be one of"),
        ("peft-pickle-model", peft(PEFT_CONFIG, pickle_file()), "not a safetensors file"),
        ("peft-virtual-tokens", peft(PEFT_CONFIG, safetensors_bytes({"prompt_embeddings": torch.zeros(6, HIDDEN)},
                                                                    None)), "num_virtual_tokens=4"),
        ("too-many-files", {"adapter": [("a", good)] * 2, "adapter_config": ("c", b"{}"),
                            "adapter_model": ("m", good)}, "malformed multipart upload"),
        ("pool-field-huge", {**adapter(good), "pool": (None, "1" * (128 * 1024))}, "malformed multipart upload"),
    ]
    found += [(f"header-{name}", adapter(raw_safetensors(header, b"\0" * payload)), expected or "")
              for name, header, payload, expected in MALFORMED_HEADERS]
    return found


CASES = cases()

# (path after /admin/adapters/, as sent on the wire): traversal, separators, unicode, empty, long.
BAD_TASK_IDS = [
    "%2E%2E%2F%2E%2E%2Fescaped", "..%2Fescaped", "a%2Fb", "a%5Cb", "%2E%2E", ".hidden", "-dash",
    "caf%C3%A9", "%EF%BD%90lain", "a%00b", "a%0Ab", "a%20b", "", "x" * 65, "y" * 4000, "index.json",
]


def snapshot(server) -> tuple:
    store = server.store
    return (registry_state(store), store_files(store),
            sorted(p.name for p in store.parent.iterdir()))


@pytest.fixture(scope="module")
def before(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        return snapshot(server), client.get("/v1/models").json(), wait_for_replicas(client, REPLICAS)


def status_and_message(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert body["error"]["code"] == response.status_code
    return response.status_code, body["error"]["message"]


@pytest.mark.parametrize("files, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_adapter_is_422_naming_the_problem_and_nothing_is_stored(admin, server, before, files, expected):
    multipart = [(name, part) for name, value in files.items()
                 for part in (value if isinstance(value, list) else [value])]
    status, message = status_and_message(admin.put("/admin/adapters/hostile", files=multipart))
    assert status == 422, message
    assert expected in message, message
    assert snapshot(server) == before[0]


@pytest.mark.parametrize("path", BAD_TASK_IDS, ids=lambda p: p[:24] or "empty")
def test_bad_task_id_is_422_and_nothing_is_written_anywhere(admin, server, before, path):
    status, message = status_and_message(admin.put(f"/admin/adapters/{path}", files=adapter(GOOD)))
    if "%0A" in path:  # a newline never matches a route (Starlette's path parameters stop at it)
        assert (status, message) == (404, "Not Found: no route for PUT '/admin/adapters/a\\nb'")
    else:
        assert status == 422, message
        assert "invalid task id" in message or "reserved by the adapter store" in message, message
    assert snapshot(server) == before[0]


def test_dot_segments_sent_raw_are_not_resolved_into_another_path(admin, server, before):
    """`/admin/adapters/../x` on the wire (httpx would normalise it; the request target is forced)."""
    request = admin.build_request("PUT", "/admin/adapters/escaped", files=adapter(GOOD),
                                  extensions={"target": b"/admin/adapters/../../escaped"})
    status, message = status_and_message(admin.send(request))
    assert status in (404, 422), message
    assert snapshot(server) == before[0]


def test_oversized_uploads_are_413_whether_or_not_the_size_is_declared(admin, server, before):
    big = lamp_file({"lamp.U": torch.zeros(4, 2), "lamp.Q": torch.ones(2),
                     "lamp.V": torch.zeros(2, MAX_UPLOAD_BYTES // 8 + 1)})
    status, message = status_and_message(admin.put("/admin/adapters/huge", files=adapter(big)))
    assert status == 413 and "over the limit" in message, message
    body = b"".join([b"--b\r\nContent-Disposition: form-data; name=\"adapter\"; filename=\"a\"\r\n\r\n", big,
                     b"\r\n--b--\r\n"])

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    response = admin.put("/admin/adapters/huge", content=chunks(),
                         headers={"content-type": "multipart/form-data; boundary=b"})
    status, message = status_and_message(response)
    assert status == 413 and "over the limit" in message, message
    assert snapshot(server) == before[0]


def test_the_engine_never_saw_any_of_it(client, server, before):
    assert snapshot(server) == before[0]
    assert client.get("/v1/models").json() == before[1]
    assert registered_per_replica(client) == before[2]
    reply = client.post("/generate", json={"task_id": "plain", "input": "Hello", "max_new_tokens": 2})
    assert reply.status_code == 200, reply.text
