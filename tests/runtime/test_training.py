"""The trainer on the real embedded backbone: tiny runs (l=4, a few steps) so the file stays fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, LampAdapter, SoftPromptAdapter, load_adapter, save_adapter
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams
from lamp_runtime.tasks.format import answer_matches, format_input, normalize_answer
from lamp_runtime.tasks.synthetic import TASKS, zero_shot_prompt
from lamp_runtime.training.data import collate, tokenize_rows
from lamp_runtime.training.evaluate import instructed_input
from lamp_runtime.training.methods import LampPrompt, SoftPromptTuning, build_method, text_init
from lamp_runtime.training.trainer import TrainConfig, evaluate_loss, initial_prompt, train

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
ROWS = [
    {"input": "The food was wonderful.", "target": "positive"},
    {"input": "The service was awful.", "target": "negative"},
    {"input": "Great acting, lovely ending.", "target": "positive"},
    {"input": "A bland and forgettable plot.", "target": "negative"},
]
TINY = TrainConfig(method="lamp", prompt_length=4, rank=2, pool=2, batch_size=4, max_steps=6, eval_every=3, seed=0)


def tiny_examples(backbone):
    return tokenize_rows(backbone.tokenizer, ROWS, max_input_tokens=64, max_target_tokens=8)


def tiny_meta():
    return AdapterMeta(task="tiny", base_model="test", description="four reviews")


@pytest.fixture(scope="module")
def tiny_run(backbone):
    """One tiny LAMP run, with the backbone's weights copied before it to prove they never change."""
    before = {name: t.detach().clone() for name, t in backbone.model.state_dict().items()}
    examples = tiny_examples(backbone)
    result = train(backbone, examples, examples, TINY, tiny_meta(), progress=False)
    return before, result


def test_tiny_training_lowers_loss(backbone, tiny_run):
    _, result = tiny_run
    examples = tiny_examples(backbone)
    start = build_method("lamp", initial_prompt(backbone, TINY), TINY.rank, TINY.pool)
    loss_before = evaluate_loss(backbone, start, examples, 4, backbone.tokenizer.eos_token_id, 0).loss
    assert result.best.loss < 0.8 * loss_before, (loss_before, [p.loss for p in result.history])


def test_training_changes_only_the_prompt_factors(backbone, tiny_run):
    before, result = tiny_run
    after = backbone.model.state_dict()
    assert before.keys() == after.keys()
    changed = [name for name, t in before.items() if not torch.equal(t, after[name])]
    assert changed == []
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    start = initial_prompt(backbone, TINY)
    u, s, vh = torch.linalg.svd(start, full_matrices=False)
    assert not torch.equal(result.adapter.q, s[: TINY.rank]), "the factors did not train"
    assert result.trainable_parameters == 4 * 2 + 2 + 2 * backbone.hidden_size


def test_saved_adapter_round_trips_and_generates(backbone, tiny_run, tmp_path):
    _, result = tiny_run
    path = save_adapter(result.adapter, tmp_path / "tiny.safetensors")
    loaded = load_adapter(path, backbone.hidden_size)
    assert isinstance(loaded, LampAdapter)
    for name, tensor in result.adapter.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name
    meta = loaded.meta
    assert (meta.pool, meta.task, meta.base_model) == (2, "tiny", "test")
    assert meta.extra["l"] == "4" and meta.extra["r"] == "2" and meta.extra["p"] == "2"
    assert meta.extra["method"] == "lamp" and float(meta.extra["eval_loss"]) == pytest.approx(result.best.loss, abs=1e-4)
    assert meta.extra["input_template"] == "Input: {input}\nAnswer:"
    engine = DecoderEngine(backbone)
    engine.registry.register("tiny", loaded)
    out = engine.generate([GenerationRequest(format_input("Lovely food."), "tiny", SamplingParams(max_new_tokens=3))])[0]
    assert out.soft_prompt_tokens == 2 and out.completion_tokens >= 1


def test_same_seed_gives_identical_factors(backbone, tiny_run):
    _, first = tiny_run
    examples = tiny_examples(backbone)
    again = train(backbone, examples, examples, TINY, tiny_meta(), progress=False)
    for name, tensor in first.adapter.tensors().items():
        assert torch.equal(again.adapter.tensors()[name], tensor), name
    other = initial_prompt(backbone, TrainConfig(prompt_length=4, seed=1))
    assert not torch.equal(other, initial_prompt(backbone, TINY))


def test_plain_prompt_tuning_saves_a_soft_prompt(backbone, tmp_path):
    examples = tiny_examples(backbone)
    config = TrainConfig(method="pt", prompt_length=3, batch_size=4, max_steps=1, seed=0)
    result = train(backbone, examples, None, config, tiny_meta(), progress=False)
    assert result.trainable_parameters == 3 * backbone.hidden_size
    loaded = load_adapter(save_adapter(result.adapter, tmp_path / "pt.safetensors"), backbone.hidden_size)
    assert isinstance(loaded, SoftPromptAdapter) and loaded.prompt.shape == (3, backbone.hidden_size)
    assert loaded.meta.extra["eval_on"] == "train" and "r" not in loaded.meta.extra


def test_loss_is_only_on_target_tokens(backbone):
    example = tiny_examples(backbone)[0]
    batch = collate([example], pad_id=0)
    targets = batch.token_ids[batch.target_mask].tolist()
    assert targets == list(example.target_ids)
    assert targets[-1] == backbone.tokenizer.eos_token_id
    assert backbone.tokenizer.decode(targets[:-1]) == " positive"


def test_cli_train_then_eval(tmp_path, capsys):
    from serving.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    out = tmp_path / "cli.safetensors"
    assert main(["train", "--data", str(data), "--out", str(out), "--task", "sentiment", "-l", "4", "-r", "2",
                 "-p", "2", "--max-steps", "2", "--batch-size", "4", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pooled_tokens"] == 2 and summary["steps"] == 2
    results = tmp_path / "results.json"
    assert main(["eval", "--adapter", str(out), "--data", str(data), "--limit", "3", "--out", str(results),
                 "--zero-shot-chat", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "zero-shot" in table and "cli" in table
    rows = json.loads(results.read_text())
    assert [r["name"] for r in rows] == ["zero-shot", "zero-shot (chat)", "cli"]
    assert all(r["total"] == 3 and 0 <= r["correct"] <= 3 for r in rows)
    assert [r["soft_prompt_tokens"] for r in rows] == [0, 0, 2]
    # the chat row wraps the same instruction in the template, so it is longer than the plain one
    assert rows[1]["mean_input_tokens"] > rows[0]["mean_input_tokens"] > rows[2]["mean_input_tokens"]


def test_cli_eval_warns_when_an_adapter_was_trained_on_other_numerics(backbone, tmp_path, capsys):
    from serving.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]), encoding="utf-8")
    prompt = backbone.model.get_input_embeddings().weight[:3].detach().clone()
    for name, trained_on in (("other", "bfloat16/nf4"), ("same", "float32/none")):
        meta = AdapterMeta(task="tiny", extra={"trained_on": trained_on})
        save_adapter(SoftPromptAdapter(meta, prompt), tmp_path / f"{name}.safetensors")
    assert main(["eval", "--adapter", str(tmp_path / "other.safetensors"),
                 "--adapter", str(tmp_path / "same.safetensors"), "--data", str(data), "--dtype", "float32", "--quantization", "none", "--device", "cpu",
                 "--no-progress"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: other: trained on a bfloat16/nf4 backbone but served on float32/none; soft "
                        "prompts are tuned to the backbone's exact numerics and can lose accuracy (retrain with "
                        "lamp train --dtype float32 --quantization none)"]


def test_cli_reports_bad_data_by_line(tmp_path, capsys):
    from serving.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ROWS[0]) + '\n{"input": "x"}\n', encoding="utf-8")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_invalid_settings_name_the_value(backbone):
    with pytest.raises(ValueError, match="rank must be >= 1"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="rank r=9"):
        LampPrompt(torch.randn(4, 8), rank=9, pool=1)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("lora", torch.randn(4, 8), 2, 1)


def test_text_init_truncates_or_repeats(backbone):
    weight = backbone.model.get_input_embeddings().weight
    ids = backbone.tokenizer("Route the message to one label.", add_special_tokens=False)["input_ids"]
    short = text_init(weight, ids, 3)
    assert torch.equal(short, weight[ids[:3]])
    long = text_init(weight, ids, len(ids) + 2)
    assert torch.equal(long[len(ids):], weight[ids[:2]])
    prompt = SoftPromptTuning(long)
    assert prompt.prompt().shape == (len(ids) + 2, backbone.hidden_size)


def test_zero_shot_row_uses_the_same_input_shape_as_adapters():
    for name in TASKS:
        assert instructed_input(TASKS[name].instruction, "some text") == zero_shot_prompt(name, "some text")


def test_answer_matching():
    labels = ("business", "politics", "science", "sports")
    assert normalize_answer("\n positive\nInput: more") == "positive"
    assert answer_matches(" Sports.", "sports", labels)
    assert answer_matches("\nThe answer is: science", "science", labels)
    assert not answer_matches(" Sports, Business, Science, Politics", "sports", labels)
    assert not answer_matches(" sportsmanship", "sports", labels)
    assert not answer_matches("", "sports", labels)
    target = "name=Ana Silva; age=30; city=Lima"
    assert answer_matches(f" {target}\nmore", target, None)
    assert not answer_matches(target.lower(), target, None)


def test_every_bundled_prompt_loads(backbone):
    bundled = sorted(PROMPTS.glob("*.safetensors"))
    assert {p.stem for p in bundled} >= set(TASKS), "make prompts writes one adapter per bundled task"
    for path in bundled:
        adapter = load_adapter(path, backbone.hidden_size)
        assert adapter.meta.task == path.stem
        assert adapter.pooled_tokens < adapter.prompt_tokens or adapter.meta.pool == 1
        assert float(adapter.meta.extra["heldout_accuracy"]) > float(adapter.meta.extra["zero_shot_accuracy"])
        assert adapter.meta.extra["trained_on"] == "float32/none"  # what make prompts trains on


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_training_through_a_quantized_backbone(quantization):
    """Gradients reach the prompt through bitsandbytes layers at every step, including after the
    held-out evals (nf4 on CPU used to repack its weights for a kernel without backward there)."""
    from lamp_runtime.backbone.hf import load_backbone
    from lamp_runtime.backbone.options import BackboneOptions

    quantized = load_backbone(BackboneOptions(dtype="float32", quantization=quantization, device="cpu"))
    examples = tiny_examples(quantized)
    config = TrainConfig(prompt_length=4, rank=2, batch_size=4, max_steps=4, eval_every=1, seed=0)
    result = train(quantized, examples, examples, config, tiny_meta(), progress=False)
    assert min(p.loss for p in result.history[1:]) < result.history[0].loss
    assert len({round(p.loss, 6) for p in result.history}) == len(result.history)  # it moved every step
    assert result.adapter.meta.extra["trained_on"] == f"float32/{quantization}"
    assert all(p.grad is None for p in quantized.model.parameters())
    assert not any(m.training for m in quantized.model.modules())  # back to inference mode


def test_a_zero_gradient_stops_training_with_the_reason(backbone):
    from lamp_runtime.training.trainer import TrainingError, _check_gradient

    with pytest.raises(TrainingError, match=r"step 3: the gradient reaching the soft prompt is 0.0.*quantization="):
        _check_gradient(backbone, torch.tensor(0.0), 2.5, 3)
    _check_gradient(backbone, torch.tensor(0.0), 1e-6, 3)  # saturated loss: a zero gradient is genuine


def test_reproduce_bundles_the_best_pooled_variant_and_keeps_readme_text(tmp_path):
    from lamp_runtime.training.reproduce import TABLE_BEGIN, TABLE_END, choose_bundled, update_readme

    variants = [{"name": n, "method": m, "pool": p, "accuracy": a}
                for n, m, p, a in (("PT", "pt", 1, 1.0), ("LAMP p=1", "lamp", 1, 0.99), ("LAMP p=2", "lamp", 2, 0.9),
                                   ("LAMP p=4", "lamp", 4, 0.9), ("LAMP p=5", "lamp", 5, 0.8))]
    assert choose_bundled(variants)["name"] == "LAMP p=4"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{TABLE_BEGIN}\nold table\n{TABLE_END}\noutro\n", encoding="utf-8")
    update_readme(readme, "new table")
    assert readme.read_text(encoding="utf-8") == f"intro\n{TABLE_BEGIN}\nnew table\n{TABLE_END}\noutro\n"


def test_save_checked_never_leaves_an_invalid_file(backbone, tmp_path):
    from lamp_runtime.training.trainer import save_checked

    good = SoftPromptAdapter(AdapterMeta(task="ok"), torch.zeros(2, backbone.hidden_size))
    assert load_adapter(save_checked(good, tmp_path / "ok.safetensors", backbone.hidden_size),
                        backbone.hidden_size).meta.task == "ok"
    bad = SoftPromptAdapter(AdapterMeta(task="bad"), torch.full((2, backbone.hidden_size), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        save_checked(bad, tmp_path / "bad.safetensors", backbone.hidden_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors"]
