"""Artifact storage: final weights and checkpoints of jobs.

:class:`ArtifactStore` is the small interface the progress function uses; :class:`RedisArtifactStore`
(the default) keeps each artifact as a hash of fixed-size chunks. An upload streams into a
temporary key and is renamed into place by the fenced COMMIT_ARTIFACT script, so readers never see
half an artifact and a stale attempt can never overwrite the current one. A file or object store can
replace it by implementing the same three methods.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

from shared import errors, keys
from shared.store import Store

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # with fullmatch: "$" would accept a final newline
CHUNK_BYTES = 512 * 1024


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise errors.InvalidField("artifact names are 1-128 of A-Z, a-z, 0-9, '.', '_' and '-'", field="name")


class ArtifactStore(Protocol):
    async def put(self, job_id: str, name: str, node_id: str, attempt: int, body: AsyncIterator[bytes],
                  declared: int | None = None) -> int:
        """Store a whole artifact for this attempt of the job (``declared``: its Content-Length, if
        sent); return its size."""

    async def size(self, job_id: str, name: str) -> int | None:
        """The artifact's size, or None if there is none."""

    async def read(self, job_id: str, name: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes start..end (inclusive) of the artifact. The first piece is fetched before this returns,
        so a store failure becomes an error answer rather than a body cut off after its headers."""


class RedisArtifactStore:
    """Artifacts as chunked Redis hashes, capped per artifact and per job."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def put(self, job_id: str, name: str, node_id: str, attempt: int, body: AsyncIterator[bytes],
                  declared: int | None = None) -> int:
        settings = self.store.settings
        if declared is not None and declared > settings.max_artifact_bytes:
            raise errors.PayloadTooLarge(f"an artifact may be at most {settings.max_artifact_bytes} bytes")
        limit = settings.max_artifact_bytes if declared is None else declared
        upload_id = uuid.uuid4().hex
        # refuse before reading the body; reserve its size against the job's cap (one upload per name)
        await self.store.run("CHECK_UPLOAD", [job_id, node_id, attempt, name, upload_id, limit,
                                              settings.max_job_artifact_bytes, settings.max_artifacts_per_job,
                                              keys.UPLOAD_TTL_S * 1000])
        upload = keys.artifact_upload_key(job_id, name, upload_id)
        buffer = bytearray()
        size = chunks = 0
        try:
            async for piece in body:
                size += len(piece)
                if size > limit:
                    raise errors.PayloadTooLarge(f"the artifact is larger than the {limit} bytes it declared "
                                                 "or the per-artifact cap")
                buffer += piece
                while len(buffer) >= CHUNK_BYTES:
                    await self._write_chunk(job_id, name, upload_id, upload, chunks, bytes(buffer[:CHUNK_BYTES]))
                    del buffer[:CHUNK_BYTES]
                    chunks += 1
            if buffer or chunks == 0:
                await self._write_chunk(job_id, name, upload_id, upload, chunks, bytes(buffer))
                chunks += 1
            await self.store.raw.hset(upload, mapping={"size": size, "chunk_size": CHUNK_BYTES, "chunks": chunks})
        except BaseException:
            with contextlib.suppress(Exception):  # a store outage: the reservation lapses at its expiry
                await self.store.raw.delete(upload)
                await self.store.run("END_UPLOAD", [job_id, name, upload_id])
            raise
        await self.store.run("COMMIT_ARTIFACT", [job_id, node_id, attempt, name, size,
                                                 settings.max_job_artifact_bytes, upload_id],
                             keys=[upload, keys.artifact_key(job_id, name)])
        return size

    async def _write_chunk(self, job_id: str, name: str, upload_id: str, upload: str, index: int,
                           data: bytes) -> None:
        """One chunk, and in the same round trip whether a newer upload of the name replaced this one
        (then 409: it stops, and the caller deletes what it wrote)."""
        async with self.store.raw.pipeline(transaction=True) as pipe:
            pipe.hset(upload, str(index), data)
            pipe.expire(upload, keys.UPLOAD_TTL_S)
            pipe.hget(keys.job_uploads_key(job_id), name)
            *_, reservation = await pipe.execute()
        if not reservation or not reservation.startswith(upload_id.encode() + b"|"):
            raise errors.Conflict(f"a newer upload of {name} for job {job_id} replaced this one",
                                  code="upload_replaced")

    async def size(self, job_id: str, name: str) -> int | None:
        raw = await self.store.redis.hget(keys.artifact_key(job_id, name), "size")
        return None if raw is None else int(raw)

    async def read(self, job_id: str, name: str, start: int, end: int) -> AsyncIterator[bytes]:
        key = keys.artifact_key(job_id, name)
        first = start // CHUNK_BYTES
        head = await self.store.raw.hget(key, str(first))

        async def pieces() -> AsyncIterator[bytes]:
            chunk = head
            for index in range(first, end // CHUNK_BYTES + 1):
                if index > first:
                    chunk = await self.store.raw.hget(key, str(index))
                if chunk is None:  # replaced or removed mid-read
                    return
                base = index * CHUNK_BYTES
                yield chunk[max(0, start - base): end - base + 1]

        return pieces()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as (start, end) inclusive; None means the whole body.
    Raises :class:`RangeNotSatisfiable` when it cannot be served."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None  # other units and multi-ranges: serve the whole thing, as RFC 9110 allows
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            length = int(last)
            if length <= 0:
                raise RangeNotSatisfiable(size)
            return max(0, size - length), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        raise RangeNotSatisfiable(size)
    return start, min(end, size - 1)


class RangeNotSatisfiable(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for {size} bytes")
        self.size = size
