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

Invariants ``check_ledger`` verifies (on a paused or dead domain's memory):
header well-formed; total == n * initial_balance == sum(balances); no
negative balance; every entry below tx_count well-formed (txid, accounts in
range, check word), every entry at or past tx_count zero; replaying the log
from the initial balances gives exactly the current balances; every
acknowledged transaction given is in the log with the same fields.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import cast

import numpy as np

from .. import PAGE_SIZE
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

    def __init__(self, regs: Registers, usable: int) -> None:
        self.usable = usable
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
        t = regs.step
        stop = min(t + n, lay.log_capacity)
        pack_q = struct.Struct("<q")
        entry = struct.Struct(ENTRY_FORMAT)
        while t < stop:
            src = h64(seed, t, 0) % accounts
            dst = h64(seed, t, 1) % (accounts - 1)
            if dst >= src:
                dst += 1
            so = boff + 8 * src
            do = boff + 8 * dst
            (bs,) = pack_q.unpack_from(buf, so)
            amount = h64(seed, t, 2) % (bs // 4 + 1)
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
    mem: np.ndarray, usable: int, acked: list[tuple[int, int, int, int]] | None = None
) -> tuple[list[str], dict]:
    """Check the ledger in guest memory ``mem`` (uint8, whole domain).

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
    return problems, summary
