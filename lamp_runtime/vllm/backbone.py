"""What the vLLM engine's process holds of the backbone: tokenizer, config and embedding table.

vLLM loads and runs the model itself, in its engine-core process. This process only tokenizes,
builds prompt embeddings (soft prompt ++ input token embeddings) and checks them, so it needs the
tokenizer, the config and the input-embedding matrix (read once, ~113 MB for SmolLM2 in float32),
not a second copy of the model. The object offers the `Backbone` attributes the serving layer and
the metrics read (name, options, tokenizer, hidden_size, device, dtype, weights_bytes, ...).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbone.checkpoint import backbone_folder
from ..backbone.embedding_table import EmbeddingTable, load_embedding_table
from ..backbone.hf import DTYPES, collect_eos_token_ids
from ..backbone.options import BackboneOptions

log = logging.getLogger(__name__)

# bitsandbytes NF4 in vLLM: 4-bit weights plus one float32 absmax per 64-weight block.
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64


@dataclass
class VllmBackbone:
    folder: Path
    name: str
    options: BackboneOptions  # resolved: no "auto" left
    tokenizer: object
    config: object  # the transformers PretrainedConfig
    table: EmbeddingTable
    eos_ids: frozenset[int]
    model_bytes: int  # the weights as vLLM holds them in its own process
    load_seconds: float

    @property
    def hidden_size(self) -> int:
        return self.table.hidden_size

    @property
    def device(self) -> torch.device:
        """Where vLLM runs the model (prompt embeddings are built on the host and shipped there)."""
        return torch.device(self.options.device)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.options.dtype]

    @property
    def is_encoder_decoder(self) -> bool:
        return False  # refused at load: vLLM has no prompt embeddings for encoder-decoder models

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", None) or 1 << 16)

    @property
    def weights_bytes(self) -> int:
        """vLLM's copy of the weights plus our embedding table: what this replica holds in all."""
        return self.model_bytes + self.table.nbytes

    def eos_token_ids(self) -> set[int]:
        return set(self.eos_ids)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.table.embed(token_ids)


def checkpoint_weight_bytes(folder: Path, dtype: torch.dtype, quantization: str) -> int:
    """Bytes of the checkpoint's weights once loaded in `dtype`, read from the safetensors headers.

    With NF4, 2-D weights other than the embeddings are counted at NF4's size: an estimate, as
    vLLM decides per layer what it quantizes.
    """
    from safetensors import safe_open

    total = 0.0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                numel = 1
                for size in shape:
                    numel *= size
                quantized = quantization == "nf4" and len(shape) == 2 and "embed" not in name
                total += numel * (NF4_BYTES_PER_WEIGHT if quantized else dtype.itemsize)
    return int(total)


def load_vllm_backbone(options: BackboneOptions | None = None) -> VllmBackbone:
    """Resolve `auto`, convert a GGUF once, and read tokenizer, config and embedding table."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    options = (options or BackboneOptions()).resolved(int4=False)  # vLLM has no int4 CPU kernel
    started = time.perf_counter()
    folder, name = backbone_folder(options)
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"backbone {name} is encoder-decoder: vLLM accepts prompt embeddings only for "
                         "decoder-only models; use --engine hf")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the model config and tokenizer say it all
        generation_config = None
    dtype = DTYPES[options.dtype]
    table = load_embedding_table(folder, dtype)
    if table.hidden_size != config.hidden_size:
        raise ValueError(f"embedding table of {name} is {table.hidden_size} wide but the config says "
                         f"hidden_size {config.hidden_size}")
    backbone = VllmBackbone(
        folder=folder, name=name, options=options, tokenizer=tokenizer, config=config, table=table,
        eos_ids=frozenset(collect_eos_token_ids(generation_config, config, tokenizer)),
        model_bytes=checkpoint_weight_bytes(folder, dtype, options.quantization),
        load_seconds=time.perf_counter() - started,
    )
    log.info("vLLM backbone %s: tokenizer and embedding table ready in %.1f s", name, backbone.load_seconds)
    return backbone
