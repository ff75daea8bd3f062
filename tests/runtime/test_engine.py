"""The engine on the real embedded backbone (fp32): mixed-task batches give exactly the alone output."""

import pytest
import torch

from lamp_runtime.errors import RequestError, UnknownTaskError
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..conftest import run_staggered

REQUESTS = [  # (task, input, max_new_tokens): 3 tasks with pooled lengths 8, 6, 4, plus no task
    ("plain", "The capital of France is", 16),
    ("lamp2", "Write a haiku about the sea:", 10),
    ("lamp3", "1, 2, 3,", 20),
    (None, "Hello, my name is", 12),
    ("lamp2", "Once upon a time", 6),
    ("plain", "def add(a, b):", 14),
]


def make_requests(params=None):
    return [GenerationRequest(text, task, params or SamplingParams(max_new_tokens=n)) for task, text, n in REQUESTS]


def test_mixed_task_batch_equals_each_request_alone(engine):
    alone = [engine.generate([r])[0] for r in make_requests()]
    mixed = engine.generate(make_requests())
    assert [m.token_ids for m in mixed] == [a.token_ids for a in alone]
    assert [m.text for m in mixed] == [a.text for a in alone]
    assert all(a.completion_tokens > 0 for a in alone)
    assert [m.soft_prompt_tokens for m in mixed] == [8, 6, 4, 0, 6, 8]
    assert mixed[1].soft_prompt_tokens_saved == 12 - 6
    # different max_new_tokens: the short ones finished with 'length' at their own budget
    for (task, text, n), m in zip(REQUESTS, mixed):
        assert m.finish_reason == "stop" or m.completion_tokens == n


def test_requests_joining_a_running_batch_equal_alone(engine):
    """Continuous batching: requests submitted while others decode join mid-flight."""
    requests = make_requests()
    alone = [engine.generate([r])[0].token_ids for r in make_requests()]
    assert run_staggered(engine, requests, every=3) == alone


def test_streamed_deltas_concatenate_to_the_final_text(engine):
    params = SamplingParams(max_new_tokens=12)
    request = GenerationRequest("The best thing about Paris is", "lamp3", params)
    engine.submit(request)
    deltas, result = [], None
    while result is None:
        for out in engine.step():
            deltas.append(out.delta)
            result = out.result or result
    assert "".join(deltas) == result.text and len(deltas) == result.completion_tokens


def test_stop_strings_cut_the_text(engine):
    full = engine.generate([GenerationRequest("1, 2, 3,", "lamp3", SamplingParams(max_new_tokens=20))])[0]
    assert " 6," in full.text
    stopped = engine.generate([GenerationRequest("1, 2, 3,", "lamp3", SamplingParams(max_new_tokens=20, stop=(" 6,",)))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(" 6,")]


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    target = GenerationRequest("The weather today", "plain", params)
    alone = engine.generate([target])[0].token_ids
    crowd = make_requests()
    batched = engine.generate(crowd[:3] + [GenerationRequest("The weather today", "plain", params)] + crowd[3:])
    assert batched[3].token_ids == alone
    other_seed = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=99)
    assert engine.generate([GenerationRequest("The weather today", "plain", other_seed)])[0].token_ids != alone


def test_abort_releases_the_prompt(engine):
    request = GenerationRequest("Tell me a long story", "lamp2", SamplingParams(max_new_tokens=50))
    engine.submit(request)
    engine.step()
    assert engine.cache.stats().pinned == 1
    engine.abort(request.request_id)
    (out,) = [o for o in engine.step() if o.finished]
    assert out.result.finish_reason == "abort" and engine.cache.stats().pinned == 0
    assert not engine.has_work()


def test_reregistered_task_serves_new_version_and_running_request_keeps_old(engine, task_adapters):
    old = engine.registry.get("plain")
    running = GenerationRequest("The capital of France is", "plain", SamplingParams(max_new_tokens=5))
    engine.submit(running)
    engine.registry.register("plain", task_adapters["lamp3"])
    results = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.result
    assert results[running.request_id].adapter_version == old.version
    fresh = engine.generate([GenerationRequest("x", "plain", SamplingParams(max_new_tokens=1))])[0]
    assert fresh.adapter_version == old.version + 1 and fresh.soft_prompt_tokens == 4


def test_request_validation(engine):
    with pytest.raises(UnknownTaskError):
        engine.submit(GenerationRequest("hi", "no-such-task"))
    with pytest.raises(RequestError, match="max_new_tokens must be"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(RequestError, match="over the limit"):
        engine.submit(GenerationRequest("word " * 3000, "plain"))
    with pytest.raises(RequestError, match="empty"):
        engine.submit(GenerationRequest("", None))
    assert not engine.has_work()


def test_prompt_is_cached_once_per_task_version(engine):
    engine.generate(make_requests())
    engine.generate(make_requests())
    stats = engine.cache.stats()
    assert stats.misses == 3 and stats.hits == 7 and stats.pinned == 0
    cached = engine.cache.acquire(("lamp2", 1), lambda: pytest.fail("must be cached"))
    assert cached.prompt.dtype == torch.float32 and cached.prompt.shape == (6, 576) and cached.offset is None
    engine.cache.release(("lamp2", 1))


def test_ignore_eos_generates_exactly_max_new_tokens(engine):
    text = "Answer with one word. Is the sky blue?"
    normal = engine.generate([GenerationRequest(text, None, SamplingParams(max_new_tokens=40))])[0]
    forced = engine.generate([GenerationRequest(text, None, SamplingParams(max_new_tokens=40, ignore_eos=True))])[0]
    assert forced.completion_tokens == 40 and forced.finish_reason == "length"
    assert normal.finish_reason == "stop" or normal.completion_tokens == 40


def test_a_long_newcomer_is_prefilled_apart_and_answers_stay_the_same(engine):
    """One long input among short ones: prefilled in its own forward, not padding every short row
    to its length; each answer still equals the request alone."""
    long_text = "Summarize: " + " ".join(f"item {i} is on the shelf." for i in range(40))
    requests = [*make_requests(), GenerationRequest(long_text, "lamp3", SamplingParams(max_new_tokens=8))]
    alone = [engine.generate([r])[0].token_ids for r in [*make_requests(), requests[-1]]]
    ids = [engine.submit(r) for r in requests]
    results, stats = {}, None
    while len(results) < len(ids):
        outputs = engine.step()
        stats = stats or engine.last_step  # the first step prefilled every request
        results.update((out.request_id, out.result) for out in outputs if out.result is not None)
    assert [results[i].token_ids for i in ids] == alone
    lengths = [results[i].input_tokens + results[i].soft_prompt_tokens for i in ids]
    one_batch_padding = max(lengths) * len(lengths) - sum(lengths)
    assert stats.prefilled == len(requests) and stats.prefill_forwards == 2
    assert stats.prefill_padding < one_batch_padding / 10
