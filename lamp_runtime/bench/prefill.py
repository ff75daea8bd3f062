"""Prefill of a step whose newcomers differ in length: grouped by length vs one padded batch.

    .venv/bin/python -m lamp_runtime.bench.prefill [--short 15] [--no-long] [--repeats 5] [--out results.json]

One long request (the support_triage zero-shot prompt: the ~550-token instruction plus a message)
arrives in the same step as `--short` short ones (bundled eval inputs with their tuned adapters).
The same requests are prefilled (max_new_tokens=1, so the step is all prefill) by two engines over
one backbone: `prefill_forward_cost_tokens=32` (the default: the long row gets its own forward)
and a cost so large that everything is one left-padded batch (the behaviour before grouping).
Rounds alternate the order of the two; medians and the per-round ratio are printed. `--no-long`
measures the short requests alone: what grouping costs when lengths are merely similar.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from lamp_runtime.adapters import load_adapter
from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.hf.engine import engine_for
from lamp_runtime.hf.step_engine import StepEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams
from lamp_runtime.tasks.format import format_input
from lamp_runtime.tasks.synthetic import zero_shot_prompt

from .report import full_command, write_json
from .workload import BUNDLED_PROMPTS, machine_context

TASKS = ("sentiment", "topic", "extract", "support_triage")
ONE_BATCH = 10**9


def requests(short: int, with_long: bool) -> list[GenerationRequest]:
    params = SamplingParams(max_new_tokens=1)
    rows = {t: [json.loads(line) for line in (BUNDLED_PROMPTS / "data" / t / "eval.jsonl").read_text().splitlines()]
            for t in TASKS}
    long_input = zero_shot_prompt("support_triage", rows["support_triage"][0]["input"])
    batch = [GenerationRequest(long_input, None, params)] if with_long else []
    for i in range(short):
        task = TASKS[i % len(TASKS)]
        batch.append(GenerationRequest(format_input(rows[task][i]["input"]), task, params))
    return batch


def prefill_step(engine: StepEngine, batch: list[GenerationRequest]) -> tuple[float, object]:
    for request in batch:
        engine.submit(GenerationRequest(request.input, request.task_id, request.params))
    started = time.perf_counter()
    engine.step()
    elapsed = time.perf_counter() - started
    if engine.has_work():
        raise RuntimeError("max_new_tokens=1 requests should all finish in the prefill step")
    return elapsed, engine.last_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=15)
    parser.add_argument("--no-long", action="store_true", help="only the short requests")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    backbone = load_backbone(BackboneOptions(dtype="float32", quantization="none", device="cpu"))
    engines = {}
    for name, cost in (("grouped", EngineConfig().prefill_forward_cost_tokens), ("one batch", ONE_BATCH)):
        engine = engine_for(backbone, config=EngineConfig(max_batch_size=args.short + 1, prefill_forward_cost_tokens=cost))
        for task in TASKS:
            engine.registry.register(task, load_adapter(BUNDLED_PROMPTS / f"{task}.safetensors", backbone.hidden_size))
        engines[name] = engine
    batch = requests(args.short, not args.no_long)
    for engine in engines.values():  # warm-up (prompt cache, allocator)
        prefill_step(engine, batch)
    seconds = {name: [] for name in engines}
    stats = {}
    for round_ in range(args.repeats):
        order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
        for name in order:
            elapsed, stats[name] = prefill_step(engines[name], batch)
            seconds[name].append(elapsed)
    ratios = [g / o for g, o in zip(seconds["grouped"], seconds["one batch"])]
    rows = []
    for name in engines:
        s = stats[name]
        rows.append({"engine": name, "median_s": statistics.median(seconds[name]), "seconds": seconds[name],
                     "forwards": s.prefill_forwards, "real_positions": s.prefill_tokens,
                     "padding_positions": s.prefill_padding})
        print(f"{name:<10} prefill {statistics.median(seconds[name]) * 1000:7.0f} ms (median of {args.repeats}), "
              f"{s.prefill_forwards} forward(s), {s.prefill_tokens} real + {s.prefill_padding} padded positions")
    print(f"grouped / one batch time: median {statistics.median(ratios):.2f} "
          f"(rounds {min(ratios):.2f}..{max(ratios):.2f})")
    if args.out:
        command = full_command("python -m lamp_runtime.bench.prefill", parser, args)
        write_json(args.out, {"bench": "prefill", "command": command, "out": str(args.out), "context": machine_context(backbone),
                              "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
