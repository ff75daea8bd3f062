"""Log-probabilities, input scoring (echo) and n samples on the decoder engine, checked against a
direct transformers forward of the same sequence on the real embedded backbone (float32)."""

from __future__ import annotations

import pytest
import torch

from lamp_runtime.engine.request_state import RequestState
from lamp_runtime.errors import RequestError, UnsupportedRequestError
from lamp_runtime.prompts.prepared import assemble_embeddings, prepare
from lamp_runtime.requests import ChatMessage, GenerationRequest, SamplingParams, TokenLogprob

TOLERANCE = 1e-4


def reference_logprobs(backbone, adapter, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the HF model's logits over [soft prompt ; token_ids], one row per position."""
    embeds = backbone.embed(torch.tensor(token_ids))
    if adapter is not None:
        embeds = assemble_embeddings(prepare(adapter), embeds)
    with torch.inference_mode():
        logits = backbone.model(inputs_embeds=embeds[None].float()).logits[0]
    return torch.log_softmax(logits.float(), -1)


@pytest.mark.parametrize("task", ["lamp2", None])
def test_generated_token_logprobs_equal_a_direct_forward(engine, backbone, task_adapters, task):
    request = GenerationRequest("The capital of France is", task, SamplingParams(max_new_tokens=6, logprobs=5))
    (result,) = engine.generate([request])
    input_ids = backbone.tokenizer(request.input)["input_ids"]
    reference = reference_logprobs(backbone, task_adapters.get(task), input_ids + result.token_ids)
    if result.finish_reason == "stop":
        assert result.logprobs[-1].token_id in engine.backbone.eos_token_ids()
    soft = result.soft_prompt_tokens
    ended_by_eos = result.finish_reason == "stop"
    assert len(result.logprobs) == result.completion_tokens + ended_by_eos  # the EOS entry too
    tokens = result.token_ids + ([result.logprobs[-1].token_id] if ended_by_eos else [])
    for k, (token, lp) in enumerate(zip(tokens, result.logprobs)):
        row = reference[soft + len(input_ids) - 1 + k]
        assert lp.token_id == token and lp.token == backbone.tokenizer.decode([token])
        assert abs(lp.logprob - float(row[token])) < TOLERANCE
        values, ids = row.topk(5)
        assert [t[1] for t in lp.top] == ids.tolist()  # greedy: the chosen token is the best
        assert max(abs(a[2] - b) for a, b in zip(lp.top, values.tolist())) < TOLERANCE


def test_a_completion_ended_by_eos_reports_the_eos_entry(backbone):
    """What `echo` + `max_tokens: 1` harnesses read as the generated entry, even when it is EOS."""
    eos = min(backbone.eos_token_ids())
    request = GenerationRequest("Paris is", None, SamplingParams(max_new_tokens=1, logprobs=0))
    seq = RequestState(request, [1, 2], None, None, backbone.tokenizer, {eos})
    entry = TokenLogprob(eos, backbone.tokenizer.decode([eos]), -0.25)
    out = seq.accept(eos, entry)
    assert out.result.finish_reason == "stop" and out.result.completion_tokens == 0 and out.result.text == ""
    assert out.result.logprobs == [entry] and out.logprobs == [entry]


@pytest.mark.parametrize("task", ["lamp3", None])
def test_input_logprobs_with_zero_new_tokens_equal_a_direct_forward(engine, backbone, task_adapters, task):
    text = "Paris is the capital of France."
    request = GenerationRequest(text, task, SamplingParams(max_new_tokens=0, prompt_logprobs=2))
    (result,) = engine.generate([request])
    input_ids = backbone.tokenizer(text)["input_ids"]
    reference = reference_logprobs(backbone, task_adapters.get(task), input_ids)
    soft = result.soft_prompt_tokens
    assert result.completion_tokens == 0 and result.text == "" and result.finish_reason == "length"
    assert len(result.prompt_logprobs) == len(input_ids)
    if soft == 0:  # nothing precedes the first token
        assert result.prompt_logprobs[0].logprob is None and result.prompt_logprobs[0].token_id == input_ids[0]
    for i, lp in enumerate(result.prompt_logprobs):
        assert lp.token_id == input_ids[i]
        if lp.logprob is None:
            continue
        assert abs(lp.logprob - float(reference[soft + i - 1, input_ids[i]])) < TOLERANCE
        assert len(lp.top) == 2


def test_scored_rows_batch_with_others_without_changing_them(engine):
    plain = [GenerationRequest("Once upon a time", "lamp2", SamplingParams(max_new_tokens=5)),
             GenerationRequest("1, 2, 3,", "plain", SamplingParams(max_new_tokens=5))]
    alone = [engine.generate([r])[0].token_ids for r in plain]
    scored = GenerationRequest("Once upon a time", "lamp2", SamplingParams(max_new_tokens=5, prompt_logprobs=0))
    mixed = engine.generate([plain[0], scored, plain[1]])
    assert [mixed[0].token_ids, mixed[2].token_ids] == alone
    assert mixed[1].token_ids == alone[0]  # scoring runs the soft prompt again, same answer


def test_n_samples_share_one_prefill_and_equal_seeded_requests_alone(engine):
    params = SamplingParams(max_new_tokens=8, temperature=0.9, seed=7, n=4)
    request = GenerationRequest("Write a haiku about the sea:", "lamp2", params)
    engine.submit(request)
    first = engine.step()
    assert engine.last_step.prefilled == 1  # one prefill for the four samples
    assert sorted(out.index for out in first) == [0, 1, 2, 3]
    results = {}
    outputs = first
    while len(results) < 4:
        results.update({out.index: out.result for out in outputs if out.result is not None})
        outputs = engine.step() if len(results) < 4 else []
    samples = [results[i].token_ids for i in range(4)]
    alone = [engine.generate([GenerationRequest(request.input, "lamp2", SamplingParams(
        max_new_tokens=8, temperature=0.9, seed=7 + i))])[0].token_ids for i in range(4)]
    assert samples == alone
    assert len({tuple(s) for s in samples}) > 1  # different draws
    assert engine.cache.stats().pinned == 0  # every sample released its prompt


def test_request_options_are_checked(engine):
    with pytest.raises(RequestError, match="max_new_tokens must be an integer >= 1"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(RequestError, match="logprobs must be null or an integer in"):
        SamplingParams(logprobs=21)
    with pytest.raises(RequestError, match="n must be an integer in"):
        SamplingParams(n=0)
    with pytest.raises(RequestError, match="n=9 samples need as many batch rows"):
        engine.submit(GenerationRequest("x", "plain", SamplingParams(n=9, temperature=1)))
    with pytest.raises(RequestError, match="got input text and chat messages"):
        GenerationRequest("x", "plain", messages=(ChatMessage("user", "hi"),))


def test_chat_messages_use_the_backbone_template_or_the_task_template(engine, backbone):
    messages = (ChatMessage("user", "What is 2 + 2?"),)
    chat = GenerationRequest("", "lamp2", SamplingParams(max_new_tokens=4), messages=messages)
    text = backbone.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                                  tokenize=False, add_generation_prompt=True)
    same = GenerationRequest(text, "lamp2", SamplingParams(max_new_tokens=4))
    a, b = engine.generate([chat, same])
    assert a.token_ids == b.token_ids and a.input_tokens == b.input_tokens
    with pytest.raises(UnsupportedRequestError, match="records no input_template"):
        engine.submit(GenerationRequest("", "lamp2", messages=messages, chat_format="input_template"))
