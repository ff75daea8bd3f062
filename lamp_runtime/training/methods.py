"""Trainable soft-prompt parametrisations: LAMP factors, plain prompt tuning (the baseline) and EPT.

Each is a small `nn.Module` holding the only trainable tensors of a run; `prompt()` returns the
[pooled tokens, d] prompt that is prepended to the input embeddings and `offset()` the [s, d]
rows added to the first input tokens (EPT only), built with the same math the server uses, so
what is trained is exactly what is served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import AdapterMeta, EptAdapter, LampAdapter, PromptAdapter, SoftPromptAdapter
from ..prompts.math import average_pool, compressed_outer_product, pooled_length

# `lamp train --method` names -> the adapter kind each one trains. "pt" (prompt tuning, the
# baseline's usual name) trains a plain `soft_prompt`.
METHODS = {"lamp": "lamp", "pt": "soft_prompt", "ept": "ept"}


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

    def offset(self) -> torch.Tensor | None:
        """Rows added to the first input token embeddings, or None."""
        return None

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


class SoftPromptTuning(PromptMethod):
    """Plain prompt tuning (Lester et al., `--method pt`): every entry of P [l, d] is trained."""

    kind = "soft_prompt"

    def __init__(self, initial_prompt: torch.Tensor, pool: int = 1):
        super().__init__(initial_prompt.shape[0], pool)
        self.weight = torch.nn.Parameter(initial_prompt.float().clone())

    def prompt(self) -> torch.Tensor:
        return average_pool(self.weight, self.pool)

    def to_adapter(self, meta: AdapterMeta) -> SoftPromptAdapter:
        return SoftPromptAdapter(meta, self.weight.detach().clone())


class EptPrompt(PromptMethod):
    """EPT (multi-space projection and prompt fusion): a short prompt P [m, d] plus a low-rank
    offset A [s, r]·B [r, d] added to the first s input token embeddings.

    Two training-time modules shape the prompt, as in the seed paper:
    - prompt fusion: P attends over the rows of A·B (what the offset has learned about the input
      positions) and adds the result, F = P + softmax(P·(A·B)ᵀ/√d)·(A·B);
    - multi-space projection: K residual low-rank maps of F, F_k = F + (F·D_k)·E_k, mixed by a
      gating network over the spaces, g = softmax(W·mean(F) + c), joint = Σ_k g_k·F_k.
    Neither depends on the input, so the joint prompt is one constant per task: `to_adapter`
    stores it as `ept.prompt` and the server never runs these modules.

    Init (why the scales): Adafactor steps each tensor relative to its own RMS, so nothing starts
    at exactly zero; B, E_k and W start at 10% of the embedding scale, so the offset and the
    projections begin as small perturbations of plain prompt tuning.
    """

    kind = "ept"

    def __init__(self, initial_prompt: torch.Tensor, rank: int, offset_tokens: int, spaces: int,
                 projection_rank: int, generator: torch.Generator):
        length, dim = initial_prompt.shape
        super().__init__(length, 1)
        for name, value in (("rank", rank), ("offset_tokens", offset_tokens), ("spaces", spaces),
                            ("projection_rank", projection_rank)):
            if value < 1:
                raise ValueError(f"EPT {name} must be >= 1, got {value}")
        scale = 0.1 * float(initial_prompt.float().pow(2).mean().sqrt())

        def randn(*shape, std):
            return torch.randn(*shape, generator=generator) * std

        self.short = torch.nn.Parameter(initial_prompt.float().clone())
        self.a = torch.nn.Parameter(randn(offset_tokens, rank, std=rank ** -0.5))
        self.b = torch.nn.Parameter(randn(rank, dim, std=scale))
        self.down = torch.nn.Parameter(randn(spaces, dim, projection_rank, std=dim ** -0.5))
        self.up = torch.nn.Parameter(randn(spaces, projection_rank, dim, std=scale))
        self.gate_weight = torch.nn.Parameter(randn(spaces, dim, std=dim ** -0.5))
        self.gate_bias = torch.nn.Parameter(torch.zeros(spaces))

    def offset(self) -> torch.Tensor:
        return self.a @ self.b

    def prompt(self) -> torch.Tensor:
        offset = self.offset()
        attention = torch.softmax(self.short @ offset.T / offset.shape[-1] ** 0.5, dim=-1)
        fused = self.short + attention @ offset
        spaces = fused + torch.einsum("md,kdh,khe->kme", fused, self.down, self.up)
        gates = torch.softmax(self.gate_weight @ fused.mean(0) + self.gate_bias, dim=0)
        return torch.einsum("k,kmd->md", gates, spaces)

    def to_adapter(self, meta: AdapterMeta) -> EptAdapter:
        with torch.no_grad():
            return EptAdapter(meta, self.prompt().clone(), self.a.detach().clone(), self.b.detach().clone())


@dataclass(frozen=True)
class EptShape:
    """EPT's sizes besides the short prompt length and the offset rank r: offset rows s and the
    multi-space projection (K spaces, each a rank-h residual map)."""

    offset_tokens: int = 32
    spaces: int = 2
    projection_rank: int = 1


def build_method(method: str, initial_prompt: torch.Tensor, rank: int, pool: int,
                 ept: EptShape | None = None, seed: int = 0) -> PromptMethod:
    if method == "lamp":
        return LampPrompt(initial_prompt, rank, pool)
    if method == "pt":
        return SoftPromptTuning(initial_prompt, pool)
    if method == "ept":
        if pool != 1:
            raise ValueError(f"EPT prompts are not pooled; got pool p={pool} (use -p 1)")
        shape = ept or EptShape()
        generator = torch.Generator().manual_seed(seed)
        return EptPrompt(initial_prompt, rank, shape.offset_tokens, shape.spaces, shape.projection_rank,
                         generator)
    raise ValueError(f"unknown method {method!r}; use one of {tuple(METHODS)}")
