"""A decode step's time in llama.cpp's unified KV cache vs one KV stream per sequence.

    .venv/bin/python -m lamp_runtime.bench.llamacpp_kv_layout [--rows 1 16 64] [--context 100]
        [--repeats 3] [--out docs/bench/llamacpp-kv-layout.json]

The llama.cpp engine first kept every sequence in one unified KV cache (`kv_unified`), so that a
task's prompt keys/values could be shared into a request's sequence by seq_cp. In that layout a
decode row attends over every used cell of the cache (other sequences' cells masked out), so a
step's attention grows with rows x all cells; with one stream per sequence a row attends over its
own cells only. This measurement moved the engine to a stream per row (engine.py). This bench runs the embedded GGUF in both layouts, straight on llama.cpp: `rows`
sequences each prefilled with `context` tokens, then decode steps of one token per sequence,
interleaved round after round; the JSON has ms per step for each (rows, layout), the ratio, the
command, revision, machine and load.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from lamp_runtime.bench.report import full_command, write_json
from lamp_runtime.bench.stats import interleaved, safe_ratio, summarize
from lamp_runtime.machine import load_average, lscpu_model, machine_context


def step_ms(model, unified: bool, rows: int, context: int, steps: int, threads: int) -> float:
    from lamp_runtime.llamacpp.native import Batch, lib, new_context

    # A stream of 512 cells per sequence when not unified; flash attention on, as the engine runs.
    ctx = new_context(model, n_ctx=8192 if unified else 512 * rows, n_batch=2048, n_ubatch=512, n_seq_max=rows,
                      threads=threads, unified=unified)
    try:
        batch = Batch(max(context, rows), 0)
        for seq in range(rows):
            batch.clear()
            rows_of = batch.add(context, seq, 0, "last")
            batch.tokens[rows_of] = np.arange(context) % 1000 + 100
            batch.decode(ctx)
        started = time.perf_counter()
        for step in range(steps):
            batch.clear()
            for seq in range(rows):
                batch.tokens[batch.add(1, seq, context + step, "last")] = 42
            batch.decode(ctx)
        return (time.perf_counter() - started) / steps * 1000
    finally:
        lib().llama_free(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=100, help="tokens in each sequence before the decode steps")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="ggml threads (default: the cores)")
    parser.add_argument("--out", help="write the samples and ratios as JSON here")
    args = parser.parse_args()
    from lamp_runtime.backbone.options import BackboneOptions
    from lamp_runtime.llamacpp.backbone import gguf_path
    from lamp_runtime.llamacpp.native import KernelSettings, load_model

    threads = args.threads or len(os.sched_getaffinity(0))
    gguf = gguf_path(BackboneOptions())[0]
    model = load_model(str(gguf), KernelSettings(weight_repack=False))
    variants = [(rows, layout) for rows in args.rows for layout in ("unified", "streams")]
    context = machine_context() | {"threads": threads, "lscpu_model": lscpu_model(), "gguf": str(gguf)}
    samples = interleaved(variants, lambda v: {"ms_per_step": step_ms(model, v[1] == "unified", v[0], args.context,
                                                                      args.steps, threads)},
                          repeats=args.repeats, description="KV layout")
    context["load_average_before"] = context.pop("load_average")
    context["load_average_after"] = load_average()
    medians = {f"{r}/{layout}": summarize([s["ms_per_step"] for s in samples[(r, layout)]]).median
               for r, layout in variants}
    ratios = {f"rows{r}_unified_vs_streams": summarize(
        [safe_ratio(a["ms_per_step"], b["ms_per_step"]) for a, b in zip(samples[(r, "unified")],
                                                                        samples[(r, "streams")])]).median
        for r in args.rows}
    for name, value in medians.items():
        print(f"{name:>16}: {value:.1f} ms per step")
    for name, value in ratios.items():
        print(f"{name:>28}: {value:.2f}x")
    if args.out:
        write_json(args.out, {"command": full_command("python -m lamp_runtime.bench.llamacpp_kv_layout", parser, args),
                       "out": args.out, "settings": vars(args), "context": context, "medians_ms_per_step": medians,
                       "ratios": ratios, "samples": {f"{r}/{layout}": s for (r, layout), s in samples.items()}})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
