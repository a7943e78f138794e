"""Command line: `python -m orchard demo` (also the `orchard` console script)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs the chosen subcommand; returns the exit status."""
    from orchard import demo

    parser = argparse.ArgumentParser(prog="orchard", description="Orchard fused attention tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(sub.add_parser("demo", help=demo.__doc__, description=demo.__doc__,
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = parser.parse_args(argv)
    return demo.run(args)


if __name__ == "__main__":
    sys.exit(main())
