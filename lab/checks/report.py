"""Report one in-lab check: a line on the console and one in the results file.

    console (stdout):            LAB-RESULT PASS|FAIL <name>: <detail>
    $LAB_RESULTS/results.txt:    PASS|FAIL <name>: <detail>

Rules: a check is a function that returns its detail string when it passed
and raises (anything) when it failed; ``run_check`` turns both into exactly
one result line, so a crashing check is a FAIL with the exception's text, and
never stops the checks after it. Details are one line.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable


class CheckFailed(Exception):
    """A check's own assertion failed; the message is the detail."""


def require(cond: object, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


def emit(status: str, name: str, detail: str) -> None:
    detail = " ".join(detail.split())
    print(f"LAB-RESULT {status} {name}: {detail}", flush=True)
    results = os.environ.get("LAB_RESULTS")
    if results and os.path.isdir(results):
        with open(os.path.join(results, "results.txt"), "a") as f:
            f.write(f"{status} {name}: {detail}\n")


def run_check(name: str, fn: Callable[[], str]) -> bool:
    """Run ``fn``; emit PASS with its return value, or FAIL with the error."""
    t0 = time.monotonic()
    try:
        detail = fn()
    except CheckFailed as e:
        emit("FAIL", name, f"{e} ({time.monotonic() - t0:.1f}s)")
        return False
    except Exception as e:  # noqa: BLE001 - any crash is this check's FAIL
        traceback.print_exc()
        emit("FAIL", name, f"{type(e).__name__}: {e} ({time.monotonic() - t0:.1f}s)")
        return False
    emit("PASS", name, f"{detail} ({time.monotonic() - t0:.1f}s)")
    return True
