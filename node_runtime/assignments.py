"""The node's assignment stream: the jobs the control plane placed on it, read through its consumer
group and acknowledged only once each job is over for this node.

Each entry carries job_id, attempt and spec (the normalized job spec as JSON). An entry is pending
from delivery until :meth:`AssignmentStream.ack`, which the runtime calls only once the job is
terminal or handed back; so after a broken connection, the pending entries are read again first
(XREADGROUP from id 0) and a job already received is never lost between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

PENDING_BATCH = 1000  # pending entries of one consumer are at most its slots plus a few ended ones


@dataclass(frozen=True)
class Assignment:
    """One stream entry: an attempt of a job for this node."""

    stream: str
    group: str
    entry_id: str
    job_id: str
    attempt: int
    spec: dict[str, Any]
    memory_limit_mb: int = 0  # the job's memory estimate with its margin (0: none given)
    task_id: str = ""  # a verification task: replay ``segment`` of the job for an audit, not train it
    segment: dict[str, Any] | None = None
    rank: int = 0  # a multi-node job (docs/distributed.md): this node's rank among world_size
    world_size: int = 1

    @property
    def key(self) -> tuple[str, int]:
        return self.task_id or self.job_id, self.attempt

    @property
    def name(self) -> str:
        if self.task_id:
            return f"verification {self.task_id} attempt {self.attempt} (job {self.job_id})"
        return f"job {self.job_id} attempt {self.attempt}"


class StreamGone(Exception):
    """The stream or its group no longer exists: the control plane removed this node."""


class AssignmentStream:
    """Reads and acknowledges one node's assignments (one consumer, named by the node id), with the
    node's own store user: the URL that registration handed out, which can do nothing else."""

    def __init__(self) -> None:
        self.url: str | None = None
        self._redis: aioredis.Redis | None = None
        self._pending_checked: set[str] = set()

    async def use(self, url: str) -> None:
        """Read through ``url`` from now on (a new registration, or the store moved); no-op if same."""
        if url == self.url:
            return
        await self.close()
        self.url = url
        self._redis = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                              socket_keepalive=True)
        self._pending_checked.clear()

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RedisConnectionError("no assignment stream yet: the node is not registered")
        return self._redis

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def reread_pending(self) -> None:
        """After a connection failure: read this consumer's pending entries again before new ones."""
        self._pending_checked.clear()

    async def read(self, stream: str, group: str, consumer: str, count: int,
                   block_ms: int | None) -> list[Assignment]:
        """This consumer's pending entries (once per connection), else up to ``count`` new ones,
        waiting up to ``block_ms`` for one (None: not at all).

        Raises :class:`StreamGone` when the stream was removed."""
        try:
            if stream not in self._pending_checked:
                reply = await self.redis.xreadgroup(group, consumer, {stream: "0"}, count=PENDING_BATCH)
                self._pending_checked.add(stream)
                pending = self._entries(stream, group, reply)
                if pending:
                    return pending
            reply = await self.redis.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise StreamGone(stream) from exc
            raise
        return self._entries(stream, group, reply)

    def _entries(self, stream: str, group: str, reply: Any) -> list[Assignment]:
        found: list[Assignment] = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                try:
                    found.append(Assignment(stream, group, entry_id, fields["job_id"], int(fields["attempt"]),
                                            orjson.loads(fields["spec"]), int(fields.get("memory_mb") or 0),
                                            fields.get("task_id", ""),
                                            orjson.loads(fields["segment"]) if fields.get("segment") else None,
                                            int(fields.get("rank") or 0), int(fields.get("world_size") or 1)))
                except (KeyError, TypeError, ValueError):  # deleted after delivery (XDEL) or malformed
                    found.append(Assignment(stream, group, entry_id, "", 0, {}))  # acknowledged, not run
        return found

    async def ack(self, assignment: Assignment) -> None:
        """The job is over for this node: acknowledge the entry and delete it (keeps the stream short).
        Not a MULTI: the node's store user may run nothing but XREADGROUP, XACK, XDEL and PING (an
        entry acknowledged but not deleted is harmless; the stream is capped)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(assignment.stream, assignment.group, assignment.entry_id)
            pipe.xdel(assignment.stream, assignment.entry_id)
            await pipe.execute()
