"""Many LAMP tasks over one prompt-KV budget: what pooling keeps hot.

    python -m loadtest.many_tasks --json docs/bench/many-tasks.json --plot docs/bench/many-tasks.png

One real `lamp serve` (one replica, the embedded backbone in float32) with a fixed
`--prompt-kv-cache-mb`, small enough that the unpooled (p = 1) prompts of the hot tasks do not
fit. For each pool block p in `--pools`, a set of LAMP tasks of the same factor shapes (l =
`--prompt-tokens`, rank `--rank`) and that p is registered through the batch admin route, up to
each task count in `--tasks`. Then, per task count and traffic (Zipf with exponent `--zipf`, and
uniform), `--rounds` rounds each run every p once (the order rotating per round, as the cores are
shared and noisy): `--warmup` requests not measured, then `--requests` measured ones, both from
`--concurrency` closed-loop clients sending streamed /generate requests; every p gets the same
sequence of task indices in a round. All p share the one cache, so a phase starts with the previous
phase's entries in it (evicted least recently used first): this counts against pooled prompts,
whose share of the cache fills more slowly.

Measured per (task count, traffic, p): the prompt-KV hit ratio from the server's counters
(differences of lamp_prompt_kv_cache_hits/misses over the measured requests: hits + misses =
requests), time to first token as the client sees it (first SSE event) p50 / p95, requests per
second, the server's resident memory and the prompt-KV gauges (bytes, tasks resident). Computed:
tasks a GB of prompt KV keeps hot at each p, KV bytes per position (measured by a first probe on
an empty cache) x ceil(l/p), next to the measured one (tasks resident per byte held, at the end of
the largest uniform run, where every entry is that p's; of the last `--traffic` when uniform is not run).
A 7B-shaped random backbone on the llama.cpp engine: `--hidden-size 4096 --serve-args "--backbone
X.gguf --engine llamacpp --allow-random-weights --llamacpp-row-cells 512 ..."` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .common import INPUTS, REQUEST_TIMEOUT_S, one_request, percentile, run_phase

TRAFFIC = ("zipf", "uniform")
GB = 1e9
BATCH = 500  # adapters per batch registration
EMBEDDED_HIDDEN = 576  # the embedded backbone's hidden size (SmolLM2-135M): the factors' default width
ADMIN_TOKEN = "many-tasks-bench"
START_TIMEOUT_S = 900.0
GAUGES = ("lamp_prompt_kv_cache_hits_total", "lamp_prompt_kv_cache_misses_total", "lamp_prompt_kv_cache_bytes",
          "lamp_prompt_kv_cache_tasks")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[100, 1000, 10000], help="task counts, increasing")
    p.add_argument("--pools", type=int, nargs="+", default=[1, 2, 4, 10], help="pool blocks p (one task set each)")
    p.add_argument("--prompt-tokens", type=int, default=100, help="l of every task")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=EMBEDDED_HIDDEN,
                   help="the served backbone's hidden size, the factors' width (4096 for a 7B; default: the "
                        "embedded backbone's)")
    p.add_argument("--traffic", nargs="+", choices=TRAFFIC, default=list(TRAFFIC), help="traffic shapes to run")
    p.add_argument("--prompt-kv-cache-mb", type=int, default=16, help="the server's prompt-KV budget")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the skewed traffic")
    p.add_argument("--rounds", type=int, default=2, help="rounds over every p, per task count and traffic")
    p.add_argument("--warmup", type=int, default=20, help="requests before each measured phase")
    p.add_argument("--requests", type=int, default=30, help="measured requests per phase")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=2)
    p.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT_S,
                   help="seconds a client waits for a request (a 7B miss on a loaded CPU takes minutes)")
    p.add_argument("--serve-args", default="--threads 2 --max-batch-size 8",
                   help="extra `lamp serve` options")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a PNG of hit ratio and TTFT p95 by p here")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if sorted(args.tasks) != args.tasks or args.tasks[0] < 1 or min(args.pools) < 1:
        p.error("--tasks must be increasing positive counts and --pools positive")
    if min(args.rounds, args.requests, args.concurrency, args.prompt_kv_cache_mb, args.prompt_tokens,
           args.hidden_size, args.request_timeout) < 1 \
            or args.warmup < 0:
        p.error("need --rounds, --requests, --concurrency, --prompt-kv-cache-mb, --prompt-tokens, --hidden-size, "
                "--request-timeout >= 1, --warmup >= 0")
    return args


def task_id(pool: int, index: int) -> str:
    return f"p{pool:02d}-t{index:05d}"


def adapter_files(args, pool: int, count: int = 8) -> list[bytes]:
    """A few distinct LAMP adapters (l x r factors, block p), cycled over the tasks."""
    import torch

    from lamp_runtime.adapters import AdapterMeta, LampAdapter, save_adapter

    files = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            g = torch.Generator().manual_seed(args.seed * 1000 + i)
            adapter = LampAdapter(AdapterMeta(pool=pool), torch.randn(args.prompt_tokens, args.rank, generator=g) * 0.1,
                                  torch.rand(args.rank, generator=g) + 0.5,
                                  torch.randn(args.rank, args.hidden_size, generator=g) * 0.01)
            files.append(save_adapter(adapter, Path(tmp) / f"{i}.safetensors").read_bytes())
    return files


def register(admin: httpx.Client, pool: int, start: int, stop: int, files: list[bytes]) -> None:
    for first in range(start, stop, BATCH):
        parts = [(f"adapter.{task_id(pool, i)}", ("a.safetensors", files[i % len(files)]))
                 for i in range(first, min(stop, first + BATCH))]
        body = admin.post("/admin/adapters", files=parts).raise_for_status().json()
        if body["failed"]:
            raise RuntimeError(f"registration failed for {body['failed']} adapters: {body['results'][:3]}")


def read_gauges(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values = dict.fromkeys(GAUGES, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name in values:
                values[s.name] += s.value
    return values


SETTLE_WINDOW_S = 0.7  # longer than a metrics push interval (replicas push every 0.5 s)
SETTLE_POLL_S = 0.15
SETTLE_TIMEOUT_S = 30.0


def settled_gauges(url: str) -> dict[str, float]:
    """The counters once every read over a metrics push interval and more agrees. Reads are
    frequent, so a push landing just after the first read restarts the window at once rather than
    one whole window later."""
    last, since = read_gauges(url), time.monotonic()
    deadline = since + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(SETTLE_POLL_S)
        now = read_gauges(url)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= SETTLE_WINDOW_S:
            return now
    raise RuntimeError("the prompt-KV counters did not settle")


def sequence(rng: random.Random, tasks: int, exponent: float, count: int) -> list[int]:
    """Task indices by Zipf popularity over a random permutation; exponent 0 is uniform."""
    order = list(range(tasks))
    rng.shuffle(order)
    return rng.choices(order, weights=[1.0 / (rank + 1) ** exponent for rank in range(tasks)], k=count)


def measure_phase(server, pool: int, indices: list[int], args) -> dict:
    names = [task_id(pool, i) for i in indices]
    run_phase(server.url, names[:args.warmup], args)
    before = settled_gauges(server.url)
    started = time.perf_counter()
    ttfts = run_phase(server.url, names[args.warmup:], args)
    seconds = time.perf_counter() - started
    after = settled_gauges(server.url)
    return {"hits": after["lamp_prompt_kv_cache_hits_total"] - before["lamp_prompt_kv_cache_hits_total"],
            "misses": after["lamp_prompt_kv_cache_misses_total"] - before["lamp_prompt_kv_cache_misses_total"],
            "ttfts": ttfts, "seconds": seconds, "prompt_kv_bytes": after["lamp_prompt_kv_cache_bytes"],
            "tasks_resident": after["lamp_prompt_kv_cache_tasks"], "rss_bytes": tree_rss(server)}


def tree_rss(server) -> int:
    from serving.bench.server import process_tree_rss

    return process_tree_rss(server.process.pid)


def summarize(phases: list[dict], args, pool: int) -> dict:
    ttfts = [t for p in phases for t in p["ttfts"]]
    hits, misses = sum(p["hits"] for p in phases), sum(p["misses"] for p in phases)
    last = phases[-1]
    return {"pool": pool, "served_tokens": math.ceil(args.prompt_tokens / pool), "requests": len(ttfts),
            "hits": int(hits), "misses": int(misses), "hit_ratio": hits / (hits + misses) if hits + misses else None,
            "ttft_ms": {"p50": 1000 * statistics.median(ttfts), "p95": 1000 * percentile(ttfts, 0.95)},
            "requests_per_s": len(ttfts) / sum(p["seconds"] for p in phases),
            "prompt_kv_bytes": int(last["prompt_kv_bytes"]), "tasks_resident": int(last["tasks_resident"]),
            "server_rss_mb": round(last["rss_bytes"] / 2**20, 1)}


def probe_kv_bytes_per_position(server, args) -> float:
    """On the empty cache: one request of a p = 1 task; its entry's bytes over l positions."""
    before = settled_gauges(server.url)
    if before["lamp_prompt_kv_cache_tasks"]:
        raise RuntimeError("the probe needs an empty prompt-KV cache")
    with httpx.Client(timeout=args.request_timeout) as client:
        one_request(client, server.url, task_id(min(args.pools), 0), INPUTS[0], args.max_new_tokens)
    after = settled_gauges(server.url)
    return after["lamp_prompt_kv_cache_bytes"] / math.ceil(args.prompt_tokens / min(args.pools))


def capacity(args, per_position: float, rows: list[dict]) -> list[dict]:
    """Tasks kept hot per GB of prompt KV by p: computed (bytes per position x ceil(l/p)) and
    measured (tasks resident per byte held at the end of the largest uniform run, or of the last
    traffic run when uniform is not)."""
    budget = args.prompt_kv_cache_mb * 2**20
    traffic = "uniform" if "uniform" in args.traffic else args.traffic[-1]
    largest = [r for r in rows if r["tasks"] == args.tasks[-1] and r["traffic"] == traffic]
    table = []
    for pool in args.pools:
        entry = per_position * math.ceil(args.prompt_tokens / pool)
        measured = next((r for r in largest if r["pool"] == pool), None)
        table.append({"pool": pool, "entry_bytes": int(entry), "computed_per_gb": GB / entry,
                      "computed_in_budget": int(budget // entry),
                      "measured_per_gb": measured["tasks_resident"] * GB / measured["prompt_kv_bytes"]
                      if measured and measured["prompt_kv_bytes"] else None,
                      "measured_in_budget": measured["tasks_resident"] if measured else None})
    return table


def run(args, server) -> dict:
    """Register, probe, drive every (task count, traffic, round, p); the report (without context)."""
    rng = random.Random(args.seed)
    files = {pool: adapter_files(args, pool) for pool in args.pools}
    registered, rows, per_position = 0, [], None
    with httpx.Client(base_url=server.url, headers=server.admin_headers(), timeout=600) as admin:
        for count in args.tasks:
            started = time.perf_counter()
            for pool in args.pools:
                register(admin, pool, registered, count, files[pool])
            print(f"registered {count} tasks x {len(args.pools)} pools in {time.perf_counter() - started:.0f} s",
                  flush=True)
            registered = count
            if per_position is None:
                per_position = probe_kv_bytes_per_position(server, args)
            for traffic in args.traffic:
                exponent = args.zipf if traffic == "zipf" else 0.0
                phases = {pool: [] for pool in args.pools}
                for r in range(args.rounds):
                    indices = sequence(random.Random(rng.random()), count, exponent, args.warmup + args.requests)
                    shift = r % len(args.pools)
                    for pool in args.pools[shift:] + args.pools[:shift]:
                        phases[pool].append(measure_phase(server, pool, indices, args))
                        p = phases[pool][-1]
                        print(f"N={count} {traffic} round {r + 1} p={pool}: hits {p['hits']:.0f} misses "
                              f"{p['misses']:.0f} in {p['seconds']:.1f} s", flush=True)
                rows += [{"tasks": count, "traffic": traffic, **summarize(phases[pool], args, pool)}
                         for pool in args.pools]
    return {"kv_bytes_per_position": per_position, "rows": rows, "capacity": capacity(args, per_position, rows),
            "p10_over_p1": ratios(rows)}


def ratios(rows: list[dict]) -> list[dict]:
    """Per (task count, traffic): largest p's hit ratio and TTFT p95 over p = 1's (the issue's must)."""
    out = []
    for key in sorted({(r["tasks"], r["traffic"]) for r in rows}):
        mine = sorted((r for r in rows if (r["tasks"], r["traffic"]) == key), key=lambda r: r["pool"])
        low, high = mine[0], mine[-1]
        out.append({"tasks": key[0], "traffic": key[1], "pools": [low["pool"], high["pool"]],
                    "hit_ratio": high["hit_ratio"] / low["hit_ratio"] if low["hit_ratio"] else None,
                    "ttft_p95": high["ttft_ms"]["p95"] / low["ttft_ms"]["p95"]})
    return out


def print_tables(report: dict) -> None:
    from lamp_runtime.bench.report import format_table

    rows = [{**r, "p50": r["ttft_ms"]["p50"], "p95": r["ttft_ms"]["p95"]} for r in report["rows"]]
    print(format_table(rows, [("tasks", "tasks", "d"), ("traffic", "traffic", "s"), ("pool", "p", "d"),
                              ("hit_ratio", "prompt-KV hit ratio", ".3f"), ("p50", "TTFT p50 ms", ".0f"),
                              ("p95", "TTFT p95 ms", ".0f"), ("requests_per_s", "req/s", ".2f"),
                              ("tasks_resident", "tasks resident", "d"), ("server_rss_mb", "RSS MiB", ".0f")]))
    print(format_table(report["capacity"], [("pool", "p", "d"), ("computed_per_gb", "tasks/GB computed", ".0f"),
                                            ("measured_per_gb", "tasks/GB measured", ".0f"),
                                            ("computed_in_budget", "in budget computed", "d"),
                                            ("measured_in_budget", "measured", "d")]))


def main(argv=None) -> int:
    from lamp_runtime.bench.report import full_command, write_json
    from lamp_runtime.machine import machine_context
    from tests.server_process import ServerProcess

    args = parse_args(argv)
    context, began = machine_context(), time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="lamp-many-tasks-"))
    try:
        server = ServerProcess(store=tmp / "store", admin_token=ADMIN_TOKEN, log_path=tmp / "serve.log",
                               extra_args=[*shlex.split(args.serve_args), "--prompt-kv-cache-mb",
                                           str(args.prompt_kv_cache_mb), "--max-upload-bytes", str(64 << 20)])
        with server.start(timeout=START_TIMEOUT_S):
            report = run(args, server)
        print_tables(report)
        command = full_command("python -m loadtest.many_tasks", build_parser(), args)
        report = {"bench": "many-tasks", "command": command, "out": args.json, "context": context,
                  # a random-weight backbone (made for benchmarks) is served only with this flag
                  "random_weights": "--allow-random-weights" in shlex.split(args.serve_args),
                  "load_average_at_end": machine_context()["load_average"],
                  "elapsed_s": round(time.perf_counter() - began), "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")}, **report}
        if args.json:
            write_json(args.json, report)
        if args.plot:
            from lamp_runtime.bench.plots import plot_many_tasks

            plot_many_tasks(report, args.plot)
    finally:  # tens of thousands of stored adapters take a while to remove: after the report
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
