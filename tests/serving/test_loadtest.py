"""The Locust load test: its traffic helpers, and one short headless run against a real server."""

import csv
import json
import random
import subprocess
import sys

import pytest

from lamp_runtime.adapters import AdapterLimits, LampAdapter, adapter_from_safetensors, validate
from loadtest.lamp_traffic import lamp_adapter_bytes, load_inputs, parse_task_mix, parse_word_range, shaped_input
from loadtest.run import REPO_ROOT, REPORT_PREFIX


def test_task_mix_parses_weights_and_names_bad_items():
    mix = parse_task_mix("sentiment:3, topic:0.5,extract")
    assert mix.tasks == ("sentiment", "topic", "extract") and mix.weights == (3.0, 0.5, 1.0)
    picks = [mix.pick(random.Random(i)) for i in range(400)]
    assert picks.count("sentiment") > picks.count("extract") > picks.count("topic") > 0
    for bad, message in [("a:b", "'a:b'"), ("x:0", "weight"), ("a,a", "twice"), (" , ", "empty"),
                         ("../etc", "'../etc'")]:
        with pytest.raises(ValueError, match=message):
            parse_task_mix(bad)


def test_inputs_come_from_the_bundled_data_and_take_the_asked_length():
    inputs = load_inputs("loadtest-sentiment")
    assert inputs[:3] == [json.loads(line)["input"] for line in
                          (REPO_ROOT / "prompts/data/sentiment/eval.jsonl").read_text().splitlines()[:3]]
    assert load_inputs("someone-elses-task")  # unknown tasks get the pooled bundled inputs
    assert parse_word_range("") is None and parse_word_range("7") == (7, 7)
    with pytest.raises(ValueError, match="MIN <= MAX"):
        parse_word_range("9-3")
    rng = random.Random(0)
    lengths = {len(shaped_input(inputs, (40, 60), rng).split()) for _ in range(50)}
    assert min(lengths) >= 40 and max(lengths) <= 60 and len(lengths) > 1


def test_uploaded_adapter_is_a_valid_lamp_file():
    adapter = adapter_from_safetensors(lamp_adapter_bytes(576, length=100, rank=16, pool=4, seed=1))
    validate(adapter, 576, AdapterLimits())
    assert isinstance(adapter, LampAdapter) and adapter.pooled_tokens == 25 and adapter.rank == 16


@pytest.mark.slow
def test_short_headless_load_test_against_a_started_server(tmp_path):
    """`make loadtest` in small: it starts the server, runs Locust with the admin user, writes reports."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--users", "3", "--spawn-rate", "3", "--run-time", "180s",
         "--max-requests", "5", "--out", str(out), "--json", str(tmp_path / "summary.json"),
         "--", "--lamp-max-new-tokens", "4", "--lamp-admin-interval", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "load test summary" in done.stdout
    with (out / f"{REPORT_PREFIX}_stats.csv").open(newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    inference = [r for name, r in rows.items() if name.startswith(("/generate", "/v1/completions"))]
    # the request bound ended the run long before the time bound; users busy at that moment may finish.
    # The bound counts request events as they fire; Locust's final CSV can miss the last few of them
    # (the run is quitting while they are recorded), so the CSV total is within one request per user.
    assert "reached 5 inference requests: stopping" in done.stderr
    assert 5 - 3 <= sum(int(r["Request Count"]) for r in inference) <= 5 + 3
    assert int(rows["/admin/adapters/[own]"]["Request Count"]) >= 1  # adapters were replaced during the run
    assert (out / f"{REPORT_PREFIX}.html").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())  # what docs/benchmarks.md cites
    assert summary["command"].startswith("python -m loadtest.run --users 3") and summary["context"]["git"]
    by_endpoint = {e["endpoint"]: e for e in summary["endpoints"]}
    assert by_endpoint["Aggregated"]["requests"] == int(rows["Aggregated"]["Request Count"])
    assert by_endpoint["Aggregated"]["failures"] == 0
    assert "LAMP_ADMIN_TOKEN" not in done.stdout and "Bearer" not in done.stdout + done.stderr
