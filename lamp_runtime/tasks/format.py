"""How a task's input and target are joined into text: one definition for training and serving.

A tuned prompt only works on text shaped like the text it was trained on, so the trainer, `lamp
eval` and every client of the server build their inputs with `format_input`:

    soft prompt | "Input: <text>\\nAnswer:" | " <target>" <eos>

The client sends `format_input(text)` as the request's `input`; the server passes it through
unchanged and the model completes it with " <target>" and stops at EOS. The cue is the same
one `tasks.synthetic.zero_shot_prompt` ends with, so the zero-shot baseline is exactly the
instruction followed by `format_input(text)` and the two are compared on equal terms.

The prompt and the target are tokenized separately (never as one string), so the token
boundary the model learns at is exactly where generation starts at serve time.
"""

from __future__ import annotations

import re

INPUT_TEMPLATE = "Input: {input}\nAnswer:"
TARGET_PREFIX = " "
# Answers are one line: the first non-empty line of a completion is its answer.
ANSWER_STOP = "\n"


def format_input(text: str) -> str:
    """The exact text a client sends (and the trainer feeds) for one input."""
    return INPUT_TEMPLATE.format(input=text)


def format_target(target: str) -> str:
    """The completion the model learns to produce after `format_input(text)` (EOS is added as a token)."""
    return TARGET_PREFIX + target


def normalize_answer(completion: str) -> str:
    """The answer a completion gives: its first non-empty line, without surrounding spaces."""
    return completion.strip().split(ANSWER_STOP, 1)[0].strip()


def labels_in(completion: str, labels: tuple[str, ...]) -> set[str]:
    """The labels a completion names, as whole words, ignoring case."""
    text = completion.lower()
    return {label for label in labels if re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", text)}


def answer_matches(completion: str, target: str, labels: tuple[str, ...] | None) -> bool:
    """Does a completion give the target answer?

    Classification (`labels` given): the completion names the target label and no other one,
    so a zero-shot "The answer is: Billing." counts while "Sports, Business, Science" does not.
    Structured answers (`labels` None): the first non-empty line must equal the target exactly.
    """
    if labels:
        return labels_in(completion, labels) == {target.strip().lower()}
    return normalize_answer(completion) == target.strip()
