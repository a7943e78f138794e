"""Fixtures and the hypothesis profiles of Orchard's Python tests.

The "ci" profile (derandomized: the same examples on every run, a fixed number of them, no
deadline, no example database) is used unless HYPOTHESIS_PROFILE names another one, e.g.
HYPOTHESIS_PROFILE=dev for a longer, randomized search.

torch.compile's default backend (inductor) is slow the first time on a machine (it compiles C++);
`-m "not inductor"` leaves those tests out."""

from __future__ import annotations

import os

import orchard
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _isolated():
    """Every test starts with a fixed torch seed and leaves strict mode off."""
    torch.manual_seed(0)
    yield
    orchard.set_strict(False)


@pytest.fixture
def call_log(tmp_path, monkeypatch):
    """Turns on the C++ call log into a temporary file (read at each call); returns its path."""
    path = tmp_path / "calls.log"
    monkeypatch.setenv("ORCHARD_DEBUG_FLASH_ATN", "1")
    monkeypatch.setenv("ORCHARD_LOG_FILE", str(path))
    return path
