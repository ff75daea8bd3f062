"""Adapters entering the store: bundled `prompts/` files at start and admin uploads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lamp_runtime.adapters import AdapterLimits, AdapterMeta, LampAdapter, SoftPromptAdapter, save_adapter
from lamp_runtime.errors import AdapterError
from serving.store.files import adapter_from_upload, discover_bundled, import_bundled, parse_pool_field
from serving.store.registry import open_store

HIDDEN = 16
LIMITS = AdapterLimits()


def soft(rows: int, seed: int) -> SoftPromptAdapter:
    return SoftPromptAdapter(AdapterMeta(), torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed)))


def lamp(seed: int) -> LampAdapter:
    g = torch.Generator().manual_seed(seed)
    return LampAdapter(AdapterMeta(pool=2), torch.randn(6, 3, generator=g), torch.rand(3, generator=g) + 0.5,
                       torch.randn(3, HIDDEN, generator=g))


def peft_folder(folder, rows: int):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": rows}))
    save_file({"prompt_embeddings": torch.randn(rows, HIDDEN)}, str(folder / "adapter_model.safetensors"))


@pytest.fixture()
def prompts(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    save_adapter(soft(4, 1), folder / "plain.safetensors")
    save_adapter(lamp(2), folder / "lamp.safetensors")
    peft_folder(folder / "peft", 5)
    (folder / "data").mkdir()  # training data, not an adapter
    (folder / "notes.txt").write_text("not an adapter")
    (folder / "bad name!.safetensors").write_bytes(b"")
    return folder


def test_discovery_finds_files_and_peft_folders_only(prompts):
    assert [(b.task_id, b.path.name) for b in discover_bundled(prompts)] == [
        ("lamp", "lamp.safetensors"), ("peft", "peft"), ("plain", "plain.safetensors")]
    assert discover_bundled(prompts / "missing") == [] and discover_bundled(None) == []


def test_import_is_idempotent_respects_admin_changes_and_picks_up_retrained_files(prompts, tmp_path):
    store = open_store(tmp_path / "store")
    imported = import_bundled(store, prompts, HIDDEN, LIMITS)
    assert sorted((s.task_id, s.version, s.kind) for s in imported) == [
        ("lamp", 1, "lamp"), ("peft", 1, "soft_prompt"), ("plain", 1, "soft_prompt")]
    assert store.get("peft").source == "bundled:peft"

    assert import_bundled(store, prompts, HIDDEN, LIMITS) == []  # a restart: nothing new
    store.delete("plain")  # an operator removed it over the admin API...
    assert import_bundled(store, prompts, HIDDEN, LIMITS) == []  # ...and a restart does not bring it back

    save_adapter(lamp(3), prompts / "lamp.safetensors")  # retrained
    assert [(s.task_id, s.version) for s in import_bundled(store, prompts, HIDDEN, LIMITS)] == [("lamp", 2)]


def test_a_broken_bundled_file_is_skipped_and_the_rest_imported(prompts, tmp_path, caplog):
    (prompts / "wide.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    store = open_store(tmp_path / "store")
    imported = import_bundled(store, prompts, HIDDEN, LIMITS)
    assert sorted(s.task_id for s in imported) == ["lamp", "peft", "plain"]
    assert "wide.safetensors not registered" in caplog.text


def test_upload_forms(tmp_path):
    data = save_adapter(soft(4, 1), tmp_path / "a.safetensors").read_bytes()
    assert adapter_from_upload(data, None, None, None, HIDDEN, LIMITS).prompt_tokens == 4
    assert adapter_from_upload(data, None, None, 2, HIDDEN, LIMITS).pooled_tokens == 2
    peft_folder(tmp_path / "peft", 3)
    config = (tmp_path / "peft" / "adapter_config.json").read_bytes()
    model = (tmp_path / "peft" / "adapter_model.safetensors").read_bytes()
    peft = adapter_from_upload(None, config, model, None, HIDDEN, LIMITS)
    assert (peft.kind, peft.prompt_tokens) == ("soft_prompt", 3)

    with pytest.raises(AdapterError, match="does not match the backbone's hidden size 32"):
        adapter_from_upload(data, None, None, None, 32, LIMITS)
    with pytest.raises(AdapterError, match="not both"):
        adapter_from_upload(data, config, model, None, HIDDEN, LIMITS)
    with pytest.raises(AdapterError, match="'adapter_config' is missing"):
        adapter_from_upload(None, None, model, None, HIDDEN, LIMITS)
    with pytest.raises(AdapterError, match="no adapter in the upload"):
        adapter_from_upload(None, None, None, None, HIDDEN, LIMITS)


@pytest.mark.parametrize("raw, expected", [(None, None), ("", None), (" 3 ", 3)])
def test_pool_field(raw, expected):
    assert parse_pool_field(raw) == expected


@pytest.mark.parametrize("raw", ["0", "-1", "2.5", "two"])
def test_bad_pool_field_is_named(raw):
    with pytest.raises(AdapterError, match=f"form field 'pool' must be an integer >= 1, got {raw!r}"):
        parse_pool_field(raw)
