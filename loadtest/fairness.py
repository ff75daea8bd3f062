"""A noisy neighbour against light tasks: first come, first served vs fair admission vs fair rows.

    python -m loadtest.fairness --json docs/bench/fairness.json

Real servers run side by side (one model replica each, the embedded backbone, the same four
tasks: soft prompts of real token embeddings), one per variant (`--variants`): `off` (first come,
first served), `on` (fair admission order and queue shares, `--fair-preemption off`: a light
request still waits for a free row) and `preempt` (also fair rows: a light request enters at the
next step, pausing a row of the flood). Only one is loaded at a time, and each round measures
every variant, alternating the order. Per server and round, three phases:
- light alone: three light tasks, each a sequential client of `--light-requests` short requests;
- heavy alone: `--heavy-clients` closed-loop clients (at least 10x the batch) flooding one task
  with long answers for `--heavy-seconds`; a refused client waits the Retry-After it was given;
- mixed: the flood, then (after `--ramp-seconds`, once the queue is full) the three light clients.
Measured: the light requests' latency (p50 / p95, all answered or not: every status is counted)
and where it went (the medians of the engine's queue / prefill / decode times each answer reports),
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

# variant -> its `lamp serve` options
VARIANTS = {
    "off": ["--fair-scheduling", "off", "--fair-preemption", "off"],
    "on": ["--fair-scheduling", "on", "--fair-preemption", "off"],
    "preempt": ["--fair-scheduling", "on", "--fair-preemption", "on"],
}
HEAVY = "heavy"
LIGHT = ("light1", "light2", "light3")
START_TIMEOUT_S = 900.0
PHASE_DEADLINE_S = 240.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of measurements of every variant, interleaved")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default all)")
    p.add_argument("--heavy-clients", type=int, default=40, help="flooding clients (>= 10x --max-batch-size)")
    p.add_argument("--heavy-new-tokens", type=int, default=32)
    p.add_argument("--heavy-seconds", type=float, default=15.0, help="length of the heavy-alone phase")
    p.add_argument("--ramp-seconds", type=float, default=4.0, help="flood before the light clients start")
    p.add_argument("--light-requests", type=int, default=6, help="requests per light task per phase")
    p.add_argument("--light-new-tokens", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=16, help="soft-prompt length of every task")
    p.add_argument("--serve-args", default="--threads 1 --max-batch-size 4 --max-queue 16 --max-new-tokens 64",
                   help="extra `lamp serve` options for every server")
    p.add_argument("--step-batches", default="1,2,4,8,16",
                   help="before the servers start: the engine's decode step time at these batch sizes, in "
                        "this process, on the backbone `lamp serve` loads ('' = skip)")
    p.add_argument("--step-threads", type=int, default=1, help="torch threads of that measurement (as --threads)")
    p.add_argument("--steps-only", action="store_true", help="measure the step times alone (no servers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.rounds < 1 or args.heavy_clients < 1 or args.light_requests < 1 or args.heavy_seconds <= 0:
        p.error("need --rounds, --heavy-clients, --light-requests >= 1 and --heavy-seconds > 0")
    variants = [v for v in args.variants.split(",") if v]
    if not variants or any(v not in VARIANTS for v in variants) or len(set(variants)) != len(variants):
        p.error(f"--variants: distinct names of {', '.join(VARIANTS)}")
    args.variant_list = variants
    try:
        args.step_batch_list = [int(b) for b in args.step_batches.split(",") if b.strip()]
    except ValueError:
        p.error("--step-batches: comma-separated integers")
    if any(b < 1 for b in args.step_batch_list) or args.step_threads < 1:
        p.error("--step-batches and --step-threads must be >= 1")
    if args.steps_only and not args.step_batch_list:
        p.error("--steps-only needs --step-batches")
    return args


def write_tasks(folder: Path, tokens: int, seed: int) -> None:
    from .affinity import write_tasks as write_soft_prompts

    write_soft_prompts(folder, 1 + len(LIGHT), tokens, seed)
    from .affinity import task_name

    for i, name in enumerate((HEAVY, *LIGHT)):
        (folder / f"{task_name(i)}.safetensors").rename(folder / f"{name}.safetensors")


def generate(client: httpx.Client, url: str, task_id: str, text: str, max_new_tokens: int):
    """(status, seconds, completion tokens, Retry-After seconds or None, the engine's timings_ms
    or None) of one POST /generate."""
    started = time.perf_counter()
    try:
        response = client.post(f"{url}/generate", json={"task_id": task_id, "input": text,
                                                        "max_new_tokens": max_new_tokens})
    except httpx.HTTPError as exc:
        return f"error:{type(exc).__name__}", time.perf_counter() - started, 0, None, None
    seconds = time.perf_counter() - started
    body = response.json() if response.status_code == 200 else None
    tokens = body["usage"]["completion_tokens"] if body else 0
    retry = response.headers.get("retry-after")
    return str(response.status_code), seconds, tokens, float(retry) if retry else None, \
        body.get("timings_ms") if body else None


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
                status, _, tokens, retry, _ = generate(client, self.url, HEAVY, INPUTS[n % len(INPUTS)],
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


def light_clients(url: str, args) -> tuple[list[float], Counter, int, dict]:
    """The three light tasks, each a sequential client; latencies of the answered requests, every
    request's status (the light clients do not retry: a refusal counts as unanswered), and the
    medians of the answered requests' engine timings (queue, prefill, decode, total ms)."""
    latencies, statuses, missing, timings = [], Counter(), 0, []
    lock = threading.Lock()

    def client(task_id: str) -> None:
        nonlocal missing
        with httpx.Client(timeout=PHASE_DEADLINE_S) as http:
            for i in range(args.light_requests):
                status, seconds, _, retry, timing = generate(http, url, task_id, INPUTS[i % len(INPUTS)],
                                                             args.light_new_tokens)
                with lock:
                    if status == "200":  # a refusal is fast and says nothing of the service
                        latencies.append(seconds)
                        timings.append(timing or {})
                    statuses[status] += 1
                    missing += status in ("429", "503") and retry is None

    with ThreadPoolExecutor(len(LIGHT)) as pool:
        for future in [pool.submit(client, task) for task in LIGHT]:
            future.result()
    parts = {part: statistics.median(t[part] for t in timings) if timings and all(part in t for t in timings)
             else None for part in ("queue", "prefill", "decode", "total")}
    return latencies, statuses, missing, parts


def measure(url: str, args) -> dict:
    """One round on one server: light alone, heavy alone, mixed."""
    light_alone, light_alone_statuses, missing_alone, alone_parts = light_clients(url, args)
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
    light_mixed, light_mixed_statuses, missing_mixed, mixed_parts = light_clients(url, args)
    # the heavy task's window: the light clients' time, at least as long as the heavy-alone one
    time.sleep(max(0.0, window + args.heavy_seconds - time.perf_counter()))
    heavy_mixed = flood.tokens_per_s(window, time.perf_counter())
    flood.close()
    return {
        "light_alone": {"latency_ms": _quantiles(light_alone), "statuses": dict(light_alone_statuses),
                        "engine_ms_p50": alone_parts},
        "light_mixed": {"latency_ms": _quantiles(light_mixed), "statuses": dict(light_mixed_statuses),
                        "engine_ms_p50": mixed_parts},
        "heavy_alone": {"tokens_per_s": heavy_alone, "statuses": heavy_alone_statuses},
        "heavy_mixed": {"tokens_per_s": heavy_mixed, "statuses": dict(flood.statuses),
                        "seconds": time.perf_counter() - window},
        "refusals_without_retry_after": flood.retry_after_missing + missing_alone + missing_mixed,
        "seconds": time.perf_counter() - start,
    }


def step_times(batches: list[int], threads: int, steps: int = 10, repeats: int = 3) -> dict:
    """Median decode step time (ms) of the engine `lamp serve` builds (the default backbone, its
    core), at each batch size: every row a request generating without EOS; the step that admits
    them is not timed. Why a flooded batch slows every row, light ones included."""
    import torch

    from lamp_runtime.backbone.hf import load_backbone
    from lamp_runtime.backbone.options import BackboneOptions
    from lamp_runtime.engine.base import EngineConfig
    from lamp_runtime.hf.engine import engine_for
    from lamp_runtime.requests import GenerationRequest, SamplingParams

    torch.set_num_threads(1)
    backbone = load_backbone(BackboneOptions())
    core = engine_for(backbone, config=EngineConfig(max_batch_size=max(batches), threads=threads))
    core.on_loop_start()
    params = SamplingParams(max_new_tokens=steps + 4, ignore_eos=True)
    seconds: dict[int, list[float]] = {batch: [] for batch in batches}
    for _ in range(repeats):  # the batch sizes interleaved: the machine's load drifts
        for batch in batches:
            for i in range(batch):
                core.submit(GenerationRequest(INPUTS[i % len(INPUTS)], None, params))
            core.step()
            for _ in range(steps):
                core.step()
                seconds[batch].append(core.last_step.seconds)
            while core.has_work():
                core.step()
    result = {str(batch): 1000 * statistics.median(s) for batch, s in seconds.items()}
    torch.set_num_threads(1)
    return {"threads": threads, "backbone": repr(backbone.options), "step_ms_p50": result,
            "over_first_batch": {b: ms / result[str(batches[0])] for b, ms in result.items()}}


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

    def parts(key: str) -> dict:
        return {part: statistics.median(values) if (values := [r[key]["engine_ms_p50"][part] for r in rounds
                                                               if r[key]["engine_ms_p50"][part] is not None])
                else None for part in ("queue", "prefill", "decode", "total")}

    return {"light": light, "light_engine_ms_p50": {"alone": parts("light_alone"), "mixed": parts("light_mixed")},
            "light_mixed_statuses": mixed,
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
             "keep": s["heavy_tokens_per_s"]["mixed_over_alone"],
             "qm": s["light_engine_ms_p50"]["mixed"]["queue"], "dm": s["light_engine_ms_p50"]["mixed"]["decode"],
             "da": s["light_engine_ms_p50"]["alone"]["decode"]} for v, s in summary.items()]
    print(format_table(rows, [("fair", "fair", "s"), ("p50a", "light p50 alone ms", ".0f"),
                              ("p95a", "p95 alone", ".0f"), ("p50m", "p50 flood", ".0f"), ("p95m", "p95 flood", ".0f"),
                              ("x95", "p95 x", ".2f"), ("answered", "light answered", ".3f"),
                              ("ha", "heavy tok/s alone", ".1f"), ("hm", "with light", ".1f"),
                              ("keep", "kept", ".3f"), ("qm", "light queue ms flood", ".0f"),
                              ("da", "decode ms alone", ".0f"), ("dm", "decode ms flood", ".0f")]))


def main(argv=None) -> int:
    from lamp_runtime.bench.report import full_command, write_json
    from lamp_runtime.bench.workload import machine_context
    from tests.server_process import ServerProcess, stop_all

    args = parse_args(argv)
    context = machine_context()
    steps = None
    if args.step_batch_list:
        steps = step_times(args.step_batch_list, args.step_threads)
        print(f"decode step ms by batch size ({args.step_threads} thread(s)): {steps['step_ms_p50']}", flush=True)
    if args.steps_only:
        if args.json:
            command = full_command("python -m loadtest.fairness", build_parser(), args)
            write_json(args.json, {"bench": "fairness_steps", "command": command, "out": args.json,
                                   "context": context, "load_average_at_end": machine_context()["load_average"],
                                   "step_time_vs_batch": steps})
        return 0
    with tempfile.TemporaryDirectory(prefix="lamp-fairness-") as tmp:
        tmp = Path(tmp)
        (tmp / "prompts").mkdir()
        write_tasks(tmp / "prompts", args.prompt_tokens, args.seed)
        serve_args = shlex.split(args.serve_args)
        servers = {v: ServerProcess(store=tmp / f"store-{v}", prompts=tmp / "prompts",
                                    extra_args=[*serve_args, *VARIANTS[v]], log_path=tmp / f"{v}.log")
                   for v in args.variant_list}
        rounds = {v: [] for v in args.variant_list}
        try:
            for variant, server in servers.items():
                print(f"starting the {variant} server", flush=True)
                server.start(timeout=START_TIMEOUT_S)
            order = list(args.variant_list)
            random.Random(args.seed).shuffle(order)
            for r in range(args.rounds):
                for variant in (order if r % 2 == 0 else order[::-1]):
                    result = measure(servers[variant].url, args)
                    rounds[variant].append(result)
                    print(f"round {r + 1}/{args.rounds} {variant}: light p95 alone "
                          f"{result['light_alone']['latency_ms']['p95']} ms, flooded "
                          f"{result['light_mixed']['latency_ms']['p95']} ms "
                          f"{result['light_mixed']['statuses']}; heavy {result['heavy_alone']['tokens_per_s']:.1f} "
                          f"-> {result['heavy_mixed']['tokens_per_s']:.1f} tok/s {result['heavy_mixed']['statuses']} "
                          f"({result['seconds']:.0f} s)", flush=True)
        finally:
            stop_all(servers.values())
    summary = {v: summarize(rounds[v]) for v in args.variant_list}
    print_table(summary)
    if args.json:
        command = full_command("python -m loadtest.fairness", build_parser(), args)
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "variant_list", "step_batch_list")}
        write_json(args.json, {"bench": "fairness", "command": command, "out": args.json, "context": context,
                               "load_average_at_end": machine_context()["load_average"], "settings": settings,
                               "variants": {v: VARIANTS[v] for v in args.variant_list},
                               "step_time_vs_batch": steps, "summary": summary, "rounds": rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
