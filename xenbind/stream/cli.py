"""``python -m xenbind.stream``: inspect and replay captured checkpoint streams.

    inspect FILE [--json]     summary: checkpoints, chunks, pages, bytes, codec, ratio
    replay FILE -o IMAGE      guest memory as of the last checkpoint that arrived whole

Exit status: 0 the stream is valid (a torn last checkpoint included: that is
how a capture ends when the primary dies; it is reported and dropped);
1 the stream is malformed, cut inside its header, or (replay) no checkpoint
arrived whole or a memory digest did not match; 2 bad usage or an unreadable
file. Errors are one line on stderr, ``FILE: byte N: reason``; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import RemusError, StreamError
from ..types import PageArray, PfnArray
from . import events as ev
from .decoder import BaseSource, Decoder, MalformedStream, TruncatedStream
from .encoder import memory_digest
from .format import PAGE_SIZE, PFN_MASK
from .image import Image

READ_SIZE = 1 << 20

DESCRIPTION = """\
Inspect or replay a captured legacy libxc checkpoint stream: the stream
remusd writes with --to file:PATH, or any Xen 4.2-4.5 save/Remus stream of an
HVM guest (header, one body + tail per checkpoint). The stream describes
itself: Format A bodies carry raw pages; after ENABLE_COMPRESSION the bodies
are Format B, decoded with the codec the stream announces (the project's CODEC
tag) or, without one, Xen's own format with its 8192-page cache.
"""

EPILOG = """\
commands:
  inspect FILE [--json]
      Decode the whole stream and print a summary: p2m_size, codec and cache
      size, the number of checkpoints that arrived whole (Format A / B), chunk
      counts by kind, pages carried, page bytes, compressed bytes and the
      compression ratio of the Format B bodies (page bytes / compressed bytes),
      heartbeats, LAST_CHECKPOINT, and one line per checkpoint. A stream that
      ends inside a checkpoint is valid: the torn checkpoint is reported (its
      index and the byte where the stream ends) and ignored, as a receiver
      ignores it. --json prints the same as one JSON object.

  replay FILE -o IMAGE [--verify]
      Rebuild the guest's memory, p2m_size x 4096 bytes raw, in IMAGE (created
      or overwritten, written through a memory map so large guests fit), as of
      the last checkpoint that arrived whole. Each checkpoint is staged and
      applied only once its tail has arrived; a torn last checkpoint is
      dropped. Prints how many checkpoints were applied. --verify checks every
      MEMORY_DIGEST the stream carries against the rebuilt memory. If the
      stream turns out malformed part way, IMAGE keeps the last checkpoint
      that arrived whole before the fault and the exit status is 1. If no
      checkpoint arrived whole, IMAGE is removed.

exit status:
  0  valid stream (possibly with a torn, dropped last checkpoint)
  1  malformed stream, stream cut inside its header, replay without a whole
     checkpoint, or a digest mismatch under --verify
  2  bad usage, unreadable input, unwritable output

examples:
  python -m xenbind.stream inspect /var/lib/remus/web1.stream
  python -m xenbind.stream inspect capture.stream --json | jq .ratio
  python -m xenbind.stream replay capture.stream -o web1.img --verify

The layout is documented in docs/stream.md.
"""


def _read(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(READ_SIZE):
            yield block


def _decoder(base: BaseSource) -> Decoder:
    # A capture may come from any guest: allow every PFN the format can name.
    return Decoder(max_p2m_size=PFN_MASK + 1, base=base)


def _zero_base(pfns: PfnArray, out: PageArray) -> None:
    """inspect's base source: it counts pages, their contents do not matter."""
    out[: len(pfns)] = 0


def _decode(path: str, base: BaseSource = _zero_base) -> Iterator[ev.Event]:
    """Events of the file; a torn tail ends the iteration with TruncatedStream
    raised; a malformed stream raises MalformedStream after yielding the
    events decoded before the fault. ``base``: the decoder's base source (the
    caller handles every event of a block before the next block is fed)."""
    d = _decoder(base)
    for block in _read(path):
        try:
            events = d.feed(block)
        except MalformedStream as e:
            yield from e.events
            raise
        yield from events
    d.eof()


# ----------------------------------------------------------------- inspect


@dataclass
class _Checkpoint:
    index: int
    format: str = "A"
    start: int = 0
    end: int = 0
    pages: int = 0
    pfn_chunks: int = 0
    compressed_chunks: int = 0
    compressed_bytes: int = 0
    heartbeats: int = 0
    tags: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        ratio = self.pages * PAGE_SIZE / self.compressed_bytes if self.compressed_bytes else None
        return {
            "index": self.index,
            "format": self.format,
            "offset": self.start,
            "bytes": self.end - self.start,
            "pages": self.pages,
            "page_bytes": self.pages * PAGE_SIZE,
            "pfn_chunks": self.pfn_chunks,
            "compressed_chunks": self.compressed_chunks,
            "compressed_bytes": self.compressed_bytes,
            "ratio": ratio,
        }


_TAG_EVENTS = {
    ev.TscInfo: "tsc_info",
    ev.VcpuInfo: "vcpu_info",
    ev.HvmParam: "hvm_param",
    ev.Toolstack: "toolstack",
    ev.CodecAnnounce: "codec",
    ev.EnableCompression: "enable_compression",
    ev.LastCheckpoint: "last_checkpoint",
    ev.Switchover: "switchover",
    ev.MemoryDigest: "memory_digest",
}


def _inspect(path: str) -> tuple[dict[str, Any], StreamError | None]:
    summary: dict[str, Any] = {
        "file": path,
        "bytes": os.path.getsize(path),
        "p2m_size": None,
        "codec": "none",
        "cache_pages": None,
        "checkpoints": 0,
        "format_a": 0,
        "format_b": 0,
        "pfn_chunks": 0,
        "compressed_chunks": 0,
        "tags": {},
        "heartbeats": 0,
        "pages": 0,
        "page_bytes": 0,
        "format_b_pages": 0,
        "compressed_bytes": 0,
        "ratio": None,
        "last_checkpoint": False,
        "torn": None,
        "per_checkpoint": [],
    }
    tags: Counter[str] = Counter()
    cur = _Checkpoint(0, start=8)
    error: StreamError | None = None
    try:
        for e in _decode(path):
            if isinstance(e, ev.Header):
                summary["p2m_size"] = e.p2m_size
            elif isinstance(e, ev.PageBatch):
                cur.pfn_chunks += 1
            elif isinstance(e, ev.Pages):
                cur.pages += len(e.pfns)
                if e.compressed_bytes is not None:
                    cur.compressed_chunks += 1
                    cur.compressed_bytes += e.compressed_bytes
            elif isinstance(e, ev.Heartbeat):
                summary["heartbeats"] += 1
            elif isinstance(e, ev.CheckpointEnd):
                cur.format, cur.end = e.format, e.offset
                summary["per_checkpoint"].append(cur.as_dict())
                summary["checkpoints"] += 1
                summary["format_a" if e.format == "A" else "format_b"] += 1
                summary["pfn_chunks"] += cur.pfn_chunks
                summary["compressed_chunks"] += cur.compressed_chunks
                summary["pages"] += cur.pages
                tags.update(cur.tags)
                if e.format == "B":
                    summary["format_b_pages"] += cur.pages
                    summary["compressed_bytes"] += cur.compressed_bytes
                cur = _Checkpoint(e.index + 1, start=e.offset)
            elif type(e) in _TAG_EVENTS:
                cur.tags[_TAG_EVENTS[type(e)]] += 1
                if isinstance(e, ev.EnableCompression):
                    summary["codec"], summary["cache_pages"] = e.codec, e.cache_pages
                elif isinstance(e, ev.LastCheckpoint):
                    summary["last_checkpoint"] = True
    except TruncatedStream as t:
        if t.torn_checkpoint is None:
            error = t
        else:
            summary["torn"] = {
                "checkpoint": t.torn_checkpoint,
                "offset": t.offset,
                "reason": t.reason,
            }
    except MalformedStream as m:
        error = m
    summary["tags"] = dict(sorted(tags.items()))
    summary["page_bytes"] = summary["pages"] * PAGE_SIZE
    if summary["compressed_bytes"]:
        summary["ratio"] = summary["format_b_pages"] * PAGE_SIZE / summary["compressed_bytes"]
    return summary, error


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _print_summary(s: dict[str, Any]) -> None:
    out = sys.stdout.write
    p2m = s["p2m_size"]
    out(f"stream      {s['file']}: {s['bytes']} bytes ({_mib(s['bytes'])})\n")
    out(f"guest       p2m_size {p2m} pages ({_mib(p2m * PAGE_SIZE)})\n")
    cache = f", cache {s['cache_pages']} pages" if s["cache_pages"] else ""
    out(f"codec       {s['codec']}{cache}\n")
    out(
        f"checkpoints {s['checkpoints']} whole ({s['format_a']} Format A, "
        f"{s['format_b']} Format B)"
        + (", ended by LAST_CHECKPOINT" if s["last_checkpoint"] else "")
        + "\n"
    )
    if s["torn"]:
        t = s["torn"]
        out(
            f"torn        checkpoint {t['checkpoint']}: stream ends at byte {t['offset']}; "
            "dropped, as a receiver drops it\n"
        )
    tags = ", ".join(f"{k} {v}" for k, v in s["tags"].items()) or "none"
    out(
        f"chunks      {s['pfn_chunks']} PFN, {s['compressed_chunks']} COMPRESSED_DATA; "
        f"tags: {tags}; heartbeats {s['heartbeats']}\n"
    )
    out(f"pages       {s['pages']} ({_mib(s['page_bytes'])} of page data)\n")
    if s["ratio"] is not None:
        out(
            f"format B    {s['format_b_pages']} pages ({_mib(s['format_b_pages'] * PAGE_SIZE)}) "
            f"in {s['compressed_bytes']} compressed bytes: ratio {s['ratio']:.2f}:1\n"
        )
    if s["per_checkpoint"]:
        out("\n  index fmt      offset        bytes    pages  pfn-ch  cd-ch      ratio\n")
        rows = s["per_checkpoint"]
        if len(rows) > 40:
            rows = [*rows[:20], None, *rows[-20:]]
        for c in rows:
            if c is None:
                out(f"  ... {len(s['per_checkpoint']) - 40} more ...\n")
                continue
            r = f"{c['ratio']:.2f}:1" if c["ratio"] is not None else "-"
            out(
                f"  {c['index']:5d} {c['format']:>3} {c['offset']:11d} {c['bytes']:12d} "
                f"{c['pages']:8d} {c['pfn_chunks']:7d} {c['compressed_chunks']:6d} {r:>10}\n"
            )


def cmd_inspect(args: argparse.Namespace) -> int:
    summary, error = _inspect(args.file)
    if error is not None:
        _error_line(args.file, error)
        return 1
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_summary(summary)
    return 0


# ----------------------------------------------------------------- replay


def cmd_replay(args: argparse.Namespace) -> int:
    # the image is the decoder's base source: a delta page decodes on the
    # image's page (or the one staged before it), as on a receiver
    img = Image(direct_first=True)
    digest: bytes | None = None
    last: ev.CheckpointEnd | None = None
    note = ""
    status = 0
    try:
        for e in _decode(args.file, img.base):
            if isinstance(e, ev.Header):
                img.memory = np.memmap(
                    args.output, dtype=np.uint8, mode="w+", shape=(e.p2m_size, PAGE_SIZE)
                )
            elif isinstance(e, ev.MemoryDigest):
                digest = e.digest
            elif isinstance(e, ev.CheckpointEnd):
                # Nothing committed before checkpoint 0's end: its pages went
                # straight into the image; if it is torn the image is removed.
                img.handle(e)
                last = e
                assert img.memory is not None
                if args.verify and digest is not None and memory_digest(img.memory) != digest:
                    _error_line(
                        args.file,
                        StreamError(e.offset, f"checkpoint {e.index}: memory digest mismatch"),
                    )
                    status = 1
                    break
                digest = None
            else:
                img.handle(e)
    except TruncatedStream as t:
        if t.torn_checkpoint is None:
            _error_line(args.file, t)
            status = 1
        else:
            note = f"; torn checkpoint {t.torn_checkpoint} (stream ends at byte {t.offset}) dropped"
    except MalformedStream as m:
        _error_line(args.file, m)
        status = 1
    applied = img.applied
    if isinstance(img.memory, np.memmap):
        img.memory.flush()
    img.memory = None
    img.discard()
    if applied == 0:
        if os.path.exists(args.output):
            os.unlink(args.output)
        if status == 0:
            sys.stderr.write(f"{args.file}: no checkpoint arrived whole{note}; no image written\n")
        return 1
    assert last is not None
    print(
        f"applied {applied} checkpoint{'s' if applied != 1 else ''} "
        f"(last: checkpoint {last.index}, Format {last.format}) to {args.output}{note}"
    )
    return status


# ----------------------------------------------------------------- main


def _error_line(path: str, e: StreamError) -> None:
    sys.stderr.write(f"{path}: byte {e.offset}: {e.reason}\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xenbind.stream",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{inspect,replay}")
    pi = sub.add_parser(
        "inspect",
        help="summarise a captured stream",
        description="Summarise a captured stream; see `python -m xenbind.stream --help`.",
    )
    pi.add_argument("file", metavar="FILE", help="the captured stream")
    pi.add_argument("--json", action="store_true", help="print one JSON object")
    pi.set_defaults(func=cmd_inspect)
    pr = sub.add_parser(
        "replay",
        help="rebuild guest memory as of the last whole checkpoint",
        description="Rebuild guest memory; see `python -m xenbind.stream --help`.",
    )
    pr.add_argument("file", metavar="FILE", help="the captured stream")
    pr.add_argument("-o", "--output", metavar="IMAGE", required=True, help="raw memory image")
    pr.add_argument(
        "--verify", action="store_true", help="check MEMORY_DIGEST tags against the image"
    )
    pr.set_defaults(func=cmd_replay)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func  # cmd_inspect / cmd_replay
    try:
        return command(args)
    except BrokenPipeError:
        # the reader went away (e.g. `inspect ... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        sys.stderr.write(f"{e.filename or args.file}: {e.strerror or e}\n")
        return 2
    except RemusError as e:  # e.g. a codec that cannot be set up
        sys.stderr.write(f"{args.file}: {e}\n")
        return 1
