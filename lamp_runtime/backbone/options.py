"""How to load the backbone: one definition of the dtype, quantization and device choices.

Every place that offers these choices (the `lamp` command's flags, `lamp serve` settings, the
engines) takes them from here. No torch import: `lamp --help` and the serving config stay light.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        where int4 is not offered (`int4=False`: the vLLM engine, training) or another dtype is asked."""
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
