"""Trainable soft-prompt parametrisations: LAMP factors and plain prompt tuning (the baseline).

Both are small `nn.Module`s holding the only trainable tensors of a run; `prompt()` returns the
[pooled tokens, d] prompt that is prepended to the input embeddings, built with the same
`prompt_math` functions the server uses, so what is trained is exactly what is served.
"""

from __future__ import annotations

import torch

from ..adapters import AdapterMeta, LampAdapter, PromptAdapter, SoftPromptAdapter
from ..prompt_math import average_pool, compressed_outer_product, pooled_length

METHODS = ("lamp", "pt")


def vocab_init(embedding_weight: torch.Tensor, length: int, generator: torch.Generator,
               exclude_ids: set[int] = frozenset()) -> torch.Tensor:
    """`length` distinct, randomly chosen token embeddings (the usual prompt-tuning init) -> [l, d] fp32.

    Special tokens are left out: their embeddings carry chat-template structure, not content.
    """
    vocab = embedding_weight.shape[0]
    order = torch.randperm(vocab, generator=generator)
    if exclude_ids:
        order = order[~torch.isin(order, torch.tensor(sorted(exclude_ids), dtype=order.dtype))]
    if length > order.numel():
        raise ValueError(f"prompt length {length} is larger than the usable vocabulary ({order.numel()})")
    return embedding_weight[order[:length].to(embedding_weight.device)].detach().float().cpu().clone()


def text_init(embedding_weight: torch.Tensor, token_ids: list[int], length: int) -> torch.Tensor:
    """Embeddings of a text's tokens -> [l, d] fp32 (as PEFT's TEXT init does).

    A text longer than l keeps its first l tokens; a shorter one is repeated to fill l rows.
    """
    if not token_ids:
        raise ValueError("--init-text tokenizes to no tokens")
    repeats = -(-length // len(token_ids))
    ids = torch.tensor((token_ids * repeats)[:length], device=embedding_weight.device)
    return embedding_weight[ids].detach().float().cpu().clone()


class PromptMethod(torch.nn.Module):
    """Holds the trainable tensors of one soft prompt and builds the prompt from them."""

    kind = "base"

    def __init__(self, prompt_tokens: int, pool: int):
        super().__init__()
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.prompt_tokens = prompt_tokens
        self.pool = pool

    @property
    def pooled_tokens(self) -> int:
        return pooled_length(self.prompt_tokens, self.pool)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def prompt(self) -> torch.Tensor:
        raise NotImplementedError

    def to_adapter(self, meta: AdapterMeta) -> PromptAdapter:
        raise NotImplementedError


class LampPrompt(PromptMethod):
    """LAMP: P [l, d] is factored by truncated SVD into U [l, r], Q [r], V [r, d]; only those train.

    The prompt is rebuilt every step as avg_pool(U·diag(Q)·V, p), so gradients reach the factors
    through the compressed outer product and the pooling.
    """

    kind = "lamp"

    def __init__(self, initial_prompt: torch.Tensor, rank: int, pool: int):
        length, dim = initial_prompt.shape
        super().__init__(length, pool)
        if not 1 <= rank <= min(length, dim):
            raise ValueError(f"rank r={rank} must be in 1..min(l, d) = {min(length, dim)}")
        u, s, vh = torch.linalg.svd(initial_prompt.float(), full_matrices=False)
        self.u = torch.nn.Parameter(u[:, :rank].contiguous())
        self.q = torch.nn.Parameter(s[:rank].contiguous())
        self.v = torch.nn.Parameter(vh[:rank].contiguous())

    def prompt(self) -> torch.Tensor:
        return average_pool(compressed_outer_product(self.u, self.q, self.v), self.pool)

    def to_adapter(self, meta: AdapterMeta) -> LampAdapter:
        return LampAdapter(meta, *(t.detach().clone() for t in (self.u, self.q, self.v)))


class PlainPrompt(PromptMethod):
    """Plain prompt tuning (Lester et al.): every entry of P [l, d] is trained."""

    kind = "pt"

    def __init__(self, initial_prompt: torch.Tensor, pool: int = 1):
        super().__init__(initial_prompt.shape[0], pool)
        self.weight = torch.nn.Parameter(initial_prompt.float().clone())

    def prompt(self) -> torch.Tensor:
        return average_pool(self.weight, self.pool)

    def to_adapter(self, meta: AdapterMeta) -> SoftPromptAdapter:
        return SoftPromptAdapter(meta, self.weight.detach().clone())


def build_method(method: str, initial_prompt: torch.Tensor, rank: int, pool: int) -> PromptMethod:
    if method == "lamp":
        return LampPrompt(initial_prompt, rank, pool)
    if method == "pt":
        return PlainPrompt(initial_prompt, pool)
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
