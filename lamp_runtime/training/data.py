"""Training data: JSONL rows of {"input", "target"}, tokenized the way the server will see them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tasks.format import format_input, format_target

# A training file is read whole into memory; refuse anything far beyond a prompt-tuning set.
MAX_DATA_BYTES = 256 * 1024 * 1024


def load_rows(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """Read `{"input": str, "target": str}` rows; any malformed line is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.stat().st_size > MAX_DATA_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is over the {MAX_DATA_BYTES}-byte limit")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("input", "target")):
                raise ValueError(f'{path}:{number}: each line must be an object with string "input" and "target"')
            if not row["target"].strip():
                raise ValueError(f"{path}:{number}: target is empty")
            rows.append({"input": row["input"], "target": row["target"]})
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


@dataclass(frozen=True)
class Example:
    """One tokenized row: the prompt the client sends and the completion (ending in EOS) to learn."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def tokenize_rows(tokenizer, rows: list[dict[str, str]], max_input_tokens: int,
                  max_target_tokens: int) -> list[Example]:
    """Tokenize prompt and target separately, as they are split at serve time.

    Over-long inputs keep their last `max_input_tokens` tokens: the answer cue at the end must
    survive. An over-long target is an error, since a cut target teaches a wrong answer.
    """
    for name, value in (("max_input_tokens", max_input_tokens), ("max_target_tokens", max_target_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, so a completion's end cannot be learned")
    examples = []
    for index, row in enumerate(rows):
        prompt_ids = tokenizer(format_input(row["input"]))["input_ids"][-max_input_tokens:]
        # No special tokens on the target: a T5 tokenizer would append its own EOS before ours.
        target_ids = tokenizer(format_target(row["target"]), add_special_tokens=False)["input_ids"] + [eos]
        if len(target_ids) > max_target_tokens:
            raise ValueError(
                f"row {index}: target is {len(target_ids)} tokens with EOS, over --max-target-tokens "
                f"{max_target_tokens}"
            )
        examples.append(Example(tuple(prompt_ids), tuple(target_ids)))
    return examples


@dataclass
class Batch:
    """Right-padded token ids of prompt+target, and which positions hold target tokens.

    Right padding needs no attention mask under causal attention (padding comes after every
    real token) and keeps positions 0..n-1, exactly as the engine's left-padded rows see them.
    """

    token_ids: torch.Tensor  # [b, n]
    target_mask: torch.Tensor  # [b, n] bool: position holds a target token

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())


def collate(examples: list[Example], pad_id: int) -> Batch:
    width = max(e.length for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        tokens = example.prompt_ids + example.target_ids
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, len(example.prompt_ids) : len(tokens)] = True
    return Batch(ids, mask)
