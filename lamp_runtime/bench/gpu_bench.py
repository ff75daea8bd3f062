"""The benchmark of `make gpu-check`: the decoder engine on a Llama-2-7B-shaped model with RANDOM
weights (built on the device, never on the CPU; no checkpoint reaches the GPU host), in bfloat16.

It measures what a deployment needs to size a GPU, not answer quality (random weights give
degenerate text, so every request runs `ignore_eos` with a fixed token count):

- weights and KV memory: weight bytes, allocator bytes after loading, KV bytes per token, the
  slot cache's largest allocation and the allocator's peak at each batch size;
- decode tokens/s at batch 1, 16 and 64, every batch mixing tasks (LAMP prompts of 100 tokens at
  pooling p = 1 and 10), the batch sizes interleaved round by round;
- a 100-token soft prompt's prefill at p = 1 and p = 10: cold (a new task version: prompt built,
  its keys/values computed), warm (keys/values from the prompt-KV cache, only the input runs) and
  uncached (cache off: prompt and input run together), interleaved round by round;
- prompt-KV bytes per task at p = 1 and p = 10.

    python -m lamp_runtime.bench.gpu_bench --device cuda --shape 7b --json gpu-7b.json
    python -m lamp_runtime.bench.gpu_bench --device cpu --shape tiny --json /tmp/dry.json   # dry run

`make gpu-check` (bench/gpu_check.py) runs it in a child process with a timeout, after the CUDA tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ..adapters import AdapterMeta, LampAdapter
from ..backbone.hf import in_memory_backbone
from ..backbone.random_models import SHAPES, byte_level_tokenizer, random_llama
from ..requests import GenerationRequest, SamplingParams
from .hf_engine import EngineConfig, engine_for
from .report import write_json

SOFT_PROMPT_TOKENS = 100  # the l of every task's LAMP prompt, pooled to l / p positions
POOLS = (1, 10)
RANK = 8
TASKS = 8  # distinct tasks in a decode batch: half at p = 1, half at p = 10
INPUT = "Summarize the following report in one sentence: the quarterly numbers were better than expected"
WEIGHT_STD = 0.02
SEED = 0
PROMPT_KV_CACHE_BYTES = 1 << 30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lamp_task(hidden: int, pool: int, seed: int) -> LampAdapter:
    """A LAMP adapter whose U·diag(Q)·V has the weights' scale (rows of std ~WEIGHT_STD)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(SOFT_PROMPT_TOKENS, RANK, generator=g) / RANK ** 0.5
    return LampAdapter(AdapterMeta(pool=pool), u, torch.ones(RANK), torch.randn(RANK, hidden, generator=g) * WEIGHT_STD)


def build(shape: str, device: str) -> tuple[object, dict]:
    import transformers.models.llama  # noqa: F401  (imported before the clock starts: build time is the model's)

    dims = SHAPES[shape]
    started = time.perf_counter()
    tokenizer = byte_level_tokenizer(dims["vocab_size"])
    model = random_llama(dims, tokenizer, device, torch.bfloat16, seed=SEED, std=WEIGHT_STD)
    backbone = in_memory_backbone(model, tokenizer, "llama-2-7b-shape-random" if shape == "7b" else f"{shape}-random")
    _sync(backbone.device)
    facts = {"build_seconds": round(time.perf_counter() - started, 2), "weights_bytes": backbone.weights_bytes,
             "parameters": sum(p.numel() for p in model.parameters())}
    if backbone.device.type == "cuda":
        facts["cuda_allocated_bytes_after_build"] = torch.cuda.memory_allocated(backbone.device)
    return backbone, facts


def run_batch(engine, requests: list[GenerationRequest]) -> dict:
    """Submit `requests` at once and step until all finish; decode rate over the steps that only
    decoded (no newcomer), and the KV memory the batch held."""
    device = engine.backbone.device
    for request in requests:
        engine.submit(request)
    decode_tokens, decode_seconds, steps, kv_alloc, kv_used = 0, 0.0, [], 0, 0
    while engine.has_work():
        _sync(device)
        started = time.perf_counter()
        engine.step()
        _sync(device)
        elapsed = time.perf_counter() - started
        kv_alloc, kv_used = max(kv_alloc, engine.kv.nbytes), max(kv_used, engine.kv_cache_bytes())
        if engine.last_step.prefilled == 0 and engine.last_step.batch_size:
            decode_tokens += engine.last_step.batch_size
            decode_seconds += elapsed
            steps.append(elapsed)
    return {"decode_tokens": decode_tokens, "decode_seconds": decode_seconds,
            "step_ms_median": 1e3 * statistics.median(steps) if steps else None,
            "kv_allocated_bytes": kv_alloc, "kv_used_bytes": kv_used}


def decode_rates(engine, batches: list[int], new_tokens: int, rounds: int) -> list[dict]:
    device = engine.backbone.device
    tasks = [f"decode-{i}" for i in range(TASKS)]
    per_batch = {b: [] for b in batches}
    peaks = {b: 0 for b in batches}
    for _ in range(rounds):
        for batch in batches:  # interleaved: a slow spell of the machine hits every batch size alike
            params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
            requests = [GenerationRequest(INPUT, tasks[i % TASKS], params) for i in range(batch)]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            per_batch[batch].append(run_batch(engine, requests))
            if device.type == "cuda":
                peaks[batch] = max(peaks[batch], torch.cuda.max_memory_allocated(device))
    rows = []
    for batch, runs in per_batch.items():
        rates = [r["decode_tokens"] / r["decode_seconds"] for r in runs if r["decode_seconds"]]
        rows.append({"batch": batch, "distinct_tasks": min(batch, TASKS), "new_tokens": new_tokens,
                     "tokens_per_s_median": statistics.median(rates) if rates else None,
                     "tokens_per_s_by_round": [round(r, 1) for r in rates],
                     "step_ms_median": statistics.median(r["step_ms_median"] for r in runs if r["step_ms_median"]),
                     "kv_allocated_bytes": max(r["kv_allocated_bytes"] for r in runs),
                     "kv_used_bytes": max(r["kv_used_bytes"] for r in runs),
                     "cuda_peak_allocated_bytes": peaks[batch] or None})
    return rows


def _timed_prefill(engine, task_id: str) -> tuple[float, object]:
    """One request of `task_id`, one new token: its step is the prefill (and its first token)."""
    device = engine.backbone.device
    engine.submit(GenerationRequest(INPUT, task_id, SamplingParams(max_new_tokens=1, ignore_eos=True)))
    _sync(device)
    started = time.perf_counter()
    while engine.has_work():
        engine.step()
    _sync(device)
    return time.perf_counter() - started, engine.last_step


def prefill_times(on, off, rounds: int) -> tuple[list[dict], dict]:
    """Cold, warm and uncached prefill of a 100-token prompt at each pooling, interleaved; and the
    prompt-KV bytes one task holds at each pooling."""
    hidden = on.backbone.hidden_size
    times = {(p, kind): [] for p in POOLS for kind in ("cold", "warm", "uncached")}
    reused, kv_bytes = {}, {}
    for r in range(rounds):
        for p in POOLS:
            task = f"prefill-p{p}-{r}"  # a new task every round: its first request is cold
            on.registry.register(task, lamp_task(hidden, p, seed=1000 + 10 * r + p))
            before = on.prompt_kv.stats().bytes
            seconds, _ = _timed_prefill(on, task)
            times[p, "cold"].append(seconds)
            kv_bytes[p] = on.prompt_kv.stats().bytes - before
            seconds, stats = _timed_prefill(on, task)
            times[p, "warm"].append(seconds)
            reused[p] = stats.prompt_tokens_reused
            times[p, "uncached"].append(_timed_prefill(off, task)[0])
            on.discard(on.registry.get(task).cache_key)  # keep the cache from filling over the rounds
    rows = []
    for p in POOLS:
        ms = {kind: 1e3 * statistics.median(times[p, kind]) for kind in ("cold", "warm", "uncached")}
        rows.append({"pool": p, "soft_prompt_tokens": SOFT_PROMPT_TOKENS // p, "warm_tokens_reused": reused[p],
                     "input_tokens": len(on.backbone.tokenizer(INPUT)["input_ids"]),
                     **{f"{kind}_ms_median": round(v, 3) for kind, v in ms.items()},
                     "cold_over_warm": ms["cold"] / ms["warm"], "uncached_over_warm": ms["uncached"] / ms["warm"],
                     "rounds": rounds})
    per_task = {f"p{p}": {"soft_prompt_tokens": SOFT_PROMPT_TOKENS // p, "bytes": kv_bytes[p]} for p in POOLS}
    return rows, per_task


def run(shape: str, device: str, batches: list[int], new_tokens: int, rounds: int) -> dict:
    backbone, load = build(shape, device)
    # Room for every task's prompt KV (4 x 100 + 4 x 10 positions; 220 MiB at the 7B shape), so the
    # decode batches run warm as a steady server does, and the prefill rounds never evict.
    config = EngineConfig(max_batch_size=max(batches), max_new_tokens=max(new_tokens, 1),
                          prompt_kv_cache_bytes=PROMPT_KV_CACHE_BYTES)
    on = engine_for(backbone, config=config)
    if backbone.device.type == "cuda":
        load["cuda_allocated_bytes_after_engine"] = torch.cuda.memory_allocated(backbone.device)
    for i in range(TASKS):
        on.registry.register(f"decode-{i}", lamp_task(backbone.hidden_size, POOLS[i % 2], seed=i))
    decode = decode_rates(on, batches, new_tokens, rounds)
    # Built after the memory figures: a second engine over the same model fuses its own copy of
    # the q/k/v and gate/up weights (engine/llama.py), which a server (one engine) never holds.
    off = engine_for(backbone, registry=on.registry, config=EngineConfig(max_batch_size=1, prompt_kv_cache_bytes=0))
    started = time.perf_counter()
    prefill, prompt_kv_bytes = prefill_times(on, off, rounds=max(3, rounds + 1))
    prefill_seconds = time.perf_counter() - started
    return {
        "weights": f"RANDOM (seeded normal, std {WEIGHT_STD}, seed {SEED}): speed and memory only, no answer quality",
        "shape": shape, "config": SHAPES[shape], "dtype": "bfloat16", "quantization": "none",
        "device": str(backbone.device), "engine": type(on).__name__,
        "load": load,
        "kv_bytes_per_token": on.kv_bytes_per_token, "prompt_kv_cache_bytes": PROMPT_KV_CACHE_BYTES,
        "decode": decode,
        "prefill": prefill, "prefill_seconds_total": round(prefill_seconds, 2),
        "prompt_kv_bytes_per_task": prompt_kv_bytes,
        "workload": {"input": INPUT, "tasks": TASKS, "soft_prompt_tokens": SOFT_PROMPT_TOKENS, "rank": RANK,
                     "pools": list(POOLS), "ignore_eos": True},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lamp_runtime.bench.gpu_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--batches", default="1,16,64", help="decode batch sizes, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each decode request generates")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every variant")
    parser.add_argument("--json", required=True, help="where to write the result")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here (use --device cpu --shape tiny for a dry run)")
    batches = [int(b) for b in args.batches.split(",")]
    result = run(args.shape, args.device, batches, args.new_tokens, args.rounds)
    write_json(args.json, result)
    for row in result["decode"]:
        print(f"decode batch {row['batch']:>3}: {row['tokens_per_s_median']:.1f} tok/s "
              f"(step {row['step_ms_median']:.1f} ms, KV {row['kv_allocated_bytes'] / 2**20:.0f} MiB)")
    for row in result["prefill"]:
        print(f"prefill p={row['pool']:>2} ({row['soft_prompt_tokens']} prompt tokens): "
              f"cold {row['cold_ms_median']:.1f} ms, "
              f"warm {row['warm_ms_median']:.1f} ms, uncached {row['uncached_ms_median']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
