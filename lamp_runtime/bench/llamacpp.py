"""The llama.cpp engine against llama.cpp's own llama-bench, the HF int4 engine and vLLM.

    .venv/bin/python -m lamp_runtime.bench.llamacpp [--clients 1 4 16 64] [--repeats 3] [--new-tokens 32]
        [--engines llamacpp hf vllm] [--threads 2] [--out docs/bench/llamacpp.json]

(`make llama-bench` builds .venv/bin/llama-bench from the same llama.cpp source first.)
One run interleaves, round after round in a shuffled order (lamp_runtime/bench/stats.py):
- decode at batch 1: the engine's decode tok/s on one request vs `llama-bench -p 0 -n 64` on the
  same GGUF with the same threads, weight repacking on and off (`--repack 1/0`);
- throughput at each --clients count of concurrent mixed-task clients (bench/engines.py's four
  tasks of every adapter kind plus no task), for every engine of --engines;
- mixed steps: one decode with the decode rows' tokens as embedding rows ("embed") vs a token
  decode plus an embedding decode ("split"), at the largest client count;
- warm prefill of a 200-token vs a 2-token soft prompt (both prompts' KV cached), and the cold
  prompt-KV build of the 200-token one;
- torch threads in the engine loop (1 vs the cores) with sampled requests;
and reports each engine's RSS growth when it was built. The JSON holds the command (every
flag), git revision, CPU model, load averages and every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from lamp_runtime.adapters import AdapterMeta, SoftPromptAdapter
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.bench.engines import bench_adapters, closed_loop, interleaved_then_shut_down, mixed_requests
from lamp_runtime.bench.report import full_command
from lamp_runtime.bench.stats import safe_ratio, summarize
from lamp_runtime.bench.workload import machine_context, vocabulary_prompt
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.engine.step_loop import StepLoopEngine
from lamp_runtime.engine.streams import complete as complete_async
from lamp_runtime.engines import build_engine
from lamp_runtime.machine import lscpu_model
from lamp_runtime.requests import GenerationRequest, SamplingParams

LLAMA_BENCH = Path(sys.prefix) / "bin" / "llama-bench"  # where `make llama-bench` puts it


def llama_bench_tg(binary: Path, gguf: Path, threads: int, repack: bool, tokens: int) -> float:
    """llama-bench's decode speed (tg) in tok/s."""
    done = subprocess.run([str(binary), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-t", str(threads),
                           "-r", "1", "--repack", "1" if repack else "0", "-o", "json"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({done.returncode}): {done.stderr[-300:]}")
    return float(json.loads(done.stdout)[0]["avg_ts"])


def complete(engine, request: GenerationRequest):
    return asyncio.run(complete_async(engine, request))


def engine_decode(runner, tokens: int) -> float:
    """The engine's decode tok/s on one request (its first token comes from the prefill)."""
    result = complete(runner, GenerationRequest("Once upon a time", None,
                                                SamplingParams(max_new_tokens=tokens, ignore_eos=True)))
    return (len(result.token_ids) - 1) / (result.decode_ms / 1000)


def prefill_ms(runner, task: str, repeats: int = 3) -> float:
    """Median prefill of one request of `task` (one input of ~16 tokens, one new token)."""
    times = [complete(runner, GenerationRequest("Classify the sentiment of this short review please: great", task,
                                                SamplingParams(max_new_tokens=1))).prefill_ms
             for _ in range(repeats)]
    return sorted(times)[len(times) // 2]


def cold_build_ms(runner, task: str) -> float:
    """Prefill of a request whose task's prompt KV was just discarded: it builds it again."""
    runner.discard(runner.registry.get(task).cache_key)
    return prefill_ms(runner, task, repeats=1)


def rss() -> int:
    return psutil.Process().memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--engines", nargs="+", default=["llamacpp", "hf", "vllm"], choices=["llamacpp", "hf", "vllm"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="ggml / torch threads (default: the cores)")
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="vLLM KV cache (host memory on CPU)")
    parser.add_argument("--llama-bench", type=Path, default=LLAMA_BENCH, help=f"llama-bench binary (default {LLAMA_BENCH})")
    parser.add_argument("--out", help="write settings, samples and summaries as JSON here")
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(1)  # as lamp serve does: only engine loop threads run multi-threaded torch work
    clients_max = max(args.clients)
    config = EngineConfig(max_batch_size=max(16, clients_max), max_input_tokens=1024,
                          max_new_tokens=max(args.new_tokens, args.decode_tokens), threads=threads, max_waiting=1024)
    engines, rss_growth = {}, {}
    for kind in args.engines:
        before = rss()
        if kind == "vllm":
            from lamp_runtime.vllm.engine import VllmOptions

            engines[kind] = build_engine("vllm", BackboneOptions(dtype="float32", quantization="none", device="cpu"),
                                         config, VllmOptions(kv_cache_mb=args.kv_cache_mb, max_model_len=2048))
        elif kind == "hf":
            engines[kind] = build_engine("hf", BackboneOptions(dtype="bfloat16", quantization="int4", device="cpu"),
                                         config)
        else:
            engines[kind] = build_engine("llamacpp", BackboneOptions(), config)
        rss_growth[kind] = rss() - before
    llama = engines["llamacpp"].core
    from lamp_runtime.llamacpp.engine import LlamaCppEngine
    from lamp_runtime.llamacpp.options import LlamaCppOptions

    extra = LlamaCppOptions(kv_cells=4096)
    split = LlamaCppEngine(llama.backbone, llama.registry, config, options=dataclasses.replace(extra, mixed_steps="split"))
    # The same engine with `threads` torch threads in its loop (the default runs torch on one).
    torch_many = LlamaCppEngine(llama.backbone, llama.registry, config, options=extra)
    torch_many.threads = threads
    table = torch.from_numpy(np.array(llama.backbone.info.table))  # a writable copy of the mmap'ed table
    adapters = bench_adapters(table)
    for engine in engines.values():
        for task, adapter in adapters.items():
            engine.registry.register(task, adapter)
    llama.registry.register("p200", SoftPromptAdapter(AdapterMeta(), vocabulary_prompt(table, 200, seed=8)))
    llama.registry.register("p2", SoftPromptAdapter(AdapterMeta(), vocabulary_prompt(table, 2, seed=9)))
    runners = dict(engines)
    runners["llamacpp-split"] = StepLoopEngine(split)
    runners["llamacpp-torch-many"] = StepLoopEngine(torch_many)
    sampled = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, temperature=0.8, top_p=0.95, seed=1)

    def sampled_loop(torch_threads: int) -> dict:
        runner = runners["llamacpp" if torch_threads == 1 else "llamacpp-torch-many"]
        requests = [GenerationRequest(r.input, r.task_id, sampled) for r in mixed_requests(2 * clients_max, 1)]
        return closed_loop(runner, requests, clients_max)

    gguf = llama.backbone.path
    variants = [("decode", "engine"), ("decode", "llama-bench-repack"), ("decode", "llama-bench-norepack"),
                ("prefill", "p200"), ("prefill", "p2"), ("prefill", "cold-p200"),
                ("mixed", "embed"), ("mixed", "split"), ("torch", 1), ("torch", threads)]
    variants += [("clients", kind, clients) for kind in engines for clients in args.clients]
    has_bench = args.llama_bench.is_file()
    if not has_bench:
        variants = [v for v in variants if not str(v[1]).startswith("llama-bench")]
        print(f"no {args.llama_bench}: run `make llama-bench` for the llama-bench comparison")

    def measure(variant):
        part = variant[0]
        if part == "decode":
            if variant[1] == "engine":
                return {"tokens_per_s": engine_decode(runners["llamacpp"], args.decode_tokens)}
            return {"tokens_per_s": llama_bench_tg(args.llama_bench, gguf, threads, variant[1].endswith("-repack"), args.decode_tokens)}
        if part == "prefill":
            if variant[1] == "cold-p200":
                return {"ms": cold_build_ms(runners["llamacpp"], "p200")}
            return {"ms": prefill_ms(runners["llamacpp"], variant[1])}
        if part == "mixed":
            runner = runners["llamacpp" if variant[1] == "embed" else "llamacpp-split"]
            return closed_loop(runner, mixed_requests(2 * clients_max, args.new_tokens), clients_max)
        if part == "torch":
            return sampled_loop(variant[1])
        _, kind, clients = variant
        return closed_loop(runners[kind], mixed_requests(max(8, 2 * clients), args.new_tokens), clients)

    context = machine_context() | {"threads": threads, "llamacpp_settings": llama.settings,
                                   "lscpu_model": lscpu_model(), "gguf": str(gguf)}
    samples = interleaved_then_shut_down(variants, measure, args.repeats, "llamacpp bench", runners.values(), context)

    def med(variant, key):
        return summarize([s[key] for s in samples[variant]]).median

    def paired(a, b, key):
        return summarize([safe_ratio(x[key], y[key]) for x, y in zip(samples[a], samples[b])]).median

    ratios = {}
    if has_bench:
        best = max(("llama-bench-repack", "llama-bench-norepack"), key=lambda v: med(("decode", v), "tokens_per_s"))
        ratios["decode_b1_vs_llama_bench_best"] = paired(("decode", "engine"), ("decode", best), "tokens_per_s")
        ratios["llama_bench_best"] = best
    for clients in args.clients:
        for other in ("hf", "vllm"):
            if other in engines:
                ratios[f"clients{clients}_llamacpp_vs_{other}"] = paired(("clients", "llamacpp", clients),
                                                                         ("clients", other, clients), "tokens_per_s")
    ratios["warm_prefill_p200_vs_p2"] = paired(("prefill", "p200"), ("prefill", "p2"), "ms")
    ratios["cold_p200_vs_warm_p200"] = paired(("prefill", "cold-p200"), ("prefill", "p200"), "ms")
    ratios["mixed_embed_vs_split_tokens_per_s"] = paired(("mixed", "embed"), ("mixed", "split"), "tokens_per_s")
    ratios[f"torch_threads_1_vs_{threads}_tokens_per_s"] = paired(("torch", 1), ("torch", threads), "tokens_per_s")
    medians = {"/".join(map(str, v)): {k: med(v, k) for k in samples[v][0]} for v in variants}
    for name, value in medians.items():
        print(f"{name:>32}: " + ", ".join(f"{k} {v:.1f}" for k, v in value.items()))
    for name, value in ratios.items():
        print(f"{name:>44}: {value if isinstance(value, str) else f'{value:.2f}x'}")
    print(f"RSS growth per engine (MB): { {k: round(v / 1e6) for k, v in rss_growth.items()} }; "
          f"load average {context['load_average_before']} -> {context['load_average_after']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"command": full_command("python -m lamp_runtime.bench.llamacpp", parser, args), "out": args.out,
                       "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "context": context, "ratios": ratios, "medians": medians,
                       "rss_growth_bytes": rss_growth,
                       "samples": {"/".join(map(str, v)): s for v, s in samples.items()}}, handle, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
