"""A model replica SIGKILLed under load: Serve replaces it, requests fail only while it is gone
(503 + Retry-After, and the client's retry then succeeds), nothing is lost, and the new replica
serves every adapter, including those registered during the load and while the replica was down."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import psutil
import pytest

from ..conftest import lamp_from_prompt, vocab_prompt
from .conftest import BUNDLED_TASKS, GENERATION_BURST, REPLICAS, measured
from .traffic import Load, adapter_bytes, bursts_until, reference_texts, upload

pytestmark = pytest.mark.slow

LOAD_WORKERS = 4
STEP_TIMEOUT_S = 240.0  # bound on each wait below; a replica restart takes ~20-60 s on 2 busy cores
SERVED_AFTER_RECOVERY = 12
REPLICA_PROCESS = "ServeReplica:lamp:LampModel"


def model_replica_processes(server) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if REPLICA_PROCESS in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


async def wait_for(condition, what: str, timeout: float = STEP_TIMEOUT_S) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)
    return time.monotonic()


async def served_by(url: str, tasks: list[str], replica: str) -> dict:
    """For each task, bursts of concurrent /generate calls until `replica` answers it; that answer."""
    def hits(answers):
        return [a for a in answers if a.replica == replica and a.status == 200]

    found = {}
    for task_id in tasks:
        if answered := hits(await bursts_until(url, task_id, hits, GENERATION_BURST)):
            found[task_id] = answered[0]
    return found


async def kill_a_replica_under_load(server, admin: httpx.Client, tasks: list[str], late: dict[str, bytes]) -> dict:
    load = Load(server.url, lambda: tasks, LOAD_WORKERS)
    running = asyncio.create_task(load.run())

    def replicas_seen(since: float = 0.0) -> set[str]:
        return {a.replica for a in list(load.attempts) if a.replica and a.status == 200 and a.started >= since}

    try:
        await wait_for(lambda: len(replicas_seen()) >= REPLICAS, "every replica to answer under load")
        before = replicas_seen()
        # Registered while the load runs, then while one replica is down.
        created = await asyncio.to_thread(upload, admin, "during-load", late["during-load"])
        assert created.status_code == 201, created.text
        tasks.append("during-load")

        victim = model_replica_processes(server)[0]
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        created = await asyncio.to_thread(upload, admin, "during-outage", late["during-outage"])
        assert created.status_code == 201, created.text
        tasks.append("during-outage")

        recovered_at = await wait_for(lambda: replicas_seen(killed_at) - before, "a new replica to answer")
        served = load.served
        await wait_for(lambda: load.served >= served + SERVED_AFTER_RECOVERY, "load after recovery")
    finally:
        load.stop()
        await asyncio.wait_for(running, STEP_TIMEOUT_S)
    new_replica = (replicas_seen(killed_at) - before).pop()
    return {"load": load, "killed_at": killed_at, "recovered_at": recovered_at,
            "on_new_replica": await served_by(server.url, list(tasks), new_replica)}


def test_replica_killed_under_load_is_replaced_and_nothing_is_lost(server, admin, backbone, task_adapters):
    uploaded = {f"pre-{i}": lamp_from_prompt(vocab_prompt(backbone, 8, seed=300 + i), rank=4, pool=2)
                for i in range(2)}
    late = {"during-load": lamp_from_prompt(vocab_prompt(backbone, 6, seed=310), rank=3, pool=1),
            "during-outage": lamp_from_prompt(vocab_prompt(backbone, 10, seed=311), rank=5, pool=2)}
    references = reference_texts(backbone, {**task_adapters, **uploaded, **late})
    for task_id, adapter in uploaded.items():
        assert upload(admin, task_id, adapter_bytes(adapter)).status_code == 201
    versions = {a["task_id"]: a["version"] for a in admin.get("/admin/adapters").json()["adapters"]}

    run = asyncio.run(kill_a_replica_under_load(server, admin, [*BUNDLED_TASKS, *uploaded],
                                                {k: adapter_bytes(a) for k, a in late.items()}))
    load, killed_at, recovered_at = run["load"], run["killed_at"], run["recovered_at"]
    versions.update({a["task_id"]: a["version"] for a in admin.get("/admin/adapters").json()["adapters"]})
    failures = [a for a in load.attempts if a.status != 200]

    assert not load.lost, f"requests lost (never served after retries): {load.lost[:3]}"
    for a in failures:  # refused cleanly, and only while the replica was gone
        assert a.status == 503, a
        assert a.in_band or a.retry_after == "1", a
        assert killed_at <= a.finished and a.started <= recovered_at, a
    for a in load.attempts:
        if a.status == 200:  # served answers are right, on the old and on the new replica
            assert a.text == references[a.task_id], a
            assert a.version in (None, versions[a.task_id]), a  # completions carry no version
    on_new = run["on_new_replica"]
    assert sorted(on_new) == sorted(references), f"tasks never served by the new replica: " \
                                                 f"{sorted(set(references) - set(on_new))}"
    for task_id, a in on_new.items():
        assert (a.text, a.version) == (references[task_id], versions[task_id]), a
    assert len(model_replica_processes(server)) == REPLICAS

    window = [a for a in load.attempts if a.finished >= killed_at and a.started <= recovered_at]
    measured("replica-kill", attempts=len(load.attempts), served=load.served, failed_attempts=len(failures),
             failed_in_band=sum(a.in_band for a in failures), attempts_in_window=len(window), lost=len(load.lost),
             recovery_s=round(recovered_at - killed_at, 1),
             failure_window_s=round(max((a.finished for a in failures), default=killed_at) - killed_at, 1),
             workers=LOAD_WORKERS)
    for task_id in (*uploaded, *late):
        admin.delete(f"/admin/adapters/{task_id}").raise_for_status()
