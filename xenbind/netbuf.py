"""Output buffering on a real dom0: Linux's ``plug`` qdisc, driven by netlink.

What Remus did (tools/hotplug/Linux/remus-netbuf-setup + libxl_netbuffer.c):
the guest's transmitted packets arrive in dom0 as *ingress* traffic on its
backend interface ``vif<domid>.<devid>``. An ingress qdisc on the vif redirects
every packet to an IFB device, and the IFB's root qdisc is ``plug``, whose three
operations are exactly the buffer the Domain interface exposes. Every step is
an rtnetlink request on one IPRoute socket (pyroute2) opened at setup; the
``tc``/``ip`` equivalent is given beside each:

    setup (first barrier)   ip link add name <ifb> type ifb; ip link set dev <ifb> up
                            tc qdisc replace dev <ifb> root handle 1: plug [limit BYTES]
                            tc qdisc replace dev <vif> ingress
                            tc filter replace dev <vif> parent ffff: pref 10 protocol all
                               u32 match u32 0 0 action mirred egress redirect dev <ifb>
    output_barrier          tc qdisc change dev <ifb> root handle 1: plug block
                            (TCQ_PLUG_BUFFER: packets after this wait for a release)
    output_release          tc qdisc change dev <ifb> root handle 1: plug release
                            (TCQ_PLUG_RELEASE_ONE: up to the oldest barrier)
    output_unplug           tc qdisc change dev <ifb> root handle 1: plug release_indefinite
                            then the redirect and the IFB are removed

Rules:
- IFB names are ``rifb<domid>.<devid>`` (<= 15 characters, IFNAMSIZ).
- Barrier and release, the two per-epoch operations, are RTM_NEWQDISC messages
  encoded once at setup (pyroute2's ``tcmsg`` encoder, its ``plug`` options)
  and sent as they are, with a fresh sequence number, on the IPRoute socket;
  the kernel's ACK is read back from the same socket. No process, no asyncio
  round (pyroute2's ``IPRoute.tc()`` costs ~0.2 ms a call, bench/netbuf.py).
  One ``send`` carries the messages of all the domain's vifs.
- pyroute2's ``plug`` kind maps ``action`` by the kernel constant's *name*
  (``"TCQ_PLUG_RELEASE_ONE"``); any other value, ``"release_one"`` or ``1``
  included, silently becomes TCQ_PLUG_BUFFER, and it always sends a ``limit``
  (0 when none is given: a qdisc created so drops every packet). The plug is
  therefore created here without options when no limit is asked, which gives
  the kernel's default (tx_queue_len x (MTU + link header) bytes), exactly as
  ``tc qdisc add ... plug`` does; with ``limit_bytes`` it carries
  TCQ_PLUG_LIMIT and the limit, as ``tc ... plug limit BYTES`` does.
- Every request has a timeout; a failing one raises DomainError naming the
  domain, the operation and the vif, with the kernel's errno and message
  (extended ACK). ``sch_plug`` missing from the kernel is reported as such.
- A domain with no vif has no network output: the operations do nothing.
- Calls may come from several threads (barrier from the epoch, release from
  the acknowledgement, unplug from a close): one lock serialises them.
- Differences from Remus: all protocols are redirected (Remus redirected IP
  only, letting ARP pass).
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink import (  # type: ignore[import-untyped]
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
)
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl import RTM_NEWQDISC, TC_H_ROOT  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.tcmsg import tcmsg  # type: ignore[import-untyped]

from .errors import DomainError

#: Seconds any single netlink request (or batch of them) may take.
COMMAND_TIMEOUT = 5.0
_VIF_RE = re.compile(r"^vif(\d+)\.(\d+)$")
SYS_CLASS_NET = "/sys/class/net"

#: linux/pkt_sched.h, struct tc_plug_qopt.action
TCQ_PLUG_BUFFER = 0
TCQ_PLUG_RELEASE_ONE = 1
TCQ_PLUG_RELEASE_INDEFINITE = 2
TCQ_PLUG_LIMIT = 3
#: the names pyroute2's plug kind maps (pyroute2.netlink.rtnl.tcmsg.sched_plug.actions)
PLUG_ACTION_NAMES = {
    TCQ_PLUG_BUFFER: "TCQ_PLUG_BUFFER",
    TCQ_PLUG_RELEASE_ONE: "TCQ_PLUG_RELEASE_ONE",
    TCQ_PLUG_RELEASE_INDEFINITE: "TCQ_PLUG_RELEASE_INDEFINITE",
    TCQ_PLUG_LIMIT: "TCQ_PLUG_LIMIT",
}
#: the root plug qdisc's handle, 1:
PLUG_HANDLE = 0x10000
#: the u32 redirect's priority (tc's "pref 10") and protocol (ETH_P_ALL)
REDIRECT_PRIO = 10
ETH_P_ALL = 0x0003

_NLMSG_ERROR = 2
_NLM_F_CAPPED = 0x100
_NLM_F_ACK_TLVS = 0x200
_NLMSGERR_ATTR_MSG = 1
_HDR = struct.Struct("=IHHII")  # struct nlmsghdr
_SEQ_FIRST = 0x10000000  # above pyroute2's own sequence numbers (0xff..0xffff)
_SEQ_LAST = 0x7FFFFFFF


def vifs_of(domid: int, sys_class_net: str = SYS_CLASS_NET) -> list[str]:
    """The backend interfaces ``vif<domid>.<devid>`` present in this dom0."""
    try:
        names = os.listdir(sys_class_net)
    except OSError:
        return []
    found = []
    for name in names:
        m = _VIF_RE.match(name)
        if m and int(m.group(1)) == domid:
            found.append((int(m.group(2)), name))
    return [name for _, name in sorted(found)]


def ifb_name(vif: str) -> str:
    """The IFB device that buffers ``vif``'s output."""
    m = _VIF_RE.match(vif)
    name = f"rifb{m.group(1)}.{m.group(2)}" if m else "rifb-" + vif
    if len(name) > 15:
        raise ValueError(f"interface name {name!r} longer than 15 characters")
    return name


def encode_qdisc(
    index: int,
    kind: str,
    options: dict[str, int] | None,
    flags: int = NLM_F_REQUEST | NLM_F_ACK,
    handle: int = PLUG_HANDLE,
    parent: int = TC_H_ROOT,
) -> bytearray:
    """One RTM_NEWQDISC message for the qdisc at ``parent`` of interface
    ``index`` (``options`` None: no TCA_OPTIONS at all). The sequence number
    is filled in at each send."""
    msg = tcmsg()
    msg["index"] = index
    msg["handle"] = handle
    msg["parent"] = parent
    attrs: list[list[Any]] = [["TCA_KIND", kind]]
    if options is not None:
        attrs.append(["TCA_OPTIONS", options])
    msg["attrs"] = attrs
    msg["header"]["type"] = RTM_NEWQDISC
    msg["header"]["flags"] = flags
    msg.encode()
    return bytearray(msg.data)


def encode_plug(index: int, action: int, limit: int = 0) -> bytearray:
    """``tc qdisc change dev <index> root handle 1: plug <action>``."""
    return encode_qdisc(index, "plug", {"action": action, "limit": limit})


class NetlinkFailure(Exception):
    """The kernel refused one message of a batch (or did not answer)."""

    def __init__(self, index: int, code: int, message: str) -> None:
        if code > 0:
            text = os.strerror(code) + (f": {message}" if message else "") + f" (errno {code})"
        else:
            text = message or "no answer"
        super().__init__(text)
        self.index = index  # which message of the batch
        self.code = code
        self.message = message


class NetlinkChannel:
    """Pre-encoded rtnetlink requests on an open IPRoute socket.

    ``request(msgs)`` sends them in one ``send`` and reads one ACK per message
    (NLM_F_ACK); anything else on the socket (a late reply to another
    sequence number) is skipped. Not thread-safe on its own (callers lock).
    """

    def __init__(self, ipr: Any) -> None:
        # the same kernel socket as the IPRoute (a dup of its descriptor), so
        # it works from whichever thread calls, whatever pyroute2's
        # thread-local state; pyroute2 reads it only inside its own calls.
        base = ipr.asyncore.socket
        self._sock = socket.socket(fileno=os.dup(base.fileno()))
        self._sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self._sock.fileno(), select.POLLIN)
        self._seq = _SEQ_FIRST
        self._buf = bytearray(65536)

    def close(self) -> None:
        self._sock.close()

    def request(self, msgs: Sequence[bytearray], timeout: float = COMMAND_TIMEOUT) -> None:
        """Send ``msgs``; raise NetlinkFailure for the first one refused."""
        pending: dict[int, int] = {}
        for i, m in enumerate(msgs):
            self._seq = self._seq + 1 if self._seq < _SEQ_LAST else _SEQ_FIRST
            struct.pack_into("=I", m, 8, self._seq)
            pending[self._seq] = i
        data = msgs[0] if len(msgs) == 1 else b"".join(msgs)
        self._sock.send(data)
        failed: NetlinkFailure | None = None
        deadline = 0.0
        view = memoryview(self._buf)
        while pending:
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                now = time.monotonic()
                if not deadline:
                    deadline = now + timeout
                if now >= deadline or not self._poll.poll(max(1, int((deadline - now) * 1e3))):
                    if failed is None:
                        failed = NetlinkFailure(
                            min(pending.values()), 0, f"no answer within {timeout}s"
                        )
                    break
                continue
            off = 0
            while off + _HDR.size <= n:
                length, typ, flags, seq, _pid = _HDR.unpack_from(view, off)
                if length < _HDR.size:
                    break
                if typ == _NLMSG_ERROR and seq in pending:
                    i = pending.pop(seq)
                    (err,) = struct.unpack_from("=i", view, off + 16)
                    if err and failed is None:
                        failed = NetlinkFailure(i, -err, _extack_message(view, off, length, flags))
                off += (length + 3) & ~3
        if failed is not None:
            raise failed


def _extack_message(view: memoryview, off: int, length: int, flags: int) -> str:
    """NLMSGERR_ATTR_MSG of an extended ACK ('' when there is none)."""
    if not flags & _NLM_F_ACK_TLVS:
        return ""
    pos = off + 20  # after the header and the error code: the request's header
    if flags & _NLM_F_CAPPED:
        pos += _HDR.size
    else:
        (orig_len,) = struct.unpack_from("=I", view, pos)
        pos += (orig_len + 3) & ~3
    end = off + length
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("=HH", view, pos)
        if alen < 4:
            break
        if atype & 0x3FFF == _NLMSGERR_ATTR_MSG:
            return bytes(view[pos + 4 : pos + alen]).split(b"\0", 1)[0].decode(errors="replace")
        pos += (alen + 3) & ~3
    return ""


class OutputBuffer:
    """The plug qdisc buffer of one domain's vifs."""

    def __init__(self, domid: int, vifs: list[str], limit_bytes: int | None = None) -> None:
        self.domid = domid
        self.vifs = list(vifs)
        self.ifbs = [ifb_name(v) for v in self.vifs]
        self.limit_bytes = limit_bytes
        self._lock = threading.RLock()
        self._ipr: Any = None
        self._chan: NetlinkChannel | None = None
        self._msgs: dict[int, list[bytearray]] = {}
        self._ready = False

    @classmethod
    def for_domain(cls, domid: int, limit_bytes: int | None = None) -> OutputBuffer:
        return cls(domid, vifs_of(domid), limit_bytes)

    # -- errors ------------------------------------------------------------

    def _fail(self, vif: str, op: str, exc: BaseException) -> DomainError:
        if isinstance(exc, NetlinkError):
            code = int(exc.code) if isinstance(exc.code, int) else 0
            text = str(exc.args[1]) if len(exc.args) > 1 else ""
            exc = NetlinkFailure(0, code, text)
        msg = str(exc) or type(exc).__name__
        if "plug" in op and isinstance(exc, NetlinkFailure) and exc.code == errno.ENOENT:
            msg += " (the kernel lacks the plug qdisc: load sch_plug)"
        return DomainError(self.domid, f"{op} on {vif}", msg)

    # -- setup and teardown ------------------------------------------------

    def setup(self) -> None:
        """Create the IFBs, plug qdiscs and redirects (idempotent per object)."""
        with self._lock:
            if self._ready:
                return
            try:
                self._open()
                for vif, ifb in zip(self.vifs, self.ifbs, strict=True):
                    idx = self._add_ifb(vif, ifb)
                    self._add_plug(vif, ifb, idx)
                    self._add_redirect(vif, ifb, idx)
                    for action in (
                        TCQ_PLUG_BUFFER,
                        TCQ_PLUG_RELEASE_ONE,
                        TCQ_PLUG_RELEASE_INDEFINITE,
                    ):
                        self._msgs.setdefault(action, []).append(encode_plug(idx, action))
            except DomainError:
                self._teardown()  # leave no half-built redirect behind
                raise
            self._ready = True

    def _open(self) -> None:
        if self._ipr is not None:
            return
        try:
            self._ipr = IPRoute(ext_ack=True)
            self._chan = NetlinkChannel(self._ipr)
        except (OSError, NetlinkError) as exc:
            raise DomainError(self.domid, "open rtnetlink socket", str(exc)) from exc

    @staticmethod
    def _index(ipr: Any, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def _add_ifb(self, vif: str, ifb: str) -> int:
        """``ip link add name <ifb> type ifb; ip link set dev <ifb> up``."""
        try:
            idx = self._index(self._ipr, ifb)
            if idx is None:
                self._ipr.link("add", ifname=ifb, kind="ifb")
                idx = self._index(self._ipr, ifb)
                if idx is None:
                    raise NetlinkFailure(0, errno.ENODEV, f"{ifb} vanished after its creation")
            self._ipr.link("set", index=idx, state="up")
            return idx
        except (OSError, NetlinkError, NetlinkFailure) as exc:
            raise self._fail(vif, f"create {ifb}", exc) from exc

    def _add_plug(self, vif: str, ifb: str, idx: int) -> None:
        """``tc qdisc replace dev <ifb> root handle 1: plug [limit BYTES]``."""
        opts = None
        if self.limit_bytes:
            opts = {"action": TCQ_PLUG_LIMIT, "limit": int(self.limit_bytes)}
        msg = encode_qdisc(
            idx, "plug", opts, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        )
        try:
            assert self._chan is not None
            self._chan.request([msg])
        except (OSError, NetlinkFailure) as exc:
            raise self._fail(vif, f"add plug qdisc to {ifb}", exc) from exc

    def _add_redirect(self, vif: str, ifb: str, ifb_idx: int) -> None:
        """The vif's ingress qdisc and its u32 match-all filter redirecting
        every packet (protocol all) to the IFB's egress."""
        try:
            vidx = self._index(self._ipr, vif)
            if vidx is None:
                raise NetlinkFailure(0, errno.ENODEV, f"no interface {vif}")
            self._ipr.tc("replace", "ingress", vidx, 0xFFFF0000)
            self._ipr.tc(
                "replace-filter",
                "u32",
                vidx,
                parent=0xFFFF0000,
                prio=REDIRECT_PRIO,
                protocol=ETH_P_ALL,
                target=0,
                keys=["0x0/0x0+0"],
                action={
                    "kind": "mirred",
                    "direction": "egress",
                    "action": "redirect",
                    "ifindex": ifb_idx,
                },
            )
        except (OSError, NetlinkError, NetlinkFailure) as exc:
            raise self._fail(vif, f"redirect ingress to {ifb}", exc) from exc

    # -- the buffer --------------------------------------------------------

    def _plug(self, action: int, op: str) -> None:
        msgs = self._msgs.get(action, [])
        if not msgs:
            return
        assert self._chan is not None
        what = f"{op} (plug {PLUG_ACTION_NAMES[action]})"
        try:
            self._chan.request(msgs)
        except NetlinkFailure as exc:
            raise self._fail(self.vifs[exc.index], what, exc) from exc
        except OSError as exc:
            raise self._fail(",".join(self.vifs), what, exc) from exc

    def barrier(self) -> None:
        """Output from here on waits for the next release (TCQ_PLUG_BUFFER).
        A domain without vifs has no output to hold: nothing is opened (the
        barrier runs inside the guest's pause)."""
        if not self.vifs:
            return
        with self._lock:
            self.setup()
            self._plug(TCQ_PLUG_BUFFER, "barrier")

    def release(self) -> None:
        """Let out everything up to the oldest barrier (TCQ_PLUG_RELEASE_ONE)."""
        with self._lock:
            if not self._ready:
                return
            self._plug(TCQ_PLUG_RELEASE_ONE, "release")

    def unplug(self) -> None:
        """Release everything, stop buffering, remove the redirect and IFBs."""
        with self._lock:
            if not self._ready:
                return
            try:
                self._plug(TCQ_PLUG_RELEASE_INDEFINITE, "unplug")
            finally:
                self._ready = False
                self._teardown()

    def _teardown(self) -> None:
        """Remove the redirects and IFBs and close the socket; errors are
        ignored (the vif may be gone with its domain, or the step was never
        reached)."""
        self._msgs = {}
        ipr, self._ipr = self._ipr, None
        chan, self._chan = self._chan, None
        if chan is not None:
            chan.close()
        if ipr is None:
            return
        try:
            for vif, ifb in zip(self.vifs, self.ifbs, strict=True):
                try:
                    vidx = self._index(ipr, vif)
                    if vidx is not None:
                        ipr.tc("del", "ingress", vidx, 0xFFFF0000)
                except (OSError, NetlinkError):
                    pass
                try:
                    iidx = self._index(ipr, ifb)
                    if iidx is not None:
                        ipr.link("del", index=iidx)
                except (OSError, NetlinkError):
                    pass
        finally:
            try:
                ipr.close()
            except OSError:
                pass
