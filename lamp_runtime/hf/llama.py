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

from dataclasses import dataclass

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


class LlamaTemplateForward:
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
        """The KV cache this model writes: float32 on the CPU (the attention's dtype, and faster there
        than bfloat16 for these small products: CPUs have no fast bfloat16 path for them), the
        model's dtype on a GPU."""
        dtype = torch.float32 if self.device.type == "cpu" else self.model.dtype
        return KVSlots(len(self.layers), slots, self.kv_heads, self.head_dim, dtype, self.device)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv: KVSlots, slot_start: int,
                last: torch.Tensor) -> torch.Tensor:
        """One segment's forward (see `forward_segments`): the logits [R, vocab]."""
        return self.forward_segments([Segment(embeds, positions, slot_start, last)], kv)[0]

    @torch.inference_mode()
    def forward_segments(self, segments: list["Segment"], kv: KVSlots) -> list[torch.Tensor]:
        """Run every segment's rows through the model in one pass over the weights; return each
        segment's logits [R, vocab] at its rows' `last` positions (a `full` segment's: [R, N, vocab]).

        A segment is R rows of N tokens at `positions` [R, N] in slots slot_start..+R (a step's
        decode rows are one segment with N = 1, each group of newcomers another), so a step that
        prefills newcomers while others decode reads every weight once, not once per forward. Each
        row's queries see the keys at positions <= their own in that row's slot: what an earlier
        forward left there (a cached prompt, the tokens so far) and this forward's own. Positions
        of padding (queries beyond a row's real tokens) are written too, after its real ones; they
        are never visible to the real queries and are overwritten by the row's next tokens. The
        engine has reserved room for every position in `kv`.
        """
        parts = [_SegmentPlan(segment, self, kv) for segment in segments]
        start = 0
        for part in parts:  # the segments' tokens, stacked in order
            part.tokens = slice(start, start + part.rows * part.n)
            start = part.tokens.stop
        x = torch.cat([part.x for part in parts]) if len(parts) > 1 else parts[0].x  # one row per token
        write_at = torch.cat([part.write_at for part in parts]) if len(parts) > 1 else parts[0].write_at
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qk_width, rsqrt, silu = (heads + kv_heads) * head_dim, torch.rsqrt, F.silu
        # One loop, locals only: at batch 1 a decode step is dozens of small ops per layer besides
        # the products, and the Python time between them is a visible share of the step.
        for index, layer in enumerate(self.layers):
            (w1, e1), (w2, e2) = layer.norm1, layer.norm2
            qkv = layer.qkv((w1 * (x * rsqrt(x.pow(2).mean(-1, keepdim=True) + e1))).to(layer.dtypes[0])).float()
            qk_rows = [part.rope(qkv[part.tokens, :qk_width]) for part in parts]
            keys = (torch.cat([qk[:, :, heads:].reshape(-1, kv_heads, head_dim) for qk in qk_rows])
                    if len(parts) > 1 else qk_rows[0][:, :, heads:])
            kv.write(index, write_at, keys, qkv[:, qk_width:])
            out = [part.attend(qk[:, :, :heads], kv, index) for part, qk in zip(parts, qk_rows)]
            out = torch.cat(out) if len(parts) > 1 else out[0]
            x = x + layer.o(out.to(layer.dtypes[1])).float()
            gate_up = layer.gate_up((w2 * (x * rsqrt(x.pow(2).mean(-1, keepdim=True) + e2))).to(layer.dtypes[2]))
            x = x + layer.down((silu(gate_up[:, :layer.intermediate]) * gate_up[:, layer.intermediate:])
                               .to(layer.dtypes[3])).float()
        hidden = torch.cat([x[part.tokens] if part.full else
                            x[part.tokens].view(part.rows, part.n, self.hidden)[part.row_index, part.last]
                            for part in parts])
        logits = self.head(_rms(hidden, *self.final_norm).to(_input_dtype(self.head))).float()
        out = logits.split([part.rows * part.n if part.full else part.rows for part in parts])
        return [o.view(part.rows, part.n, -1) if part.full else o for part, o in zip(parts, out)]


@dataclass(frozen=True)
class Segment:
    """Rows of one forward that share a shape: embeds [R, N, d] at positions [R, N] in slots
    slot_start..+R; the logits come from position `last[r]` of each row ([R, vocab]), or with
    `full` from every position ([R, N, vocab]: the input's own log-probabilities, `echo`)."""

    embeds: torch.Tensor
    positions: torch.Tensor
    slot_start: int
    last: torch.Tensor
    full: bool = False


class _SegmentPlan:
    """What a segment needs at every layer, computed once per forward: its token rows in the
    stacked activations, rotary angles, KV write indices and attention mask."""

    def __init__(self, segment: Segment, model: LlamaTemplateForward, kv: KVSlots):
        self.model, self.slot_start = model, segment.slot_start
        self.rows, self.n = segment.embeds.shape[:2]
        self.last, self.full, device = segment.last, segment.full, model.device
        self.row_index = torch.arange(self.rows, device=device)
        self.length = int(segment.positions.max()) + 1
        self.x = segment.embeds.float().reshape(self.rows * self.n, model.hidden)
        self.write_at = kv.flat_positions(torch.arange(segment.slot_start, segment.slot_start + self.rows,
                                                       device=device), segment.positions)
        cos, sin = model.rotary(segment.embeds, segment.positions)
        half = model.head_dim // 2
        self.cos = cos.float()[:, :, None, :]
        # rotate_half(q) * sin == roll(q, half) * [-sin1, sin2], bit for bit, in one op fewer
        self.sin = torch.cat((-sin[..., :half], sin[..., half:]), -1).float()[:, :, None, :]
        visible = torch.arange(self.length, device=device)[None, None, :] <= segment.positions[:, :, None]
        # Decode attention (one query per row) runs as two batched products with an additive mask
        # per (row, kv head), [R*kvh, 1, T], grouped query heads sharing their kv head without a
        # repeat: for one query per row this is several times faster on the CPU than
        # scaled_dot_product_attention, whose fixed cost dominates there; prefills use the latter
        # (its kernel never holds every score).
        if self.n == 1:
            self.mask = torch.zeros(self.rows, model.kv_heads, self.length, device=device).masked_fill_(
                ~visible, float("-inf")).view(self.rows * model.kv_heads, 1, self.length)
        else:  # scaled_dot_product_attention's boolean mask, [R, 1, N, T]
            self.mask = visible[:, None]
        self.tokens = slice(0, self.rows * self.n)  # where its tokens sit among the stacked segments

    def rope(self, qk: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of this segment's q and k heads: [R, N, heads + kv_heads, D]."""
        model = self.model
        qk = qk.view(self.rows, self.n, model.heads + model.kv_heads, model.head_dim)
        return qk * self.cos + qk.roll(model.head_dim // 2, -1) * self.sin

    def attend(self, q: torch.Tensor, kv: KVSlots, layer: int) -> torch.Tensor:
        """This segment's attention output for layer `layer`: [R * N, heads * D]."""
        model, rows, length = self.model, self.rows, self.length
        heads, kv_heads, head_dim = model.heads, model.kv_heads, model.head_dim
        keys = kv.keys[layer, self.slot_start:self.slot_start + rows, :, :length]  # [R, kv_heads, T, D]
        values = kv.values[layer, self.slot_start:self.slot_start + rows, :, :length]
        if self.n == 1:
            flat = rows * kv_heads
            scores = torch.baddbmm(self.mask, q.reshape(flat, heads // kv_heads, head_dim),  # mask + scale q k.T
                                   keys.reshape(flat, length, head_dim).transpose(1, 2), alpha=model.scale)
            return torch.bmm(torch.softmax(scores, -1), values.reshape(flat, length, head_dim)).view(
                rows, heads * head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=self.mask,
                                             scale=model.scale, enable_gqa=kv_heads != heads)
        return out.transpose(1, 2).reshape(rows * self.n, heads * head_dim)
