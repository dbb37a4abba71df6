"""Read what a lab run reported: result lines, stage markers, the end marker.

Lines dom0 writes (on the serial console, possibly with other output around
them, and one per line in the results file without the ``LAB-RESULT`` prefix):

    LAB-STAGE <text>                     progress, shown live by the runner
    LAB-RESULT PASS <name>: <detail>     one check passed
    LAB-RESULT FAIL <name>: <detail>     one check failed
    LAB-DONE                             dom0 finished and is about to reboot

Rules: a name is ``[A-Za-z0-9_.-]+``; a later result for the same name
replaces an earlier one (the serial log may repeat a line the results file
also has); a run passes only when it finished (LAB-DONE seen), reported at
least one result, and every result is PASS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RESULT_RE = re.compile(r"^(PASS|FAIL) ([A-Za-z0-9_.-]+): ?(.*?)\s*$")
SERIAL_RESULT_RE = re.compile(r"LAB-RESULT (PASS|FAIL) ([A-Za-z0-9_.-]+): ?(.*?)\s*$")
STAGE_RE = re.compile(r"LAB-STAGE (.*?)\s*$")
DONE_MARK = "LAB-DONE"
NOTE_MARK = "LAB-NOTE "  # dom0.sh: a step run again after a guest crash


@dataclass(frozen=True)
class Result:
    status: str  # "PASS" or "FAIL"
    name: str
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == "PASS"

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


def _collect(text: str, pattern: re.Pattern[str]) -> list[Result]:
    by_name: dict[str, Result] = {}
    for raw in text.splitlines():
        m = pattern.search(raw.replace("\r", ""))
        if m:
            r = Result(m.group(1), m.group(2), m.group(3))
            by_name.pop(r.name, None)  # keep first-seen order of the latest line
            by_name[r.name] = r
    return list(by_name.values())


def parse_serial(text: str) -> list[Result]:
    """Results in a serial console log (only ``LAB-RESULT`` lines count)."""
    return _collect(text, SERIAL_RESULT_RE)


def parse_results_file(text: str) -> list[Result]:
    """Results in dom0's results file (``PASS name: detail`` lines)."""
    return _collect(text, RESULT_RE)


def stages(text: str) -> list[str]:
    return [m.group(1) for m in map(STAGE_RE.search, text.splitlines()) if m]


def notes(text: str) -> list[str]:
    """``LAB-NOTE`` lines of a serial log: what dom0.sh says it did besides
    the checks (a step run again on a new guest after the guest crashed)."""
    out = []
    for line in text.splitlines():
        i = line.find(NOTE_MARK)
        if i >= 0:
            out.append(line[i + len(NOTE_MARK) :].strip())
    return out


def finished(text: str) -> bool:
    return any(line.strip().endswith(DONE_MARK) for line in text.splitlines())


def merge(primary: list[Result], extra: list[Result]) -> list[Result]:
    """``primary`` plus the results of ``extra`` whose names it lacks."""
    names = {r.name for r in primary}
    return primary + [r for r in extra if r.name not in names]


def verdict(results: list[Result], done: bool) -> bool:
    """True when the run counts as passed."""
    return done and bool(results) and all(r.passed for r in results)
