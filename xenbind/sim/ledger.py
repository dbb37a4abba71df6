"""The ``ledger`` guest: a small bank in guest memory, and its checker.

Guest memory layout (little-endian; usable pages exclude the 3 magic pages)::

    page 0              header
        0   8s  magic            b"LEDGER01"
        8   u64 accounts         n
        16  u64 log_capacity     entries the log area holds
        24  u64 total            sum of all balances (never changes)
        32  u64 initial_balance  every account's balance before transaction 0
        40  u64 tx_count         entries in the log (written last in a transaction)
        48  u64 seed
    pages 1 .. B        balances: int64[n]            (B = ceil(8n / 4096))
    pages B+1 ..        log: log_capacity entries of 32 bytes
        0   u64 txid             == index in the log
        8   u32 from             account debited
        12  u32 to               account credited (!= from)
        16  u64 amount           0 .. balance(from)//4 at the time
        24  u64 check            entry_check(seed, txid, from, to, amount)

Transaction ``t`` (one workload step): from = h(seed,t,0) % n, to = a
different account from h(seed,t,1), amount = h(seed,t,2) % (balance[from]//4
+ 1); debit, credit, write log[t], then tx_count = t + 1; then emit the
acknowledgement line ``ack <txid> <from> <to> <amount>\\n`` (the guest's
network output). When the log is full the guest stops transacting.

Disk journal (a domain with a disk: disk 0, through the guest's NBD
connection, xenbind.sim.disk). ``S = journal_slots(disk size)`` = min(size //
512, 65536) slots of 512 bytes from byte 0; transaction ``t`` is written to
slot ``t % S`` *before* the transaction touches memory and so before it is
acknowledged (the write has completed on the block server when ``pwrite``
returns). A slot never written is all zeros. A record::

    0   8s  magic   b"LEDGJRN1"
    8   u64 txid
    16  u32 from
    20  u32 to
    24  u64 amount
    32  u64 check   entry_check(seed, txid, from, to, amount), as in the log
    40  u64 seed
    48  ..  zeros
    508 u32 CRC-32 of bytes 0..507

A journal write that fails crashes the guest (its disk vanished) with the
transaction not done: nothing of it in memory, nothing acknowledged. Without
a disk the ledger is exactly what it was: no journal.

Invariants ``check_ledger`` verifies (on a paused or dead domain's memory):
header well-formed; total == n * initial_balance == sum(balances); no
negative balance; every entry below tx_count well-formed (txid, accounts in
range, check word), every entry at or past tx_count zero; replaying the log
from the initial balances gives exactly the current balances; every
acknowledged transaction given is in the log with the same fields. With the
disk's journal (``journal=``): every slot ``s`` holds exactly the record of
the largest txid below tx_count with ``txid % S == s`` (built from the
memory's log entry), or zeros when no such txid exists; so the disk is
neither behind the memory (a slot empty or holding an older txid), nor ahead
of it (a txid at or past tx_count), nor corrupted (bad magic or CRC, fields
that differ from the log). Acknowledged transactions are in the log, the log
agrees with the journal: the journal holds every acknowledged transaction
it still has room for.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable
from typing import cast

import numpy as np

from .. import PAGE_SIZE
from .disk import SECTOR, DiskError, GuestDisk
from .workloads import Marker, Registers, RegistersError, h64, mix64

MAGIC = b"LEDGER01"
HEADER_FORMAT = "<8sQQQQQQ"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)
TX_COUNT_OFFSET = 40
ENTRY_FORMAT = "<QIIQQ"
ENTRY_SIZE = struct.calcsize(ENTRY_FORMAT)  # 32
INITIAL_BALANCE = 1000
ENTRY_DTYPE = np.dtype(
    [("txid", "<u8"), ("src", "<u4"), ("dst", "<u4"), ("amount", "<u8"), ("check", "<u8")]
)
_M64 = (1 << 64) - 1

JOURNAL_MAGIC = b"LEDGJRN1"
JOURNAL_FORMAT = "<8sQIIQQQ"
JOURNAL_FIELDS = struct.calcsize(JOURNAL_FORMAT)  # 48
JOURNAL_RECORD = SECTOR  # 512
JOURNAL_CRC_OFFSET = JOURNAL_RECORD - 4
JOURNAL_MAX_SLOTS = 1 << 16  # 32 MiB of journal at most, whatever the disk's size
JOURNAL_DTYPE = np.dtype(
    {
        "names": ["magic", "txid", "src", "dst", "amount", "check", "seed", "crc"],
        "formats": ["S8", "<u8", "<u4", "<u4", "<u8", "<u8", "<u8", "<u4"],
        "offsets": [0, 8, 16, 20, 24, 32, 40, JOURNAL_CRC_OFFSET],
        "itemsize": JOURNAL_RECORD,
    }
)


def journal_slots(disk_size: int) -> int:
    """How many journal slots a disk of ``disk_size`` bytes holds."""
    return min(disk_size // JOURNAL_RECORD, JOURNAL_MAX_SLOTS)


def journal_record(seed: int, txid: int, src: int, dst: int, amount: int) -> bytes:
    """The 512-byte journal record of one transaction."""
    head = struct.pack(
        JOURNAL_FORMAT,
        JOURNAL_MAGIC,
        txid,
        src,
        dst,
        amount,
        entry_check(seed, txid, src, dst, amount),
        seed,
    )
    body = head + bytes(JOURNAL_CRC_OFFSET - len(head))
    return body + struct.pack("<I", zlib.crc32(body))


def entry_check(seed: int, txid: int, src: int, dst: int, amount: int) -> int:
    return mix64(h64(seed, txid, 3) ^ (src << 32 | dst) ^ ((amount * 0x9E3779B97F4A7C15) & _M64))


def _entry_check_v(seed: int, e: np.ndarray) -> np.ndarray:
    from .workloads import h64v

    x = h64v(seed, e["txid"], 3)
    x = x ^ ((e["src"].astype(np.uint64) << np.uint64(32)) | e["dst"].astype(np.uint64))
    x = x ^ (e["amount"] * np.uint64(0x9E3779B97F4A7C15))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Layout:
    """Where things are for ``accounts`` accounts in ``usable`` pages."""

    def __init__(self, accounts: int, usable: int) -> None:
        if accounts < 2:
            raise RegistersError("a ledger needs at least 2 accounts")
        self.accounts = accounts
        self.balance_pages = -(-accounts * 8 // PAGE_SIZE)
        self.balances_off = PAGE_SIZE
        self.log_off = (1 + self.balance_pages) * PAGE_SIZE
        log_pages = usable - 1 - self.balance_pages
        if log_pages < 1:
            raise RegistersError(
                f"{accounts} accounts need at least {self.balance_pages + 2} usable pages"
            )
        self.log_capacity = log_pages * PAGE_SIZE // ENTRY_SIZE


class LedgerWorkload:
    """Runs transactions against guest memory (Python loop: each reads balances)."""

    max_batch = 64  # ~5 us per transaction: a batch stays well under 1 ms
    emits_output = True
    #: asked every SLICE transactions of a batch (set by the worker): a request
    #: waits for the guest; the batch ends there, so that a pause or an output
    #: release is answered within ~SLICE transactions, not a whole batch (Xen
    #: pauses a vCPU at once; dom0 releases output without the guest)
    interrupted: Callable[[], bool] | None = None
    SLICE = 16

    def __init__(self, regs: Registers, usable: int, disk: GuestDisk | None = None) -> None:
        self.usable = usable
        self.disk = disk
        #: why the guest's disk failed it (set by run; the worker crashes the guest)
        self.disk_failure: str | None = None
        if disk is not None:
            self.slots = journal_slots(disk.size)
            self.max_batch = 8  # + a ~50 us journal write each
        self.reset(regs)

    def reset(self, regs: Registers) -> None:
        self.regs = regs
        self.layout = Layout(int(regs.a), self.usable)

    def init_memory(self, mem64: np.ndarray) -> None:
        lay = self.layout
        buf = memoryview(mem64).cast("B")  # type: ignore[arg-type]  # numpy: Buffer on 3.12+ only
        n = lay.accounts
        struct.pack_into(
            HEADER_FORMAT,
            buf,
            0,
            MAGIC,
            n,
            lay.log_capacity,
            n * INITIAL_BALANCE,
            INITIAL_BALANCE,
            0,
            self.regs.seed,
        )
        bal = mem64[lay.balances_off // 8 : lay.balances_off // 8 + n].view(np.int64)
        bal[:] = INITIAL_BALANCE

    def check_memory(self, mem64: np.ndarray) -> str | None:
        """Why this memory cannot run the ledger (None if it can)."""
        buf = memoryview(mem64).cast("B")  # type: ignore[arg-type]  # numpy: Buffer on 3.12+ only
        magic, n, cap, _total, _init, count, seed = struct.unpack_from(HEADER_FORMAT, buf, 0)
        if magic != MAGIC:
            return "guest memory holds no ledger (bad magic)"
        if n != self.layout.accounts or cap != self.layout.log_capacity or seed != self.regs.seed:
            return "ledger header does not match the registers"
        if count != self.regs.step:
            return f"ledger holds {count} transactions but the registers say {self.regs.step}"
        return None

    def pages_for(self, start: int, stop: int) -> np.ndarray:  # pragma: no cover - not page-driven
        raise NotImplementedError("ledger pages depend on memory; use the dirty bitmap")

    def run(self, mem64: np.ndarray, n: int, mark: Marker | None) -> list[bytes]:
        lay = self.layout
        regs = self.regs
        buf = memoryview(mem64).cast("B")  # type: ignore[arg-type]  # numpy: Buffer on 3.12+ only
        seed = regs.seed
        accounts = lay.accounts
        boff = lay.balances_off
        out: list[bytes] = []
        touched: list[int] = []
        t = start = regs.step
        stop = min(t + n, lay.log_capacity)
        pack_q = struct.Struct("<q")
        entry = struct.Struct(ENTRY_FORMAT)
        check = self.interrupted
        while t < stop:
            if check is not None and t != start and not (t - start) % self.SLICE and check():
                break
            src = h64(seed, t, 0) % accounts
            dst = h64(seed, t, 1) % (accounts - 1)
            if dst >= src:
                dst += 1
            so = boff + 8 * src
            do = boff + 8 * dst
            (bs,) = pack_q.unpack_from(buf, so)
            amount = h64(seed, t, 2) % (bs // 4 + 1)
            if self.disk is not None:  # journaled before anything else: see the top
                try:
                    record = journal_record(seed, t, src, dst, amount)
                    self.disk.pwrite(record, (t % self.slots) * JOURNAL_RECORD)
                except DiskError as e:
                    self.disk_failure = str(e)
                    break
            (bd,) = pack_q.unpack_from(buf, do)
            pack_q.pack_into(buf, so, bs - amount)
            pack_q.pack_into(buf, do, bd + amount)
            eo = lay.log_off + t * ENTRY_SIZE
            entry.pack_into(buf, eo, t, src, dst, amount, entry_check(seed, t, src, dst, amount))
            struct.pack_into("<Q", buf, TX_COUNT_OFFSET, t + 1)
            if mark is not None:
                touched += (so // PAGE_SIZE, do // PAGE_SIZE, eo // PAGE_SIZE)
            out.append(b"ack %d %d %d %d\n" % (t, src, dst, amount))
            t += 1
        if mark is not None and touched:
            touched.append(0)
            mark(np.array(touched, dtype=np.int64))
        regs.step = t
        regs.outputs += len(out)
        return out

    @property
    def full(self) -> bool:
        return self.regs.step >= self.layout.log_capacity


def parse_acks(
    lines: Iterable[str], source: str = "acknowledgements"
) -> list[tuple[int, int, int, int]]:
    """Parse ``ack <txid> <from> <to> <amount>`` lines; ValueError names the bad line."""
    acks = []
    for no, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 5 or parts[0] != "ack" or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(
                f"{source} line {no}: expected 'ack TXID FROM TO AMOUNT', got {line[:80]!r}"
            )
        acks.append(cast("tuple[int, int, int, int]", tuple(int(p) for p in parts[1:])))
    return acks


def check_ledger(
    mem: np.ndarray,
    usable: int,
    acked: list[tuple[int, int, int, int]] | None = None,
    journal: np.ndarray | None = None,
) -> tuple[list[str], dict]:
    """Check the ledger in guest memory ``mem`` (uint8, whole domain), and
    with ``journal`` (uint8: the first ``journal_slots(size) * 512`` bytes of
    disk 0) memory and disk against each other.

    Returns (violations, summary); no violation means every invariant holds.
    """
    problems: list[str] = []
    raw = memoryview(np.ascontiguousarray(mem[: usable * PAGE_SIZE]).reshape(-1))  # type: ignore[arg-type]  # numpy: Buffer on 3.12+ only
    if len(raw) < PAGE_SIZE:
        return ["memory is smaller than one page"], {}
    magic, n, cap, total, init, count, seed = struct.unpack_from(HEADER_FORMAT, raw, 0)
    summary = {"accounts": n, "log_capacity": cap, "total": total, "transactions": count}
    if magic != MAGIC:
        return [f"no ledger in memory: header magic {magic!r}, expected {MAGIC!r}"], summary
    try:
        lay = Layout(n, usable)
    except RegistersError as e:
        return [f"header: {e}"], summary
    if n > usable * PAGE_SIZE // 8:
        return [f"header: {n} accounts cannot fit in memory"], summary
    if cap != lay.log_capacity:
        problems.append(f"header: log capacity {cap}, the layout gives {lay.log_capacity}")
        cap = min(cap, lay.log_capacity)
    if count > cap:
        return problems + [f"header: tx_count {count} exceeds the log capacity {cap}"], summary
    if total != n * init:
        problems.append(f"header: total {total} != {n} accounts x initial balance {init}")
    words = np.frombuffer(raw, dtype="<i8")
    bal = words[lay.balances_off // 8 : lay.balances_off // 8 + n]
    s = int(bal.sum(dtype=np.int64))
    summary["sum_of_balances"] = s
    if s != total:
        problems.append(f"total broken: balances sum to {s}, the ledger's total is {total}")
    neg = np.flatnonzero(bal < 0)
    if len(neg):
        problems.append(
            f"{len(neg)} negative balances (first: account {int(neg[0])} = {int(bal[neg[0]])})"
        )
    log = np.frombuffer(raw, dtype=ENTRY_DTYPE, count=cap, offset=lay.log_off)
    used = log[:count]
    bad = np.flatnonzero(used["txid"] != np.arange(count, dtype=np.uint64))
    if len(bad):
        problems.append(
            f"log entry {int(bad[0])} has txid {int(used['txid'][bad[0]])} ({len(bad)} misnumbered)"
        )
    bad = np.flatnonzero((used["src"] >= n) | (used["dst"] >= n) | (used["src"] == used["dst"]))
    if len(bad):
        problems.append(f"log entry {int(bad[0])} names invalid accounts ({len(bad)} entries)")
    bad = np.flatnonzero(used["check"] != _entry_check_v(seed, used))
    if len(bad):
        problems.append(f"log entry {int(bad[0])} fails its check word ({len(bad)} entries)")
    rest = np.frombuffer(
        raw,
        dtype=np.uint8,
        count=(cap - count) * ENTRY_SIZE,
        offset=lay.log_off + count * ENTRY_SIZE,
    )
    if rest.any():
        first = int(np.flatnonzero(rest)[0]) // ENTRY_SIZE + count
        problems.append(f"log entry {first} is past tx_count {count} but not empty (torn append)")
    if not problems:
        replay = np.full(n, init, dtype=np.int64)
        amounts = used["amount"].astype(np.int64)
        np.subtract.at(replay, used["src"].astype(np.intp), amounts)
        np.add.at(replay, used["dst"].astype(np.intp), amounts)
        diff = np.flatnonzero(replay != bal)
        if len(diff):
            a = int(diff[0])
            problems.append(
                f"balances disagree with the log: account {a} holds {int(bal[a])}, "
                f"replaying the log gives {int(replay[a])} ({len(diff)} accounts differ)"
            )
    if acked is not None:
        summary["acknowledged"] = len(acked)
        missing = 0
        first_msg = None
        for txid, src, dst, amount in acked:
            if txid >= count:
                msg = f"acknowledged transaction {txid} is missing from the log (log holds {count})"
            else:
                entry = used[txid]
                logged = (int(entry["src"]), int(entry["dst"]), int(entry["amount"]))
                if logged == (src, dst, amount):
                    continue
                msg = (
                    f"acknowledged transaction {txid} ({src}->{dst} {amount}) differs from the log "
                    f"({int(entry['src'])}->{int(entry['dst'])} {int(entry['amount'])})"
                )
            missing += 1
            first_msg = first_msg or msg
        if missing:
            problems.append(f"{first_msg} ({missing} acknowledged transactions not in the log)")
    if journal is not None:
        problems += _check_journal(journal, seed, int(count), used, summary)
    return problems, summary


def _check_journal(
    journal: np.ndarray, seed: int, count: int, used: np.ndarray, summary: dict, limit: int = 5
) -> list[str]:
    """The journal against the memory's log ``used`` (its first ``count`` entries)."""
    slots = len(journal) // JOURNAL_RECORD
    summary["journal_slots"] = slots
    if slots < 1:
        return [f"disk journal: {len(journal)} bytes hold no {JOURNAL_RECORD}-byte slot"]
    got_raw = np.ascontiguousarray(journal[: slots * JOURNAL_RECORD]).reshape(slots, JOURNAL_RECORD)
    got = got_raw.view(JOURNAL_DTYPE).reshape(slots)
    nonempty = np.asarray(got_raw.any(axis=1))
    summary["journal_records"] = int(nonempty.sum())
    # slot s must hold txid s + k*S, the largest such txid below count
    idx = np.arange(slots, dtype=np.int64)
    has: np.ndarray = idx < count
    want_tx = np.where(has, idx + ((count - 1 - idx) // slots) * slots, 0)
    want = np.zeros(slots, dtype=JOURNAL_DTYPE)
    e = used[want_tx[has]]
    want["magic"][has] = JOURNAL_MAGIC
    want["txid"][has] = e["txid"]
    want["src"][has] = e["src"]
    want["dst"][has] = e["dst"]
    want["amount"][has] = e["amount"]
    want["check"][has] = e["check"]
    want["seed"][has] = seed
    want_raw = want.view(np.uint8).reshape(slots, JOURNAL_RECORD)
    crcs = [zlib.crc32(want_raw[s, :JOURNAL_CRC_OFFSET].tobytes()) for s in np.flatnonzero(has)]
    want["crc"][has] = np.array(crcs, dtype=np.uint32)
    differ = np.flatnonzero((got_raw != want_raw).any(axis=1))
    problems: list[str] = []
    kinds = {"behind": 0, "ahead": 0, "corrupted": 0}
    for s in differ.tolist():
        expected = f"txid {int(want_tx[s])}" if has[s] else "nothing (empty)"
        r = got[s]
        if not nonempty[s]:
            kind, found = "behind", "an empty slot"
        elif bytes(r["magic"]) != JOURNAL_MAGIC or zlib.crc32(
            got_raw[s, :JOURNAL_CRC_OFFSET].tobytes()
        ) != int(r["crc"]):
            kind, found = "corrupted", "a record with a bad magic or checksum"
        else:
            tx = int(r["txid"])
            found = f"txid {tx}"
            if tx % slots != s:
                kind, found = "corrupted", found + f" (whose slot is {tx % slots})"
            elif tx >= count:
                kind, found = "ahead", found + f" (past the memory's last txid {count - 1})"
            elif has[s] and tx < int(want_tx[s]):
                kind, found = "behind", found + " (an older transaction)"
            else:
                kind, found = "corrupted", found + " whose fields differ from the memory's log"
        kinds[kind] += 1
        if len(problems) < limit:
            problems.append(f"disk journal slot {s}: expected {expected}, found {found} ({kind})")
    if len(differ) > len(problems):
        counts = ", ".join(f"{n} {k}" for k, n in kinds.items() if n)
        problems.append(f"disk journal: {len(differ)} slots wrong in all ({counts})")
    return problems
