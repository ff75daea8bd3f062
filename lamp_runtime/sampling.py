"""Per-request sampling parameters and next-token selection.

Each request samples with its own `torch.Generator`, so a seeded request draws the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# What torch.Generator.manual_seed accepts (int64 or uint64); beyond it raises ValueError.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past EOS (benchmarks want a fixed token count)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and 0 <= self.temperature <= 100):
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise RequestError(f"top_k must be null or an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not MIN_SEED <= self.seed <= MAX_SEED):
            raise RequestError(f"seed must be null or an integer in [{MIN_SEED}, {MAX_SEED}], got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise RequestError(
                f"stop must be at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars"
            )
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token id from one row of logits [vocab]."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        kth_value = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_value, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already cover top_p (the first always stays)
        drop = torch.cumsum(probs, dim=-1) - probs > params.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
