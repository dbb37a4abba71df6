"""The seed corpus: valid inputs for every target, written by the project's
own encoders, so the fuzzer starts deep inside each format.

    python -m tests.fuzz.seeds OUTDIR [--target T]   write the seeds as files

Stream seeds (all small enough for the fuzzer's max_len):
    a-*        codec none: pure Format A legacy streams (several checkpoints,
               TSC_INFO, HEARTBEAT, a PFN repeated across batches, page types
               with and without data, MEMORY_DIGEST, LAST_CHECKPOINT, SWITCHOVER)
    xen-*      Format B with Xen's format, no CODEC tag (the legacy default
               cache) and with one (small cache); the sender's page buffer set
               to a few pages so COMPRESSED_DATA chunks interleave with the PFN
               chunks (the seed thread's corner case)
    seed-*     Format B with the seed's format (CODEC tag always present),
               cache misses, evictions, page-table pages sent whole
    tail-*     tails with empty and larger HVM context / device-model records
Codec seeds: header (tests/fuzz/oracles.py) + blobs of both formats against a
primed cache. Session seeds: HELLOs of every codec followed by stream bytes.
Reply seeds: ACCEPT or REFUSE followed by frames. Core seeds: each stream
seed behind a HELLO that matches it (pages, codec, cache). Core-disk seeds:
sessions whose HELLO names disks, the disk mirror stream in DISK chunks among
the checkpoints (core_disk_sessions lists them).
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xenbind.types import Context

#: The HVM tail most seeds carry.
CTX = Context((0xFEFF0, 0xFEFF1, 0xFEFF2), b"hvm-ctx\x00" * 3, b"qemu-dm\x01")


def _page(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, 4096, dtype=np.uint8)


def _pages(pfns: list[int], version: int = 0) -> np.ndarray:
    return (
        np.stack([_page(p * 1000 + version) for p in pfns])
        if pfns
        else np.zeros((0, 4096), np.uint8)
    )


def _touch(pages: np.ndarray, words: list[int], value: int = 0xA5) -> np.ndarray:
    out = pages.copy()
    for i in range(len(out)):
        for w in words:
            out[i, 4 * w : 4 * w + 4] = (value + i + w) & 0xFF
    return out


def xen_sender_seeds() -> dict[str, bytes]:
    """Streams as Xen 4.5's sender writes them (tests/xenbind/stream/
    xen_sender.py): page tables dropped from a 2-page cache, VCPU_INFO in
    every checkpoint, HVM parameters, TOOLSTACK, empty COMPRESSED_DATA."""
    from tests.xenbind.stream.xen_sender import XenSender

    out: dict[str, bytes] = {}
    for name, kw in (
        ("plain", {}),
        (
            "chunks",
            dict(
                hvm_params={-3: 0xFEFFD000, -11: 1, -19: 0xFF000, -20: 2},
                max_vcpu_id=65,
                online=(0, 65),
                toolstack=b"libxl",
                empty_chunks=True,
            ),
        ),
    ):
        s = XenSender(8, cache_pages=2, buffer_pages=3, **kw)  # type: ignore[arg-type]
        s.memory[:] = np.arange(8, dtype=np.uint8)[:, None] + 1
        s.types[:2] = 1  # page tables
        s.types[7] = 0xF  # a hole
        data = s.header() + s.initial()
        for k in range(3):
            s.memory[k : k + 4, 8 * k : 8 * k + 8] ^= 0x5A
            data += s.checkpoint(list(range(k, k + 4)), last=k == 2)
        out[f"xen-sender-{name}"] = data
    return out


def stream_seeds() -> dict[str, bytes]:
    from xenbind.stream.encoder import Buffer, StreamWriter, memory_digest
    from xenbind.stream.format import TYPE_HAS_DATA

    out: dict[str, bytes] = xen_sender_seeds()
    u64 = np.uint64

    # --- Format A ---------------------------------------------------------
    w = StreamWriter(16, codec="none")
    b: list[Buffer] = [w.header()]  # the writer's chunks: bytes, or views of the pages
    b += w.checkpoint(np.array([1, 5], u64), _pages([1, 5]), CTX)
    b.append(w.tsc_info(1, 123456789, 2_400_000, 7))
    b.append(w.heartbeat())
    b += w.checkpoint(np.array([5], u64), _pages([5], 1), CTX)
    out["a-two-checkpoints"] = b"".join(b)

    w = StreamWriter(16, codec="none")
    b = [w.header()]
    b += w.pages(np.array([3], u64), _pages([3]))  # pre-copy round 1
    b.append(w.heartbeat())
    b += w.pages(np.array([3, 4], u64), _pages([3, 4], 1))  # round 2: 3 again
    mem = np.zeros((16, 4096), np.uint8)
    mem[3], mem[4] = _pages([3, 4], 1)
    b += w.end_checkpoint(CTX, digest=memory_digest(mem), last=True)
    out["a-repeat-digest-last"] = b"".join(b)

    w = StreamWriter(16, codec="none")  # a switchover: checkpoint 1 carries SWITCHOVER
    b = [w.header(), *w.checkpoint(np.array([1], u64), _pages([1]), CTX)]
    b += w.checkpoint(np.array([2], u64), _pages([2]), CTX, last=True, switchover=True)
    out["a-switchover"] = b"".join(b)

    w = StreamWriter(64, codec="none")
    types = np.array([0x0, 0xF, 0xE, 0x1, 0xD, 0x9], np.uint8)  # NOTAB XTAB XALLOC L1 BROKEN L1pin
    b = [w.header()]
    b += w.checkpoint(np.array([10, 11, 12, 13, 14, 15], u64), _pages([10, 13, 15]), CTX, types)
    b += w.checkpoint(np.zeros(0, u64), _pages([]), CTX)  # an empty body
    out["a-types-empty-body"] = b"".join(b)

    # --- Format B -----------------------------------------------------------
    def b_stream(
        codec: str,
        cache: int,
        buffer_pages: int,
        rounds: list[tuple[list[int], int]],
        types: list | None = None,
        p2m: int = 32,
    ) -> bytes:
        w = StreamWriter(p2m, codec=codec, cache_pages=cache, buffer_pages=buffer_pages)
        b: list[Buffer] = [w.header()]
        b += w.checkpoint(np.array([0], u64), _pages([0]), CTX)  # initial copy
        base: dict[int, np.ndarray] = {}
        for k, (pfns, mode) in enumerate(rounds):
            rows = []
            t = None if types is None else np.array(types[k], np.uint8)
            carry = [True] * len(pfns) if t is None else list(TYPE_HAS_DATA[t])
            for p, has_data in zip(pfns, carry, strict=True):
                if not has_data:
                    continue
                if p not in base or mode == 0:
                    base[p] = _page(p * 1000 + 50 + k)
                elif mode == 1:
                    base[p] = _touch(base[p][None], [1, 2, 700])[0]
                elif mode == 2:
                    base[p] = _touch(base[p][None], list(range(40, 200)))[0]
                rows.append(base[p])
            pages = np.stack(rows) if rows else np.zeros((0, 4096), np.uint8)
            b += w.checkpoint(np.array(pfns, u64), pages, CTX, t)
            if k == 0:
                b.append(w.heartbeat())
        return b"".join(b)

    for codec in ("xen", "seed"):
        out[f"{codec}-default-cache"] = b_stream(
            codec, 8192, 8192, [([2, 3], 0), ([2, 3], 1), ([3], 3)]
        )
        out[f"{codec}-interleaved"] = b_stream(codec, 4, 1, [([4, 5], 0), ([4, 5, 6], 1)])
        out[f"{codec}-evict"] = b_stream(codec, 1, 8192, [([7], 0), ([8], 0), ([8, 7], 1)])
        out[f"{codec}-runs-types"] = b_stream(
            codec, 2, 2, [([1, 9], 0), ([1, 9, 20, 21], 2)], types=[[0, 0], [0, 0x1, 0xF, 0xE]]
        )
    # by hand: PFN chunks of a few entries each, COMPRESSED_DATA chunks whose
    # pages straddle several of them (the seed thread's corner case, at a size
    # the fuzzer can afford: Xen's 8192-page buffer would need 8 full batches)
    from xenbind.compress import Compressor
    from xenbind.stream.encoder import (
        encode_codec,
        encode_compressed,
        encode_enable_compression,
        encode_end,
        encode_header,
        encode_pfn_list,
        encode_tail,
    )

    for codec in ("xen", "seed"):
        comp = Compressor(codec, 8)
        p = {k: _page(k) for k in range(8)}
        b = [
            encode_header(16),
            encode_codec(codec, 8),
            encode_enable_compression(),
            encode_end(),
            encode_tail(CTX),
        ]
        # body 1: +2 [0,1] +3 [2,XTAB 9,3] DATA(0,1,2) +1 [4] DATA(3,4)
        b += [
            encode_pfn_list(np.array([0, 1], u64)),
            encode_pfn_list(np.array([2, 9, 3], u64), np.array([0, 0xF, 0], np.uint8)),
            encode_compressed(
                comp.compress(np.array([0, 1, 2], u64), np.stack([p[0], p[1], p[2]]))
            ),
            encode_pfn_list(np.array([4], u64)),
            encode_compressed(comp.compress(np.array([3, 4], u64), np.stack([p[3], p[4]]))),
            encode_end(),
            encode_tail(CTX),
        ]
        # body 2: the same pages, a few words changed, one chunk of 5 across 3 listings
        q = {k: _touch(p[k][None], [k, 100 + k])[0] for k in range(5)}
        b += [
            encode_pfn_list(np.array([4, 3], u64)),
            encode_pfn_list(np.array([0], u64)),
            encode_pfn_list(np.array([1, 2], u64)),
            encode_compressed(
                comp.compress(
                    np.array([4, 3, 0, 1, 2], u64), np.stack([q[4], q[3], q[0], q[1], q[2]])
                )
            ),
            encode_end(),
            encode_tail(CTX),
        ]
        out[f"{codec}-straddle"] = b"".join(b)

    # a stream that stops mid-checkpoint (the torn last checkpoint)
    full = out["xen-interleaved"]
    out["xen-torn"] = full[: len(full) - 37]

    # --- tails -----------------------------------------------------------------
    for name, ctx in (
        ("empty", Context((0, 0, 0), b"", b"")),
        ("big", Context((1, 2, 3), bytes(range(256)) * 8, b"dm" * 700)),
    ):
        w = StreamWriter(4, codec="none")
        out[f"tail-{name}"] = b"".join(
            [w.header(), *w.checkpoint(np.array([2], u64), _pages([2]), ctx, last=True)]
        )
    return out


def codec_seeds() -> dict[str, bytes]:
    from tests.fuzz.oracles import KNOWN_ZERO, codec_input, prime_page
    from xenbind.compress import Compressor

    out: dict[str, bytes] = {}
    for codec in ("seed", "xen"):
        for cache in (1, 3, 8):
            c = Compressor(codec, cache)
            prime = np.frombuffer(b"".join(prime_page(p) for p in range(cache)), np.uint8)
            c.compress(np.arange(cache, dtype=np.uint64), prime.reshape(-1, 4096))
            pfns = [0, 1, 0, 9, 2, 1][: max(2, cache)]
            rows = []
            for i, p in enumerate(pfns):
                page = np.frombuffer(prime_page(p), np.uint8).copy()
                if i % 3 == 1:
                    page[100:140] ^= 0xFF  # a run
                elif i % 3 == 2:
                    page[::512] += 1  # scattered words
                rows.append(page)
            blob1 = c.compress(np.array(pfns, np.uint64), np.stack(rows))
            # the second blob: unchanged pages (smallest encodings) of the same pfns
            blob2 = c.compress(np.array(pfns, np.uint64), np.stack(rows))
            out[f"{codec}-cache{cache}"] = codec_input(codec, cache, pfns, blob1, blob2)
            out[f"{codec}-cache{cache}-second"] = codec_input(codec, cache, pfns, b"", blob1)
        # the zero base: pfns 8..15 are known zero on both sides (oracles.KNOWN_ZERO)
        c = Compressor(codec, 2)
        prime = np.frombuffer(b"".join(prime_page(p) for p in range(2)), np.uint8)
        c.compress(np.arange(2, dtype=np.uint64), prime.reshape(-1, 4096))
        known = np.array(KNOWN_ZERO, dtype=np.uint64)
        c.note_sent_raw(known, np.zeros((len(known), 4096), np.uint8))
        zrows = np.zeros((3, 4096), np.uint8)
        zrows[0, 40:48] = 7  # two words against zeros
        zrows[2, 1000:1300] = 3  # a run against zeros
        blob1 = c.compress(np.array([9, 12, 15], np.uint64), zrows)
        assert c.stats.zero_base == 3
        # again: 9 was evicted (a miss no longer known zero: whole), 12, 15 hits
        zrows[:, 8] = 1
        blob2 = c.compress(np.array([9, 12, 15], np.uint64), zrows)
        out[f"{codec}-zero-base"] = codec_input(codec, 2, [9, 12, 15], blob1, blob2)
    return out


def session_seeds() -> dict[str, bytes]:
    from xenbind.session import Hello, Options, encode_hello
    from xenbind.types import DomainConfig

    out: dict[str, bytes] = {}
    for codec in ("seed", "xen", "none"):
        h = Hello(
            session_id="ab" * 16,
            options=Options(codec=codec, cache_pages=512, verify=codec == "xen"),
            domain=DomainConfig(
                "guest-1",
                "12345678-9abc-def0-1234-56789abcdef0",
                4096,
                2,
                extra={"workload": "ledger", "seed": 3},
            ),
            generation=5,
            software="remusd 0.1.0",
        )
        out[f"hello-{codec}"] = encode_hello(h) + b"\x10\x00\x00\x00\x00\x00\x00\x00"
    return out


def reply_seeds() -> dict[str, bytes]:
    from tests.fuzz.oracles import SENDER_SESSION_ID
    from xenbind.session import (
        ACK_VERIFIED,
        ERR_FAILED_OVER,
        FRAME_ACK,
        FRAME_ERROR,
        FRAME_GOODBYE,
        FRAME_HEARTBEAT,
        Accept,
        Refuse,
        encode_accept,
        encode_frame,
        encode_refuse,
    )

    acc = encode_accept(Accept(SENDER_SESSION_ID, 900, 100, {"max_pages": 1 << 20}, "recv"))
    ack = encode_frame(FRAME_ACK, ACK_VERIFIED, (3).to_bytes(8, "little"))
    hb = encode_frame(FRAME_HEARTBEAT, 0, (2**64 - 1).to_bytes(8, "little"))
    return {
        "accept-frames": acc + ack + hb + encode_frame(FRAME_GOODBYE, 0, b"bye"),
        "accept-error": acc + encode_frame(FRAME_ERROR, ERR_FAILED_OVER, b"took over"),
        "refuse": encode_refuse(Refuse("codec", "unknown codec")),
    }


def chunks_seeds() -> dict[str, bytes]:
    """Programs for target ``chunks`` (tests/fuzz/oracles.py): op bytes."""
    B, DATA, CD, FULL, TSC, LAST, ENABLE, CODEC, DIGEST, HB, END = range(11)
    return {
        # p2m 16; Format A: 2 pages; end
        "a-two-pages": bytes([15, B, 1, 3, 0, 4, 0, DATA, 2, 0x11, 0x22, TSC, END, 3, 2]),
        # enable xen with cache 4, end; Format B: +2 listed, full pages, end; then
        # +1 listed, unchanged page, end
        "b-xen": bytes(
            [
                15,
                CODEC,
                1,
                4,
                ENABLE,
                END,
                0,
                0,
                B,
                1,
                3,
                0,
                4,
                0,
                FULL,
                0,
                0x33,
                FULL,
                0,
                0x44,
                HB,
                END,
                1,
                1,
                B,
                0,
                3,
                0,
                CD,
                1,
                0x00,
                LAST,
                END,
                0,
                0,
            ]
        ),
        # legacy enable (no CODEC), an XTAB entry, a digest
        "b-legacy": bytes(
            [7, ENABLE, DIGEST, END, 0, 0, B, 1, 1, 0xF0, 2, 0, FULL, 0, 9, END, 2, 2]
        ),
    }


def core_seeds() -> dict[str, bytes]:
    """Target ``core``: a HELLO matching each stream seed (pages, codec, cache), then it."""
    from xenbind.session import Hello, Options, encode_hello
    from xenbind.stream import CodecAnnounce, Decoder, EnableCompression, Header, Image
    from xenbind.types import DomainConfig

    out: dict[str, bytes] = {}
    for name, stream in stream_seeds().items():
        d = Decoder(max_p2m_size=1 << 20, base=Image().base)  # only the header and codec matter
        try:
            events = d.feed(stream)
        except Exception:  # noqa: BLE001 - a torn or broken seed: skip it
            continue
        pages = next((e.p2m_size for e in events if isinstance(e, Header)), 0)
        codec, cache = "none", 8192
        for e in events:
            if isinstance(e, CodecAnnounce | EnableCompression):
                codec, cache = e.codec, e.cache_pages
        if not pages:
            continue
        hello = Hello(
            session_id="cd" * 16,
            options=Options(codec=codec, cache_pages=cache),
            domain=DomainConfig("fuzz", "12345678-9abc-def0-1234-56789abcdef0", pages, 1),
            generation=1,
        )
        out[f"core-{name}"] = encode_hello(hello) + stream
    return out


#: The disks of most core-disk seeds: small, so a mutated offset lands outside one.
SEED_DISKS = (64 << 10, 32 << 10)


def _disk_hello(
    pages: int, disks: tuple[int, ...], codec: str = "none", cache: int = 8192
) -> bytes:
    from xenbind.session import Hello, Options, encode_hello
    from xenbind.types import DomainConfig

    hello = Hello(
        session_id="de" * 16,
        options=Options(codec=codec, cache_pages=cache),
        domain=DomainConfig(
            "fuzz-disk", "12345678-9abc-def0-1234-56789abcdef0", pages, 1, disks=disks
        ),
        generation=1,
    )
    return encode_hello(hello)


def _fill(n: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


def core_disk_sessions() -> dict[str, list[bytes]]:
    """Target ``core-disk``: sessions whose HELLO names disks, as items (the
    HELLO, then the legacy stream's chunks, DISK chunks among them), so a test
    can drop, repeat or swap whole chunks.

    disk-epochs        epoch 0 (the initial sync: WRITEs with FLAG_SYNC, a
                       ZERO) and SEAL(0) before checkpoint 0's body; epoch 1's
                       writes while checkpoint 1 runs, SEAL(1) before its body;
                       epoch 2's writes inside checkpoint 1's body (the guest
                       runs on), SEAL(2), checkpoint 2 with LAST_CHECKPOINT
    disk-switchover    the same shape ending in a SWITCHOVER checkpoint
    disk-split-records one disk stream cut across DISK chunks mid-head and
                       mid-data, sector 4 KiB, a ZERO of the whole disk
    disk-xen           Format B (codec xen, a 2-page cache, one-page sender
                       buffer): DISK chunks between PFN and COMPRESSED_DATA chunks
    disk-torn          epoch 2's writes never sealed: EOF (the torn epoch dropped)
    disk-outside       a WRITE past its disk's end in epoch 1 (a violation)
    disk-tail-early    checkpoint 1's tail before SEAL(1) (a violation)
    disk-epoch-full    epoch 1 keeps more than max-disk-epoch-bytes (a violation)
    disk-no-disks      DISK chunks in a session whose HELLO named none (a violation)
    """
    import struct

    from xenbind import diskstream as ds
    from xenbind.stream import StreamWriter, encode_disk

    u64 = np.uint64
    none = np.zeros(0, u64)
    empty = _pages([])

    def j(x) -> bytes:
        """A chunk (bytes or a view), or a list of them, as bytes."""
        return b"".join(bytes(b) for b in x) if isinstance(x, list) else bytes(x)

    def epochs(last: bool, switchover: bool) -> list[bytes]:
        enc = ds.Encoder(list(SEED_DISKS))
        w = StreamWriter(8, codec="none")
        sync = (
            enc.header()
            + j(enc.write(0, 0, _fill(1024, 1), sync=True))
            + j(enc.write(1, 4096, _fill(512, 2), sync=True))
            + enc.zero(0, 8192, 4096)
            + enc.seal()
        )
        items = [w.header(), encode_disk(sync)]
        items += [j(x) for x in w.checkpoint(np.array([1], u64), _pages([1]), CTX)]
        items.append(encode_disk(j(enc.write(0, 512, _fill(512, 3)))))
        items.append(w.heartbeat())
        items.append(encode_disk(enc.zero(1, 4096, 512) + j(enc.write(1, 0, _fill(1024, 4)))))
        items.append(encode_disk(enc.seal()))
        body = [j(x) for x in w.pages(np.array([2], u64), _pages([2]))]
        items += body
        items.append(encode_disk(j(enc.write(0, 2048, _fill(512, 5))) + enc.zero(0, 0, 512)))
        items += [j(x) for x in w.end_checkpoint(CTX)]
        items.append(encode_disk(j(enc.write(1, 8192, _fill(512, 6))) + enc.seal()))
        items += [j(x) for x in w.checkpoint(none, empty, CTX, last=last, switchover=switchover)]
        return items

    out: dict[str, list[bytes]] = {}
    hello = _disk_hello(8, SEED_DISKS)
    out["disk-epochs"] = [hello, *epochs(True, False)]
    out["disk-switchover"] = [hello, *epochs(True, True)]

    # one stream cut across DISK chunks at awkward points, 4 KiB sectors
    size = 64 << 10
    enc = ds.Encoder([size], sector_shift=12)
    w = StreamWriter(4, codec="none")
    e0 = enc.header() + j(enc.write(0, 4096, _fill(4096, 7), sync=True)) + enc.seal()
    e1 = enc.zero(0, 0, size) + j(enc.write(0, 8192, _fill(4096, 8))) + enc.seal()
    items = [w.header()]
    items += [encode_disk(e0[:10]), encode_disk(e0[10:50]), encode_disk(e0[50:])]
    items += [j(x) for x in w.checkpoint(none, empty, CTX)]
    items += [encode_disk(e1[:40]), encode_disk(e1[40:2000]), encode_disk(e1[2000:])]
    items += [j(x) for x in w.checkpoint(none, empty, CTX, last=True)]
    out["disk-split-records"] = [_disk_hello(4, (size,)), *items]

    # Format B with DISK chunks among its chunks
    enc = ds.Encoder(list(SEED_DISKS))
    w = StreamWriter(8, codec="xen", cache_pages=2, buffer_pages=1)
    items = [w.header(), encode_disk(enc.header() + j(enc.write(1, 0, _fill(512, 9))))]
    items.append(encode_disk(enc.seal()))
    items += [j(x) for x in w.checkpoint(np.array([3], u64), _pages([3]), CTX)]
    items.append(encode_disk(j(enc.write(0, 1024, _fill(1024, 10))) + enc.seal()))
    rows = _touch(_pages([3, 3])[:1], [5, 9]).repeat(1, 0)
    body = [j(x) for x in w.pages(np.array([3], u64), rows)]
    for chunk in body:
        items += [chunk, encode_disk(enc.zero(1, 512, 512))]
    items += [j(x) for x in w.end_checkpoint(CTX)]
    items.append(encode_disk(enc.seal()))
    items += [j(x) for x in w.checkpoint(none, empty, CTX, last=True)]
    out["disk-xen"] = [_disk_hello(8, SEED_DISKS, "xen", 2), *items]

    # torn: epoch 2's writes, no SEAL(2), no checkpoint 2
    torn = epochs(False, False)
    tag = encode_disk(b"x")[:4]
    cut = next(i for i in range(len(torn) - 1, 0, -1) if torn[i].startswith(tag))
    out["disk-torn"] = [hello, *torn[:cut], encode_disk(torn[cut][8:-32])]

    # a WRITE head past its disk's end (hand-made: the encoder refuses it)
    enc = ds.Encoder(list(SEED_DISKS))
    w = StreamWriter(8, codec="none")
    items = [w.header(), encode_disk(enc.header() + enc.seal())]
    items += [j(x) for x in w.checkpoint(none, empty, CTX)]
    bad = struct.pack("<IHHQQQ", ds.WRITE, 1, 0, SEED_DISKS[1] - 512, 1024, 0) + _fill(1024, 11)
    items.append(encode_disk(bad))
    items += [j(x) for x in w.checkpoint(none, empty, CTX, last=True)]
    out["disk-outside"] = [hello, *items]

    # checkpoint 1's tail before SEAL(1)
    enc = ds.Encoder(list(SEED_DISKS))
    w = StreamWriter(8, codec="none")
    items = [w.header(), encode_disk(enc.header() + enc.seal())]
    items += [j(x) for x in w.checkpoint(none, empty, CTX)]
    items.append(encode_disk(j(enc.write(0, 0, _fill(512, 12)))))
    items += [j(x) for x in w.checkpoint(none, empty, CTX)]
    items.append(encode_disk(enc.seal()))
    out["disk-tail-early"] = [hello, *items]

    # epoch 1 keeps three 4 KiB writes (past the fuzz bound of 8 KiB)
    enc = ds.Encoder(list(SEED_DISKS))
    w = StreamWriter(8, codec="none")
    items = [w.header(), encode_disk(enc.header() + enc.seal())]
    items += [j(x) for x in w.checkpoint(none, empty, CTX)]
    for k in range(3):
        items.append(encode_disk(j(enc.write(0, 4096 * k, _fill(4096, 13 + k)))))
    items.append(encode_disk(enc.seal()))
    items += [j(x) for x in w.checkpoint(none, empty, CTX, last=True)]
    out["disk-epoch-full"] = [hello, *items]

    # a HELLO without disks, DISK chunks all the same
    enc = ds.Encoder([SEED_DISKS[0]])
    w = StreamWriter(8, codec="none")
    items = [w.header(), encode_disk(enc.header() + enc.seal())]
    items += [j(x) for x in w.checkpoint(none, empty, CTX, last=True)]
    out["disk-no-disks"] = [_disk_hello(8, ()), *items]
    return out


def core_disk_seeds() -> dict[str, bytes]:
    return {name: b"".join(items) for name, items in core_disk_sessions().items()}


def _wire_encode(stream: bytes, codec: str, seed: int) -> bytes:
    """``stream`` as wire segments: cut at a few points, each piece compressed
    or sent raw (as ``auto`` switches), as remusd.link sends it."""
    import random

    from xenbind.wirecomp import Encoder

    rng = random.Random(seed)
    enc = Encoder(codec)
    cuts = sorted({rng.randrange(len(stream) + 1) for _ in range(4)} | {0, len(stream)})
    out = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        if b > a:
            out += [bytes(x) for x in enc.encode([stream[a:b]], rng.random() < 0.7)]
    return b"".join(out)


def core_wire_seeds() -> dict[str, bytes]:
    """Target ``core-wire``: each core seed's session with the HELLO offering a
    wire codec and the stream sent as wire segments (zstd and lz4 in turn)."""
    import json

    from xenbind.session import PREFIX, Hello, Options, encode_hello, parse_hello_body

    out: dict[str, bytes] = {}
    for i, (name, data) in enumerate(sorted(core_seeds().items())):
        length = PREFIX.unpack_from(data)[3]
        hello = parse_hello_body(json.loads(data[PREFIX.size : PREFIX.size + length]), 1)
        codec = ("zstd", "lz4")[i % 2]
        o = hello.options
        wired = Hello(
            session_id=hello.session_id,
            options=Options(codec=o.codec, cache_pages=o.cache_pages, wire=(codec,)),
            domain=hello.domain,
            generation=hello.generation,
        )
        stream = data[PREFIX.size + length :]
        out[f"wire-{codec}-{name}"] = encode_hello(wired) + _wire_encode(stream, codec, i)
    return out


def wire_seeds() -> dict[str, bytes]:
    """Target ``wire``: a codec byte (even zstd, odd lz4), then segments."""
    out: dict[str, bytes] = {}
    for i, (name, stream) in enumerate(sorted(stream_seeds().items())):
        if not stream:
            continue
        codec = ("zstd", "lz4")[i % 2]
        out[f"wire-{name}"] = bytes([i % 2]) + _wire_encode(stream * 8, codec, i)
    return out


SEEDS: dict[str, Callable[[], dict[str, bytes]]] = {
    "core": core_seeds,
    "core-wire": core_wire_seeds,
    "wire": wire_seeds,
    "core-disk": core_disk_seeds,
    "stream": stream_seeds,
    "chunks": chunks_seeds,
    "codec": codec_seeds,
    "session": session_seeds,
    "reply": reply_seeds,
}


def write_seeds(target: str, outdir: Path) -> int:
    """Write ``target``'s seeds into ``outdir`` (one file each); return how many."""
    outdir.mkdir(parents=True, exist_ok=True)
    seeds = SEEDS[target]()
    for name, data in seeds.items():
        digest = hashlib.sha1(data).hexdigest()[:12]
        (outdir / f"{name}-{digest}").write_bytes(data)
    return len(seeds)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.seeds")
    p.add_argument("outdir", type=Path)
    p.add_argument("--target", choices=sorted(SEEDS), default=None, help="default: all")
    a = p.parse_args()
    for t in [a.target] if a.target else sorted(SEEDS):
        n = write_seeds(t, a.outdir / t)
        print(f"{t}: {n} seeds in {a.outdir / t}")


if __name__ == "__main__":
    main()
