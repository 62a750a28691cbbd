"""The ceiling: a bare Starlette endpoint under the same Hypercorn set-up as the gateway.

It answers the heartbeat's path and shape (read the JSON body, answer a small JSON) with no
authentication and no Redis, so a function's requests/s divided by this one's is the share of the
HTTP stack's capacity that the function keeps. Run: ``hypercorn load_tests.bare:app``.
"""

from __future__ import annotations

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def heartbeat(request: Request) -> Response:
    body = await request.body()
    if body:
        orjson.loads(body)
    return Response(orjson.dumps({"ttl_s": 30.0, "cancel": [], "status": "online", "assigned": 0}),
                    media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


app = Starlette(routes=[Route("/v1/nodes/{node_id}/heartbeat", heartbeat, methods=["POST"]),
                        Route("/v1/jobs", heartbeat, methods=["POST"]),
                        Route("/v1/jobs/{job_id}/progress", heartbeat, methods=["POST"]),
                        Route("/healthz", healthz, methods=["GET"])])
