"""Start and stop a real `lamp serve` in a subprocess, for end-to-end, load and reliability tests.

    with ServerProcess(store=tmp_path / "store", prompts=prompts_dir, admin_token="t") as server:
        httpx.post(f"{server.url}/generate", json={...})

The server runs in its own session on a free port with the embedded backbone in float32 on the CPU
(override with `extra_args`). `start()` returns once `/healthz` answers 200; `stop()` sends SIGTERM
(what a supervisor sends) and then checks that every process the server started (Ray's GCS,
raylet, workers, replicas) is gone: a leak fails the test that stopped it, not the next one.
Output goes to `log_path`; `log_tail()` is attached to start-up failures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

from serving.bench.ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


class ServerProcess:
    def __init__(self, store: str | os.PathLike, prompts: str | os.PathLike | None = None, *,
                 replicas: int = 1, admin_token: str | None = None, port: int | None = None,
                 extra_args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
                 log_path: str | os.PathLike | None = None, num_cpus: int = 2):
        self.store = Path(store)
        self.prompts = Path(prompts) if prompts is not None else None
        self.replicas = replicas
        self.admin_token = admin_token
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.num_cpus = num_cpus
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="lamp-serve-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self._descendants: dict[int, psutil.Process] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "serving.cli", "serve", "--port", str(self.port), "--host", "127.0.0.1",
            "--store", str(self.store), "--prompts", str(self.prompts) if self.prompts else "",
            "--replicas", str(self.replicas), "--num-cpus", str(self.num_cpus),
            "--dtype", "float32", "--quantization", "none", "--device", "cpu", *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "LAMP_ADMIN_TOKEN"}
        if self.admin_token is not None:
            env["LAMP_ADMIN_TOKEN"] = self.admin_token
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = START_TIMEOUT_S) -> "ServerProcess":
        """Launch the server (unless `launch` already did) and wait until `/healthz` answers 200."""
        if self.process is None:
            self.launch()
        return self.wait_until_healthy(timeout)

    def launch(self) -> "ServerProcess":
        """Start the server process and return at once. Most of a start-up is Ray and the replicas
        starting in other processes, so a test can compute its references meanwhile; it then enters
        `with server:` (or calls `start`), which waits for health. Whoever launches must stop or kill."""
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), cwd=REPO_ROOT, env=self.environment(), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def wait_until_healthy(self, timeout: float = START_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._remember_descendants()
            if self.process.poll() is not None:
                raise RuntimeError(f"lamp serve exited with {self.process.returncode} during start-up:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    self._remember_descendants()
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"lamp serve not healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait for the server to exit, then require that none of its processes remain."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._remember_descendants()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"lamp serve did not exit within {timeout:.0f} s of SIGTERM:\n"
                               f"{self.log_tail()}") from None
        leftovers = self._wait_for_descendants(deadline=time.monotonic() + 15)
        if leftovers:
            for proc in leftovers:
                _kill_quietly(proc)
            names = ", ".join(f"{p.pid} {_name(p)}" for p in leftovers)
            raise RuntimeError(f"processes left behind after lamp serve exited: {names}")

    def kill(self) -> None:
        """Last resort: SIGKILL the server's whole session and every process it started."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
        for proc in self._descendants.values():
            _kill_quietly(proc)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def _remember_descendants(self) -> None:
        """Ray re-parents some of its processes; remember every one we have seen under the server."""
        try:
            for proc in psutil.Process(self.process.pid).children(recursive=True):
                self._descendants.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass

    def _wait_for_descendants(self, deadline: float) -> list[psutil.Process]:
        while True:
            alive = [p for p in self._descendants.values() if _alive(p)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.25)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.stop()
            return
        try:  # a test already failed: clean up, but let its error be the one reported
            self.stop()
        except RuntimeError:
            self.kill()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:80]
    except psutil.Error:
        return "?"


def _kill_quietly(proc: psutil.Process) -> None:
    try:
        proc.kill()
    except psutil.Error:
        pass


def stop_all(servers) -> None:
    """Stop every server; one that will not stop is killed (a warning says why), so none outlives
    the bench or test that started it."""
    for server in servers:
        try:
            server.stop()
        except RuntimeError as exc:
            print(f"warning: {exc}", file=sys.stderr)
            server.kill()


def launched_over(tmp_path_factory, adapters: dict, extra_args: list[str], admin_token: str) -> Iterator["ServerProcess"]:
    """A module fixture's body: a server over a fresh prompts folder holding `adapters` (task id ->
    adapter), launched but not yet waited for, stopped when the fixture ends."""
    from lamp_runtime.adapters import save_adapter

    prompts = tmp_path_factory.mktemp("prompts")
    for task_id, adapter in adapters.items():
        save_adapter(adapter, prompts / f"{task_id}.safetensors")
    process = ServerProcess(store=tmp_path_factory.mktemp("store"), prompts=prompts, admin_token=admin_token,
                            log_path=tmp_path_factory.mktemp("logs") / "serve.log", extra_args=extra_args)
    process.launch()
    try:
        yield process
    finally:
        process.stop()
