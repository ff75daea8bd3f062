"""Helpers of the reliability tests: adapter bytes, reference outputs, and an async load client
that records every attempt (status, version, text, replica, start and end time)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save

from lamp_runtime.adapters import PromptAdapter, SoftPromptAdapter
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams

TEXT = "The weather today is"
NEW_TOKENS = 3
REQUEST_TIMEOUT_S = 90.0  # far above any generation here: hitting it means a hung request
ENDPOINTS = ("generate", "stream", "completions")


def adapter_bytes(adapter: PromptAdapter) -> bytes:
    fmt = "soft_prompt" if isinstance(adapter, SoftPromptAdapter) else adapter.kind
    return save({k: t.contiguous() for k, t in adapter.tensors().items()}, metadata=adapter.meta.to_metadata(fmt))


def reference_texts(backbone, adapters: dict, text: str = TEXT, new_tokens: int = NEW_TOKENS) -> dict:
    """Greedy text of each adapter run alone through the engine: what the server must answer."""
    engine = DecoderEngine(backbone, config=EngineConfig(max_batch_size=1))
    params = SamplingParams(max_new_tokens=new_tokens)
    texts = {}
    for key, adapter in adapters.items():
        engine.registry.register("ref", adapter)
        texts[key] = engine.generate([GenerationRequest(text, "ref", params)])[0].text
    return texts


def upload(client: httpx.Client, task_id: str, data: bytes, **kwargs) -> httpx.Response:
    return client.put(f"/admin/adapters/{task_id}", files={"adapter": ("adapter.safetensors", data)}, **kwargs)


def registered_per_replica(client: httpx.Client) -> dict[str, float]:
    """`lamp_registered_adapters` of every model replica, by replica id (from /metrics)."""
    text = client.get("/metrics").text
    return {s.labels["replica"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "lamp_registered_adapters"}


def wait_for_replicas(client: httpx.Client, replicas: int, timeout: float = 120.0) -> dict[str, float]:
    """`registered_per_replica` once every replica reports (`/healthz` is 200 as soon as one is up)."""
    deadline = time.monotonic() + timeout
    while len(found := registered_per_replica(client)) < replicas:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(found)} of {replicas} replicas reported metrics within {timeout:.0f} s")
        time.sleep(0.5)
    return found


@dataclass
class Attempt:
    worker: int
    task_id: str
    endpoint: str
    started: float
    finished: float
    status: int | None  # None: no HTTP answer at all (connection error or timeout)
    version: int | None = None
    text: str | None = None
    replica: str | None = None
    retry_after: str | None = None
    error: str | None = None
    in_band: bool = False  # the error came inside a 200 event stream


async def attempt(client: httpx.AsyncClient, worker: int, task_id: str, endpoint: str,
                  text: str = TEXT, new_tokens: int = NEW_TOKENS) -> Attempt:
    started = time.monotonic()
    record = Attempt(worker, task_id, endpoint, started, started, None)
    try:
        if endpoint == "completions":
            r = await client.post("/v1/completions", json={"model": task_id, "prompt": text,
                                                           "max_tokens": new_tokens, "temperature": 0})
            _fill(record, r, lambda body: (None, body["choices"][0]["text"]))
        elif endpoint == "generate":
            r = await client.post("/generate", json={"task_id": task_id, "input": text,
                                                     "max_new_tokens": new_tokens})
            _fill(record, r, lambda body: (body["adapter_version"], body["text"]))
        else:
            await _stream(client, record, task_id, text, new_tokens)
    except httpx.HTTPError as exc:
        record.error = repr(exc)
    record.finished = time.monotonic()
    return record


async def bursts_until(url: str, task_id: str, enough, size: int, max_bursts: int = 10) -> list[Attempt]:
    """Bursts of `size` concurrent /generate calls of `task_id` until `enough(answers)` holds or
    `max_bursts` ran (a burst spills from the task's preferred replica: see GENERATION_BURST).

    Returns every answer except the ingress's overload refusals (503 with Retry-After, answered by
    no replica), which a burst larger than one replica's batch + queue may draw by design, and a
    replica's 429 (one task's burst beyond its share of a full queue, fair scheduling).
    """
    answers: list[Attempt] = []
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(max_bursts):
            burst = await asyncio.gather(*(attempt(client, -1, task_id, "generate") for _ in range(size)))
            answers += [a for a in burst if not ((a.status == 503 and a.replica is None or a.status == 429)
                                                 and a.retry_after)]
            if enough(answers):
                break
    return answers


def _fill(record: Attempt, r: httpx.Response, parse) -> None:
    record.status = r.status_code
    record.replica = r.headers.get("x-lamp-replica")
    record.retry_after = r.headers.get("retry-after")
    body = r.json()
    if r.status_code == 200:
        record.version, record.text = parse(body)
    else:
        record.error = body["error"]["message"]


async def _stream(client: httpx.AsyncClient, record: Attempt, task_id: str, text: str, new_tokens: int) -> None:
    payload = {"task_id": task_id, "input": text, "max_new_tokens": new_tokens, "stream": True}
    async with client.stream("POST", "/generate", json=payload) as r:
        record.status = r.status_code
        record.retry_after = r.headers.get("retry-after")
        if r.status_code != 200:
            record.error = json.loads(await r.aread())["error"]["message"]
            return
        deltas = []
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:  # a replica lost mid-stream
                record.status, record.error, record.in_band = event["error"]["code"], event["error"]["message"], True
                return
            deltas.append(event["delta"])
            if event.get("finish_reason") is not None:
                record.version = event["adapter_version"]
        record.text = "".join(deltas)


class Load:
    """Closed-loop clients, each sending one request at a time over the tasks `tasks()` names now;
    a refused attempt (503, or 429: its task beyond its share of a full queue) is retried after its
    Retry-After, so each logical request either ends
    served or counts as lost."""

    def __init__(self, url: str, tasks, workers: int, endpoints=ENDPOINTS, max_attempts: int = 20):
        self.url = url
        self.tasks = tasks
        self.workers = workers
        self.endpoints = endpoints
        self.max_attempts = max_attempts
        self.attempts: list[Attempt] = []
        self.lost: list[list[Attempt]] = []
        self.served = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.workers + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.workers)))

    async def _worker(self, client: httpx.AsyncClient, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            tasks = self.tasks()
            task_id = tasks[(worker + n) % len(tasks)]
            endpoint = self.endpoints[(worker + n // len(tasks)) % len(self.endpoints)]
            n += 1
            tries = []
            for _ in range(self.max_attempts):
                result = await attempt(client, worker, task_id, endpoint)
                tries.append(result)
                self.attempts.append(result)
                if result.status not in (429, 503):
                    break
                await asyncio.sleep(float(result.retry_after or 1))
            if tries[-1].status == 200:
                self.served += 1
            else:
                self.lost.append(tries)
