"""Which kernel settings this host runs, found in a child process so that a crash cannot take the
replica down.

llama.cpp's repacked weights (extra buffer types: AMX tiles on a Xeon, interleaved blocks on
AVX2) are faster where they work, but on some hosts a decode of more than one row per
micro-batch crashes in them (a segfault in ggml_backend_amx_mul_mat on the Xeon), and with one-row
micro-batches they run. So each candidate setting runs a small workload in a child process
(`python -m lamp_runtime.llamacpp.probe GGUF SETTING THREADS`): a multi-row prefill of embedding
rows, rows of four sequences in one micro-batch, single-row token decodes, each part timed; finite
logits and the same greedy tokens as a second identical run. A child that dies (signal, abort,
nonzero exit) or times out fails its setting. The passing setting fastest on a serving mix
(`MIX`: decodes weigh most, as a request of a cached prompt prefills a few rows and decodes many
tokens) is used; results are cached per (GGUF,
llama-cpp-python version, CPU model, threads, setting) in the lamp cache folder, so a restart
does not probe again.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .native import KernelSettings

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = (KernelSettings(True, 512), KernelSettings(False, 512), KernelSettings(True, 1))
PROBE_TIMEOUT_SECONDS = 300


@dataclass
class ProbeReport:
    chosen: KernelSettings
    results: dict[str, dict] = field(default_factory=dict)  # setting key -> {"ok", "seconds", "error", "cached"}

    @property
    def source(self) -> str:
        return "cached" if all(r.get("cached") for r in self.results.values()) else "probed"


def setting_key(settings: KernelSettings) -> str:
    return f"repack={'on' if settings.weight_repack else 'off'},n_ubatch={settings.n_ubatch}"


def host_key(path: Path, threads: int) -> str:
    import platform

    try:
        from importlib.metadata import version

        lib_version = version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - an unknown version only means "probe again"
        lib_version = "unknown"
    stat = path.stat()
    return (f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|{lib_version}|{cpu_model()}|{platform.machine()}"
            f"|{threads}|workload{WORKLOAD_VERSION}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def default_cache_file() -> Path:
    from ..backbone.checkpoint import cache_root

    return cache_root() / "llamacpp-probe.json"


def probe_settings(path: Path, threads: int, candidates=DEFAULT_CANDIDATES, cache_file: Path | None = None,
                   command: list[str] | None = None) -> ProbeReport:
    """Try each candidate in a child (or take its cached result) and choose the fastest that passed.

    `command` is the child's command line before its three arguments (default: this module run by
    the same Python).
    """
    from filelock import FileLock

    cache_file = cache_file or default_cache_file()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    host = host_key(path, threads)
    results: dict[str, dict] = {}
    with FileLock(str(cache_file) + ".lock"):
        cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        known = cached.get(host, {})
        for settings in candidates:
            key = setting_key(settings)
            if key in known:
                results[key] = {**known[key], "cached": True}
                continue
            results[key] = run_child(path, settings, threads, command)
            known[key] = {k: v for k, v in results[key].items() if k != "cached"}
            log.info("llama.cpp probe %s: %s", key, results[key])
        cached[host] = known
        cache_file.write_text(json.dumps(cached, indent=1))
    passed = [s for s in candidates if results[setting_key(s)]["ok"]]
    if not passed:
        raise RuntimeError(f"no llama.cpp kernel setting runs {path.name} on this host: "
                           + "; ".join(f"{k}: {r.get('error')}" for k, r in results.items()))
    chosen = min(passed, key=lambda s: results[setting_key(s)]["seconds"])
    return ProbeReport(chosen, results)


def run_child(path: Path, settings: KernelSettings, threads: int, command: list[str] | None = None) -> dict:
    argv = (command or [sys.executable, "-m", "lamp_runtime.llamacpp.probe"]) + [
        str(path), json.dumps({"weight_repack": settings.weight_repack, "n_ubatch": settings.n_ubatch}), str(threads)]
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {PROBE_TIMEOUT_SECONDS} s"}
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or [""]
        how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        return {"ok": False, "error": f"child {how} {tail[0][:200]}".strip()}
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": f"child printed no result ({time.perf_counter() - started:.1f} s)"}
    return answer


# What a serving step mix costs, from the workload's timed parts: a request of a cached prompt
# prefills some tens of input rows and then decodes many more tokens, alone or beside others.
# Weighted so: one 64-row prefill, 64 single-row decodes, 32 four-row decodes.
MIX = {"prefill_64_s": 1, "decode_1_s": 64, "decode_4_s": 32}
WORKLOAD_VERSION = 3  # part of the cache key: results of another workload are probed again


def serving_seconds(result: dict) -> float:
    """The weighted serving mix a passing probe result stands for (the lower, the faster)."""
    return sum(weight * result[part] for part, weight in MIX.items())


def workload(path: str, settings: KernelSettings, threads: int) -> dict:
    """The child's work: load with `settings`, then twice: a 64-row embedding prefill, 8 decode
    steps of four sequences in one micro-batch, 16 single-row decodes. Each part timed (the faster
    of the two runs, per step); it passes with finite logits and the same greedy tokens both times."""
    import numpy as np

    from .native import Batch, lib, load_model, new_context

    L = lib()
    model = load_model(path, settings)
    width = L.llama_model_n_embd(model)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((64, width)) * 0.02).astype(np.float32)
    answers, parts = [], {part: [] for part in MIX}
    for _ in range(2):
        # four sequences of 128 cells, each in a KV stream of its own, as the engine runs them
        ctx = new_context(model, n_ctx=512, n_batch=256, n_ubatch=settings.n_ubatch, n_seq_max=4, threads=threads)
        mem = L.llama_get_memory(ctx)
        embeds, tokens = Batch(256, width), Batch(8, 0)
        started = time.perf_counter()
        embeds.add(64, 0, 0)
        embeds.embd[:64] = rows
        embeds.decode(ctx)
        parts["prefill_64_s"].append(time.perf_counter() - started)
        logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(1, vocab))
        got = [int(np.argmax(logits[0]))]
        for s in range(1, 4):
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)
        for live, steps, first in ((4, 8, 0), (1, 16, 8)):  # four sequences per micro-batch, then one
            started = time.perf_counter()
            for step in range(first, first + steps):
                tokens.clear()
                for s in range(live):
                    tokens.add(1, s, 64 + step)
                    tokens.tokens[s] = got[-1]
                tokens.decode(ctx)
                logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(live, vocab))
                if not np.isfinite(logits).all():
                    raise FloatingPointError("non-finite logits")
                got.append(int(np.argmax(logits[0])))
            parts[f"decode_{live}_s"].append((time.perf_counter() - started) / steps)
        answers.append(got)
        L.llama_free(ctx)
    if answers[0] != answers[1]:
        return {"ok": False, "error": f"answers differ between identical runs: {answers}"}
    result = {part: min(times) for part, times in parts.items()}
    return {"ok": True, **result, "seconds": serving_seconds(result)}


def main(argv: list[str]) -> None:
    path, setting, threads = argv
    spec = json.loads(setting)
    result = workload(path, KernelSettings(bool(spec["weight_repack"]), int(spec["n_ubatch"])), int(threads))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
