"""`lamp bench pooling`: what pooling a LAMP prompt of length l with block p saves on the engines as served.

Each engine of `engines` (hf: int4 as `lamp serve` builds it by default; llamacpp: the embedded
GGUF) is built twice by lamp_runtime.engines.build_engine, with the prompt-KV cache on (the
default budget) and off (0 bytes), and serves the same LAMP adapters (one set of factors per l,
registered with every p) through the engine contract, one request at a time:

- prefill: per (engine, state, l, p), one request of the task's input. `cold`: the task's prompt
  KV was just discarded, so the request builds it (a miss); `warm`: it is cached (a hit: only the
  input runs; a sample whose entry another variant evicted is retaken); `off`: the cache-off
  engine, which runs prompt and input in every prefill. Prefill ms and TTFT as the engine reports
  them, the positions the prefill computed and the KV bytes the running request holds (read from
  the engine's stats after its prefill step);
- decode: per (engine, l, p) over longer prompts, one request of `decode_tokens` tokens on the
  cache-on engine: the time of a decode step, whose attention reads L_x + ceil(l/p) cached keys.

The prefill variants run first, interleaved (stats.interleaved), then the decode variants, so the
long decode prompts do not evict the prefill variants' warm entries. pooling_report.py turns the
samples into rows, ratios (paired within a round) and what each theory column claims.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from ..backbone.options import BackboneOptions
from ..engine.base import EngineConfig, EngineObserver
from ..errors import require_at_least
from ..machine import lscpu_model
from ..requests import GenerationRequest, SamplingParams
from .llamacpp import complete
from .pooling_report import report
from .stats import interleaved
from .workload import embedded_prompt, lamp_from_prompt, load_average, machine_context, task_inputs

ENGINE_KINDS = ("hf", "llamacpp")
STATES = ("cold", "warm", "off")
# Prefill requests generate 2 tokens: the stats read after the prefill step see the request still running.
PREFILL_TOKENS = 2


@dataclass(frozen=True)
class PoolingConfig:
    engines: tuple[str, ...] = ENGINE_KINDS
    lengths: tuple[int, ...] = (20, 100, 200)  # LAMP prompt lengths l of the prefill variants
    pools: tuple[int, ...] = (1, 2, 4, 10)
    decode_lengths: tuple[int, ...] = (100, 500, 1000)
    decode_pools: tuple[int, ...] = (1, 10)
    decode_tokens: int = 32  # tokens per decode request (EOS ignored): decode_tokens - 1 timed steps
    rank: int = 16
    repeats: int = 5
    warmup: int = 1
    task: str = "support_triage"  # the bundled synthetic task whose first input every request sends
    seed: int = 0
    threads: int | None = None  # the engines' threads (None: the cores, as `lamp serve` gives one replica)

    def __post_init__(self):
        unknown = [e for e in self.engines if e not in ENGINE_KINDS]
        if not self.engines or unknown:
            raise ValueError(f"engines must be some of {', '.join(ENGINE_KINDS)}, got {list(self.engines)}")
        for name in ("lengths", "pools", "decode_lengths", "decode_pools"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {list(values)}")
            if name.endswith("pools") and 1 not in values:
                raise ValueError(f"{name} must include 1 (ratios are measured against the unpooled prompt), "
                                 f"got {list(values)}")
        require_at_least(self, 1, "rank", "repeats", "threads")
        require_at_least(self, 2, "decode_tokens")
        require_at_least(self, 0, "warmup")


def task_id(length: int, pool: int) -> str:
    return f"pool-l{length}-p{pool}"


class Served:
    """One engine as served, and what its prefill step of the request in flight reported."""

    def __init__(self, engine):
        self.engine = engine
        self._prefill_step: tuple[int, int] | None = None
        engine.observe(EngineObserver(on_step=self._on_step))

    def _on_step(self, stats) -> None:  # the loop thread, before the step's outputs are delivered
        if stats.prefilled and self._prefill_step is None:
            self._prefill_step = (stats.prefill_tokens, self.engine.stats().kv_cache_bytes)

    def prompt_kv_bytes(self) -> tuple[int, int] | None:
        stats = self.engine.stats().prompt_kv
        return None if stats is None else (stats.bytes, stats.evictions)

    def run(self, text: str, task: str, params: SamplingParams) -> dict:
        self._prefill_step = None
        before = self.prompt_kv_bytes()
        result = complete(self.engine, GenerationRequest(text, task, params))
        after = self.prompt_kv_bytes()
        computed, kv_bytes = self._prefill_step
        grew = after is not None and after[1] == before[1] and after[0] > before[0]  # built, nothing evicted
        return {"prefill_ms": result.prefill_ms, "ttft_ms": result.ttft_ms, "input_tokens": result.input_tokens,
                "soft_tokens": result.soft_prompt_tokens, "soft_computed": result.soft_prompt_tokens_computed,
                "computed_positions": computed, "kv_bytes": kv_bytes,
                "prompt_kv_entry_bytes": after[0] - before[0] if grew else None,
                "completion_tokens": result.completion_tokens, "decode_ms": result.decode_ms}


def build_served(config: PoolingConfig) -> tuple[dict, dict]:
    """(kind, "on" | "off") -> Served, and each kind's build facts."""
    from ..engines import build_engine

    threads = config.threads or len(os.sched_getaffinity(0))
    served, facts = {}, {}
    for kind in config.engines:
        for cache in ("on", "off"):
            started = time.perf_counter()
            engine_config = EngineConfig(threads=threads, **({} if cache == "on" else {"prompt_kv_cache_bytes": 0}))
            engine = build_engine(kind, BackboneOptions(), engine_config)
            served[kind, cache] = Served(engine)
            if cache == "on":
                facts[kind] = {"build_s": time.perf_counter() - started, "kv_bytes_per_token": engine.kv_bytes_per_token,
                               "backbone": dataclasses.asdict(engine.backbone.options),
                               "backbone_bytes": engine.backbone.weights_bytes, "settings": engine.stats().settings,
                               "prompt_kv_cache_bytes": engine_config.prompt_kv_cache_bytes, "threads": threads}
    return served, facts


def register_adapters(served: dict, config: PoolingConfig) -> None:
    """The same LAMP factors per l on every engine (from the first engine's embedding table), one
    task per (l, p)."""
    variants = {(l, p) for l in config.lengths for p in config.pools}
    variants |= {(l, p) for l in config.decode_lengths for p in config.decode_pools}
    backbone = next(iter(served.values())).engine.backbone
    for length in sorted({l for l, _ in variants}):
        prompt = embedded_prompt(backbone, length, seed=config.seed + length)
        base = lamp_from_prompt(prompt, rank=min(config.rank, length), pool=1, task=config.task)
        for pool in sorted(p for l, p in variants if l == length):
            adapter = dataclasses.replace(base, meta=dataclasses.replace(base.meta, pool=pool))
            for one in served.values():
                one.engine.registry.register(task_id(length, pool), adapter)


def run_pooling(config: PoolingConfig) -> dict:
    """Build the engines, measure every variant interleaved, shut them down; the JSON-ready report."""
    started = time.perf_counter()
    context = machine_context() | {"lscpu_model": lscpu_model()}
    served, facts = build_served(config)
    try:
        register_adapters(served, config)
        text = task_inputs(config.task, 1, config.seed)[0]
        samples = measure_all(served, config, text)
    finally:
        for one in served.values():
            one.engine.shutdown()
    context["load_average_before"] = context.pop("load_average")
    context["load_average_after"] = load_average()
    out = report(config, samples, facts)
    out.update({"machine": context, "input": text, "elapsed_s": time.perf_counter() - started})
    return out


def measure_all(served: dict, config: PoolingConfig, text: str) -> dict:
    prefill_params = SamplingParams(max_new_tokens=PREFILL_TOKENS, ignore_eos=True)
    decode_params = SamplingParams(max_new_tokens=config.decode_tokens, ignore_eos=True)

    def prefill(variant) -> dict:
        _, kind, state, length, pool = variant
        one, task = served[kind, "off" if state == "off" else "on"], task_id(length, pool)
        if state == "cold":
            one.engine.discard(one.engine.registry.get(task).cache_key)
        sample = one.run(text, task, prefill_params)
        sample["retaken"] = state == "warm" and sample["soft_computed"] > 0
        if sample["retaken"]:  # evicted by another variant's build since its last run: now it is cached
            sample = one.run(text, task, prefill_params) | {"retaken": True}
        return sample

    def decode(variant) -> dict:
        _, kind, length, pool = variant
        sample = served[kind, "on"].run(text, task_id(length, pool), decode_params)
        return sample | {"step_ms": sample["decode_ms"] / (sample["completion_tokens"] - 1)}

    prefills = [("prefill", kind, state, length, pool) for kind in config.engines for state in STATES
                for length in config.lengths for pool in config.pools]
    decodes = [("decode", kind, length, pool) for kind in config.engines for length in config.decode_lengths
               for pool in config.decode_pools]
    samples = interleaved(prefills, prefill, config.repeats, config.warmup, config.seed, "bench pooling: prefill")
    samples |= interleaved(decodes, decode, config.repeats, config.warmup, config.seed, "bench pooling: decode")
    return samples
