"""`lamp train --method ept`, and training on an encoder-decoder (T5) backbone.

Each training forward is checked against a direct transformers computation of the same loss, and
the saved adapter against what the serving engine generates, so "what is trained is what is
served" holds for the EPT offset and for the encoder-side prompt.
"""

from __future__ import annotations

import json

import pytest
import torch

from lamp_runtime.adapters import EptAdapter, LampAdapter, load_adapter, save_adapter
from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.hf.engine import engine_for
from lamp_runtime.prompts.prepared import prepare
from lamp_runtime.requests import GenerationRequest, SamplingParams
from lamp_runtime.training.forward import prompt_forward
from lamp_runtime.training.methods import EptPrompt, EptShape, build_method
from lamp_runtime.training.trainer import TrainConfig, train

from ..tiny_t5 import build_tiny_t5
from .test_training import ROWS, tiny_examples, tiny_meta

EPT = TrainConfig(method="ept", prompt_length=3, rank=2, batch_size=4, max_steps=6, eval_every=1, seed=0,
                  learning_rate=0.1,
                  ept=EptShape(offset_tokens=6, spaces=2, projection_rank=1))


def reference_loss(backbone, prompt, offset, example) -> tuple[float, torch.Tensor]:
    """Summed target loss of one example, computed directly with transformers, and the logits
    at the position that predicts the first target token (what greedy serving picks from)."""
    model = backbone.model
    prompt_ids, target_ids = torch.tensor(example.prompt_ids), torch.tensor(example.target_ids)
    with torch.no_grad():
        inputs = model.get_input_embeddings()(prompt_ids)
        if offset is not None:
            n = min(len(prompt_ids), offset.shape[0])
            inputs = torch.cat([inputs[:n] + offset[:n], inputs[n:]])
        encoder_side = torch.cat([prompt, inputs])[None]
        if backbone.is_encoder_decoder:
            out = model(inputs_embeds=encoder_side, labels=target_ids[None])
            logits = out.logits[0]
        else:
            targets = model.get_input_embeddings()(target_ids)
            full = torch.cat([encoder_side[0], targets])[None]
            start = prompt.shape[0] + len(prompt_ids) - 1
            logits = model(inputs_embeds=full).logits[0, start : start + len(target_ids)]
        loss = torch.nn.functional.cross_entropy(logits.float(), target_ids, reduction="sum")
    return float(loss), logits[0]


def served_first_token(backbone, adapter, text) -> int:
    engine = engine_for(backbone)
    engine.registry.register("t", adapter)
    return engine.generate([GenerationRequest(text, "t", SamplingParams(max_new_tokens=1))])[0].token_ids[0]


def check_trained_equals_served(backbone, result, examples, tmp_path):
    """The saved adapter's tensors give the same loss as a direct computation, and the engine
    serving it picks the token those logits rank first."""
    loaded = load_adapter(save_adapter(result.adapter, tmp_path / "a.safetensors"), backbone.hidden_size)
    prepared = prepare(loaded)
    pad = backbone.tokenizer.pad_token_id or 0
    batched, _ = prompt_forward(backbone, prepared.prompt, prepared.offset, examples, pad)
    direct = [reference_loss(backbone, prepared.prompt, prepared.offset, e) for e in examples]
    assert float(batched) == pytest.approx(sum(loss for loss, _ in direct), rel=1e-4)
    text = backbone.tokenizer.decode(examples[0].prompt_ids)
    assert served_first_token(backbone, loaded, text) == int(direct[0][1].argmax())
    return loaded


def test_ept_training_learns_and_serves_its_folded_prompt(backbone, tmp_path):
    examples = tiny_examples(backbone)
    before = {name: t.detach().clone() for name, t in backbone.model.state_dict().items()}
    result = train(backbone, examples, examples, EPT, tiny_meta(), progress=False)
    assert min(p.loss for p in result.history[1:]) < result.history[0].loss
    assert all(torch.equal(before[k], t) for k, t in backbone.model.state_dict().items())
    d = backbone.hidden_size
    # short prompt + A + B + K residual maps (d->1->d) + gate (K x d, K)
    assert result.trainable_parameters == 3 * d + 6 * 2 + 2 * d + 2 * (d + d) + 2 * d + 2
    loaded = check_trained_equals_served(backbone, result, examples, tmp_path)
    assert isinstance(loaded, EptAdapter)
    assert (loaded.prompt.shape, loaded.a.shape, loaded.b.shape) == ((3, d), (6, 2), (2, d))
    assert loaded.meta.extra["method"] == "ept" and loaded.meta.extra["offset_tokens"] == "6"


def test_ept_offset_never_reaches_target_tokens(backbone):
    """An offset longer than the input must stop at the input: at serve time it never meets the answer."""
    examples = tiny_examples(backbone)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randn(2, backbone.hidden_size, generator=generator) * 0.1
    offset = torch.randn(64, backbone.hidden_size, generator=generator) * 0.1
    batched, _ = prompt_forward(backbone, prompt, offset, examples, 0)
    direct = sum(reference_loss(backbone, prompt, offset, e)[0] for e in examples)
    assert float(batched) == pytest.approx(direct, rel=1e-4)


def test_ept_joint_prompt_is_a_pure_function_of_its_parameters():
    """The fused, gated prompt does not depend on the input, which is what lets it be stored."""
    method = build_method("ept", torch.randn(3, 16), 2, 1, EptShape(offset_tokens=5, spaces=3), seed=4)
    assert isinstance(method, EptPrompt)
    assert torch.equal(method.prompt(), method.prompt())
    assert method.prompt().shape == (3, 16) and method.offset().shape == (5, 16)
    with pytest.raises(ValueError, match="EPT prompts are not pooled; got pool p=2"):
        build_method("ept", torch.randn(3, 16), 2, 2)
    with pytest.raises(ValueError, match="ept spaces must be >= 1, got 0"):
        TrainConfig(method="ept", ept=EptShape(spaces=0))


@pytest.fixture(scope="module")
def t5(backbone, tmp_path_factory):
    folder = build_tiny_t5(tmp_path_factory.mktemp("t5-train") / "tiny-t5", backbone.tokenizer)
    return load_backbone(BackboneOptions(path=str(folder), dtype="float32", quantization="none", device="cpu"))


@pytest.mark.parametrize("config", [
    TrainConfig(method="lamp", prompt_length=4, rank=2, pool=2, batch_size=4, max_steps=6, eval_every=1, seed=0),
    EPT,
], ids=["lamp", "ept"])
def test_training_on_t5_puts_the_prompt_on_the_encoder(t5, config, tmp_path):
    examples = tiny_examples(t5)
    before = {name: t.detach().clone() for name, t in t5.model.state_dict().items()}
    result = train(t5, examples, examples, config, tiny_meta(), progress=False)
    assert min(p.loss for p in result.history[1:]) < result.history[0].loss
    assert all(torch.equal(before[k], t) for k, t in t5.model.state_dict().items())
    loaded = check_trained_equals_served(t5, result, examples, tmp_path)
    assert isinstance(loaded, LampAdapter if config.method == "lamp" else EptAdapter)


def test_cli_trains_and_evaluates_on_a_t5_folder(t5, tmp_path, capsys):
    from serving.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    out = tmp_path / "t5-ept.safetensors"
    backbone_args = ["--backbone", t5.options.path, "--dtype", "float32", "--quantization", "none"]
    assert main(["train", "--data", str(data), "--out", str(out), "--method", "ept", "-l", "3", "-r", "2",
                 "--offset-tokens", "4", "--max-steps", "2", "--batch-size", "4", "--no-progress",
                 *backbone_args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "ept" and summary["pooled_tokens"] == 3
    assert main(["eval", "--adapter", str(out), "--data", str(data), "--no-zero-shot", "--no-progress",
                 *backbone_args]) == 0
    assert "t5-ept" in capsys.readouterr().out
