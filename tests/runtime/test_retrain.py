"""training/retrain.py: each bundled adapter's recorded recipe becomes the `lamp train` command that
trains it again on another backbone (the parser `lamp train` uses accepts it, flag for flag)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lamp_runtime.training.cli import register
from lamp_runtime.training.retrain import recipe, train_argv

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"


def parse(argv):
    parser = argparse.ArgumentParser(prog="lamp")
    register(parser.add_subparsers())
    return parser.parse_args(argv)


@pytest.mark.parametrize("task", ["sentiment", "topic", "extract", "support_triage"])
def test_a_bundled_recipe_becomes_the_train_command(task, tmp_path):
    meta = recipe(PROMPTS / f"{task}.safetensors")
    args = parse(train_argv(meta, task, PROMPTS / "data", "other.gguf", tmp_path))
    assert (args.backbone, args.dtype, args.quantization) == ("other.gguf", "float32", "none")
    assert (args.prompt_length, args.rank, args.pool) == (int(meta["l"]), int(meta["r"]), int(meta["p"]))
    assert (args.max_steps, args.batch_size, args.lr, args.seed) == (
        int(meta["steps"]), int(meta["batch_size"]), float(meta["learning_rate"]), int(meta["seed"]))
    assert args.method == "lamp" and args.holdout == 16 and args.eval_every == int(meta["steps"]) // 2
    assert Path(args.data) == PROMPTS / "data" / task / "train.jsonl" and Path(args.data).is_file()
    assert Path(args.out) == tmp_path / f"{task}.safetensors" and args.task == task


def test_a_recipe_of_another_method_is_refused_by_name(tmp_path):
    meta = {**recipe(PROMPTS / "sentiment.safetensors"), "method": "ept"}
    with pytest.raises(ValueError, match="sentiment: the bundled adapter's method is 'ept'"):
        train_argv(meta, "sentiment", PROMPTS / "data", "other.gguf", tmp_path)
