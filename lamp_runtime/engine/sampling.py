"""Next-token selection with each request's own sampling parameters.

Each request samples with its own `torch.Generator`, so a seeded request draws the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import torch

from ..requests import SamplingParams


def make_generator(params: SamplingParams, device: torch.device, index: int = 0) -> torch.Generator | None:
    """The generator sample `index` of the request draws with (None when greedy)."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    seed = params.sample_seed(index)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
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
