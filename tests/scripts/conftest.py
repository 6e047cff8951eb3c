"""Fixtures for the tests of scripts/ (benchmarks and plots)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def scripts_on_path(monkeypatch):
    # the scripts import their helpers as run from scripts/ (``from benchutil import ...``)
    monkeypatch.syspath_prepend(str(SCRIPTS))
    before = set(sys.modules)
    threads = torch.get_num_threads()  # a benchmark's --clock cpu sets one thread
    yield
    torch.set_num_threads(threads)
    for name in set(sys.modules) - before:
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(str(SCRIPTS)):
            sys.modules.pop(name, None)
