"""What the HTTP load benches share: the inputs they send, a streamed request's time to first
token, closed-loop clients over a sequence of tasks, a percentile."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

INPUTS = ("The weather today is", "Tell me about the river", "My order has not arrived yet",
          "A short note on prices", "The team won the match", "Please summarise this line")


def one_request(client: httpx.Client, url: str, task_id: str, text: str, max_new_tokens: int) -> float:
    """Client-side time to first token (s): the first SSE event of a streamed /generate."""
    started = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/generate", json={"task_id": task_id, "input": text, "stream": True,
                                                        "max_new_tokens": max_new_tokens}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{task_id}: HTTP {response.status_code} {response.read()[:200]!r}")
        for line in response.iter_lines():
            if line.startswith("data:"):
                if first is None:
                    first = time.perf_counter() - started
                if '"error"' in line:
                    raise RuntimeError(f"{task_id}: {line[:200]}")
    return first


REQUEST_TIMEOUT_S = 120.0


def run_phase(url: str, sequence: list[str], args) -> list[float]:
    """The sequence's requests from `--concurrency` closed-loop clients; TTFTs in sequence order
    (each request given `args.request_timeout` seconds where the bench has that option)."""
    ttfts = [0.0] * len(sequence)
    cursor = iter(range(len(sequence)))
    lock = threading.Lock()

    def client_loop():
        with httpx.Client(timeout=getattr(args, "request_timeout", REQUEST_TIMEOUT_S)) as client:
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                ttfts[i] = one_request(client, url, sequence[i], INPUTS[i % len(INPUTS)], args.max_new_tokens)

    with ThreadPoolExecutor(args.concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(args.concurrency)]:
            future.result()
    return ttfts


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank `q` quantile (None of nothing)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
