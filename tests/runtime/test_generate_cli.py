"""`lamp generate` builds its engine with `build_engine`, so it runs any backbone the server runs:
here a T5 folder (the encoder-decoder engine), with and without an adapter, printing exactly what
the in-process engine generates."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, LampAdapter, save_adapter
from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.hf.engine import engine_for
from lamp_runtime.hf.seq2seq import Seq2SeqEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..tiny_t5 import D_MODEL, build_tiny_t5

TEXT = "summarize: the cat sat on the mat"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def t5_folder(backbone, tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("generate-t5") / "tiny-t5", backbone.tokenizer)


def lamp_generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", "generate", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_lamp_generate_runs_a_t5_backbone(t5_folder, tmp_path, with_adapter):
    options = BackboneOptions(path=str(t5_folder), dtype="float32", quantization="none", device="cpu")
    engine = engine_for(load_backbone(options))
    assert isinstance(engine, Seq2SeqEngine)
    args = ["--backbone", str(t5_folder), "--dtype", "float32", "--quantization", "none", "--device", "cpu",
            "--input", TEXT, "--max-new-tokens", str(NEW_TOKENS)]
    task = None
    if with_adapter:
        g = torch.Generator().manual_seed(3)
        adapter = LampAdapter(AdapterMeta(pool=2), torch.randn(8, 4, generator=g), torch.rand(4, generator=g) + 0.5,
                              torch.randn(4, D_MODEL, generator=g))
        args += ["--adapter", str(save_adapter(adapter, tmp_path / "t5-lamp.safetensors"))]
        engine.registry.register("cli", adapter)
        task = "cli"
    expected = engine.generate([GenerationRequest(TEXT, task, SamplingParams(max_new_tokens=NEW_TOKENS))])[0]
    assert expected.completion_tokens > 0
    done = lamp_generate(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"


def test_lamp_generate_runs_a_t5_backbone_with_default_options(t5_folder):
    """`auto` quantization picks int4 on CPU only for backbones whose forward takes it: T5 gets float32."""
    options = BackboneOptions(path=str(t5_folder)).resolved()
    assert (options.quantization, options.dtype) == ("none", "float32") or options.device.startswith("cuda")
    expected = engine_for(load_backbone(BackboneOptions(path=str(t5_folder)))).generate(
        [GenerationRequest(TEXT, None, SamplingParams(max_new_tokens=NEW_TOKENS))])[0]
    assert expected.completion_tokens > 0
    done = lamp_generate("--backbone", str(t5_folder), "--input", TEXT, "--max-new-tokens", str(NEW_TOKENS))
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"


def test_int4_on_t5_is_refused_by_name(t5_folder):
    with pytest.raises(ValueError, match="quantization int4 is not supported for the T5"):
        BackboneOptions(path=str(t5_folder), quantization="int4", device="cpu").resolved()
    done = lamp_generate("--backbone", str(t5_folder), "--quantization", "int4", "--device", "cpu",
                         "--input", TEXT, "--max-new-tokens", str(NEW_TOKENS))
    assert done.returncode != 0
    assert "quantization int4 is not supported for the T5" in done.stderr
