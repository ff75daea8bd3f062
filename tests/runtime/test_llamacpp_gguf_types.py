"""The llama.cpp engine on GGUF types other than the embedded Q4_1: Q4_K_M, Q8_0, F16 and Q4_0 files made
from the embedded GGUF by llama.cpp's own quantizer (`llama_model_quantize`, requantizing), each
loaded once and checked as the Q4_1 engine is in tests/runtime/test_llamacpp_engine.py (whose checks
and adapters are reused here): the token-embedding table read by backbone.py, soft prompts of the
file's own embedding rows answering exactly like the tokens, prompt KV cold = warm, every adapter kind.

What llama.cpp writes (read with gguf's GGUFReader when this was written): SmolLM2's width 576 is
not a multiple of 256, so Q4_K_M keeps K-quants only for the 1536-wide down projections (Q4_K, Q6_K)
and falls back to Q5_0 / Q8_0 elsewhere; token_embd stays the source's Q8_0 in the Q4_K_M, Q8_0
and Q4_0 files (llama.cpp refuses to write a Q4_K token_embd at this width) and is F16 in the F16 file, which
the table test tells apart.
"""

from __future__ import annotations

import ctypes
import math
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch

from ..requires import require_module

require_module("llama_cpp", "the llama.cpp engine needs llama-cpp-python (make setup builds it)")

from lamp_runtime.backbone.options import BackboneOptions  # noqa: E402
from lamp_runtime.engine.base import EngineConfig  # noqa: E402
from lamp_runtime.llamacpp.engine import build_llamacpp_engine  # noqa: E402
from lamp_runtime.llamacpp.native import lib  # noqa: E402
from lamp_runtime.llamacpp.options import LlamaCppOptions  # noqa: E402
from lamp_runtime.llamacpp.requantize import quantize_file  # noqa: E402
from lamp_runtime.requests import GenerationRequest  # noqa: E402

# The Q4_1 module's adapters of every kind, built from whichever `engine` this module gives.
from .test_llamacpp_engine import adapters, table, tasks  # noqa: E402, F401
from .test_llamacpp_engine import (  # noqa: E402
    TEXTS, assert_embedding_rows_answer_like_their_tokens, assert_prompt_kv_cold_warm_and_concurrent_equal, greedy)

NEW = 4  # tokens per answer: exactness shows within a few, and every request costs a decode per token
# ftype -> (how llama.cpp describes the loaded model's type, token_embd's type)
TYPES = {"Q4_K_M": ("Q4_K - Medium", "Q8_0"), "Q8_0": ("Q8_0", "Q8_0"), "F16": ("F16", "F16"),
         "Q4_0": ("Q4_0", "Q8_0")}


@pytest.fixture(scope="session")
def gguf_files() -> dict[str, Path]:
    """The embedded GGUF in each of TYPES, made once per source file and llama-cpp-python version
    and kept in the lamp cache folder: unchanged files keep backbone.py's table cache and the
    tokenizer conversion warm from run to run (quantizing all three took 3.8 s here). "tiny-k": a
    random-weight 256-wide model with a Q4_K token_embd (what a Llama-2-7B Q4_K_M holds)."""
    from filelock import FileLock

    from lamp_runtime.backbone.checkpoint import cache_root, embedded_gguf_path

    from lamp_runtime.backbone.random_shape import write_random_gguf

    source = embedded_gguf_path()
    folder = cache_root() / "test-ggufs" / f"{source.stem}-{source.stat().st_size}-llama-cpp-{version('llama_cpp_python')}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    with FileLock(str(folder) + ".lock"):
        for ftype in TYPES:
            path = folder / f"{source.stem.rsplit('.', 1)[0]}.{ftype}.gguf"
            files[ftype] = path if path.is_file() else quantize_file(source, path, ftype)
        path = folder / "random-tiny-k-shape.Q4_K_M.gguf"
        if not path.is_file():
            tiny = write_random_gguf(folder / "random-tiny-k-shape.Q4_1.gguf", "tiny-k", seed=5, progress=False)
            quantize_file(tiny, path, "Q4_K_M", token_embd="Q4_K")
            tiny.unlink()
        files["tiny-k"] = path
    return files


@pytest.fixture(scope="module", params=list(TYPES))
def gguf_type(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def engine(gguf_files, gguf_type):
    e = build_llamacpp_engine(BackboneOptions(path=str(gguf_files[gguf_type])),
                              EngineConfig(max_batch_size=8, max_input_tokens=256, max_new_tokens=NEW, threads=1),
                              LlamaCppOptions(row_cells=512, probe=False))
    yield e
    e.close()


def test_llama_cpp_runs_the_type_and_the_table_is_the_files_token_embd(gguf_type, engine):
    from lamp_runtime.backbone.checkpoint import embedded_gguf_path
    from lamp_runtime.llamacpp.backbone import read_gguf

    described = ctypes.create_string_buffer(128)
    lib().llama_model_desc(engine.backbone.model, described, len(described))
    assert described.value.decode().endswith(TYPES[gguf_type][0]), described.value
    table = engine.backbone.info.table
    assert table.dtype == np.float32 and table.shape == (49152, 576) and np.isfinite(table).all()
    source = read_gguf(embedded_gguf_path()).table
    if TYPES[gguf_type][1] == "F16":  # the source's Q8_0 values rounded to float16
        assert not np.array_equal(table, source) and np.allclose(table, source, rtol=2.0**-11, atol=2.0**-25)
    else:  # llama.cpp kept the source's Q8_0 token_embd as it was
        assert np.array_equal(table, source)


def test_soft_prompt_of_the_files_embedding_rows_answers_like_the_tokens(engine, table):
    assert_embedding_rows_answer_like_their_tokens(engine, table, NEW)


def test_prompt_kv_cold_equals_warm(engine, adapters):
    assert_prompt_kv_cold_warm_and_concurrent_equal(engine, adapters["lamp2"], NEW, concurrent=2)


def test_one_request_per_adapter_kind_answers(engine, adapters, tasks):
    results = engine.generate([GenerationRequest(TEXTS[0], task, greedy(NEW)) for task in tasks])
    for adapter, result in zip(adapters.values(), results):
        assert result.finish_reason in ("length", "stop") and result.token_ids, result
        assert result.soft_prompt_tokens_computed == adapter.pooled_tokens  # its prompt was built and fed
        assert all(math.isfinite(entry.logprob) for entry in result.logprobs)


def test_a_q4_k_token_embd_is_read_as_llama_cpp_embeds_it(gguf_files):
    """A Q4_K table (SmolLM2 cannot hold one): gguf's dequantization of it is llama.cpp's, row for
    row, or a soft prompt of its rows would not answer like the tokens on random weights either."""
    from gguf import GGUFReader

    path = gguf_files["tiny-k"]
    assert next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight").tensor_type.name == "Q4_K"
    e = build_llamacpp_engine(BackboneOptions(path=str(path)), EngineConfig(max_batch_size=2, threads=1),
                              LlamaCppOptions(row_cells=128, probe=False))
    try:
        assert_embedding_rows_answer_like_their_tokens(e, torch.from_numpy(np.array(e.backbone.info.table)), 8)
    finally:
        e.close()
