"""The OpenAI surface as standard clients use it: chat completions (sync, async, streaming) with
each of the server's bundled tasks, log-probabilities equal to a direct transformers forward of the
same sequence (float32, 1e-4), `echo` + `max_tokens: 0` scoring, and n seeded samples sharing one
prefill. Runs against the package's one real server (tests/serving/conftest.py)."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import torch

from lamp_runtime.prompts.prepared import assemble_embeddings, prepare

from .conftest import BUNDLED_TASKS
from .test_api import metric_samples

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
MESSAGES = [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What colour is the sky?"}]


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)


def chat_text(backbone, messages) -> str:
    return backbone.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def reference_logprobs(backbone, adapter, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the HF model's logits over [soft prompt ; token_ids], one row per position."""
    embeds = assemble_embeddings(prepare(adapter), backbone.embed(torch.tensor(token_ids)))
    with torch.inference_mode():
        return torch.log_softmax(backbone.model(inputs_embeds=embeds[None].float()).logits[0].float(), -1)


def test_chat_with_each_task_answers_like_generate_on_the_templated_text(oai, client, backbone):
    for task in BUNDLED_TASKS:
        reply = oai.chat.completions.create(model=task, messages=MESSAGES, max_tokens=8, temperature=0)
        same = client.post("/generate", json={"task_id": task, "input": chat_text(backbone, MESSAGES),
                                              "max_new_tokens": 8}).json()
        assert reply.object == "chat.completion" and reply.model == task and len(reply.choices) == 1
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == same["text"], task
        assert reply.choices[0].finish_reason == same["finish_reason"]
        assert reply.usage.prompt_tokens == same["usage"]["input_tokens"]
        assert reply.usage.completion_tokens == same["usage"]["completion_tokens"]


def test_async_streaming_chat_concatenates_to_the_whole_answer(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)
        whole = await client.chat.completions.create(model="lamp2", messages=MESSAGES, max_tokens=12, temperature=0)
        stream = await client.chat.completions.create(model="lamp2", messages=MESSAGES, max_tokens=12,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        await client.close()
        return whole, chunks

    whole, chunks = asyncio.run(run())
    choices = [c.choices[0] for c in chunks if c.choices]
    assert choices[0].delta.role == "assistant"
    assert "".join(c.delta.content or "" for c in choices) == whole.choices[0].message.content
    assert choices[-1].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


def test_chat_logprobs_equal_a_direct_forward(oai, backbone, bundled_adapters):
    reply = oai.chat.completions.create(model="lamp3", messages=MESSAGES, max_tokens=6, temperature=0,
                                        logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content  # EOS included when it ended the answer
    assert len(content) == reply.usage.completion_tokens + (reply.choices[0].finish_reason == "stop")
    token_ids = backbone.tokenizer(chat_text(backbone, MESSAGES), add_special_tokens=False)["input_ids"]
    adapter = bundled_adapters["lamp3"]
    for entry in content:  # greedy: each generated token is the reference's best at its position
        row = reference_logprobs(backbone, adapter, token_ids)[-1]
        best = int(row.argmax())
        assert entry.token == backbone.tokenizer.decode([best])
        assert abs(entry.logprob - float(row[best])) < TOLERANCE
        assert entry.bytes == list(entry.token.encode("utf-8"))
        top = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [backbone.tokenizer.decode([i]) for i in top.indices.tolist()]
        assert max(abs(t.logprob - v) for t, v in zip(entry.top_logprobs, top.values.tolist())) < TOLERANCE
        token_ids.append(best)


def test_echo_with_zero_tokens_scores_the_prompt_like_a_direct_forward(oai, backbone, bundled_adapters):
    prompt = "The sky is blue and the grass is green."
    reply = oai.completions.create(model="plain", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    ids = backbone.tokenizer(prompt)["input_ids"]
    adapter = bundled_adapters["plain"]
    reference = reference_logprobs(backbone, adapter, ids)
    assert choice.text == prompt and reply.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == len(ids)
    assert "".join(choice.logprobs.tokens) == prompt
    assert choice.logprobs.text_offset[0] == 0
    for i, value in enumerate(choice.logprobs.token_logprobs):  # the soft prompt precedes token 0
        assert abs(value - float(reference[adapter.pooled_tokens + i - 1, ids[i]])) < TOLERANCE
        assert len(choice.logprobs.top_logprobs[i]) <= 2


def test_completion_logprobs_follow_the_generated_tokens(oai):
    reply = oai.completions.create(model="lamp2", prompt="Once upon a time", max_tokens=5, temperature=0,
                                   logprobs=1, echo=False)
    lp, completion = reply.choices[0].logprobs, reply.usage.completion_tokens
    assert "".join(lp.tokens[:completion]) == reply.choices[0].text
    assert len(lp.token_logprobs) == completion + (reply.choices[0].finish_reason == "stop")
    assert all(v <= 0 for v in lp.token_logprobs)


def prefill_tokens(url: str) -> float:
    import httpx
    time.sleep(1.5)  # replicas push their metrics every 0.5 s
    return sum(s.value for s in metric_samples(httpx.get(f"{url}/metrics", timeout=30).text,
                                               "lamp_prefill_tokens_total"))


def test_n_seeded_samples_are_reproducible_and_share_one_prefill(oai, server):
    def ask(n, seed):
        return oai.completions.create(model="lamp2", prompt="Write a story about a cat:", max_tokens=6,
                                      temperature=1.0, seed=seed, n=n)

    ask(1, 0)  # warm the task's prompt keys/values, so both measurements below run the input only
    before = prefill_tokens(server.url)
    four = ask(4, 11)
    after_four = prefill_tokens(server.url)
    one = ask(1, 11)
    after_one = prefill_tokens(server.url)
    assert after_four - before == after_one - after_four > 0  # four samples, one prefill's tokens
    assert [c.index for c in four.choices] == [0, 1, 2, 3]
    assert four.choices[0].text == one.choices[0].text
    assert [c.text for c in ask(4, 11).choices] == [c.text for c in four.choices]
    assert [ask(1, 11 + i).choices[0].text for i in (1, 2)] == [c.text for c in four.choices[1:3]]
    assert four.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert len({c.text for c in four.choices}) > 1


def test_chat_n_samples_and_openai_errors(oai):
    reply = oai.chat.completions.create(model="lamp2", messages=MESSAGES, max_tokens=4, temperature=1, seed=3, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    with pytest.raises(openai.UnprocessableEntityError) as refused:  # our errors in OpenAI's shape
        oai.chat.completions.create(model="lamp2", messages=MESSAGES, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {}}}])
    assert "tools is not supported" in str(refused.value)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-task", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="lamp2", messages=MESSAGES, max_tokens=2,
                                    extra_body={"chat_format": "input_template"})
    assert "records no input_template" in str(refused.value)
