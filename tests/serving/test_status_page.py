"""The status page in a real headless browser (Debian's Chromium driven by Playwright): loaded while
traffic of several tasks runs, its numbers then match `/metrics`, its task table matches the
registered adapters, and it needs no admin token. The screenshot goes to the test's folder, and to
docs/status-page.png with LAMP_DOCS_SCREENSHOT=1 (`make screenshot`)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from ..requires import missing, require_module
from .conftest import BUNDLED_TASKS
from .test_api import metric_samples

pytestmark = pytest.mark.slow

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"
CHROMIUM = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")


def chromium_path() -> str:
    found = next((path for path in CHROMIUM if os.access(path, os.X_OK)), None)
    if found is None:
        missing("no Chromium: `make setup` installs Debian's chromium where apt-get runs as root")
    return found


@pytest.fixture(scope="module")
def browser():
    playwright = require_module("playwright.sync_api", reason="playwright is a dev extra (make setup)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield browser
        browser.close()


def number(text: str) -> float:
    return float(text.replace(",", "").split()[0])


def metric_total(text: str, name: str, **labels) -> float:
    return sum(s.value for s in metric_samples(text, name) if all(s.labels.get(k) == v for k, v in labels.items()))


def run_traffic(url: str, stop: threading.Event, counts: dict) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        i = 0
        while not stop.is_set():
            task = BUNDLED_TASKS[i % len(BUNDLED_TASKS)]
            client.post("/generate", json={"task_id": task, "input": f"Request {i}", "max_new_tokens": 3})
            counts[task] = counts.get(task, 0) + 1
            i += 1


def test_status_page_shows_live_numbers_that_match_metrics(server, browser, bundled_adapters, tmp_path):
    stop, counts = threading.Event(), {}
    traffic = threading.Thread(target=run_traffic, args=(server.url, stop, counts))
    traffic.start()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        response = page.goto(server.url + "/")  # no Authorization header: the page is public
        assert response.status == 200
        page.wait_for_function("document.querySelectorAll('#tasks tbody tr').length >= 4", timeout=30_000)
        page.wait_for_function("Number(document.getElementById('t-requests').dataset.value) > 24", timeout=120_000)
        assert page.locator("#error").inner_text() == ""
        deadline = time.monotonic() + 120  # the server is shared: make this run's traffic reach every task
        while min(counts.get(task, 0) for task in BUNDLED_TASKS) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop.set()
        traffic.join()

    time.sleep(2.0)  # replicas push every 0.5 s: let the last requests reach the hub
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    before = page.locator("#updated").inner_text()
    page.wait_for_function(f"document.getElementById('updated').textContent !== {before!r}", timeout=10_000)

    for key, name in (("soft_prompt_tokens_saved", "lamp_soft_prompt_tokens_saved_total"),
                      ("soft_prompt_tokens", "lamp_soft_prompt_tokens_total"),
                      ("generated_tokens", "lamp_generated_tokens_total"),
                      ("requests", "lamp_requests_total")):
        shown = number(page.locator(f"#t-{key}").inner_text())
        assert shown == metric_total(metrics, name) > 0, key
    for key, name in (("kv_cache_bytes_saved", "lamp_kv_cache_bytes_saved_total"),
                      ("prefill_seconds_saved", "lamp_prefill_seconds_saved_total"),
                      ("prompt_cache_bytes", "lamp_prompt_cache_bytes"),
                      ("prompt_kv_cache_tasks", "lamp_prompt_kv_cache_tasks"),
                      ("prompt_kv_pooling_saved_bytes", "lamp_prompt_kv_cache_pooling_saved_bytes")):
        shown = float(page.locator(f"#t-{key}").get_attribute("data-value"))
        assert shown == pytest.approx(metric_total(metrics, name), rel=1e-9), key
    hits = metric_total(metrics, "lamp_prompt_cache_hits_total")
    misses = metric_total(metrics, "lamp_prompt_cache_misses_total")
    assert page.locator("#prompt-cache").inner_text() == f"{int(hits):,} / {int(misses):,}"

    for task in BUNDLED_TASKS:  # the table: the adapter's shape and its own traffic
        adapter = bundled_adapters[task]
        row = page.locator(f"#tasks tbody tr[data-task='{task}']")
        cell = lambda col: row.locator(f"td[data-col='{col}']").inner_text()  # noqa: E731
        assert (int(cell("l")), cell("p"), int(cell("served"))) == (
            adapter.prompt_tokens, str(adapter.meta.pool), adapter.pooled_tokens)
        assert number(cell("requests")) == metric_total(metrics, "lamp_requests_total", task=task, status="200")
        assert number(cell("requests")) >= counts[task]
        assert float(cell("latency-p95")) >= float(cell("latency-p50")) > 0  # requests within the window
        hits = metric_total(metrics, "lamp_task_prompt_kv_hits_total", task=task)
        misses = metric_total(metrics, "lamp_task_prompt_kv_misses_total", task=task)
        assert hits + misses >= counts[task]
        assert cell("prompt-kv-hit-ratio") == f"{hits / (hits + misses):.2f}"

    page.locator("#chart polyline").first.wait_for(timeout=20_000)  # the history has two points
    shot = tmp_path / "status-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("LAMP_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)
    page.close()


def test_status_json_needs_no_token_and_lists_the_tasks(server):
    body = httpx.get(server.url + "/status.json", timeout=30).json()
    assert body["tasks_total"] >= len(BUNDLED_TASKS)
    assert {t["task_id"] for t in body["tasks"]} >= set(BUNDLED_TASKS)
    assert set(body["totals"]) >= {"soft_prompt_tokens_saved", "prefill_seconds_saved", "kv_cache_bytes_saved"}
