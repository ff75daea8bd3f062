"""`lamp bench batching`: what continuous batching of mixed tasks buys over the alternatives.

Eight requests (eight inputs of one bundled task) are served four ways, interleaved per round:
(a) all for one task, batched by the engine; (b) each for its own task, batched by the engine (the
mixed-task batch a multi-tenant server sees); (c) the requests of (b) through the engine one at a
time; (d) the requests of (b) through `peft.PeftModel.generate`, one task at a time, on a PEFT
prompt-tuning model holding the same prompts (what a user does without a server). All eight
arrive together, so a request's latency counts from the start of the variant, including the
time it waits behind others. Every request generates exactly `new_tokens` tokens (EOS ignored
in both stacks), so tokens/s compare the same work.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from ..engine.base import EngineConfig
from ..hf.engine import engine_for
from ..errors import require_at_least
from ..prompts.math import pooled_length
from ..requests import GenerationRequest, SamplingParams
from .stats import interleaved, safe_ratio, summarize, summarize_samples
from .workload import (
    GenerationBenchConfig,
    lamp_from_prompt,
    load_average,
    machine_context,
    task_inputs,
    vocabulary_prompt,
)

SINGLE, MIXED, SEQUENTIAL, PEFT = "single_task_batched", "mixed_task_batched", "mixed_task_sequential", "peft_sequential"
VARIANT_LABELS = {
    SINGLE: "(a) one task, batched",
    MIXED: "(b) one task per request, batched",
    SEQUENTIAL: "(c) as (b), one at a time",
    PEFT: "(d) as (b), PeftModel.generate per task",
}
METRICS = ("tokens_per_s", "tokens_per_cpu_s", "makespan_ms", "cpu_ms", "latency_ms", "ttft_ms", "generated_tokens")
# ratio name -> (numerator variant, denominator variant), all on tokens/s
RATIOS = {
    "mixed_vs_single_task": (MIXED, SINGLE),
    "batched_vs_sequential": (MIXED, SEQUENTIAL),
    "ours_vs_peft": (MIXED, PEFT),
    "ours_sequential_vs_peft": (SEQUENTIAL, PEFT),
}


@dataclass(frozen=True)
class BatchingConfig(GenerationBenchConfig):
    new_tokens: int = 16
    repeats: int = 5
    requests: int = 8
    length: int = 100
    pool: int = 4
    include_peft: bool = True

    def __post_init__(self):
        super().__post_init__()
        require_at_least(self, 1, "requests", "length", "pool")


def task_id(index: int) -> str:
    return f"batch-task-{index}"


@dataclass
class _Run:
    """One variant's requests, timed from the moment all of them arrived."""

    ttft_ms: list[float]
    latency_ms: list[float]
    tokens: list[list[int]]
    makespan_ms: float = 0.0
    cpu_ms: float = 0.0  # process CPU time: unlike wall-clock, not inflated by other work on the machine

    def sample(self) -> dict:
        generated = sum(len(t) for t in self.tokens)
        return {
            "tokens_per_s": generated / (self.makespan_ms / 1000),
            "tokens_per_cpu_s": generated / (self.cpu_ms / 1000),
            "makespan_ms": self.makespan_ms,
            "cpu_ms": self.cpu_ms,
            "latency_ms": statistics.median(self.latency_ms),
            "ttft_ms": statistics.median(self.ttft_ms),
            "generated_tokens": generated,
            "token_ids": self.tokens,
        }


class PeftBaseline:
    """A PEFT prompt-tuning model on its own copy of the backbone, one named adapter per task."""

    def __init__(self, backbone, prompts: dict[str, torch.Tensor]):
        from peft import PromptTuningConfig, TaskType, get_peft_model

        from ..backbone.hf import load_backbone

        self.tokenizer = backbone.tokenizer
        self.device = backbone.device
        model = load_backbone(backbone.options).model  # PEFT wraps it in place: never on ours
        self.model = None
        for name, prompt in prompts.items():
            config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt.shape[0],
                                        token_dim=backbone.hidden_size)
            if self.model is None:
                self.model = get_peft_model(model, config, adapter_name=name)
            else:
                self.model.add_adapter(name, config)
            with torch.no_grad():
                self.model.prompt_encoder[name].embedding.weight.copy_(prompt)
        self.model.eval()

    def generate(self, task: str, text: str, new_tokens: int) -> tuple[float, list[int]]:
        """Greedy generation of exactly `new_tokens` tokens; returns (seconds to first token, ids)."""
        from transformers.generation.streamers import BaseStreamer

        class FirstToken(BaseStreamer):
            """generate() puts the prompt first, then each new token: the second put is the first token."""

            def __init__(self):
                self.puts, self.first_at = 0, None

            def put(self, value):
                self.puts += 1
                if self.puts == 2:
                    self.first_at = time.perf_counter()

            def end(self):
                pass

        self.model.set_adapter(task)
        started = time.perf_counter()
        inputs = self.tokenizer(text, return_tensors="pt").to(self.device)
        streamer = FirstToken()
        with warnings.catch_warnings():
            # PEFT warns on every call that prompt tuning ignores position ids; expected here.
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            out = self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=None, streamer=streamer)
        return streamer.first_at - started, out[0, inputs["input_ids"].shape[1]:].tolist()


def run_batching(backbone, config: BatchingConfig) -> dict:
    started = time.perf_counter()
    context = machine_context(backbone)
    engine = engine_for(backbone, config=EngineConfig(max_batch_size=config.requests))
    weight = backbone.model.get_input_embeddings().weight
    prompts = {}
    for index in range(config.requests):
        adapter = lamp_from_prompt(vocabulary_prompt(weight, config.length, seed=config.seed + 1000 + index),
                                   rank=min(config.rank, config.length), pool=config.pool, task=config.task)
        engine.registry.register(task_id(index), adapter)
        prompts[task_id(index)] = adapter.build_prompt()
    inputs = task_inputs(config.task, config.requests, config.seed)
    params = SamplingParams(max_new_tokens=config.new_tokens, ignore_eos=True)
    single = [GenerationRequest(text, task_id(0), params) for text in inputs]
    mixed = [GenerationRequest(text, task_id(i), params) for i, text in enumerate(inputs)]
    peft = PeftBaseline(backbone, prompts) if config.include_peft else None

    def batched(requests) -> _Run:
        begin, cpu = time.perf_counter(), time.process_time()
        results = engine.generate(requests)
        return _Run([r.ttft_ms for r in results], [r.total_ms for r in results], [r.token_ids for r in results],
                    (time.perf_counter() - begin) * 1000, (time.process_time() - cpu) * 1000)

    def one_at_a_time(generate_one) -> _Run:
        begin, cpu = time.perf_counter(), time.process_time()
        run = _Run([], [], [])
        for index, text in enumerate(inputs):
            waited = (time.perf_counter() - begin) * 1000
            ttft_ms, tokens = generate_one(index, text)
            run.ttft_ms.append(waited + ttft_ms)
            run.latency_ms.append((time.perf_counter() - begin) * 1000)
            run.tokens.append(tokens)
        run.makespan_ms = (time.perf_counter() - begin) * 1000
        run.cpu_ms = (time.process_time() - cpu) * 1000
        return run

    def engine_one(index, text):
        result = engine.generate([GenerationRequest(text, task_id(index), params)])[0]
        return result.ttft_ms, result.token_ids

    def peft_one(index, text):
        seconds, tokens = peft.generate(task_id(index), text, config.new_tokens)
        return seconds * 1000, tokens

    runners = {
        SINGLE: lambda: batched(single),
        MIXED: lambda: batched(mixed),
        SEQUENTIAL: lambda: one_at_a_time(engine_one),
    }
    if peft is not None:
        runners[PEFT] = lambda: one_at_a_time(peft_one)
    samples = interleaved(list(runners), lambda name: runners[name]().sample(), config.repeats,
                          config.warmup, config.seed, "bench batching")

    variants = {}
    for name, runs in samples.items():
        summary = summarize_samples(runs, METRICS)
        variants[name] = {"label": VARIANT_LABELS[name], **{k: summary[k].median for k in METRICS},
                          "spread": {k: s.as_dict() for k, s in summary.items()}}
    ratios, ratio_spread, cpu_ratios = {}, {}, {}
    for name, (top, bottom) in RATIOS.items():
        if top in samples and bottom in samples:
            paired = summarize([safe_ratio(a["tokens_per_s"], b["tokens_per_s"])
                                for a, b in zip(samples[top], samples[bottom])])
            ratios[name], ratio_spread[name] = paired.median, paired.as_dict()
            on_cpu = summarize([safe_ratio(a["tokens_per_cpu_s"], b["tokens_per_cpu_s"])
                                for a, b in zip(samples[top], samples[bottom])])
            cpu_ratios[name] = {"median": on_cpu.median, **{k: v for k, v in on_cpu.as_dict().items() if k != "median"}}
    report = {
        "bench": "batching",
        "config": dataclasses.asdict(config),
        "machine": context,
        **ratios,
        "ratio_spread": ratio_spread,
        "cpu_time_ratios": cpu_ratios,
        "soft_prompt_tokens": pooled_length(config.length, config.pool),
        "input_tokens": [len(backbone.tokenizer(t)["input_ids"]) for t in inputs],
        "variants": variants,
        "notes": {
            "ratios": "medians over rounds of tokens/s ratios taken within the same round",
            "cpu_time_ratios": "the same ratios on tokens per process-CPU second, which time spent descheduled "
                               "by other work on the machine does not inflate",
            "latency_ms": "median over the requests of completion time since all of them arrived",
            "ttft_ms": "median over the requests of first-token time since all of them arrived",
        },
        "elapsed_s": time.perf_counter() - started,
        "load_average_end": load_average(),
    }
    if peft is not None:
        # Same prompts, greedy, fp32: the engine's batched outputs should equal PEFT's token for token.
        ours, theirs = samples[MIXED][0]["token_ids"], samples[PEFT][0]["token_ids"]
        report["peft_outputs_match"] = sum(a == b for a, b in zip(ours, theirs))
        report["peft_outputs_compared"] = len(ours)
    return report


TABLE_COLUMNS = (
    ("label", "variant", "s"), ("tokens_per_s", "tok/s", ".1f"), ("tps_iqr", "tok/s IQR", "s"),
    ("tokens_per_cpu_s", "tok/CPU-s", ".1f"), ("makespan_ms", "makespan ms", ".0f"), ("cpu_ms", "CPU ms", ".0f"),
    ("latency_ms", "latency ms", ".0f"), ("ttft_ms", "ttft ms", ".0f"), ("generated_tokens", "tokens", ".0f"),
)


def table_rows(report: dict) -> list[dict]:
    rows = []
    for variant in report["variants"].values():
        spread = variant["spread"]["tokens_per_s"]
        rows.append({**variant, "tps_iqr": f"{spread['q1']:.1f}-{spread['q3']:.1f}"})
    return rows
