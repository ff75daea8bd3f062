"""What every adapter kind shares: metadata, limits, value checks and the registry of kinds.

A kind is one small module (lamp.py, soft_prompt.py, ept.py; PEFT checkpoints load as soft
prompts, peft.py) holding a frozen dataclass of host tensors that says which tensors its files
carry, checks their shapes, and builds its prompt. files.KINDS lists the kinds by their metadata
`format`, so loading a file looks the kind up instead of branching on it (as PEFT registers its
tuners).

Every adapter is validated against the backbone (hidden size d) and `AdapterLimits` before it is
used; any problem raises `AdapterError` naming it. Nothing is ever unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from ..errors import AdapterError
from ..prompts.math import pooled_length

MAX_CONFIG_BYTES = 64 * 1024


@dataclass(frozen=True)
class AdapterLimits:
    """Bounds an adapter must respect before it is accepted (memory and latency safety)."""

    max_prompt_tokens: int = 1024
    max_rank: int = 256
    max_pool: int = 64
    max_file_bytes: int = 64 * 1024 * 1024
    max_abs_value: float = 1e4

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"AdapterLimits.{f.name} must be positive, got {getattr(self, f.name)}")


def parse_pool(value, what: str) -> int:
    """Pool comes from string metadata or a form field: accept only a plain positive integer.

    `what` names the value in the error ("model.safetensors: pool", "form field 'pool'").
    """
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise AdapterError(f"{what} must be an integer >= 1, got {value!r}")
    return int(text)


@dataclass(frozen=True)
class AdapterMeta:
    """Descriptive metadata carried in the safetensors header; unknown keys are kept in `extra`."""

    pool: int = 1
    base_model: str | None = None
    task: str | None = None
    description: str | None = None
    extra: dict = field(default_factory=dict)

    KNOWN = ("pool", "base_model", "task", "description")

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> "AdapterMeta":
        extra = {k: v for k, v in metadata.items() if k not in cls.KNOWN and k != "format"}
        return cls(
            pool=parse_pool(metadata.get("pool", "1"), f"{source}: pool"),
            base_model=metadata.get("base_model"),
            task=metadata.get("task"),
            description=metadata.get("description"),
            extra=extra,
        )

    def to_metadata(self, fmt: str) -> dict[str, str]:
        out = {"format": fmt, "pool": str(self.pool), **{k: str(v) for k, v in self.extra.items()}}
        for key in ("base_model", "task", "description"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class PromptAdapter:
    """Base of every kind: host-memory (float32, CPU) tensors of one adapter version."""

    meta: AdapterMeta

    kind: ClassVar[str] = "base"  # also the `format` value of its safetensors metadata
    TENSORS: ClassVar[tuple[str, ...]] = ()  # tensor names in its files, in constructor order

    @classmethod
    def from_tensors(cls, meta: AdapterMeta, tensors: dict[str, torch.Tensor]) -> "PromptAdapter":
        """Build from a file's tensors, which must be exactly `TENSORS` (not yet validated)."""
        check_exact_tensors(tensors, cls.TENSORS)
        return cls(meta, *(tensors[name] for name in cls.TENSORS))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f.name) for name, f in zip(self.TENSORS, fields(self)[1:])}

    @property
    def prompt_tokens(self) -> int:
        raise NotImplementedError

    @property
    def pooled_tokens(self) -> int:
        return pooled_length(self.prompt_tokens, self.meta.pool)

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def build_prompt(self) -> torch.Tensor:
        """The [pooled_tokens, d] float32 prompt that is prepended to the input embeddings."""
        raise NotImplementedError

    def build_offset(self) -> torch.Tensor | None:
        """An [s, d] offset added to the first input-token embeddings, or None (most kinds)."""
        return None

    def hidden_size(self, limits: AdapterLimits) -> int:
        """Check the tensors' shapes (and ranks) against each other and `limits`; return their d."""
        raise NotImplementedError

    def products(self) -> dict[str, torch.Tensor]:
        """Tensors the factors multiply into, which must respect the magnitude limit too."""
        return {}

    def validate(self, hidden_size: int, limits: AdapterLimits) -> "PromptAdapter":
        """Check shapes against the backbone's hidden size and the limits, and every value; return
        the adapter. Done once, before a version is written (a stored version is then known by its
        hash: reading it back needs only `check_fits`)."""
        self.check_fits(hidden_size, limits)
        for name, tensor in self.tensors().items():
            check_values(name, tensor, limits)
        # Bounded factors can still multiply into huge prompts (1e4 * 1e4 * 1e4 ...), which would
        # overflow a float16 backbone into inf; the product must respect the same limit.
        for name, tensor in self.products().items():
            check_values(name, tensor, limits)
        return self

    def check_fits(self, hidden_size: int, limits: AdapterLimits) -> "PromptAdapter":
        """The shape checks alone (cheap: no value is read): this backbone and these limits may
        differ from the ones the version was validated for when it was written."""
        check_fit(self.hidden_size(limits), self.prompt_tokens, self.meta.pool, hidden_size, limits)
        return self


def check_fit(d: int, prompt_tokens: int, pool: int, hidden_size: int, limits: AdapterLimits) -> None:
    """An adapter of hidden size `d`, length `prompt_tokens` and block `pool` fits this backbone and
    these limits (an adapter's `check_fits`, and a stored version's record: serving/store/files.py)."""
    if d != hidden_size:
        raise AdapterError(f"hidden size d={d} does not match the backbone's hidden size {hidden_size}")
    if not 1 <= prompt_tokens <= limits.max_prompt_tokens:
        raise AdapterError(f"prompt length l={prompt_tokens} outside 1..{limits.max_prompt_tokens}")
    if pool > limits.max_pool:
        raise AdapterError(f"pool p={pool} above the limit {limits.max_pool}")


def check_values(name: str, tensor: torch.Tensor, limits: AdapterLimits) -> None:
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"tensor {name!r} contains NaN or Inf values")
    peak = tensor.abs().max().item() if tensor.numel() else 0.0
    if peak > limits.max_abs_value:
        raise AdapterError(f"tensor {name!r} has |value| {peak:.3g} above the limit {limits.max_abs_value:g}")


def check_exact_tensors(tensors: dict, expected: tuple[str, ...]) -> None:
    missing = [n for n in expected if n not in tensors]
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(f"expected tensors {list(expected)}; missing {missing}, unexpected {extra}")


def check_rank(what: str, rank: int, limits: AdapterLimits) -> None:
    if not 1 <= rank <= limits.max_rank:
        raise AdapterError(f"{what} rank r={rank} outside 1..{limits.max_rank}")
