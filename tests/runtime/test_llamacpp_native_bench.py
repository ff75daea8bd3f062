"""bench.llamacpp's bare-loop side (bench/llamacpp_native.py) on the real embedded GGUF: it drives
the engine's own context with ctypes calls, counts the attention arithmetic from the model's
shape, and bench.llamacpp routes its variants to it."""

from __future__ import annotations

import pytest

from ..requires import require_module

require_module("llama_cpp", "the llama.cpp engine needs llama-cpp-python (make setup builds it)")

from lamp_runtime.bench.llamacpp import LLAMACPP_VARIANTS, side_for  # noqa: E402
from lamp_runtime.bench.llamacpp_native import PREFILL_INPUT, NativeLoopSide  # noqa: E402


@pytest.fixture(scope="module")
def side():
    s = NativeLoopSide({"kind": "llamacpp-native", "gguf": None, "clients": [1], "new_tokens": 4,
                        "decode_tokens": 8, "threads": 1})
    yield s
    s.close()


def test_counts_the_extra_attention_of_the_longer_prompt_from_the_model_shape(side):
    info = side.info()
    rows = len(side.core.backbone.tokenizer(PREFILL_INPUT)["input_ids"])
    # SmolLM2-135M: 9 query heads of 64, 30 layers; 198 more cached positions for each input row
    assert (info["input_rows"], info["heads"], info["layers"], info["head_dim"]) == (rows, 9, 30, 64)
    assert info["attention_flops_p200_minus_p2"] == 4 * 64 * 9 * 30 * 198 * rows
    assert info["float32_matmul_gflops"] > 0


def test_with_flash_attention_a_text_as_embedding_rows_answers_like_its_tokens(side):
    info = side.info()
    assert info["flash_attention"] and info["embedding_rows_answer_like_tokens"]
    assert len(info["greedy_by_tokens"]) == 24 and len(set(info["greedy_by_tokens"])) > 3  # a real answer


def test_decodes_and_prefills_in_the_engines_context(side):
    assert side.measure(("decode", "bare-loop"))["tokens_per_s"] > 0
    for name in ("native-p200", "native-p2", "native-nofa-p2"):  # this side serves any name it is routed
        assert side.measure(("prefill", name))["ms"] > 0
    # the sequence ends as long as the prompt plus the input: no cells left from earlier samples
    memory, L = side.memory, side.lib
    assert L.llama_memory_seq_pos_max(memory, 0) == 2 + side.input_rows.shape[0] - 1


def test_bench_routes_the_bare_loop_variants_to_its_process():
    sides = {kind: kind for kind in LLAMACPP_VARIANTS} | {"hf": "hf"}

    class Served:
        info = {"mixed_steps": "embed"}

    sides["llamacpp"] = Served
    assert side_for(("decode", "bare-loop"), sides) == "llamacpp-native"
    assert side_for(("prefill", "native-p2"), sides) == "llamacpp-native"
    assert side_for(("prefill", "native-nofa-p200"), sides) == "llamacpp-native-nofa"
    assert side_for(("decode", "bare-loop-nofa"), sides) == "llamacpp-native-nofa"
    assert side_for(("prefill", "p2"), sides) is Served
    assert side_for(("clients", "hf", 16), sides) == "hf"
