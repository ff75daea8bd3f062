"""The llama.cpp engine on the real embedded GGUF: soft prompts as embedding rows answer like the
tokens they embed, mixed-task batches equal one request at a time, prompt KV shared by seq_cp
(cold = warm = concurrent, eviction, discard), every adapter kind, sampling and request options,
the kernel-settings probe in a child process, and the refusals before loading."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from ..requires import require_module

require_module("llama_cpp", "the llama.cpp engine needs llama-cpp-python (make setup builds it)")

from lamp_runtime.adapters import AdapterMeta, EptAdapter, LampAdapter, SoftPromptAdapter, adapter_from_peft  # noqa: E402
from lamp_runtime.engine.base import EngineConfig  # noqa: E402
from lamp_runtime.errors import InputTooLongError, RequestError, UnknownTaskError  # noqa: E402
from lamp_runtime.llamacpp.engine import LlamaCppEngine, build_llamacpp_engine  # noqa: E402
from lamp_runtime.llamacpp.native import Batch, KernelSettings, lib, new_context  # noqa: E402
from lamp_runtime.llamacpp.options import LlamaCppOptions  # noqa: E402
from lamp_runtime.prompts.prompt_kv import TaskHits  # noqa: E402
from lamp_runtime.requests import GenerationRequest, SamplingParams  # noqa: E402

from ..conftest import run_staggered_results  # noqa: E402


NEW = 12
TEXTS = ["The capital of France is", "Hi", "List three colours:", "Once upon a time"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = build_llamacpp_engine(config=EngineConfig(max_batch_size=8, max_input_tokens=512, max_new_tokens=64, threads=1),
                              options=LlamaCppOptions(row_cells=512, probe=False))
    yield e
    e.close()


@pytest.fixture(scope="module")
def table(engine):
    return torch.from_numpy(engine.backbone.info.table)


def vocab_rows(table, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return table[torch.randint(0, table.shape[0], (length,), generator=g)].clone()


def lamp_of(prompt: torch.Tensor, rank: int, pool: int) -> LampAdapter:
    u, s, vh = torch.linalg.svd(prompt, full_matrices=False)
    return LampAdapter(AdapterMeta(pool=pool), u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous())


def peft_of(prompt: torch.Tensor):
    from safetensors.torch import save

    config = json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": prompt.shape[0]}).encode()
    return adapter_from_peft(config, save({"prompt_embeddings": prompt.contiguous()}))


@pytest.fixture(scope="module")
def adapters(table):
    g = torch.Generator().manual_seed(11)
    return {
        "plain": SoftPromptAdapter(AdapterMeta(), vocab_rows(table, 8, 1)),
        "lamp2": lamp_of(vocab_rows(table, 12, 2), rank=8, pool=2),
        "lamp3": lamp_of(vocab_rows(table, 10, 3), rank=6, pool=3),
        "peft": peft_of(vocab_rows(table, 6, 4)),
        "ept": EptAdapter(AdapterMeta(), vocab_rows(table, 5, 12), torch.randn(4, 2, generator=g) * 0.05,
                          torch.randn(2, table.shape[1], generator=g) * 0.05),
    }


@pytest.fixture(scope="module")
def tasks(engine, adapters):
    for task_id, adapter in adapters.items():
        engine.registry.register(task_id, adapter)
    return list(adapters)


def greedy(max_new_tokens=NEW, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **{"logprobs": 5, **kw})


# llama.cpp is not bitwise batch-invariant: its flash attention sums values in float16 in the
# unified cache's cell order, and which cells a sequence gets depends on the batch composition and
# on what else the cache holds. So two runs of one request may part at a near tie (measured: a
# 0.059-nat gap between one decode and split decodes of the same mixed steps).
NEAR_TIE = 0.1  # nats between the two tokens where the runs part


def assert_same_or_near_tie(a, b) -> None:
    """`a` and `b` (results with logprobs) generate the same tokens, or part only at a near tie."""
    for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
        if x != y:
            tops = dict((t, lp) for _, t, lp in a.logprobs[i].top)
            assert y in tops and tops[x] - tops[y] < NEAR_TIE, (i, a.token_ids, b.token_ids, a.logprobs[i].top)
            return
    assert len(a.token_ids) == len(b.token_ids) or a.finish_reason == b.finish_reason == "length"


def assert_all_same_or_near_tie(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert_same_or_near_tie(a, b)


def tokens_reference(engine, token_ids: list[int], new: int) -> list[int]:
    """llama.cpp fed the tokens themselves (a token batch in a fresh context with the engine's
    attention kernel), greedy."""
    L = lib()
    ctx = new_context(engine.backbone.model, 1024, 512, engine.backbone.settings.n_ubatch, 1, engine.ggml_threads,
                      flash_attention=engine.options.flash_attention)
    try:
        batch, vocab, out = Batch(512), engine.backbone.info.table.shape[0], []
        batch.add(len(token_ids), 0, 0)
        batch.tokens[:len(token_ids)] = token_ids
        pos = len(token_ids)
        for _ in range(new):
            batch.decode(ctx)
            token = int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(1, vocab))[0]))
            if token in engine.backbone.eos_token_ids():
                break
            out.append(token)
            batch.clear()
            batch.add(1, 0, pos)
            batch.tokens[0] = token
            pos += 1
        return out
    finally:
        L.llama_free(ctx)


def assert_embedding_rows_answer_like_their_tokens(engine, table, new: int = NEW) -> None:
    """A soft prompt made of the GGUF's own embedding rows of a text, then more text, answers
    exactly (greedy) like llama.cpp fed all of it as tokens, on every repetition (the prompt-KV
    miss and its hits), and so does the whole text as a request without a task."""
    tok = engine.backbone.tokenizer
    head, tail = tok("The capital of France is")["input_ids"], tok(" a city called")["input_ids"]
    engine.registry.register("as-text", SoftPromptAdapter(AdapterMeta(), table[head].clone()))
    expected = tokens_reference(engine, head + tail, new)
    assert expected  # an empty answer would compare equal to anything that stops at once
    for _ in range(3):
        result = engine.generate([GenerationRequest(None, "as-text", greedy(new), input_ids=tail)])[0]
        assert result.token_ids == expected
    no_task = engine.generate([GenerationRequest(None, None, greedy(new), input_ids=head + tail)])[0]
    assert no_task.token_ids == expected


def test_soft_prompt_of_token_embeddings_answers_like_the_tokens(engine, table):
    assert_embedding_rows_answer_like_their_tokens(engine, table)


def test_mixed_task_batches_equal_one_at_a_time_with_requests_joining(engine, tasks):
    assert_mixed_batches_equal_one_at_a_time(engine, tasks)


def test_without_flash_attention_answers_are_as_exact(engine, table, tasks):
    """llama.cpp's other attention kernel (LlamaCppOptions.flash_attention=False; docs/llamacpp.md,
    "Attention kernels"): with a KV stream per sequence, embedding rows still answer like their
    tokens and mixed batches like one request at a time."""
    plain = LlamaCppEngine(engine.backbone, engine.registry, engine.config,
                           options=LlamaCppOptions(row_cells=512, flash_attention=False))
    try:
        assert_embedding_rows_answer_like_their_tokens(plain, table)
        assert_mixed_batches_equal_one_at_a_time(plain, tasks)
    finally:
        plain.close()


def assert_mixed_batches_equal_one_at_a_time(engine, tasks) -> None:
    requests = [GenerationRequest(text, task, greedy()) for text in TEXTS[:2] for task in [*tasks, None]]
    alone = [engine.generate([GenerationRequest(r.input, r.task_id, r.params)])[0] for r in requests]
    together = engine.generate([GenerationRequest(r.input, r.task_id, r.params) for r in requests])
    assert_all_same_or_near_tie(alone, together)
    staggered = run_staggered_results(engine, [GenerationRequest(r.input, r.task_id, r.params) for r in requests], 2)
    assert_all_same_or_near_tie(alone, staggered)
    assert engine.num_running == 0 and len(engine._free_ids) == engine.config.max_batch_size


def test_mixed_steps_as_one_decode_answer_like_split_ones(engine, tasks):
    assert engine.options.mixed_steps == "embed"  # the default
    embed = LlamaCppEngine(engine.backbone, engine.registry, engine.config,
                           options=LlamaCppOptions(row_cells=512, mixed_steps="split"))
    try:
        requests = [GenerationRequest(t, task, greedy()) for t, task in zip(TEXTS, ["plain", "ept", None, "lamp2"])]
        assert_all_same_or_near_tie(
            run_staggered_results(embed, requests, 3),
            run_staggered_results(engine, [GenerationRequest(r.input, r.task_id, r.params) for r in requests], 3))
    finally:
        embed.close()


def assert_prompt_kv_cold_warm_and_concurrent_equal(engine, adapter, new: int = NEW, concurrent: int = 4) -> None:
    """`adapter`'s prompt KV computed once (a miss), then reused by a warm request and by
    `concurrent` requests at once (hits): all answer alike."""
    engine.registry.register("kv", adapter)
    key = engine.registry.get("kv").cache_key
    before = engine.prompt_kv_stats()
    cold = engine.generate([GenerationRequest(TEXTS[0], "kv", greedy(new))])[0]
    warm = engine.generate([GenerationRequest(TEXTS[0], "kv", greedy(new))])[0]
    together = engine.generate([GenerationRequest(TEXTS[0], "kv", greedy(new)) for _ in range(concurrent)])
    after = engine.prompt_kv_stats()
    assert cold.soft_prompt_tokens_computed == adapter.pooled_tokens and warm.soft_prompt_tokens_computed == 0
    assert_all_same_or_near_tie([cold] * (1 + concurrent), [warm, *together])
    assert after.misses == before.misses + 1 and after.hits == before.hits + 1 + concurrent
    was = before.by_task.get("kv", TaskHits(hits=0, misses=0))
    assert after.by_task["kv"] == TaskHits(hits=was.hits + 1 + concurrent, misses=was.misses + 1)
    saved = (adapter.prompt_tokens - adapter.pooled_tokens) * engine.kv_bytes_per_token  # cells held instead of l
    # per position as stored: llama.cpp's state format adds a header of a few hundred bytes
    assert saved <= after.pooling_saved_bytes - before.pooling_saved_bytes <= saved * 1.01
    engine.discard(key)


def test_prompt_kv_cold_warm_and_concurrent_are_equal(engine, tasks, adapters):
    assert adapters["lamp2"].pooled_tokens == 6
    assert_prompt_kv_cold_warm_and_concurrent_equal(engine, adapters["lamp2"])


def test_prompt_kv_eviction_under_a_small_budget(engine, tasks):
    small = LlamaCppEngine(engine.backbone, engine.registry,
                           EngineConfig(max_batch_size=4, prompt_kv_cache_bytes=10 * engine.kv_bytes_per_token),
                           options=LlamaCppOptions(row_cells=256))
    try:
        first = small.generate([GenerationRequest(TEXTS[0], "plain", greedy())])[0]  # 8 prompt cells
        plain, lamp2 = engine.registry.get("plain").cache_key, engine.registry.get("lamp2").cache_key
        held = small.prompt_kv_stats().bytes  # llama.cpp's state of 8 cells: their keys/values and a header
        assert plain in small.prompt_kv and 8 * engine.kv_bytes_per_token <= held < 9 * engine.kv_bytes_per_token
        other = small.generate([GenerationRequest(TEXTS[0], "lamp2", greedy())])[0]  # 6 cells: evicts plain
        assert small.prompt_kv_stats().evictions == 1 and small.prompt_kv_stats().entries == 1
        assert plain not in small.prompt_kv and lamp2 in small.prompt_kv
        assert small.num_running == 0 and all(lib().llama_memory_seq_pos_max(small._mem, s) == -1 for s in range(4))
        again = small.generate([GenerationRequest(TEXTS[0], "plain", greedy())])[0]
        assert again.soft_prompt_tokens_computed == 8
        assert_same_or_near_tie(first, again)
        assert_same_or_near_tie(other, engine.generate([GenerationRequest(TEXTS[0], "lamp2", greedy())])[0])
    finally:
        small.close()


def test_reregistration_discards_the_old_prompt_kv(engine, tasks, adapters):
    engine.registry.register("rereg", adapters["plain"])
    old = engine.registry.get("rereg").cache_key
    v1 = engine.generate([GenerationRequest(TEXTS[2], "rereg", greedy())])[0]
    assert old in engine.prompt_kv
    engine.registry.register("rereg", adapters["lamp3"])
    engine.discard(old)  # what the serving layer does on re-registration
    assert old not in engine.prompt_kv
    v2 = engine.generate([GenerationRequest(TEXTS[2], "rereg", greedy())])[0]
    assert v2.adapter_version == v1.adapter_version + 1 and v2.soft_prompt_tokens_computed == 4
    assert_same_or_near_tie(v2, engine.generate([GenerationRequest(TEXTS[2], "lamp3", greedy())])[0])


def test_seeded_sampling_is_reproducible_and_n_forks_match_single_samples(engine, tasks):
    def sample(seed, n=1, task="lamp3"):
        params = SamplingParams(max_new_tokens=NEW, temperature=0.9, top_p=0.95, top_k=50, seed=seed, n=n)
        request = GenerationRequest(TEXTS[3], task, params)
        engine.submit(request)
        results = {}
        while len(results) < n:
            for out in engine.step():
                if out.result is not None:
                    results[out.result.index] = out.result.token_ids
        return [results[i] for i in range(n)]

    assert sample(7) == sample(7)
    forked = sample(7, n=3)
    assert forked == [sample(7)[0], sample(8)[0], sample(9)[0]]  # sample i draws with seed + i
    assert len({tuple(t) for t in forked}) > 1


def test_stop_strings_logprobs_and_echo(engine, tasks):
    full = engine.generate([GenerationRequest(TEXTS[0], "plain", greedy(logprobs=3))])[0]
    assert len(full.logprobs) == len(full.token_ids) or full.finish_reason == "stop"
    for entry, token in zip(full.logprobs, full.token_ids):
        assert entry.token_id == token and entry.top[0][1] == token  # greedy: the most likely
        assert len(entry.top) == 3 and entry.logprob <= 0
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    cut = engine.generate([GenerationRequest(TEXTS[0], "plain", greedy(stop=(stop,)))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    echo = engine.generate([GenerationRequest(TEXTS[0], None, SamplingParams(max_new_tokens=0, prompt_logprobs=2))])[0]
    ids = engine.backbone.tokenizer(TEXTS[0])["input_ids"]
    assert [e.token_id for e in echo.prompt_logprobs] == ids and echo.prompt_logprobs[0].logprob is None
    assert all(e.logprob < 0 and len(e.top) == 2 for e in echo.prompt_logprobs[1:])
    with_task = engine.generate([GenerationRequest(TEXTS[0], "plain", greedy(prompt_logprobs=0, logprobs=0))])[0]
    assert with_task.prompt_logprobs[0].logprob is not None
    assert_same_or_near_tie(full, with_task)


def test_abort_frees_the_row_and_errors_are_refused_before_queueing(engine, tasks):
    request = GenerationRequest(TEXTS[1], "ept", greedy(max_new_tokens=60, ignore_eos=True))
    engine.submit(request)
    engine.step(), engine.step()
    engine.abort(request.request_id)
    outs = engine.step()
    assert [o.result.finish_reason for o in outs if o.result] == ["abort"]
    assert engine.num_running == 0 and len(engine._free_ids) == engine.config.max_batch_size and not engine.has_work()
    with pytest.raises(UnknownTaskError):
        engine.submit(GenerationRequest("x", "nope", greedy()))
    with pytest.raises(InputTooLongError):
        engine.submit(GenerationRequest(None, None, greedy(), input_ids=[5] * 600))
    with pytest.raises(RequestError):
        engine.submit(GenerationRequest("x", None, SamplingParams(n=9)))
    assert engine.num_waiting == 0


def test_adapter_kinds_match_the_hf_float32_engine_within_a_logprob_bound(engine, tasks, adapters, backbone):
    """Q4_1 weights with 8-bit activations and an f16 KV cache (llama.cpp) vs the same weights
    dequantized to float32 (HF): the first token agrees (or both are near-tied in HF's
    distribution) and its log-probability is close. Measured on these inputs and all five kinds:
    at most 0.36 nats apart (a PEFT prompt of random vocabulary rows before "Hi"), 3 of 24 first
    tokens differing at HF gaps under 0.3."""
    from lamp_runtime.hf.decoder import DecoderEngine

    hf = DecoderEngine(backbone, config=EngineConfig(max_batch_size=8))
    for task_id, adapter in adapters.items():
        hf.registry.register(task_id, adapter)
    requests = [(t, task) for t in TEXTS for task in [*tasks, None]]
    ours = engine.generate([GenerationRequest(t, task, greedy(max_new_tokens=1)) for t, task in requests])
    theirs = hf.generate([GenerationRequest(t, task, greedy(max_new_tokens=1)) for t, task in requests])
    for a, b in zip(ours, theirs):
        hf_tops = {t: lp for _, t, lp in b.logprobs[0].top}
        if a.token_ids[0] == b.token_ids[0]:
            assert abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < LOGPROB_BOUND
        else:
            assert b.logprobs[0].logprob - hf_tops[a.token_ids[0]] < LOGPROB_BOUND


LOGPROB_BOUND = 0.5


def test_probe_uses_the_cache_and_skips_a_crashing_setting(engine, tmp_path):
    from lamp_runtime.llamacpp.probe import MIX, probe_settings, serving_seconds, setting_key

    crashing = tmp_path / "child.py"
    crashing.write_text("import json, os, sys\n"
                        "if json.loads(sys.argv[2])['weight_repack']:\n    os.abort()\n"
                        "from lamp_runtime.llamacpp.probe import main\nmain(sys.argv[1:])\n")
    candidates = (KernelSettings(True, 512), KernelSettings(False, 512))
    cache = tmp_path / "probe.json"
    report = probe_settings(engine.backbone.path, 2, candidates, cache, [sys.executable, str(crashing)])
    assert report.chosen == KernelSettings(False, 512) and report.source == "probed"
    failed = report.results[setting_key(candidates[0])]
    assert not failed["ok"] and "signal 6" in failed["error"]
    passed = report.results[setting_key(candidates[1])]
    assert passed["ok"] and all(passed[part] > 0 for part in MIX)  # each part of the mix timed
    assert passed["seconds"] == serving_seconds(passed)  # the choice is made on the serving mix
    again = probe_settings(engine.backbone.path, 2, candidates, cache, ["/bin/false"])  # no child runs
    assert again.chosen == report.chosen and again.source == "cached"


def tiny_gguf(path, arch: str, width: int):
    """A GGUF holding only a 16 x 8 token-embedding table, claiming `arch` and embedding `width`."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_embedding_length(width)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path


def test_refusals_before_loading(tmp_path, engine):
    from lamp_runtime.backbone.options import BackboneOptions
    from lamp_runtime.llamacpp.backbone import check_memory, load_llamacpp_backbone, read_gguf

    path = tiny_gguf(tmp_path / "odd.gguf", "notanarch", width=8)
    with pytest.raises(ValueError, match="notanarch"):
        load_llamacpp_backbone(BackboneOptions(path=str(path)), KernelSettings(), 64)
    wide = tiny_gguf(tmp_path / "wide.gguf", "llama", width=6)
    with pytest.raises(ValueError, match="mismatches"):
        read_gguf(wide)
    with pytest.raises(MemoryError, match="cannot fit"):
        check_memory(engine.backbone.info, 1 << 20, KernelSettings(), available=1 << 30)
    with pytest.raises(ValueError, match="GGUF"):
        load_llamacpp_backbone(BackboneOptions(path=str(tmp_path)), KernelSettings(), 64)


def test_running_rows_stay_on_consecutive_sequence_ids_and_answer_alike(engine, tasks):
    """llama.cpp splits a decode over KV streams into micro-batches of consecutive, increasing
    sequence ids: rows that finish out of order leave holes, which the engine closes by moving
    the highest rows' cells down (engine._compact). The moved rows answer as they do alone."""
    lengths = [2, 9, 4, 9, 3, 7]
    requests = [GenerationRequest(TEXTS[i % len(TEXTS)], [*tasks, None][i % 4], greedy(n, logprobs=None))
                for i, n in enumerate(lengths)]
    alone = [engine.generate([GenerationRequest(r.input, r.task_id, r.params)])[0] for r in requests]
    for r in requests:
        engine.submit(r)
    results = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.result
        assert [r.seq_id for r in engine._running] == list(range(engine.num_running))
    assert_all_same_or_near_tie(alone, [results[r.request_id] for r in requests])
