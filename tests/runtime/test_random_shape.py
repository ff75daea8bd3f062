"""A model's shape without its weights (backbone/random_shape.py), loaded tensor by tensor into
int4 (backbone/gguf_int4.py), labelled random everywhere, and the memory check before any load
(backbone/memory.py). The 7B shape itself is the bench's (lamp_runtime/bench/shape7b.py); here the
`tiny` shape runs every code path in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lamp_runtime.backbone.hf import check_backbone_memory, load_backbone
from lamp_runtime.backbone.memory import INT4_BYTES_PER_WEIGHT, estimate_load_bytes, gguf_direct_int4_bytes
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.backbone.random_shape import (RANDOM_WEIGHTS_KEY, SHAPES, TOKENIZER_VOCAB, backbone_is_random,
                                                write_random_gguf)
from lamp_runtime.hf.engine import engine_for
from lamp_runtime.requests import GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_random_gguf(tmp_path_factory.mktemp("random") / "tiny.gguf", "tiny", seed=3, progress=False)


@pytest.fixture(scope="module")
def gguf_parses():
    """Who built a GGUFReader during `tiny_int4`'s load: the calling modules, in order."""
    return []


@pytest.fixture(scope="module")
def tiny_int4(tiny_gguf, gguf_parses):
    import sys

    import gguf

    real = gguf.GGUFReader

    def counted(*args, **kwargs):
        gguf_parses.append(sys._getframe(1).f_globals["__name__"])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", counted)
        return load_backbone(BackboneOptions(path=str(tiny_gguf), quantization="int4", device="cpu"))


def test_a_direct_int4_load_parses_the_header_once_and_keeps_no_reader(tiny_int4, gguf_parses):
    """The architecture check, the memory estimate, the load and the random-weights mark share one
    reader (transformers' config and tokenizer reads are its own), dropped when the load ends."""
    from lamp_runtime.backbone import gguf_file

    assert [m for m in gguf_parses if m.startswith("lamp_runtime")] == ["lamp_runtime.backbone.gguf_file"]
    assert gguf_file.kept_readers() == 0


def test_the_gguf_has_the_shape_and_says_it_is_random(tiny_gguf):
    from gguf import GGMLQuantizationType, GGUFReader

    spec = SHAPES["tiny"]
    reader = GGUFReader(str(tiny_gguf))
    assert reader.fields[RANDOM_WEIGHTS_KEY].contents() is True
    assert reader.fields["general.name"].contents() == "random-tiny-shape"
    assert reader.fields["llama.block_count"].contents() == spec.layers
    assert reader.fields["llama.attention.head_count_kv"].contents() == spec.kv_heads
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * spec.layers
    q = tensors["blk.1.attn_k.weight"]
    assert q.tensor_type == GGMLQuantizationType.Q4_1
    assert list(q.shape) == [spec.hidden, spec.kv_heads * spec.head_dim]  # GGUF order: [in, out]
    assert tensors["blk.0.ffn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert np.all(tensors["blk.0.ffn_norm.weight"].data == 1)
    # Zero-mean weights with std 1/sqrt(fan-in): activations stay in range through the layers.
    from gguf.quants import dequantize

    weight = dequantize(tensors["blk.0.ffn_down.weight"].data, GGMLQuantizationType.Q4_1)
    assert weight.shape == (spec.hidden, spec.intermediate)
    assert abs(weight.mean()) < 0.1 / spec.intermediate**0.5
    assert weight.std() == pytest.approx(1 / spec.intermediate**0.5, rel=0.1)


def test_the_same_seed_writes_the_same_file_and_another_seed_does_not(tiny_gguf, tmp_path):
    same = write_random_gguf(tmp_path / "same.gguf", "tiny", seed=3, progress=False)
    other = write_random_gguf(tmp_path / "other.gguf", "tiny", seed=4, progress=False)
    assert same.read_bytes() == tiny_gguf.read_bytes()
    assert other.read_bytes() != tiny_gguf.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_transformers_reads_the_gguf_config_and_tokenizer(tiny_gguf):
    from transformers import AutoConfig, AutoTokenizer

    spec = SHAPES["tiny"]
    config = AutoConfig.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (spec.hidden, spec.layers, spec.heads, spec.kv_heads,
                                                             spec.intermediate, TOKENIZER_VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert len(tokenizer) == TOKENIZER_VOCAB
    text = "Classify the sentiment: a wonderful film."
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < TOKENIZER_VOCAB and tokenizer.decode(ids) == text


def test_the_tensor_by_tensor_int4_load_equals_the_dequantized_products(tiny_gguf, tiny_int4):
    """Every projection's product equals x @ W.T with W as transformers dequantizes the same GGUF
    (rope row order undone), and the whole model's logits match the float32 model's."""
    from transformers import AutoModelForCausalLM

    from lamp_runtime.backbone.int4 import Int4Linear

    reference = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name,
                                                     dtype=torch.float32)
    served = dict(tiny_int4.model.named_modules())
    checked = 0
    for name, module in reference.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        layer = served[name]
        assert type(layer) is Int4Linear, name  # the Q4_1 head too: exact, no int8 requantization
        x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(checked)).to(torch.bfloat16)
        expected = x.float() @ module.weight.T
        error = (layer(x).float() - expected).abs().max() / expected.abs().max()
        assert error < 2e-2, f"{name}: relative error {error:.2e}"
        checked += 1
    assert checked == 7 * SHAPES["tiny"].layers + 1
    ids = torch.tensor([tiny_int4.tokenizer("The quick brown fox jumps")["input_ids"]])
    with torch.no_grad():
        logits, expected = tiny_int4.model(ids).logits, reference(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


def test_the_random_backbone_is_labelled_and_the_engine_serves_it(tiny_int4, tiny_gguf):
    assert tiny_int4.random_weights and tiny_int4.name.startswith("random-")
    assert backbone_is_random(tiny_gguf) and not backbone_is_random(None)
    engine = engine_for(tiny_int4)
    [result] = engine.generate([GenerationRequest("Hello there", None, SamplingParams(max_new_tokens=4,
                                                                                       ignore_eos=True))])
    assert len(result.token_ids) == 4


def test_the_embedded_backbone_is_not_random():
    from lamp_runtime.backbone.checkpoint import embedded_gguf_path

    assert not backbone_is_random(embedded_gguf_path())


def test_lamp_serve_refuses_a_random_backbone_unless_allowed(tiny_gguf):
    from serving.cli import build_parser
    from serving.config import ServeSettings
    from serving.serve_command import settings_from_args

    with pytest.raises(ValueError, match="random weights.*--allow-random-weights"):
        settings_from_args(build_parser().parse_args(["serve", "--backbone", str(tiny_gguf)]))
    with pytest.raises(ValueError, match="--allow-random-weights"):
        ServeSettings.from_mapping({"backbone": str(tiny_gguf)})  # a YAML file or Serve's args
    allowed = settings_from_args(build_parser().parse_args(["serve", "--backbone", str(tiny_gguf),
                                                             "--allow-random-weights"]))
    assert allowed.allow_random_weights
    assert ServeSettings.from_mapping(allowed.to_args()) == allowed  # what each replica rebuilds
    assert ServeSettings.from_mapping({"backbone": str(tiny_gguf), "allow-random-weights": "true"}).backbone
    with pytest.raises(ValueError, match="allow_random_weights must be true or false"):
        ServeSettings.from_mapping({"allow_random_weights": "sometimes"})


def test_a_backbone_that_cannot_fit_is_refused_before_loading(tiny_gguf):
    direct = BackboneOptions(path=str(tiny_gguf), quantization="int4", device="cpu").resolved()
    check_backbone_memory(direct, direct_int4=True, available=64 * 1024**3)
    with pytest.raises(ValueError, match=r"needs ~[\d.]+ GiB, 0\.1 GiB of memory is available"):
        check_backbone_memory(direct, direct_int4=True, available=100 * 1024**2)
    # The float32 conversion of the same file needs more, and the refusal names the way out.
    converted = BackboneOptions(path=str(tiny_gguf), dtype="float32", quantization="none", device="cpu").resolved()
    direct_bytes, _ = estimate_load_bytes(direct, direct_int4=True)
    converted_bytes, _ = estimate_load_bytes(converted, direct_int4=False)
    assert converted_bytes > direct_bytes > gguf_direct_int4_bytes(tiny_gguf)
    between = (direct_bytes + converted_bytes) // 2
    check_backbone_memory(direct, direct_int4=True, available=between)
    with pytest.raises(ValueError, match="float32 HF folder.*GiB of memory is available.*try --quantization int4"):
        check_backbone_memory(converted, direct_int4=False, available=between)


def test_the_estimates_at_the_7b_shape():
    """What the check compares at the mission's size, from the shape alone (no file written):
    the int4 load fits a 24 GB machine, the float32 conversion (~54 GB) does not."""
    spec = SHAPES["llama-2-7b"]
    matrices = spec.parameters() - spec.vocab * spec.hidden - (2 * spec.layers + 1) * spec.hidden
    int4 = matrices * INT4_BYTES_PER_WEIGHT + (spec.vocab * spec.hidden + (2 * spec.layers + 1) * spec.hidden) * 4
    assert 4.0e9 < int4 < 5.5e9
    assert spec.parameters() * 8 > 50e9


def test_the_shape_bench_runs_on_the_tiny_shape_and_records_random_weights(tiny_gguf, tmp_path):
    """`lamp_runtime.bench.shape7b` end to end on the tiny shape: exact counts only, no timing."""
    import json

    from lamp_runtime.bench.shape7b import main

    out = tmp_path / "shape.json"
    main(["--shape", "tiny", "--gguf", str(tiny_gguf), "--new-tokens", "1", "--repeats", "1", "--t5-repeats", "1",
          "--threads", "1",
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["random_weights"] is True and report["backbone"]["random_weights"] is True
    assert "--shape tiny" in report["command"] and report["context"]["cpu"]
    spec = SHAPES["tiny"]
    fp16 = 2 * spec.layers * spec.kv_heads * spec.head_dim * 2
    assert report["kv_bytes_per_position"] == {"fp16_computed": fp16, "engine": 2 * fp16}  # float32 on the CPU
    for row in report["prompt_kv_per_task"]:
        assert row["engine_bytes_reported"] == row["engine_bytes_computed"] == row["prompt_tokens"] * 2 * fp16
    assert [row["prompt_tokens"] for row in report["prompt_kv_per_task"]] == [100, 25, 10]
    for row in report["prefill_cold_vs_warm"]:
        assert row["warm_prompt_kv_hits"] == 1
        assert row["cold_positions"] - row["warm_positions"] == row["soft_prompt_tokens"]
    assert [row["batch"] for row in report["decode"]] == [1, 8]
    assert report["t5_base_encoder"]["soft_prompt_tokens"] == {"unpooled": 100, "pooled_p10": 10}


def test_the_shape_bench_measures_the_llamacpp_engine_on_the_same_gguf(tiny_gguf, tmp_path):
    """`--engines llamacpp`: the same measurements on llama.cpp's step core (f16 KV), exact counts only."""
    import json

    pytest.importorskip("llama_cpp")
    from lamp_runtime.bench.shape7b import main

    out = tmp_path / "shape-llamacpp.json"
    main(["--shape", "tiny", "--gguf", str(tiny_gguf), "--engines", "llamacpp", "--t5", "off", "--new-tokens", "1",
          "--repeats", "1", "--threads", "1", "--llamacpp-row-cells", "256", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["random_weights"] is True and report["engines"] == ["llamacpp"] and report["t5_base_encoder"] is None
    assert "backbone" not in report and report["context"]["cpu"]  # the HF engine did not run
    spec = SHAPES["tiny"]
    fp16 = 2 * spec.layers * spec.kv_heads * spec.head_dim * 2
    llamacpp = report["llamacpp"]
    assert llamacpp["row_cells"] == 256
    assert llamacpp["kv_bytes_per_position"] == {"fp16_computed": fp16, "engine": fp16}  # llama.cpp's f16 cache
    assert [row["prompt_tokens"] for row in llamacpp["prompt_kv_per_task"]] == [100, 25, 10]
    for row in llamacpp["prompt_kv_per_task"]:
        assert row["engine_bytes_computed"] == row["prompt_tokens"] * fp16
        # llama.cpp's state format: the cells' keys and values plus 12 bytes of metadata a cell and
        # a header per layer
        assert row["engine_bytes_computed"] <= row["engine_bytes_reported"] <= row["engine_bytes_computed"] * 1.1 + 4096
    for row in llamacpp["prefill_cold_vs_warm"]:
        assert row["warm_prompt_kv_hits"] == 1
        assert row["cold_positions"] - row["warm_positions"] == row["soft_prompt_tokens"]
    assert [row["batch"] for row in llamacpp["decode"]] == [1, 8]
