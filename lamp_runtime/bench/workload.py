"""What the benches feed the engine: realistic LAMP factors, task inputs, and the machine context.

Timing does not depend on what a prompt has learned, only on its shape, so the adapters here are
not trained: their factors are the truncated SVD of real vocabulary embeddings (the usual
prompt-tuning initialisation), which keeps activations in the range a trained prompt produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import AdapterMeta, LampAdapter
from ..errors import require_at_least
from ..machine import load_average, machine_context  # noqa: F401 (the benches' import)
from ..tasks.synthetic import get_task

# The bundled adapters and their data (the repository's prompts/ folder).
BUNDLED_PROMPTS = Path(__file__).resolve().parents[2] / "prompts"


@dataclass(frozen=True)
class GenerationBenchConfig:
    """What the benches that generate through a transformers step core take (`lamp bench batching`)."""

    rank: int = 16  # LAMP rank of the bench's adapters
    new_tokens: int = 8  # generated per request, EOS ignored
    repeats: int = 3  # recorded rounds
    warmup: int = 1  # untimed rounds first
    task: str = "support_triage"  # the synthetic task whose inputs are sent
    seed: int = 0

    def __post_init__(self):
        require_at_least(self, 1, "rank", "new_tokens", "repeats")
        require_at_least(self, 0, "warmup")


def lamp_from_prompt(prompt: torch.Tensor, rank: int, pool: int, task: str | None = None) -> LampAdapter:
    """LAMP factors U [l, r], Q [r], V [r, d] of `prompt` by truncated SVD, as LAMP initialises them."""
    if not 1 <= rank <= min(prompt.shape):
        raise ValueError(f"rank must be in 1..{min(prompt.shape)} for a {list(prompt.shape)} prompt, got {rank}")
    u, s, vh = torch.linalg.svd(prompt.float(), full_matrices=False)
    return LampAdapter(AdapterMeta(pool=pool, task=task), u[:, :rank].contiguous(), s[:rank].contiguous(),
                       vh[:rank].contiguous())


def vocabulary_prompt(embedding_weight: torch.Tensor, length: int, seed: int) -> torch.Tensor:
    """`length` rows of the backbone's input embeddings, drawn with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, embedding_weight.shape[0], (length,), generator=generator)
    return embedding_weight.detach()[rows].float().cpu().clone()


def embedded_prompt(backbone, length: int, seed: int) -> torch.Tensor:
    """`length` token embeddings drawn with a fixed seed, through any engine's backbone (its `embed`)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(backbone.tokenizer), (length,), generator=generator)
    return backbone.embed(ids).float().cpu().clone()


def gaussian_prompt(hidden_size: int, length: int, seed: int, std: float = 0.05) -> torch.Tensor:
    """A prompt with embedding-like scale, for benches that never run the model."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(length, hidden_size, generator=generator) * std


def task_inputs(task: str, count: int, seed: int = 0) -> list[str]:
    """`count` distinct inputs of a bundled synthetic task (same task and seed, same inputs)."""
    return [row["input"] for row in get_task(task).generate(count, seed)]
