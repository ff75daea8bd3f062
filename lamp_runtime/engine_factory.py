"""Build the engine the serving layer asked for: `hf` (transformers, in-process) or `vllm`.

Two steps, as the serving replica needs them: `build_engine` first (metrics read its registry,
cache, backbone and queue sizes), then `build_runner` with the callbacks those metrics provide.

    engine = build_engine("vllm", BackboneOptions(), EngineConfig(), VllmOptions(kv_cache_mb=512))
    runner = build_runner(engine, max_waiting=64, on_step=..., on_finish=...)
    async for out in runner.generate(request): ...
    runner.shutdown()

vLLM is imported only when the vLLM engine is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from .backbone import BackboneOptions
from .engine import EngineConfig, StepStats
from .sequence import GenerationResult

ENGINE_KINDS = ("hf", "vllm")


def build_engine(kind: str, backbone_options: BackboneOptions | None = None, config: EngineConfig | None = None,
                 vllm_options=None):
    """Load the backbone and start the engine of `kind`; for `vllm`, `vllm_options` is a VllmOptions."""
    if kind == "hf":
        from .backbone import load_backbone
        from .engine import make_engine

        if vllm_options is not None:
            raise ValueError("vLLM options were given for the hf engine")
        return make_engine(load_backbone(backbone_options), config=config)
    if kind == "vllm":
        from .vllm_backbone import load_vllm_backbone
        from .vllm_engine import VllmEngine

        return VllmEngine(load_vllm_backbone(backbone_options), config=config, options=vllm_options)
    raise ValueError(f"engine {kind!r} unknown; use one of {', '.join(ENGINE_KINDS)}")


def build_runner(engine, max_waiting: int = 256, batch_wait_ms: float = 5.0,
                 on_step: Callable[[StepStats], None] | None = None,
                 on_finish: Callable[[GenerationResult], None] | None = None):
    """The async front of `engine`: AsyncEngine for the HF engines, VllmRunner for vLLM.

    `batch_wait_ms` applies to the HF engine only: vLLM forms its batches at every step itself.
    """
    if getattr(engine, "kind", "hf") == "vllm":
        from .vllm_engine import VllmRunner

        return VllmRunner(engine, max_waiting=max_waiting, on_step=on_step, on_finish=on_finish)
    from .async_engine import AsyncEngine

    return AsyncEngine(engine, max_waiting=max_waiting, batch_wait_ms=batch_wait_ms, on_step=on_step,
                       on_finish=on_finish)
