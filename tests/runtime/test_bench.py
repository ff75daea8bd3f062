"""`lamp bench` on tiny sizes: the reports have their schema and sane, finite figures.

Timings are never asserted (the machine is shared); what is checked is what cannot vary: token
counts, prompt lengths, the theoretical ratio, KV bytes against a real cache, PEFT parity.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from lamp_runtime.bench.batching import RATIOS, BatchingConfig, run_batching
from lamp_runtime.backbone.hf import kv_bytes_per_token
from lamp_runtime.bench.plots import plot_batching, plot_pooling
from lamp_runtime.bench.pooling import PoolingConfig, run_pooling
from lamp_runtime.bench.stats import interleaved, summarize
from serving.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_summarize_gives_median_quartiles_and_range():
    s = summarize([5, 1, 3, 2, 4])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3, 2, 4, 1, 5, 5)
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_interleaved_measures_every_variant_once_per_round_in_varying_order():
    calls = []
    samples = interleaved(["a", "b", "c"], lambda v: calls.append(v) or {"v": v}, repeats=4, warmup=1, seed=3)
    assert {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
    rounds = [tuple(calls[i:i + 3]) for i in range(0, len(calls), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds) and len(set(rounds)) > 1


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_bytes_formula_matches_a_real_cache(backbone, batch):
    tokens = 7
    cache = DynamicCache(config=backbone.config)
    with torch.inference_mode():
        backbone.model(input_ids=torch.ones(batch, tokens, dtype=torch.long), past_key_values=cache, use_cache=True)
    real = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert real == kv_bytes_per_token(backbone.config, backbone.dtype) * batch * tokens


@pytest.fixture(scope="module")
def pooling_report():
    config = PoolingConfig(lengths=(6,), pools=(1, 4), decode_lengths=(6, 20), decode_pools=(1, 4), decode_tokens=3,
                           repeats=2, warmup=0, threads=1)
    return run_pooling(config)


@pytest.mark.slow  # builds four engines (hf and llamacpp, prompt-KV cache on and off)
def test_pooling_bench_counts_positions_and_kv_bytes_exactly(pooling_report):
    engines = pooling_report["engines"]
    assert set(engines) == {"hf", "llamacpp"}
    rows = pooling_report["prefill"]
    assert sorted((r["engine"], r["state"], r["pool"]) for r in rows) == sorted(
        (e, s, p) for e in ("hf", "llamacpp") for s in ("cold", "warm", "off") for p in (1, 4))
    for row in rows:
        lx, soft, per_position = row["input_tokens"], math.ceil(6 / row["pool"]), engines[row["engine"]]["kv_bytes_per_token"]
        assert row["soft_tokens"] == soft
        assert row["computed_positions"] == lx + (0 if row["state"] == "warm" else soft)  # a hit runs the input alone
        assert row["kv_bytes"] == (lx + soft) * per_position  # what the running request holds
        if row["state"] == "cold" and row["engine"] == "hf":  # the entry the miss built, as its cache counts it
            assert row["prompt_kv_entry_bytes"] == soft * per_position
        elif row["state"] == "cold":  # llama.cpp's state copy: the cells plus 12 bytes a cell and a header per layer
            assert soft * per_position < row["prompt_kv_entry_bytes"] <= soft * per_position * 1.01 + 4096
        assert row["theory"] == (1 if row["state"] == "warm" else pytest.approx((lx + soft) / (lx + 6)))
        assert positive_finite(row["prefill_ms"]) and positive_finite(row["ttft_ms"])
        assert positive_finite(row["measured_ratio"]) and row["spread"]["prefill_ms"]["n"] == 2
        if row["pool"] == 1:
            assert row["measured_ratio"] == row["ttft_ratio"] == 1
        samples = pooling_report["samples"]["/".join(map(str, ("prefill", row["engine"], row["state"], 6, row["pool"])))]
        assert [s["soft_computed"] for s in samples] == [0 if row["state"] == "warm" else soft] * 2
    assert len({r["input_tokens"] for r in rows}) == 1 and rows[0]["input_tokens"] > 0  # one tokenizer, one input
    for row in pooling_report["decode"]:
        assert row["keys"] == row["input_tokens"] + math.ceil(row["l"] / row["pool"])
        assert row["kv_bytes"] == row["keys"] * engines[row["engine"]]["kv_bytes_per_token"]
        assert positive_finite(row["step_ms"]) and positive_finite(row["measured_ratio"])
    assert len(pooling_report["decode"]) == 2 * 2 * 2
    assert {a["engine"] for a in pooling_report["agreement"]} == {"hf", "llamacpp"}


@pytest.mark.slow
def test_pooling_report_is_json_and_plots(pooling_report, tmp_path):
    report = json.loads(json.dumps(pooling_report))
    assert report["bench"] == "pooling" and report["machine"]["load_average_after"] is not None
    assert set(report["claims"]) >= {"cold", "warm", "off", "decode"}
    assert plot_pooling(report, tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)


def test_pooling_config_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="decode_pools must include 1"):
        PoolingConfig(decode_pools=(4,))
    with pytest.raises(ValueError, match="engines"):
        PoolingConfig(engines=("vllm",))


def test_batching_report_ratios_and_peft_parity(backbone, tmp_path):
    config = BatchingConfig(requests=2, length=8, pool=2, rank=4, new_tokens=3, repeats=1, warmup=0)
    report = run_batching(backbone, config)
    for name in RATIOS:
        assert positive_finite(report[name]) and positive_finite(report["cpu_time_ratios"][name]["median"]), name
    assert set(report["variants"]) == {"single_task_batched", "mixed_task_batched", "mixed_task_sequential",
                                       "peft_sequential"}
    for variant in report["variants"].values():
        assert variant["generated_tokens"] == 2 * 3
        for key in ("tokens_per_s", "tokens_per_cpu_s", "latency_ms", "cpu_ms"):
            assert positive_finite(variant[key]), key
    # same prompts, greedy, fp32: our mixed batch reproduces PeftModel.generate token for token
    assert report["peft_outputs_match"] == report["peft_outputs_compared"] == 2
    assert report["soft_prompt_tokens"] == 4
    assert plot_batching(report, tmp_path / "b.png").read_bytes().startswith(PNG_MAGIC)


def test_cache_bench_command_writes_its_report(tmp_path):
    out = tmp_path / "cache.json"
    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "bench", "cache", "--tasks", "9", "40", "--samples", "5",
         "--repeats", "1", "--length", "20", "--pool", "4", "--rank", "4", "--cache-bytes", "100000",
         "--out", str(out)], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "miss/hit" in done.stdout and f"wrote {out}" in done.stdout
    report = json.loads(out.read_text())
    assert report["command"].startswith("lamp bench cache") and report["out"] == str(out)
    assert_recorded_command_reruns(report["command"], done.args[3:])
    assert [r["tasks"] for r in report["rows"]] == [9, 40]
    for row in report["rows"]:
        assert positive_finite(row["miss_us"]) and positive_finite(row["hit_us"])
        assert row["device_bytes_per_cached_task"] == 5 * 576 * 4  # ceil(20/4) tokens x d x fp32
        assert row["host_bytes_per_task"] == (20 * 4 + 4 + 4 * 576) * 4  # U, Q, V in fp32
        assert row["tasks_that_fit"] == min(row["tasks"], 100000 // (5 * 576 * 4))
        touched = row["after_touching_all"]
        assert touched["bytes"] <= 100000 and touched["entries"] == row["tasks_that_fit"]


def test_bench_rejects_bad_options_before_loading_anything(capsys):
    assert main(["bench", "pooling", "--pools", "2", "4", "--out", "unused.json"]) == 2
    assert "pools must include 1" in capsys.readouterr().err


def assert_recorded_command_reruns(recorded: str, ran: list[str]) -> None:
    """The recorded command parses to exactly the settings of the run (every default written out,
    so a later change of a default cannot change what it means)."""
    import shlex

    from serving.cli import build_parser

    parser = build_parser()
    words = shlex.split(recorded)
    assert words[0] == "lamp"
    as_recorded, as_ran = vars(parser.parse_args(words[1:])), vars(parser.parse_args(ran))
    bench_parser = as_ran.pop("parser")
    as_recorded.pop("parser")
    assert as_recorded == as_ran
    for action in bench_parser._actions:  # every option of the bench written out, defaults included
        if action.option_strings and action.dest != "help" and as_ran[action.dest] not in (None, False):
            assert set(action.option_strings) & set(words), (action.option_strings, words)


@pytest.mark.parametrize("argv", [
    ["bench", "pooling", "--out", "docs/bench/p.json", "--plot", "p.png", "--engines", "llamacpp", "--threads", "1"],
    ["bench", "batching", "--out", "b.json", "--no-peft", "--pool", "2"],
    ["bench", "speed", "--out", "s.json", "--llama-bench", "/opt/llama bench/llama-bench"],
    ["bench", "savings", "--out", "docs/bench/savings.json"],
    ["bench", "registry", "--registry", "postgresql://lamp@db:5432/lamp", "--tasks", "10", "--out", "r.json"],
    ["bench", "start", "--tasks", "10", "--rounds", "2", "--out", "docs/bench/s.json"],
])
def test_every_lamp_bench_records_a_command_that_reruns_as_written(argv):
    from lamp_runtime.bench.report import full_command
    from serving.cli import build_parser

    args = build_parser().parse_args(argv)
    assert_recorded_command_reruns(full_command(f"lamp bench {args.bench}", args.parser, args), argv)


BENCH_JSONS = sorted((Path(__file__).resolve().parents[2] / "docs" / "bench").glob("*.json"))


@pytest.mark.parametrize("path", BENCH_JSONS, ids=lambda p: p.name)
def test_committed_bench_json_records_a_command_that_reruns_as_written(path):
    """Each committed JSON names the command that rewrites it, with the path it wrote; a `lamp
    bench` command parses and carries every option of its bench (defaults of its day included)."""
    import shlex

    report = json.loads(path.read_text())
    command, relative = report["command"], f"docs/bench/{path.name}"
    words = shlex.split(command.split(" .venv/bin/python ", 1)[-1])  # pytest-made reports: env var first
    if "pytest" in words:
        assert f"={relative}" in command, command
        return
    assert report["out"] == relative and relative in words, (report.get("out"), command)
    temporary = [w for w in words if w.startswith("/")]
    assert not temporary, f"paths of a temporary folder in {command}"
    if words[0] == "lamp":
        from serving.cli import build_parser

        args = build_parser().parse_args(words[1:])
        for action in args.parser._actions:
            if action.option_strings and action.dest != "help" and getattr(args, action.dest) not in (None, False):
                assert set(action.option_strings) & set(words), (action.option_strings, command)
    else:
        assert words[:2] == ["python", "-m"], command
