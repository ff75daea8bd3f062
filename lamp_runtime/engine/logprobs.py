"""Log-probabilities of tokens, from the model's own distribution (the raw logits: before
temperature, top-k and top-p, as vLLM reports them by default), in the shape every engine returns.

Computed in float32 from the same logits row the sampler draws from, so they match a direct
transformers forward of the same sequence (tests/runtime/test_logprobs.py checks it to 1e-4).
"""

from __future__ import annotations

import torch

from ..requests import TokenLogprob


def token_logprobs(logits: torch.Tensor, targets: list[int], k: int, tokenizer) -> list[TokenLogprob]:
    """For each row of `logits` [M, vocab], the log-probability of `targets[m]` and the `k` most
    likely tokens (best first)."""
    if not targets:
        return []
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    chosen = log_probs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
    top_values, top_ids = (log_probs.topk(k, dim=-1) if k else (None, None))
    out = []
    for m, token_id in enumerate(targets):
        top = ()
        if k:
            ids = top_ids[m].tolist()
            top = tuple((_text(tokenizer, i), i, v) for i, v in zip(ids, top_values[m].tolist()))
        out.append(TokenLogprob(token_id, _text(tokenizer, token_id), chosen[m], top))
    return out


def prompt_logprobs(logits: torch.Tensor, soft_tokens: int, input_ids: list[int], k: int,
                    tokenizer) -> list[TokenLogprob]:
    """Log-probabilities of the input tokens, from `logits` [soft + len(input), vocab] of a forward
    over [soft prompt ; input]: position p predicts the token at p + 1. The first input token is
    predicted by the soft prompt's last position; with no soft prompt nothing precedes it (its
    logprob is None, as OpenAI's echo answers)."""
    if not input_ids:
        return []
    first = soft_tokens - 1  # the position predicting input token 0
    if first < 0:
        head = TokenLogprob(input_ids[0], _text(tokenizer, input_ids[0]), None)
        return [head] + token_logprobs(logits[: len(input_ids) - 1], input_ids[1:], k, tokenizer)
    return token_logprobs(logits[first: first + len(input_ids)], input_ids, k, tokenizer)


def _text(tokenizer, token_id: int) -> str:
    """One token as text on its own (a piece of a multi-byte character decodes to U+FFFD)."""
    return tokenizer.decode([token_id])
