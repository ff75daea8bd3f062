"""`python -m loadtest.many_tasks` end to end at a tiny size: a real server, real registrations and
traffic; the report's structure and its exact counts (every measured request is one prompt-KV
lookup), never its timings."""

from __future__ import annotations

import json
import math

import pytest

from loadtest import many_tasks

@pytest.mark.slow
def test_many_tasks_bench_counts_every_measured_request_once(tmp_path):
    out = tmp_path / "many-tasks.json"
    argv = ["--tasks", "3", "6", "--pools", "1", "4", "--prompt-tokens", "20", "--prompt-kv-cache-mb", "1",
            "--rounds", "2", "--warmup", "2", "--requests", "4", "--concurrency", "2", "--max-new-tokens", "1",
            "--json", str(out), "--plot", str(tmp_path / "many-tasks.png")]
    assert many_tasks.main(argv) == 0
    report = json.loads(out.read_text())

    assert report["command"].startswith("python -m loadtest.many_tasks --tasks 3 6 --pools 1 4 ")
    assert report["out"] == str(out) and report["context"]["cpu"]
    # the embedded backbone in float32: 30 layers x keys and values x 3 KV heads x 64 x 4 bytes
    assert report["kv_bytes_per_position"] == 30 * 2 * 3 * 64 * 4
    rows = report["rows"]
    assert [(r["tasks"], r["traffic"], r["pool"]) for r in rows] == [
        (n, traffic, p) for n in (3, 6) for traffic in ("zipf", "uniform") for p in (1, 4)]
    for row in rows:
        assert row["requests"] == 2 * 4
        assert row["hits"] + row["misses"] == row["requests"], row
        assert row["served_tokens"] == math.ceil(20 / row["pool"])
        entry = report["kv_bytes_per_position"] * row["served_tokens"]
        assert row["prompt_kv_bytes"] == row["tasks_resident"] * entry  # the last phase's p fills the cache
        assert row["tasks_resident"] <= (1 << 20) // entry
    capacity = {c["pool"]: c for c in report["capacity"]}
    assert capacity[1]["computed_in_budget"] == 1 and capacity[4]["computed_in_budget"] == 4
    assert capacity[4]["computed_per_gb"] == pytest.approx(4 * capacity[1]["computed_per_gb"])
    assert [(r["tasks"], r["traffic"], r["pools"]) for r in report["p10_over_p1"]] == [
        (3, "uniform", [1, 4]), (3, "zipf", [1, 4]), (6, "uniform", [1, 4]), (6, "zipf", [1, 4])]
    assert (tmp_path / "many-tasks.png").stat().st_size > 10_000


def test_many_tasks_takes_the_served_backbones_width_and_a_traffic_subset():
    from safetensors.numpy import load

    args = many_tasks.parse_args(["--traffic", "zipf", "--hidden-size", "64", "--rank", "4", "--prompt-tokens", "10"])
    assert args.traffic == ["zipf"] and args.request_timeout == 120
    tensors = [load(data) for data in many_tasks.adapter_files(args, pool=2, count=2)]
    assert all(max(t.shape[-1] for t in f.values()) == 64 for f in tensors)
    with pytest.raises(SystemExit):
        many_tasks.parse_args(["--hidden-size", "0"])
    with pytest.raises(SystemExit):
        many_tasks.parse_args(["--traffic", "bursty"])
