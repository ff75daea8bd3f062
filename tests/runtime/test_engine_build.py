"""Choosing the engine: `--engine hf|vllm|llamacpp|auto` in `lamp serve` settings, what `auto`
picks for each backbone and host, and the engine factory's refusals.

Nothing here starts vLLM (tests/runtime/test_vllm_engine.py and tests/serving/test_vllm_serve.py do).
"""

from __future__ import annotations

import json
import logging
import sys

import pytest

from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.engines import ENGINE_KINDS, build_engine, choose_engine
from lamp_runtime.llamacpp.options import LlamaCppOptions
from lamp_runtime.vllm.engine import VllmOptions, _vllm_quantization
from serving.cli import build_parser
from serving.config import ServeSettings, load_settings
from serving.serve_command import settings_from_args


def test_serve_defaults_to_the_hf_engine_and_takes_vllm_settings_from_flags_and_yaml(tmp_path):
    for kind in ENGINE_KINDS:  # `lamp serve` offers exactly the engines the builder builds
        assert ServeSettings(engine=kind).engine == kind
        assert build_parser().parse_args(["serve", "--engine", kind]).engine == kind
    assert ServeSettings().engine == "hf" and ServeSettings().vllm_options() is None
    args = build_parser().parse_args(["serve", "--engine", "vllm", "--vllm-kv-cache-mb", "256",
                                      "--vllm-max-model-len", "2048"])
    settings = settings_from_args(args)
    assert settings.vllm_options() == VllmOptions(kv_cache_mb=256, max_model_len=2048)
    (tmp_path / "serve.yaml").write_text("engine: vllm\nvllm-kv-cache-mb: '512'\n")
    from_yaml = load_settings(tmp_path / "serve.yaml", {})
    assert from_yaml.vllm_options() == VllmOptions(kv_cache_mb=512)
    assert ServeSettings.from_mapping(from_yaml.to_args()) == from_yaml


def test_llamacpp_row_cells_reach_the_engine_options_from_flags_and_yaml(tmp_path):
    from lamp_runtime.llamacpp.options import LlamaCppOptions

    assert ServeSettings(engine="llamacpp").llamacpp_options() is None  # the engine's own defaults
    args = build_parser().parse_args(["serve", "--engine", "llamacpp", "--llamacpp-row-cells", "2048"])
    assert settings_from_args(args).llamacpp_options() == LlamaCppOptions(row_cells=2048)
    (tmp_path / "serve.yaml").write_text("engine: auto\nllamacpp-row-cells: 512\n")
    assert load_settings(tmp_path / "serve.yaml", {}).llamacpp_options() == LlamaCppOptions(row_cells=512)


def test_llamacpp_requantize_reaches_the_engine_options():
    from lamp_runtime.llamacpp.options import LlamaCppOptions

    args = build_parser().parse_args(["serve", "--engine", "llamacpp", "--llamacpp-requantize", "Q4_0"])
    settings = settings_from_args(args)
    assert settings.llamacpp_options() == LlamaCppOptions(requantize="Q4_0")
    assert ServeSettings.from_mapping(settings.to_args()) == settings


@pytest.mark.parametrize("text, message", [
    ("engine: tgi\n", "engine must be one of hf, vllm, llamacpp, auto; got 'tgi'"),
    ("vllm_kv_cache_mb: 0\n", "vllm_kv_cache_mb must be an integer >= 1"),
    ("vllm_max_model_len: 1\n", "vllm_max_model_len must be an integer >= 2"),
    ("engine: llamacpp\nllamacpp_row_cells: 8\n", "llamacpp_row_cells must be an integer >= 16"),
    ("engine: vllm\nllamacpp_row_cells: 1024\n", "llamacpp_row_cells is a setting of the llamacpp engine, not of 'vllm'"),
    ("engine: llamacpp\nllamacpp_requantize: Q3\n", "llamacpp_requantize must be one of Q4_0, Q4_1"),
    ("engine: auto\nllamacpp_requantize: Q4_0\n", "llamacpp_requantize is a setting of --engine llamacpp, not of 'auto'"),
])
def test_bad_engine_settings_name_the_key(tmp_path, text, message):
    (tmp_path / "serve.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_settings(tmp_path / "serve.yaml", {})


def hf_folder(path, model_type: str):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "is_encoder_decoder": model_type == "t5"}))
    return str(path)


Q4_1, Q8_0, Q4_K_M = 3, 7, 15  # llama.h's LLAMA_FTYPE_MOSTLY_*


def test_auto_reads_the_embedded_ggufs_file_type_and_keeps_it_on_the_int4_engine():
    assert choose_engine(BackboneOptions(device="cpu"), llama_cpp_error="") == "hf"  # SmolLM2's Q4_1


@pytest.mark.parametrize("case, options, cuda, file_type, expected", [
    ("embedded Q4_1 GGUF on cpu: the int4 engine serves its blocks as they are", BackboneOptions(), False, Q4_1, "hf"),
    ("a Q8_0 GGUF on cpu", BackboneOptions(), False, Q8_0, "llamacpp"),
    ("a Q8_0 GGUF, device cpu on a CUDA host", BackboneOptions(device="cpu"), True, Q8_0, "llamacpp"),
    ("a Q4_K_M .gguf path on cpu", BackboneOptions(path="/models/llama-2-7b.Q4_K_M.gguf"), False, Q4_K_M, "llamacpp"),
    ("a GGUF whose type cannot be read", BackboneOptions(path="/models/missing.gguf"), False, -1, "llamacpp"),
    ("HF folder", "llama", False, None, "hf"),
    ("T5 folder", "t5", False, None, "hf"),
    ("cuda device", BackboneOptions(device="cuda"), False, Q8_0, "hf"),
    ("device auto on a CUDA host", BackboneOptions(), True, Q8_0, "hf"),
    ("an explicit quantization", BackboneOptions(quantization="int4"), False, Q8_0, "hf"),
    ("an explicit dtype", BackboneOptions(dtype="bfloat16"), False, Q8_0, "hf"),
])
def test_auto_runs_a_gguf_on_the_cpu_on_llamacpp_and_keeps_hf_otherwise(tmp_path, case, options, cuda, file_type,
                                                                        expected, caplog):
    if isinstance(options, str):  # a folder of that model type
        options = BackboneOptions(path=hf_folder(tmp_path / options, options))
    with caplog.at_level(logging.INFO, logger="lamp_runtime.engines"):
        assert choose_engine(options, cuda_available=cuda, llama_cpp_error="", gguf_file_type=file_type) == expected, case
    assert f"--engine auto chose {expected}: " in caplog.text


def test_auto_keeps_hf_with_a_logged_reason_when_llama_cpp_does_not_import(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` raises ImportError for
    with caplog.at_level(logging.INFO, logger="lamp_runtime.engines"):
        assert choose_engine(BackboneOptions(device="cpu"), gguf_file_type=Q8_0) == "hf"
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "llama-cpp-python does not import (ModuleNotFoundError" in warning[0].getMessage()


def test_factory_refuses_unknown_engines_and_misplaced_options():
    with pytest.raises(ValueError, match="engine 'tgi' unknown; use one of hf, vllm"):
        build_engine("tgi", BackboneOptions())
    with pytest.raises(ValueError, match="vllm options were given for the hf engine"):
        build_engine("hf", BackboneOptions(), vllm_options=VllmOptions())
    for kind in ("hf", "vllm"):
        with pytest.raises(ValueError, match=f"llamacpp options were given for the {kind} engine"):
            build_engine(kind, BackboneOptions(), llamacpp_options=LlamaCppOptions())


def test_vllm_options_and_quantization_choices_are_checked():
    with pytest.raises(ValueError, match="kv_cache_mb must be an integer >= 1"):
        VllmOptions(kv_cache_mb=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        VllmOptions(gpu_memory_utilization=1.5)
    assert _vllm_quantization("none", "cpu") is None
    assert _vllm_quantization("nf4", "cuda") == "bitsandbytes"
    with pytest.raises(ValueError, match="nf4 with the vLLM engine needs a CUDA device"):
        _vllm_quantization("nf4", "cpu")
    with pytest.raises(ValueError, match="'int8' is not available with the vLLM engine"):
        _vllm_quantization("int8", "cuda")


def test_gguf_metadata_and_tensors_read_by_lengths_agree_with_the_gguf_reader():
    from lamp_runtime.backbone.checkpoint import embedded_gguf_path
    from lamp_runtime.backbone.gguf_file import gguf_reader, gguf_scalar, gguf_tensor_data

    path = embedded_gguf_path()
    reader = gguf_reader(path)
    for key in ("general.file_type", "llama.embedding_length", "llama.block_count", "llama.attention.head_count_kv"):
        assert gguf_scalar(path, key) == reader.fields[key].contents(), key
    assert gguf_scalar(path, "general.name") is None and gguf_scalar(path, "no.such.key") is None  # a string; absent
    ours = gguf_tensor_data(path, 3)  # Q4_1
    theirs = {t.name: t for t in reader.tensors if int(t.tensor_type) == 3}
    assert ours.keys() == theirs.keys() and len(ours) > 100
    for name in list(ours)[:5]:
        assert ours[name].shape == theirs[name].data.shape and (ours[name] == theirs[name].data).all(), name
