"""4-bit weights served as 4-bit: every linear layer of the decoder keeps its weights packed in
4 bits and multiplies with torch's int4 weight-only CPU kernel (`_weight_int4pack_mm_for_cpu`).

Format: asymmetric 4-bit, groups of 32 along the input dimension, one scale and one zero per group:
w = (q - 8) * scale + zero, q in 0..15. The embedded GGUF's Q4_1 blocks are exactly that (a scale d
and a minimum m per 32 weights, w = q * d + m), so they are taken as they are, with zero = m + 8d:
no dequantize-requantize round trip, and the served weights equal the float32 backbone's up to the
rounding of `m + 8d`. A safetensors backbone (Llama-2-7B, ...) is quantized at load (min/max per group).

The int4 kernel is vectorised for bfloat16 activations only (float32 activations take a scalar
fallback, many times slower), so int4 always computes in bfloat16. The tied output head is Q8_0 in
the GGUF; torch has no group-wise int8 kernel, so the head is requantized to int8 per output row
(`_weight_int8pack_mm`), which reads a quarter of a float32 head's bytes per step. What each option
costs on a machine: `lamp bench speed` (docs/benchmarks.md, with its JSON).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

GROUP = 32
# `_convert_weight_to_int4pack_for_cpu` interleaves rows in blocks of 64: packed row blocks can be
# concatenated (fused) only at multiples of 64 rows.
PACK_ROWS = 64
COMPUTE_DTYPE = torch.bfloat16  # the int4 kernel's fast path (see the module docstring)
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles for 32 weights


class Int4Linear(torch.nn.Module):
    """y = x @ W.T (+ b) with W held as packed 4-bit groups; x is cast to bfloat16."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None):
        """`q` [out, in] integers 0..15; `scale`, `zero` [out, in / GROUP] (w = (q - 8) * scale + zero)."""
        super().__init__()
        out_features, in_features = q.shape
        if in_features % GROUP:
            raise ValueError(f"int4 needs in_features divisible by {GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), 1))
        # The kernel's layout: [in / GROUP, out, 2] holding (scale, zero).
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], -1).transpose(0, 1)
                             .contiguous().to(COMPUTE_DTYPE))
        self.register_buffer("bias", None if bias is None else bias.detach().to(COMPUTE_DTYPE))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Quantize a float weight [out, in]: per group, scale = (max - min) / 15, zero = min + 8 * scale."""
        w = weight.detach().float()
        if w.shape[1] % GROUP:
            raise ValueError(f"int4 needs in_features divisible by {GROUP}, got {w.shape[1]}")
        groups = w.view(w.shape[0], -1, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).view_as(w)
        return cls(q, scale, low + 8 * scale, bias)

    @classmethod
    def from_q4_1(cls, blocks: np.ndarray, rows: torch.Tensor | None = None) -> "Int4Linear":
        """From GGUF Q4_1 blocks [out, in / 32 * 20] (uint8), rows optionally permuted by `rows`."""
        out_features = blocks.shape[0]
        b = np.ascontiguousarray(blocks).reshape(out_features, -1, Q4_1_BLOCK_BYTES)
        d = torch.from_numpy(b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
        m = torch.from_numpy(b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        nibbles = torch.from_numpy(b[..., 4:].copy())
        # Block element j is the low nibble of byte j, element j + 16 the high nibble.
        q = torch.cat([nibbles & 0x0F, nibbles >> 4], -1).reshape(out_features, -1)
        if rows is not None:
            q, d, m = q[rows], d[rows], m[rows]
        return cls(q, d, m + 8 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(COMPUTE_DTYPE),
                                                        self.packed, GROUP, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    @staticmethod
    def can_fuse(parts: list["Int4Linear"]) -> bool:
        return (len({p.in_features for p in parts}) == 1
                and all(p.out_features % PACK_ROWS == 0 for p in parts[:-1]))

    @staticmethod
    def fuse(parts: list["Int4Linear"]) -> "Int4Linear":
        """One Int4Linear computing the concatenated outputs of `parts` (same input), e.g. q, k, v:
        one kernel call instead of three. The parts then hold row views of the fused packed weights,
        so those are stored once (each keeps its own small scales: the kernel needs them
        contiguous). Needs `can_fuse(parts)`."""
        if not Int4Linear.can_fuse(parts):
            raise ValueError(f"int4 layers fuse at multiples of {PACK_ROWS} rows, got "
                             f"{[p.out_features for p in parts]}")
        fused = Int4Linear.__new__(Int4Linear)
        torch.nn.Module.__init__(fused)
        fused.in_features = parts[0].in_features
        fused.out_features = sum(p.out_features for p in parts)
        fused.register_buffer("packed", torch.cat([p.packed for p in parts]))
        fused.register_buffer("scales_and_zeros", torch.cat([p.scales_and_zeros for p in parts], 1))
        biases = [p.bias for p in parts]
        fused.register_buffer("bias", None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(p.out_features, dtype=COMPUTE_DTYPE) for b, p in zip(biases, parts)]))
        start = 0
        for part in parts:
            end = start + part.out_features
            part.packed = fused.packed[start:end]
            start = end
        return fused

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}"


class Int8Linear(torch.nn.Module):
    """y = x @ W.T with W as int8 and one scale per output row (the output head)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight_int8", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(COMPUTE_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(COMPUTE_DTYPE),
                                               self.weight_int8, self.scale)
        return y.view(*shape[:-1], self.out_features)


def gguf_row_permutation(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp stores attn_q / attn_k with each head's rows interleaved for its rope; this is
    the permutation transformers undoes when it loads a GGUF (LlamaTensorProcessor)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)


# transformers' Llama module names -> llama.cpp's GGUF tensor names (blk.<i>.<name>.weight).
GGUF_LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}


def _gguf_q4_1_blocks(gguf_path) -> dict[str, np.ndarray]:
    """The Q4_1 tensors of a GGUF file by name (memory-mapped, read once each), from its tensor
    table alone: parsing every metadata field cost seconds per load."""
    from gguf import GGMLQuantizationType

    from .gguf_file import gguf_tensor_data

    return gguf_tensor_data(gguf_path, GGMLQuantizationType.Q4_1)


def _replace(parent: torch.nn.Module, dotted: str, module: torch.nn.Module) -> None:
    *path, name = dotted.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, name, module)


def quantize_model(model: torch.nn.Module, gguf_path=None) -> dict[str, int]:
    """Replace the linear layers of a loaded float model by Int4Linear (the output head by
    Int8Linear), in place. Layers found as Q4_1 in `gguf_path` take those blocks as they are;
    the others are quantized from their float weights. Returns how many layers came from where."""
    blocks = _gguf_q4_1_blocks(gguf_path) if gguf_path is not None else {}
    config = model.config
    counts = {"gguf_q4_1": 0, "quantized": 0, "head_int8": 0, "kept_float": 0}
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        if module is head:
            _replace(model, name, Int8Linear(module.weight))
            counts["head_int8"] += 1
            continue
        if module.in_features % GROUP:
            counts["kept_float"] += 1
            continue
        gguf_name = _gguf_name(name)
        if gguf_name in blocks:
            rows = None
            if gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
                heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
                rows = gguf_row_permutation(module.out_features, heads)
            replacement = Int4Linear.from_q4_1(blocks[gguf_name], rows)
            if module.bias is not None:
                replacement.bias = module.bias.detach().to(COMPUTE_DTYPE)
            counts["gguf_q4_1"] += 1
        else:
            replacement = Int4Linear.from_float(module.weight, module.bias)
            counts["quantized"] += 1
        _replace(model, name, replacement)
    log.info("int4: %s", counts)
    return counts


def _gguf_name(module_name: str) -> str | None:
    """model.layers.3.mlp.up_proj -> blk.3.ffn_up.weight (None outside the decoder layers)."""
    parts = module_name.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"]:
        return None
    suffix = GGUF_LLAMA_NAMES.get(".".join(parts[3:]))
    return f"blk.{parts[2]}.{suffix}.weight" if suffix else None
