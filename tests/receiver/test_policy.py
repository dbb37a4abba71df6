"""receiver.policy: every row of the table, an illegal move, and that no
other receiver module assigns a Protection's state or armed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from receiver import policy


@dataclass
class _Prot:
    state: str
    armed: bool = False


@pytest.mark.parametrize(("state", "event"), sorted(policy.TABLE))
def test_every_row(state: str, event: str) -> None:
    new, armed, actions = policy.TABLE[(state, event)]
    p = _Prot(state, armed=not armed)  # the row sets armed whatever it was
    assert policy.advance(p, event) == actions
    assert (p.state, p.armed) == (new, armed)
    assert new in policy.STATES and state in policy.STATES


def test_an_illegal_move_is_refused_and_changes_nothing() -> None:
    p = _Prot(policy.FAILED_OVER, armed=False)
    with pytest.raises(policy.IllegalMove, match=r"'committed'.*'failed-over'"):
        policy.advance(p, "committed")
    assert (p.state, p.armed) == (policy.FAILED_OVER, False)
    assert not policy.allows(policy.GONE, "resumed")


@dataclass(frozen=True)
class _Cfg:
    on_link_loss: str = "failover"
    on_violation: str = "wait"
    on_unprotect: str = "destroy"


@pytest.mark.parametrize(
    ("state", "kind", "cfg", "stopping", "event"),
    [
        ("initial-copy", "admission", _Cfg(), False, "admission-failed"),
        ("initial-copy", "link-lost", _Cfg(), False, "copy-lost"),
        ("receiving", "clean", _Cfg(), False, "clean[destroy]"),
        ("receiving", "clean", _Cfg(on_unprotect="keep"), False, "clean[keep]"),
        ("receiving", "corrupt", _Cfg(), False, "corrupt"),
        ("receiving", "violation", _Cfg(), False, "violation[wait]"),
        ("receiving", "violation", _Cfg(on_violation="failover"), False, "violation[failover]"),
        # a stop of the receiver ends sessions as a stop, whatever the end
        # looked like (issue 12, defect 7: no "broke the protocol" at SIGTERM)
        ("receiving", "violation", _Cfg(on_violation="failover"), True, "stopping"),
        ("receiving", "closed", _Cfg(), True, "stopping"),
        ("receiving", "link-lost", _Cfg(), True, "stopping"),
        ("receiving", "stalled", _Cfg(), False, "link-lost[failover]"),
        ("receiving", "closed", _Cfg(on_link_loss="wait"), False, "link-lost[wait]"),
    ],
)
def test_end_events_name_a_row(state, kind, cfg, stopping, event) -> None:
    assert policy.end_event(state, kind, cfg, stopping) == event
    assert policy.allows(state, event)


def test_silence_events_name_a_row() -> None:
    for state in policy.FAILOVER_STATES:
        for loss in ("failover", "wait"):
            assert policy.allows(state, policy.silence_event(state, _Cfg(on_link_loss=loss)))


def test_only_the_policy_assigns_state_and_armed() -> None:
    for path in Path(policy.__file__).parent.glob("*.py"):
        if path.name in ("policy.py", "core.py"):  # core.py: the session's own state
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"prot\w*\.(state|armed)\s*=[^=]|old\.(state|armed)\s*=[^=]", code):
                pytest.fail(f"{path.name}:{n}: {line.strip()}")


def test_with_a_witness_silence_challenges_before_any_failover() -> None:
    """issue 14: with a witness, no silence event fails over by itself; only
    witness-won does, and a refusal keeps the domain armed in its state."""
    for state in policy.FAILOVER_STATES:
        event = policy.silence_event(state, _Cfg(), witness=True)
        assert event == "silent[witness]"
        p = _Prot(state)
        assert policy.advance(p, event) == (policy.CHALLENGE,)
        assert p.armed and p.state == state
        assert policy.advance(p, "witness-refused") == ()
        assert p.armed and p.state == state
        assert policy.advance(p, "witness-won") == (policy.FAILOVER,)
        assert policy.advance(p, "resumed") == (policy.CLOSE_FAILED_OVER,)
        assert p.state == policy.FAILED_OVER
    # on-link-loss = wait: an open, silent session is still only closed as stalled
    assert policy.silence_event(policy.RECEIVING, _Cfg(on_link_loss="wait"), True) == "silent[wait]"
    # every row of the table is in the docstring's table
    doc = policy.__doc__ or ""
    for state, event in policy.TABLE:
        assert re.search(rf"^\s+{re.escape(state)}\s+{re.escape(event)}\s", doc, re.M), (
            state,
            event,
        )


def test_input_waiting_unread_is_not_the_primarys_silence():
    """The failover timer's peek (ReceiverDaemon._input_waiting): bytes the
    session thread has not read yet (it is busy, e.g. in a slow commit) are a
    sign of life; nothing waiting, a closed connection or a session that is no
    longer receiving are not."""
    import socket
    from types import SimpleNamespace

    from daemonkit.transport import PlainTransport
    from receiver.daemon import ReceiverDaemon
    from receiver.protection import Protection
    from xenbind.session import Hello, Options
    from xenbind.types import DomainConfig

    hello = Hello(
        "ab" * 16, Options(), DomainConfig("g", "12345678-9abc-def0-1234-56789abcdef0", 4, 1)
    )
    prot = Protection(hello=hello, peer="test", failover_timeout=0.5)
    prot.state = policy.RECEIVING
    a, b = socket.socketpair()
    try:
        prot.connection = SimpleNamespace(t=PlainTransport(a))  # type: ignore[assignment]
        assert not ReceiverDaemon._input_waiting(prot)
        b.sendall(b"\xfd\xfc\xff\xff")  # a HEARTBEAT chunk, unread
        assert ReceiverDaemon._input_waiting(prot)
        prot.state = policy.LINK_LOST
        assert not ReceiverDaemon._input_waiting(prot)
        prot.state = policy.RECEIVING
        a.close()
        assert not ReceiverDaemon._input_waiting(prot)
    finally:
        a.close()
        b.close()
