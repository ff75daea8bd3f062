"""Loading the one shared backbone into transformers: the embedded GGUF default or any local HF
folder (decoder-only such as Llama-2-7B, or encoder-decoder such as T5), in a dtype, optionally
quantized with bitsandbytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .checkpoint import backbone_folder
from .options import BackboneOptions

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Backbone:
    """The loaded model and tokenizer plus the facts the runtime needs about them."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    options: BackboneOptions
    load_seconds: float
    # Made for benchmarks (backbone/random_shape.py): generates noise, refused by `lamp serve` unless allowed.
    random_weights: bool = False

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.d_model)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.config, "is_encoder_decoder", False))

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", None) or 1 << 16)

    @property
    def weights_bytes(self) -> int:
        """Bytes held by parameters and buffers (quantized weights count at their packed size)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        seen, total = set(), 0
        for t in tensors:
            if t.data_ptr() in seen:  # tied embeddings are counted once
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def eos_token_ids(self) -> set[int]:
        return collect_eos_token_ids(getattr(self.model, "generation_config", None), self.config, self.tokenizer)

    @torch.no_grad()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids (what soft prompts are prepended to)."""
        embeddings = self.model.get_encoder() if self.is_encoder_decoder else self.model
        return embeddings.get_input_embeddings()(token_ids.to(self.device))


def in_memory_backbone(model: torch.nn.Module, tokenizer, name: str) -> Backbone:
    """A Backbone around a model already built in this process (the GPU check's random-weight
    7B-shaped model, built on the GPU without a checkpoint folder): the options record the model's
    own device and dtype, unquantized; `path` names it, since no folder holds it."""
    weight = model.get_input_embeddings().weight
    dtype = next(k for k, v in DTYPES.items() if v == weight.dtype)
    options = BackboneOptions(path=f"in-memory:{name}", dtype=dtype, quantization="none", device=str(weight.device))
    return Backbone(model.eval().requires_grad_(False), tokenizer, name, options, 0.0)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one context position holds across all layers, at `dtype`: the
    self-attention cache of a decoder-only model; for an encoder-decoder (T5), the decoder's
    cross-attention keys/values of one encoder position (its self-attention holds as much per
    generated token)."""
    size = torch.empty((), dtype=dtype).element_size()
    if getattr(config, "is_encoder_decoder", False):
        layers = getattr(config, "num_decoder_layers", None) or config.num_layers
        return 2 * layers * config.num_heads * config.d_kv * size
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * size


def collect_eos_token_ids(generation_config, config, tokenizer) -> set[int]:
    """Every id that ends a generation: from the generation config, the model config and the tokenizer."""
    ids = set()
    for source in (generation_config, config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _quantization_config(quantization: str, dtype: torch.dtype):
    if quantization in ("none", "int4"):  # int4 is applied after loading (int4.quantize_model)
        return None
    from transformers import BitsAndBytesConfig

    # bitsandbytes logs a warning on every int8 matmul that fp32 inputs are cast to fp16: once per
    # layer per step, thousands of identical lines. It is expected behaviour, so keep it out of the logs.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: "inputs will be cast" not in record.getMessage()
    )

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_backbone(options: BackboneOptions | None = None, int4: bool = True) -> Backbone:
    """Load the backbone once: resolve `auto` options (to int4 on CPU unless `int4` is False:
    training needs a backward pass), convert GGUF if needed, quantize if asked."""
    from .gguf_file import shared_gguf_readers

    with shared_gguf_readers():  # the checks and the load share one parse of a GGUF's header
        return _load_backbone(options, int4)


def _load_backbone(options: BackboneOptions | None, int4: bool) -> Backbone:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    options = (options or BackboneOptions()).resolved(int4=int4)
    started = time.perf_counter()
    direct = _direct_int4_gguf(options)
    check_backbone_memory(options, direct is not None)
    if direct is not None:
        return _load_gguf_int4(direct, options, started)
    folder, name = backbone_folder(options)
    # int4 keeps the embeddings and norms in float32 and computes its products in bfloat16.
    dtype = torch.float32 if options.quantization == "int4" else DTYPES[options.dtype]
    config = AutoConfig.from_pretrained(folder)
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {"dtype": dtype}
    quantization_config = _quantization_config(options.quantization, dtype)
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=options.device)
    model = model_class.from_pretrained(folder, **kwargs)
    if quantization_config is None:
        model.to(options.device)
    model.eval().requires_grad_(False)
    if options.quantization == "int4":
        from .checkpoint import gguf_source
        from .int4 import quantize_model

        quantize_model(model, gguf_source(options))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    from .random_shape import backbone_is_random

    backbone = Backbone(model, tokenizer, name, options, time.perf_counter() - started,
                        backbone_is_random(options.path))
    log.info(
        "backbone %s loaded (%s, %s, %s) in %.1f s, %.0f MB of weights",
        name, options.dtype, options.quantization, options.device,
        backbone.load_seconds, backbone.weights_bytes / 1e6,
    )
    return backbone


def _direct_int4_gguf(options: BackboneOptions):
    """The GGUF file to load tensor by tensor into int4 (gguf_int4.py), if this load is one: a
    Llama-architecture .gguf given by path, int4. The embedded default keeps its cached folder."""
    from pathlib import Path

    if options.quantization != "int4" or options.path is None or not str(options.path).endswith(".gguf"):
        return None
    from .gguf_int4 import supports_direct_int4

    path = Path(options.path)
    return path if path.is_file() and supports_direct_int4(path) else None


def check_backbone_memory(options: BackboneOptions, direct_int4: bool, available: int | None = None) -> None:
    """Refuse a load that cannot fit in host memory before it starts (memory.py). On CUDA only a
    GGUF's conversion is checked: the weights themselves go to the GPU."""
    from .memory import check_memory, estimate_load_bytes

    if options.device != "cpu" and not (options.path is None or str(options.path).endswith(".gguf")):
        return
    estimate = estimate_load_bytes(options, direct_int4)
    if estimate is None:
        return
    needed, what = estimate
    hint = ("free memory or choose a smaller backbone" if direct_int4 or options.quantization == "int4"
            else "try --quantization int4 (a GGUF loads tensor by tensor, a folder is quantized at load), "
                 "free memory, or choose a smaller backbone")
    check_memory(needed, what, available, hint)


def _load_gguf_int4(path, options: BackboneOptions, started: float) -> Backbone:
    from .gguf_int4 import load_gguf_int4
    from .random_shape import RANDOM_NAME_PREFIX, gguf_is_random

    model, tokenizer = load_gguf_int4(path)
    random_weights = gguf_is_random(path)
    name = path.stem
    if random_weights and not name.startswith(RANDOM_NAME_PREFIX):
        name = RANDOM_NAME_PREFIX + name
    backbone = Backbone(model, tokenizer, name, options, time.perf_counter() - started, random_weights)
    log.info("backbone %s loaded tensor by tensor (int4, cpu) in %.1f s, %.0f MB of weights%s", name,
             backbone.load_seconds, backbone.weights_bytes / 1e6, " (RANDOM weights)" if random_weights else "")
    return backbone
