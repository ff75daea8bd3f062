"""How to load the backbone: one definition of the dtype, quantization and device choices.

Every place that offers these choices (the `lamp` command's flags, `lamp serve` settings, the
engines) takes them from here. No torch import: `lamp --help` and the serving config stay light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "int8", "int4")  # nf4 / int8: bitsandbytes; int4: backbone/int4.py
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
QUANTIZATION_CHOICES = ("auto", *QUANTIZATIONS)


@dataclass(frozen=True)
class BackboneOptions:
    """How to load the backbone. `path` None means the embedded SmolLM2 GGUF."""

    path: str | None = None
    dtype: str = "auto"
    quantization: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype {self.dtype!r} not supported; use auto or one of {sorted(DTYPE_NAMES)}")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(
                f"quantization {self.quantization!r} not supported; use auto or one of {QUANTIZATIONS}"
            )

    def resolved(self, int4: bool = True) -> "BackboneOptions":
        """Fill in `auto`: nf4 + bfloat16 on CUDA; int4 (bfloat16 products) on CPU, the fastest there
        and as accurate as float32 on the bundled tasks (docs/benchmarks.md), or float32 unquantized
        where int4 is not offered (`int4=False`: the vLLM engine, training; a backbone whose forward
        cannot take it, see `int4_refusal`) or another dtype is asked."""
        refusal = int4_refusal(self.path)
        if refusal is not None:
            if self.quantization == "int4":
                raise ValueError(refusal)
            int4 = False
        device = self.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        quantization = self.quantization
        if quantization == "auto":  # int4 computes in bfloat16: a float32 or float16 dtype asks for none
            cpu_int4 = int4 and self.dtype in ("auto", "bfloat16")
            quantization = "nf4" if device.startswith("cuda") else "int4" if cpu_int4 else "none"
        dtype = self.dtype
        if quantization == "int4":
            if device.startswith("cuda"):
                raise ValueError("quantization int4 runs on the CPU (torch's int4 CPU kernel); on CUDA use nf4")
            if dtype not in ("auto", "bfloat16"):
                raise ValueError(f"quantization int4 computes in bfloat16 (its fast CPU path), got dtype {dtype}")
            dtype = "bfloat16"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        return BackboneOptions(self.path, dtype, quantization, device)


def int4_refusal(path: str | None) -> str | None:
    """Why the backbone at `path` cannot run int4-quantized, or None when it can.

    int4 (backbone/int4.py) replaces the Linear layers by modules that hold packed weights and no
    `weight`; T5's forward reads its feed-forward output layer's `weight.dtype`, so a T5 backbone
    would fail at its first request. Read from the folder's config.json (no torch import); the
    embedded backbone and GGUF files are Llama-family decoders, which take int4.
    """
    if path is None or str(path).endswith(".gguf"):
        return None
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None  # not readable here: loading the backbone reports the folder's problem
    if config.get("is_encoder_decoder") or config.get("model_type") in ("t5", "mt5", "umt5"):
        model_type = str(config.get("model_type") or "encoder-decoder").upper()
        return (f"quantization int4 is not supported for the {model_type} (encoder-decoder) backbone at {path}: its forward reads "
                "the linear layers' weights, which int4 replaces by packed ones; use --quantization none "
                "(or nf4 / int8 on CUDA)")
    return None
