"""Fuzzing the receiver's decoding path (issue 6, "Hostile input").

    oracles   one function per target: bytes in, the rules checked, nothing
              but the project's own errors may come out (no atheris needed:
              tests/fuzz/test_short_run.py calls the same functions)
    seeds     the seed corpus, written by the project's own encoders
    run       the atheris/libFuzzer driver: python -m tests.fuzz.run --help

docs/fuzzing.md says how to run it and what it found.
"""
