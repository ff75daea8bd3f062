"""bitsandbytes nf4 and int8 on the check's device: the whole load path (`--quantization nf4|int8`
on a folder), every linear of the blocks quantized, and the engine greedy under transformers'
forward on that same quantized model, in a mixed-task batch."""

from __future__ import annotations

import pytest

from lamp_runtime.bench.hf_engine import EngineConfig, engine_for

from ..conftest import assert_bitsandbytes_linears
from .checks import BF16_TOLERANCE, assert_greedy, decoder_logits, needs_bitsandbytes, needs_device
from .conftest import load
from .test_cuda_decoder import CASES, embeddings, requests

pytestmark = [pytest.mark.cuda, needs_device, needs_bitsandbytes]


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_llama_batches_mixed_tasks_greedily(llama_folder, llama_adapters, quantization, record_property):
    quantized = load(llama_folder, "bfloat16", quantization)
    assert quantized.options.quantization == quantization
    assert assert_bitsandbytes_linears(quantized.model, quantization) == 2 * 7  # q k v o gate up down, 2 layers
    engine = engine_for(quantized, config=EngineConfig(max_batch_size=8))
    for task_id, adapter in llama_adapters.items():
        engine.registry.register(task_id, adapter)
    for (task, text, n), result in zip(CASES, engine.generate(requests())):
        assert result.completion_tokens == n
        embeds = embeddings(quantized, llama_adapters.get(task), text)
        assert_greedy(decoder_logits(quantized.model, embeds, result.token_ids), result.token_ids, BF16_TOLERANCE,
                      f"{quantization}, task {task}")
    record_property(f"{quantization}_weights_bytes", quantized.weights_bytes)
