"""Register function: nodes join, are listed and read, and drain.

POST /v1/nodes (join token), GET /v1/nodes and GET /v1/nodes/{node_id} (API key),
DELETE /v1/nodes/{node_id} (the node's session token or an admin key).
Run alone: ``hypercorn functions.register.app:app``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared import auth, errors, nodes
from shared.http import JSONResponse, make_app, read_json, store_of
from shared.validation import is_number


async def register(request: Request) -> Response:
    store = store_of(request)
    await auth.authenticate_join(store, request.headers.get("authorization"))
    registration = await nodes.register_node(store, await read_json(request), request.url.hostname,
                                             request.client.host if request.client else None)
    return JSONResponse(registration, status_code=201)


async def list_nodes(request: Request) -> Response:
    store = store_of(request)
    await auth.authenticate_api_key(store, request.headers.get("authorization"))
    limit, offset = _page(request)
    page, next_offset = await nodes.list_nodes(store, limit, offset)
    return JSONResponse({"nodes": page, "next_cursor": None if next_offset is None else str(next_offset)})


MAX_NODE_CURSOR = 10**9  # an offset into the node ranking; beyond it Redis's int64 range overflows (a 500)


def _page(request: Request) -> tuple[int, int]:
    raw_limit = request.query_params.get("limit", "100")
    raw_cursor = request.query_params.get("cursor", "0")
    # length first: int() of thousands of digits is slow, and refused anyway
    if not is_number(raw_limit) or len(raw_limit) > 4 or not 1 <= int(raw_limit) <= 1000:
        raise errors.InvalidField("limit must be an integer between 1 and 1000", field="limit")
    if not is_number(raw_cursor) or len(raw_cursor) > 10 or int(raw_cursor) > MAX_NODE_CURSOR:
        raise errors.InvalidField("cursor must be a value of next_cursor", field="cursor")
    return int(raw_limit), int(raw_cursor)


async def get_node(request: Request) -> Response:
    store = store_of(request)
    await auth.authenticate_api_key(store, request.headers.get("authorization"))
    return JSONResponse(await nodes.get_node(store, request.path_params["node_id"]))


async def drain_node(request: Request) -> Response:
    store = store_of(request)
    node_id = request.path_params["node_id"]
    await auth.authenticate_node_or_admin(store, node_id, request.headers.get("authorization"))
    return JSONResponse(await nodes.drain_node(store, node_id), status_code=202)


routes = [
    Route("/v1/nodes", register, methods=["POST"]),
    Route("/v1/nodes", list_nodes, methods=["GET"]),
    Route("/v1/nodes/{node_id:node}", get_node, methods=["GET"]),
    Route("/v1/nodes/{node_id:node}", drain_node, methods=["DELETE"]),
]
app = make_app(routes)
