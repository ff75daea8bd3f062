"""`lamp bench pooling`: what pooling a LAMP prompt of length l with block p saves at inference.

The same task (one set of LAMP factors per l) and the same inputs are served with pool
p in {1, 2, 4, 5, 10}, at batch 1 and batch 8, through the real engine. Prefill work is
linear in the tokens the model sees, so pooling should cut it by the theoretical ratio
(L_x + ceil(l/p)) / (L_x + l), L_x being the input tokens; the measured ratio is the variant's
prefill time over the p = 1 prefill time of the same round (paired, so noise shared by a round
cancels). A line fitted through prefill time against tokens gives the fixed cost per forward pass
that keeps the measured ratio above the theoretical one for short sequences.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

from ..adapters import AdapterMeta
from ..backbone.hf import kv_bytes_per_token
from ..engine.base import EngineConfig
from ..hf.engine import engine_for
from ..prompts.math import pooled_length
from ..requests import GenerationRequest, SamplingParams
from .memory import peak_memory_bytes
from .stats import interleaved, safe_ratio, summarize, summarize_samples
from .stepping import run_stepped
from .workload import (
    GenerationBenchConfig,
    lamp_from_prompt,
    load_average,
    machine_context,
    task_inputs,
    vocabulary_prompt,
)

# The memory pass covers prefill and the first decode steps: prefill activations are the peak, and
# the KV cache grows by only 1/(L_x + soft) per further step.
MEMORY_PASS_TOKENS = 2
TIMED_METRICS = ("prefill_ms", "prefill_cpu_ms", "ttft_ms", "e2e_ms", "wall_ms", "cpu_ms", "tokens_per_s",
                 "tokens_per_cpu_s", "decode_ms_per_token", "generated_tokens")


@dataclass(frozen=True)
class PoolingConfig(GenerationBenchConfig):
    lengths: tuple[int, ...] = (100, 200)
    pools: tuple[int, ...] = (1, 2, 4, 5, 10)
    batch_sizes: tuple[int, ...] = (1, 8)
    measure_memory: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("lengths", "pools", "batch_sizes"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {list(values)}")
        if 1 not in self.pools:
            raise ValueError(f"pools must include 1 (ratios are measured against the unpooled prompt), "
                             f"got {list(self.pools)}")


def task_id(length: int, pool: int) -> str:
    return f"pool-l{length}-p{pool}"


def run_pooling(backbone, config: PoolingConfig) -> dict:
    """Measure every (l, p, batch) variant interleaved; return the JSON-ready report."""
    started = time.perf_counter()
    context = machine_context(backbone)
    engine = engine_for(backbone, config=EngineConfig(max_batch_size=max(config.batch_sizes)))
    weight = backbone.model.get_input_embeddings().weight
    for length in config.lengths:
        base = lamp_from_prompt(vocabulary_prompt(weight, length, seed=config.seed + length),
                                rank=min(config.rank, length), pool=1, task=config.task)
        for pool in config.pools:
            engine.registry.register(task_id(length, pool), dataclasses.replace(base, meta=AdapterMeta(pool=pool)))
    inputs = task_inputs(config.task, max(config.batch_sizes), config.seed)
    input_lengths = [len(backbone.tokenizer(text)["input_ids"]) for text in inputs]
    # EOS is ignored so every variant generates exactly new_tokens tokens per request: pooled and
    # unpooled prompts steer the text differently, and unequal lengths would skew tokens/s and e2e.
    params = SamplingParams(max_new_tokens=config.new_tokens, ignore_eos=True)
    memory_params = SamplingParams(max_new_tokens=MEMORY_PASS_TOKENS, ignore_eos=True)

    def requests(variant, sampling=params):
        length, pool, batch = variant
        return [GenerationRequest(text, task_id(length, pool), sampling) for text in inputs[:batch]]

    def measure(variant) -> dict:
        run = run_stepped(engine, requests(variant))
        results = run.results
        tokens = sum(r.completion_tokens for r in results)
        per_token = [(r.total_ms - r.ttft_ms) / (r.completion_tokens - 1) for r in results if r.completion_tokens > 1]
        return {
            "prefill_ms": results[0].prefill_ms,  # one forward pass for the whole batch
            "prefill_cpu_ms": run.prefill_cpu_s * 1000,
            "ttft_ms": statistics.median(r.ttft_ms for r in results),
            "e2e_ms": statistics.median(r.total_ms for r in results),
            "wall_ms": run.wall_s * 1000,
            "cpu_ms": run.cpu_s * 1000,
            "tokens_per_s": tokens / run.wall_s,
            "tokens_per_cpu_s": tokens / run.cpu_s,
            "decode_ms_per_token": statistics.median(per_token) if per_token else float("nan"),
            "generated_tokens": tokens,
        }

    variants = [(length, pool, batch) for length in config.lengths for pool in config.pools
                for batch in config.batch_sizes]
    samples = interleaved(variants, measure, config.repeats, config.warmup, config.seed, "bench pooling")
    peaks = {}
    if config.measure_memory:  # a separate, untimed pass: the profiler would slow the timed runs
        peaks = {v: peak_memory_bytes(lambda v=v: engine.generate(requests(v, memory_params)), backbone.device)
                 for v in variants}

    per_token_kv = kv_bytes_per_token(backbone.config, backbone.dtype)
    rows = []
    for length, pool, batch in variants:
        own, base = samples[(length, pool, batch)], samples[(length, 1, batch)]
        input_tokens = max(input_lengths[:batch])  # rows are left-padded to the longest input
        soft = pooled_length(length, pool)
        summary = summarize_samples(own, TIMED_METRICS)
        paired = {
            key: summarize([safe_ratio(s[key], b[key]) for s, b in zip(own, base)])
            for key in ("prefill_ms", "prefill_cpu_ms", "ttft_ms", "e2e_ms", "tokens_per_s")
        }
        rows.append({
            "l": length,
            "pool": pool,
            "batch_size": batch,
            "input_tokens": input_tokens,
            "soft_prompt_tokens": soft,
            **{key: summary[key].median for key in TIMED_METRICS},
            "kv_bytes": per_token_kv * batch * (input_tokens + soft),
            "peak_bytes": peaks.get((length, pool, batch)),
            "theoretical_ratio": (input_tokens + soft) / (input_tokens + length),
            "measured_ratio": paired["prefill_ms"].median,
            "measured_cpu_ratio": paired["prefill_cpu_ms"].median,
            "ttft_ratio": paired["ttft_ms"].median,
            "e2e_ratio": paired["e2e_ms"].median,
            "tokens_per_s_ratio": paired["tokens_per_s"].median,
            "spread": {**{k: s.as_dict() for k, s in summary.items()},
                       "measured_ratio": paired["prefill_ms"].as_dict(),
                       "measured_cpu_ratio": paired["prefill_cpu_ms"].as_dict()},
        })
    return {
        "bench": "pooling",
        "config": dataclasses.asdict(config),
        "machine": context,
        "kv_bytes_per_token": per_token_kv,
        "notes": {
            "kv_bytes": "keys+values held after prefill for the whole batch: 2*layers*kv_heads*head_dim*"
                        "bytes * batch_size * (input_tokens + soft_prompt_tokens)",
            "peak_bytes": f"peak torch-allocated bytes above the start level during one untimed run of the "
                          f"variant generating {MEMORY_PASS_TOKENS} tokens (prefill activations, KV cache, "
                          f"logits; weights excluded)",
            "measured_ratio": "median over rounds of prefill_ms / prefill_ms(pool=1) within the same round",
            "measured_cpu_ratio": "the same with prefill_cpu_ms: process CPU time of the prefill (first engine "
                                  "step minus the median decode-only step), which time spent descheduled by "
                                  "other work on the machine does not inflate",
            "input_tokens": "longest input of the batch (the engine left-pads rows to it)",
        },
        "rows": rows,
        "agreement": agreement(rows),
        "prefill_fit": add_fixed_cost_ratios(rows, prefill_fit(rows)),
        "elapsed_s": time.perf_counter() - started,
        "load_average_end": load_average(),
    }


def agreement(rows: list[dict]) -> list[dict]:
    """How close measured prefill ratios (wall-clock and CPU time) track the theoretical ones, per (l, batch)."""
    out = []
    for (length, batch) in sorted({(r["l"], r["batch_size"]) for r in rows}):
        mine = [r for r in rows if r["l"] == length and r["batch_size"] == batch and r["pool"] != 1]
        if not mine:
            continue
        item = {"l": length, "batch_size": batch}
        for clock, key in (("wall", "measured_ratio"), ("cpu", "measured_cpu_ratio")):
            errors = [r[key] - r["theoretical_ratio"] for r in mine]
            item[clock] = {"mean_error": statistics.fmean(errors),
                           "mean_abs_error": statistics.fmean(abs(e) for e in errors),
                           "max_abs_error": max(abs(e) for e in errors)}
        out.append(item)
    return out


def prefill_fit(rows: list[dict]) -> list[dict]:
    """Least squares prefill = fixed + per_token * tokens per row, per batch size, on both clocks.

    A positive fixed cost (per-layer kernel launches, the logits of the last position, Python) is
    what keeps measured ratios above the theoretical ones, which assume cost proportional to tokens.
    """
    out = []
    for batch in sorted({r["batch_size"] for r in rows}):
        mine = [r for r in rows if r["batch_size"] == batch]
        tokens = [r["input_tokens"] + r["soft_prompt_tokens"] for r in mine]
        if len(set(tokens)) < 2:
            continue
        item = {"batch_size": batch}
        for clock, key in (("wall", "prefill_ms"), ("cpu", "prefill_cpu_ms")):
            slope, intercept = statistics.linear_regression(tokens, [r[key] for r in mine])
            item[clock] = {"fixed_ms": intercept, "per_token_ms": slope}
        out.append(item)
    return out


def add_fixed_cost_ratios(rows: list[dict], fits: list[dict]) -> list[dict]:
    """Set each row's `fixed_cost_ratio`: the theoretical ratio once the fitted fixed CPU cost per
    forward pass is added to both sides, (a + b(L_x + ceil(l/p))) / (a + b(L_x + l)). Returns `fits`."""
    by_batch = {fit["batch_size"]: fit["cpu"] for fit in fits}
    for row in rows:
        fit = by_batch.get(row["batch_size"])
        if fit is None:
            row["fixed_cost_ratio"] = None
            continue
        a, b, lx = fit["fixed_ms"], fit["per_token_ms"], row["input_tokens"]
        row["fixed_cost_ratio"] = safe_ratio(a + b * (lx + row["soft_prompt_tokens"]), a + b * (lx + row["l"]))
    return fits


TABLE_COLUMNS = (
    ("l", "l", "d"), ("pool", "p", "d"), ("batch_size", "batch", "d"), ("input_tokens", "L_x", "d"),
    ("soft_prompt_tokens", "soft", "d"), ("prefill_ms", "prefill ms", ".1f"),
    ("prefill_cpu_ms", "prefill CPU ms", ".1f"), ("ttft_ms", "ttft ms", ".1f"), ("e2e_ms", "e2e ms", ".0f"),
    ("tokens_per_s", "tok/s", ".1f"), ("kv_mb", "KV MB", ".2f"), ("peak_mb", "peak MB", ".1f"),
    ("theoretical_ratio", "theory", ".3f"), ("measured_ratio", "wall ratio", ".3f"),
    ("ratio_iqr", "wall IQR", "s"), ("measured_cpu_ratio", "CPU ratio", ".3f"), ("cpu_ratio_iqr", "CPU IQR", "s"),
)


def table_rows(report: dict) -> list[dict]:
    out = []
    for row in report["rows"]:
        wall, cpu = row["spread"]["measured_ratio"], row["spread"]["measured_cpu_ratio"]
        out.append({**row, "kv_mb": row["kv_bytes"] / 1e6,
                    "peak_mb": None if row["peak_bytes"] is None else row["peak_bytes"] / 1e6,
                    "ratio_iqr": f"{wall['q1']:.3f}-{wall['q3']:.3f}", "cpu_ratio_iqr": f"{cpu['q1']:.3f}-{cpu['q3']:.3f}"})
    return out
