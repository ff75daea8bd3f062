"""HF engine vs vLLM engine: throughput and latency at 1, 4 and 16 concurrent mixed-task clients.

    .venv/bin/python -m lamp_runtime.bench.engines [--clients 1 4 16] [--repeats 3] [--new-tokens 32]
        [--kv-cache-mb 512] [--out results.json]

Both engines run in this one process over the same backbone options and the same adapters (four
synthetic tasks: LAMP p=2, LAMP p=4, plain soft prompt, EPT; plus requests with no task), so
every client mixes tasks. Each measurement is a closed loop: `clients` concurrent clients each
send their next request as soon as the previous one finished, `max(8, 2 x clients)` requests in
all, through the same async adapter the server uses (lamp_runtime/engine/streams.py). Requests ignore EOS
and generate exactly --new-tokens tokens, so both engines do the same work.

Every (engine, clients) pair is measured once per round, in a fresh shuffled order each round,
after one untimed warm-up round (lamp_runtime/bench/stats.py): noise from other work on a shared
machine hits both engines alike. Medians over rounds are printed, and the vLLM / HF ratios are
taken within each round, then their median reported. An idle vLLM engine sleeps (~0 % CPU), so
it does not slow the HF measurements down, nor the other way round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from lamp_runtime.adapters import AdapterMeta, EptAdapter, SoftPromptAdapter
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.bench.report import full_command
from lamp_runtime.bench.stats import interleaved, safe_ratio, summarize
from lamp_runtime.bench.workload import lamp_from_prompt, load_average, machine_context, task_inputs, vocabulary_prompt
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.engine.streams import complete
from lamp_runtime.engines import build_engine
from lamp_runtime.requests import GenerationRequest, SamplingParams

ENGINES = ("hf", "vllm")
TASKS = ("sentiment", "topic", "extract", "support_triage")
PROMPT_TOKENS = 64  # soft prompt length l before pooling
METRICS = ("tokens_per_s", "requests_per_s", "latency_p50_ms", "latency_p95_ms", "ttft_p50_ms")


def bench_adapters(embedding_weight: torch.Tensor) -> dict:
    """One adapter per synthetic task, of every kind; untrained (timing depends only on shapes)."""
    g = torch.Generator().manual_seed(5)
    hidden = embedding_weight.shape[1]
    return {
        "sentiment": lamp_from_prompt(vocabulary_prompt(embedding_weight, PROMPT_TOKENS, seed=1), rank=16, pool=2),
        "topic": lamp_from_prompt(vocabulary_prompt(embedding_weight, PROMPT_TOKENS, seed=2), rank=16, pool=4),
        "extract": SoftPromptAdapter(AdapterMeta(), vocabulary_prompt(embedding_weight, PROMPT_TOKENS // 2, seed=3)),
        "support_triage": EptAdapter(AdapterMeta(), vocabulary_prompt(embedding_weight, PROMPT_TOKENS // 4, seed=4),
                                     torch.randn(16, 4, generator=g) * 0.05, torch.randn(4, hidden, generator=g) * 0.05),
    }


def mixed_requests(count: int, new_tokens: int) -> list[GenerationRequest]:
    """`count` requests cycling through the four tasks and no task, over the tasks' own inputs."""
    inputs = {task: task_inputs(task, count, seed=7) for task in TASKS}
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    kinds = (*TASKS, None)
    requests = []
    for i in range(count):
        task = kinds[i % len(kinds)]
        text = inputs[task or TASKS[i % len(TASKS)]][i]
        requests.append(GenerationRequest(text, task, params))
    return requests


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def closed_loop(engine, requests: list[GenerationRequest], clients: int) -> dict:
    """Run `requests` with `clients` concurrent clients; return throughput and latency figures."""
    pending = list(reversed(requests))

    async def client(results):
        while pending:
            results.append(await complete(engine, pending.pop()))

    async def main():
        results = []
        started = time.perf_counter()
        await asyncio.gather(*(client(results) for _ in range(clients)))
        return results, time.perf_counter() - started

    results, seconds = asyncio.run(main())
    totals = [r.total_ms for r in results]
    return {
        "tokens_per_s": sum(r.completion_tokens for r in results) / seconds,
        "requests_per_s": len(results) / seconds,
        "latency_p50_ms": percentile(totals, 50),
        "latency_p95_ms": percentile(totals, 95),
        "ttft_p50_ms": percentile([r.ttft_ms for r in results], 50),
    }


def main() -> None:
    from lamp_runtime.vllm.engine import VllmOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="vLLM KV cache (host memory on CPU)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--vllm-block-size", type=int, default=None,
                        help="vLLM KV block tokens (default: the smallest the backend takes; vLLM's own CPU default is 128)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--hf-dtype", help="the HF engine's dtype, if other than --dtype (e.g. bfloat16 for int4)")
    parser.add_argument("--hf-quantization", help="the HF engine's quantization, if other than --quantization "
                                                  "(e.g. int4, which vLLM does not take)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads of this process, i.e. of the HF engine (default: torch's, = cores); "
                             "vLLM's worker process binds its own (VLLM_CPU_OMP_THREADS_BIND)")
    parser.add_argument("--out", help="write settings, samples and summaries as JSON here")
    args = parser.parse_args()
    threads = args.torch_threads or torch.get_num_threads()
    # As lamp serve does: load on one thread, so that the HF engine's loop thread is the only one
    # with an OpenMP pool of several threads (lamp_runtime/engine/step_loop.py says why).
    torch.set_num_threads(1)

    options = BackboneOptions(dtype=args.dtype, quantization=args.quantization, device=args.device)
    hf_options = BackboneOptions(dtype=args.hf_dtype or args.dtype, quantization=args.hf_quantization or args.quantization,
                                 device=args.device)
    config = EngineConfig(max_batch_size=args.max_batch_size, max_input_tokens=1024, max_new_tokens=args.new_tokens,
                          threads=threads, max_waiting=1024)
    engines = {
        "hf": build_engine("hf", hf_options, config),
        "vllm": build_engine("vllm", options, config,
                             VllmOptions(kv_cache_mb=args.kv_cache_mb, max_model_len=args.max_model_len,
                                         block_size=args.vllm_block_size)),
    }
    adapters = bench_adapters(engines["hf"].backbone.model.get_input_embeddings().weight)
    for engine in engines.values():
        for task, adapter in adapters.items():
            engine.registry.register(task, adapter)
    context = machine_context(engines["hf"].backbone) | {"hf_engine_threads": threads}
    variants = [(kind, clients) for clients in args.clients for kind in ENGINES]

    def measure(variant):
        kind, clients = variant
        return closed_loop(engines[kind], mixed_requests(max(8, 2 * clients), args.new_tokens), clients)

    samples = interleaved_then_shut_down(variants, measure, args.repeats, "hf vs vllm", engines.values(), context)
    vllm = engines["vllm"]
    prefix = {"block_size": vllm.engine_args().block_size, "prompt_tokens_looked_up": vllm.prefix_cache_queries,
              "prompt_tokens_reused": vllm.prefix_cache_hits,
              "reused_share": safe_ratio(vllm.prefix_cache_hits, vllm.prefix_cache_queries)}

    print(f"\n{args.new_tokens} new tokens per request, medians of {args.repeats} interleaved rounds "
          f"(max batch {args.max_batch_size}, HF {hf_options.dtype}/{hf_options.quantization}, vLLM "
          f"{options.dtype}/{options.quantization}, {options.device}, HF torch threads "
          f"{threads}); load average before "
          f"{context['load_average_before']}, after {context['load_average_after']}")
    print(f"vLLM prefix cache, block {prefix['block_size']}: {prefix['prompt_tokens_reused']} of "
          f"{prefix['prompt_tokens_looked_up']} prompt tokens reused ({prefix['reused_share']:.0%})")
    print(f"{'clients':>7} {'engine':>6} {'tok/s':>8} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'ttft p50':>9}")
    summaries = {}
    for clients in args.clients:
        for kind in ENGINES:
            s = {m: summarize([x[m] for x in samples[(kind, clients)]]) for m in METRICS}
            summaries[f"{kind}/{clients}"] = {m: v.as_dict() for m, v in s.items()}
            print(f"{clients:>7} {kind:>6} {s['tokens_per_s'].median:>8.1f} {s['requests_per_s'].median:>7.2f} "
                  f"{s['latency_p50_ms'].median:>8.0f} {s['latency_p95_ms'].median:>8.0f} {s['ttft_p50_ms'].median:>9.0f}")
        ratios = {m: summarize([safe_ratio(v[m], h[m]) for v, h in zip(samples[("vllm", clients)],
                                                                        samples[("hf", clients)])])
                  for m in METRICS}
        summaries[f"ratio/{clients}"] = {m: v.as_dict() for m, v in ratios.items()}
        print(f"{clients:>7} {'v/hf':>6} {ratios['tokens_per_s'].median:>7.2f}x {ratios['requests_per_s'].median:>6.2f}x "
              f"{ratios['latency_p50_ms'].median:>7.2f}x {ratios['latency_p95_ms'].median:>7.2f}x "
              f"{ratios['ttft_p50_ms'].median:>8.2f}x")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"command": full_command("python -m lamp_runtime.bench.engines", parser, args), "out": args.out,
                       "settings": vars(args), "context": context, "summaries": summaries, "vllm_prefix_cache": prefix,
                       "samples": {f"{k}/{c}": v for (k, c), v in samples.items()}}, handle, indent=2)
        print(f"wrote {args.out}")


def interleaved_then_shut_down(variants, measure, repeats: int, description: str, engines, context: dict) -> dict:
    """`interleaved` rounds of `measure` over `variants`, then every engine shut down whatever
    happened; the context's load average becomes the load before and after the rounds."""
    try:
        samples = interleaved(variants, measure, repeats=repeats, description=description)
    finally:
        for engine in engines:
            engine.shutdown()
    context["load_average_before"] = context.pop("load_average")
    context["load_average_after"] = load_average()
    return samples


if __name__ == "__main__":
    main()
