"""The llama.cpp engine's thread choice on an idle and on a busy host.

    .venv/bin/python -m lamp_runtime.bench.llamacpp_threads [--neighbours 0 1 2] [--repeats 3]
        [--out docs/bench/llamacpp-threads.json]

ggml's threads meet at spin barriers after every operation, so a decode with as many threads as
cores slows down sharply when something else wants a core (llamacpp/threads.py). This bench makes
the host busy on purpose: for each --neighbours count, that many processes spin on a core each
while the variant runs. Variants, interleaved round after round in a shuffled order:
- the engine with adaptive threads (the default) and with the cores' count fixed: decode tok/s of
  one request and of 8 concurrent requests (StepLoopEngine, as served);
- llama-bench's decode (tg) on the same GGUF with the cores' count and with one thread (when
  `make llama-bench` built it).
Each engine runs in a process of its own (bench/engine_process.py), as a replica holds one: two
engine loop threads in one process each keep an OpenMP pool of ggml's threads, and with more
pooled threads than cores libgomp stops spinning between parallel regions, which crippled the
fixed engine's two threads on an idle host (70 vs 189 tok/s for llama-bench, revision a835c4e).
The JSON has the command (every flag), revision, CPU model, load averages, every sample, the
ratios adaptive / fixed per neighbour count, and the thread count the adaptive engine ended on.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import torch

from lamp_runtime.bench.engine_process import EngineProcess
from lamp_runtime.bench.engines import closed_loop
from lamp_runtime.bench.llamacpp import LLAMA_BENCH, llama_bench_tg
from lamp_runtime.bench.report import full_command, write_json
from lamp_runtime.bench.stats import interleaved, safe_ratio, summarize
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.engine.step_loop import StepLoopEngine
from lamp_runtime.llamacpp.engine import build_llamacpp_engine
from lamp_runtime.llamacpp.options import LlamaCppOptions
from lamp_runtime.machine import load_average, lscpu_model, machine_context
from lamp_runtime.requests import GenerationRequest, SamplingParams


def _spin(stop) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


class Neighbours:
    """`count` processes spinning on the CPU while the block runs (a busy host, on purpose)."""

    def __init__(self, count: int):
        self.count = count
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._processes = []

    def __enter__(self):
        self._processes = [self._context.Process(target=_spin, args=(self._stop,), daemon=True)
                           for _ in range(self.count)]
        for process in self._processes:
            process.start()
        time.sleep(0.2 if self.count else 0)  # let them reach the CPU
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for process in self._processes:
            process.join(5)
            if process.is_alive():
                process.kill()
        self._stop.clear()


def decode_rate(engine, clients: int, tokens: int) -> float:
    """Tokens per second of `clients` concurrent requests of `tokens` new tokens each."""
    requests = [GenerationRequest(f"Once upon a time {i}", None, SamplingParams(max_new_tokens=tokens, ignore_eos=True))
                for i in range(clients)]
    return closed_loop(engine, requests, clients)["tokens_per_s"]


class PolicySide:
    """The engine with one thread policy (settings["policy"]: "adaptive" or "fixed"), in its process."""

    def __init__(self, settings: dict):
        torch.set_num_threads(1)
        config = EngineConfig(max_batch_size=16, max_new_tokens=settings["tokens"], threads=settings["threads"])
        options = LlamaCppOptions(row_cells=256, adaptive_threads=settings["policy"] == "adaptive")
        self.core = build_llamacpp_engine(None, config, options)
        self.engine = StepLoopEngine(self.core)
        self.tokens = settings["tokens"]

    def info(self) -> dict:
        return {"gguf": str(self.core.backbone.path), "settings": self.core.settings}

    def measure(self, variant) -> dict:
        if variant == "chooser":
            chooser = self.core.thread_chooser
            return {"threads": chooser.current, "switches": chooser.switches, "step_seconds": chooser.seconds()}
        return {"tokens_per_s": decode_rate(self.engine, variant, self.tokens)}

    def close(self) -> None:
        self.engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbours", type=int, nargs="+", default=[0, 1, 2],
                        help="processes spinning on a core each while a variant runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--threads", type=int, default=None, help="the cores' count (default: this process's cores)")
    parser.add_argument("--llama-bench", type=Path, default=LLAMA_BENCH, help=f"llama-bench binary (default {LLAMA_BENCH})")
    parser.add_argument("--out", help="write settings, samples and ratios as JSON here")
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    engines = {}
    try:
        for policy in ("adaptive", "fixed"):
            engines[policy] = EngineProcess("lamp_runtime.bench.llamacpp_threads:PolicySide",
                                            {"policy": policy, "tokens": args.tokens, "threads": threads}, name=policy)
        samples, context, chooser = _run(args, threads, engines)
    finally:
        for engine in engines.values():
            engine.close()
    _report(args, parser, samples, context, chooser)


def _run(args, threads: int, engines: dict) -> tuple[dict, dict, dict]:
    gguf = Path(engines["adaptive"].info["gguf"])
    runs = [("engine", policy, clients) for policy in engines for clients in (1, 8)]
    if args.llama_bench.is_file():
        runs += [("llama-bench", f"t{t}", 1) for t in dict.fromkeys((threads, 1))]
    variants = [(n, *run) for n in args.neighbours for run in runs]

    def measure(variant):
        neighbours, kind, name, clients = variant
        with Neighbours(neighbours):
            if kind == "llama-bench":
                return {"tokens_per_s": llama_bench_tg(args.llama_bench, gguf, int(name[1:]), True, args.tokens)}
            return engines[name].measure(clients)

    context = machine_context() | {"threads": threads, "lscpu_model": lscpu_model(), "gguf": str(gguf),
                                   "llamacpp_settings": engines["fixed"].info["settings"],
                                   "engines_in": "one process per engine (bench/engine_process.py)"}
    samples = interleaved(variants, measure, repeats=args.repeats, description="llama.cpp threads")
    context["load_average_before"] = context.pop("load_average")
    context["load_average_after"] = load_average()
    return samples, context, engines["adaptive"].measure("chooser")


def _report(args, parser, samples: dict, context: dict, chooser: dict) -> None:
    variants = list(samples)
    medians = {"/".join(map(str, v)): summarize([s["tokens_per_s"] for s in samples[v]]).median for v in variants}
    ratios = {f"neighbours{n}_clients{c}_adaptive_vs_fixed": summarize(
        [safe_ratio(a["tokens_per_s"], b["tokens_per_s"]) for a, b in
         zip(samples[(n, "engine", "adaptive", c)], samples[(n, "engine", "fixed", c)])]).median
        for n in args.neighbours for c in (1, 8)}
    for name, value in medians.items():
        print(f"{name:>36}: {value:.1f} tok/s")
    for name, value in ratios.items():
        print(f"{name:>44}: {value:.2f}x")
    print(f"adaptive engine ended on {chooser['threads']} threads after {chooser['switches']} switches; "
          f"load average {context['load_average_before']} -> {context['load_average_after']}")
    if args.out:
        write_json(args.out, {"command": full_command("python -m lamp_runtime.bench.llamacpp_threads", parser, args),
                       "out": args.out, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                       "context": context, "medians_tokens_per_s": medians, "ratios": ratios,
                       "adaptive_end": chooser,
                       "samples": {"/".join(map(str, v)): s for v, s in samples.items()}})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
