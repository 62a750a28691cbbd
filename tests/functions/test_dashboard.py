"""Dashboard function over plain HTTP: the page and its files with their types and security headers, and
``GET /v1/queue`` counting what was submitted. The browser test is tests/node_runtime/test_dashboard.py."""

from __future__ import annotations

import os
import subprocess
import sys
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from cyxwiz.embedded import free_port
from cyxwiz.server import wait_healthy
from functions.ui.app import STATIC_DIR
from tests.conftest import CPU_CAPS, DIGITS_SPEC, GPU_CAPS, REPO, TEST_ENV, KeepAlive, bearer, register, submit


def assert_locked_down(resp: httpx.Response, media_type: str) -> None:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == f"{media_type}; charset=utf-8"
    assert resp.headers["x-content-type-options"] == "nosniff"
    policy = {part.strip().split(" ", 1)[0]: part.strip().split(" ", 1)[1]
              for part in resp.headers["content-security-policy"].split(";")}
    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self'" and policy["object-src"] == "'none'"
    assert "unsafe" not in resp.headers["content-security-policy"]


class PageParts(HTMLParser):
    """What the page loads and whether anything in it is inline code or style."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str | None] = []
        self.sheets: list[str | None] = []
        self.inline: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script":
            self.scripts.append(found.get("src"))
            self.in_script = True
        if tag == "link" and found.get("rel") == "stylesheet":
            self.sheets.append(found.get("href"))
        if tag == "style":
            self.inline.append("<style>")
        self.inline += [f"{tag} {name}" for name in found if name == "style" or name.startswith("on")]
        # nothing from another origin (a data: URL is the empty icon)
        self.inline += [f"{tag} {value}" for name, value in attrs if name in ("src", "href") and value
                        and (":" in value and not value.startswith("data:") or value.startswith("//"))]

    def handle_endtag(self, tag: str) -> None:
        self.in_script = self.in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.inline.append("inline script")


def test_page_and_its_files_are_served_locked_down(http: httpx.Client) -> None:
    page = http.get("/ui")  # no token: the page itself asks for the key
    assert_locked_down(page, "text/html")
    parts = PageParts()
    parts.feed(page.text)
    assert parts.scripts == ["ui/static/dashboard.js"] and parts.sheets == ["ui/static/dashboard.css"]
    assert parts.inline == []
    scripts = sorted(path.name for path in STATIC_DIR.glob("*.js"))
    assert scripts == ["api.js", "chart.js", "dashboard.js", "job.js"]  # ES modules dashboard.js imports
    for name in scripts:
        script = http.get(f"/ui/static/{name}")
        assert_locked_down(script, "text/javascript")
        assert script.content == (STATIC_DIR / name).read_bytes()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
            assert sink not in script.text, (name, sink)  # server strings never become markup or code
    assert_locked_down(http.get("/ui/static/dashboard.css"), "text/css")


@pytest.mark.parametrize("path", ["/ui/static/nothing.js", "/ui/static/..%2Fapp.py", "/ui/static/../app.py",
                                  "/ui/static/%2E%2E%2F__init__.py"])
def test_only_shipped_files_are_served(http: httpx.Client, path: str) -> None:
    resp = http.get(path)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


def test_queue_needs_an_api_key(http: httpx.Client, creds: dict[str, str]) -> None:
    for headers in ({}, bearer("cwk_not-a-key"), bearer(creds["join_token"])):
        resp = http.get("/v1/queue", headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "unauthorized" and resp.json()["error"]["message"]


def queue_counts(http: httpx.Client, api_key: str) -> tuple[dict[tuple[str, str], int], int]:
    resp = http.get("/v1/queue", headers=bearer(api_key))
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"queue", "parked"}
    return {(row["class"], row["priority"]): row["jobs"] for row in body["queue"]}, body["parked"]


def test_queue_counts_jobs_by_class_and_priority(http: httpx.Client, creds: dict[str, str], api_url: str) -> None:
    key = creds["api_key"]
    empty, parked = queue_counts(http, key)
    assert parked == 0 and len(empty) == 6 and set(empty.values()) == {0}
    gpu_job = {**DIGITS_SPEC, "requirements": {"gpu": True}}
    gpu_node = register(http, creds["join_token"], capabilities=GPU_CAPS)
    assert submit(http, key, gpu_job)["status"] == "assigned"  # the GPU node is busy from now on
    with KeepAlive(api_url, [gpu_node]):
        assert submit(http, key, gpu_job, priority="low")["status"] == "queued"
        cpu_node = register(http, creds["join_token"], capabilities=CPU_CAPS)
        with KeepAlive(api_url, [cpu_node]):
            assert submit(http, key)["node_id"] == cpu_node["node_id"]  # both nodes busy now
            for priority, count in (("high", 2), ("normal", 1), ("low", 3)):
                for _ in range(count):
                    assert submit(http, key, priority=priority)["status"] == "queued"
            nowhere = {**DIGITS_SPEC, "requirements": {"labels": {"zone": "nowhere"}}}
            assert submit(http, key, nowhere, priority="high")["status"] == "queued"  # fits no node: parked
            tenant_key = http.post("/v1/keys", json={"tenant": "acme"}, headers=bearer(key)).json()["api_key"]
            for reader in (key, tenant_key):  # cluster-wide counts, for any key
                counts, parked = queue_counts(http, reader)
                assert counts == {("cpu", "high"): 2, ("cpu", "normal"): 1, ("cpu", "low"): 3,
                                  ("gpu", "high"): 0, ("gpu", "normal"): 0, ("gpu", "low"): 1}
                assert parked == 1
            queued = http.get("/v1/jobs?status=queued&limit=100", headers=bearer(key)).json()["jobs"]
            assert len(queued) == sum(counts.values()) + parked  # the counts are the queued jobs, nothing else


def test_dashboard_function_runs_alone(redis_url: str, creds: dict[str, str]) -> None:
    """``hypercorn functions.ui.app:app`` serves the page and the queue, and no other function's routes."""
    port = free_port()
    env = {**os.environ, **TEST_ENV, "CYXWIZ_REDIS_URL": redis_url}
    proc = subprocess.Popen([sys.executable, "-m", "hypercorn", "functions.ui.app:app", "--bind", f"127.0.0.1:{port}"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}", 30)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as alone:
            assert_locked_down(alone.get("/ui"), "text/html")
            assert queue_counts(alone, creds["api_key"])[1] == 0
            assert alone.get("/v1/jobs", headers=bearer(creds["api_key"])).status_code == 404
    finally:
        proc.terminate()
        proc.wait(10)
