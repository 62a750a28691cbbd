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
from typing import Any, Protocol

import orjson

from shared import errors, keys
from shared import safetensors_check as st
from shared.jobs import draw
from shared.store import Store

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # with fullmatch: "$" would accept a final newline
CHUNK_BYTES = 512 * 1024
MODEL = "model.safetensors"
CHECKPOINT = "checkpoint.safetensors"  # uploads are kept per (attempt, step); downloads get the latest
CHECKED = (MODEL, CHECKPOINT)


class ArtifactCheck:
    """What the gateway reads of a model or checkpoint upload as it streams by (no torch, no copy):
    the safetensors header checked against what the job's spec builds, and the digests of its tensors,
    which become the control plane's record of that state (docs/verification.md)."""

    def __init__(self, name: str, attempt: int, spec: dict[str, Any]) -> None:
        self.name, self.attempt, self.spec = name, attempt, spec
        self.stream = st.StreamingDigest(name)

    async def wrap(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for piece in body:
            self.stream.feed(piece)  # raises InvalidArtifact (422) as soon as the bytes say so
            yield piece

    def verdict(self) -> tuple[str, str, str]:
        """(kind for COMMIT_ARTIFACT, the state's JSON, the name the bytes are kept under)."""
        digest = self.stream.finish()
        meta = digest.header.metadata
        if self.name == MODEL:
            st.check_weights(digest.header, self.spec)
            state = {"weights": digest.weights, "threads": _int_or_none(meta.get("threads")),
                     "device_kind": meta.get("device_kind", ""), "torch": meta.get("torch", ""),
                     "data": meta.get("data", "")}
            return "weights", _json(state), self.name
        info = st.check_checkpoint(digest.header, self.spec)
        state = {"step": info["step"], "epoch": info["epoch"], "batch": info["batch"], "weights": digest.weights,
                 "optimizer": digest.optimizer, "threads": info.get("threads"),
                 "device_kind": info.get("device_kind", ""),
                 "torch": info.get("torch", ""), "data": info.get("data", "")}
        return "checkpoint", _json(state), keys.checkpoint_artifact_name(self.attempt, info["step"])


def _json(state: dict[str, Any]) -> str:
    """The state for Lua: no nulls (cjson makes them a truthy placeholder)."""
    return orjson.dumps({k: v for k, v in state.items() if v is not None}).decode()


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() and len(text) < 6 else None


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
                  declared: int | None = None, check: ArtifactCheck | None = None) -> int:
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
        kind = state = ""
        stored = name
        if check is not None:
            body = check.wrap(body)
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
            if check is not None:
                kind, state, stored = check.verdict()
        except BaseException:
            with contextlib.suppress(Exception):  # a store outage: the reservation lapses at its expiry
                await self.store.raw.delete(upload)
                await self.store.run("END_UPLOAD", [job_id, name, upload_id])
            raise
        try:
            await self.store.run("COMMIT_ARTIFACT", [job_id, node_id, attempt, name, size,
                                                     settings.max_job_artifact_bytes, upload_id, kind, state,
                                                     draw()],
                                 keys=[upload, keys.artifact_key(job_id, stored)])
        except errors.ApiError as error:
            if error.code == "invalid_artifact":  # refused after the reservation was dropped: tidy up
                with contextlib.suppress(Exception):
                    await self.store.raw.delete(upload)
            raise
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
