"""The project's benchmarks (``python -m bench.NAME``): each prints its tables
and saves its figures as JSON under bench/results/ (docs/performance.md)."""

from __future__ import annotations

import json
import os
from typing import Any


def load_average() -> float | None:
    """The 1-minute load average (recorded beside every figure: the machines are shared)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def save_json(result: Any, path: str) -> None:
    """Write a benchmark's result to ``path`` (its directory made) and say where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"JSON: {path}")
