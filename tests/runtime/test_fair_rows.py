"""Fair rows on the real step cores (the HF decoder core over the fp32 backbone; the llama.cpp
core over the embedded GGUF): a task below its share of the batch rows enters at the next step by
pausing a row of the flooding task (fair_queue.py `admit`); the paused row keeps its keys/values
(copied out of its KV slot or stream) and resumes with the answer it has alone. A lone task fills
the batch."""

import pytest

from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.9, top_k=50, seed=7)


def heavy_requests():
    return [GenerationRequest("Tell me a story about a dragon", "plain", GREEDY),
            GenerationRequest("The weather today", "plain", SEEDED)]


def light_request():
    return GenerationRequest("1, 2, 3,", "lamp2", SamplingParams(max_new_tokens=3, ignore_eos=True))


@pytest.fixture(scope="module")
def llamacpp_core(task_adapters):
    """A llama.cpp core whose backbone and registry the llama.cpp variants share."""
    from lamp_runtime.llamacpp.engine import build_llamacpp_engine
    from lamp_runtime.llamacpp.options import LlamaCppOptions

    core = build_llamacpp_engine(config=EngineConfig(max_batch_size=2, threads=1),
                                 options=LlamaCppOptions(row_cells=128, probe=False))
    for task, adapter in task_adapters.items():
        core.registry.register(task, adapter)
    yield core
    core.close()


@pytest.fixture(params=["hf", "llamacpp"])
def core_of(request, engine):
    """Makes a core of two batch rows of the parametrized kind, with the three test tasks."""
    made = []

    def make(**config):
        if request.param == "hf":
            return DecoderEngine(engine.backbone, registry=engine.registry,
                                 config=EngineConfig(max_batch_size=2, **config))
        from lamp_runtime.llamacpp.engine import LlamaCppEngine

        base = request.getfixturevalue("llamacpp_core")
        made.append(LlamaCppEngine(base.backbone, base.registry, EngineConfig(max_batch_size=2, threads=1, **config),
                                   options=base.options))
        return made[-1]

    yield make
    for core in made:
        core.close()


def running_sequences(core):
    return core._running_sequences() if hasattr(core, "_running_sequences") else [r.seq for r in core._running]


def run(core, heavy, light, light_after_steps=3):
    """Submit the heavy requests, step, submit the light one; results by request id and the
    number of rows paused right after the light request's first step."""
    results, steps, paused_at_light = {}, 0, None
    for request in heavy:
        core.submit(request)
    while core.has_work() or steps <= light_after_steps:
        if steps == light_after_steps:
            core.submit(light)
        for out in core.step():
            if out.finished:
                results[out.request_id] = out.result
        if steps == light_after_steps:
            paused_at_light = core._waiting.paused
            running = {s.request.request_id for s in running_sequences(core)}
            assert (light.request_id in running) == (paused_at_light == 1)
        steps += 1
    return results, paused_at_light


def test_a_paused_row_resumes_with_its_answer_alone(core_of):
    alone_core = core_of()
    alone = [alone_core.generate([r])[0].token_ids for r in [*heavy_requests(), light_request()]]
    core = core_of()
    heavy, light = heavy_requests(), light_request()
    results, paused = run(core, heavy, light)
    assert paused == 1  # the light request entered at once: a heavy row waited for it
    assert [results[r.request_id].token_ids for r in [*heavy, light]] == alone
    assert all(len(t) == n for t, n in zip(alone, (12, 12, 3)))
    assert core.cache.stats().pinned == 0 and core._waiting.empty() and not running_sequences(core)
    stats = core.stats().tasks
    assert stats["plain"].admitted == 2 and stats["lamp2"].admitted == 1  # a resumed row is not admitted again


def test_without_fair_preemption_the_light_request_waits(core_of):
    core = core_of(fair_preemption=False)
    heavy, light = heavy_requests(), light_request()
    results, paused = run(core, heavy, light)
    assert paused == 0 and results[light.request_id].completion_tokens == 3


def test_a_lone_task_fills_the_batch_and_is_never_paused(core_of):
    core = core_of()
    requests = [*heavy_requests(), GenerationRequest("Once upon a time", "plain", GREEDY)]
    for request in requests:
        core.submit(request)
    core.step()
    assert core.num_running == 2 and core.num_waiting == 1 and core._waiting.paused == 0
    while core.has_work():
        core.step()
        assert core._waiting.paused == 0


def test_a_paused_row_can_be_aborted(core_of):
    core = core_of()
    heavy, light = heavy_requests(), light_request()
    for request in heavy:
        core.submit(request)
    core.step()
    core.submit(light)
    core.step()
    # the HF core queues a request's samples as one list; the llama.cpp core queues the request
    (paused,) = [s for item in core._waiting.items() for s in (item if isinstance(item, list) else [item])]
    core.abort(paused.request.request_id)
    outputs = core.step()
    assert [o.result.finish_reason for o in outputs if o.request_id == paused.request.request_id] == ["abort"]
    while core.has_work():
        core.step()
    assert core.cache.stats().pinned == 0 and core._waiting.paused == 0
