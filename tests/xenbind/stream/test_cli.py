"""`python -m xenbind.stream inspect|replay`: output, exit status, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xenbind.stream import StreamWriter, encode_memory_digest, memory_digest
from xenbind.stream.cli import main
from xenbind.stream.encoder import Buffer
from xenbind.types import Context

PAGE = 4096
CTX = Context((1, 2, 3), b"ctx", b"dm")
ROOT = Path(__file__).resolve().parents[3]


def make_stream(codec: str = "seed", p2m: int = 64, rounds: int = 3, seed: int = 0):
    """A stream and the memory after each checkpoint."""
    rng = np.random.default_rng(seed)
    mem = rng.integers(0, 256, (p2m, PAGE), dtype=np.uint8)
    w = StreamWriter(p2m, codec=codec)
    bufs: list[Buffer] = [w.header()]
    bufs += w.checkpoint(
        np.arange(p2m, dtype=np.uint64), mem.copy(), CTX, digest=memory_digest(mem)
    )
    states = [mem.copy()]
    for _ in range(rounds):
        pfns = np.sort(rng.choice(p2m, 10, replace=False)).astype(np.uint64)
        pages = mem[pfns.astype(np.intp)].copy()
        pages[:, 64:68] ^= 0x5A
        mem[pfns.astype(np.intp)] = pages
        bufs.append(w.heartbeat())
        bufs += w.checkpoint(pfns, pages, CTX, digest=memory_digest(mem))
        states.append(mem.copy())
    return b"".join(bytes(b) for b in bufs), states


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "xenbind.stream", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_inspect_valid(tmp_path, capsys):
    data, _ = make_stream()
    f = tmp_path / "s.stream"
    f.write_bytes(data)
    assert main(["inspect", str(f)]) == 0
    out = capsys.readouterr().out
    assert "checkpoints 4 whole (1 Format A, 3 Format B)" in out
    assert "codec       seed, cache 8192 pages" in out
    assert "heartbeats 3" in out


def test_inspect_json(tmp_path, capsys):
    data, _ = make_stream("xen")
    f = tmp_path / "s.stream"
    f.write_bytes(data)
    assert main(["inspect", str(f), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["checkpoints"] == 4 and s["codec"] == "xen" and s["p2m_size"] == 64
    assert s["torn"] is None and s["bytes"] == len(data)
    assert s["pages"] == 64 + 30 and s["format_b_pages"] == 30
    assert s["compressed_chunks"] == 3 and s["compressed_bytes"] > 0
    assert s["ratio"] == pytest.approx(30 * PAGE / s["compressed_bytes"])
    assert s["tags"] == {"enable_compression": 1, "memory_digest": 4}
    assert [c["format"] for c in s["per_checkpoint"]] == ["A", "B", "B", "B"]
    # every byte after the header belongs to a checkpoint (heartbeats before it included)
    assert sum(c["bytes"] for c in s["per_checkpoint"]) == len(data) - 8


def test_inspect_torn_tail_is_valid_and_reported(tmp_path, capsys):
    data, _ = make_stream()
    f = tmp_path / "t.stream"
    f.write_bytes(data[:-10])
    assert main(["inspect", str(f), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["checkpoints"] == 3
    assert s["torn"]["checkpoint"] == 3 and s["torn"]["offset"] == len(data) - 10
    assert s["tags"]["memory_digest"] == 3  # the torn checkpoint's tags are not counted
    assert main(["inspect", str(f)]) == 0
    assert "torn        checkpoint 3" in capsys.readouterr().out


def test_inspect_malformed_one_line_no_traceback(tmp_path):
    data, _ = make_stream()
    bad = bytearray(data)
    bad[8:12] = (5000).to_bytes(4, "little")  # first chunk: a batch of 5000
    f = tmp_path / "bad.stream"
    f.write_bytes(bad)
    r = run("inspect", str(f))
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == f"{f}: byte 8: checkpoint 0: batch of 5000 pages exceeds the maximum of 1024"


def test_inspect_cut_header_and_missing_file(tmp_path):
    f = tmp_path / "h.stream"
    f.write_bytes(b"\x01\x00\x00")
    r = run("inspect", str(f))
    assert r.returncode == 1 and "inside the header" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run("inspect", str(tmp_path / "nope"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_help_is_complete():
    r = run("--help")
    assert r.returncode == 0
    for words in ("inspect FILE", "replay FILE -o IMAGE", "exit status", "torn", "examples"):
        assert words in r.stdout


@pytest.mark.parametrize("codec", ["none", "xen", "seed"])
def test_replay_whole_stream(tmp_path, capsys, codec):
    data, states = make_stream(codec)
    f = tmp_path / "s.stream"
    f.write_bytes(data)
    img = tmp_path / "img"
    assert main(["replay", str(f), "-o", str(img), "--verify"]) == 0
    assert "applied 4 checkpoints" in capsys.readouterr().out
    got = np.fromfile(img, np.uint8).reshape(-1, PAGE)
    assert np.array_equal(got, states[-1])


def test_replay_torn_keeps_last_whole(tmp_path, capsys):
    data, states = make_stream()
    f = tmp_path / "t.stream"
    f.write_bytes(data[:-10])
    img = tmp_path / "img"
    assert main(["replay", str(f), "-o", str(img)]) == 0
    out = capsys.readouterr().out
    assert "applied 3 checkpoints" in out and "torn checkpoint 3" in out
    assert np.array_equal(np.fromfile(img, np.uint8).reshape(-1, PAGE), states[2])


def test_replay_no_whole_checkpoint(tmp_path, capsys):
    data, _ = make_stream()
    f = tmp_path / "t.stream"
    f.write_bytes(data[:5000])
    img = tmp_path / "img"
    assert main(["replay", str(f), "-o", str(img)]) == 1
    assert not img.exists()
    assert "no checkpoint arrived whole" in capsys.readouterr().err


def test_replay_malformed_midway_keeps_last_good(tmp_path, capsys):
    data, states = make_stream("xen")
    # corrupt the 4th checkpoint's chunk type (after the 3rd heartbeat)
    from xenbind.stream import Decoder, Heartbeat, Image

    img0 = Image()
    d = Decoder(base=img0.base)
    seen = 0
    pos = None
    for i in range(len(data)):
        for e in d.feed(data[i : i + 1]):
            img0.handle(e)
            if isinstance(e, Heartbeat):
                seen += 1
                if seen == 3:
                    pos = i + 1
    bad = bytearray(data)
    bad[pos : pos + 4] = (-77).to_bytes(4, "little", signed=True)
    f = tmp_path / "bad.stream"
    f.write_bytes(bad)
    img = tmp_path / "img"
    assert main(["replay", str(f), "-o", str(img)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"{f}: byte {pos}: unknown chunk type -77"
    assert np.array_equal(np.fromfile(img, np.uint8).reshape(-1, PAGE), states[2])


def test_replay_verify_catches_digest_mismatch(tmp_path, capsys):
    data, _ = make_stream()
    # replace checkpoint 0's digest by a wrong one
    rng = np.random.default_rng(0)
    mem = rng.integers(0, 256, (64, PAGE), dtype=np.uint8)
    good = encode_memory_digest(memory_digest(mem))
    assert data.count(good) == 1
    wrong = encode_memory_digest(b"\x00" * 16)
    f = tmp_path / "d.stream"
    f.write_bytes(data.replace(good, wrong))
    img = tmp_path / "img"
    assert main(["replay", str(f), "-o", str(img)]) == 0  # not checked without --verify
    capsys.readouterr()
    assert main(["replay", str(f), "-o", str(img), "--verify"]) == 1
    assert "checkpoint 0: memory digest mismatch" in capsys.readouterr().err
