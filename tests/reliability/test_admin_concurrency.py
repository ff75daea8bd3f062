"""Parallel re-registrations and deletions of the same and of different tasks while traffic runs.

Every admin call and every generation is recorded with its start and end time; the checks are
consequences of the store being linearizable: versions only go up (also across deletes), a request
sees at least the version whose PUT had returned before it started, a sequential client never sees
a version go back, every answer is exactly the answer of the adapter registered under the version
it reports (never a half-updated one), and afterwards the store, both replicas and /v1/models agree.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx
import pytest

from ..conftest import lamp_from_prompt, vocab_prompt
from ..store_state import registry_state
from .conftest import GENERATION_BURST, NOT_FOUND_BURST, REPLICAS, measured
from .traffic import Load, adapter_bytes, bursts_until, reference_texts, registered_per_replica

pytestmark = pytest.mark.slow

TASKS = ("churn-a", "churn-b", "churn-c")
OPS_PER_WORKER = 6
ADMIN_PAUSE_S = 0.5  # between one worker's calls, so the churn spans many generations
TRAFFIC_WORKERS = 3
AGREE_TIMEOUT_S = 30.0


@dataclass
class AdminOp:
    task_id: str
    kind: str  # "put" or "delete"
    content: int | None
    started: float
    finished: float = 0.0
    status: int = 0
    version: int | None = None  # issued (put) or deleted (delete)


def plan(seed: int, tasks: tuple[str, ...], contents: int, last: str) -> list[tuple[str, str, int | None]]:
    """A seeded mix of puts (70 %) and deletes over `tasks`, ending with `last` on the last task."""
    rng = random.Random(seed)
    ops = []
    for i in range(OPS_PER_WORKER - 1):
        task = tasks[i % len(tasks)]
        ops.append((task, "put", rng.randrange(contents)) if rng.random() < 0.7 else (task, "delete", None))
    ops.append((tasks[-1], last, 0 if last == "put" else None))
    return ops


async def run_admin(client: httpx.AsyncClient, ops, files: list[bytes], log: list[AdminOp]) -> None:
    for task_id, kind, content in ops:
        op = AdminOp(task_id, kind, content, time.monotonic())
        if kind == "put":
            r = await client.put(f"/admin/adapters/{task_id}",
                                 files={"adapter": ("a.safetensors", files[content])})
            op.version = r.json().get("version") if r.status_code == 201 else None
        else:
            r = await client.delete(f"/admin/adapters/{task_id}")
            op.version = r.json().get("deleted_version") if r.status_code == 200 else None
        op.finished, op.status = time.monotonic(), r.status_code
        log.append(op)
        await asyncio.sleep(ADMIN_PAUSE_S)


async def churn(server, files: list[bytes]) -> tuple[list[AdminOp], Load]:
    plans = [plan(1, ("churn-a",), len(files), "put"), plan(2, ("churn-a",), len(files), "put"),
             plan(3, ("churn-c", "churn-b"), len(files), "put"), plan(4, ("churn-b", "churn-c"), len(files), "delete")]
    log: list[AdminOp] = []
    load = Load(server.url, lambda: TASKS, TRAFFIC_WORKERS, endpoints=("generate", "stream"))
    traffic = asyncio.create_task(load.run())
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=server.admin_headers()) as client:
            await asyncio.gather(*(run_admin(client, ops, files, log) for ops in plans))
        await asyncio.sleep(0.5)  # traffic that started after the last admin call returned
    finally:
        load.stop()
        await asyncio.wait_for(traffic, 120)
    return log, load


def every_replica_answered(answers) -> bool:
    return len({a.replica for a in answers}) >= REPLICAS


def test_parallel_admin_calls_under_traffic_stay_consistent(server, admin, client, backbone):
    adapters = [lamp_from_prompt(vocab_prompt(backbone, 8, seed=400 + i), rank=4, pool=1 + i % 2) for i in range(4)]
    references = reference_texts(backbone, dict(enumerate(adapters)))
    log, load = asyncio.run(churn(server, [adapter_bytes(a) for a in adapters]))

    puts = [op for op in log if op.kind == "put"]
    assert {op.status for op in puts} == {201}, [op for op in puts if op.status != 201]
    assert {op.status for op in log if op.kind == "delete"} <= {200, 404}
    content_of = {(op.task_id, op.version): op.content for op in puts}
    assert len(content_of) == len(puts), "a version number was issued twice"
    for task_id in TASKS:
        ops = [op for op in log if op.task_id == task_id]
        for p in ops:
            for q in ops:  # q began after p had returned: q works on a later state
                if p.kind == "put" and p.finished < q.started and q.version is not None:
                    assert q.version >= p.version + (1 if q.kind == "put" else 0), (p, q)
        for d in ops:
            if d.kind == "delete" and d.status == 200:
                assert (task_id, d.version) in content_of, d

    assert load.attempts  # 404s are expected here (deleted tasks); every status is checked below
    assert {a.status for a in load.attempts} <= {200, 404}, [a for a in load.attempts if a.status not in (200, 404)]
    for a in load.attempts:
        returned = [op for op in puts if op.task_id == a.task_id and op.finished < a.started]
        newest = max(returned, key=lambda op: op.version, default=None)
        if a.status == 200:  # exactly the adapter registered under the version it names
            assert a.text == references[content_of[(a.task_id, a.version)]], a
            assert newest is None or a.version >= newest.version, (a, newest)  # never older than a returned PUT
        elif newest is not None:  # 404 only if a delete may have happened after that PUT
            assert any(op.kind == "delete" and op.status == 200 and op.finished > newest.started
                       and op.started < a.finished for op in log if op.task_id == a.task_id), (a, newest)
    for worker in range(TRAFFIC_WORKERS):  # a sequential client never sees a version go back
        for task_id in TASKS:
            seen = [a.version for a in load.attempts if a.worker == worker and a.task_id == task_id and a.version]
            assert seen == sorted(seen), (worker, task_id, seen)

    # Afterwards the store, every replica and /v1/models agree.
    index = registry_state(server.store)
    current = {t: index["tasks"][t]["version"] for t in TASKS if t in index["tasks"]}
    assert "churn-a" in current  # only plans 1 and 2 touch it, and both end with a put
    for task_id in TASKS:
        burst = GENERATION_BURST if task_id in current else NOT_FOUND_BURST
        answers = asyncio.run(bursts_until(server.url, task_id, every_replica_answered, burst))
        assert len({a.replica for a in answers}) == REPLICAS
        if task_id in current:
            expected = references[content_of[(task_id, current[task_id])]]
            assert {(a.status, a.version, a.text) for a in answers} == {(200, current[task_id], expected)}
        else:
            assert {a.status for a in answers} == {404}
    models = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert models == set(index["tasks"])
    deadline = time.monotonic() + AGREE_TIMEOUT_S
    while set(registered_per_replica(client).values()) != {len(index["tasks"])} and time.monotonic() < deadline:
        time.sleep(0.5)  # metrics are pushed every 0.5 s
    per_replica = registered_per_replica(client)
    assert len(per_replica) == REPLICAS and set(per_replica.values()) == {len(index["tasks"])}, per_replica
    for task_id in TASKS:  # on disk: the current version and at most the one before, no temporary files
        folder = server.store / task_id
        if task_id in current:
            names = sorted(p.name for p in folder.iterdir())
            assert f"v{current[task_id]}.safetensors" in names and len(names) <= 2, names
            assert all(n.startswith("v") and n.endswith(".safetensors") for n in names), names
        else:
            assert not folder.exists()
    measured("admin-churn", admin_calls=len(log), puts=len(puts),
             deletes_200=sum(op.kind == "delete" and op.status == 200 for op in log),
             generations=len(load.attempts), generations_200=sum(a.status == 200 for a in load.attempts),
             generations_404=sum(a.status == 404 for a in load.attempts), wrong_answers=0)
    for task_id in current:
        admin.delete(f"/admin/adapters/{task_id}").raise_for_status()
