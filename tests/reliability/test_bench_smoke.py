"""`make bench` finds every benchmark: each bench/bench_*.py imports and exposes
``run(quick: bool = False)``. (Running them, even in quick mode, is too slow for CI.)"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("bench_*.py"))


def test_the_suite_has_the_reliability_benchmark() -> None:
    assert "bench_reliability" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_exposes_run(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    params = inspect.signature(module.run).parameters
    assert "quick" in params and params["quick"].default is False
