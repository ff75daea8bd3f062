"""The one place an engine is chosen and built: `hf` (transformers, in-process: decoder-only or
T5, by the backbone), `vllm` or `llamacpp` (GGUF on llama.cpp); and the async runner that drives it.

Two steps, as the serving replica needs them: `build_engine` first (metrics read its registry,
cache, backbone and queue sizes), then `build_runner` with the callbacks those metrics provide.

    engine = build_engine("vllm", BackboneOptions(), EngineConfig(), VllmOptions(kv_cache_mb=512))
    runner = build_runner(engine, max_waiting=64, on_step=..., on_finish=...)
    async for out in runner.generate(request): ...
    runner.shutdown()

vLLM (and transformers' model classes) are imported only when the engine that needs them is built.
"""

from __future__ import annotations

from collections.abc import Callable

from ..backbone.options import BackboneOptions
from ..requests import GenerationResult
from . import ENGINE_KINDS
from .base import Engine, EngineConfig, EngineRunner, StepStats


def build_engine(kind: str, backbone_options: BackboneOptions | None = None, config: EngineConfig | None = None,
                 vllm_options=None) -> Engine:
    """Load the backbone and start the engine of `kind`; for `vllm`, `vllm_options` is a VllmOptions."""
    if kind == "hf":
        from ..backbone.hf import load_backbone

        if vllm_options is not None:
            raise ValueError("vLLM options were given for the hf engine")
        return engine_for(load_backbone(backbone_options), config=config)
    if kind == "vllm":
        from ..vllm.backbone import load_vllm_backbone
        from ..vllm.engine import VllmEngine

        return VllmEngine(load_vllm_backbone(backbone_options), config=config, options=vllm_options)
    if kind == "llamacpp":
        from ..llamacpp.engine import build_llamacpp_engine

        if vllm_options is not None:
            raise ValueError("vLLM options were given for the llamacpp engine")
        return build_llamacpp_engine(backbone_options, config)
    raise ValueError(f"engine {kind!r} unknown; use one of {', '.join(ENGINE_KINDS)}")


def engine_for(backbone, registry=None, config: EngineConfig | None = None, cache=None):
    """The transformers engine that fits a loaded backbone: encoder-decoder (T5), a Llama-template
    decoder (slot KV cache + prompt-KV cache), or any other decoder (transformers' own forward)."""
    if backbone.is_encoder_decoder:
        from .seq2seq import Seq2SeqEngine

        return Seq2SeqEngine(backbone, registry, config, cache)
    from .llama import supports

    if supports(backbone.model):
        from .decoder import DecoderEngine

        return DecoderEngine(backbone, registry, config, cache)
    from .generic_decoder import GenericDecoderEngine

    return GenericDecoderEngine(backbone, registry, config, cache)


def build_runner(engine: Engine, max_waiting: int = 256, batch_wait_ms: float = 5.0,
                 on_step: Callable[[StepStats], None] | None = None,
                 on_finish: Callable[[GenerationResult], None] | None = None) -> EngineRunner:
    """The async front of `engine`: AsyncEngine for the transformers engines, VllmRunner for vLLM.

    `batch_wait_ms` applies to the transformers engines only: vLLM forms its batches at every step.
    """
    if engine.kind == "vllm":
        from ..vllm.runner import VllmRunner

        return VllmRunner(engine, max_waiting=max_waiting, on_step=on_step, on_finish=on_finish)
    if engine.kind in ("hf", "llamacpp"):  # synchronous step cores
        from .runner import AsyncEngine

        return AsyncEngine(engine, max_waiting=max_waiting, batch_wait_ms=batch_wait_ms, on_step=on_step,
                           on_finish=on_finish)
    raise ValueError(f"engine kind {engine.kind!r} unknown; use one of {', '.join(ENGINE_KINDS)}")
