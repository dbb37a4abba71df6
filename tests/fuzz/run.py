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
    p.add_argument("--target", default="stream", help="stream | codec | session | reply")
    p.add_argument("--runs", type=int, default=100_000, help="inputs to run (libFuzzer -runs)")
    p.add_argument("--corpus", type=Path, default=None,
                   help="corpus directory (default: /tmp/remus-fuzz/<target>)")
    p.add_argument("--artifacts", type=Path, default=None, help="where crash inputs go")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN)
    p.add_argument("--seed", type=int, default=0, help="libFuzzer -seed (0: random)")
    p.add_argument("--replay", type=Path, nargs="*", default=None,
                   help="run the target once on each file and print the outcome")
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


def main(argv: list[str] | None = None) -> int:
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    import atheris

    with atheris.instrument_imports(include=["xenbind", "tests.fuzz.oracles"]):
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
        print(f"unknown target {args.target!r}; known: {', '.join(sorted(oracles.TARGETS))}",
              file=sys.stderr)
        return 2
    if args.replay is not None:
        return replay(args.target, args.replay)

    from tests.fuzz.seeds import write_seeds

    corpus = args.corpus or Path("/tmp/remus-fuzz") / args.target
    seeds_dir, found_dir = corpus / "seeds", corpus / "found"
    artifacts = args.artifacts or corpus / "crashes"
    for d in (seeds_dir, found_dir, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    n = write_seeds(args.target, seeds_dir)
    print(f"fuzz: target {args.target}, {n} seeds in {seeds_dir}, corpus {found_dir}, "
          f"crashes -> {artifacts}", flush=True)

    fn = oracles.TARGETS[args.target]

    def one_input(data: bytes) -> None:
        fn(data)

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
        "-rss_limit_mb=1024",
        *extra,
    ]
    atheris.Setup(lf_argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
