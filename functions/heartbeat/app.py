"""Heartbeat function: a node stays alive, hears of cancelled jobs and picks up queued work.

POST /v1/nodes/{node_id}/heartbeat (the node's session token).
Run alone: ``hypercorn functions.heartbeat.app:app``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared import auth, errors, nodes
from shared.http import JSONResponse, make_app, read_json, store_of


async def heartbeat(request: Request) -> Response:
    store = store_of(request)
    node_id = request.path_params["node_id"]
    authorization = request.headers.get("authorization")
    claimed, token_hash = auth.session_claim(authorization)
    if claimed != node_id:
        await auth.authenticate_node(store, node_id, authorization)  # 401, or 403 for another node's token
    try:
        # One round trip: the HEARTBEAT script checks the session token before it changes anything.
        answer = await nodes.heartbeat(store, node_id, await read_json(request, optional=True), token_hash,
                                       request.url.hostname)
    except errors.ApiError:
        await auth.authenticate_node(store, node_id, authorization)  # a bad token still answers first
        raise
    return JSONResponse(answer)


routes = [Route("/v1/nodes/{node_id:node}/heartbeat", heartbeat, methods=["POST"])]
app = make_app(routes)
