"""``cyxwiz node``, ``cyxwiz up`` and ``cyxwiz demo``: the node runtime and a one-machine cluster."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register node, up and demo on the CLI's sub-command parser."""
