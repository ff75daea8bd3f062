"""Train the bundled tasks' adapters again, each with the recipe its metadata records, on another
backbone: a soft prompt is tuned to the exact function of the weights it was trained on, so a
backbone with other numerics (a requantized GGUF: lamp_runtime/llamacpp/requantize.py) needs its
own adapters (prompts/README.md, "train on the numerics you serve").

    .venv/bin/python -m lamp_runtime.training.retrain --backbone FILE.gguf --out build/prompts-q4_0
        [--tasks sentiment topic] [--prompts prompts]

For every task: `lamp train` on prompts/data/<task>/train.jsonl with the bundled adapter's method,
l, r, p, steps, batch size, learning rate and seed, 16 training rows held out to pick the best of
two evals, in float32 on the backbone's weights as stored (dequantized). Writes
<out>/<task>.safetensors; score them with `python -m lamp_runtime.bench.accuracy --adapters <out>`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..adapters.safetensors_io import parse_header, read_limited
from ..tasks.synthetic import TASKS

HOLDOUT_ROWS = 16
MAX_ADAPTER_BYTES = 64 * 2**20  # a bundled adapter is tens of kB


def recipe(adapter: Path) -> dict[str, str]:
    """The metadata a bundled adapter file records (how it was trained)."""
    return parse_header(read_limited(adapter, MAX_ADAPTER_BYTES))[0]


def train_argv(meta: dict[str, str], task: str, data: Path, backbone: str, out: Path) -> list[str]:
    """`lamp train`'s arguments for `task` with the recipe in an adapter's metadata `meta`."""
    if meta.get("method", "lamp") != "lamp":
        raise ValueError(f"{task}: the bundled adapter's method is {meta.get('method')!r}; retrain runs LAMP recipes")
    steps = int(meta["steps"])
    return ["train", "--backbone", backbone, "--dtype", "float32", "--quantization", "none",
            "--data", str(data / task / "train.jsonl"), "--holdout", str(HOLDOUT_ROWS),
            "-l", meta["l"], "-r", meta["r"], "-p", meta["p"], "--max-steps", str(steps),
            "--batch-size", meta["batch_size"], "--eval-every", str(max(1, steps // 2)),
            "--lr", meta["learning_rate"], "--seed", meta["seed"], "--task", task,
            "--out", str(out / f"{task}.safetensors"), "--no-progress"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, help="the backbone to train on (a GGUF file or HF folder)")
    parser.add_argument("--out", type=Path, required=True, help="folder for <task>.safetensors")
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument("--prompts", type=Path, default=Path("prompts"),
                        help="the bundled adapters (recipes) and data/<task>/train.jsonl")
    args = parser.parse_args(argv)
    from .cli import register

    train_parser = argparse.ArgumentParser(prog="lamp")
    register(train_parser.add_subparsers())
    args.out.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        argv_task = train_argv(recipe(args.prompts / f"{task}.safetensors"), task, args.prompts / "data",
                               args.backbone, args.out)
        print("lamp " + " ".join(argv_task), flush=True)
        parsed = train_parser.parse_args(argv_task)
        parsed.func(parsed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
