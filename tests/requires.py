"""What a test does when a service it needs (vLLM, PostgreSQL, Chromium, Playwright, moto) is missing.

On a developer's machine the test skips, saying why. Under CI (`CI=true`, what .ci/run and most CI
systems set) a missing service fails the run instead: the docs promise these tests run on every
`make test` in CI, and a green run that skipped them would not show it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

TRUE = {"1", "true", "yes", "on"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in TRUE


def missing(reason: str) -> None:
    """Skip (or, under CI, fail) the calling test: the service it needs is not here."""
    if in_ci():
        pytest.fail(f"CI=true and a required service is missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, reason: str) -> ModuleType:
    """`pytest.importorskip`, except that under CI a module that does not import fails the run."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{reason} ({type(exc).__name__}: {exc})")
        raise  # unreachable: missing() raises pytest's skip or fail outcome
