import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, SoftPromptAdapter
from lamp_runtime.adapters.registry import AdapterRegistry, validate_task_id
from lamp_runtime.errors import AdapterError, UnknownTaskError


def adapter():
    return SoftPromptAdapter(AdapterMeta(), torch.zeros(2, 4))


@pytest.mark.parametrize("task_id", ["sentiment", "a", "Task_1.v2-x", "9lives", "x" * 64])
def test_valid_task_ids(task_id):
    assert validate_task_id(task_id) == task_id


@pytest.mark.parametrize("task_id", ["", "../etc", "a/b", "a..b", ".hidden", "-x", "ü", "a b", "x" * 65, None, "a\n"])
def test_invalid_task_ids_are_refused_with_a_message(task_id):
    with pytest.raises(AdapterError, match="invalid task id"):
        validate_task_id(task_id)


def test_versions_increase_and_entries_are_immutable_snapshots():
    reg = AdapterRegistry()
    first = reg.register("t", adapter())
    second = reg.register("t", adapter())
    assert (first.version, second.version) == (1, 2)
    assert reg.get("t") is second and first.version == 1
    reg.remove("t")
    assert "t" not in reg
    assert reg.register("t", adapter()).version == 3  # never reuse a version after delete
    with pytest.raises(AdapterError, match="older"):
        reg.register("t", adapter(), version=2)
    with pytest.raises(UnknownTaskError, match="unknown task id 'nope'"):
        reg.get("nope")
