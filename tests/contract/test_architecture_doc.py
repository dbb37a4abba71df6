"""docs/architecture.md shows the daemons' four state tables as the code has them.

The tables live once, in code (receiver.policy.TABLE, receiver.core.CORE_TABLE,
remusd.policy.TABLE, remusd.core.TABLE); the page shows each rendered by
``render()`` below, and this test fails when a row changes in one place only.
``python -m tests.contract.test_architecture_doc`` prints the four tables to
paste into the page after a change.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import pytest

from receiver import core as rx_core
from receiver import policy as rx_policy
from remusd import core as tx_core
from remusd import policy as tx_policy

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _name(x: object) -> str:
    return str(x.value) if isinstance(x, Enum) else str(x)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render() -> dict[str, str]:
    """Each table as Markdown, keyed by the name the page gives it."""
    receiver_policy = _table(
        ["state", "event", "new state", "timer armed", "actions"],
        [
            [s, e, new, "yes" if armed else "no", ", ".join(acts) or "-"]
            for (s, e), (new, armed, acts) in rx_policy.TABLE.items()
        ],
    )
    receiver_core = _table(
        ["state", "event", "new state"],
        [[s, e, new] for (s, e), new in rx_core.CORE_TABLE.items()],
    )
    sender_policy = _table(
        ["state", "event", "new state", "actions"],
        [
            [_name(s), _name(e), _name(new), ", ".join(_name(a) for a in acts) or "-"]
            for (s, e), (new, acts) in tx_policy.TABLE.items()
        ],
    )
    sender_core = _table(
        ["state", "move", "new state"],
        [[_name(s), _name(m), _name(new)] for (s, m), new in tx_core.TABLE.items()],
    )
    return {
        "receiver.policy.TABLE": receiver_policy,
        "receiver.core.CORE_TABLE": receiver_core,
        "remusd.policy.TABLE": sender_policy,
        "remusd.core.TABLE": sender_core,
    }


@pytest.mark.parametrize("name", sorted(render()))
def test_the_page_shows_the_table_as_the_code_has_it(name):
    text = DOC.read_text()
    assert f"<!-- {name} -->\n{render()[name]}\n" in text, (
        f"docs/architecture.md does not show {name} as the code has it: run "
        "`python -m tests.contract.test_architecture_doc` and paste its output"
    )


def test_every_row_is_rendered():
    # the renderer could drop rows and the check above would still pass
    counts = {
        "receiver.policy.TABLE": len(rx_policy.TABLE),
        "receiver.core.CORE_TABLE": len(rx_core.CORE_TABLE),
        "remusd.policy.TABLE": len(tx_policy.TABLE),
        "remusd.core.TABLE": len(tx_core.TABLE),
    }
    for name, table in render().items():
        assert len(table.splitlines()) == counts[name] + 2, name


if __name__ == "__main__":
    for name, table in render().items():
        print(f"<!-- {name} -->\n{table}\n")
