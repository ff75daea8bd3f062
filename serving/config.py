"""Settings of one `lamp serve` deployment: defaults < YAML file (`--config`) < command-line flags.

The same keys work everywhere: on the command line (`--max-batch-size 8`), in a YAML file
(`max_batch_size: 8` or `max-batch-size: 8`) and as the `args` of the Serve config used with
`serve deploy` (see serving/serve_config.yaml). Every value is checked here, so a bad setting fails
before Ray starts, with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from lamp_runtime.backbone.options import DTYPE_CHOICES, QUANTIZATION_CHOICES
from lamp_runtime.engines import ENGINE_KINDS
from lamp_runtime.requests import MAX_INPUT_TOKENS_LIMIT, MAX_NEW_TOKENS_LIMIT

from .routing import ROUTING_CHOICES, effective_routing
from .routing.affinity import LoadBound

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_store_dir() -> Path:
    from .store import state_dir

    return state_dir() / "adapters"


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None  # join this Ray cluster instead of starting a local one
    num_cpus: int | None = None  # logical CPUs of the local Ray cluster (default: all)
    store: str | None = None  # adapter store directory or fsspec URL (default: user data dir / adapters)
    registry: str | None = None  # registry database URL (default: store.registry.default_registry_url)
    prompts: str | None = "prompts"  # bundled adapters registered at start; missing folder = none
    backbone: str | None = None  # local HF folder or .gguf (default: the embedded SmolLM2)
    dtype: str = "auto"
    quantization: str = "auto"
    device: str = "auto"
    replicas: int = 1
    routing: str | None = None  # affinity | random (default: affinity with more than one replica)
    affinity_load_factor: float = 1.5  # affinity: a replica's queue may reach this multiple of the mean
    affinity_min_queue: int = 4  # affinity: below this queue a replica always takes its tasks' requests
    replica_cpus: float | None = None  # Ray CPUs reserved per model replica (default: a fair share)
    threads: int | None = None  # torch threads per model replica (default: CPU cores / replicas)
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    prefill_forward_cost_tokens: int = 32  # newcomers differing more in length get separate prefills
    max_queue: int = 64  # requests waiting per replica before 503
    fair_scheduling: bool = True  # admit by tokens served per task, 429 beyond a task's share (fair_queue.py)
    fair_preemption: bool = True  # a task below its share of the rows pauses a row of the one most over its share
    max_input_tokens: int = MAX_INPUT_TOKENS_LIMIT
    max_new_tokens: int = MAX_NEW_TOKENS_LIMIT
    prompt_cache_mb: int = 256
    adapter_cache_mb: int = 64  # host memory for the factors of the adapters being served
    prompt_kv_cache_mb: int = 256  # soft-prompt keys/values kept per task version; 0 = off
    max_request_bytes: int = 1024 * 1024  # JSON bodies of the inference API
    max_upload_bytes: int = 64 * 1024 * 1024  # one adapter upload (all its files together)
    log_level: str = "INFO"
    # hf: transformers in the replica; vllm: vLLM's engine (docs/vllm.md); llamacpp: llama.cpp;
    # auto: llamacpp for a GGUF on the CPU, else hf (lamp_runtime.engines.choose_engine)
    engine: str = "hf"
    vllm_kv_cache_mb: int = 1024  # memory vLLM reserves for its KV cache (host memory on CPU)
    vllm_max_model_len: int | None = None  # longest sequence vLLM holds (default: the backbone's context)
    vllm_block_size: int | None = None  # vLLM KV block tokens (default: the smallest the backend takes)
    # KV cells of each batch row of the llama.cpp engine (a stream of its own, allocated at start):
    # the most soft prompt + input + answer one request may hold (docs/llamacpp.md)
    llamacpp_row_cells: int | None = None  # None: the engine's default (LlamaCppOptions.row_cells)
    # Serve the GGUF requantized to this type by llama.cpp, once and cached (LlamaCppOptions.requantize)
    llamacpp_requantize: str | None = None
    allow_random_weights: bool = False  # serve a random-weight (benchmark-only) backbone anyway

    def __post_init__(self):
        _check_range(self, "port", 1, 65535)
        for name in ("replicas", "max_batch_size", "max_queue", "max_input_tokens", "max_new_tokens",
                     "prompt_cache_mb", "adapter_cache_mb", "max_request_bytes", "max_upload_bytes"):
            _check_range(self, name, 1, None)
        _check_range(self, "prefill_forward_cost_tokens", 0, None)
        for name in ("fair_scheduling", "fair_preemption"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _check_range(self, "prompt_kv_cache_mb", 0, None)
        for name in ("num_cpus", "threads"):
            if getattr(self, name) is not None:
                _check_range(self, name, 1, None)
        if self.replica_cpus is not None and not (isinstance(self.replica_cpus, (int, float))
                                                  and self.replica_cpus >= 0):
            raise ValueError(f"replica_cpus must be a number >= 0, got {self.replica_cpus!r}")
        if not isinstance(self.batch_wait_ms, (int, float)) or not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"batch_wait_ms must be in [0, 10000], got {self.batch_wait_ms!r}")
        _check_choice(self, "dtype", DTYPE_CHOICES)
        _check_choice(self, "quantization", QUANTIZATION_CHOICES)
        _check_choice(self, "engine", ENGINE_KINDS)
        if self.routing is not None:
            _check_choice(self, "routing", ROUTING_CHOICES)
        try:
            LoadBound(load_factor=self.affinity_load_factor, min_queue=self.affinity_min_queue)
        except ValueError as exc:  # "load_factor must be ...": name the setting as the user wrote it
            raise ValueError(f"affinity_{exc}") from None
        _check_range(self, "vllm_kv_cache_mb", 1, None)
        if self.vllm_max_model_len is not None:
            _check_range(self, "vllm_max_model_len", 2, None)
        if self.vllm_block_size is not None:
            _check_range(self, "vllm_block_size", 16, None)
        if self.llamacpp_row_cells is not None:
            _check_range(self, "llamacpp_row_cells", 16, None)
            if self.engine not in ("llamacpp", "auto"):
                raise ValueError(f"llamacpp_row_cells is a setting of the llamacpp engine, not of {self.engine!r}")
        if self.llamacpp_requantize is not None:
            from lamp_runtime.llamacpp.options import REQUANTIZE_TYPES

            _check_choice(self, "llamacpp_requantize", REQUANTIZE_TYPES)
            if self.engine != "llamacpp":  # auto keeps a Q4_1 GGUF on hf: the flag would be ignored
                raise ValueError(f"llamacpp_requantize is a setting of --engine llamacpp, not of {self.engine!r}")
        object.__setattr__(self, "log_level", str(self.log_level).upper())
        _check_choice(self, "log_level", LOG_LEVELS)
        if not self.host:
            raise ValueError("host must not be empty")
        if not isinstance(self.allow_random_weights, bool):
            raise ValueError(f"allow_random_weights must be true or false, got {self.allow_random_weights!r}")
        if self.backbone and not self.allow_random_weights:  # every way in: flags, YAML, Serve args
            from lamp_runtime.backbone.random_shape import refuse_random_weights

            refuse_random_weights(self.backbone, allowed=False)
        if self.registry is not None:
            from .store.registry import check_registry_url

            check_registry_url(self.registry)

    @property
    def store_dir(self) -> Path:
        return Path(self.store).expanduser() if self.store else default_store_dir()

    @property
    def store_location(self) -> str:
        """What `open_store` takes: the directory, or an fsspec URL (`s3://...`) left as written."""
        from .store import is_url

        return self.store if is_url(self.store) else str(self.store_dir)

    @property
    def prompts_dir(self) -> Path | None:
        return Path(self.prompts).expanduser() if self.prompts else None

    @property
    def routing_in_force(self) -> str:
        return effective_routing(self.routing, self.replicas)

    def backbone_options(self):
        from lamp_runtime.backbone.options import BackboneOptions

        return BackboneOptions(path=self.backbone, dtype=self.dtype, quantization=self.quantization,
                               device=self.device)

    def engine_config(self):
        from lamp_runtime.engine.base import EngineConfig

        return EngineConfig(max_batch_size=self.max_batch_size, max_input_tokens=self.max_input_tokens,
                            max_new_tokens=self.max_new_tokens, prompt_cache_bytes=self.prompt_cache_mb * 1024 * 1024,
                            adapter_cache_bytes=self.adapter_cache_mb * 1024 * 1024,
                            prompt_kv_cache_bytes=self.prompt_kv_cache_mb * 1024 * 1024,
                            prefill_forward_cost_tokens=self.prefill_forward_cost_tokens,
                            max_waiting=self.max_queue, batch_wait_ms=self.batch_wait_ms,
                            fair_scheduling=self.fair_scheduling, fair_preemption=self.fair_preemption)

    def vllm_options(self):
        """VllmOptions for the vLLM engine; None for the HF engine."""
        if self.engine != "vllm":
            return None
        from lamp_runtime.vllm.engine import VllmOptions

        return VllmOptions(kv_cache_mb=self.vllm_kv_cache_mb, max_model_len=self.vllm_max_model_len,
                           block_size=self.vllm_block_size)

    def llamacpp_options(self):
        """LlamaCppOptions for the llama.cpp engine (also for auto, which may choose it); None when
        no llama.cpp setting was given (the engine's defaults)."""
        if self.llamacpp_row_cells is None and self.llamacpp_requantize is None:
            return None
        from lamp_runtime.llamacpp.options import LlamaCppOptions

        given = {"row_cells": self.llamacpp_row_cells, "requantize": self.llamacpp_requantize}
        return LlamaCppOptions(**{key: value for key, value in given.items() if value is not None})

    def to_args(self) -> dict[str, Any]:
        """Plain values, to hand to the Serve app builder (and back through `from_mapping`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "settings") -> "ServeSettings":
        """Build from a mapping (YAML, Serve `args`); keys may use '-' or '_'; unknown keys are errors."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for raw_key, value in (values or {}).items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                raise ValueError(f"{source}: unknown setting {raw_key!r}; known: {', '.join(sorted(known))}")
            kwargs[key] = _coerce(known[key], value, source)
        return cls(**kwargs)

    def merged(self, overrides: dict[str, Any]) -> "ServeSettings":
        """A copy with `overrides` (already typed, e.g. from argparse) applied; None means 'not given'."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given)


def load_settings(config_file: str | os.PathLike | None, overrides: dict[str, Any]) -> ServeSettings:
    """Defaults, then the YAML file (if any), then the explicit command-line values."""
    base = ServeSettings()
    if config_file is not None:
        path = Path(config_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ValueError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must contain a mapping of settings, got {type(data).__name__}")
        base = ServeSettings.from_mapping(data, source=str(path))
    return base.merged(overrides)


def _coerce(field: dataclasses.Field, value: Any, source: str) -> Any:
    """YAML and Serve `args` may deliver numbers as strings; convert by the field's declared type."""
    if value is None:
        return None
    kind = str(field.type)  # a string such as "int | None" (postponed annotations)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in ("true", "false", "on", "off"):
            raise ValueError(f"{source}: {field.name} must be true or false, got {value!r}")
        return text in ("true", "on")
    if kind.startswith("int"):
        text = str(value).strip()
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and text.isdigit())):
            raise ValueError(f"{source}: {field.name} must be an integer, got {value!r}")
        return int(text)
    if kind.startswith("float"):
        if isinstance(value, bool):
            raise ValueError(f"{source}: {field.name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {field.name} must be a number, got {value!r}") from None
    if isinstance(value, (dict, list)):
        raise ValueError(f"{source}: {field.name} must be a single value, got {value!r}")
    return str(value)


def _check_range(settings: ServeSettings, name: str, low: int, high: int | None) -> None:
    value = getattr(settings, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def _check_choice(settings: ServeSettings, name: str, choices: tuple[str, ...]) -> None:
    if getattr(settings, name) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(settings, name)!r}")
