"""LlamaCppOptions.requantize: the GGUF rewritten by llama.cpp's quantizer once per source file and
kept (atomically, the disk checked first), the engine serving it and saying so. That a requantized
file answers as llama.cpp fed the tokens, every adapter kind and the prompt KV are checked on it in
tests/runtime/test_llamacpp_gguf_types.py (its Q4_0 case)."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from ..requires import require_module

require_module("llama_cpp", "the llama.cpp engine needs llama-cpp-python (make setup builds it)")

from lamp_runtime.backbone.checkpoint import embedded_gguf_path  # noqa: E402
from lamp_runtime.backbone.options import BackboneOptions  # noqa: E402
from lamp_runtime.engine.base import EngineConfig  # noqa: E402
from lamp_runtime.llamacpp import requantize  # noqa: E402
from lamp_runtime.llamacpp.engine import build_llamacpp_engine  # noqa: E402
from lamp_runtime.llamacpp.native import lib  # noqa: E402
from lamp_runtime.llamacpp.options import LlamaCppOptions  # noqa: E402
from lamp_runtime.requests import GenerationRequest, SamplingParams  # noqa: E402


def test_a_source_is_requantized_once_and_a_file_of_the_type_is_served_as_it_is(tmp_path, monkeypatch, capsys,
                                                                                  caplog):
    monkeypatch.setenv("LAMP_CACHE_DIR", str(tmp_path))
    source = embedded_gguf_path()
    with caplog.at_level("WARNING", logger="lamp_runtime.llamacpp.requantize"):
        made = requantize.requantized_gguf(source, "Q4_0")
    assert "requantized to Q4_0: adapters trained on its own weights can lose their accuracy" in caplog.text
    assert made.parent == tmp_path / "llamacpp-requantized" and made.name.endswith(".Q4_0.gguf"), made
    assert requantize.file_type(made) == lib().LLAMA_FTYPE_MOSTLY_Q4_0
    assert requantize.file_type(source) == lib().LLAMA_FTYPE_MOSTLY_Q4_1
    written = made.stat().st_mtime_ns
    assert requantize.requantized_gguf(source, "Q4_0") == made and made.stat().st_mtime_ns == written  # kept
    assert requantize.requantized_gguf(made, "Q4_0") == made  # already Q4_0: no copy
    assert requantize.requantized_gguf(source, "Q4_1") == source
    assert not list(made.parent.glob("*.partial"))
    requantize.main(["Q4_0"])  # the command that makes it ahead of serving prints where it is
    assert capsys.readouterr().out.strip() == str(made)


def test_a_failed_requantize_leaves_no_file(tmp_path):
    source = tmp_path / "broken.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 64)
    out = tmp_path / "out.gguf"
    with pytest.raises(RuntimeError, match="could not requantize broken.gguf to Q4_0"):
        requantize.quantize_file(source, out, "Q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_a_disk_too_small_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMP_CACHE_DIR", str(tmp_path))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 4096, 4096))
    with pytest.raises(OSError, match=r"needs about 0\.1 GiB of disk .* and 0\.0 GiB are free"):
        requantize.requantized_gguf(embedded_gguf_path(), "Q4_0")
    written = [p.name for p in (tmp_path / "llamacpp-requantized").iterdir() if not p.name.endswith(".lock")]
    assert written == []


@pytest.mark.parametrize("name", ["Q3_X", "q4_0", ""])
def test_an_unknown_type_is_refused_naming_the_choices(name):
    with pytest.raises(ValueError, match="is not one of Q4_0, Q4_1"):
        LlamaCppOptions(requantize=name)
    with pytest.raises(ValueError, match="is not one of Q4_0, Q4_1"):
        requantize.requantized_gguf(embedded_gguf_path(), name)


def test_the_engine_serves_the_requantized_weights_and_says_so():
    engine = build_llamacpp_engine(config=EngineConfig(max_batch_size=2, max_input_tokens=64, max_new_tokens=4,
                                                       threads=1),
                                   options=LlamaCppOptions(row_cells=128, probe=False, requantize="Q4_0"))
    try:
        assert engine.backbone.path == requantize.requantized_path(embedded_gguf_path(), "Q4_0")
        assert engine.settings["weights"] == "Q4_0 requantized"
        assert engine.stats().settings["weights"] == "Q4_0 requantized"
        result = engine.generate([GenerationRequest("The capital of France is", None,
                                                    SamplingParams(max_new_tokens=4, ignore_eos=True))])[0]
        assert len(result.token_ids) == 4 and result.text
    finally:
        engine.close()


def test_a_file_already_of_the_type_is_served_as_it_is_and_not_called_requantized():
    made = requantize.requantized_gguf(embedded_gguf_path(), "Q4_0")
    engine = build_llamacpp_engine(BackboneOptions(path=str(made)),
                                   EngineConfig(max_batch_size=2, max_input_tokens=64, max_new_tokens=4, threads=1),
                                   LlamaCppOptions(row_cells=128, probe=False, requantize="Q4_0"))
    try:
        assert engine.backbone.path == made and engine.settings["weights"] == "Q4_0"
    finally:
        engine.close()
