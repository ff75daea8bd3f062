"""The T5 (encoder-decoder) engine on the check's device in bfloat16, against transformers on the
same weights in float32: mixed-task batches of every adapter kind equal to greedy."""

from __future__ import annotations

import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, EptAdapter, LampAdapter, SoftPromptAdapter
from lamp_runtime.bench.hf_engine import engine_for
from lamp_runtime.prompts.prepared import assemble_embeddings, prepare
from lamp_runtime.requests import GenerationRequest, SamplingParams

from .checks import BF16_TOLERANCE, agreement, assert_greedy, needs_device, seq2seq_logits
from .conftest import load

pytestmark = [pytest.mark.cuda, needs_device]

NEW_TOKENS = 8
REQUESTS = [("plain", "translate English to German: hello"), ("lamp", "summarize: the cat sat on the mat"),
            ("ept", "question: why is the sky blue?"), (None, "hello world"), ("lamp", "a b c")]


@pytest.fixture(scope="module")
def tasks():
    g = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    return {"plain": SoftPromptAdapter(AdapterMeta(), randn(6, 64)),
            "lamp": LampAdapter(AdapterMeta(pool=3), randn(10, 4), randn(4).abs() + 0.5, randn(4, 64)),
            "ept": EptAdapter(AdapterMeta(), randn(3, 64), randn(4, 2), randn(2, 64))}


def test_t5_bf16_mixed_batch_is_greedy_under_the_float32_reference(t5_folder, tasks, record_property):
    t5, reference = load(t5_folder, "bfloat16"), load(t5_folder, "float32")
    engine = engine_for(t5)
    assert type(engine).__name__ == "Seq2SeqEngine" and t5.dtype == torch.bfloat16
    for task_id, adapter in tasks.items():
        engine.registry.register(task_id, adapter)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    make = lambda: [GenerationRequest(text, task, params) for task, text in REQUESTS]  # noqa: E731
    mixed = engine.generate(make())
    alone = [engine.generate([r])[0] for r in make()]
    generated = []
    for (task, text), m, a in zip(REQUESTS, mixed, alone):
        ids = torch.tensor(reference.tokenizer(text)["input_ids"])
        adapter = tasks.get(task)
        embeds = assemble_embeddings(prepare(adapter) if adapter is not None else None,
                                     reference.embed(ids).float().cpu())
        for name, result in (("mixed", m), ("alone", a)):
            assert result.completion_tokens == NEW_TOKENS
            assert_greedy(seq2seq_logits(reference.model, embeds, result.token_ids), result.token_ids,
                          BF16_TOLERANCE, f"T5 bf16 {name}, task {task}")
        with torch.no_grad():
            out = reference.model.generate(inputs_embeds=embeds.to(reference.device)[None],
                                           attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long,
                                                                     device=reference.device),
                                           max_new_tokens=NEW_TOKENS, do_sample=False)
        generated.append([t for t in out[0].tolist()[1:] if t not in (reference.tokenizer.pad_token_id,
                                                                       reference.tokenizer.eos_token_id)])
    record_property("t5_bf16_mixed_equal_alone", agreement([m.token_ids for m in mixed], [a.token_ids for a in alone]))
    record_property("t5_bf16_equal_float32_generate", agreement([m.token_ids for m in mixed], generated))
