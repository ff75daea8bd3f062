"""The one place an engine is chosen and built, above the engine packages (which never import
this module or each other):

    engine = build_engine("vllm", BackboneOptions(), EngineConfig(), VllmOptions(kv_cache_mb=512),
                          observer=EngineObserver(on_step=..., on_finish=...))

`hf`: transformers, in-process (decoder-only or T5, by the backbone; lamp_runtime/hf/);
`vllm`: vLLM's continuous batching over prompt embeddings (lamp_runtime/vllm/); `llamacpp`: the
GGUF on llama.cpp (lamp_runtime/llamacpp/), a step core on engine/step_loop.py's loop. Each engine's
heavy imports (vLLM, transformers' model classes) happen only when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: `lamp --help` and the serving config read ENGINE_KINDS
    from ..backbone.options import BackboneOptions
    from ..engine.base import Engine, EngineConfig, EngineObserver


def _build_hf(backbone_options: BackboneOptions | None, config: EngineConfig | None, vllm_options) -> Engine:
    from ..hf.engine import HfEngine

    if vllm_options is not None:
        raise ValueError("vLLM options were given for the hf engine")
    return HfEngine.load(backbone_options, config)


def _build_vllm(backbone_options: BackboneOptions | None, config: EngineConfig | None, vllm_options) -> Engine:
    from ..vllm.backbone import load_vllm_backbone
    from ..vllm.engine import VllmEngine

    return VllmEngine(load_vllm_backbone(backbone_options), config=config, options=vllm_options)


def _build_llamacpp(backbone_options: BackboneOptions | None, config: EngineConfig | None, vllm_options) -> Engine:
    from ..engine.step_loop import StepLoopEngine
    from ..llamacpp.engine import build_llamacpp_engine

    if vllm_options is not None:
        raise ValueError("vLLM options were given for the llamacpp engine")
    return StepLoopEngine(build_llamacpp_engine(backbone_options, config))


BUILDERS: dict[str, Callable[..., Engine]] = {"hf": _build_hf, "vllm": _build_vllm, "llamacpp": _build_llamacpp}
ENGINE_KINDS = tuple(BUILDERS)  # --engine choices


def build_engine(kind: str, backbone_options: BackboneOptions | None = None, config: EngineConfig | None = None,
                 vllm_options=None, observer: EngineObserver | None = None) -> Engine:
    """Load the backbone and start the engine of `kind`; for `vllm`, `vllm_options` is a VllmOptions.
    `observer` sees every step and result from the first request on."""
    builder = BUILDERS.get(kind)
    if builder is None:
        raise ValueError(f"engine {kind!r} unknown; use one of {', '.join(ENGINE_KINDS)}")
    engine = builder(backbone_options, config, vllm_options)
    if observer is not None:
        engine.observe(observer)
    return engine
