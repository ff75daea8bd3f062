"""`make gpu-check` cannot rot where no GPU is lent: its dry run (the same runner, the CUDA tests
and the benchmark on the CPU with tiny shapes) passes here, and the pieces it relies on work."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lamp_runtime.bench.gpu_check import DEFAULT_OUT, ROOT, main, unpack_missing_wheels


@pytest.mark.slow
def test_the_dry_run_passes_and_writes_both_reports(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lamp_runtime.bench.gpu_check", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["status"] == "passed" and report["dry_run"] is True and report["device"] == "cpu"
    assert report["host"]["source_digest"] and "--device cpu" in report["command"]
    tests = report["parts"]["cuda_tests"]
    assert tests["status"] == "passed" and tests["counts"]["failed"] == tests["counts"]["error"] == 0
    outcomes = {t["test"].split("::")[-1]: t["outcome"] for t in tests["tests"]}
    assert len(outcomes) >= 8 and set(outcomes.values()) <= {"passed", "skipped"}
    assert outcomes["test_prompt_kv_cold_warm_and_concurrent"] == "passed"
    assert outcomes["test_t5_bf16_mixed_batch_is_greedy_under_the_float32_reference"] == "passed"
    bench = json.loads((out / "gpu-7b.json").read_text())
    assert bench["weights"].startswith("RANDOM") and bench["shape"] == "tiny" and bench["context"]["dry_run"]
    assert [row["batch"] for row in bench["decode"]] == [1, 16, 64]
    assert all(row["tokens_per_s_median"] > 0 for row in bench["decode"])
    prefill = {row["pool"]: row for row in bench["prefill"]}
    assert (prefill[1]["soft_prompt_tokens"], prefill[1]["warm_tokens_reused"]) == (100, 100)
    assert (prefill[10]["soft_prompt_tokens"], prefill[10]["warm_tokens_reused"]) == (10, 10)
    per_token = bench["kv_bytes_per_token"]
    assert bench["prompt_kv_bytes_per_task"]["p1"]["bytes"] == 100 * per_token
    assert bench["prompt_kv_bytes_per_task"]["p10"]["bytes"] == 10 * per_token


@pytest.mark.slow
def test_a_part_out_of_time_is_recorded_and_the_next_part_still_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lamp_runtime.bench.gpu_check", "--device", "cpu", "--out",
                           str(tmp_path), "--tests-timeout", "1", "--bench-timeout", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["status"] == "failed"
    assert [part["status"] for part in report["parts"].values()] == ["timed out", "timed out"]
    assert not (tmp_path / "gpu-7b.json").exists()


def test_a_dry_run_refuses_to_write_where_gpu_results_live(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--out", DEFAULT_OUT])
    assert exit_info.value.code == 2 and "not a GPU result" in capsys.readouterr().err


@pytest.mark.slow
def test_the_cuda_tests_skip_here_saying_why():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "no CUDA device here" in done.stdout and " passed" not in done.stdout


def _wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "VALUE = 1\n")
        archive.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
    return path


def test_only_wheels_the_host_lacks_are_unpacked(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "lamp_absent_pkg", "1.0")
    _wheel(wheels, "torch", "0.0.1")  # present here: the host's own stays in use
    found = unpack_missing_wheels(wheels, tmp_path / "site")
    assert found["unpacked"] == ["lamp_absent_pkg 1.0"] and found["host_already_had"][0].startswith("torch ")
    assert (tmp_path / "site" / "lamp_absent_pkg" / "__init__.py").is_file()
    assert not (tmp_path / "site" / "torch").exists()


def test_the_in_process_tokenizer_and_random_backbone():
    """What replaces the hub on the GPU host: a tokenizer of exactly the model's vocabulary that
    round-trips any text, and a random model built where it is asked, wrapped as a Backbone."""
    import torch

    from lamp_runtime.backbone.hf import in_memory_backbone
    from lamp_runtime.backbone.random_models import TINY_LLAMA, byte_level_tokenizer, random_llama

    tokenizer = byte_level_tokenizer(32000)
    text = "Grüße, world! 1 + 1 = 2\n\tdone"
    assert len(tokenizer) == 32000 and tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer(text)["input_ids"]) < len(text.encode())  # pairs merge
    small = byte_level_tokenizer(TINY_LLAMA["vocab_size"])
    first = random_llama(TINY_LLAMA, small, "cpu", torch.bfloat16, seed=3)
    again = random_llama(TINY_LLAMA, small, "cpu", torch.bfloat16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    backbone = in_memory_backbone(first, small, "tiny-random")
    options = backbone.options
    assert (options.dtype, options.device, options.quantization) == ("bfloat16", "cpu", "none")
    buffers = sum(b.numel() * b.element_size() for b in first.buffers())  # the float32 rotary frequencies
    assert backbone.weights_bytes == 2 * sum(p.numel() for p in first.parameters()) + buffers
    assert first.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained keeps it
    with pytest.raises(ValueError, match="vocab_size must be"):
        byte_level_tokenizer(100)
