"""A PEFT prompt-tuning checkpoint gives the same greedy completion through PeftModel.generate,
our engine, and `lamp generate`; so does a LAMP file (p = 1) whose U·diag(Q)·V is that prompt."""

import subprocess
import sys

import pytest
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model

from lamp_runtime.adapters import load_adapter, save_adapter
from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams

from ..conftest import lamp_from_prompt, vocab_prompt

INPUTS = ["The capital of France is", "My favourite food is", "Q: What is 2 + 2?\nA:"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def peft_checkpoint(backbone, tmp_path_factory):
    """Made with `peft` on its own copy of the backbone, so PEFT's wrapping cannot touch ours."""
    folder = tmp_path_factory.mktemp("peft") / "prompt_tuning"
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=10, token_dim=backbone.hidden_size)
    peft_model = get_peft_model(load_backbone(backbone.options).model, config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(vocab_prompt(backbone, 10, seed=7))
    peft_model.save_pretrained(folder, safe_serialization=True)
    expected = []
    for text in INPUTS:
        ids = backbone.tokenizer(text, return_tensors="pt")
        out = peft_model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append(backbone.tokenizer.decode(out[0][-NEW_TOKENS:], skip_special_tokens=True))
    return folder, expected


def engine_texts(backbone, adapter):
    engine = DecoderEngine(backbone)
    engine.registry.register("t", adapter)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    return [r.text for r in engine.generate([GenerationRequest(t, "t", params) for t in INPUTS])]


def test_peft_checkpoint_through_engine_matches_peft_generate(backbone, peft_checkpoint):
    folder, expected = peft_checkpoint
    assert (folder / "adapter_model.safetensors").is_file()
    adapter = load_adapter(folder, backbone.hidden_size)
    assert engine_texts(backbone, adapter) == expected
    assert all(expected)


def test_lamp_with_p1_reconstructing_the_prompt_matches(backbone, peft_checkpoint, tmp_path):
    folder, expected = peft_checkpoint
    prompt = load_adapter(folder, backbone.hidden_size).prompt
    lamp = lamp_from_prompt(prompt, rank=10, pool=1)  # full rank: U·diag(Q)·V == prompt
    torch.testing.assert_close(lamp.build_prompt(), prompt, atol=1e-5, rtol=1e-5)
    reloaded = load_adapter(save_adapter(lamp, tmp_path / "lamp.safetensors"), backbone.hidden_size)
    assert engine_texts(backbone, reloaded) == expected


@pytest.mark.slow
def test_lamp_generate_cli_matches(peft_checkpoint):
    folder, expected = peft_checkpoint
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "generate", "--adapter", str(folder), "--input", INPUTS[0],
         "--max-new-tokens", str(NEW_TOKENS), "--dtype", "float32", "--quantization", "none"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected[0] + "\n"


def test_cli_reports_a_bad_adapter_clearly(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "generate", "--adapter", str(bad), "--input", "x",
         "--dtype", "float32"], capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert "lamp generate: error:" in out.stderr and "not a safetensors file" in out.stderr
    assert out.stdout == ""
