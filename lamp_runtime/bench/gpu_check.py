"""`make gpu-check`: the one prepared check of the CUDA paths, for a GPU host with no network.

It runs, each part in its own child process with its own timeout (a part that fails or runs out
of time is recorded, and the next part still runs):

1. the CUDA tests (tests/cuda/, marker `cuda`) through pytest, results read from its JUnit XML;
2. the 7B-shaped random-weight benchmark (bench/gpu_bench.py);

then writes `gpu-check.json` (the host, torch/CUDA versions, command, revision, every part's
outcome) and `gpu-7b.json` (the benchmark with the same context) into the output folder.

Nothing is installed from the network. What the host lacks of the carried wheels (.gpu-wheels/,
filled here by `make gpu-wheels`: pytest and its dependencies, bitsandbytes, accelerate, psutil) is
unpacked into a temporary folder put on the children's PYTHONPATH; what the host has is used as is.

    make gpu-check                     # on a CUDA host: system python3, results in $OUT or docs/bench/
    make gpu-check-dry                 # here: the same check on the CPU with tiny shapes, to a temp folder
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

import torch

from .report import write_json
from .workload import machine_context

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = "docs/bench"
OUTPUT_TAIL = 6000  # characters of each part's output kept in the JSON


def unpack_missing_wheels(folder: Path, target: Path) -> dict:
    """Unpack each wheel in `folder` whose distribution this Python lacks into `target` (a wheel
    is a zip of its import tree and metadata; these are pure Python or ship plain shared libraries)."""
    used, present = [], []
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            present.append(f"{name} {importlib.metadata.version(name)}")
            continue
        except importlib.metadata.PackageNotFoundError:
            pass
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        used.append(f"{name} {version}")
    return {"folder": str(folder), "unpacked": used, "host_already_had": present}


def source_digest() -> str:
    """A digest of the code that ran (for a host where git or .git is missing): every .py under
    lamp_runtime/ and tests/cuda/, by path and content."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("lamp_runtime/**/*.py"), *ROOT.glob("tests/cuda/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def host_facts(device: str) -> dict:
    facts = machine_context()
    # A host given the working tree without .git cannot name its revision: the caller can
    # (`make gpu-check GPU_CHECK_REVISION=$(git rev-parse --short HEAD)` composed where git is).
    facts.update(source_digest=source_digest(), revision_given=os.environ.get("GPU_CHECK_REVISION") or None,
                 torch_cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    for package in ("transformers", "peft", "safetensors", "tokenizers", "bitsandbytes", "accelerate", "pytest"):
        try:
            facts[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            facts[package] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                        "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    return facts


def run_part(name: str, command: list[str], env: dict, timeout: float) -> dict:
    """One part in a child process: its exit status, time and output tail; a timeout is recorded."""
    print(f"== {name}: {shlex.join(command)} (timeout {timeout:.0f} s)", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        status, code, output = ("passed" if done.returncode == 0 else "failed"), done.returncode, done.stdout
    except subprocess.TimeoutExpired as expired:
        status, code = "timed out", None
        output = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else expired.stdout or ""
    seconds = time.perf_counter() - started
    print(output[-OUTPUT_TAIL:], flush=True)
    print(f"== {name}: {status} in {seconds:.0f} s", flush=True)
    return {"status": status, "exit_code": code, "seconds": round(seconds, 1), "command": shlex.join(command),
            "output_tail": output[-OUTPUT_TAIL:]}


def junit_results(path: Path) -> dict:
    """Counts and one row per test (outcome, seconds, message, recorded properties) from JUnit XML."""
    if not path.is_file():
        return {"error": "pytest wrote no JUnit report"}
    tests, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for case in ElementTree.parse(path).iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "")[:2000]
                break
        counts[outcome] += 1
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message, "properties": properties})
    return {"counts": counts, "tests": tests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lamp_runtime.bench.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda on a GPU host; cpu for the dry run")
    parser.add_argument("--shape", default=None, help="benchmark shape: 7b (default on cuda) or tiny (default on cpu)")
    parser.add_argument("--out", default=None, help="output folder (default: $GPU_CHECK_OUT, $OUT, then "
                                                    f"{DEFAULT_OUT}; a CPU dry run never writes there)")
    parser.add_argument("--wheels", default=".gpu-wheels", help="folder of carried wheels (`make gpu-wheels`)")
    # On a GPU host the two parts fit ~8 minutes (a device command may run 10); a CPU dry run on
    # a shared 2-core machine needs longer, and still fits pytest's 900 s per test.
    parser.add_argument("--tests-timeout", type=float, default=None, help="seconds (180 on cuda, 480 on cpu)")
    parser.add_argument("--bench-timeout", type=float, default=None, help="seconds (270 on cuda, 300 on cpu)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode tokens per request (64 on cuda, 4 on cpu)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the decode batches (2 on cuda, 1 on cpu)")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    shape = args.shape or ("7b" if on_cuda else "tiny")
    tests_timeout = args.tests_timeout or (180 if on_cuda else 480)
    bench_timeout = args.bench_timeout or (270 if on_cuda else 300)
    out = Path(args.out or os.environ.get("GPU_CHECK_OUT") or os.environ.get("OUT") or
               (DEFAULT_OUT if on_cuda else tempfile.mkdtemp(prefix="lamp-gpu-check-dry-")))
    if not on_cuda and (ROOT / DEFAULT_OUT).resolve() == (ROOT / out).resolve():
        parser.error(f"a {args.device} dry run is not a GPU result: write it elsewhere than {DEFAULT_OUT}")
    if on_cuda and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch here (the dry run is `make gpu-check-dry`)")
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="lamp-gpu-check-"))
    wheels = (ROOT / args.wheels) if not Path(args.wheels).is_absolute() else Path(args.wheels)
    carried = unpack_missing_wheels(wheels, scratch / "site") if wheels.is_dir() else {"folder": None}
    sys.path.append(str(scratch / "site"))  # so the versions reported are those the children import
    paths = (str(ROOT), str(scratch / "site"), os.environ.get("PYTHONPATH"))
    env = {**os.environ, "LAMP_CHECK_DEVICE": args.device, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    report = {
        "what": "make gpu-check: the CUDA tests and a Llama-2-7B-shaped benchmark with RANDOM weights",
        "dry_run": not on_cuda, "device": args.device,
        "command": shlex.join([sys.executable, "-m", __spec__.name, *(argv if argv is not None else sys.argv[1:])]),
        "host": host_facts(args.device), "carried_wheels": carried, "parts": {},
    }
    junit = scratch / "cuda-tests.xml"
    tests = run_part("cuda tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/cuda", "-p",
                                    "no:cacheprovider", "-o", "addopts=-ra", "-o", "junit_family=xunit1",
                                    f"--junitxml={junit}"],
                     env, tests_timeout)
    report["parts"]["cuda_tests"] = {**tests, **junit_results(junit)}
    bench_json = scratch / "gpu-7b.json"
    new_tokens = args.new_tokens or (64 if on_cuda else 4)
    # A dry run proves every step runs, not a rate: one round of the decode batches is enough.
    rounds = args.rounds or (2 if on_cuda else 1)
    bench = run_part("7B-shaped benchmark", [sys.executable, "-m", "lamp_runtime.bench.gpu_bench", "--device",
                                            args.device, "--shape", shape, "--new-tokens", str(new_tokens),
                                            "--rounds", str(rounds), "--json", str(bench_json)], env, bench_timeout)
    result = json.loads(bench_json.read_text()) if bench_json.is_file() else None
    report["parts"]["bench"] = {**bench, "result_file": "gpu-7b.json" if result else None}
    report["seconds"] = round(time.perf_counter() - started, 1)
    ok = all(p["status"] == "passed" for p in report["parts"].values())
    report["status"] = "passed" if ok else "failed"
    write_json(out / "gpu-check.json", report)
    if result is not None:
        write_json(out / "gpu-7b.json", {"context": {k: report[k] for k in ("dry_run", "device", "command", "host")},
                                         **result})
    counts = report["parts"]["cuda_tests"].get("counts")
    print(f"gpu-check {report['status']} in {report['seconds']:.0f} s: tests {counts}, benchmark "
          f"{bench['status']}; wrote {out / 'gpu-check.json'}" + (f" and {out / 'gpu-7b.json'}" if result else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
