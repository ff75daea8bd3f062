"""One real 2-replica `lamp serve` shared by the reliability tests of this package.

It starts once (package scope) with the three session `task_adapters` bundled, an admin token
unique to the run (so a grep for it in logs can only find a leak), its Ray session under a private
temporary directory (so those logs can be searched) and small limits, so limit errors and
overload are cheap to provoke and every generation is short. Tests that change adapters use task
ids of their own; the replica-failure test leaves the server healthy again before it ends.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile

import pytest

from lamp_runtime.adapters import save_adapter
from lamp_runtime.bench.report import write_json
from lamp_runtime.bench.workload import machine_context

from ..server_process import ServerProcess

ADMIN_TOKEN = f"rel-{secrets.token_hex(12)}"
REPLICAS = 2
MAX_BATCH_SIZE = 4
MAX_QUEUE = 8
MAX_NEW_TOKENS = 4
MAX_INPUT_TOKENS = 128
MAX_REQUEST_BYTES = 32 * 1024
MAX_UPLOAD_BYTES = 1024 * 1024
BUNDLED_TASKS = ("lamp2", "lamp3", "plain")
# Bursts of concurrent calls of one task that spill from its preferred replica under this server's
# tight affinity bound, so a test reaches every replica (15 bursts of each, this server, quiet
# machine): generations in bursts of 8 reached both replicas in 14-15 (bursts of 4: 10-11); a 404
# takes a millisecond and hardly queues, so 404 bursts of 4 did in 1, of 8 in 8, of 24 in 15 (a few
# calls of those refused with 503: more than batch + queue were in flight at once).
GENERATION_BURST = 2 * MAX_BATCH_SIZE
NOT_FOUND_BURST = 3 * MAX_QUEUE
# docs/reliability.md's numbers: `LAMP_RELIABILITY_REPORT=docs/bench/reliability.json .venv/bin/python
# -m pytest tests/reliability` writes what each fault test measured there (see `measured`).
REPORT_ENV = "LAMP_RELIABILITY_REPORT"
_MEASURED: dict[str, dict] = {}


def measured(name: str, **values) -> None:
    """Print one `RELIABILITY <name>: k=v ...` line and keep the values for the JSON report."""
    print(f"\nRELIABILITY {name}: " + " ".join(f"{k}={v}" for k, v in values.items()))
    _MEASURED[name] = values


@pytest.fixture(scope="package", autouse=True)
def reliability_report():
    context = machine_context()  # the load average before the package ran
    yield
    if os.environ.get(REPORT_ENV) and _MEASURED:
        write_json(os.environ[REPORT_ENV], {
            "command": f"{REPORT_ENV}={os.environ[REPORT_ENV]} .venv/bin/python -m pytest tests/reliability",
            "machine": context, "load_average_at_end": machine_context()["load_average"], "measured": _MEASURED})


@pytest.fixture(scope="package")
def ray_tmpdir():
    # Short on purpose: Ray puts unix sockets under it (108-byte path limit).
    path = tempfile.mkdtemp(prefix="lamp-rel-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="package")
def server(tmp_path_factory, task_adapters, ray_tmpdir):
    prompts = tmp_path_factory.mktemp("rel-prompts")
    for task_id, adapter in task_adapters.items():
        save_adapter(adapter, prompts / f"{task_id}.safetensors")
    process = ServerProcess(
        store=tmp_path_factory.mktemp("rel-store") / "store", prompts=prompts, replicas=REPLICAS,
        admin_token=ADMIN_TOKEN, env={"RAY_TMPDIR": ray_tmpdir},
        log_path=tmp_path_factory.mktemp("rel-logs") / "serve.log",
        # A tight affinity bound (the defaults let a replica queue 4 before spilling): the replica
        # tests reach a given replica with small bursts of one task.
        extra_args=["--affinity-load-factor", "1.25", "--affinity-min-queue", "2",
                    "--max-batch-size", str(MAX_BATCH_SIZE), "--max-queue", str(MAX_QUEUE),
                    "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-input-tokens", str(MAX_INPUT_TOKENS),
                    "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-upload-bytes", str(MAX_UPLOAD_BYTES)],
    )
    with process:
        yield process

