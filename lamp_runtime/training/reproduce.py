"""Rebuild the bundled adapters and the results table in prompts/README.md with one command.

For every bundled task: train plain prompt tuning (PT), LAMP with p = 1, 2, 4, 5 and EPT under one
small CPU budget, score zero-shot and all six through the serving Engine on held-out rows,
bundle the most accurate pooled LAMP variant as `prompts/<task>.safetensors`, and write the
table. Run `make prompts` or `python -m lamp_runtime.training.reproduce`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..machine import machine_context
from ..tasks.synthetic import TASKS

# (name, method, pool). PT is unpooled, as in the papers' baseline; EPT's prompt is its short one.
VARIANTS = (("PT", "pt", 1), ("LAMP p=1", "lamp", 1), ("LAMP p=2", "lamp", 2),
            ("LAMP p=4", "lamp", 4), ("LAMP p=5", "lamp", 5), ("EPT", "ept", 1))
TABLE_BEGIN, TABLE_END = "<!-- results:begin -->", "<!-- results:end -->"
# Both targets must fit the answer budget; longer ones are cut, not dropped.
MAX_INPUT_TOKENS, MAX_TARGET_TOKENS = 256, 64


@dataclass(frozen=True)
class Budget:
    """What one run of the table costs; the defaults fit the shared 2-core CPU (see the README)."""

    prompt_length: int = 20
    rank: int = 8
    # EPT splits the prompt budget: a short prompt of half the length plus an offset on the
    # first input tokens (the bundled inputs are 20-35 tokens long).
    ept_prompt_length: int = 10
    ept_offset_tokens: int = 32
    steps: int = 64
    batch_size: int = 4
    learning_rate: float = 0.1
    holdout_rows: int = 16
    eval_rows: int = 100
    seed: int = 0


def variant_file(name: str) -> str:
    return name.lower().replace(" ", "-").replace("=", "") + ".safetensors"


def run_task(backbone, task: str, data_dir: Path, work_dir: Path, budget: Budget, progress: bool) -> dict:
    from ..adapters import AdapterMeta, load_adapter
    from ..hf.engine import engine_for
    from .data import load_rows, tokenize_rows
    from .evaluate import evaluate
    from .methods import EptShape
    from .trainer import TrainConfig, save_checked, train

    rows = load_rows(data_dir / task / "train.jsonl")
    if len(rows) <= budget.holdout_rows:
        raise ValueError(f"{task}: {len(rows)} training rows cannot spare {budget.holdout_rows} for holdout")
    train_rows, holdout_rows = rows[: -budget.holdout_rows], rows[-budget.holdout_rows :]
    eval_rows = load_rows(data_dir / task / "eval.jsonl", budget.eval_rows)
    tokenize = lambda part: tokenize_rows(backbone.tokenizer, part, MAX_INPUT_TOKENS, MAX_TARGET_TOKENS)  # noqa: E731
    train_examples, holdout_examples = tokenize(train_rows), tokenize(holdout_rows)
    task_dir = work_dir / task
    task_dir.mkdir(parents=True, exist_ok=True)
    engine = engine_for(backbone)
    variants = []
    for name, method, pool in VARIANTS:
        length = budget.ept_prompt_length if method == "ept" else budget.prompt_length
        config = TrainConfig(method=method, prompt_length=length, rank=budget.rank, pool=pool,
                             learning_rate=budget.learning_rate, batch_size=budget.batch_size,
                             max_steps=budget.steps, eval_every=max(1, budget.steps // 2), seed=budget.seed,
                             ept=EptShape(offset_tokens=budget.ept_offset_tokens))
        meta = AdapterMeta(task=task, base_model=backbone.name, description=TASKS[task].description)
        result = train(backbone, train_examples, holdout_examples, config, meta, progress=progress)
        path = save_checked(result.adapter, task_dir / variant_file(name), backbone.hidden_size)
        engine.registry.register(path.stem, load_adapter(path, backbone.hidden_size))
        variants.append({"name": name, "method": method, "pool": pool, "file": str(path),
                         "trainable_parameters": result.trainable_parameters,
                         "train_seconds": round(result.train_seconds, 1), "steps": result.steps,
                         "best_step": result.best.step, "holdout_exact_match": result.best.exact_match})
    instruction = TASKS[task].instruction
    labels = TASKS[task].labels
    baselines = [evaluate(engine, eval_rows, name, instruction=instruction, chat=chat, labels=labels,
                          progress=progress)
                 for name, chat in (("zero-shot", False), ("zero-shot (chat template)", True))]
    adapter_inputs = 0.0
    for variant in variants:
        report = evaluate(engine, eval_rows, variant["name"], task_id=Path(variant["file"]).stem, labels=labels,
                          progress=progress)
        variant.update(accuracy=report.accuracy, correct=report.correct, eval_seconds=round(report.seconds, 1),
                       soft_prompt_tokens=report.soft_prompt_tokens)
        adapter_inputs = report.mean_input_tokens
    results = {
        "task": task, "eval_rows": len(eval_rows),
        "train_rows_seen": min(len(train_rows), budget.steps * budget.batch_size),
        "zero_shot": [{"name": r.name, "accuracy": r.accuracy, "correct": r.correct,
                       "input_tokens": r.mean_input_tokens, "eval_seconds": round(r.seconds, 1),
                       "mistakes": r.mistakes} for r in baselines],
        "best_zero_shot_accuracy": max(r.accuracy for r in baselines),
        "adapter_input_tokens": adapter_inputs,
        "variants": variants,
    }
    (task_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def choose_bundled(variants: list[dict]) -> dict:
    """The most accurate pooled (p > 1) LAMP variant; on a tie, the larger p (fewer served tokens)."""
    pooled = [v for v in variants if v["method"] == "lamp" and v["pool"] > 1]
    if not pooled:
        raise ValueError("no pooled LAMP variant to bundle")
    return max(pooled, key=lambda v: (v["accuracy"], v["pool"]))


def bundle(results: dict, prompts_dir: Path, backbone) -> dict:
    """Copy the most accurate pooled LAMP variant (ties: the shorter prompt) to prompts/<task>.safetensors."""
    from ..adapters import AdapterMeta, load_adapter
    from .trainer import save_checked

    chosen = choose_bundled(results["variants"])
    adapter = load_adapter(chosen["file"], backbone.hidden_size)
    extra = {**adapter.meta.extra, "heldout_accuracy": f"{chosen['accuracy']:.4f}",
             "heldout_rows": results["eval_rows"], "zero_shot_accuracy": f"{results['best_zero_shot_accuracy']:.4f}",
             "made_by": "python -m lamp_runtime.training.reproduce"}
    meta = AdapterMeta(pool=adapter.meta.pool, base_model=adapter.meta.base_model, task=results["task"],
                       description=adapter.meta.description, extra=extra)
    target = prompts_dir / f"{results['task']}.safetensors"
    save_checked(type(adapter)(meta, *adapter.tensors().values()), target, backbone.hidden_size)
    return {**chosen, "bundled_as": str(target)}


def render_table(all_results: list[dict], budget: Budget, wall_seconds: float, device: str,
                 load: tuple[float, float]) -> str:
    lines = [
        f"Measured by `python -m lamp_runtime.training.reproduce` on {device}; wall time "
        f"{wall_seconds / 60:.1f} min for everything below, on a CPU shared with other jobs (1-minute load "
        f"average {load[0]:.1f} at the start, {load[1]:.1f} at the end; train times scale with it). "
        f"Budget per trained variant: l={budget.prompt_length}, "
        f"r={budget.rank}, {budget.steps} steps x batch {budget.batch_size} "
        f"(= {budget.steps * budget.batch_size} training rows seen), lr {budget.learning_rate}, seed {budget.seed}; "
        f"EPT: a {budget.ept_prompt_length}-token short prompt, offset A·B of rank {budget.rank} on the first "
        f"{budget.ept_offset_tokens} input tokens, 2 projection spaces (folded into the stored prompt). "
        "Accuracy is on the first "
        f"{all_results[0]['eval_rows']} rows of each `eval.jsonl` (greedy, through the serving Engine).",
        "",
        "| task | method | held-out accuracy | trainable params | train time (s) | soft-prompt tokens at inference |",
        "|---|---|---|---|---|---|",
    ]
    for results in all_results:
        for zero in results["zero_shot"]:
            lines.append(f"| {results['task']} | {zero['name']}, {zero['input_tokens']:.0f} input tokens | "
                         f"{zero['accuracy']:.3f} ({zero['correct']}/{results['eval_rows']}) | 0 | - | 0 |")
        for v in results["variants"]:
            mark = " (bundled)" if v.get("bundled") else ""
            lines.append(f"| {results['task']} | {v['name']}{mark} | {v['accuracy']:.3f} "
                         f"({v['correct']}/{results['eval_rows']}) | {v['trainable_parameters']:,} | "
                         f"{v['train_seconds']:.0f} | {v['soft_prompt_tokens']} |")
    bundled = [(r, v) for r in all_results for v in r["variants"] if v.get("bundled")]
    if bundled:
        lines += ["", "Bundled adapters (manifest):", ""]
    for results, v in bundled:
        lines.append(
            f"- `prompts/{results['task']}.safetensors`: {v['name']}, l={budget.prompt_length}, r={budget.rank}, "
            f"{v['soft_prompt_tokens']} soft tokens served, {v['trainable_parameters']:,} parameters; held-out "
            f"accuracy {v['accuracy']:.3f} vs best zero-shot {results['best_zero_shot_accuracy']:.3f}; data "
            f"`python -m lamp_runtime.tasks.synthetic --seed 0`, trained with seed {budget.seed} by "
            "`python -m lamp_runtime.training.reproduce`."
        )
    return "\n".join(lines)


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text(encoding="utf-8") if readme.is_file() else f"{TABLE_BEGIN}\n{TABLE_END}\n"
    if TABLE_BEGIN not in text or TABLE_END not in text:
        text = text.rstrip() + f"\n\n{TABLE_BEGIN}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    readme.write_text(f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from .openmp import prefer_passive_openmp

    prefer_passive_openmp()  # before torch is imported (see openmp.py)
    from ..backbone.hf import load_backbone
    from ..backbone.options import BackboneOptions

    defaults = Budget()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--data", default="prompts/data", help="folder with <task>/{train,eval}.jsonl")
    parser.add_argument("--prompts", default="prompts", help="where bundled adapters and README.md go")
    parser.add_argument("--work", default="build/prompts", help="every trained variant and per-task results")
    parser.add_argument("--prompt-length", type=int, default=defaults.prompt_length)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--eval-rows", type=int, default=defaults.eval_rows)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-bundle", action="store_true", help="do not touch prompts/ (table printed only)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    budget = Budget(prompt_length=args.prompt_length, rank=args.rank, steps=args.steps, batch_size=args.batch_size,
                    learning_rate=args.lr, eval_rows=args.eval_rows, seed=args.seed)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    backbone = load_backbone(BackboneOptions(dtype="float32", quantization="none", device="cpu"))
    prompts_dir, work_dir = Path(args.prompts), Path(args.work)
    all_results = []
    for task in args.tasks:
        results = run_task(backbone, task, Path(args.data), work_dir, budget, not args.no_progress)
        if not args.no_bundle:
            chosen = bundle(results, prompts_dir, backbone)
            for v in results["variants"]:
                v["bundled"] = v["name"] == chosen["name"]
        all_results.append(results)
        print(json.dumps({"task": task, **{z["name"]: z["accuracy"] for z in results["zero_shot"]},
                          **{v["name"]: v["accuracy"] for v in results["variants"]}}), flush=True)
    wall = time.perf_counter() - started
    load = (load_at_start, os.getloadavg()[0])
    table = render_table(all_results, budget, wall, "the 2-core CPU (fp32)", load)
    print(table)
    summary = {"command": "make prompts (python -m lamp_runtime.training.reproduce)", "budget": budget.__dict__,
               "context": machine_context(), "wall_seconds": round(wall, 1), "load_average": load,
               "tasks": all_results}
    (work_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if not args.no_bundle:
        (prompts_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        update_readme(prompts_dir / "README.md", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

