"""Adapter formats: round trips, and every kind of bad file refused with a clear AdapterError."""

import json
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from lamp_runtime.adapters import (
    AdapterLimits,
    AdapterMeta,
    LampAdapter,
    SoftPromptAdapter,
    load_adapter,
    save_adapter,
)
from lamp_runtime.errors import AdapterError
from lamp_runtime.prompts.prepared import prepare

D = 16


def lamp_tensors(l=6, r=3, d=D):
    g = torch.Generator().manual_seed(0)
    return {"lamp.U": torch.randn(l, r, generator=g), "lamp.Q": torch.rand(r, generator=g) + 0.5,
            "lamp.V": torch.randn(r, d, generator=g)}


def write(path, tensors, **metadata):
    save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})
    return path


def test_lamp_round_trip_and_prompt(tmp_path):
    t = lamp_tensors()
    a = LampAdapter(AdapterMeta(pool=4, task="demo", description="d", extra={"lr": "0.3"}),
                    t["lamp.U"], t["lamp.Q"], t["lamp.V"])
    loaded = load_adapter(save_adapter(a, tmp_path / "a.safetensors"), D)
    assert isinstance(loaded, LampAdapter)
    assert (loaded.prompt_tokens, loaded.rank, loaded.pooled_tokens) == (6, 3, 2)
    assert loaded.meta.task == "demo" and loaded.meta.extra == {"lr": "0.3"}
    full = t["lamp.U"] @ torch.diag(t["lamp.Q"]) @ t["lamp.V"]
    torch.testing.assert_close(loaded.build_prompt(), torch.stack([full[:4].mean(0), full[4:].mean(0)]))


def test_soft_prompt_half_precision_is_accepted_and_pool_override(tmp_path):
    path = write(tmp_path / "p.safetensors", {"prompt": torch.randn(5, D).half()}, format="soft_prompt")
    a = load_adapter(path, D, pool=2)
    assert isinstance(a, SoftPromptAdapter) and a.prompt.dtype == torch.float32
    assert (a.prompt_tokens, a.pooled_tokens) == (5, 3)


def test_peft_folder(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": D, "some_new_key": 1}))
    write(folder / "adapter_model.safetensors", {"prompt_embeddings": torch.randn(4, D)})
    a = load_adapter(folder, D)
    assert a.source_format == "peft_prompt_tuning" and a.prompt_tokens == 4


BAD_LAMP = {
    "nan": ({**lamp_tensors(), "lamp.Q": torch.tensor([1.0, float("nan"), 1.0])}, "NaN or Inf"),
    "inf": ({**lamp_tensors(), "lamp.U": torch.full((6, 3), float("inf"))}, "NaN or Inf"),
    "wrong hidden": (lamp_tensors(d=D + 1), f"does not match the backbone's hidden size {D}"),
    "rank mismatch": ({**lamp_tensors(), "lamp.Q": torch.ones(4)}, "rank mismatch"),
    "Q not a vector": ({**lamp_tensors(), "lamp.Q": torch.ones(3, 1)}, "must be U \\[l, r\\]"),
    "missing V": ({k: v for k, v in lamp_tensors().items() if k != "lamp.V"}, "missing \\['lamp.V'\\]"),
    "extra tensor": ({**lamp_tensors(), "evil": torch.ones(1)}, "unexpected \\['evil'\\]"),
    "huge value": ({**lamp_tensors(), "lamp.Q": torch.full((3,), 1e9)}, "above the limit"),
    "int dtype": ({**lamp_tensors(), "lamp.Q": torch.ones(3, dtype=torch.int32)}, "dtype I32 not allowed"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAMP))
def test_bad_lamp_files(tmp_path, case):
    tensors, message = BAD_LAMP[case]
    path = write(tmp_path / "bad.safetensors", tensors, format="lamp", pool=1)
    with pytest.raises(AdapterError, match=message):
        load_adapter(path, D)


def test_limits_on_length_rank_pool_and_file_size(tmp_path):
    path = write(tmp_path / "a.safetensors", lamp_tensors(l=40, r=5), format="lamp", pool=8)
    with pytest.raises(AdapterError, match="prompt length l=40 outside 1..32"):
        load_adapter(path, D, AdapterLimits(max_prompt_tokens=32))
    with pytest.raises(AdapterError, match="rank r=5 outside 1..4"):
        load_adapter(path, D, AdapterLimits(max_rank=4))
    with pytest.raises(AdapterError, match="pool p=8 above the limit 4"):
        load_adapter(path, D, AdapterLimits(max_pool=4))
    with pytest.raises(AdapterError, match="over the limit of 100 bytes"):
        load_adapter(path, D, AdapterLimits(max_file_bytes=100))


@pytest.mark.parametrize("pool", ["0", "-1", "two", "1.5", ""])
def test_bad_pool_metadata(tmp_path, pool):
    path = write(tmp_path / "a.safetensors", lamp_tensors(), format="lamp", pool=pool)
    with pytest.raises(AdapterError, match="pool must be an integer >= 1"):
        load_adapter(path, D)


def test_unknown_or_missing_format(tmp_path):
    path = write(tmp_path / "a.safetensors", lamp_tensors(), format="lora")
    with pytest.raises(AdapterError, match="format must be 'lamp', 'soft_prompt' or 'ept', got 'lora'"):
        load_adapter(path, D)
    path = write(tmp_path / "b.safetensors", lamp_tensors())
    with pytest.raises(AdapterError, match="got None"):
        load_adapter(path, D)


def test_truncated_file(tmp_path):
    path = write(tmp_path / "a.safetensors", lamp_tensors(), format="lamp")
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(AdapterError, match="truncated|not a safetensors"):
            load_adapter(path, D)


def test_pickle_and_zip_are_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(AdapterError, match="not a safetensors file"):
        load_adapter(path, D)
    with zipfile.ZipFile(tmp_path / "z.safetensors", "w") as z:
        z.writestr("data.pkl", pickle.dumps({"a": 1}))
    with pytest.raises(AdapterError, match="not a safetensors file"):
        load_adapter(tmp_path / "z.safetensors", D)
    (tmp_path / "a.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="only .safetensors"):
        load_adapter(tmp_path / "a.bin", D)


def test_peft_folder_errors(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickled adapter_model.bin is not accepted"):
        load_adapter(folder, D)
    write(folder / "adapter_model.safetensors", {"prompt_embeddings": torch.randn(4, D)})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterError, match="peft_type must be one of"):
        load_adapter(folder, D)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(folder, D)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 5}))
    with pytest.raises(AdapterError, match="4 rows but num_virtual_tokens=5"):
        load_adapter(folder, D)


def test_missing_path(tmp_path):
    with pytest.raises(AdapterError, match="no such adapter"):
        load_adapter(tmp_path / "nope.safetensors", D)


def ept_tensors(m=4, s=5, r=2, d=D):
    g = torch.Generator().manual_seed(1)
    return {"ept.prompt": torch.randn(m, d, generator=g), "ept.A": torch.randn(s, r, generator=g),
            "ept.B": torch.randn(r, d, generator=g)}


def test_ept_round_trip_prompt_and_offset(tmp_path):
    t = ept_tensors()
    path = write(tmp_path / "e.safetensors", t, format="ept", task="demo")
    a = load_adapter(path, D)
    assert a.kind == "ept" and (a.prompt_tokens, a.pooled_tokens, a.offset_tokens) == (4, 4, 5)
    prepared = prepare(a)
    torch.testing.assert_close(prepared.prompt, t["ept.prompt"])
    torch.testing.assert_close(prepared.offset, t["ept.A"] @ t["ept.B"])
    again = load_adapter(save_adapter(a, tmp_path / "again.safetensors"), D)
    torch.testing.assert_close(prepare(again).offset, prepared.offset)


@pytest.mark.parametrize("case,tensors,message", [
    ("A/B rank mismatch", {**ept_tensors(), "ept.B": torch.randn(3, D)}, "EPT tensors must be"),
    ("wrong hidden", ept_tensors(d=D + 2), "hidden size d=18"),
    ("prompt width", {**ept_tensors(), "ept.prompt": torch.randn(4, D + 1)}, "EPT tensors must be"),
    ("nan offset", {**ept_tensors(), "ept.A": torch.full((5, 2), float("nan"))}, "NaN or Inf"),
    ("missing A", {k: v for k, v in ept_tensors().items() if k != "ept.A"}, "missing \\['ept.A'\\]"),
])
def test_bad_ept_files(tmp_path, case, tensors, message):
    path = write(tmp_path / "bad.safetensors", tensors, format="ept")
    with pytest.raises(AdapterError, match=message):
        load_adapter(path, D)


@pytest.mark.parametrize("fmt,tensors,product", [
    ("lamp", {"lamp.U": torch.full((6, 3), 50.0), "lamp.Q": torch.full((3,), 50.0), "lamp.V": torch.full((3, D), 50.0)},
     "U·diag\\(Q\\)·V"),
    ("ept", {**ept_tensors(), "ept.A": torch.full((5, 2), 200.0), "ept.B": torch.full((2, D), 200.0)}, "A·B"),
])
def test_factors_within_limits_whose_product_is_not_are_refused(tmp_path, fmt, tensors, product):
    """Each factor is under the 1e4 limit, but the product (3 * 50^3 = 375,000; 2 * 200^2 = 80,000)
    would overflow float16 (max 65,504): the served prompt must respect the limit too."""
    path = write(tmp_path / "big.safetensors", tensors, format=fmt)
    with pytest.raises(AdapterError, match=f"tensor '{product}' has \\|value\\| .* above the limit 10000"):
        load_adapter(path, D)
