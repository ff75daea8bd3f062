"""A Llama-architecture GGUF loaded straight into the int4 model, tensor by tensor: no float32 HF
folder, no float32 copy of any matrix it does not serve.

The float32 route (checkpoint.convert_gguf_to_hf, then int4.quantize_model) dequantizes the whole
model first: ~27 GB for a 7B GGUF, which does not fit a 24 GB machine. Here the transformers model
is built on the meta device from the GGUF's metadata, then each module is filled from its tensor:

- Q4_1 matrices become Int4Linear from their blocks as they are (int4.py: exact);
- other matrices are dequantized one at a time and quantized (Int4Linear.from_float);
- the output head: Int4Linear from Q4_1 blocks, else int8 per row (Int8Linear), as int4.quantize_model;
- embeddings and norms are dequantized to float32 (the int4 model keeps them so).

The result is the model int4.quantize_model makes from the float32 folder (tests check the two
agree), at its served size in memory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .int4 import GGUF_LLAMA_NAMES, GROUP, Int4Linear, Int8Linear, gguf_row_permutation

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)


def gguf_architecture(path: str | os.PathLike) -> str | None:
    from .gguf_file import gguf_reader

    field = gguf_reader(path).fields.get("general.architecture")
    return field.contents() if field is not None else None


def supports_direct_int4(path: str | os.PathLike) -> bool:
    """Can this GGUF be loaded tensor by tensor (a Llama-template architecture)?"""
    return gguf_architecture(path) in SUPPORTED_ARCHITECTURES


def _float(tensor) -> torch.Tensor:
    """One GGUF tensor dequantized to float32 (numpy shape: [out, in] for matrices)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor.tensor_type == GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


def _linear(tensor, rows: torch.Tensor | None) -> Int4Linear:
    from gguf import GGMLQuantizationType

    if tensor.tensor_type == GGMLQuantizationType.Q4_1:
        return Int4Linear.from_q4_1(tensor.data, rows)
    weight = _float(tensor)
    return Int4Linear.from_float(weight if rows is None else weight[rows])


def _set_weight(module: torch.nn.Module, value: torch.Tensor) -> None:
    if tuple(module.weight.shape) != tuple(value.shape):
        raise ValueError(f"GGUF tensor of shape {list(value.shape)} for a weight of shape {list(module.weight.shape)}")
    module.weight = torch.nn.Parameter(value, requires_grad=False)


def load_gguf_int4(path: str | os.PathLike, progress: bool = True):
    """The int4 transformers model and tokenizer of a Llama-architecture GGUF, built tensor by tensor."""
    from gguf import GGMLQuantizationType
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .gguf_file import gguf_reader

    path = Path(path)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    inner = model.model
    reader = gguf_reader(path)
    by_name = {t.name: t for t in reader.tensors}
    modules = dict(model.named_modules())
    with tqdm(total=len(by_name), desc=f"loading {path.name} (int4)", unit="tensor", disable=not progress) as bar:
        embedding = _float(by_name["token_embd.weight"])
        _set_weight(inner.embed_tokens, embedding)
        bar.update()
        for i, layer in enumerate(inner.layers):
            for module_name, suffix in GGUF_LLAMA_NAMES.items():
                tensor = by_name[f"blk.{i}.{suffix}.weight"]
                rows = None
                if suffix in ("attn_q", "attn_k"):
                    heads = config.num_attention_heads if suffix == "attn_q" else config.num_key_value_heads
                    rows = gguf_row_permutation(tensor.data.shape[0], heads)
                parent_name, attr = module_name.split(".")
                linear = modules[f"model.layers.{i}.{module_name}"]
                if getattr(linear, "bias", None) is not None:
                    raise ValueError(f"{path.name}: biased projections are not supported by the direct int4 loader")
                replacement = _linear(tensor, rows)
                if (replacement.out_features, replacement.in_features) != (linear.out_features, linear.in_features):
                    raise ValueError(f"{tensor.name}: shape {replacement.out_features}x{replacement.in_features} "
                                     f"for a {linear.out_features}x{linear.in_features} projection")
                setattr(getattr(layer, parent_name), attr, replacement)
                bar.update()
            _set_weight(layer.input_layernorm, _float(by_name[f"blk.{i}.attn_norm.weight"]))
            _set_weight(layer.post_attention_layernorm, _float(by_name[f"blk.{i}.ffn_norm.weight"]))
            bar.update(2)
        _set_weight(inner.norm, _float(by_name["output_norm.weight"]))
        head = by_name.get("output.weight")
        if head is None:  # tied to the input embeddings
            model.lm_head = Int8Linear(embedding)
        elif head.tensor_type == GGMLQuantizationType.Q4_1 and config.hidden_size % GROUP == 0:
            model.lm_head = Int4Linear.from_q4_1(head.data)
        else:
            model.lm_head = Int8Linear(_float(head))
        bar.update(2 if head is not None else 1)
    # Buffers computed at construction (rotary frequencies) were built on the meta device.
    inner.rotary_emb = type(inner.rotary_emb)(config=config)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{path.name}: no GGUF tensor for {left[:5]}{' ...' if len(left) > 5 else ''}")
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer
