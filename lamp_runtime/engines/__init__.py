"""The one place an engine is chosen and built, above the engine packages (which never import
this module or each other):

    engine = build_engine("vllm", BackboneOptions(), EngineConfig(), VllmOptions(kv_cache_mb=512),
                          observer=EngineObserver(on_step=..., on_finish=...))

`hf`: transformers, in-process (decoder-only or T5, by the backbone; lamp_runtime/hf/);
`vllm`: vLLM's continuous batching over prompt embeddings (lamp_runtime/vllm/); `llamacpp`: the
GGUF on llama.cpp (lamp_runtime/llamacpp/), a step core on engine/step_loop.py's loop; `auto`: one
of these, chosen for the backbone and device by `choose_engine` (and reported as the one chosen:
the engine's `kind` is never "auto"). Each engine's heavy imports (vLLM, transformers' model
classes) happen only when it is built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: `lamp --help` and the serving config read ENGINE_KINDS
    from ..backbone.options import BackboneOptions
    from ..engine.base import Engine, EngineConfig, EngineObserver


def _build_hf(backbone_options: BackboneOptions | None, config: EngineConfig | None, options: None) -> Engine:
    from ..hf.engine import HfEngine

    return HfEngine.load(backbone_options, config)


def _build_vllm(backbone_options: BackboneOptions | None, config: EngineConfig | None, options) -> Engine:
    from ..vllm.backbone import load_vllm_backbone
    from ..vllm.engine import VllmEngine

    return VllmEngine(load_vllm_backbone(backbone_options), config=config, options=options)


def _build_llamacpp(backbone_options: BackboneOptions | None, config: EngineConfig | None, options) -> Engine:
    from ..engine.step_loop import StepLoopEngine
    from ..llamacpp.engine import build_llamacpp_engine

    return StepLoopEngine(build_llamacpp_engine(backbone_options, config, options))


BUILDERS: dict[str, Callable[..., Engine]] = {"hf": _build_hf, "vllm": _build_vllm, "llamacpp": _build_llamacpp}
AUTO = "auto"
ENGINE_KINDS = (*BUILDERS, AUTO)  # --engine choices

log = logging.getLogger(__name__)


def choose_engine(backbone_options: BackboneOptions | None = None, *, cuda_available: bool | None = None,
                  llama_cpp_error: str | None = None, gguf_file_type: int | None = None) -> str:
    """The engine `--engine auto` builds for `backbone_options`, its reason logged.

    A GGUF (a .gguf path, or the embedded default, which is one) on the CPU runs on `llamacpp` in
    its own types and kernels, with no torch copy of the weights, unless its weights are Q4_1: the
    hf engine's int4 kernels serve those blocks as they are, and on the measured host they were
    faster at 4 to 64 concurrent requests, 1.7x at 16 (docs/bench/llamacpp.json;
    docs/llamacpp.md says why: llama.cpp's Q4_1 matrix kernels are compute-bound there). Any other
    GGUF type (Q4_K, Q8_0, F16...) the int4 engine would requantize to 4 bits, and the float32
    route needs several times the memory. Everything else keeps `hf`: an
    HF folder (T5 included) is not a GGUF; on a CUDA device the hf engine runs there while this
    llama.cpp build is CPU-only; an explicit --dtype or --quantization chooses how transformers
    loads the weights; and llama-cpp-python may not be installed. `vllm` is never chosen: it is an
    explicit choice with options of its own.

    `cuda_available` (default: torch's answer, asked only for device "auto"), `llama_cpp_error`
    (default: the error importing llama_cpp; "" when it imports) and `gguf_file_type` (default: the
    GGUF's `general.file_type`, read from its header) are the host facts, given by tests.
    """
    from ..backbone.options import BackboneOptions

    options = backbone_options or BackboneOptions()
    kind, reason, level = _choice(options, cuda_available, llama_cpp_error, gguf_file_type)
    log.log(level, "--engine auto chose %s: %s", kind, reason)
    return kind


LLAMA_FTYPE_MOSTLY_Q4_1 = 3  # llama.h: a GGUF whose 2-D weights are Q4_1


def _choice(options: BackboneOptions, cuda_available: bool | None, llama_cpp_error: str | None,
            gguf_file_type: int | None) -> tuple[str, str, int]:
    """(kind, why, log level): a warning where llama.cpp would have run the backbone but cannot."""
    path = options.path
    if path is not None and not str(path).endswith(".gguf"):
        return "hf", f"{path} is an HF folder, not a GGUF file (llama.cpp runs GGUF files)", logging.INFO
    device = options.device
    if device == "auto":
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        device = "cuda" if cuda_available else "cpu"
    if device != "cpu":
        return "hf", f"device {device}: the llama.cpp engine runs on the CPU", logging.INFO
    if options.dtype != "auto" or options.quantization != "auto":
        return "hf", (f"--dtype {options.dtype} / --quantization {options.quantization} choose how transformers "
                      "loads the weights; llama.cpp runs the GGUF's own types"), logging.INFO
    name = "the embedded backbone" if path is None else path
    if gguf_file_type is None:
        gguf_file_type = _gguf_file_type(options)
    if gguf_file_type == LLAMA_FTYPE_MOSTLY_Q4_1:
        return "hf", (f"{name} is a Q4_1 GGUF, which the int4 engine serves as it is, faster than llama.cpp at "
                      "4 to 64 concurrent requests (docs/bench/llamacpp.json)"), logging.INFO
    if llama_cpp_error is None:
        llama_cpp_error = _llama_cpp_import_error()
    if llama_cpp_error:
        return "hf", f"llama-cpp-python does not import ({llama_cpp_error}); `make setup` builds it", logging.WARNING
    return "llamacpp", f"{name} is a GGUF of type {gguf_file_type} on the CPU: llama.cpp runs it as it is", logging.INFO


def _gguf_file_type(options: BackboneOptions) -> int:
    """The GGUF's `general.file_type` (-1 when the file cannot be read: its builder then says why)."""
    from ..backbone.gguf_file import gguf_scalar
    from ..llamacpp.backbone import gguf_path

    try:
        value = gguf_scalar(gguf_path(options)[0], "general.file_type")
    except (OSError, ValueError) as exc:
        log.info("--engine auto could not read the GGUF's file type: %s", exc)
        return -1
    return int(value) if value is not None else -1


def _llama_cpp_import_error() -> str:
    try:
        import llama_cpp.llama_cpp  # noqa: F401  (loads the native library too)
    except (ImportError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def build_engine(kind: str, backbone_options: BackboneOptions | None = None, config: EngineConfig | None = None,
                 vllm_options=None, observer: EngineObserver | None = None, llamacpp_options=None) -> Engine:
    """Load the backbone and start the engine of `kind` (`auto`: the one `choose_engine` picks);
    `vllm_options` (a VllmOptions) and `llamacpp_options` (a LlamaCppOptions) go to their engine
    only: given for another explicit kind, they are refused (with `auto`, the chosen engine's are
    used and the others ignored). `observer` sees every step and result from the first request on."""
    options = {"vllm": vllm_options, "llamacpp": llamacpp_options}
    if kind == AUTO:
        kind = choose_engine(backbone_options)
    elif kind in BUILDERS:
        for other, given in options.items():
            if given is not None and other != kind:
                raise ValueError(f"{other} options were given for the {kind} engine")
    builder = BUILDERS.get(kind)
    if builder is None:
        raise ValueError(f"engine {kind!r} unknown; use one of {', '.join(ENGINE_KINDS)}")
    engine = builder(backbone_options, config, options.get(kind))
    if observer is not None:
        engine.observe(observer)
    return engine
