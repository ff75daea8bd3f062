"""Why a serving process must run multi-threaded torch work on one thread only.

    .venv/bin/python -m lamp_runtime.bench.threads [--threads 2] [--out docs/bench/threads.json]

Times one int4 product (SmolLM2's gate/up shape, batch 1) in a fresh worker thread, first while
no other thread of the process has used several torch threads, then after the main thread has
(as a replica that loads its backbone with them does). torch's OpenMP runtime (libgomp) keeps one
worker pool per thread that runs multi-threaded work; once the pools together hold more threads
than the machine has cores it stops spin-waiting between operations, and every operation pays a
wake-up. Then it decodes with the int4 engine through its loop thread both ways: loaded on the
engine's threads (the old replica) and loaded on one thread (the replica now).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

import torch

from ..backbone.int4 import GROUP
from ..backbone.options import BackboneOptions
from ..engine.base import EngineConfig
from ..engine.streams import complete
from ..engines import build_engine
from ..requests import GenerationRequest, SamplingParams
from .report import full_command, write_json
from .workload import machine_context

PRODUCTS = 2000


def product_us(threads: int) -> float:
    """Microseconds per int4 product [1, 576] x [3072, 576], run in a new thread with `threads`."""
    q = torch.randint(0, 16, (3072, 576), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales = torch.rand(576 // GROUP, 3072, 2).to(torch.bfloat16)
    x = torch.rand(1, 576).to(torch.bfloat16)
    result = []

    def work():
        torch.set_num_threads(threads)
        for _ in range(100):
            torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales)
        started = time.perf_counter()
        for _ in range(PRODUCTS):
            torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales)
        result.append((time.perf_counter() - started) / PRODUCTS * 1e6)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return result[0]


def served_ms_per_token(threads: int, load_threads: int, tokens: int = 64) -> float:
    """int4 decode through the HF engine's loop thread, the backbone loaded with `load_threads`."""
    torch.set_num_threads(load_threads)
    engine = build_engine("hf", BackboneOptions(quantization="int4", device="cpu"),
                          EngineConfig(threads=threads, batch_wait_ms=0))
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)

    async def decode() -> list[float]:
        return [(await complete(engine, GenerationRequest("Once upon a time", None, params))).decode_ms / (tokens - 1)
                for _ in range(3)]

    try:
        return statistics.median(asyncio.run(decode()))
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main thread starts without a pool of several threads
    report = {"bench": "threads", "command": full_command("python -m lamp_runtime.bench.threads", parser, args),
              "out": args.out,
              "context": machine_context(), "threads": args.threads}
    report["product_us_alone"] = product_us(args.threads)
    report["served_ms_per_token_loaded_on_one_thread"] = served_ms_per_token(args.threads, 1)
    torch.set_num_threads(args.threads)
    torch.ones(1 << 20).sum()  # the main thread now runs multi-threaded work too (a loading replica did)
    report["product_us_after_main_used_threads"] = product_us(args.threads)
    report["served_ms_per_token_loaded_on_engine_threads"] = served_ms_per_token(args.threads, args.threads)
    for key, value in report.items():
        if isinstance(value, float):
            print(f"{key}: {value:.1f}")
    if args.out:
        print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
