"""The bundled adapters' held-out accuracy and greedy answers under several backbone options.

    .venv/bin/python -m lamp_runtime.bench.accuracy [--options float32/none bfloat16/int4 llamacpp llamacpp/Q4_0]
        [--rows 100] [--adapters prompts]
        [--out docs/bench/accuracy.json]

Every bundled adapter (prompts/*.safetensors) answers the first `--rows` rows of its task's
eval.jsonl through the serving engine, greedy, under each option (`dtype/quantization` for the HF
engine; `llamacpp` for the llama.cpp engine on the embedded GGUF as it is, `llamacpp/TYPE` on it
requantized to TYPE, LlamaCppOptions.requantize); the report gives each
option's accuracy and the share of answers identical, token for token, to the first option's.
`--adapters DIR` scores the adapters of the same names in another folder (e.g. trained on a
requantized GGUF, docs/llamacpp.md) on the bundled eval rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..adapters import load_adapter
from ..backbone.hf import load_backbone
from ..backbone.options import BackboneOptions
from ..hf.engine import engine_for
from ..requests import GenerationRequest, SamplingParams
from ..tasks.format import answer_matches, format_input
from ..tasks.synthetic import TASKS
from ..training.evaluate import answer_budget
from .report import full_command, write_json
from .workload import BUNDLED_PROMPTS, machine_context


def answers(engine, task: str, rows: list[dict]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=answer_budget(engine.backbone.tokenizer, rows))
    results = []
    for start in range(0, len(rows), 16):
        chunk = rows[start:start + 16]
        results += engine.generate([GenerationRequest(format_input(r["input"]), task, params) for r in chunk])
    return results


def engine_of(spec: str):
    """The synchronous engine core an option names."""
    if spec == "llamacpp" or spec.startswith("llamacpp/"):
        from ..llamacpp.engine import build_llamacpp_engine
        from ..llamacpp.options import LlamaCppOptions

        requantize = spec.partition("/")[2] or None
        return build_llamacpp_engine(BackboneOptions(device="cpu"), options=LlamaCppOptions(requantize=requantize))
    dtype, quantization = spec.split("/")
    return engine_for(load_backbone(BackboneOptions(dtype=dtype, quantization=quantization, device="cpu")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=["float32/none", "bfloat16/int4"])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--adapters", type=Path, default=BUNDLED_PROMPTS,
                        help="folder of <task>.safetensors to score (default: the bundled prompts/)")
    parser.add_argument("--out", help="write the report JSON here")
    args = parser.parse_args()
    report = {"bench": "accuracy", "command": full_command("python -m lamp_runtime.bench.accuracy", parser, args),
              "out": args.out, "context": machine_context(), "tasks": {}}
    completions: dict[str, dict[str, list]] = {}
    for spec in args.options:
        engine = engine_of(spec)
        hidden_size = engine.backbone.hidden_size
        for task in sorted(TASKS):
            rows = [json.loads(line) for line in (BUNDLED_PROMPTS / "data" / task / "eval.jsonl").read_text().splitlines()]
            rows = rows[:args.rows]
            engine.registry.register(task, load_adapter(args.adapters / f"{task}.safetensors", hidden_size))
            started = time.perf_counter()
            results = answers(engine, task, rows)
            labels = TASKS[task].labels
            correct = sum(answer_matches(r.text, row["target"], labels) for r, row in zip(results, rows))
            completions.setdefault(task, {})[spec] = [r.token_ids for r in results]
            first = completions[task][args.options[0]]
            same = sum(a == b for a, b in zip(first, completions[task][spec]))
            report["tasks"].setdefault(task, {})[spec] = {
                "accuracy": correct / len(rows), "rows": len(rows), "seconds": time.perf_counter() - started,
                f"answers_identical_to_{args.options[0]}": same / len(rows)}
            print(f"{task:15} {spec:15} accuracy {correct / len(rows):.2f}  identical answers {same / len(rows):.2f}")
    if args.out:
        print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
