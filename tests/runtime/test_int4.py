"""4-bit weights served as 4-bit (`--quantization int4`): the embedded GGUF's Q4_1 blocks are taken
as they are, a float weight is quantized at load, and the engine serves the result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lamp_runtime.backbone.checkpoint import embedded_gguf_path
from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.backbone.int4 import GROUP, Int4Linear, Int8Linear, gguf_row_permutation
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.hf.engine import engine_for
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..conftest import lamp_from_prompt, vocab_prompt


@pytest.fixture(scope="module")
def int4_backbone():
    return load_backbone(BackboneOptions(quantization="int4", device="cpu"))


def bf16_inputs(rows: int, width: int) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def assert_product_close(layer: torch.nn.Module, weight: torch.Tensor, rtol: float) -> None:
    """layer(x) against x @ W.T in float32, for inputs exactly representable in bfloat16."""
    x = bf16_inputs(5, weight.shape[1])
    expected = x.float() @ weight.float().T
    error = (layer(x).float() - expected).abs().max() / expected.abs().max()
    assert error < rtol, f"relative error {error:.2e}"


def test_q4_1_blocks_are_served_as_they_are(backbone):
    """The GGUF's blocks (llama.cpp's rope row order undone) multiply like the float32 backbone's
    weights, which transformers dequantized from the very same blocks."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(embedded_gguf_path())).tensors}
    layer = backbone.model.model.layers[3]
    config = backbone.config
    for gguf_name, module, heads in (("blk.3.ffn_up.weight", layer.mlp.up_proj, None),
                                     ("blk.3.attn_q.weight", layer.self_attn.q_proj, config.num_attention_heads),
                                     ("blk.3.attn_k.weight", layer.self_attn.k_proj, config.num_key_value_heads)):
        rows = gguf_row_permutation(module.out_features, heads) if heads else None
        served = Int4Linear.from_q4_1(np.asarray(tensors[gguf_name].data), rows)
        assert_product_close(served, module.weight, rtol=1e-2)  # bfloat16 output rounding only
        if heads:  # without undoing the row order the products are wrong: the check can fail
            unpermuted = Int4Linear.from_q4_1(np.asarray(tensors[gguf_name].data))
            with pytest.raises(AssertionError):
                assert_product_close(unpermuted, module.weight, rtol=1e-2)


def test_float_weights_are_quantized_per_group_of_32():
    weight = torch.randn(96, 4 * GROUP, generator=torch.Generator().manual_seed(1))
    assert_product_close(Int4Linear.from_float(weight), weight, rtol=0.15)  # 4-bit error on gaussian weights
    parts = [Int4Linear.from_float(weight[:64]), Int4Linear.from_float(weight[64:])]
    fused = Int4Linear.fuse(parts)
    assert_product_close(fused, weight, rtol=0.15)
    assert_product_close(parts[1], weight[64:], rtol=0.15)  # the parts still work, on views of the fused buffers
    with pytest.raises(ValueError, match="fuse at multiples of 64 rows"):
        Int4Linear.fuse([Int4Linear.from_float(weight[:32]), Int4Linear.from_float(weight[32:])])
    assert_product_close(Int8Linear(weight), weight, rtol=0.02)
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4Linear.from_float(torch.randn(8, 40))


def test_the_embedded_backbone_loads_as_int4(int4_backbone, backbone):
    model = int4_backbone.model
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 7 * backbone.config.num_hidden_layers
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert int4_backbone.options.dtype == "bfloat16" and int4_backbone.options.quantization == "int4"
    assert int4_backbone.weights_bytes < 0.45 * backbone.weights_bytes


def test_int4_options_are_checked():
    with pytest.raises(ValueError, match="int4 computes in bfloat16"):
        BackboneOptions(quantization="int4", dtype="float32", device="cpu").resolved()
    with pytest.raises(ValueError, match="int4 runs on the CPU"):
        BackboneOptions(quantization="int4", device="cuda").resolved()


def test_the_engine_serves_int4_with_adapters(int4_backbone, backbone):
    """Mixed tasks in one batch equal each request alone, and the int4 model predicts what the
    float32 one predicts on a plain prompt (same GGUF weights, bfloat16 products)."""
    engine = engine_for(int4_backbone)
    engine.registry.register("lamp", lamp_from_prompt(vocab_prompt(backbone, 12, seed=5), rank=4, pool=2))
    params = SamplingParams(max_new_tokens=8)
    cases = [("lamp", "The capital of France is"), (None, "The capital of France is"), ("lamp", "1, 2, 3,")]
    alone = [engine.generate([GenerationRequest(text, task, params)])[0].token_ids for task, text in cases]
    mixed = [r.token_ids for r in engine.generate([GenerationRequest(text, task, params) for task, text in cases])]
    assert mixed == alone and all(alone)
    reference = engine_for(backbone).generate([GenerationRequest("The capital of France is", None, params)])[0]
    assert alone[1][:3] == reference.token_ids[:3]
