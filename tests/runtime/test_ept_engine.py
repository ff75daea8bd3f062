"""EPT adapters in the engine: equal to a direct transformers computation, batch-invariant with
LAMP and plain tasks, and with A·B = 0 identical to a soft prompt of the joint prompt."""

import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, EptAdapter, SoftPromptAdapter
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..conftest import vocab_prompt

NEW_TOKENS = 10
INPUTS = ["The capital of France is", "Hi", "List three colours:"]  # "Hi" is shorter than s=4


@pytest.fixture(scope="module")
def ept(backbone):
    g = torch.Generator().manual_seed(11)
    a = torch.randn(4, 2, generator=g) * 0.05
    b = torch.randn(2, backbone.hidden_size, generator=g) * 0.05
    return EptAdapter(AdapterMeta(), vocab_prompt(backbone, 5, seed=12), a, b)


def reference(backbone, adapter, text):
    """What the EPT paper prescribes, computed with plain transformers generate()."""
    ids = backbone.tokenizer(text, return_tensors="pt")["input_ids"][0]
    inputs = backbone.embed(ids)
    offset = adapter.a @ adapter.b
    n = min(len(ids), offset.shape[0])
    inputs = torch.cat([inputs[:n] + offset[:n], inputs[n:]])
    embeds = torch.cat([adapter.prompt, inputs])[None]
    with torch.no_grad():
        out = backbone.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                      max_new_tokens=NEW_TOKENS, do_sample=False)
    return backbone.tokenizer.decode(out[0], skip_special_tokens=True)


def run(backbone, tasks, requests):
    engine = DecoderEngine(backbone)
    for task_id, adapter in tasks.items():
        engine.registry.register(task_id, adapter)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    return engine.generate([GenerationRequest(text, task, params) for task, text in requests])


def test_ept_matches_direct_transformers_computation(backbone, ept):
    results = run(backbone, {"ept": ept}, [("ept", t) for t in INPUTS])
    assert [r.text for r in results] == [reference(backbone, ept, t) for t in INPUTS]
    assert results[0].soft_prompt_tokens == 5


def test_ept_in_a_mixed_batch_with_lamp_and_plain_equals_alone(backbone, ept, task_adapters):
    tasks = {"ept": ept, **task_adapters}
    requests = [("ept", INPUTS[0]), ("lamp2", INPUTS[0]), ("ept", INPUTS[1]), ("plain", INPUTS[2]),
                ("lamp3", INPUTS[1]), (None, INPUTS[2])]
    alone = [run(backbone, tasks, [r])[0].token_ids for r in requests]
    assert [r.token_ids for r in run(backbone, tasks, requests)] == alone


def test_ept_with_zero_offset_is_exactly_its_joint_prompt(backbone, ept):
    zero = EptAdapter(AdapterMeta(), ept.prompt, ept.a, torch.zeros_like(ept.b))
    plain = SoftPromptAdapter(AdapterMeta(), ept.prompt)
    requests = [("zero", t) for t in INPUTS] + [("plain", t) for t in INPUTS]
    results = run(backbone, {"zero": zero, "plain": plain}, requests)
    assert [r.token_ids for r in results[:3]] == [r.token_ids for r in results[3:]]
    # and the offset really matters when it is not zero
    assert [r.text for r in run(backbone, {"ept": ept}, [("ept", t) for t in INPUTS])] != [r.text for r in results[3:]]
