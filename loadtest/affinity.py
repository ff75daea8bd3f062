"""Task-affinity routing against Serve's default router: prompt-cache hit ratio, TTFT, requests per replica.

    python -m loadtest.affinity --json docs/bench/affinity.json

Two servers run side by side on this machine, each with 2 model replicas and the same 400 bundled
tasks (soft prompts of real token embeddings), one with `--routing affinity`, one with
`--routing random`. Each replica's prompt cache and prompt-KV cache is sized to hold
`--cache-share` of the tasks (sizes from the backbone's shapes: pooled tokens x hidden size, and
pooled tokens x KV bytes per position). Both servers first get one request per task (the same
random order), then for each workload (Zipf-distributed tasks, then uniform) the same measured
phases, alternating which server goes first, so the two are measured interleaved under the same
machine load. Closed loop: `--concurrency` clients, each sending its next streamed /generate when
the last one finished. The warm-up leaves each affinity replica holding its whole share while each
default-router replica has seen only half the tasks, so the first measured phases still find the
default router's caches filling: this flatters the default router, not affinity.

Measured per variant over the measured phases only: hit ratios from the replicas' cache counters
(/metrics deltas), time to first token as the client sees it (first SSE event), requests per
replica, and (affinity) requests routed to the preferred replica vs spilled.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

from .common import percentile, run_phase

VARIANTS = ("affinity", "random")
COUNTERS = ("lamp_prompt_cache_hits_total", "lamp_prompt_cache_misses_total", "lamp_prompt_kv_cache_hits_total",
            "lamp_prompt_kv_cache_misses_total", "lamp_request_seconds_count")
MIB = 1024 * 1024
START_TIMEOUT_S = 900.0  # 4 replicas of two servers loading on a shared 2-core machine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=400)
    p.add_argument("--prompt-tokens", type=int, default=32, help="soft-prompt length of every task")
    p.add_argument("--cache-share", type=float, default=0.6, help="share of the tasks each replica's caches hold")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the skewed workload")
    p.add_argument("--workloads", default="zipf,uniform")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--phases", type=int, default=4, help="measured phases per server, per workload")
    p.add_argument("--phase-requests", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=2)
    p.add_argument("--serve-args", default="--threads 1 --max-batch-size 8",
                   help="extra `lamp serve` options for both servers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.tasks < 2 or args.concurrency < 1 or args.phases < 1 or not 0 < args.cache_share <= 1:
        p.error("need --tasks >= 2, --concurrency >= 1, --phases >= 1 and 0 < --cache-share <= 1")
    return args


def write_tasks(folder: Path, count: int, tokens: int, seed: int):
    """`count` plain soft prompts of real token embeddings; returns the backbone (for sizes)."""
    import torch

    from lamp_runtime.adapters import AdapterMeta, SoftPromptAdapter, save_adapter
    from lamp_runtime.backbone.hf import load_backbone
    from lamp_runtime.backbone.options import BackboneOptions

    backbone = load_backbone(BackboneOptions(dtype="float32", quantization="none", device="cpu"))
    weight = backbone.model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        ids = torch.randint(0, weight.shape[0], (tokens,), generator=generator)
        save_adapter(SoftPromptAdapter(AdapterMeta(), weight[ids].detach().clone()), folder / f"{task_name(i)}.safetensors")
    return backbone


def task_name(index: int) -> str:
    return f"t{index:04d}"


def cache_sizes(backbone, tokens: int, tasks: int, share: float) -> dict:
    """Cache budgets (MiB, whole) holding about `share` of the tasks, and what they hold exactly."""
    import torch

    from lamp_runtime.backbone.hf import kv_bytes_per_token

    prompt_bytes = tokens * backbone.hidden_size * 4  # float32 server
    kv_bytes = tokens * kv_bytes_per_token(backbone.config, torch.float32)
    prompt_mb = max(1, round(share * tasks * prompt_bytes / MIB))
    kv_mb = max(1, round(share * tasks * kv_bytes / MIB))
    return {"prompt_bytes_per_task": prompt_bytes, "prompt_kv_bytes_per_task": kv_bytes,
            "prompt_cache_mb": prompt_mb, "prompt_kv_cache_mb": kv_mb,
            "prompt_cache_holds_tasks": prompt_mb * MIB // prompt_bytes,
            "prompt_kv_cache_holds_tasks": kv_mb * MIB // kv_bytes}


def zipf_sequence(rng: random.Random, tasks: int, exponent: float, count: int) -> list[str]:
    """Task ids by Zipf popularity over a random permutation (popularity unrelated to the name,
    hence to the hash); exponent 0 is uniform."""
    names = [task_name(i) for i in range(tasks)]
    rng.shuffle(names)
    weights = [1.0 / (rank + 1) ** exponent for rank in range(tasks)]
    return rng.choices(names, weights=weights, k=count)


def counters(url: str) -> dict[str, dict[str, float]]:
    """Per model replica: the cache and request counters; plus routing counts under 'routed'."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name in COUNTERS and s.labels.get("deployment") == "LampModel":
                values[s.labels["replica"]][s.name] += s.value
            elif s.name == "lamp_routed_requests_total":
                values["routed"][f"{s.labels['model_replica']}:{s.labels['choice']}"] += s.value
    return {k: dict(v) for k, v in values.items()}


def delta(after: dict, before: dict) -> dict:
    return {key: {name: value - before.get(key, {}).get(name, 0.0) for name, value in values.items()}
            for key, values in after.items()}


def summarize_variant(ttfts: list[float], counts: dict) -> dict:
    replicas = {k: v for k, v in counts.items() if k != "routed"}

    def ratio(prefix: str, per: dict) -> float | None:
        hits, misses = per.get(f"{prefix}_hits_total", 0.0), per.get(f"{prefix}_misses_total", 0.0)
        return hits / (hits + misses) if hits + misses else None

    total = {name: sum(v.get(name, 0.0) for v in replicas.values()) for name in COUNTERS}
    per_replica = {r: {"requests": int(v.get("lamp_request_seconds_count", 0)),
                       "prompt_cache_hit_ratio": ratio("lamp_prompt_cache", v),
                       "prompt_kv_cache_hit_ratio": ratio("lamp_prompt_kv_cache", v)} for r, v in sorted(replicas.items())}
    requests = [p["requests"] for p in per_replica.values()]
    routed = counts.get("routed", {})
    return {
        "requests": len(ttfts),
        "ttft_ms": {"p50": 1000 * statistics.median(ttfts), "p95": 1000 * percentile(ttfts, 0.95),
                    "mean": 1000 * statistics.fmean(ttfts)},
        "prompt_cache_hit_ratio": ratio("lamp_prompt_cache", total),
        "prompt_kv_cache_hit_ratio": ratio("lamp_prompt_kv_cache", total),
        "requests_per_replica_max_over_min": max(requests) / min(requests) if len(requests) > 1 and min(requests)
        else None,
        "per_replica": per_replica,
        "routed_preferred": int(sum(v for k, v in routed.items() if k.endswith(":preferred"))),
        "routed_spilled": int(sum(v for k, v in routed.items() if k.endswith(":spilled"))),
    }


def measure_workload(name: str, exponent: float, urls: dict[str, str], args, rng: random.Random) -> dict:
    ttfts = {v: [] for v in VARIANTS}
    counts = {v: {} for v in VARIANTS}
    phase_rng = random.Random(rng.random())
    for phase in range(args.phases):
        sequence = zipf_sequence(random.Random(phase_rng.random()), args.tasks, exponent, args.phase_requests)
        for variant in (VARIANTS if phase % 2 == 0 else VARIANTS[::-1]):
            time.sleep(1.2)  # replicas push their metrics every 0.5 s
            before = counters(urls[variant])
            started = time.perf_counter()
            ttfts[variant] += run_phase(urls[variant], sequence, args)
            seconds = time.perf_counter() - started
            time.sleep(1.2)
            step = delta(counters(urls[variant]), before)
            for key, values in step.items():
                for metric, value in values.items():
                    counts[variant].setdefault(key, {}).setdefault(metric, 0.0)
                    counts[variant][key][metric] += value
            print(f"{name} phase {phase + 1}/{args.phases} {variant}: {len(sequence)} requests in {seconds:.1f} s",
                  flush=True)
    result = {"workload": name, "zipf_exponent": exponent,
              "variants": {v: summarize_variant(ttfts[v], counts[v]) for v in VARIANTS}}
    a, r = result["variants"]["affinity"], result["variants"]["random"]
    result["affinity_over_random"] = {
        "prompt_cache_hit_ratio": _ratio(a["prompt_cache_hit_ratio"], r["prompt_cache_hit_ratio"]),
        "prompt_kv_cache_hit_ratio": _ratio(a["prompt_kv_cache_hit_ratio"], r["prompt_kv_cache_hit_ratio"]),
        "ttft_p50": _ratio(a["ttft_ms"]["p50"], r["ttft_ms"]["p50"]),
        "ttft_p95": _ratio(a["ttft_ms"]["p95"], r["ttft_ms"]["p95"]),
    }
    return result


def _ratio(a, b):
    return a / b if a is not None and b else None


def print_table(workloads: list[dict]) -> None:
    from lamp_runtime.bench.report import format_table

    rows = []
    for w in workloads:
        for variant, v in w["variants"].items():
            rows.append({"workload": w["workload"], "router": variant, "pc": v["prompt_cache_hit_ratio"],
                         "kv": v["prompt_kv_cache_hit_ratio"], "p50": v["ttft_ms"]["p50"], "p95": v["ttft_ms"]["p95"],
                         "spread": v["requests_per_replica_max_over_min"],
                         "spilled": v["routed_spilled"] / v["requests"] if variant == "affinity" else None})
    print(format_table(rows, [("workload", "workload", "s"), ("router", "router", "s"),
                              ("pc", "prompt cache hits", ".3f"), ("kv", "prompt-KV hits", ".3f"),
                              ("p50", "TTFT p50 ms", ".0f"), ("p95", "TTFT p95 ms", ".0f"),
                              ("spread", "req/replica max/min", ".2f"), ("spilled", "spilled", ".3f")]))


def main(argv=None) -> int:
    from lamp_runtime.bench.report import full_command, write_json
    from lamp_runtime.bench.workload import machine_context
    from tests.server_process import ServerProcess, stop_all

    args = parse_args(argv)
    context = machine_context()
    rng = random.Random(args.seed)
    exponents = {"zipf": args.zipf, "uniform": 0.0}
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - set(exponents)
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; known: {', '.join(exponents)}")
    with tempfile.TemporaryDirectory(prefix="lamp-affinity-") as tmp:
        tmp = Path(tmp)
        (tmp / "prompts").mkdir()
        print(f"writing {args.tasks} task adapters", flush=True)
        backbone = write_tasks(tmp / "prompts", args.tasks, args.prompt_tokens, args.seed)
        sizes = cache_sizes(backbone, args.prompt_tokens, args.tasks, args.cache_share)
        del backbone
        print(f"per-replica caches: {sizes}", flush=True)
        serve_args = [*shlex.split(args.serve_args), "--prompt-cache-mb", str(sizes["prompt_cache_mb"]),
                      "--prompt-kv-cache-mb", str(sizes["prompt_kv_cache_mb"])]
        servers = {v: ServerProcess(store=tmp / f"store-{v}", prompts=tmp / "prompts", replicas=2,
                                    extra_args=[*serve_args, "--routing", v], log_path=tmp / f"{v}.log")
                   for v in VARIANTS}
        try:
            for variant, server in servers.items():
                print(f"starting the {variant} server", flush=True)
                server.start(timeout=START_TIMEOUT_S)
            urls = {v: s.url for v, s in servers.items()}
            warm = [task_name(i) for i in range(args.tasks)]
            rng.shuffle(warm)
            for variant in VARIANTS:
                started = time.perf_counter()
                run_phase(urls[variant], warm, args)
                print(f"warm-up {variant}: {len(warm)} requests in {time.perf_counter() - started:.1f} s", flush=True)
            results = [measure_workload(w, exponents[w], urls, args, rng) for w in workloads]
        finally:
            stop_all(servers.values())
    print_table(results)
    if args.json:
        command = full_command("python -m loadtest.affinity", build_parser(), args)
        write_json(args.json, {"bench": "affinity", "command": command, "out": args.json, "context": context,
                               "load_average_at_end": machine_context()["load_average"],
                               "settings": {k: v for k, v in vars(args).items() if k != "json"},
                               "replicas_per_server": 2, "caches": sizes, "workloads": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
