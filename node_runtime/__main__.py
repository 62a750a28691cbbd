"""``python -m node_runtime``: the same as ``cyxwiz node``."""

from __future__ import annotations

import argparse
import sys

from node_runtime.settings import add_node_arguments, run_node_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node_runtime", description="A CyxWiz node runtime.")
    add_node_arguments(parser)
    return run_node_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
