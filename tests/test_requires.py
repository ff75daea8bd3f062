"""Under CI a missing service fails the run instead of skipping (tests/requires.py). Checked by
asking for a module that cannot exist, so no real service is removed."""

from __future__ import annotations

import pytest

from .requires import missing, require_module

ABSENT = "lamp_no_such_service_module"


def test_a_missing_service_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needed by this check"):
        require_module(ABSENT, "needed by this check")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        missing("PostgreSQL is not installed")


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_a_missing_service_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="CI=true and a required service is missing: needed by"):
        require_module(ABSENT, "needed by this check")
    with pytest.raises(pytest.fail.Exception, match="no Chromium"):
        missing("no Chromium")


def test_a_present_module_is_returned_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require_module("json", "stdlib").dumps([1]) == "[1]"


def test_ci_run_sets_ci(pytestconfig):
    """.ci/run is what CI calls: it must run `make test` with CI set, or the skips stay green."""
    script = (pytestconfig.rootpath / ".ci" / "run").read_text()
    assert 'export CI="${CI:-true}"' in script
