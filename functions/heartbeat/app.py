"""Heartbeat function: a node stays alive, hears of cancelled jobs and picks up queued work.

POST /v1/nodes/{node_id}/heartbeat (the node's session token).
Run alone: ``hypercorn functions.heartbeat.app:app``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared import auth, nodes
from shared.http import JSONResponse, make_app, read_json, store_of


async def heartbeat(request: Request) -> Response:
    store = store_of(request)
    node_id = request.path_params["node_id"]
    await auth.authenticate_node(store, node_id, request.headers.get("authorization"))
    answer = await nodes.heartbeat(store, node_id, await read_json(request, optional=True))
    return JSONResponse(answer)


routes = [Route("/v1/nodes/{node_id}/heartbeat", heartbeat, methods=["POST"])]
app = make_app(routes)
