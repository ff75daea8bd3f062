"""A Llama-family decoder forward that reads and writes `KVSlots`: the model the decoder engine runs.

It runs the loaded transformers model's own modules (embeddings, RMSNorms, projections, rotary
embedding, output head), so every quantization the backbone supports (float, bitsandbytes, int4)
works unchanged, but owns what transformers' generic forward does per step: the KV cache layout
(slots, written in place), the attention masks (a row sees its own positions only), and no
per-step cache objects, mask builders or output dataclasses. q/k/v and gate/up are fused into one
product each where the weights allow it (float and int4 linears), halving the kernel calls.

It applies to models whose decoder layers follow the Llama template (Llama, Mistral, Qwen2,
SmolLM, ...: `input_layernorm`, `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`,
`mlp.{gate,up,down}_proj`); `supports()` says whether a model does.

Numerics: the residual stream and the attention run in float32 whatever the weights are; the
projections run in their weights' dtype (bfloat16 activations for int4 and bfloat16 weights). In
float32 this is the computation transformers does, op for op, so greedy answers match
`model.generate` (tests/runtime/test_peft_parity.py, test_ept_engine.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbone.int4 import COMPUTE_DTYPE, GROUP, Int4Linear
from .kv_slots import KVSlots

LAYER_MODULES = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def supports(model) -> bool:
    """Does `model` (a transformers causal LM) follow the Llama decoder template?"""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(inner, "rotary_emb", None) is None or getattr(inner, "norm", None) is None:
        return False
    if getattr(model.config, "hidden_act", None) not in ("silu", "swish"):
        return False
    if any(getattr(model.config, key, None) for key in ("sliding_window", "use_sliding_window")):
        return False
    if not all(_get(layer, name) is not None for layer in layers for name in LAYER_MODULES):
        return False
    return _is_llama_rms_norm(inner.norm)


def _is_llama_rms_norm(module) -> bool:
    """Does the norm compute weight * x / rms(x) (not, say, Gemma's (1 + weight) * ...)?"""
    try:
        weight, eps = _norm(module)
    except ValueError:
        return False
    x = torch.randn(2, weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        return torch.allclose(module(x).float(), _rms(x, weight, eps).float(), rtol=1e-2, atol=1e-3)


def fuse_projections(parts: list[torch.nn.Module]) -> torch.nn.Module:
    """One module computing the concatenated outputs of `parts` (which share their input).

    Float linears get one weight whose row blocks the parts then view (stored once); int4 linears
    are fused by Int4Linear.fuse; anything else (bitsandbytes) is called part by part.
    """
    if all(type(p) is Int4Linear for p in parts) and Int4Linear.can_fuse(parts):
        return Int4Linear.fuse(parts)
    plain = all(type(p) is torch.nn.Linear for p in parts)
    if plain and len({(p.weight.dtype, p.weight.device, p.bias is None) for p in parts}) == 1:
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                                dtype=weight.dtype)
        fused.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = torch.nn.Parameter(bias, requires_grad=False)
        start = 0
        for part in parts:  # the parts keep working (transformers' own forward), on views
            end = start + part.out_features
            part.weight = torch.nn.Parameter(weight[start:end], requires_grad=False)
            if bias is not None:
                part.bias = torch.nn.Parameter(bias[start:end], requires_grad=False)
            start = end
        return fused
    return _Concat(parts)


class _Concat(torch.nn.Module):
    def __init__(self, parts):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], -1)


def _projection(module: torch.nn.Module):
    """A callable for the module's forward; int4 layers are called straight on their kernel
    (per call, nn.Module dispatch costs about what a small kernel does: 120 calls a step)."""
    if type(module) is Int4Linear and module.bias is None:
        packed, scales = module.packed, module.scales_and_zeros
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu
        return lambda x: kernel(x, packed, GROUP, scales)  # x: [tokens, in], contiguous
    return module


def _norm(module: torch.nn.Module):
    """(weight, eps) of an RMSNorm, to compute it as transformers' LlamaRMSNorm does."""
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
    if eps is None:
        raise ValueError(f"cannot read the epsilon of {type(module).__name__}")
    return module.weight, float(eps)


def _input_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a projection wants its input in (bitsandbytes and int4 cast themselves)."""
    weight = getattr(module, "weight", None)
    if type(module) is torch.nn.Linear and weight is not None:
        return weight.dtype
    if type(module) is Int4Linear:
        return COMPUTE_DTYPE
    if isinstance(module, _Concat):
        return _input_dtype(module.parts[0])
    return torch.float32


class _Layer:
    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        modules = (fuse_projections([attn.q_proj, attn.k_proj, attn.v_proj]), attn.o_proj,
                   fuse_projections([mlp.gate_proj, mlp.up_proj]), mlp.down_proj)
        self.qkv, self.o, self.gate_up, self.down = (_projection(m) for m in modules)
        self.dtypes = tuple(_input_dtype(m) for m in modules)
        self.intermediate = mlp.gate_proj.out_features


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of a float32 `x`, op for op (so float32 results are transformers' to the bit)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class LlamaModel:
    """The forward of a loaded Llama-template model over `KVSlots` (see the module docstring)."""

    def __init__(self, model):
        if not supports(model):
            raise ValueError(f"{type(model).__name__} does not follow the Llama decoder template")
        config = model.config
        self.model = model
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.scale = self.head_dim ** -0.5
        self.rotary = model.model.rotary_emb
        self.final_norm = _norm(model.model.norm)
        self.head = model.get_output_embeddings()
        self.layers = [_Layer(layer) for layer in model.model.layers]
        self.device = model.get_input_embeddings().weight.device
        self.logit_dtype = torch.float32

    def new_slots(self, slots: int) -> KVSlots:
        """The KV cache this model writes: float32 on the CPU (the attention's dtype, and ~5x faster
        there than bfloat16 for these small products), the model's dtype on a GPU."""
        dtype = torch.float32 if self.device.type == "cpu" else self.model.dtype
        return KVSlots(len(self.layers), slots, self.kv_heads, self.head_dim, dtype, self.device)

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv: KVSlots, slot_start: int,
                last: torch.Tensor) -> torch.Tensor:
        """Run `embeds` [R, N, d] at `positions` [R, N] for the rows in slots slot_start..+R;
        write their keys/values there and return the logits [R, vocab] of position `last[r]` of
        each row.

        A row's queries see the keys at positions <= their own in that row's slot: what an earlier
        forward left there (a cached prompt, the tokens so far) and this forward's own. Positions
        of padding (queries beyond a row's real tokens) are written too, after its real ones; they
        are never visible to the real queries and are overwritten by the row's next tokens.
        """
        rows, n = embeds.shape[:2]
        length = int(positions.max()) + 1  # the engine has reserved this much in `kv`
        slots = torch.arange(slot_start, slot_start + rows, device=self.device)
        write_at = kv.flat_positions(slots, positions)
        visible = torch.arange(length, device=self.device)[None, None, :] <= positions[:, :, None]  # [R, N, T]
        cos, sin = self.rotary(embeds, positions)
        half = self.head_dim // 2
        cos = cos.float()[:, :, None, :]
        # rotate_half(q) * sin == roll(q, half) * [-sin1, sin2], bit for bit, in one op fewer
        sin = torch.cat((-sin[..., :half], sin[..., half:]), -1).float()[:, :, None, :]
        x = embeds.float().reshape(rows * n, self.hidden)  # the residual stream, one row per token
        # Decode attention (one query per row) runs as two batched products with an additive mask
        # per (row, kv head): [R*kvh, 1, T], grouped query heads sharing their kv head without a
        # repeat; 8 us per layer at batch 1 on the 2-core CPU against 70 us in
        # scaled_dot_product_attention, which the prefill uses (its kernel never holds every score).
        if n == 1:
            mask = torch.zeros(rows, self.kv_heads, length, device=self.device).masked_fill_(
                ~visible, float("-inf")).view(rows * self.kv_heads, 1, length)
        else:  # scaled_dot_product_attention's boolean mask, [R, 1, N, T]
            mask = visible[:, None]
        heads, kv_heads, head_dim, scale = self.heads, self.kv_heads, self.head_dim, self.scale
        qk_width, groups, flat = (heads + kv_heads) * head_dim, heads // kv_heads, rows * kv_heads
        rsqrt, silu, baddbmm, bmm, softmax = torch.rsqrt, F.silu, torch.baddbmm, torch.bmm, torch.softmax
        end = slot_start + rows
        # One loop, locals only: at batch 1 on a 2-core CPU a decode step is ~50 small ops per
        # layer besides the products, and Python time between them was ~1.3 ms of ~8 per step.
        for index, layer in enumerate(self.layers):
            (w1, e1), (w2, e2) = layer.norm1, layer.norm2
            qkv = layer.qkv((w1 * (x * rsqrt(x.pow(2).mean(-1, keepdim=True) + e1))).to(layer.dtypes[0])).float()
            qk = qkv[:, :qk_width].view(rows, n, heads + kv_heads, head_dim)
            qk = qk * cos + qk.roll(head_dim // 2, -1) * sin
            kv.write(index, write_at, qk[:, :, heads:], qkv[:, qk_width:])
            keys = kv.keys[index, slot_start:end, :, :length]  # [R, kv_heads, T, D]
            values = kv.values[index, slot_start:end, :, :length]
            if n == 1:
                scores = baddbmm(mask, qk[:, :, :heads].reshape(flat, groups, head_dim),  # mask + scale q k.T
                                 keys.reshape(flat, length, head_dim).transpose(1, 2), alpha=scale)
                out = bmm(softmax(scores, -1), values.reshape(flat, length, head_dim)).view(rows, heads * head_dim)
            else:
                out = F.scaled_dot_product_attention(qk[:, :, :heads].transpose(1, 2), keys, values, attn_mask=mask,
                                                     scale=scale, enable_gqa=kv_heads != heads)
                out = out.transpose(1, 2).reshape(rows * n, heads * head_dim)
            x = x + layer.o(out.to(layer.dtypes[1])).float()
            gate_up = layer.gate_up((w2 * (x * rsqrt(x.pow(2).mean(-1, keepdim=True) + e2))).to(layer.dtypes[2]))
            x = x + layer.down((silu(gate_up[:, :layer.intermediate]) * gate_up[:, layer.intermediate:])
                               .to(layer.dtypes[3])).float()
        hidden = x.view(rows, n, self.hidden)[torch.arange(rows, device=self.device), last]
        return self.head(_rms(hidden, *self.final_norm).to(_input_dtype(self.head))).float()
