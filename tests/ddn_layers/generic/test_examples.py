"""The examples run as a user runs them, one command each, and report what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import ddn_layers as ddn
from tests.ddn_layers.generic.helpers import EXAMPLES, ROOT


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="error::UserWarning")
    done = subprocess.run(
        [sys.executable, f"examples/{name}.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ddn.BackwardMode.choices()
    for line in lines:
        # the last number of a line is its error against the reference; approx on pooling
        # differs by design (a different approximation from the built-in layer's)
        if name == "robust_pooling" and line.startswith("approx"):
            continue
        error = float(re.findall(r"\d\.\de[-+]\d+", line)[-1])
        assert error < 1e-6, line
