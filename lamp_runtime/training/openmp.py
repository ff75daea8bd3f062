"""Keep OpenMP threads from spin-waiting on a shared CPU, for the long training commands.

On an oversubscribed CPU, torch's default OpenMP threads spin while their partner thread is
descheduled. Measured on this repo's 2-core machine at load ~13: one training step cost 11.1
CPU-seconds (73.7 s wall) with spinning and 1.5 CPU-seconds (6.0 s wall) with
OMP_WAIT_POLICY=PASSIVE, for the same numbers. The policy is read once, when torch loads its
OpenMP runtime, so this must run before the first `import torch` of the process; afterwards it
does nothing. An explicit OMP_WAIT_POLICY in the environment always wins.
"""

from __future__ import annotations

import os
import sys


def prefer_passive_openmp() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE if torch is not loaded yet; return whether it applies."""
    if "torch" in sys.modules:
        return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"
