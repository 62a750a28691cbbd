"""The job state machine, as a table.

This table is the single source of truth: the Lua scripts in :mod:`shared.lua` get it compiled in
(:data:`LUA_TRANSITIONS`) and refuse any other move, so every transition is atomic and checked in
one place.
"""

from __future__ import annotations

JOB_STATUSES = ("queued", "assigned", "running", "completed", "failed", "cancelled")
TERMINAL = frozenset({"completed", "failed", "cancelled"})

# from-status -> the statuses it may move to, and why.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    # placed on a node; cancelled by its user; failed when it can never be placed again
    "queued": ("assigned", "cancelled", "failed"),
    # node starts it; node lost or handed back (queued, attempt + 1); retries spent (failed)
    "assigned": ("running", "queued", "completed", "failed", "cancelled"),
    # training ends; node lost or handed back (queued, attempt + 1); user cancels
    "running": ("completed", "failed", "cancelled", "queued"),
    # an audit found the result rests on a lying node's work: it trains again (docs/verification.md)
    "completed": ("queued",),
    "failed": (),
    "cancelled": (),
}

PRIORITY_BANDS = {"high": 0, "normal": 1, "low": 2}  # queue order: lower band first, then FIFO
PRIORITY_SCALE = 10**12  # a queue score is band * PRIORITY_SCALE + the job's submission sequence


def _lua_table() -> str:
    rows = []
    for source, targets in TRANSITIONS.items():
        inner = ", ".join(f"['{t}'] = true" for t in targets)
        rows.append(f"  ['{source}'] = {{{inner}}},")
    return "local TRANSITIONS = {\n" + "\n".join(rows) + "\n}\n"


LUA_TRANSITIONS = _lua_table()
