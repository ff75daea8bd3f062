"""A benchmark side in a process of its own, as a replica runs one engine.

Engines compared in one process disturb each other: llama.cpp's ggml threads wait for each other
at spin barriers and torch's OpenMP workers spin between regions, so one engine's idle-but-spinning
threads or its leftover thread pools land on the cores the measured engine is using. A replica
holds one engine per process, so each side of a comparison gets one too:

    side = EngineProcess("lamp_runtime.bench.llamacpp:LlamaCppSide", settings)
    sample = side.measure(("decode", "engine"))   # runs in the child; a dict comes back
    side.close()

The child imports `factory` ("module:callable"), calls it with `settings` (picklable) and
answers `measure(variant)` calls over a pipe until closed. An idle child blocks on the pipe, so
it takes no CPU while another side is measured. A failure in the child comes back as a
RuntimeError naming the side and the child's traceback; a child that dies is reported the same way.
"""

from __future__ import annotations

import importlib
import multiprocessing
import traceback
from collections.abc import Hashable


class EngineProcess:
    def __init__(self, factory: str, settings: dict, name: str | None = None, timeout_s: float = 3600):
        self.name = name or factory.rsplit(":", 1)[-1]
        self.timeout_s = timeout_s
        context = multiprocessing.get_context("spawn")  # no inherited thread pools or loaded libraries
        self._conn, child = context.Pipe()
        # Not a daemon: an engine may start processes of its own (vLLM's engine core); close() ends it.
        self._process = context.Process(target=_serve, args=(child, factory, settings), name=f"bench-{self.name}")
        self._process.start()
        child.close()
        self.info: dict = self._receive()  # what the side reports once built (settings, RSS growth)

    def measure(self, variant: Hashable) -> dict:
        self._conn.send(("measure", variant))
        return self._receive()

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("close", None))
                self._process.join(60)
            except (BrokenPipeError, OSError):
                pass
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()

    def _receive(self):
        if not self._conn.poll(self.timeout_s):
            self._process.kill()
            raise RuntimeError(f"bench side {self.name} answered nothing in {self.timeout_s:.0f} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"bench side {self.name} died (exit code {self._process.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"bench side {self.name} failed:\n{value}")
        return value


def _serve(conn, factory: str, settings: dict) -> None:
    try:
        module, attr = factory.split(":")
        side = getattr(importlib.import_module(module), attr)(settings)
        conn.send(("ok", side.info()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            command, variant = conn.recv()
            if command == "close":
                break
            try:
                conn.send(("ok", side.measure(variant)))
            except Exception:  # noqa: BLE001 - one failed sample fails the bench in the parent
                conn.send(("error", traceback.format_exc()))
    finally:
        side.close()
