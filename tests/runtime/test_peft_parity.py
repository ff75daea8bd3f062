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


def test_peft_rows_in_one_batch_with_every_other_kind(backbone, peft_checkpoint, task_adapters):
    """The PEFT checkpoint's requests share one batch (one `generate` call, max_batch_size 8) with
    soft-prompt, LAMP, EPT and no-adapter rows: the PEFT rows still answer what PeftModel.generate
    answers, and every other row what it answers alone."""
    from lamp_runtime.adapters import AdapterMeta, EptAdapter
    from lamp_runtime.engine.base import EngineConfig

    folder, expected = peft_checkpoint
    g = torch.Generator().manual_seed(11)
    ept = EptAdapter(AdapterMeta(), vocab_prompt(backbone, 5, seed=12), torch.randn(4, 2, generator=g) * 0.05,
                     torch.randn(2, backbone.hidden_size, generator=g) * 0.05)
    engine = DecoderEngine(backbone, config=EngineConfig(max_batch_size=8))
    for task_id, adapter in {**task_adapters, "ept": ept, "peft": load_adapter(folder, backbone.hidden_size)}.items():
        engine.registry.register(task_id, adapter)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    others = [("plain", "Water boils at"), ("lamp2", INPUTS[0]), ("ept", "List three colours:"), (None, INPUTS[1]),
              ("lamp3", "1, 2, 3,")]
    requests = [GenerationRequest(t, "peft", params) for t in INPUTS] + [GenerationRequest(t, task, params)
                                                                          for task, t in others]
    assert len(requests) <= 8
    ids = [engine.submit(r) for r in requests]
    results, first = {}, True
    while len(results) < len(ids):
        for out in engine.step():
            if out.result is not None:
                results[out.request_id] = out.result
        if first:  # every request was prefilled in the first step, all six kinds in one forward
            assert (engine.last_step.prefilled, engine.last_step.distinct_tasks) == (len(requests), 6)
            first = False
    mixed = [results[i] for i in ids]
    assert [r.text for r in mixed[:len(INPUTS)]] == expected
    alone = [engine.generate([GenerationRequest(t, task, params)])[0].token_ids for task, t in others]
    assert [r.token_ids for r in mixed[len(INPUTS):]] == alone
