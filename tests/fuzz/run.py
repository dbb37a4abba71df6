"""Run one fuzz target under atheris (libFuzzer) for a set number of inputs.

    python -m tests.fuzz.run --target stream --runs 1000000
    python -m tests.fuzz.run --target codec --runs 200000 --corpus /tmp/corpus-codec
    python -m tests.fuzz.run --target stream --replay crash-1234...   (re-run one input)
    python -m tests.fuzz.run --list

Targets (tests/fuzz/oracles.py has each one's rules):
    stream   xenbind.stream.Decoder over whole legacy streams (Formats A and B,
             every codec), fed whole and in pieces
    codec    xenbind.compress.Decompressor (the C kernel) against a reference
             decoder, both formats
    session  xenbind.session.ReceiverSession: the HELLO and what follows
    reply    xenbind.session.SenderSession: ACCEPT/REFUSE and the frames
    chunks   streams written chunk by chunk from a program (structure-aware)
    core     receiver.core.ReceiverCore (the receiver's session: handshake,
             initial copy, staging, commits) over one connection's bytes
    core-disk  the same oracle over sessions whose HELLO names disks: the
             disk mirror stream in DISK chunks (epochs, seals, the DiskSink,
             the disks' image at the last commit)

The seed corpus (tests/fuzz/seeds.py, written by the project's encoders) is
generated into ``<corpus>/seeds`` on each start; libFuzzer adds what it finds
to ``<corpus>/found``. Crash inputs go to ``--artifacts`` (default
``<corpus>/crashes``), named by libFuzzer ``crash-<sha1>``.

Any flag after ``--`` goes to libFuzzer unchanged (e.g. ``-- -jobs=2``).
The xenbind modules are imported under ``atheris.instrument_imports`` so
libFuzzer sees their Python coverage (``cov:`` and ``ft:`` in its output);
the C kernel is not instrumented, but a crash inside it (SIGSEGV) kills the
process and libFuzzer saves the input.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback
from pathlib import Path

#: Largest input libFuzzer makes (a few pages of a stream: big enough for a
#: Format A batch and the 4097-byte full pages of the codecs).
DEFAULT_MAX_LEN = 32768


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    else:
        extra = []
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--target",
        default="stream",
        help="stream | chunks | codec | session | reply | core | core-disk",
    )
    p.add_argument("--runs", type=int, default=100_000, help="inputs to run (libFuzzer -runs)")
    p.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="corpus directory (default: /tmp/remus-fuzz/<target>)",
    )
    p.add_argument("--artifacts", type=Path, default=None, help="where crash inputs go")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN)
    p.add_argument("--seed", type=int, default=0, help="libFuzzer -seed (0: random)")
    p.add_argument(
        "--chunk",
        type=int,
        default=CHUNK_RUNS,
        help="run at most this many inputs per process; longer runs are split "
        "into successive processes sharing the corpus (0: never split)",
    )
    p.add_argument(
        "--replay",
        type=Path,
        nargs="*",
        default=None,
        help="run the target once on each file and print the outcome",
    )
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    return p.parse_args(argv), extra


def replay(target: str, files: list[Path]) -> int:
    """Run ``target`` on each file outside libFuzzer; 1 if any is a finding."""
    from tests.fuzz.oracles import TARGETS

    fn = TARGETS[target]
    bad = 0
    for f in files:
        data = f.read_bytes()
        try:
            fn(data)
        except Exception:  # noqa: BLE001 - a finding is any exception
            bad += 1
            print(f"{f}: FINDING ({len(data)} bytes)")
            traceback.print_exc()
        else:
            print(f"{f}: ok ({len(data)} bytes)")
    return 1 if bad else 0


#: Inputs per process: atheris's process grows by ~1.5 KiB per input here
#: (the same loop in plain Python stays flat), so long runs are cut in
#: processes of this many inputs sharing one corpus.
CHUNK_RUNS = 250_000

#: Inputs between two full garbage collections.
GC_EVERY = 500

#: glibc raises its mmap threshold after a large block is freed, up to 32 MiB;
#: the Decompressor's default cache (8192 pages = 32 MiB, np.zeros) then comes
#: from the heap and is memset on every input instead of being mapped lazily:
#: the fuzzer slows down fivefold and its RSS creeps. A fixed threshold keeps
#: every large block mmapped.
MMAP_THRESHOLD_ENV = ("MALLOC_MMAP_THRESHOLD_", str(1 << 20))


def run_in_chunks(args: argparse.Namespace, extra: list[str]) -> int:
    """``args.runs`` inputs as successive child processes of ``args.chunk``
    inputs each (the corpus carries over); stops at the first crash."""
    import subprocess

    done, part = 0, 0
    while done < args.runs:
        n = min(args.chunk, args.runs - done)
        cmd = [
            sys.executable,
            "-m",
            "tests.fuzz.run",
            "--target",
            args.target,
            "--runs",
            str(n),
            "--max-len",
            str(args.max_len),
            "--chunk",
            "0",
        ]
        if args.corpus:
            cmd += ["--corpus", str(args.corpus)]
        if args.artifacts:
            cmd += ["--artifacts", str(args.artifacts)]
        if args.seed:
            cmd += ["--seed", str(args.seed + part)]
        if extra:
            cmd += ["--", *extra]
        print(f"fuzz: chunk {part}: inputs {done}..{done + n} of {args.runs}", flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"fuzz: chunk {part} ended with status {rc}: a finding (see above)", flush=True)
            return rc
        done += n
        part += 1
    print(f"fuzz: {done} inputs in {part} chunks, no finding", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    name, value = MMAP_THRESHOLD_ENV
    if argv is None and name not in os.environ:
        os.environ[name] = value
        os.execv(sys.executable, [sys.executable, "-m", "tests.fuzz.run", *sys.argv[1:]])
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    import atheris

    with atheris.instrument_imports(include=["xenbind", "receiver", "tests.fuzz.oracles"]):
        import receiver.core  # noqa: F401
        import xenbind.compress  # noqa: F401
        import xenbind.session  # noqa: F401

        try:
            import xenbind.stream  # noqa: F401
        except ImportError:  # the stream decoder has not landed yet
            pass
        from tests.fuzz import oracles

    if args.list:
        print("\n".join(sorted(oracles.TARGETS)))
        return 0
    if args.target not in oracles.TARGETS:
        print(
            f"unknown target {args.target!r}; known: {', '.join(sorted(oracles.TARGETS))}",
            file=sys.stderr,
        )
        return 2
    if args.replay is not None:
        return replay(args.target, args.replay)

    if args.chunk and args.runs > args.chunk:
        return run_in_chunks(args, extra)

    from tests.fuzz.seeds import write_seeds

    corpus = args.corpus or Path("/tmp/remus-fuzz") / args.target
    seeds_dir, found_dir = corpus / "seeds", corpus / "found"
    artifacts = args.artifacts or corpus / "crashes"
    for d in (seeds_dir, found_dir, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    n = write_seeds(args.target, seeds_dir)
    print(
        f"fuzz: target {args.target}, {n} seeds in {seeds_dir}, corpus {found_dir}, "
        f"crashes -> {artifacts}",
        flush=True,
    )

    fn = oracles.TARGETS[args.target]
    count = 0

    def one_input(data: bytes) -> None:
        nonlocal count
        fn(data)
        count += 1
        if count % GC_EVERY == 0:
            # a Decoder sits in a reference cycle (its bound-method handler),
            # so only the cyclic GC frees it and its Decompressor's cache:
            # collect now and then, or RSS creeps (docs/fuzzing.md)
            gc.collect()

    lf_argv = [
        sys.argv[0],
        str(found_dir),
        str(seeds_dir),
        f"-runs={args.runs}",
        f"-max_len={args.max_len}",
        f"-artifact_prefix={artifacts}{os.sep}",
        f"-seed={args.seed}",
        "-print_final_stats=1",
        "-timeout=10",
        "-rss_limit_mb=2048",
        *extra,
    ]
    atheris.Setup(lf_argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
