"""The llama.cpp engine against llama.cpp's own llama-bench, the HF int4 engine and vLLM.

    .venv/bin/python -m lamp_runtime.bench.llamacpp [--clients 1 4 16 64] [--repeats 3] [--new-tokens 32]
        [--engines llamacpp hf vllm] [--threads 2] [--gguf FILE | --requantize Q4_0] [--out docs/bench/llamacpp.json]

(`make llama-bench` builds .venv/bin/llama-bench from the same llama.cpp source first.)
One run interleaves, round after round in a shuffled order (lamp_runtime/bench/stats.py):
- decode at batch 1: the engine's decode tok/s on one request vs `llama-bench -p 0 -n 64` on the
  same GGUF with the same threads, weight repacking on and off (`--repack 1/0`), and vs a bare
  ctypes loop of llama_decode calls in the engine's own context (bench/llamacpp_native.py);
- throughput at each --clients count of concurrent mixed-task clients (bench/engines.py's four
  tasks of every adapter kind plus no task), for every engine of --engines;
- mixed steps: one decode with the decode rows' tokens as embedding rows ("embed") vs a token
  decode plus an embedding decode ("split"), at the largest client count;
- warm prefill of a 200-token vs a 2-token soft prompt (both prompts' KV cached), and the cold
  prompt-KV build of the 200-token one; the same input's llama_decode alone after each prompt's KV
  (the bare loop's process), and the rate of the arithmetic the 198 more positions add;
- torch threads in the engine loop (1 vs the cores) with sampled requests;
and reports each engine's RSS growth when it was built. Every engine serves the same GGUF: the
embedded one, --gguf, or either requantized by llama.cpp (--requantize, llamacpp/requantize.py). Each engine runs in a process of its own
(bench/engine_process.py), as a replica holds one engine, the llama.cpp variants (the other mode
of mixed steps, torch threads) too: every engine loop thread that has run a llama_decode keeps an
OpenMP pool of ggml's threads, and with more pooled threads than cores libgomp stops spinning
between parallel regions, so each decode pays a wake-up (with two variant engines beside it, the
served engine ran 13% slower at 16 clients). The rounds interleave the processes. The JSON holds the command
(every flag), git revision, CPU model, load averages and every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import torch

from lamp_runtime.adapters import AdapterMeta, SoftPromptAdapter
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.bench.engine_process import EngineProcess
from lamp_runtime.bench.engines import bench_adapters, closed_loop, mixed_requests
from lamp_runtime.bench.report import full_command, write_json
from lamp_runtime.bench.stats import interleaved, safe_ratio, summarize
from lamp_runtime.bench.workload import vocabulary_prompt
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.engine.step_loop import StepLoopEngine
from lamp_runtime.engine.streams import complete as complete_async
from lamp_runtime.engines import build_engine
from lamp_runtime.llamacpp.engine import build_llamacpp_engine
from lamp_runtime.llamacpp.options import LlamaCppOptions
from lamp_runtime.machine import load_average, lscpu_model, machine_context
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


PREFILL_INPUT = "Classify the sentiment of this short review please: great"  # 11 tokens on SmolLM2


def prefill_ms(runner, task: str, repeats: int = 3) -> float:
    """Median prefill of one request of `task` (PREFILL_INPUT, one new token)."""
    times = [complete(runner, GenerationRequest(PREFILL_INPUT, task, SamplingParams(max_new_tokens=1))).prefill_ms
             for _ in range(repeats)]
    return sorted(times)[len(times) // 2]


def cold_build_ms(runner, task: str) -> float:
    """Prefill of a request whose task's prompt KV was just discarded: it builds it again."""
    runner.discard(runner.registry.get(task).cache_key)
    return prefill_ms(runner, task, repeats=1)


def rss() -> int:
    return psutil.Process().memory_info().rss


def engine_config(settings: dict) -> EngineConfig:
    clients_max = max(settings["clients"])
    return EngineConfig(max_batch_size=max(16, clients_max), max_input_tokens=1024,
                        max_new_tokens=max(settings["new_tokens"], settings["decode_tokens"]),
                        threads=settings["threads"], max_waiting=1024)


# The llama.cpp engine variants, each in a process of its own: as served, the other mode of mixed
# steps (LlamaCppOptions.mixed_steps: "embed", one decode, or "split"), `threads` torch threads in
# its loop (the served engine has one).
LLAMACPP_VARIANTS = ("llamacpp", "llamacpp-other-mixed", "llamacpp-torch-many", "llamacpp-native",
                     "llamacpp-native-nofa")
NATIVE = "lamp_runtime.bench.llamacpp_native:NativeLoopSide"  # bare ctypes loops, flash attention on / off
FACTORIES = {"llamacpp-native": NATIVE, "llamacpp-native-nofa": NATIVE}


def other_mixed_mode(mode: str) -> str:
    return "split" if mode == "embed" else "embed"


class LlamaCppSide:
    """One llama.cpp engine variant's side (settings["kind"], of LLAMACPP_VARIANTS)."""

    def __init__(self, settings: dict):
        torch.set_num_threads(1)  # as lamp serve does: only engine loop threads run multi-threaded torch work
        self.settings = settings
        config = engine_config(settings)
        kind = settings["kind"]
        options = LlamaCppOptions()
        if kind == "llamacpp-other-mixed":
            options = dataclasses.replace(options, mixed_steps=other_mixed_mode(options.mixed_steps))
        before = rss()
        core = build_llamacpp_engine(BackboneOptions(path=settings["gguf"]), config, options)
        if kind == "llamacpp-torch-many":
            core.threads = settings["threads"]  # read by on_loop_start, when the loop below starts
        self.runner = StepLoopEngine(core)
        self.rss_growth = rss() - before
        self.core = core
        table = torch.from_numpy(np.array(core.backbone.info.table))  # gguf_table()'s rows, already in memory
        for task, adapter in bench_adapters(table).items():
            core.registry.register(task, adapter)
        core.registry.register("p200", SoftPromptAdapter(AdapterMeta(), vocabulary_prompt(table, 200, seed=8)))
        core.registry.register("p2", SoftPromptAdapter(AdapterMeta(), vocabulary_prompt(table, 2, seed=9)))

    def info(self) -> dict:
        return {"settings": self.core.settings, "mixed_steps": self.core.options.mixed_steps,
                "gguf": str(self.core.backbone.path), "rss_growth": self.rss_growth}

    def measure(self, variant) -> dict:
        part, name = variant[0], variant[1]
        new_tokens, clients_max = self.settings["new_tokens"], max(self.settings["clients"])
        if part == "decode":
            return {"tokens_per_s": engine_decode(self.runner, self.settings["decode_tokens"])}
        if part == "prefill":
            return {"ms": cold_build_ms(self.runner, "p200") if name == "cold-p200" else prefill_ms(self.runner, name)}
        if part == "mixed":
            return closed_loop(self.runner, mixed_requests(2 * clients_max, new_tokens), clients_max)
        if part == "torch":
            sampled = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=0.8, top_p=0.95, seed=1)
            requests = [GenerationRequest(r.input, r.task_id, sampled) for r in mixed_requests(2 * clients_max, 1)]
            return closed_loop(self.runner, requests, clients_max)
        return clients_sample(self.runner, variant[2], new_tokens)

    def close(self) -> None:
        self.runner.shutdown()


class OtherEngineSide:
    """The HF int4 engine's or vLLM's side: throughput at each client count."""

    def __init__(self, settings: dict):
        torch.set_num_threads(1)
        self.settings = settings
        config = engine_config(settings)
        before = rss()
        if settings["kind"] == "vllm":
            from lamp_runtime.vllm.engine import VllmOptions

            self.engine = build_engine("vllm", BackboneOptions(settings["gguf"], "float32", "none", "cpu"),
                                       config, VllmOptions(kv_cache_mb=settings["kv_cache_mb"], max_model_len=2048))
        else:
            self.engine = build_engine("hf", BackboneOptions(settings["gguf"], "bfloat16", "int4", "cpu"), config)
        self.rss_growth = rss() - before
        for task, adapter in bench_adapters(gguf_table(settings["gguf"])).items():
            self.engine.registry.register(task, adapter)

    def info(self) -> dict:
        return {"rss_growth": self.rss_growth}

    def measure(self, variant) -> dict:
        return clients_sample(self.engine, variant[2], self.settings["new_tokens"])

    def close(self) -> None:
        self.engine.shutdown()


def gguf_table(gguf: str | None) -> torch.Tensor:
    """The GGUF's token-embedding table: every side draws the same adapters from it."""
    from lamp_runtime.llamacpp.backbone import gguf_path, read_gguf

    return torch.from_numpy(np.array(read_gguf(gguf_path(BackboneOptions(gguf))[0]).table))  # a writable copy


def clients_sample(runner, clients: int, new_tokens: int) -> dict:
    return closed_loop(runner, mixed_requests(max(8, 2 * clients), new_tokens), clients)


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
    parser.add_argument("--gguf", type=Path, help="the GGUF every engine serves (default: the embedded one)")
    parser.add_argument("--requantize", metavar="TYPE",
                        help="serve the GGUF requantized by llama.cpp to TYPE (llamacpp/requantize.py) in every engine")
    parser.add_argument("--out", help="write settings, samples and summaries as JSON here")
    args = parser.parse_args()
    if "llamacpp" not in args.engines:
        parser.error("--engines must include llamacpp (the engine this bench compares)")
    threads = args.threads or len(os.sched_getaffinity(0))
    shared = {"clients": args.clients, "new_tokens": args.new_tokens, "decode_tokens": args.decode_tokens,
              "threads": threads, "kv_cache_mb": args.kv_cache_mb, "gguf": served_gguf(args, threads)}
    sides = {}
    try:
        kinds = [k for k in args.engines if k != "llamacpp"] + list(LLAMACPP_VARIANTS)
        for kind in kinds:  # one process per engine, built one after the other
            factory = FACTORIES.get(kind, "lamp_runtime.bench.llamacpp:"
                                    + ("LlamaCppSide" if kind.startswith("llamacpp") else "OtherEngineSide"))
            sides[kind] = EngineProcess(factory, shared | {"kind": kind}, name=kind)
        samples, context = _run(args, threads, sides)
    finally:
        for side in sides.values():
            side.close()
    _report(args, parser, threads, sides, samples, context)


def served_gguf(args, threads: int) -> str | None:
    """The GGUF path every side serves (None: the embedded one), requantized first if asked."""
    if args.requantize is None:
        return str(args.gguf) if args.gguf else None
    from lamp_runtime.llamacpp.backbone import gguf_path
    from lamp_runtime.llamacpp.requantize import requantized_gguf

    return str(requantized_gguf(gguf_path(BackboneOptions(args.gguf))[0], args.requantize, threads))


def side_for(variant, sides: dict):
    """The process that measures `variant`: a client count on its engine's; the other mixed-step
    mode and torch threads on their llama.cpp variants'; the rest on the served llama.cpp engine's."""
    part, name = variant[0], variant[1]
    if str(name).startswith(("bare-loop", "native-")):
        return sides["llamacpp-native-nofa" if "nofa" in name else "llamacpp-native"]
    if part == "clients":
        return sides[name]
    if part == "mixed" and name != sides["llamacpp"].info["mixed_steps"]:
        return sides["llamacpp-other-mixed"]
    if part == "torch" and name != 1:
        return sides["llamacpp-torch-many"]
    return sides["llamacpp"]


def _run(args, threads: int, sides: dict) -> tuple[dict, dict]:
    llama = sides["llamacpp"]
    gguf = Path(llama.info["gguf"])
    clients_max = max(args.clients)
    variants = [("decode", "engine"), ("decode", "bare-loop"), ("decode", "bare-loop-nofa"),
                ("decode", "llama-bench-repack"), ("decode", "llama-bench-norepack"),
                ("prefill", "p200"), ("prefill", "p2"), ("prefill", "cold-p200"), ("prefill", "native-p200"),
                ("prefill", "native-p2"), ("prefill", "native-nofa-p200"), ("prefill", "native-nofa-p2"),
                ("mixed", "embed"), ("mixed", "split"), ("torch", 1), ("torch", threads)]
    variants += [("clients", kind, clients) for kind in args.engines for clients in args.clients]
    if not args.llama_bench.is_file():
        variants = [v for v in variants if not str(v[1]).startswith("llama-bench")]
        print(f"no {args.llama_bench}: run `make llama-bench` for the llama-bench comparison")

    def measure(variant):
        if str(variant[1]).startswith("llama-bench"):
            return {"tokens_per_s": llama_bench_tg(args.llama_bench, gguf, threads, variant[1].endswith("-repack"),
                                                   args.decode_tokens)}
        return side_for(variant, sides).measure(variant)

    context = machine_context() | {"threads": threads, "llamacpp_settings": llama.info["settings"],
                                   "native_loop": sides["llamacpp-native"].info,
                                   "native_loop_nofa": sides["llamacpp-native-nofa"].info,
                                   "lscpu_model": lscpu_model(), "gguf": str(gguf), "clients_max": clients_max,
                                   "engines_in": "one process per engine (bench/engine_process.py)"}
    samples = interleaved(variants, measure, repeats=args.repeats, description="llamacpp bench")
    context["load_average_before"] = context.pop("load_average")
    context["load_average_after"] = load_average()
    return samples, context


def _report(args, parser, threads: int, sides: dict, samples: dict, context: dict) -> None:
    variants = list(samples)

    def med(variant, key):
        return summarize([s[key] for s in samples[variant]]).median

    def paired(a, b, key):
        return summarize([safe_ratio(x[key], y[key]) for x, y in zip(samples[a], samples[b])]).median

    ratios = {}
    if ("decode", "llama-bench-repack") in samples:
        best = max(("llama-bench-repack", "llama-bench-norepack"), key=lambda v: med(("decode", v), "tokens_per_s"))
        ratios["decode_b1_vs_llama_bench_best"] = paired(("decode", "engine"), ("decode", best), "tokens_per_s")
        ratios["llama_bench_best"] = best
        ratios["decode_b1_bare_loop_vs_llama_bench_best"] = paired(("decode", "bare-loop"), ("decode", best),
                                                                   "tokens_per_s")
    ratios["decode_b1_engine_vs_bare_loop"] = paired(("decode", "engine"), ("decode", "bare-loop"), "tokens_per_s")
    ratios["decode_b1_bare_loop_nofa_vs_fa"] = paired(("decode", "bare-loop-nofa"), ("decode", "bare-loop"),
                                                      "tokens_per_s")
    for clients in args.clients:
        for other in ("hf", "vllm"):
            if other in sides:
                ratios[f"clients{clients}_llamacpp_vs_{other}"] = paired(("clients", "llamacpp", clients),
                                                                         ("clients", other, clients), "tokens_per_s")
    ratios["warm_prefill_p200_vs_p2"] = paired(("prefill", "p200"), ("prefill", "p2"), "ms")
    ratios["native_prefill_p200_vs_p2"] = paired(("prefill", "native-p200"), ("prefill", "native-p2"), "ms")
    ratios["native_nofa_prefill_p200_vs_p2"] = paired(("prefill", "native-nofa-p200"), ("prefill", "native-nofa-p2"),
                                                      "ms")
    native = sides["llamacpp-native"].info
    extra_ms = med(("prefill", "native-p200"), "ms") - med(("prefill", "native-p2"), "ms")
    # the arithmetic rate of the input rows' attention over the 198 more cached positions
    ratios["native_prefill_extra_attention_gflops"] = (native["attention_flops_p200_minus_p2"] / (extra_ms * 1e6)
                                                       if extra_ms > 0 else float("inf"))
    ratios["cold_p200_vs_warm_p200"] = paired(("prefill", "cold-p200"), ("prefill", "p200"), "ms")
    ratios["mixed_embed_vs_split_tokens_per_s"] = paired(("mixed", "embed"), ("mixed", "split"), "tokens_per_s")
    ratios[f"torch_threads_1_vs_{threads}_tokens_per_s"] = paired(("torch", 1), ("torch", threads), "tokens_per_s")
    medians = {"/".join(map(str, v)): {k: med(v, k) for k in samples[v][0]} for v in variants}
    rss_growth = {kind: side.info["rss_growth"] for kind, side in sides.items() if "rss_growth" in side.info}
    for name, value in medians.items():
        print(f"{name:>32}: " + ", ".join(f"{k} {v:.1f}" for k, v in value.items()))
    for name, value in ratios.items():
        print(f"{name:>44}: {value if isinstance(value, str) else f'{value:.2f}x'}")
    print(f"RSS growth per engine (MB): { {k: round(v / 1e6) for k, v in rss_growth.items()} }; "
          f"load average {context['load_average_before']} -> {context['load_average_after']}")
    if args.out:
        write_json(args.out, {"command": full_command("python -m lamp_runtime.bench.llamacpp", parser, args), "out": args.out,
                       "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                       "context": context, "ratios": ratios, "medians": medians, "rss_growth_bytes": rss_growth,
                       "samples": {"/".join(map(str, v)): s for v, s in samples.items()}})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
