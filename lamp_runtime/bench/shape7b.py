"""The mission's size without its weights: a Llama-2-7B-shaped backbone with random weights
(backbone/random_shape.py) served by the int4 engine on the CPU, and a T5-base-shaped one.

    python -m lamp_runtime.bench.shape7b [--gguf PATH] [--new-tokens 4] [--repeats 2] [--out FILE]
    python -m lamp_runtime.bench.shape7b --engines llamacpp --out docs/bench/shape7b-llamacpp.json

Random weights: every number here is a cost (bytes, seconds), never a quality; the JSON and the
printout say `random_weights: true`. Measured on each of `--engines`: the HF int4 engine (the
JSON's top level) and the llama.cpp engine on the very same GGUF (its `llamacpp` key; a KV stream
of `--llamacpp-row-cells` cells, f16, per batch row):

- backbone bytes: the GGUF file, and the int4 model's weights in memory;
- KV bytes per position: computed at fp16 (what Llama-2-7B's 0.5 MB is quoted at) and as the
  engine holds it;
- prompt-KV bytes per task for an l = 100 LAMP adapter pooled at p = 1 / 4 / 10: computed, and as
  the engine's prompt-KV cache reports after serving it;
- decode tok/s at batch 1 and 8 (`--new-tokens` decode steps after the prefill);
- the prefill of one request behind a 100-token soft prompt at p = 1 and p = 10, cold (its
  prompt KV computed) against warm (reused from the prompt-KV cache), interleaved;
- T5-base's shape (random, 12 + 12 layers, d_model 768): encoder time with the soft prompt
  unpooled (100 positions) against pooled (p = 10): T5 cannot cache prompt keys/values, so
  pooling is its whole saving.

The 7B GGUF (4.2 GB) is written once to $LAMP_CACHE_DIR/random (never into the repository).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from ..adapters import LampAdapter
from ..backbone.hf import kv_bytes_per_token, load_backbone
from ..backbone.options import BackboneOptions
from ..backbone.random_shape import SHAPES, default_path, write_random_gguf
from ..engine.base import EngineConfig
from ..hf.engine import engine_for
from ..prompts.math import pooled_length
from ..requests import GenerationRequest, SamplingParams
from .report import full_command, write_json
from .workload import lamp_from_prompt, load_average, machine_context

PROMPT_LENGTH = 100
POOLS = (1, 4, 10)
PREFILL_POOLS = (1, 10)
RANK = 16
DECODE_BATCHES = (1, 8)
INPUT = "Classify the support ticket: my invoice shows a charge twice this month."
# The T5 measured next to each decoder shape: T5-base's with the 7B, a small one for smoke runs.
T5_SHAPES = {
    "llama-2-7b": ("t5-base", dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12,
                                   num_decoder_layers=12, vocab_size=32128)),
    "tiny": ("t5-tiny", dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
                             vocab_size=32128)),
}
T5_INPUT_TOKENS = 24
PROMPT_KV_CACHE_BYTES = 2 * 1024**3
ENGINES = ("hf", "llamacpp")


def random_lamp(hidden: int, pool: int, seed: int) -> LampAdapter:
    """An l = 100 LAMP adapter of embedding-like scale (its values do not change a cost)."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randn(PROMPT_LENGTH, hidden, generator=generator) * hidden**-0.5
    return lamp_from_prompt(prompt, RANK, pool)


def step_seconds(engine) -> float:
    started = time.perf_counter()
    engine.step()
    return time.perf_counter() - started


def decode_tokens_per_second(engine, batch: int, new_tokens: int) -> dict:
    """`batch` requests without a soft prompt prefilled in one step, then `new_tokens` decode steps timed."""
    params = SamplingParams(max_new_tokens=new_tokens + 1, ignore_eos=True)
    for i in range(batch):
        engine.submit(GenerationRequest(f"{INPUT} ({i})", None, params))
    prefill = step_seconds(engine)
    steps = [step_seconds(engine) for _ in range(new_tokens)]
    if engine.has_work():
        raise RuntimeError("the decode requests should have finished")
    return {"batch": batch, "prefill_s": prefill, "step_seconds": steps,
            "tokens_per_s": batch * new_tokens / sum(steps)}


def prefill_seconds(engine, task: str) -> tuple[float, object]:
    engine.submit(GenerationRequest(INPUT, task, SamplingParams(max_new_tokens=1)))
    seconds = step_seconds(engine)
    if engine.has_work():
        raise RuntimeError("a max_new_tokens=1 request should finish in its prefill step")
    return seconds, engine.last_step


def prefill_cold_vs_warm(engine, hidden: int, repeats: int) -> list[dict]:
    """Cold: a task version never served (prompt built, its KV computed); warm: the same again."""
    rows = []
    for round_ in range(repeats):
        for pool in PREFILL_POOLS:
            task = f"shape7b-p{pool}-r{round_}"
            engine.registry.register(task, random_lamp(hidden, pool, seed=round_))
            cold, cold_stats = prefill_seconds(engine, task)
            warm, warm_stats = prefill_seconds(engine, task)
            rows.append({"pool": pool, "round": round_, "soft_prompt_tokens": pooled_length(PROMPT_LENGTH, pool),
                         "cold_s": cold, "warm_s": warm, "cold_positions": cold_stats.prefill_tokens,
                         "warm_positions": warm_stats.prefill_tokens,
                         "warm_prompt_kv_hits": warm_stats.prompt_kv_hits})
            print(f"  prefill p={pool:>2} round {round_}: cold {cold:6.2f} s ({cold_stats.prefill_tokens} positions), "
                  f"warm {warm:6.2f} s ({warm_stats.prefill_tokens} positions)", flush=True)
    return rows


def prompt_kv_bytes(engine, hidden: int, fp16_per_position: int) -> list[dict]:
    """Per task at each pool: computed, and what the engine's prompt-KV cache holds after one request."""
    rows = []
    for pool in POOLS:
        task = f"shape7b-kv-p{pool}"
        engine.registry.register(task, random_lamp(hidden, pool, seed=100 + pool))
        before = engine.prompt_kv_stats().bytes
        prefill_seconds(engine, task)
        tokens = pooled_length(PROMPT_LENGTH, pool)
        rows.append({"pool": pool, "prompt_tokens": tokens, "fp16_bytes": tokens * fp16_per_position,
                     "engine_bytes_computed": tokens * engine.kv_bytes_per_token,
                     "engine_bytes_reported": engine.prompt_kv_stats().bytes - before})
    return rows


def summarize_prefill(rows: list[dict]) -> dict:
    out = {}
    for pool in PREFILL_POOLS:
        mine = [r for r in rows if r["pool"] == pool]
        cold, warm = statistics.median(r["cold_s"] for r in mine), statistics.median(r["warm_s"] for r in mine)
        out[f"p{pool}"] = {"cold_s_median": cold, "warm_s_median": warm, "cold_over_warm": cold / warm}
    return out


def t5_encoder(shape: str, repeats: int, seed: int) -> dict:
    """Encoder forward of a T5-shaped random model: the soft prompt unpooled vs pooled at p = 10."""
    from transformers import T5Config, T5ForConditionalGeneration

    t5_name, dims = T5_SHAPES[shape]
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**dims)).eval()
    encoder = model.get_encoder()
    inputs = encoder.get_input_embeddings()(torch.randint(0, dims["vocab_size"], (1, T5_INPUT_TOKENS)))
    lengths = {"unpooled": PROMPT_LENGTH, "pooled_p10": pooled_length(PROMPT_LENGTH, 10)}
    seconds = {name: [] for name in lengths}
    with torch.no_grad():
        embeds = {name: torch.cat([torch.randn(1, n, dims["d_model"]), inputs], 1) for name, n in lengths.items()}
        for embed in embeds.values():  # warm-up
            encoder(inputs_embeds=embed)
        for round_ in range(repeats):
            for name in (lengths if round_ % 2 == 0 else reversed(list(lengths))):
                started = time.perf_counter()
                encoder(inputs_embeds=embeds[name])
                seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    return {"shape": t5_name, "config": dims, "random_weights": True,
            "parameters": sum(p.numel() for p in model.parameters()),
            "input_tokens": T5_INPUT_TOKENS, "soft_prompt_tokens": lengths, "seconds": seconds,
            "median_s": medians, "unpooled_over_pooled": medians["unpooled"] / medians["pooled_p10"]}


def fp16_kv_bytes_per_position(shape: str) -> int:
    """Keys and values of one position over all layers at fp16, from the shape's dimensions."""
    dims = SHAPES[shape]
    return 2 * dims.layers * dims.kv_heads * dims.head_dim * 2


def engine_rows(engine, hidden: int, fp16: int, args) -> dict:
    """Prompt-KV bytes per task, decode tok/s, cold vs warm prefill: on any engine's step core."""
    kv_rows = prompt_kv_bytes(engine, hidden, fp16)
    for row in kv_rows:
        print(f"  prompt KV per task, l={PROMPT_LENGTH} p={row['pool']:>2}: {row['prompt_tokens']:>3} positions, "
              f"{row['fp16_bytes'] / 1e6:6.1f} MB fp16, "
              f"{row['engine_bytes_reported'] / 1e6:6.1f} MB held by the engine",
              flush=True)
    decode = []
    for batch in DECODE_BATCHES:
        decode.append(decode_tokens_per_second(engine, batch, args.new_tokens))
        print(f"  decode batch {batch}: {decode[-1]['tokens_per_s']:.2f} tok/s", flush=True)
    prefill = prefill_cold_vs_warm(engine, hidden, args.repeats)
    prefill_summary = summarize_prefill(prefill)
    for name, row in prefill_summary.items():
        print(f"  prefill {name}: cold {row['cold_s_median']:.2f} s, warm {row['warm_s_median']:.2f} s, "
              f"cold / warm {row['cold_over_warm']:.1f}x", flush=True)
    return {"kv_bytes_per_position": {"fp16_computed": fp16, "engine": engine.kv_bytes_per_token},
            "prompt_kv_per_task": kv_rows, "decode": decode, "new_tokens": args.new_tokens,
            "prefill_cold_vs_warm": prefill, "prefill_summary": prefill_summary}


def llamacpp_rows(gguf: Path, args) -> dict:
    """The llama.cpp engine's step core on the very same GGUF (no HTTP, no loop thread: the
    measurements call its step() like the HF engine's)."""
    from ..llamacpp.engine import build_llamacpp_engine
    from ..llamacpp.options import LlamaCppOptions

    print(f"llama.cpp engine, {args.llamacpp_row_cells} KV cells per row", flush=True)
    engine = build_llamacpp_engine(
        BackboneOptions(path=str(gguf), device="cpu"),
        EngineConfig(max_batch_size=max(DECODE_BATCHES), prompt_kv_cache_bytes=PROMPT_KV_CACHE_BYTES,
                     threads=args.threads),
        LlamaCppOptions(row_cells=args.llamacpp_row_cells, requantize=args.llamacpp_requantize))
    try:
        engine.on_loop_start()
        backbone = engine.backbone
        print(f"  loaded in {backbone.load_seconds:.0f} s, settings {engine.settings}", flush=True)
        rows = engine_rows(engine, backbone.hidden_size, fp16_kv_bytes_per_position(args.shape), args)
        return {"name": backbone.name, "row_cells": args.llamacpp_row_cells, "settings": engine.settings,
                "weights_bytes": backbone.weights_bytes, "load_seconds": backbone.load_seconds, **rows}
    finally:
        engine.close()
        engine.backbone.close()


def hf_rows(gguf: Path, args) -> tuple[dict, dict]:
    """The HF int4 engine: the report's top-level keys, and the machine context of its backbone."""
    backbone = load_backbone(BackboneOptions(path=str(gguf), quantization="int4", device="cpu"))
    if not backbone.random_weights:
        raise SystemExit(f"{gguf} is not a random-weight GGUF: this bench measures only those")
    # Room for every task this bench serves: a cold/warm pair must not be split by an eviction.
    engine = engine_for(backbone, config=EngineConfig(max_batch_size=max(DECODE_BATCHES),
                                                      prompt_kv_cache_bytes=PROMPT_KV_CACHE_BYTES))
    fp16 = kv_bytes_per_token(backbone.config, torch.float16)
    print(f"backbone {backbone.name}: file {gguf.stat().st_size / 1e9:.2f} GB, int4 weights in memory "
          f"{backbone.weights_bytes / 1e9:.2f} GB, loaded in {backbone.load_seconds:.0f} s", flush=True)
    print(f"KV per position: {fp16 / 2**20:.2f} MiB at fp16; the engine holds {engine.kv_bytes_per_token / 2**20:.2f} "
          f"MiB ({engine.kv.dtype})", flush=True)
    rows = engine_rows(engine, backbone.hidden_size, fp16, args)
    return ({"backbone": {"shape": args.shape, "name": backbone.name, "random_weights": backbone.random_weights,
                          "gguf_bytes": gguf.stat().st_size, "int4_weights_bytes": backbone.weights_bytes,
                          "load_seconds": backbone.load_seconds}, **rows},
            machine_context(backbone))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(T5_SHAPES),
                        help="the decoder's shape (tiny: a smoke run of every step in seconds)")
    parser.add_argument("--gguf", default=None, help="the 7B-shaped random GGUF (default: written once to the cache)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                        help="engines measured (llamacpp needs llama-cpp-python)")
    parser.add_argument("--llamacpp-row-cells", type=int, default=256,
                        help="the llama.cpp engine's KV cells per batch row (a 7B holds 0.5 MiB per cell)")
    parser.add_argument("--llamacpp-requantize", metavar="TYPE", default=None,
                        help="the llama.cpp engine serves the GGUF requantized to TYPE (llamacpp/requantize.py)")
    parser.add_argument("--t5", choices=("on", "off"), default="on", help="the T5-shaped encoder measurement")
    parser.add_argument("--new-tokens", type=int, default=4, help="decode steps timed per batch size")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the interleaved cold/warm prefills")
    parser.add_argument("--t5-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 on a shared host (docs/benchmarks.md, "
                             "thread contention); the llama.cpp engine's ggml threads (default: the cores)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or args.repeats < 1 or args.t5_repeats < 1 or (args.threads or 1) < 1 \
            or args.llamacpp_row_cells < 16:
        parser.error("--new-tokens, --repeats, --t5-repeats and --threads must be >= 1, --llamacpp-row-cells >= 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = full_command("python -m lamp_runtime.bench.shape7b", parser, args)
    print(f"RANDOM WEIGHTS: {args.shape}'s and {T5_SHAPES[args.shape][0]}'s shapes, benchmarks of cost only",
          flush=True)

    gguf = Path(args.gguf) if args.gguf else default_path(args.shape, args.seed)
    if not gguf.is_file():
        write_random_gguf(gguf, args.shape, args.seed)
    load_before = load_average()
    report, context = {}, None
    if "hf" in args.engines:
        report, context = hf_rows(gguf, args)
    llamacpp = llamacpp_rows(gguf, args) if "llamacpp" in args.engines else None
    t5 = t5_encoder(args.shape, args.t5_repeats, args.seed) if args.t5 == "on" else None
    if t5:
        print(f"  {t5['shape']} shape encoder: unpooled {t5['median_s']['unpooled'] * 1000:.0f} ms, pooled p=10 "
              f"{t5['median_s']['pooled_p10'] * 1000:.0f} ms, {t5['unpooled_over_pooled']:.2f}x", flush=True)
    print("RANDOM WEIGHTS: the numbers above are costs, not quality", flush=True)
    if args.out:
        context = context or machine_context()
        context["load_average_before_load"] = load_before
        context["load_average_at_end"] = load_average()
        write_json(args.out, {
            "bench": "shape7b", "command": command, "out": args.out, "random_weights": True, "context": context,
            "engines": args.engines, "gguf": {"name": gguf.stem, "bytes": gguf.stat().st_size},
            "prompt_length": PROMPT_LENGTH, "lamp_rank": RANK, **report,
            "llamacpp": llamacpp, "t5_base_encoder": t5,
        })


if __name__ == "__main__":
    main()
