"""A noisy neighbour against light tasks, with fair scheduling off (first come, first served) and on.

    python -m loadtest.fairness --json docs/bench/fairness.json

Two real servers run side by side (one model replica each, the embedded backbone, the same four
tasks: soft prompts of real token embeddings), one with `--fair-scheduling off`, one with
`--fair-scheduling on`; only one is loaded at a time, and each round measures both, alternating
which goes first. Per server and round, three phases:
- light alone: three light tasks, each a sequential client of `--light-requests` short requests;
- heavy alone: `--heavy-clients` closed-loop clients (at least 10x the batch) flooding one task
  with long answers for `--heavy-seconds`; a refused client waits the Retry-After it was given;
- mixed: the flood, then (after `--ramp-seconds`, once the queue is full) the three light clients.
Measured: the light requests' latency (p50 / p95, all answered or not: every status is counted),
the heavy task's generated tokens per second (requests finished inside the window), and the
statuses each side got (200, 429, 503, other). Bounded: the number of light requests, the
heavy phase's seconds and a per-phase deadline.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .common import INPUTS, percentile

VARIANTS = ("off", "on")
HEAVY = "heavy"
LIGHT = ("light1", "light2", "light3")
START_TIMEOUT_S = 900.0
PHASE_DEADLINE_S = 240.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of (off, on) measurements, interleaved")
    p.add_argument("--heavy-clients", type=int, default=40, help="flooding clients (>= 10x --max-batch-size)")
    p.add_argument("--heavy-new-tokens", type=int, default=32)
    p.add_argument("--heavy-seconds", type=float, default=15.0, help="length of the heavy-alone phase")
    p.add_argument("--ramp-seconds", type=float, default=4.0, help="flood before the light clients start")
    p.add_argument("--light-requests", type=int, default=6, help="requests per light task per phase")
    p.add_argument("--light-new-tokens", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=16, help="soft-prompt length of every task")
    p.add_argument("--serve-args", default="--threads 1 --max-batch-size 4 --max-queue 16 --max-new-tokens 64",
                   help="extra `lamp serve` options for both servers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.rounds < 1 or args.heavy_clients < 1 or args.light_requests < 1 or args.heavy_seconds <= 0:
        p.error("need --rounds, --heavy-clients, --light-requests >= 1 and --heavy-seconds > 0")
    return args


def write_tasks(folder: Path, tokens: int, seed: int) -> None:
    from .affinity import write_tasks as write_soft_prompts

    write_soft_prompts(folder, 1 + len(LIGHT), tokens, seed)
    from .affinity import task_name

    for i, name in enumerate((HEAVY, *LIGHT)):
        (folder / f"{task_name(i)}.safetensors").rename(folder / f"{name}.safetensors")


def generate(client: httpx.Client, url: str, task_id: str, text: str, max_new_tokens: int):
    """(status, seconds, completion tokens, Retry-After seconds or None) of one POST /generate."""
    started = time.perf_counter()
    try:
        response = client.post(f"{url}/generate", json={"task_id": task_id, "input": text,
                                                        "max_new_tokens": max_new_tokens})
    except httpx.HTTPError as exc:
        return f"error:{type(exc).__name__}", time.perf_counter() - started, 0, None
    seconds = time.perf_counter() - started
    tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
    retry = response.headers.get("retry-after")
    return str(response.status_code), seconds, tokens, float(retry) if retry else None


class Flood:
    """`clients` closed-loop clients of the heavy task until stopped; finished requests timestamped."""

    def __init__(self, url: str, args):
        self.url, self.args = url, args
        self.stop = threading.Event()
        self.finished: list[tuple[float, int]] = []  # (end time, completion tokens)
        self.statuses: Counter = Counter()
        self.retry_after_missing = 0
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(args.heavy_clients)
        self.futures = [self.pool.submit(self._client, i) for i in range(args.heavy_clients)]

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = index
            while not self.stop.is_set():
                status, _, tokens, retry = generate(client, self.url, HEAVY, INPUTS[n % len(INPUTS)],
                                                    self.args.heavy_new_tokens)
                n += 1
                with self.lock:
                    self.statuses[status] += 1
                    if status == "200":
                        self.finished.append((time.perf_counter(), tokens))
                    elif status in ("429", "503") and retry is None:
                        self.retry_after_missing += 1
                if status != "200":
                    self.stop.wait(retry if retry is not None else 1.0)

    def tokens_per_s(self, start: float, end: float) -> float:
        with self.lock:
            return sum(t for at, t in self.finished if start <= at <= end) / max(end - start, 1e-9)

    def close(self) -> None:
        self.stop.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()


def light_clients(url: str, args) -> tuple[list[float], Counter, int]:
    """The three light tasks, each a sequential client; latencies of the answered requests, and
    every request's status (the light clients do not retry: a refusal counts as unanswered)."""
    latencies, statuses, missing = [], Counter(), 0
    lock = threading.Lock()

    def client(task_id: str) -> None:
        nonlocal missing
        with httpx.Client(timeout=PHASE_DEADLINE_S) as http:
            for i in range(args.light_requests):
                status, seconds, _, retry = generate(http, url, task_id, INPUTS[i % len(INPUTS)],
                                                     args.light_new_tokens)
                with lock:
                    if status == "200":  # a refusal is fast and says nothing of the service
                        latencies.append(seconds)
                    statuses[status] += 1
                    missing += status in ("429", "503") and retry is None

    with ThreadPoolExecutor(len(LIGHT)) as pool:
        for future in [pool.submit(client, task) for task in LIGHT]:
            future.result()
    return latencies, statuses, missing


def measure(url: str, args) -> dict:
    """One round on one server: light alone, heavy alone, mixed."""
    light_alone, light_alone_statuses, missing_alone = light_clients(url, args)
    flood = Flood(url, args)
    start = time.perf_counter()
    time.sleep(args.ramp_seconds)
    window = time.perf_counter()
    time.sleep(args.heavy_seconds)
    heavy_alone = flood.tokens_per_s(window, time.perf_counter())
    flood.close()
    heavy_alone_statuses = dict(flood.statuses)
    time.sleep(1.0)
    flood = Flood(url, args)
    time.sleep(args.ramp_seconds)
    window = time.perf_counter()
    light_mixed, light_mixed_statuses, missing_mixed = light_clients(url, args)
    # the heavy task's window: the light clients' time, at least as long as the heavy-alone one
    time.sleep(max(0.0, window + args.heavy_seconds - time.perf_counter()))
    heavy_mixed = flood.tokens_per_s(window, time.perf_counter())
    flood.close()
    return {
        "light_alone": {"latency_ms": _quantiles(light_alone), "statuses": dict(light_alone_statuses)},
        "light_mixed": {"latency_ms": _quantiles(light_mixed), "statuses": dict(light_mixed_statuses)},
        "heavy_alone": {"tokens_per_s": heavy_alone, "statuses": heavy_alone_statuses},
        "heavy_mixed": {"tokens_per_s": heavy_mixed, "statuses": dict(flood.statuses),
                        "seconds": time.perf_counter() - window},
        "refusals_without_retry_after": flood.retry_after_missing + missing_alone + missing_mixed,
        "seconds": time.perf_counter() - start,
    }


def _quantiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50": None, "p95": None, "count": 0}
    return {"p50": 1000 * statistics.median(latencies), "p95": 1000 * percentile(latencies, 0.95),
            "count": len(latencies)}


def summarize(rounds: list[dict]) -> dict:
    """Pooled over rounds: light p50/p95 alone and mixed, heavy tokens/s alone and mixed, ratios."""

    def pooled(key: str, q: str) -> float | None:
        values = [r[key]["latency_ms"][q] for r in rounds if r[key]["latency_ms"][q] is not None]
        return statistics.median(values) if values else None

    def statuses(key: str) -> dict:
        total = Counter()
        for r in rounds:
            total.update(r[key]["statuses"])
        return dict(total)

    light = {q: {"alone_ms": pooled("light_alone", q), "mixed_ms": pooled("light_mixed", q)} for q in ("p50", "p95")}
    for q in light.values():
        q["mixed_over_alone"] = q["mixed_ms"] / q["alone_ms"] if q["mixed_ms"] and q["alone_ms"] else None
    heavy_alone = statistics.median(r["heavy_alone"]["tokens_per_s"] for r in rounds)
    heavy_mixed = statistics.median(r["heavy_mixed"]["tokens_per_s"] for r in rounds)
    mixed = statuses("light_mixed")
    return {"light": light, "light_mixed_statuses": mixed,
            "light_mixed_answered": mixed.get("200", 0) / max(1, sum(mixed.values())),
            "heavy_tokens_per_s": {"alone": heavy_alone, "mixed": heavy_mixed,
                                   "mixed_over_alone": heavy_mixed / heavy_alone if heavy_alone else None},
            "heavy_statuses": {"alone": statuses("heavy_alone"), "mixed": statuses("heavy_mixed")},
            "refusals_without_retry_after": sum(r["refusals_without_retry_after"] for r in rounds)}


def print_table(summary: dict) -> None:
    from lamp_runtime.bench.report import format_table

    rows = [{"fair": v, "p50a": s["light"]["p50"]["alone_ms"], "p95a": s["light"]["p95"]["alone_ms"],
             "p50m": s["light"]["p50"]["mixed_ms"], "p95m": s["light"]["p95"]["mixed_ms"],
             "x95": s["light"]["p95"]["mixed_over_alone"], "answered": s["light_mixed_answered"],
             "ha": s["heavy_tokens_per_s"]["alone"], "hm": s["heavy_tokens_per_s"]["mixed"],
             "keep": s["heavy_tokens_per_s"]["mixed_over_alone"]} for v, s in summary.items()]
    print(format_table(rows, [("fair", "fair", "s"), ("p50a", "light p50 alone ms", ".0f"),
                              ("p95a", "p95 alone", ".0f"), ("p50m", "p50 flood", ".0f"), ("p95m", "p95 flood", ".0f"),
                              ("x95", "p95 x", ".2f"), ("answered", "light answered", ".3f"),
                              ("ha", "heavy tok/s alone", ".1f"), ("hm", "with light", ".1f"),
                              ("keep", "kept", ".3f")]))


def main(argv=None) -> int:
    from lamp_runtime.bench.report import full_command, write_json
    from lamp_runtime.bench.workload import machine_context
    from tests.server_process import ServerProcess, stop_all

    args = parse_args(argv)
    context = machine_context()
    with tempfile.TemporaryDirectory(prefix="lamp-fairness-") as tmp:
        tmp = Path(tmp)
        (tmp / "prompts").mkdir()
        write_tasks(tmp / "prompts", args.prompt_tokens, args.seed)
        serve_args = shlex.split(args.serve_args)
        servers = {v: ServerProcess(store=tmp / f"store-{v}", prompts=tmp / "prompts",
                                    extra_args=[*serve_args, "--fair-scheduling", v], log_path=tmp / f"{v}.log")
                   for v in VARIANTS}
        rounds = {v: [] for v in VARIANTS}
        try:
            for variant, server in servers.items():
                print(f"starting the server with fair scheduling {variant}", flush=True)
                server.start(timeout=START_TIMEOUT_S)
            order = list(VARIANTS)
            random.Random(args.seed).shuffle(order)
            for r in range(args.rounds):
                for variant in (order if r % 2 == 0 else order[::-1]):
                    result = measure(servers[variant].url, args)
                    rounds[variant].append(result)
                    print(f"round {r + 1}/{args.rounds} fair {variant}: light p95 alone "
                          f"{result['light_alone']['latency_ms']['p95']} ms, flooded "
                          f"{result['light_mixed']['latency_ms']['p95']} ms "
                          f"{result['light_mixed']['statuses']}; heavy {result['heavy_alone']['tokens_per_s']:.1f} "
                          f"-> {result['heavy_mixed']['tokens_per_s']:.1f} tok/s {result['heavy_mixed']['statuses']} "
                          f"({result['seconds']:.0f} s)", flush=True)
        finally:
            stop_all(servers.values())
    summary = {v: summarize(rounds[v]) for v in VARIANTS}
    print_table(summary)
    if args.json:
        command = full_command("python -m loadtest.fairness", build_parser(), args)
        write_json(args.json, {"bench": "fairness", "command": command, "out": args.json, "context": context,
                               "load_average_at_end": machine_context()["load_average"],
                               "settings": {k: v for k, v in vars(args).items() if k != "json"},
                               "summary": summary, "rounds": rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
