"""`lamp bench speed`: how fast the engine decodes and prefills, next to this machine's bounds and
llama.cpp, measured side by side in one run.

- bandwidth: memory read GB/s (a sum over a 1 GiB float32 tensor, best of 5). A decode step reads
  every weight once (`streamed_bytes`), so batch-B decoding cannot exceed B x bandwidth / those
  bytes tokens/s: each backbone option's tokens/s is reported next to that bound, as a ratio.
- decode: tokens/s at batch 1, 8 and 16 for each backbone option (`--options dtype/quantization`),
  greedy, EOS ignored, a fixed number of new tokens.
- prefill: a task with a 200-token soft prompt against the same inputs under a 2-token prompt,
  at batch 1 and 8: the prefill time and time to first token, warm (the task's prompt keys/values
  cached) and cold (dropped before the request, so the step builds them).
- llama.cpp (`--llama-bench PATH`): `llama-bench` on the same GGUF with the same threads, tg
  (decode) and pp (prompt) tokens/s, one run per round between ours, as ratios to ours.

Every variant runs once per round, in a shuffled order each round (bench/stats.py), so noise from
other work on the machine hits all of them alike; medians and ranges over rounds are reported.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field

import torch

from ..backbone.checkpoint import gguf_source
from ..backbone.hf import load_backbone
from ..backbone.options import BackboneOptions
from ..engine.base import EngineConfig
from ..hf.engine import engine_for
from ..errors import require_at_least
from ..requests import GenerationRequest, SamplingParams
from .stats import interleaved, safe_ratio, summarize
from .workload import lamp_from_prompt, load_average, machine_context, task_inputs, vocabulary_prompt

LONG_PROMPT, SHORT_PROMPT = 200, 2
DECODE_PROMPT = "Once upon a time, in a small village by the sea, there lived"
TABLE_COLUMNS = (("option", "option", "s"), ("batch", "batch", "d"), ("tokens_per_s", "tok/s", ".1f"),
                 ("bound_tokens_per_s", "bound tok/s", ".0f"), ("of_bound", "of bound", ".2f"),
                 ("vs_llama_cpp", "vs llama.cpp", ".2f"))
PREFILL_COLUMNS = (("option", "option", "s"), ("batch", "batch", "d"), ("state", "prompt KV", "s"),
                   ("long_prefill_ms", "prefill ms, 200-tok prompt", ".1f"),
                   ("short_prefill_ms", "prefill ms, 2-tok prompt", ".1f"), ("prefill_ratio", "ratio", ".2f"),
                   ("long_ttft_ms", "TTFT ms, 200", ".1f"), ("short_ttft_ms", "TTFT ms, 2", ".1f"))


@dataclass(frozen=True)
class SpeedConfig:
    options: tuple[str, ...] = ("float32/none", "bfloat16/none", "bfloat16/nf4", "bfloat16/int4")
    batches: tuple[int, ...] = (1, 8, 16)
    prefill_batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    task: str = "support_triage"
    seed: int = 0
    llama_bench: str | None = None  # path of llama.cpp's llama-bench binary
    threads: int = field(default_factory=torch.get_num_threads)

    def __post_init__(self):
        require_at_least(self, 2, "new_tokens")
        require_at_least(self, 1, "repeats", "threads")
        require_at_least(self, 0, "warmup")
        for spec in self.options:
            if spec.count("/") != 1:
                raise ValueError(f"options are dtype/quantization, e.g. bfloat16/int4; got {spec!r}")
        if not self.batches or not self.prefill_batches or min(*self.batches, *self.prefill_batches) < 1:
            raise ValueError("batch sizes must be integers >= 1")


def streamed_bytes(backbone) -> int:
    """Weight bytes one decode step reads: all of them, but for an input-embedding table that is not
    also the output head (int4 keeps a float32 table for lookups and an int8 head): of that table
    a step reads one row per token."""
    table = backbone.model.get_input_embeddings().weight
    head = getattr(backbone.model.get_output_embeddings(), "weight", None)
    tied = head is not None and head.data_ptr() == table.data_ptr()
    return backbone.weights_bytes - (0 if tied else table.numel() * table.element_size())


def memory_bandwidth(gib: float = 1.0, rounds: int = 5) -> float:
    """Bytes per second read by a sum over a large float32 tensor (best of `rounds`)."""
    data = torch.ones(int(gib * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


def decode_rate(engine, batch: int, new_tokens: int) -> float:
    """Decode tokens/s of `batch` identical greedy requests admitted together (first token excluded)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    results = engine.generate([GenerationRequest(DECODE_PROMPT, None, params) for _ in range(batch)])
    return batch * (new_tokens - 1) / (max(r.decode_ms for r in results) / 1000)


def prefill_times(engine, task: str, inputs: list[str], cold: bool) -> tuple[float, float]:
    """(prefill ms, time to first token ms) of `inputs` for `task`, admitted together."""
    if cold:
        engine.discard(engine.registry.get(task).cache_key)
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    results = engine.generate([GenerationRequest(text, task, params) for text in inputs])
    return results[0].prefill_ms, max(r.ttft_ms for r in results)


def decode_profile(engine, steps: int = 16, top: int = 8) -> dict:
    """Where one batch-1 decode step's time goes: torch profiler, operators by self CPU time."""
    from torch.profiler import profile

    engine.generate([GenerationRequest(DECODE_PROMPT, None, SamplingParams(max_new_tokens=2))])
    engine.submit(GenerationRequest(DECODE_PROMPT, None, SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)))
    engine.step()  # the prefill
    started = time.perf_counter()
    with profile() as prof:
        for _ in range(steps):
            engine.step()
    wall = (time.perf_counter() - started) / steps
    while engine.has_work():
        engine.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / steps / 1000
    return {"step_ms_profiled": wall * 1000, "operators_ms": total,
            "top": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / steps / 1000, "calls_per_step": e.count / steps}
                    for e in events[:top]]}


def run_llama_bench(binary: str, gguf: str, threads: int) -> dict:
    """llama-bench's tg32 and pp64 tokens/s on `gguf` (one repetition: rounds give the spread)."""
    done = subprocess.run([binary, "-m", gguf, "-t", str(threads), "-p", "64", "-n", "32", "-r", "1", "-o", "json"],
                          capture_output=True, text=True, timeout=600, check=True)
    rows = json.loads(done.stdout)
    rate = {("tg" if row["n_gen"] else "pp"): row["avg_ts"] for row in rows}
    return {"tg_tokens_per_s": rate["tg"], "pp_tokens_per_s": rate["pp"]}


def run_speed(config: SpeedConfig) -> dict:
    torch.set_num_threads(config.threads)
    bandwidth = memory_bandwidth()
    engines, backbones = {}, {}
    inputs = task_inputs(config.task, max(config.prefill_batches), seed=config.seed)
    for spec in config.options:
        dtype, quantization = spec.split("/")
        backbone = load_backbone(BackboneOptions(dtype=dtype, quantization=quantization, device="cpu"))
        engine = engine_for(backbone, config=EngineConfig(max_batch_size=max(*config.batches,
                                                                             *config.prefill_batches)))
        weight = backbone.model.get_input_embeddings().weight
        engine.registry.register("long", lamp_from_prompt(vocabulary_prompt(weight, LONG_PROMPT, 1), 16, 1))
        engine.registry.register("short", lamp_from_prompt(vocabulary_prompt(weight, SHORT_PROMPT, 2), 2, 1))
        engine.generate([GenerationRequest(DECODE_PROMPT, None, SamplingParams(max_new_tokens=2))])  # warm-up
        engines[spec], backbones[spec] = engine, backbone

    variants = [("decode", spec, b) for spec in config.options for b in config.batches]
    variants += [("prefill", spec, b, state) for spec in config.options for b in config.prefill_batches
                 for state in ("warm", "cold")]
    if config.llama_bench:
        variants.append(("llama.cpp",))

    def measure(variant) -> dict:
        if variant[0] == "decode":
            return {"tokens_per_s": decode_rate(engines[variant[1]], variant[2], config.new_tokens)}
        if variant[0] == "prefill":
            _, spec, batch, state = variant
            engine, texts = engines[spec], inputs[:batch]
            long = prefill_times(engine, "long", texts, cold=state == "cold")
            short = prefill_times(engine, "short", texts, cold=state == "cold")
            return {"long_prefill_ms": long[0], "long_ttft_ms": long[1], "short_prefill_ms": short[0],
                    "short_ttft_ms": short[1], "prefill_ratio": safe_ratio(long[0], short[0])}
        return run_llama_bench(config.llama_bench, str(gguf_source(BackboneOptions())), config.threads)

    load_before = load_average()
    samples = interleaved(variants, measure, config.repeats, config.warmup, config.seed, "speed")
    llama = samples.get(("llama.cpp",))
    llama_tg = summarize([s["tg_tokens_per_s"] for s in llama]).median if llama else None
    decode_rows, prefill_rows = [], []
    for variant, runs in samples.items():
        if variant[0] == "decode":
            _, spec, batch = variant
            rate = summarize([s["tokens_per_s"] for s in runs])
            streamed = streamed_bytes(backbones[spec])
            bound = batch * bandwidth / streamed
            decode_rows.append({"option": spec, "batch": batch, "tokens_per_s": rate.median, "spread": rate.as_dict(),
                                "weights_bytes": backbones[spec].weights_bytes, "streamed_bytes": streamed,
                                "load_seconds": backbones[spec].load_seconds,
                                "bound_tokens_per_s": bound,
                                "of_bound": rate.median / bound,
                                "vs_llama_cpp": safe_ratio(rate.median, llama_tg) if llama_tg and batch == 1 else None})
        elif variant[0] == "prefill":
            _, spec, batch, state = variant
            row = {"option": spec, "batch": batch, "state": state}
            for key in ("long_prefill_ms", "short_prefill_ms", "long_ttft_ms", "short_ttft_ms", "prefill_ratio"):
                summary = summarize([s[key] for s in runs])
                row[key], row[f"{key}_spread"] = summary.median, summary.as_dict()
            prefill_rows.append(row)
    report = {
        "bench": "speed", "config": config.__dict__ | {"options": list(config.options)},
        "context": machine_context() | {"load_average_before": load_before, "load_average_after": load_average()},
        "bandwidth_bytes_per_s": bandwidth, "decode": decode_rows, "prefill": prefill_rows,
    }
    if llama:
        report["llama_cpp"] = {key: summarize([s[key] for s in llama]).as_dict()
                               for key in ("tg_tokens_per_s", "pp_tokens_per_s")}
    report["decode_profile_batch_1"] = {spec: decode_profile(engine) for spec, engine in engines.items()}
    return report
