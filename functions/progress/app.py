"""Progress function: nodes report progress and upload artifacts; users read, stream and download.

POST /v1/jobs/{id}/progress, POST /v1/jobs/{id}/logs, PUT /v1/jobs/{id}/artifacts/{name} and
GET /v1/jobs/{id}/attempts/{n} (node session token);
GET /v1/jobs/{id}/progress, GET /v1/jobs/{id}/events (SSE), GET /v1/jobs/{id}/logs (text, or followed)
and GET /v1/jobs/{id}/artifacts/{name} (API key; HTTP Range honoured).
Run alone: ``hypercorn functions.progress.app:app``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from shared import auth, errors, jobs, keys, logs
from shared.artifacts import CHECKED, ArtifactCheck, RangeNotSatisfiable, RedisArtifactStore, check_name, parse_range
from shared.http import JSONResponse, make_app, read_json, store_of
from shared.sse import CountedEventStream, admit_stream, job_event_stream
from shared.validation import is_number

ATTEMPT_HEADER = "x-cyxwiz-attempt"  # fences uploads; without it the job's current attempt is meant
TASK_HEADER = "x-cyxwiz-task"  # a verifier's downloads: the verification task it holds


async def _node(request: Request) -> str:
    return await auth.authenticate_node_token(store_of(request), request.headers.get("authorization"))


async def _as_node(request: Request, operation: Callable[..., Awaitable[dict[str, Any]]], target: str) -> Response:
    """A node's report in one round trip: the operation's script checks the session token before anything
    else; a bad token still answers 401 first, as when it was checked on its own."""
    store = store_of(request)
    node_id, token_hash = auth.session_claim(request.headers.get("authorization"))
    if node_id is None:
        node_id = await _node(request)  # not a session token: 401
    try:
        answer = await operation(store, node_id, target, await read_json(request), token_hash)
    except errors.ApiError:
        await _node(request)
        raise
    return JSONResponse(answer)


async def report(request: Request) -> Response:
    return await _as_node(request, jobs.report_progress, request.path_params["job_id"])


async def append_logs(request: Request) -> Response:
    return await _as_node(request, logs.append_logs, request.path_params["job_id"])


async def read_logs(request: Request) -> Response:
    """The job's log of one attempt: text, JSON, or followed while the job runs (docs/logs.md)."""
    store = store_of(request)
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    job_id = request.path_params["job_id"]
    query = logs.LogQuery.parse(request.query_params)
    await jobs.check_job_visible(store, who, job_id)
    attempt = await logs.resolve_attempt(store, job_id, query.attempt)
    if query.follow:
        admit_stream(store, who.tenant)  # counted out by the response, however the stream ends
        return logs.CountedLogStream(store, who.tenant, logs.follow_lines(
            store, job_id, attempt, explicit=query.attempt is not None, tail=query.tail))
    lines = await logs.read_lines(store, job_id, attempt, query.tail)
    if query.json:
        return JSONResponse({"job_id": job_id, "attempt": attempt, "lines": lines})
    return Response(logs.as_text(lines), media_type=logs.TEXT)


async def attempt(request: Request) -> Response:
    """A node asks whether an assignment it read is still live before starting it (nodes have no
    store access beyond their own stream)."""
    node_id = await _node(request)
    job_id, number = request.path_params["job_id"], request.path_params["attempt"]
    return JSONResponse(await jobs.attempt_state(store_of(request), node_id, job_id, number))


async def list_progress(request: Request) -> Response:
    """One page of the job's progress events, oldest first: ``?limit=`` (default 500, at most 2000) and
    ``?after=`` the previous page's ``next_cursor``, which is null on the last page."""
    store = store_of(request)
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    job_id = request.path_params["job_id"]
    raw_limit, after = request.query_params.get("limit", str(jobs.PROGRESS_PAGE)), request.query_params.get("after")
    if not is_number(raw_limit) or len(raw_limit) > 4 or not 1 <= int(raw_limit) <= jobs.MAX_PROGRESS_PAGE:
        raise errors.InvalidField(f"limit must be an integer between 1 and {jobs.MAX_PROGRESS_PAGE}", field="limit")
    if after is not None and not jobs.is_stream_id(after):
        raise errors.InvalidField("after must be a value of next_cursor", field="after")
    await jobs.check_job_visible(store, who, job_id)
    limit = int(raw_limit)
    found = await jobs.progress_events(store, job_id, after or "-", limit + 1)  # one more: is there a next page?
    page = found[:limit]
    next_cursor = page[-1][0] if len(found) > limit else None
    return JSONResponse({"events": [event for _, event in page], "next_cursor": next_cursor})


async def events(request: Request) -> Response:
    store = store_of(request)
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    job_id = request.path_params["job_id"]
    await jobs.check_job_visible(store, who, job_id)
    admit_stream(store, who.tenant)  # counted out by the response, however the stream ends
    return CountedEventStream(store, who.tenant, job_event_stream(store, job_id),
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def upload(request: Request) -> Response:
    node_id = await _node(request)
    store = store_of(request)
    job_id, name = request.path_params["job_id"], request.path_params["name"]
    check_name(name)
    attempt = await jobs.upload_attempt(store, job_id, request.headers.get(ATTEMPT_HEADER))
    declared = request.headers.get("content-length")
    check = None
    if name in CHECKED:  # weights and checkpoints are read as they stream by: checked, digested, recorded
        spec = await store.redis.hget(keys.job_key(job_id), "spec")
        if spec is None:
            raise errors.NotFound(f"no job {job_id}")
        check = ArtifactCheck(name, attempt, orjson.loads(spec))
    size = await RedisArtifactStore(store).put(job_id, name, node_id, attempt, request.stream(),
                                               int(declared) if declared and is_number(declared) else None,
                                               check)
    return JSONResponse({"name": name, "size": size}, status_code=201)


async def download(request: Request) -> Response:
    store = store_of(request)
    job_id, name = request.path_params["job_id"], request.path_params["name"]
    await auth.authenticate_job_reader(store, job_id, request.headers.get("authorization"),
                                       request.headers.get(TASK_HEADER))
    name = await jobs.resolve_artifact(store, job_id, name)
    artifacts = RedisArtifactStore(store)
    size = await artifacts.size(job_id, name)
    if size is None:
        raise errors.NotFound(f"job {job_id} has no artifact {name}")
    try:
        wanted = parse_range(request.headers.get("range"), size)
    except RangeNotSatisfiable:
        refusal = errors.ApiError(f"range not satisfiable: the artifact has {size} bytes", code="range_not_satisfiable")
        return JSONResponse(refusal.body(), status_code=416, headers={"Content-Range": f"bytes */{size}"})
    start, end = wanted if wanted else (0, size - 1)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(max(0, end - start + 1))}
    if wanted:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    content: AsyncIterator[bytes] = await artifacts.read(job_id, name, start, end) if size else _empty()
    return StreamingResponse(content, status_code=206 if wanted else 200, headers=headers,
                             media_type="application/octet-stream")


async def rendezvous(request: Request) -> Response:
    """A gang rank arrives, publishes rank 0's store port, or says it is ready (docs/distributed.md)."""
    return await _as_node(request, jobs.rendezvous, request.path_params["job_id"])


async def read_rendezvous(request: Request) -> Response:
    """The rendezvous state for a rank of the current attempt: ``?attempt=&rank=`` (ranks > 0 poll it)."""
    node_id = await _node(request)
    query = {}
    for name in ("attempt", "rank"):
        value = request.query_params.get(name, "")
        if not is_number(value) or len(value) > 16:
            raise errors.InvalidField(f"{name} must be a whole number", field=name)
        query[name] = int(value)
    return JSONResponse(await jobs.rendezvous(store_of(request), node_id, request.path_params["job_id"], query,
                                              write=False))


async def verification(request: Request) -> Response:
    """A verifier reports on the segment it replayed (node session token of the task's node)."""
    return await _as_node(request, jobs.report_verification, request.path_params["task_id"])


async def _empty() -> AsyncIterator[bytes]:
    yield b""


routes = [
    Route("/v1/jobs/{job_id:job}/progress", report, methods=["POST"]),
    Route("/v1/jobs/{job_id:job}/progress", list_progress, methods=["GET"]),
    Route("/v1/jobs/{job_id:job}/events", events, methods=["GET"]),
    Route("/v1/jobs/{job_id:job}/logs", append_logs, methods=["POST"]),
    Route("/v1/jobs/{job_id:job}/logs", read_logs, methods=["GET"]),
    Route("/v1/jobs/{job_id:job}/attempts/{attempt}", attempt, methods=["GET"]),
    Route("/v1/jobs/{job_id:job}/artifacts/{name}", upload, methods=["PUT"]),
    Route("/v1/jobs/{job_id:job}/artifacts/{name}", download, methods=["GET"]),
    Route("/v1/jobs/{job_id:job}/rendezvous", rendezvous, methods=["POST"]),
    Route("/v1/jobs/{job_id:job}/rendezvous", read_rendezvous, methods=["GET"]),
    Route("/v1/verifications/{task_id}", verification, methods=["POST"]),
]
app = make_app(routes)
