"""The project's exception types.

Every error a peer, a file or an operator can provoke surfaces as one of these,
never as IndexError, struct.error or a bare OSError from deep inside. Each
carries what an operator needs to act: the byte offset of a bad stream, the
domain and operation that failed.
"""

from __future__ import annotations


class RemusError(Exception):
    """Base of every error this project raises on purpose."""


class StreamError(RemusError):
    """A checkpoint stream broke a rule of the format.

    ``offset`` is the absolute byte offset in the stream where the offending
    item starts (or where the stream ended, for truncation).
    """

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"byte {offset}: {reason}")
        self.offset = offset
        self.reason = reason


class CodecError(RemusError):
    """Compressed page data that does not decode to whole, valid pages."""


class DomainError(RemusError):
    """An operation on a domain failed; names the domain and the operation."""

    def __init__(self, domain: int | str | None, op: str, reason: str) -> None:
        who = f"domain {domain}" if domain is not None else "hypervisor"
        super().__init__(f"{who}: {op}: {reason}")
        self.domain = domain
        self.op = op
        self.reason = reason


class HypervisorUnavailable(DomainError):
    """The hypervisor interface cannot be opened here (e.g. not a dom0)."""

    def __init__(self, reason: str) -> None:
        super().__init__(None, "open", reason)


class ProtocolError(RemusError):
    """The session protocol around the stream (handshake, acks) was broken."""


class ConfigError(RemusError):
    """Bad configuration or command-line input."""
