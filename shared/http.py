"""HTTP plumbing every function shares: the app factory, JSON in and out, and the one error table.

A function module lists its routes and calls :func:`make_app`; the gateway joins the route lists of
all four. Handlers raise :class:`shared.errors.ApiError`; the table below turns those, store outages
and Starlette's own 404/405 into the contract's error shape. Client input never reaches a 500.
Every app runs behind :class:`shared.edge.EdgeLimits` (in-flight caps, body and request deadlines,
and the drain of a body left unread by an early answer), inside :class:`shared.metrics.RequestMetrics`
(request latencies), and serves /healthz and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from shared import auth, errors
from shared.edge import EdgeLimits, body_timeout_error
from shared.metrics import CONTENT_TYPE, ProcessMetrics, RequestMetrics, render_metrics
from shared.nodes import reap_forever
from shared.settings import Settings
from shared.store import RedisError, Store, is_full, is_unavailable
from shared.validation import is_number

log = logging.getLogger("cyxwiz.http")


class _IdConvertor(Convertor[str]):
    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class JobIdConvertor(_IdConvertor):
    """``{job_id:job}``: only well-formed job ids reach a handler (anything else is a 404), so an id
    can never reach into another key (``j-...:progress``)."""

    regex = "j-[0-9a-f]{20}"


class NodeIdConvertor(_IdConvertor):
    """``{node_id:node}``: only well-formed node ids reach a handler."""

    regex = "n-[0-9a-f]{16}"


register_url_convertor("job", JobIdConvertor())
register_url_convertor("node", NodeIdConvertor())


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def store_of(request: Request) -> Store:
    """The process's store, made once by the app's lifespan."""
    return request.app.state.store  # type: ignore[no-any-return]


JSON_TYPES = ("application/json",)  # and any application/*+json


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, *, optional: bool = False) -> Any:
    """The request's JSON body, capped at max_body_bytes (413); not JSON: 400. A body sent as another
    media type is refused (415) before it is read; one sent without a Content-Type is taken as JSON
    (scripts that send raw bytes), as it was before the check existed."""
    limit = store_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    has_body = bool(declared and declared != "0") or "transfer-encoding" in request.headers
    content_type = request.headers.get("content-type", "").strip()
    if has_body and content_type and not _is_json(content_type):
        raise errors.UnsupportedMediaType(f"the body must be JSON (Content-Type: application/json), "
                                          f"not {content_type.split(';', 1)[0].strip()!r}")
    if declared and is_number(declared) and int(declared) > limit:
        raise errors.PayloadTooLarge(f"the body may be at most {limit} bytes")  # the edge drains it first
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise errors.PayloadTooLarge(f"the body may be at most {limit} bytes")
    if not body.strip():
        if optional:
            return None
        raise errors.MalformedBody("a JSON body is required")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.MalformedBody(f"the body is not valid JSON: {exc}") from None


def error_response(exc: errors.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# An answer given before the body was read (a refused token, an unknown route, a 413 from
# Content-Length) needs nothing here: the edge reads and discards the rest of the body first, so a
# keep-alive client keeps its connection and one that sends its whole body before reading sees it.


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ApiError)
    response = error_response(exc)
    if isinstance(exc, errors.PayloadTooLarge):
        response.headers["Connection"] = "close"
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    body = {"error": {"code": codes.get(exc.status_code, "http_error"), "message": str(exc.detail)}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The body stopped (the edge's body deadline, or the client left): 408, and the connection closes."""
    settings = store_of(request).settings if hasattr(request.app.state, "store") else Settings()
    response = error_response(body_timeout_error(settings))
    response.headers["Connection"] = "close"
    return response


async def _store_error(request: Request, exc: Exception) -> Response:
    """Redis down, restarting or hung: 503 with Retry-After (handled here, so nothing is re-raised and
    no traceback is logged for an outage). Any other store error is a bug: logged, then a JSON 500."""
    if is_unavailable(exc):
        return error_response(errors.StoreUnavailable())
    if is_full(exc):
        return error_response(errors.InsufficientStorage())
    log.error("unexpected state-store error on %s %s", request.method, request.url.path, exc_info=exc)
    return _internal_error()


async def _unexpected(request: Request, exc: Exception) -> Response:
    return _internal_error()


def _internal_error() -> JSONResponse:
    body = {"error": {"code": "internal_error", "message": "an internal error occurred; it has been logged"}}
    return JSONResponse(body, status_code=500)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    errors.ApiError: _api_error,
    HTTPException: _http_error,
    ClientDisconnect: _client_gone,
    RedisError: _store_error,
    OSError: _store_error,  # includes TimeoutError
    Exception: _unexpected,  # Starlette logs these itself
}


async def healthz(request: Request) -> Response:
    """200 when the store answers a PING, else 503."""
    try:
        await store_of(request).redis.ping()
    except Exception as exc:
        if is_unavailable(exc):
            raise errors.StoreUnavailable() from None
        raise
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    """Prometheus text format (admin API key): the cluster read from the store now, and this process's
    request latencies (shared/metrics.py, docs/metrics.md)."""
    store = store_of(request)
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    if not who.admin:
        raise errors.Forbidden("only an admin API key may read /metrics")
    body = await render_metrics(store, request.app.state.process_metrics)
    return Response(body, media_type=CONTENT_TYPE)


def make_app(routes: Sequence[BaseRoute], settings: Settings | None = None) -> Starlette:
    """An app behind the edge's limits and the latency middleware, with the store opened at start-up and
    closed at shut-down, plus /healthz and /metrics. Settings are read here, once: the edge needs them
    before the store exists. Each app has its own metrics registry."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.store = Store(settings)
        reaper = asyncio.create_task(reap_forever(app.state.store), name="reaper")
        try:
            yield
        finally:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
            await app.state.store.close()

    all_routes = [*routes, Route("/healthz", healthz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
    process = ProcessMetrics()
    app = Starlette(routes=all_routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan,
                    middleware=[Middleware(RequestMetrics, routes=all_routes, histogram=process.request_duration),
                                Middleware(EdgeLimits, settings=settings)])
    app.state.process_metrics = process
    return app
