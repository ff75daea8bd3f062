"""The whole server killed (SIGKILL of every process) in the middle of an upload, then restarted on
the same store: every adapter registered over HTTP is back with the same version, bytes and
outputs; the interrupted upload left the previous version current and nothing half written."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from lamp_runtime.adapters import AdapterMeta, SoftPromptAdapter, save_adapter

from ..conftest import lamp_from_prompt, vocab_prompt
from ..server_process import ServerProcess
from ..store_state import registry_state
from .conftest import measured
from .traffic import adapter_bytes, upload

pytestmark = pytest.mark.slow

TOKEN = "restart-test-token"
TEXT = "Tell me about the sea"
NEW_TOKENS = 4
UPLOAD_CHUNK = 16 * 1024


def outputs(url: str, tasks: list[str]) -> dict[str, tuple[int, str]]:
    answers = {}
    for task_id in tasks:
        r = httpx.post(f"{url}/generate", timeout=120,
                       json={"task_id": task_id, "input": TEXT, "max_new_tokens": NEW_TOKENS})
        assert r.status_code == 200, r.text
        answers[task_id] = (r.json()["adapter_version"], r.json()["text"])
    return answers


def listing(url: str) -> dict[str, dict]:
    r = httpx.get(f"{url}/admin/adapters", headers={"Authorization": f"Bearer {TOKEN}"})
    return {a["task_id"]: a for a in r.json()["adapters"]}


def slow_multipart_upload(url: str, task_id: str, data: bytes, halfway: threading.Event, outcome: list) -> None:
    """PUT an adapter in small chunks with pauses (a slow client); `halfway` is set mid-body."""
    head = (b"--x\r\nContent-Disposition: form-data; name=\"adapter\"; filename=\"a.safetensors\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n")
    body = head + data + b"\r\n--x--\r\n"

    def chunks():
        for start in range(0, len(body), UPLOAD_CHUNK):
            if start >= len(body) // 2:
                halfway.set()
                time.sleep(0.2)
            yield body[start:start + UPLOAD_CHUNK]

    try:
        r = httpx.put(f"{url}/admin/adapters/{task_id}", content=chunks(), timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}", "content-type": "multipart/form-data; boundary=x"})
        outcome.append(r.status_code)
    except httpx.HTTPError as exc:
        outcome.append(repr(exc))
    finally:
        halfway.set()


def test_sigkill_mid_upload_then_restart_loses_nothing(backbone, task_adapters, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for task_id, adapter in task_adapters.items():
        save_adapter(adapter, prompts / f"{task_id}.safetensors")
    store = tmp_path / "store"
    uploads = {
        "news": [lamp_from_prompt(vocab_prompt(backbone, 12, seed=501), rank=6, pool=2),
                 lamp_from_prompt(vocab_prompt(backbone, 9, seed=502), rank=4, pool=3)],  # re-registered: v2
        "faq": [SoftPromptAdapter(AdapterMeta(pool=2), vocab_prompt(backbone, 10, seed=503))],
        "gone": [lamp_from_prompt(vocab_prompt(backbone, 6, seed=504), rank=3, pool=1)],  # deleted again
    }
    big_next_version = SoftPromptAdapter(AdapterMeta(), vocab_prompt(backbone, 400, seed=505))  # ~0.9 MB

    first = ServerProcess(store=store, prompts=prompts, admin_token=TOKEN, log_path=tmp_path / "first.log")
    halfway, outcome = threading.Event(), []
    uploader = threading.Thread(target=lambda: None)
    first.start()
    try:
        with httpx.Client(base_url=first.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
            for task_id, versions in uploads.items():
                for adapter in versions:
                    assert upload(admin, task_id, adapter_bytes(adapter)).status_code == 201
            assert admin.delete("/admin/adapters/gone").status_code == 200
        tasks = sorted([*task_adapters, "news", "faq"])
        before_list, before_out = listing(first.url), outputs(first.url, tasks)
        assert sorted(before_list) == tasks and before_list["news"]["version"] == 2

        uploader = threading.Thread(target=slow_multipart_upload,
                                    args=(first.url, "news", adapter_bytes(big_next_version), halfway, outcome))
        uploader.start()
        assert halfway.wait(60)
    finally:
        first.kill()  # SIGKILL to the server's session and every process it started
        if uploader.ident is not None:
            uploader.join(60)
    assert outcome and outcome[0] != 201, outcome  # the upload never completed

    index = registry_state(store)  # still the old state: the killed upload committed nothing
    assert {t: e["version"] for t, e in index["tasks"].items()} == {t: a["version"] for t, a in before_list.items()}

    started = time.monotonic()
    second = ServerProcess(store=store, prompts=prompts, admin_token=TOKEN, log_path=tmp_path / "second.log")
    with second:
        restart_s = time.monotonic() - started
        assert listing(second.url) == before_list  # same versions, sizes, hashes, sources
        assert outputs(second.url, tasks) == before_out  # same adapters, same greedy text
        assert httpx.post(f"{second.url}/generate", json={"task_id": "gone", "input": TEXT}).status_code == 404
        with httpx.Client(base_url=second.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
            again = upload(admin, "news", adapter_bytes(big_next_version))
        assert again.status_code == 201 and again.json()["version"] == 3, again.text
    measured("restart", adapters=len(tasks), identical_outputs=len(tasks), killed_upload=repr(outcome[0])[:60],
             restart_to_healthy_s=round(restart_s, 1))
