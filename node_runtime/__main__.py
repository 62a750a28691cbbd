"""``python -m node_runtime``: the same as ``cyxwiz node``."""

from __future__ import annotations

import argparse
import sys

from node_runtime.agent import run_node
from node_runtime.settings import add_node_arguments, settings_from_args
from shared.settings import SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node_runtime", description="A CyxWiz node runtime.")
    add_node_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"cyxwiz node: {exc}", file=sys.stderr)
        return 2
    return run_node(settings)


if __name__ == "__main__":
    sys.exit(main())
