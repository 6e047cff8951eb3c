"""Fixtures for the tests of scripts/ (benchmarks and plots)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def scripts_on_path(monkeypatch):
    # the scripts import their helpers as run from scripts/ (``from benchutil import ...``)
    monkeypatch.syspath_prepend(str(SCRIPTS))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(str(SCRIPTS)):
            sys.modules.pop(name, None)
