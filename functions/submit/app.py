"""Submit function: users create, list, read and cancel jobs; admins create, list and revoke API keys.

POST /v1/jobs, GET /v1/jobs, GET /v1/jobs/{job_id}, POST /v1/jobs/{job_id}/cancel (API key);
POST /v1/keys, GET /v1/keys, DELETE /v1/keys/{key_id}, GET and PUT /v1/tenants/{tenant} (admin API key).
Run alone: ``hypercorn functions.submit.app:app``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared import auth, errors, jobs, tenants
from shared.http import JSONResponse, make_app, read_json, store_of
from shared.store import Store


async def submit(request: Request) -> Response:
    store = store_of(request)
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    body = await read_json(request)
    status, answer = await jobs.submit_job(store, who, body, request.headers.get("idempotency-key"))
    return JSONResponse(answer, status_code=status)


async def list_jobs(request: Request) -> Response:
    store = store_of(request)
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    q = request.query_params
    return JSONResponse(await jobs.list_jobs(store, who, q.get("status") or None, q.get("limit"), q.get("cursor"),
                                             tenant=q.get("tenant") or None))


async def get_job(request: Request) -> Response:
    store = store_of(request)
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    return JSONResponse(await jobs.get_job(store, who, request.path_params["job_id"]))


async def cancel_job(request: Request) -> Response:
    store = store_of(request)
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    return JSONResponse(await jobs.cancel_job(store, who, request.path_params["job_id"]), status_code=202)


async def create_key(request: Request) -> Response:
    store = store_of(request)
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    if not who.admin:
        raise errors.Forbidden("only an admin API key may create API keys")
    body = await read_json(request)
    if not isinstance(body, dict):
        raise errors.MalformedBody("the body must be a JSON object")
    unknown = sorted(set(body) - {"tenant"})
    if unknown:
        raise errors.InvalidField(f"unknown field {unknown[0]!r}", field=unknown[0])
    tenant = body.get("tenant")
    if not isinstance(tenant, str):
        raise errors.InvalidField("tenant is required and must be a string", field="tenant")
    key = await auth.create_api_key(store, tenant)
    return JSONResponse({"api_key": key, "tenant": tenant, "key_id": auth.key_id_of(auth.hash_token(key))},
                        status_code=201)


async def list_keys(request: Request) -> Response:
    store = store_of(request)
    await _admin(store, request, "list API keys")
    return JSONResponse({"keys": await auth.list_api_keys(store)})


async def revoke_key(request: Request) -> Response:
    store = store_of(request)
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    return JSONResponse(await auth.revoke_api_key(store, who, request.path_params["key_id"]))


async def get_tenant(request: Request) -> Response:
    store = store_of(request)
    await _admin(store, request)
    return JSONResponse(await tenants.get_tenant(store, request.path_params["tenant"]))


async def set_tenant_limits(request: Request) -> Response:
    store = store_of(request)
    await _admin(store, request)
    return JSONResponse(await tenants.set_limits(store, request.path_params["tenant"], await read_json(request)))


async def _admin(store: Store, request: Request, what: str = "read or change tenants' limits") -> None:
    who = await auth.authenticate_api_key(store, request.headers.get("authorization"))
    if not who.admin:
        raise errors.Forbidden(f"only an admin API key may {what}")


routes = [
    Route("/v1/jobs", submit, methods=["POST"]),
    Route("/v1/jobs", list_jobs, methods=["GET"]),
    Route("/v1/jobs/{job_id:job}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id:job}/cancel", cancel_job, methods=["POST"]),
    Route("/v1/keys", create_key, methods=["POST"]),
    Route("/v1/keys", list_keys, methods=["GET"]),
    Route("/v1/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/v1/tenants/{tenant}", get_tenant, methods=["GET"]),
    Route("/v1/tenants/{tenant}", set_tenant_limits, methods=["PUT"]),
]
app = make_app(routes)
