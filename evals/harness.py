"""EleutherAI's lm-evaluation-harness (`lm_eval`) against a running `lamp serve`, as people run it,
next to `lamp eval` on the same rows.

    python -m evals.harness --url http://127.0.0.1:8000 --limit 40 --out docs/bench/harness.json

Runs the repo's small tasks (evals/tasks/*.yaml, local JSONL: no hub download) on the bundled
support_triage adapter through three of the harness's model types:
- `local-completions`: the generation task (lamp_triage_gen) and the log-likelihood
  multiple-choice task (lamp_triage_mc: context + each label sent as token ids with `echo`,
  `max_tokens: 1`, `logprobs: 1`; the harness reads the label tokens' log-probabilities);
- `local-chat-completions` (with --apply_chat_template): the generation task with the raw input
  as the user message, once with `chat_format=input_template` (the server wraps it in the
  adapter's training template) and once with the backbone's chat template.
Then `lamp eval` scores the same rows in-process with `--dtype/--quantization` (match the server's).
The JSON keeps the scores, every harness sample, the commands, and where and when it ran.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lamp_runtime.backbone.checkpoint import backbone_folder
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.bench.report import full_command
from lamp_runtime.bench.workload import machine_context

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASK = "support_triage"
DATA = f"prompts/data/{TASK}/eval.jsonl"
LM_EVAL_TIMEOUT_S = 1800


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--limit", type=int, default=40, help="score the first N rows of each task")
    p.add_argument("--dtype", default="float32", help="backbone dtype for `lamp eval` (the server's)")
    p.add_argument("--quantization", default="none", help="backbone quantization for `lamp eval` (the server's)")
    p.add_argument("--out", help="write the JSON report here")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def lm_eval_runs(url: str, tokenizer: Path) -> dict[str, list[str]]:
    """The harness's command lines (after `python -m lm_eval`), by run name."""
    completions = (f"model={TASK},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={tokenizer},max_retries=1,timeout=300")
    chat = f"model={TASK},base_url={url}/v1/chat/completions,max_retries=1,timeout=300"
    return {
        "completions": ["--model", "local-completions", "--model_args", completions,
                        "--tasks", "lamp_triage_gen,lamp_triage_mc"],
        "chat_input_template": ["--model", "local-chat-completions", "--model_args", chat, "--apply_chat_template",
                                "--tasks", "lamp_triage_chat", "--gen_kwargs", "chat_format=input_template"],
        "chat_chat_template": ["--model", "local-chat-completions", "--model_args", chat, "--apply_chat_template",
                               "--tasks", "lamp_triage_chat", "--gen_kwargs", "chat_format=chat_template"],
    }


def run_lm_eval(args: list[str], limit: int) -> dict:
    """One harness run; its results JSON and logged samples (by task)."""
    with tempfile.TemporaryDirectory(prefix="lm-eval-") as out:
        command = [sys.executable, "-m", "lm_eval", *args, "--include_path", str(TASKS_DIR),
                   "--limit", str(limit), "--output_path", out, "--log_samples"]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=LM_EVAL_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"lm_eval failed ({done.returncode}):\n{done.stderr[-4000:]}")
        results = json.loads(max(Path(out).rglob("results_*.json")).read_text())
        samples = {}
        for path in Path(out).rglob("samples_*.jsonl"):
            task = path.name[len("samples_"):].rsplit("_", 1)[0]
            samples[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"results": results["results"], "samples": samples}


def run_lamp_eval(limit: int, dtype: str, quantization: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="lamp-eval-") as out:
        report = Path(out) / "eval.json"
        command = [sys.executable, "-m", "serving.cli", "eval", "--adapter", f"prompts/{TASK}.safetensors",
                   "--data", DATA, "--limit", str(limit), "--no-zero-shot", "--no-progress",
                   "--dtype", dtype, "--quantization", quantization, "--out", str(report)]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=LM_EVAL_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"lamp eval failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(report.read_text())


def scores(runs: dict) -> dict[str, float]:
    """The headline score of each (run, task)."""
    metric = {"lamp_triage_gen": "exact_match,answer", "lamp_triage_chat": "exact_match,answer",
              "lamp_triage_mc": "acc,none"}
    return {f"{run}/{task}": values[metric[task]]
            for run, outcome in runs.items() for task, values in outcome["results"].items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    tokenizer, _ = backbone_folder(BackboneOptions())
    runs = {name: run_lm_eval(cmd, args.limit) for name, cmd in lm_eval_runs(args.url, tokenizer).items()}
    lamp_eval = run_lamp_eval(args.limit, args.dtype, args.quantization)
    report = {
        "command": full_command("python -m evals.harness", build_parser(), args), "out": args.out,
        "rewrite_with": "python -m evals.harness --url URL --limit 40 --out docs/bench/harness.json "
                        "(a float32 `lamp serve` of the bundled prompts/ at URL)",
        "machine": machine_context(),
        "rows": args.limit, "task": TASK, "data": DATA,
        "lm_eval_commands": {name: "python -m lm_eval " + shlex.join(cmd) + f" --include_path evals/tasks "
                             f"--limit {args.limit}" for name, cmd in lm_eval_runs("URL", Path("TOKENIZER")).items()},
        "scores": scores(runs),
        "lamp_eval": lamp_eval,
        "seconds": round(time.perf_counter() - started, 1),
        "runs": runs,
    }
    print(json.dumps(report["scores"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
