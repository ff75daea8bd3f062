"""A real `lamp serve` in a subprocess for the serving benches (one replica, the embedded backbone in
float32 on the CPU, an admin token of the bench's own): start, resident memory, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from .ports import free_port

TOKEN = "bench-server-token"
START_TIMEOUT_S = 300.0


class BenchServer:
    def __init__(self, store: Path, log: Path, extra_args: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_headers = {"Authorization": f"Bearer {TOKEN}"}
        command = [sys.executable, "-m", "serving.cli", "serve", "--port", str(self.port), "--store", str(store),
                   "--prompts", "", "--replicas", "1", "--num-cpus", "2", "--dtype", "float32",
                   "--quantization", "none", "--device", "cpu", *extra_args]
        env = {**os.environ, "LAMP_ADMIN_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0"}
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lamp serve exited during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"lamp serve not healthy within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def rss_bytes(self) -> int:
        return process_tree_rss(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def process_tree_rss(pid: int) -> int:
    """Resident memory of a server and every process it started (Ray's too)."""
    total = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def start_server(store: Path, log: Path, extra_args: list[str], attempts: int = 3) -> BenchServer:
    """Ray gives a node 30 s to register (hard-coded); on a loaded machine a start can miss it."""
    for attempt in range(attempts):
        try:
            return BenchServer(store, log, extra_args)
        except RuntimeError as exc:
            if attempt == attempts - 1 or "timed out during startup" not in str(exc):
                raise
            print("lamp serve start failed (Ray node start-up timed out), retrying", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")
