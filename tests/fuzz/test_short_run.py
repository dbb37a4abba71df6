"""A short fuzz run inside the normal suite (issue 6, "Hostile input").

Hypothesis builds valid streams with the project's encoder (every codec,
page types with and without data, small caches that evict, a sender buffer
small enough that COMPRESSED_DATA interleaves with the PFN chunks), then:

* valid streams, fed to the Decoder cut at random points, decode to exactly
  the memory and tails that were encoded, checkpoint by checkpoint;
* mutated streams (truncated, bytes flipped, a chunk dropped / duplicated /
  swapped with its neighbour, a PFN pushed past p2m_size, a length field made
  huge or shifted) go through the fuzz oracle (tests/fuzz/oracles.py): only
  StreamError may come out, and every event keeps the rules; mutations that
  must be refused (PFN out of range, huge lengths) are refused;
* the codec and session oracles run on generated inputs the same way;
* every seed of the atheris corpus is valid for its target;
* regressions: the inputs of crashes the long fuzz runs found (docs/fuzzing.md).
"""

from __future__ import annotations

import dataclasses
import re
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import oracles, seeds
from xenbind.errors import StreamError
from xenbind.stream import CheckpointEnd, Decoder, Image, Pages, StreamWriter, Tail
from xenbind.stream.format import TAG_COMPRESSED_DATA, TYPE_HAS_DATA
from xenbind.types import Context

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: Page types drawn for entries: mostly NOTAB, some page tables, some without data.
TYPES = [0x0, 0x0, 0x0, 0x0, 0x1, 0x9, 0xF, 0xE, 0xD]


class Built:
    """A valid stream as a list of items (each a chunk or a run of chunks as
    the writer returned them) plus what decoding it must give."""

    def __init__(self, p2m: int) -> None:
        self.p2m = p2m
        self.items: list[bytes] = []
        self.memory: list[np.ndarray] = []  # guest memory after each checkpoint
        self.tails: list[Context] = []
        self.last = False

    @property
    def data(self) -> bytes:
        return b"".join(self.items)


def _change(page: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    page = page.copy()
    if how == "word":
        w = int(rng.integers(0, 1024))
        page[4 * w : 4 * w + 4] ^= 0x5A
    elif how == "words":
        for w in rng.choice(1024, 16, replace=False):
            page[4 * w : 4 * w + 4] = rng.integers(0, 256, 4, dtype=np.uint8)
    elif how == "run":
        s = int(rng.integers(0, 1024 - 64)) * 4
        page[s : s + 256] = rng.integers(0, 256, 256, dtype=np.uint8)
    elif how == "all":
        page[:] = rng.integers(0, 256, 4096, dtype=np.uint8)
    return page  # "same": unchanged


@st.composite
def valid_streams(draw) -> Built:
    codec = draw(st.sampled_from(["none", "xen", "seed"]))
    p2m = draw(st.integers(2, 48))
    cache = draw(st.sampled_from([1, 2, 5, 8192]))
    buffer_pages = draw(st.sampled_from([1, 2, 3, 8192]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = StreamWriter(p2m, codec=codec, cache_pages=cache, buffer_pages=buffer_pages)
    b = Built(p2m)
    b.items.append(w.header())
    mem = np.zeros((p2m, 4096), np.uint8)
    n_ckpt = draw(st.integers(1, 4))
    for k in range(n_ckpt):
        pfns = draw(st.lists(st.integers(0, p2m - 1), unique=True, max_size=5))
        types = np.array([draw(st.sampled_from(TYPES)) for _ in pfns], np.uint8)
        rows = []
        for p, t in zip(pfns, types, strict=True):
            if TYPE_HAS_DATA[t]:
                how = draw(st.sampled_from(["same", "word", "words", "run", "all"]))
                rows.append(_change(mem[p], how, rng))
        pages = np.stack(rows) if rows else np.zeros((0, 4096), np.uint8)
        magic = [int(x) for x in rng.integers(0, 2**40, 3)]
        ctx = Context(
            (magic[0], magic[1], magic[2]),
            bytes(draw(st.binary(max_size=40))),
            bytes(draw(st.binary(max_size=40))),
        )
        if draw(st.booleans()):
            b.items.append(w.heartbeat())
        if draw(st.integers(0, 5)) == 0:
            b.items.append(w.tsc_info(1, 2, 3, 4))
        last = k == n_ckpt - 1 and draw(st.booleans())
        b.items += [bytes(x) for x in w.pages(np.array(pfns, np.uint64), pages, types)]
        b.items += [bytes(x) for x in w.end_checkpoint(ctx, last=last)]
        data_pfns = np.array(pfns, np.uint64)[TYPE_HAS_DATA[types]]
        mem[data_pfns.astype(np.intp)] = pages
        b.memory.append(mem.copy())
        b.tails.append(ctx)
        b.last = last
    return b


def _decode_into_memory(data: bytes, p2m: int, cut_seed: int) -> tuple[list, list]:
    """Decode with the receiver's caps; memory snapshots and tails per checkpoint."""
    img = Image(np.zeros((p2m, 4096), np.uint8))
    d = Decoder(**oracles.FUZZ_CAPS, base=img.base)
    snaps, tails = [], []
    for piece in oracles.pieces(data, seed=cut_seed):
        for e in d.feed(piece):
            img.handle(e)
            if isinstance(e, Tail):
                tails.append(e.context)
            elif isinstance(e, CheckpointEnd):
                assert img.memory is not None
                snaps.append(img.memory.copy())
    d.eof()
    return snaps, tails


@SETTINGS
@given(valid_streams(), st.integers(0, 2**32 - 1))
def test_valid_streams_decode_to_what_was_encoded(b: Built, cut_seed: int) -> None:
    snaps, tails = _decode_into_memory(b.data, b.p2m, cut_seed)
    assert len(snaps) == len(b.memory)
    for got, want in zip(snaps, b.memory, strict=True):
        assert np.array_equal(got, want)
    assert tails == b.tails
    oracles.check_stream(b.data)  # and the oracle agrees it is well behaved


# --- mutations ---------------------------------------------------------------


def _pfn_item_positions(b: Built) -> list[int]:
    """Indexes of items that start with a +ve chunk (a PFN array follows)."""
    return [
        i
        for i, it in enumerate(b.items[1:], 1)
        if len(it) >= 12 and 0 < struct.unpack_from("<i", it)[0] <= 1024
    ]


MUTATIONS = ["truncate", "flip", "drop", "duplicate", "swap", "shift_length"]


@SETTINGS
@given(valid_streams(), st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3), st.data())
def test_mutated_streams_only_raise_stream_error(b: Built, muts: list[str], data) -> None:
    items = list(b.items)
    for m in muts:
        n = len(items)
        i = data.draw(st.integers(1, max(1, n - 1)))
        if m == "drop" and n > 2:
            del items[i]
        elif m == "duplicate":
            items.insert(i, items[i % n])
        elif m == "swap" and i + 1 < n:
            items[i], items[i + 1] = items[i + 1], items[i]
        elif m == "shift_length":
            # add or take a little from a 32/64-bit length field of a
            # COMPRESSED_DATA chunk or a batch's count
            it = bytearray(items[i % n])
            if len(it) >= 12 and struct.unpack_from("<i", it)[0] == TAG_COMPRESSED_DATA:
                (length,) = struct.unpack_from("<Q", it, 4)
                delta = data.draw(st.sampled_from([-2, -1, 1, 7, 4096]))
                struct.pack_into("<Q", it, 4, max(0, length + delta))
            elif len(it) >= 4 and 0 < struct.unpack_from("<i", it)[0] <= 1024:
                (count,) = struct.unpack_from("<i", it)
                struct.pack_into("<i", it, 0, count + data.draw(st.sampled_from([-1, 1, 1024])))
            items[i % n] = bytes(it)
    raw = bytearray(b"".join(items))
    for m in muts:
        if m == "truncate" and raw:
            del raw[data.draw(st.integers(0, len(raw) - 1)) :]
        elif m == "flip" and raw:
            for _ in range(data.draw(st.integers(1, 4))):
                j = data.draw(st.integers(0, len(raw) - 1))
                raw[j] ^= 1 << data.draw(st.integers(0, 7))
    oracles.check_stream(bytes(raw))


@SETTINGS
@given(valid_streams(), st.data())
def test_pfn_past_p2m_size_is_refused(b: Built, data) -> None:
    where = _pfn_item_positions(b)
    if not where:
        return  # no PFN chunk to corrupt
    i = data.draw(st.sampled_from(where))
    it = bytearray(b.items[i])
    (count,) = struct.unpack_from("<i", it)
    j = data.draw(st.integers(0, count - 1))
    (entry,) = struct.unpack_from("<Q", it, 4 + 8 * j)
    bad_pfn = data.draw(st.integers(b.p2m, (1 << 28) - 1))
    typ = (entry >> 28) & 0xF
    if typ == 0xF:
        typ = 0  # an XTAB entry names no page: make it a real one
    struct.pack_into("<Q", it, 4 + 8 * j, bad_pfn | (typ << 28))
    offset = sum(len(x) for x in b.items[:i]) + 4 + 8 * j
    b.items[i] = bytes(it)
    events, err = oracles.decode_all([b.data])
    assert isinstance(err, StreamError) and err.offset == offset, err
    assert "p2m_size" in err.reason
    oracles.check_stream(b.data)


@SETTINGS
@given(
    valid_streams(),
    st.sampled_from(["context", "device_model", "compressed"]),
    st.sampled_from([0xFFFF_FFFF, 1 << 31, (1 << 12) + 1]),
    st.data(),
)
def test_huge_lengths_are_refused(b: Built, field: str, huge: int, data) -> None:
    """A length over the cap is refused at its own offset, whatever follows."""
    data_b = bytearray(b.data)
    if field == "compressed":
        pos = [
            i
            for i, it in enumerate(b.items)
            if len(it) >= 12 and struct.unpack_from("<i", it)[0] == TAG_COMPRESSED_DATA
        ]
        if not pos:
            return
        i = data.draw(st.sampled_from(pos))
        at = sum(len(x) for x in b.items[:i])
        huge = huge if huge != (1 << 12) + 1 else (1 << 63)
        struct.pack_into("<Q", data_b, at + 4, huge)
        want_offset = at
    else:
        # the first tail ends where checkpoint 0's CheckpointEnd says
        events, err = oracles.decode_all([b.data])
        assert err is None
        end0 = next(e.offset for e in events if isinstance(e, CheckpointEnd))
        ctx = b.tails[0]
        tail_start = end0 - (24 + 4 + len(ctx.hvm_context) + 21 + 4 + len(ctx.device_model))
        ctx_len_at = tail_start + 24
        if field == "context":
            want_offset = ctx_len_at
        else:
            want_offset = ctx_len_at + 4 + len(ctx.hvm_context) + 21
        struct.pack_into("<I", data_b, want_offset, huge)
    events, err = oracles.decode_all([bytes(data_b)])
    assert isinstance(err, StreamError), err
    assert err.offset == want_offset, (err, want_offset)
    assert "cap" in err.reason
    oracles.check_stream(bytes(data_b))


# --- the other targets ----------------------------------------------------------


@SETTINGS
@given(st.sampled_from(sorted(seeds.codec_seeds().items())), st.data())
def test_codec_oracle_on_mutated_blobs(seed_item, data) -> None:
    name, raw = seed_item
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 6))):
        j = data.draw(st.integers(0, len(raw) - 1))
        raw[j] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del raw[data.draw(st.integers(0, len(raw))) :]
    oracles.check_codec(bytes(raw))


@SETTINGS
@given(st.sampled_from(["session", "reply"]), st.data())
def test_session_oracles_on_mutated_handshakes(target: str, data) -> None:
    src = seeds.session_seeds() if target == "session" else seeds.reply_seeds()
    raw = bytearray(data.draw(st.sampled_from(sorted(src.values()))))
    for _ in range(data.draw(st.integers(0, 4))):
        j = data.draw(st.integers(0, len(raw) - 1))
        raw[j] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del raw[data.draw(st.integers(0, len(raw))) :]
    oracles.TARGETS[target](bytes(raw))


WIRE_SEEDS = [(t, d) for t in ("core-wire", "wire") for d in seeds.SEEDS[t]().values()]


@SETTINGS
@given(st.sampled_from(WIRE_SEEDS), st.data())
def test_wire_oracles_on_mutated_segments(seed_item, data) -> None:
    """Targets ``core-wire`` and ``wire``: wire segments (zstd and lz4, some
    raw) with bytes changed and cut: in headers, lengths and payloads."""
    target, raw = seed_item
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 3))):
        j = data.draw(st.integers(0, len(raw) - 1))
        raw[j] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del raw[data.draw(st.integers(0, len(raw))) :]
    oracles.TARGETS[target](bytes(raw))


def test_wire_oracle_catches_a_decoder_that_drops_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``wire`` oracle's reference is independent: a decoder that loses
    the last byte of each compressed segment is caught."""
    from xenbind import wirecomp

    raw = seeds.wire_seeds()
    data = next(d for d in raw.values() if d[0] == 0)  # a zstd one
    oracles.check_wire(data)
    real = wirecomp.Decoder._decode

    def lossy(self, kind, payload, n):  # type: ignore[no-untyped-def]
        return real(self, kind, payload, n)[:-1]

    monkeypatch.setattr(wirecomp.Decoder, "_decode", lossy)
    with pytest.raises(AssertionError):
        oracles.check_wire(data)


@SETTINGS
@given(st.sampled_from(sorted(seeds.core_seeds().items())), st.data())
def test_core_oracle_on_mutated_sessions(seed_item, data) -> None:
    """Target ``core``: the receiver's ReceiverCore over mutated sessions."""
    _, raw = seed_item
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 4))):
        j = data.draw(st.integers(0, len(raw) - 1))
        raw[j] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del raw[data.draw(st.integers(0, len(raw))) :]
    oracles.check_core(bytes(raw))


def test_core_oracle_catches_a_torn_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core oracle is not vacuous: a commit the decoder never completed is a finding."""
    raw = next(iter(seeds.core_seeds().values()))
    oracles.check_core(raw)
    real = oracles.RecordingBackup.commit

    def commit_twice(self, req):
        done = real(self, req)
        self.commits.append((req.index + 1, []))  # a checkpoint that never arrived
        return done

    monkeypatch.setattr(oracles.RecordingBackup, "commit", commit_twice)
    with pytest.raises(AssertionError, match="whole checkpoint"):
        oracles.check_core(raw)


# --- the core with disks (issue 13) ----------------------------------------------

DISK_TAG = struct.pack("<i", -1005)


@SETTINGS
@given(
    st.sampled_from(sorted(seeds.core_disk_sessions().items())),
    st.lists(st.sampled_from(["flip-disk", "length", "drop", "duplicate", "swap"]), max_size=3),
    st.data(),
)
def test_core_disk_oracle_on_mutated_sessions(seed_item, muts: list[str], data) -> None:
    """Target ``core-disk``: sessions with disks, whole chunks dropped, repeated
    or swapped, DISK payloads and lengths changed, then bytes flipped and cut."""
    _, items = seed_item
    items = list(items)
    for m in muts:
        n = len(items)
        i = data.draw(st.integers(1, n - 1))  # (item 0 is the HELLO)
        disk_at = [k for k, it in enumerate(items) if k and it.startswith(DISK_TAG)]
        if m == "drop" and n > 2:
            del items[i]
        elif m == "duplicate":
            items.insert(i, items[i])
        elif m == "swap" and i + 1 < n:
            items[i], items[i + 1] = items[i + 1], items[i]
        elif disk_at:
            k = data.draw(st.sampled_from(disk_at))
            it = bytearray(items[k])
            if m == "flip-disk":
                for _ in range(data.draw(st.integers(1, 3))):
                    j = data.draw(st.integers(8, len(it) - 1))
                    it[j] = data.draw(st.integers(0, 255))
            else:  # a DISK length a little off, or huge
                (length,) = struct.unpack_from("<I", it, 4)
                delta = data.draw(st.sampled_from([-1, 1, 32, 1 << 24]))
                struct.pack_into("<I", it, 4, max(0, min(length + delta, 2**32 - 1)))
            items[k] = bytes(it)
    raw = bytearray(b"".join(items))
    for _ in range(data.draw(st.integers(0, 2))):
        j = data.draw(st.integers(0, len(raw) - 1))
        raw[j] ^= 1 << data.draw(st.integers(0, 7))
    if data.draw(st.booleans()):
        del raw[data.draw(st.integers(0, len(raw))) :]
    oracles.check_core(bytes(raw))


def _image(ops: list[tuple], sector: int = 512) -> oracles.DiskImage:
    img = oracles.DiskImage(sector)
    for op in ops:
        img.apply(op)
    return img


def test_core_disk_seeds_end_as_the_stream_says() -> None:
    """The disk seeds' sessions, against what their encoders wrote (by hand)."""
    f = seeds._fill
    found = seeds.core_disk_seeds()
    runs = {name: oracles._core_run(raw, None, False) for name, raw in found.items()}
    epoch0 = [("write", 0, 0, f(1024, 1)), ("write", 1, 4096, f(512, 2)), ("zero", 0, 8192, 4096)]
    epoch1 = [("write", 0, 512, f(512, 3)), ("zero", 1, 4096, 512), ("write", 1, 0, f(1024, 4))]
    epoch2 = [("write", 0, 2048, f(512, 5)), ("zero", 0, 0, 512), ("write", 1, 8192, f(512, 6))]
    for name in ("disk-epochs", "disk-switchover", "disk-torn"):
        r = runs[name]
        assert isinstance(r.backup, oracles.RecordingDiskBackup)
        want = [_image(epoch0), _image(epoch0 + epoch1), _image(epoch0 + epoch1 + epoch2)]
        n = 2 if name == "disk-torn" else 3
        assert (r.kind, [c[0] for c in r.commits]) == (
            {"disk-epochs": "clean", "disk-switchover": "closed", "disk-torn": "link-lost"}[name],
            list(range(n)),
        )
        assert [e for kind, _, e in (x for x in r.log if x[0] == "commit")] == list(range(n))
        assert r.backup.images == want[:n] and r.backup.image == want[n - 1]
    for name, match in (
        ("disk-outside", "outside the disk"),
        ("disk-tail-early", r"ended before its disk epoch's SEAL\(1\)"),
        ("disk-epoch-full", "disk stream: disk epoch 1"),
        ("disk-no-disks", "named no disks"),
    ):
        r = runs[name]
        assert r.kind == "violation" and re.search(match, r.message), (name, r.message)
        assert oracles.DISK_VIOLATION.match(r.message)
    r = runs["disk-outside"]
    assert isinstance(r.backup, oracles.RecordingDiskBackup) and r.backup.image == _image([])


def test_core_disk_oracle_catches_broken_disk_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk oracle is not vacuous: each rule broken by a patched core is a finding."""
    import receiver.core
    from xenbind import diskstream as ds

    found = seeds.core_disk_seeds()
    for raw in found.values():
        oracles.check_core(raw)
    with monkeypatch.context() as m:  # every write direct, as if epoch 0 never sealed
        real_data = receiver.core.ReceiverCore._disk_data

        def all_direct(self, data):
            self._disk_epoch = 0
            return real_data(self, data)

        m.setattr(receiver.core.ReceiverCore, "_disk_data", all_direct)
        with pytest.raises(AssertionError, match="only epoch 0 is direct"):
            oracles.check_core(found["disk-epochs"])
    with monkeypatch.context() as m:  # commits that carry no disk epoch
        real_req = receiver.core.CommitRequest

        def no_epoch(*args: object) -> receiver.core.CommitRequest:
            return dataclasses.replace(real_req(*args), disk_epoch=None)  # type: ignore[arg-type]

        m.setattr(receiver.core, "CommitRequest", no_epoch)
        with pytest.raises(AssertionError, match="with disk epoch None"):
            oracles.check_core(found["disk-epochs"])
    with monkeypatch.context() as m:  # a decoder that forgets the disk's end
        real_head = ds.Decoder._record_head

        def unbounded(self, buf, at, out):
            h = self.header
            self.header = ds.Header(h.sector_shift, (1 << 40,) * len(h.disk_sizes), h.first_epoch)
            try:
                return real_head(self, buf, at, out)
            finally:
                self.header = h

        m.setattr(ds.Decoder, "_record_head", unbounded)
        with pytest.raises(AssertionError, match="outside its disk"):
            oracles.check_core(found["disk-outside"])
    with monkeypatch.context() as m:  # a decoder that keeps the whole stream
        m.setattr(ds.Decoder, "buffered", property(lambda self: self.received))
        with pytest.raises(AssertionError, match="disk decoder holds"):
            oracles.check_core(found["disk-epoch-full"])
    with monkeypatch.context() as m:  # a checkpoint committed without its SEAL
        real_commit = receiver.core.ReceiverCore._commit

        def unsealed(self, end, backup, staging):
            self._disk_sealed = end.index
            return real_commit(self, end, backup, staging)

        m.setattr(receiver.core.ReceiverCore, "_commit", unsealed)
        with pytest.raises(AssertionError, match="committed before its SEAL"):
            oracles.check_core(found["disk-tail-early"])


@st.composite
def disk_streams(draw) -> tuple[bytes, int]:
    """A valid disk mirror stream (xenbind.diskstream.Encoder) and its max_write."""
    from xenbind import diskstream as ds

    shift = draw(st.sampled_from([9, 9, 12]))
    sector = 1 << shift
    sizes = draw(st.lists(st.integers(1, 16).map(lambda k: k * sector), min_size=1, max_size=3))
    enc = ds.Encoder(sizes, sector_shift=shift)
    out = [enc.header()]
    for _ in range(draw(st.integers(0, 12))):
        op = draw(st.sampled_from(["write", "write", "zero", "seal"]))
        if op == "seal":
            out.append(enc.seal())
            continue
        disk = draw(st.integers(0, len(sizes) - 1))
        n = sizes[disk] // sector
        start = draw(st.integers(0, n - 1))
        length = draw(st.integers(1, min(n - start, 4)))
        if op == "write":
            data = bytes(draw(st.binary(min_size=1, max_size=8))) * sector
            sync = draw(st.booleans())
            out += [
                bytes(b)
                for b in enc.write(disk, start * sector, data[: length * sector], sync=sync)
            ]
        else:
            out.append(enc.zero(disk, start * sector, length * sector))
    return b"".join(out), 4 * sector


def _as_tuple(e) -> tuple:
    from xenbind import diskstream as ds

    if isinstance(e, ds.Header):
        return ("header", e.disk_sizes, e.sector_shift, e.first_epoch)
    if isinstance(e, ds.Write):
        return ("write", e.disk, e.offset, e.data, e.sync)
    if isinstance(e, ds.Zero):
        return ("zero", e.disk, e.offset, e.length)
    return ("seal", e.epoch, e.records, e.nbytes, e.crc)


@SETTINGS
@given(
    disk_streams(),
    st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=3),
    st.integers(0, 2**32 - 1),
)
def test_reference_disk_reader_agrees_with_the_decoder(stream, flips, cut_seed) -> None:
    """The oracle's ReferenceDiskStream and xenbind.diskstream.Decoder, fed the
    same pieces of a valid or mutated disk stream, yield the same records and
    refuse in the same feed (the oracle's reference is only as good as this)."""
    from xenbind import diskstream as ds

    raw, max_write = stream
    raw = bytearray(raw)
    for at, value in flips:
        raw[at % len(raw)] = value
    dec = ds.Decoder(max_write=max_write)
    ref = oracles.ReferenceDiskStream(max_write)
    for piece in oracles.pieces(bytes(raw), seed=cut_seed):
        want, broken = ref.feed(piece)
        try:
            got = [_as_tuple(e) for e in dec.feed(piece)]
        except ds.DiskStreamError:
            assert broken, "the decoder refused what the reference reads"
            return
        assert not broken, "the decoder read what the reference refuses"
        assert got == want
    if not flips:
        assert not ref.broken


@pytest.mark.parametrize("target", sorted(seeds.SEEDS))
def test_every_seed_is_valid_for_its_target(target: str) -> None:
    found = seeds.SEEDS[target]()
    assert len(found) >= 3
    for name, raw in found.items():
        oracles.TARGETS[target](raw)  # the oracle holds on the seed itself
        if target == "stream":
            events, err = oracles.decode_all([raw])
            if name.endswith("torn"):
                assert err is not None and "torn" in err.reason
            else:
                assert err is None, (name, err)
                assert any(isinstance(e, CheckpointEnd) for e in events)


def test_the_oracle_catches_what_it_should() -> None:
    """The oracles are not vacuous: broken rules are findings."""
    from xenbind.stream import Header, PageBatch

    model = oracles.StreamModel(1 << 20, 16, 16)
    model.event(Header(16))
    with pytest.raises(AssertionError, match="p2m_size"):
        model.event(Pages(np.array([99], np.uint64), np.zeros((1, 4096), np.uint8)))
    with pytest.raises(AssertionError, match="twice"):
        model.event(PageBatch(np.array([3, 3], np.uint64), np.zeros(2, np.uint8)))
    # the reference decoder decodes a delta page on the page the receiver
    # holds (zeros for one it never held: what error 9 used to refuse), and
    # refuses a malformed one
    assert oracles.ReferenceDecoder("xen").decode(b"\x00", [0]) == ([bytes(4096)], False)
    seed = oracles.ReferenceDecoder("seed")
    page = bytearray(4096)
    page[8:12] = b"\x01\x00\x00\x00"
    assert seed.decode(struct.pack("<hIhI", -100, 0, 8, 1), [5]) == ([bytes(page)], False)
    assert seed.held == {5: bytes(page)}
    page[4:8] = b"\x02\x00\x00\x00"
    assert seed.decode(struct.pack("<hIhI", -100, 0, 4, 2), [5]) == ([bytes(page)], False)
    assert oracles.ReferenceDecoder("seed").decode(
        struct.pack("<hIhIhI", -100, 0, 8, 1, 4, 1), [0]
    ) == ([], True)
    # and the kernel agrees on such inputs
    oracles.check_codec(oracles.codec_input("seed", 1, [9, 0], struct.pack("<hIhI", -100, 0, 8, 1)))
    oracles.check_codec(oracles.codec_input("seed", 1, [5, 0], struct.pack("<hIhI", -100, 0, 8, 1)))
    oracles.check_codec(oracles.codec_input("xen", 2, [8, 8, 1], b"\x00\x00\x00"))
    oracles.check_codec(oracles.codec_input("xen", 2, [7, 7, 1], b"\x00\x00\x00"))


@SETTINGS
@given(st.binary(max_size=200))
def test_chunk_programs(program: bytes) -> None:
    """Target ``chunks``: streams written chunk by chunk from a random program."""
    oracles.check_chunks(program)


# --- regressions: inputs the long fuzz runs turned up --------------------------
# (none so far; each crash found gets a test here with its input in hex)
