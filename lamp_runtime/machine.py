"""Where a measurement was made: the machine, the software, the load, the revision.

Every bench JSON records it (lamp_runtime/bench/), and so does `make prompts`' results.json
(lamp_runtime/training/reproduce.py); a leaf module, so both can use it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def machine_context(backbone=None) -> dict:
    """Where the numbers came from. Load averages show how much other work shared the cores."""
    context = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Spinning OpenMP workers slow down many-fold when other processes share the cores.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": load_average(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": _git_revision(),
    }
    if torch.cuda.is_available():
        context["cuda_device"] = torch.cuda.get_device_name()
    if backbone is not None:
        import transformers

        context["transformers"] = transformers.__version__
        context["backbone"] = {
            "name": backbone.name, "dtype": backbone.options.dtype, "quantization": backbone.options.quantization,
            "device": str(backbone.device), "weights_bytes": backbone.weights_bytes,
            "layers": backbone.config.num_hidden_layers, "hidden_size": backbone.hidden_size,
        }
    return context


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: above the core count, other work competed for the CPU."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def lscpu_model() -> str | None:
    """`lscpu`'s model name (None where lscpu is missing): the CPU the bench JSONs name."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None)


def _git_revision() -> str | None:
    """The commit measured, `-dirty` when the working tree had uncommitted changes (None outside git)."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
