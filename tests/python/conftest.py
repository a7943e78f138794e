"""Fixtures and the hypothesis profiles of Orchard's Python tests.

The "ci" profile (derandomized: the same examples on every run, a fixed number of them, no
deadline, no example database) is used unless HYPOTHESIS_PROFILE names another one, e.g.
HYPOTHESIS_PROFILE=dev for a longer, randomized search.

torch.compile's default backend (inductor) is slow the first time on a machine (it compiles C++);
`-m "not inductor"` leaves those tests out."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import orchard

# Inductor caches compiled graphs across processes; after a change of an op's schema it was
# seen reusing code generated for the older build (calling the op with stale arguments). One
# cache folder per build of the compiled ops (set before torch.compile reads it).
_build = hashlib.sha1(Path(orchard.__file__).with_name("_orchard_ops.so").read_bytes()).hexdigest()
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"torchinductor_orchard_{_build[:16]}"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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
