"""Prompt adapter kinds, their configs, and strict loading from safetensors + JSON.

Kinds:
- `lamp`: factors U [l, r], Q [r], V [r, d]; prompt = avg_pool(U·diag(Q)·V, p).
- `soft_prompt`: a plain prompt [l, d], optionally pooled.
- `peft_prompt_tuning`: an HF PEFT PROMPT_TUNING / P_TUNING folder, served as a soft prompt.
- `ept`: EPT/DePT-style: a short joint prompt [m, d] plus a low-rank offset A [s, r] · B [r, d] added
  to the embeddings of the first s input tokens (an input of L < s tokens gets the first L rows).

Every loader validates against the backbone (hidden size d) and `AdapterLimits` before returning;
any problem raises `AdapterError` naming it. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .errors import AdapterError
from .prompt_cache import PreparedPrompt
from .prompt_math import average_pool, compressed_outer_product, pooled_length
from .safetensors_io import load_tensors, read_limited

LAMP_TENSORS = ("lamp.U", "lamp.Q", "lamp.V")
EPT_TENSORS = ("ept.prompt", "ept.A", "ept.B")
PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")
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


def _parse_pool(value, source: str) -> int:
    """Pool comes from string metadata or a form field: accept only a plain positive integer."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise AdapterError(f"{source}: pool must be an integer >= 1, got {value!r}")
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
            pool=_parse_pool(metadata.get("pool", "1"), source),
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
    """Base: host-memory (float32, CPU) parameters of one adapter version."""

    meta: AdapterMeta

    kind = "base"

    @property
    def prompt_tokens(self) -> int:
        raise NotImplementedError

    @property
    def pooled_tokens(self) -> int:
        return pooled_length(self.prompt_tokens, self.meta.pool)

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def build_prompt(self) -> torch.Tensor:
        """The [pooled_tokens, d] float32 prompt that is prepended to the input embeddings."""
        raise NotImplementedError

    def build_offset(self) -> torch.Tensor | None:
        """An [s, d] offset added to the first input-token embeddings, or None (most kinds)."""
        return None

    def prepare(self) -> PreparedPrompt:
        """Everything the engine needs, on the host in float32 (the prompt cache moves it)."""
        return PreparedPrompt(self.build_prompt(), self.build_offset())


@dataclass(frozen=True)
class LampAdapter(PromptAdapter):
    u: torch.Tensor = None
    q: torch.Tensor = None
    v: torch.Tensor = None

    kind = "lamp"

    @property
    def prompt_tokens(self) -> int:
        return self.u.shape[0]

    @property
    def rank(self) -> int:
        return self.q.shape[0]

    def tensors(self):
        return dict(zip(LAMP_TENSORS, (self.u, self.q, self.v)))

    def build_prompt(self) -> torch.Tensor:
        return average_pool(compressed_outer_product(self.u, self.q, self.v), self.meta.pool)


@dataclass(frozen=True)
class SoftPromptAdapter(PromptAdapter):
    prompt: torch.Tensor = None
    source_format: str = "soft_prompt"

    kind = "soft_prompt"

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.shape[0]

    def tensors(self):
        return {"prompt": self.prompt}

    def build_prompt(self) -> torch.Tensor:
        return average_pool(self.prompt, self.meta.pool)


@dataclass(frozen=True)
class EptAdapter(PromptAdapter):
    prompt: torch.Tensor = None
    a: torch.Tensor = None
    b: torch.Tensor = None

    kind = "ept"

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.shape[0]

    @property
    def offset_tokens(self) -> int:
        return self.a.shape[0]

    def tensors(self):
        return dict(zip(EPT_TENSORS, (self.prompt, self.a, self.b)))

    def build_prompt(self) -> torch.Tensor:
        return average_pool(self.prompt, self.meta.pool)

    def build_offset(self) -> torch.Tensor:
        return self.a @ self.b


def _check_values(name: str, tensor: torch.Tensor, limits: AdapterLimits) -> None:
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"tensor {name!r} contains NaN or Inf values")
    peak = tensor.abs().max().item() if tensor.numel() else 0.0
    if peak > limits.max_abs_value:
        raise AdapterError(f"tensor {name!r} has |value| {peak:.3g} above the limit {limits.max_abs_value:g}")


def _check_length(length: int, pool: int, limits: AdapterLimits) -> None:
    if not 1 <= length <= limits.max_prompt_tokens:
        raise AdapterError(f"prompt length l={length} outside 1..{limits.max_prompt_tokens}")
    if pool > limits.max_pool:
        raise AdapterError(f"pool p={pool} above the limit {limits.max_pool}")


def _check_exact_tensors(tensors: dict, expected: tuple[str, ...]) -> None:
    missing = [n for n in expected if n not in tensors]
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(f"expected tensors {list(expected)}; missing {missing}, unexpected {extra}")


def validate(adapter: PromptAdapter, hidden_size: int, limits: AdapterLimits) -> PromptAdapter:
    """Check shapes against the backbone's hidden size and the limits; return the adapter."""
    if isinstance(adapter, LampAdapter):
        u, q, v = adapter.u, adapter.q, adapter.v
        if u.dim() != 2 or q.dim() != 1 or v.dim() != 2:
            raise AdapterError(
                f"LAMP factors must be U [l, r], Q [r], V [r, d]; got U {list(u.shape)}, "
                f"Q {list(q.shape)}, V {list(v.shape)}"
            )
        r = q.shape[0]
        if u.shape[1] != r or v.shape[0] != r:
            raise AdapterError(
                f"LAMP rank mismatch: U {list(u.shape)}, Q {list(q.shape)}, V {list(v.shape)} "
                f"must share r (U [l, r], Q [r], V [r, d])"
            )
        if not 1 <= r <= limits.max_rank:
            raise AdapterError(f"LAMP rank r={r} outside 1..{limits.max_rank}")
        d = v.shape[1]
    elif isinstance(adapter, EptAdapter):
        p, a, b = adapter.prompt, adapter.a, adapter.b
        if p.dim() != 2 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or p.shape[1] != b.shape[1]:
            raise AdapterError(
                f"EPT tensors must be prompt [m, d], A [s, r], B [r, d]; got prompt {list(p.shape)}, "
                f"A {list(a.shape)}, B {list(b.shape)}"
            )
        if not 1 <= a.shape[1] <= limits.max_rank:
            raise AdapterError(f"EPT rank r={a.shape[1]} outside 1..{limits.max_rank}")
        if not 1 <= a.shape[0] <= limits.max_prompt_tokens:
            raise AdapterError(f"EPT offset length s={a.shape[0]} outside 1..{limits.max_prompt_tokens}")
        d = b.shape[1]
    elif isinstance(adapter, SoftPromptAdapter):
        if adapter.prompt.dim() != 2:
            raise AdapterError(f"prompt must be [l, d], got shape {list(adapter.prompt.shape)}")
        d = adapter.prompt.shape[1]
    else:
        raise AdapterError(f"unsupported adapter type {type(adapter).__name__}")
    if d != hidden_size:
        raise AdapterError(f"hidden size d={d} does not match the backbone's hidden size {hidden_size}")
    _check_length(adapter.prompt_tokens, adapter.meta.pool, limits)
    for name, tensor in adapter.tensors().items():
        _check_values(name, tensor, limits)
    # Bounded factors can still multiply into huge prompts (1e4 * 1e4 * 1e4 ...), which would
    # overflow a float16 backbone into inf; the product must respect the same limit.
    if isinstance(adapter, LampAdapter):
        _check_values("U·diag(Q)·V", compressed_outer_product(u.float(), q.float(), v.float()), limits)
    elif isinstance(adapter, EptAdapter):
        _check_values("A·B", a.float() @ b.float(), limits)
    return adapter


def adapter_from_safetensors(data: bytes, source: str = "adapter", pool: int | None = None) -> PromptAdapter:
    """Parse a LAMP, soft-prompt or EPT `.safetensors` payload (not yet validated against a backbone)."""
    metadata, tensors = load_tensors(data)
    if pool is not None:
        metadata = {**metadata, "pool": str(pool)}
    fmt = metadata.get("format")
    meta = AdapterMeta.from_metadata(metadata, source)
    if fmt == "lamp":
        _check_exact_tensors(tensors, LAMP_TENSORS)
        return LampAdapter(meta, *(tensors[n] for n in LAMP_TENSORS))
    if fmt == "soft_prompt":
        _check_exact_tensors(tensors, ("prompt",))
        return SoftPromptAdapter(meta, tensors["prompt"])
    if fmt == "ept":
        _check_exact_tensors(tensors, EPT_TENSORS)
        return EptAdapter(meta, *(tensors[n] for n in EPT_TENSORS))
    raise AdapterError(f"{source}: metadata format must be 'lamp', 'soft_prompt' or 'ept', got {fmt!r}")


def adapter_from_peft(config_bytes: bytes, model_bytes: bytes, source: str = "peft adapter",
                      pool: int | None = None) -> SoftPromptAdapter:
    """Parse an HF PEFT prompt-tuning checkpoint (adapter_config.json + adapter_model.safetensors)."""
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{source}: adapter_config.json is {len(config_bytes)} bytes, over {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{source}: adapter_config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{source}: adapter_config.json must be a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterError(f"{source}: peft_type must be one of {list(PEFT_TYPES)}, got {peft_type!r}")
    _, tensors = load_tensors(model_bytes)
    _check_exact_tensors(tensors, ("prompt_embeddings",))
    prompt = tensors["prompt_embeddings"]
    virtual = config.get("num_virtual_tokens")
    if virtual is not None and prompt.dim() == 2 and prompt.shape[0] != virtual:
        raise AdapterError(
            f"{source}: prompt_embeddings has {prompt.shape[0]} rows but num_virtual_tokens={virtual}"
        )
    meta = AdapterMeta(
        pool=_parse_pool(pool if pool is not None else 1, source),
        base_model=config.get("base_model_name_or_path"),
        task=config.get("task_type"),
        extra={"peft_type": peft_type},
    )
    return SoftPromptAdapter(meta, prompt, source_format="peft_prompt_tuning")


def load_adapter(path: str | Path, hidden_size: int, limits: AdapterLimits | None = None,
                 pool: int | None = None) -> PromptAdapter:
    """Load and validate an adapter from a `.safetensors` file or a PEFT folder."""
    limits = limits or AdapterLimits()
    path = Path(path)
    if path.is_dir():
        config_path, model_path = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not config_path.is_file() or not model_path.is_file():
            raise AdapterError(
                f"{path}: a PEFT folder needs adapter_config.json and adapter_model.safetensors "
                "(pickled adapter_model.bin is not accepted)"
            )
        adapter = adapter_from_peft(
            read_limited(config_path, MAX_CONFIG_BYTES),
            read_limited(model_path, limits.max_file_bytes), str(path), pool,
        )
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise AdapterError(f"{path.name}: only .safetensors adapters are accepted")
        adapter = adapter_from_safetensors(read_limited(path, limits.max_file_bytes), path.name, pool)
    else:
        raise AdapterError(f"{path}: no such adapter file or folder")
    return validate(adapter, hidden_size, limits)


def save_adapter(adapter: PromptAdapter, path: str | Path) -> Path:
    """Write an adapter in the format `load_adapter` reads (PEFT ones become `soft_prompt`)."""
    from safetensors.torch import save_file

    fmt = "soft_prompt" if isinstance(adapter, SoftPromptAdapter) else adapter.kind
    tensors = {k: t.detach().to(torch.float32).contiguous().cpu() for k, t in adapter.tensors().items()}
    save_file(tensors, str(path), metadata=adapter.meta.to_metadata(fmt))
    return Path(path)
