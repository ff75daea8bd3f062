"""Synthetic task data: deterministic, balanced, well-formed, disjoint train/eval splits."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from lamp_runtime.tasks.synthetic import EXTRACT_TARGET_PATTERN, LONG_INSTRUCTION, TASKS, write_splits, zero_shot_prompt

TASK_NAMES = sorted(TASKS)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_four_tasks_are_registered():
    assert set(TASKS) == {"sentiment", "topic", "extract", "support_triage"}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_gives_identical_rows(name):
    assert TASKS[name].generate(60, seed=3) == TASKS[name].generate(60, seed=3)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_different_seeds_give_different_rows(name):
    assert TASKS[name].generate(60, seed=3) != TASKS[name].generate(60, seed=4)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_rows_have_string_fields_and_distinct_inputs(name):
    rows = TASKS[name].generate(200, seed=0)
    assert len(rows) == 200
    assert all(set(row) == {"input", "target"} for row in rows)
    assert all(isinstance(row["input"], str) and row["input"] for row in rows)
    assert len({row["input"] for row in rows}) == len(rows)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_target_is_a_label_or_matches_the_extraction_format(name):
    task = TASKS[name]
    for row in task.generate(300, seed=1):
        target = row["target"]
        assert target == target.strip(), f"target has surrounding whitespace: {target!r}"
        if task.labels is None:
            assert re.match(EXTRACT_TARGET_PATTERN, target), target
        else:
            assert target in task.labels


@pytest.mark.parametrize("name", [n for n in TASK_NAMES if TASKS[n].labels is not None])
def test_labels_are_balanced_within_ten_percent(name):
    task = TASKS[name]
    n = 400
    counts = Counter(row["target"] for row in task.generate(n, seed=2))
    expected = n / len(task.labels)
    assert set(counts) == set(task.labels)
    for label, count in counts.items():
        assert abs(count - expected) <= 0.1 * expected, f"{label}: {count} vs {expected}"


def test_extract_target_names_the_person_age_and_city_from_the_input():
    for row in TASKS["extract"].generate(100, seed=0):
        fields = dict(part.split("=", 1) for part in row["target"].split("; "))
        assert list(fields) == ["name", "age", "city"]
        for value in fields.values():
            assert value in row["input"]


def test_long_instruction_is_long_and_is_the_triage_baseline():
    assert 1500 < len(LONG_INSTRUCTION) <= 2500
    assert TASKS["support_triage"].instruction == LONG_INSTRUCTION
    for label in TASKS["support_triage"].labels:
        assert label in LONG_INSTRUCTION


@pytest.mark.parametrize("name", [n for n in TASK_NAMES if n != "support_triage"])
def test_short_instructions_list_the_allowed_outputs(name):
    task = TASKS[name]
    assert len(task.instruction) < 300
    for label in task.labels or ("name=", "age=", "city="):
        assert label in task.instruction


def test_zero_shot_prompt_has_instruction_input_and_answer_cue():
    prompt = zero_shot_prompt("topic", "The senate passed the bill.")
    assert prompt.startswith(TASKS["topic"].instruction)
    assert "The senate passed the bill." in prompt
    assert prompt.endswith("\nAnswer:")


def test_unknown_task_name_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="no_such_task"):
        zero_shot_prompt("no_such_task", "hello")
    with pytest.raises(ValueError, match="no_such_task"):
        write_splits("no_such_task", "unused")


def test_negative_row_count_is_rejected():
    with pytest.raises(ValueError, match="-1"):
        TASKS["sentiment"].generate(-1, seed=0)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_write_splits_writes_disjoint_parseable_jsonl(tmp_path, name):
    train_path, eval_path = write_splits(name, tmp_path, n_train=120, n_eval=40, seed=5)
    assert train_path == tmp_path / name / "train.jsonl"
    assert eval_path == tmp_path / name / "eval.jsonl"
    train, held_out = read_jsonl(train_path), read_jsonl(eval_path)
    assert (len(train), len(held_out)) == (120, 40)
    assert not {row["input"] for row in train} & {row["input"] for row in held_out}
    assert len({row["input"] for row in held_out}) == len(held_out)
    if TASKS[name].labels is not None:
        eval_counts = Counter(row["target"] for row in held_out)
        assert max(eval_counts.values()) - min(eval_counts.values()) <= 1


def test_write_splits_is_reproducible(tmp_path):
    first = write_splits("support_triage", tmp_path / "a", n_train=50, n_eval=20, seed=7)
    second = write_splits("support_triage", tmp_path / "b", n_train=50, n_eval=20, seed=7)
    for path_a, path_b in zip(first, second):
        assert path_a.read_bytes() == path_b.read_bytes()
