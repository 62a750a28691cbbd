"""Holes a hostile review found that fit no one function's test file: forged session tokens."""

from __future__ import annotations

import httpx
import redis

from tests.conftest import bearer, keyspace, register, submit


def test_session_token_node_id_must_be_a_node_id(http: httpx.Client, creds: dict[str, str], r: redis.Redis) -> None:
    """A session token names its node; a name that is not a node id (one reaching into another key,
    ``n-...:assignments`` is a stream) is 401 everywhere, never a 500, and changes nothing."""
    reg = register(http, creds["join_token"])
    node_id = reg["node_id"]
    job_id = submit(http, creds["api_key"])["job_id"]
    secret = reg["session_token"].rsplit(".", 1)[1]
    forged_tokens = [f"cwn.{node_id}:assignments.x", f"cwn.{node_id}:assignments.{secret}",
                     f"cwn.{node_id.upper()}.{secret}", f"cwn.{node_id}0.{secret}", f"cwn.cyxwiz:nodes:score.{secret}",
                     f"cwn.{node_id}:assignments"]
    calls = [("POST", f"/v1/nodes/{node_id}/heartbeat", None),
             ("POST", f"/v1/jobs/{job_id}/progress", {"attempt": 1, "seq": 1, "status": "running"}),
             ("PUT", f"/v1/jobs/{job_id}/artifacts/model.safetensors", None),
             ("GET", f"/v1/jobs/{job_id}/attempts/1", None),
             ("GET", f"/v1/jobs/{job_id}/artifacts/model.safetensors", None),
             ("DELETE", f"/v1/nodes/{node_id}", None)]
    before = keyspace(r)
    for token in forged_tokens:
        for method, path, body in calls:
            content = b"weights" if method == "PUT" else None
            resp = http.request(method, path, json=body, content=content, headers=bearer(token))
            assert resp.status_code == 401, (token, method, path, resp.text)
            assert resp.json()["error"]["code"] == "unauthorized"
    assert keyspace(r) == before
    # the real token still works
    beat = http.post(f"/v1/nodes/{node_id}/heartbeat", headers=bearer(reg["session_token"]))
    assert beat.status_code == 200, beat.text


def test_an_event_stream_is_counted_out_exactly_once_however_it_ends() -> None:
    """The response that holds a stream slot gives it back once: after a normal end, after the stream
    raised (a store error), after its client left, and when it was never sent at all."""
    import asyncio
    import gc
    from collections import Counter
    from collections.abc import AsyncIterator
    from types import SimpleNamespace
    from typing import Any, cast

    from shared.sse import CountedEventStream
    from shared.store import Store

    store = cast(Store, SimpleNamespace(open_streams=Counter()))

    async def frames(fail: bool) -> AsyncIterator[bytes]:
        yield b"event: status\n\n"
        if fail:
            raise ConnectionError("the store went away")

    async def send_ok(message: Any) -> None:
        pass

    async def send_gone(message: Any) -> None:
        if message.get("body"):
            raise OSError("client gone")

    async def receive() -> Any:
        await asyncio.sleep(3600)

    async def run(fail: bool, send: Any) -> None:
        store.open_streams["t"] += 1
        response = CountedEventStream(store, "t", frames(fail))
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        try:
            await response(scope, receive, send)
        except Exception:  # noqa: BLE001 - the point is what the count is after any ending
            pass
        assert store.open_streams["t"] == 0
        response.release()
        del response
        gc.collect()
        assert store.open_streams["t"] == 0

    for fail, send in ((False, send_ok), (True, send_ok), (False, send_gone)):
        asyncio.run(run(fail, send))
    store.open_streams["t"] += 1
    never_sent = CountedEventStream(store, "t", frames(False))
    del never_sent
    gc.collect()
    assert store.open_streams["t"] == 0
