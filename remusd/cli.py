"""Placeholder command line until the daemon lands (issue 4)."""

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Remus high availability for Xen (not yet implemented).")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
