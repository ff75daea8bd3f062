"""Accuracy of a soft prompt (or of the zero-shot instruction) through the serving Engine.

The same engine the server runs does the generation (batched, greedy), and inputs are built
with `tasks.format`, so a score here is what a client of the server would see.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from ..hf.step_engine import StepEngine
from ..requests import GenerationRequest, SamplingParams
from ..tasks.format import answer_matches, format_input, format_target

# Targets drawn from at most this many distinct values are treated as class labels.
MAX_LABELS = 20
# Zero-shot answers often open with a preamble ("The answer is"); give them room for it.
ZERO_SHOT_EXTRA_TOKENS = 12


def instructed_input(instruction: str, text: str) -> str:
    """The zero-shot prompt: instruction, blank line, then the same input shape the adapters see.

    Equal to `tasks.synthetic.zero_shot_prompt` for the bundled tasks (a test keeps them equal).
    """
    return f"{instruction}\n\n{format_input(text)}"


def label_set(rows: list[dict[str, str]]) -> tuple[str, ...]:
    """The distinct targets of the rows, lowercased (the classes of a classification set)."""
    return tuple(sorted({row["target"].strip().lower() for row in rows}))


def infer_labels(rows: list[dict[str, str]]) -> tuple[str, ...] | None:
    """The label set when the targets look like classes (few distinct values), else None (exact match)."""
    labels = label_set(rows)
    return labels if len(labels) <= MAX_LABELS else None


@dataclass
class EvalReport:
    name: str
    correct: int
    total: int
    soft_prompt_tokens: int
    mean_input_tokens: float
    seconds: float
    mistakes: list[dict] = field(default_factory=list)  # a few, for reading

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}


def answer_budget(tokenizer, rows: list[dict[str, str]]) -> int:
    """max_new_tokens: room for the longest target plus EOS and a little slack to see overruns."""
    return max(len(tokenizer(format_target(row["target"]))["input_ids"]) for row in rows) + 2


def chat_wrapped(tokenizer, text: str) -> str:
    """`text` as the user turn of the backbone's chat template, ready for the assistant's reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def evaluate(engine: StepEngine, rows: list[dict[str, str]], name: str, task_id: str | None = None,
             instruction: str | None = None, chat: bool = False, labels: tuple[str, ...] | None = None,
             batch_size: int = 16, progress: bool = True, keep_mistakes: int = 5) -> EvalReport:
    """Greedy-generate an answer for every row and count matches.

    `task_id` selects a registered adapter (None: no soft prompt); `instruction` is prepended
    as text (the zero-shot row); `chat` wraps that in the chat template, which an instruct
    backbone often follows better than the bare completion prompt. Rows go to the engine
    `batch_size` at a time, shortest first, so a batch pads little; the order does not change
    greedy answers. With `labels` (a classification task's classes) an answer matches when it
    names the target and no other class; without, its first line must equal the target.
    """
    tokenizer = engine.backbone.tokenizer
    # No stop string: a zero-shot model often starts with a newline before answering. Tuned
    # prompts end with EOS, so the extra room only matters for the zero-shot rows.
    budget = answer_budget(tokenizer, rows) + (ZERO_SHOT_EXTRA_TOKENS if instruction else 0)
    params = SamplingParams(max_new_tokens=budget)
    texts = [instructed_input(instruction, r["input"]) if instruction else format_input(r["input"]) for r in rows]
    if chat:
        texts = [chat_wrapped(tokenizer, text) for text in texts]
    order = sorted(range(len(rows)), key=lambda i: len(texts[i]))
    completions: dict[int, object] = {}
    started = time.perf_counter()
    with tqdm(total=len(rows), desc=f"eval {name}", disable=not progress, unit="row", dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            results = engine.generate([GenerationRequest(texts[i], task_id, params) for i in chunk])
            completions.update(zip(chunk, results))
            bar.update(len(chunk))
    seconds = time.perf_counter() - started
    correct, mistakes = 0, []
    for i, row in enumerate(rows):
        result = completions[i]
        if answer_matches(result.text, row["target"], labels):
            correct += 1
        elif len(mistakes) < keep_mistakes:
            mistakes.append({"input": row["input"], "target": row["target"], "completion": result.text})
    soft = completions[0].soft_prompt_tokens
    mean_input = sum(c.input_tokens for c in completions.values()) / len(rows)
    return EvalReport(name, correct, len(rows), soft, mean_input, seconds, mistakes)
