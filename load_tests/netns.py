"""A second host on this machine: a Linux network namespace joined to this one by a veth pair.

Tests and ``python -m load_tests.chaos --hosts`` run node runtimes inside it, so they reach the
gateway and the store only over the veth link, at a private address, as a node on another host
would (loopback inside the namespace is its own). Needs root and iproute2 (``ip``); callers skip
with :func:`unavailable_reason`'s reason elsewhere. Everything created here is deleted again.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET_PREFIX = "10.213"  # a /30 per pair inside 10.213.0.0/16, private and used by nothing else here


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class HostPair:
    """One namespace (``netns``) with address ``node_ip``, linked to this host's ``host_ip``."""

    netns: str
    host_link: str
    host_ip: str
    node_ip: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` to run inside the namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def unavailable_reason() -> str | None:
    """Why a namespace cannot be made here (not root, no ``ip``), or None when it can."""
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` to create network namespaces"
    if os.geteuid() != 0:
        return "needs root to create network namespaces and veth pairs"
    name = f"cxprobe{os.getpid()}"
    made = _ip("netns", "add", name)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", name)
    return None


def _free_subnet() -> int:
    used = _ip("-o", "-4", "addr").stdout
    for _ in range(200):
        block = random.randrange(0, 256 * 64)  # 16384 /30 blocks
        third, fourth = divmod(block * 4, 256)
        if f"{SUBNET_PREFIX}.{third}.{fourth + 1}/" not in used:
            return block
    raise RuntimeError("no free /30 left in " + SUBNET_PREFIX + ".0.0/16")


@contextmanager
def host_pair(tag: str = "n") -> Iterator[HostPair]:
    """Create a namespace and its veth link; delete both afterwards, whatever happened."""
    suffix = f"{os.getpid() % 100000}{random.randrange(100):02d}"
    netns, host_link, node_link = f"cyxwiz-{tag}{suffix}", f"cxh{suffix}", f"cxn{suffix}"
    third, fourth = divmod(_free_subnet() * 4, 256)
    host_ip, node_ip = f"{SUBNET_PREFIX}.{third}.{fourth + 1}", f"{SUBNET_PREFIX}.{third}.{fourth + 2}"
    steps = [
        ("netns", "add", netns),
        ("link", "add", host_link, "type", "veth", "peer", "name", node_link),
        ("link", "set", node_link, "netns", netns),
        ("addr", "add", f"{host_ip}/30", "dev", host_link),
        ("link", "set", host_link, "up"),
        ("-n", netns, "addr", "add", f"{node_ip}/30", "dev", node_link),
        ("-n", netns, "link", "set", node_link, "up"),
        ("-n", netns, "link", "set", "lo", "up"),
    ]
    try:
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                raise RuntimeError(f"ip {' '.join(step)}: {done.stderr.strip()}")
        yield HostPair(netns, host_link, host_ip, node_ip)
    finally:
        _ip("netns", "del", netns)  # takes the namespace's end of the pair, and so the pair, with it
        _ip("link", "del", host_link)
