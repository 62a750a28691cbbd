"""Dashboard function: the browser page and the queue counts it shows.

GET /ui (no token: the page asks for an API key and sends it with every call it makes),
GET /ui/static/{name} (its script and style sheet) and GET /v1/queue (API key).
Run alone: ``hypercorn functions.ui.app:app``; docs/dashboard.md describes the page.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared import auth, errors, keys
from shared.http import JSONResponse, make_app, store_of
from shared.transitions import PRIORITY_BANDS, PRIORITY_SCALE

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Scripts and styles only from the page's own files: no inline script, nothing from elsewhere, so a job
# or node name that slipped markup past the page's escaping still could not run.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _load_static() -> dict[str, tuple[bytes, str]]:
    """Every shipped file by name, read once: a request can only name one of these (no paths)."""
    files = {}
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file() and path.suffix in MEDIA_TYPES:
            files[path.name] = (path.read_bytes(), MEDIA_TYPES[path.suffix])
    return files


STATIC = _load_static()


def _file_response(name: str) -> Response:
    content, media_type = STATIC[name]
    return Response(content, media_type=media_type, headers=SECURITY_HEADERS)


async def page(request: Request) -> Response:
    return _file_response("index.html")


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        raise errors.NotFound(f"no dashboard file {name!r}")
    return _file_response(name)


async def queue(request: Request) -> Response:
    """Queued jobs by class and priority (placeable ones: a free node takes the first that fits), and
    the parked ones no live node could hold. Counts of the whole cluster, like Slurm's ``squeue``."""
    store = store_of(request)
    await auth.authenticate_api_key(store, request.headers.get("authorization"))
    rows = [(job_class, priority, band) for job_class in keys.NODE_CLASSES for priority, band in PRIORITY_BANDS.items()]
    async with store.redis.pipeline(transaction=False) as pipe:
        for job_class, _, band in rows:
            # a score is band * PRIORITY_SCALE + the submission sequence: one band is one score range
            pipe.zcount(keys.queue_key(job_class), band * PRIORITY_SCALE, f"({(band + 1) * PRIORITY_SCALE}")
        pipe.zcard(keys.QUEUE_PARKED)
        counts = await pipe.execute()
    answer = [{"class": job_class, "priority": priority, "jobs": int(count)}
              for (job_class, priority, _), count in zip(rows, counts[:-1], strict=True)]
    return JSONResponse({"queue": answer, "parked": int(counts[-1])})


routes = [
    Route("/ui", page, methods=["GET"]),
    Route("/ui/static/{name}", static_file, methods=["GET"]),
    Route("/v1/queue", queue, methods=["GET"]),
]
app = make_app(routes)
