"""The ``cyxwiz`` command: the server, the node runtime, a one-machine cluster and the API's client.

Client settings come from a flag, else ``CYXWIZ_API_URL`` / ``CYXWIZ_API_KEY``, else the credentials
file that ``cyxwiz serve`` writes into the data dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from cyxwiz.client import ApiClient, ApiError
from cyxwiz.credentials import resolve
from shared.settings import default_data_dir

TERMINAL = ("completed", "failed", "cancelled")


def _client(args: argparse.Namespace) -> ApiClient:
    data_dir = Path(args.data_dir) if getattr(args, "data_dir", None) else None
    api_url = resolve("api_url", getattr(args, "api", None), data_dir) or "http://127.0.0.1:8080"
    api_key = resolve("api_key", getattr(args, "api_key", None), data_dir)
    if not api_key:
        raise SystemExit("cyxwiz: no API key: pass --api-key, set CYXWIZ_API_KEY, or run `cyxwiz serve` first")
    return ApiClient(api_url, api_key)


def printable(text: object, *, multiline: bool = False) -> str:
    """``text`` safe to print on a terminal: every character that is not printable (C0 and C1 controls
    such as ESC, CR and DEL, line and paragraph separators, format characters) becomes a visible escape
    like ``\\x1b``, so a name or an error from the server cannot move the cursor, recolour or clear the
    screen, or forge lines. ``multiline`` keeps newlines and tabs, for output meant to span lines."""
    out = []
    for char in str(text):
        if char.isprintable() or (multiline and char in "\n\t"):
            out.append(char)
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def _print(obj: Any) -> None:
    # json.dumps escapes C0 controls and (ensure_ascii) everything beyond ASCII; DEL is the one
    # control character it leaves raw
    print(json.dumps(obj, indent=2).replace("\x7f", "\\u007f"))


def progress_line(job: dict[str, Any]) -> str:
    """One line: a bar over steps, then epoch, loss and accuracy."""
    progress = job.get("progress") or {}
    total = progress.get("total_steps") or 0
    step = progress.get("step") or 0
    done = step / total if total else (1.0 if job["status"] == "completed" else 0.0)
    bar = "#" * int(done * 30) + "-" * (30 - int(done * 30))
    epochs = (job.get("spec") or {}).get("training", {}).get("epochs", "?")
    metrics = progress.get("metrics") or {}
    status = job["status"] + (f" ({job['pending_reason']})" if job.get("pending_reason") else "")
    parts = [f"[{bar}] {done * 100:5.1f}%", f"{printable(status):<9}",
             f"epoch {printable(progress.get('epoch', 0))}/{printable(epochs)}"]
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if metrics.get(name) is not None:
            parts.append(f"{name} {metrics[name]:.4f}")
    return "  ".join(parts)


def watch_job(client: ApiClient, job_id: str, interval_s: float = 0.5, out: Any = sys.stdout) -> dict[str, Any]:
    """Redraw a progress bar until the job ends; return the final job."""
    tty = out.isatty()
    while True:
        job = client.request("GET", f"/v1/jobs/{job_id}")
        line = progress_line(job)
        out.write(("\r" + line + "\033[K") if tty else line + "\n")
        out.flush()
        if job["status"] in TERMINAL:
            if tty:
                out.write("\n")
            return job  # type: ignore[no-any-return]
        time.sleep(interval_s if tty else max(interval_s, 2.0))


def cmd_serve(args: argparse.Namespace) -> int:
    from cyxwiz.server import ServeOptions, serve

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    redis_url = args.redis_url or None
    if redis_url is None:
        import os

        redis_url = os.environ.get("CYXWIZ_REDIS_URL") or None
    if bool(args.certfile) != bool(args.keyfile):
        raise SystemExit("cyxwiz serve: --certfile and --keyfile go together")
    return serve(ServeOptions(host=args.host, port=args.port, redis_url=redis_url, data_dir=data_dir,
                              workers=args.workers, public_url=args.public_url,
                              public_redis_host=args.public_redis_host, certfile=args.certfile,
                              keyfile=args.keyfile))


def cmd_keys(args: argparse.Namespace) -> int:
    _print(_client(args).request("POST", "/v1/keys", {"tenant": args.tenant}))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.file).read_text())
    client = _client(args)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    answer = client.request("POST", "/v1/jobs", spec, headers=headers)
    _print(answer)
    if args.watch:
        job = watch_job(client, answer["job_id"])
        return 0 if job["status"] == "completed" else 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    _print(_client(args).request("GET", f"/v1/jobs/{args.job}"))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    job = watch_job(_client(args), args.job)
    if job.get("error"):
        print(f"error: {printable(job['error'], multiline=True)}")  # a traceback keeps its lines
    return 0 if job["status"] == "completed" else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    _print(_client(args).request("POST", f"/v1/jobs/{args.job}/cancel"))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    query = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
    page = _client(args).request("GET", "/v1/jobs" + query)
    for job in page["jobs"]:
        where = job["node_id"] or (f"({job['pending_reason']})" if job.get("pending_reason") else "-")
        print(f"{printable(job['job_id'])}  {printable(job['status']):<9}  {printable(job['priority']):<6}  "
              f"{printable(where):<22}  {printable(job['name'])}")
    return 0


def cmd_tenants(args: argparse.Namespace) -> int:
    """``tenants show T`` and ``tenants set T --max-queued N --max-running N`` (admin)."""
    client = _client(args)
    path = f"/v1/tenants/{args.tenant}"
    if args.tenants_command == "set":
        limits = {"max_queued_jobs": _limit(args.max_queued), "max_running_jobs": _limit(args.max_running)}
        body = {name: value for name, value in limits.items() if value != "unset"}
        _print(client.request("PUT", path, body))
    else:
        _print(client.request("GET", path))
    return 0


def _limit(raw: str | None) -> int | str | None:
    """A limit flag: absent (leave it), ``default`` (back to the settings' default), or an integer."""
    if raw is None:
        return "unset"
    return None if raw == "default" else int(raw)


def cmd_nodes(args: argparse.Namespace) -> int:
    for node in _client(args).request("GET", "/v1/nodes")["nodes"]:
        trust = "probation" if node.get("probation") else "trusted"
        audits = f"audits {node.get('audits_passed', 0)} passed/{node.get('audits_failed', 0)} failed"
        print(f"{printable(node['node_id'])}  {printable(node['status']):<8}  {node['running_jobs']}/{node['slots']}  "
              f"score {node['score']:.3f}  {trust:<9}  {audits}  {printable(node['name'])}"
              + (f"  [{printable(node['flag'])}]" if node.get("flag") else ""))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    target = Path(args.output or f"{args.job}.safetensors")
    data = _client(args).request("GET", f"/v1/jobs/{args.job}/artifacts/{args.name}", raw=True)
    target.write_bytes(data)
    print(f"wrote {len(data)} bytes to {target}")
    return 0


def cmd_reap(args: argparse.Namespace) -> int:
    from shared.nodes import reap
    from shared.settings import Settings
    from shared.store import Store

    redis_url = resolve("redis_url", args.redis_url)
    if not redis_url:
        raise SystemExit("cyxwiz: no Redis URL: pass --redis-url or set CYXWIZ_REDIS_URL")

    async def once() -> list[str]:
        import os

        store = Store(Settings.from_env({**os.environ, "CYXWIZ_REDIS_URL": redis_url}))
        try:
            return await reap(store)
        finally:
            await store.close()

    while True:
        reaped = asyncio.run(once())
        print(json.dumps({"reaped": reaped}), flush=True)
        if not args.every:
            return 0
        time.sleep(args.every)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cyxwiz", description="Train ML models on other people's GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def client_command(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--api", help="API URL (default: $CYXWIZ_API_URL or the credentials file)")
        p.add_argument("--api-key", help="API key (default: $CYXWIZ_API_KEY or the credentials file)")
        p.add_argument("--data-dir", help="where credentials.json is (default: $CYXWIZ_DATA_DIR or ~/.cyxwiz)")
        p.set_defaults(handler=handler)
        return p

    p = sub.add_parser("serve", help="all functions in one Hypercorn server (embedded Valkey by default)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the gateway and the embedded store listen on; 0.0.0.0 for nodes on other "
                        "hosts (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="API port (default 8080)")
    p.add_argument("--redis-url", help="use this Redis/Valkey (>= 7, a user with the gateway's ACL rules; see "
                                       "docs/deploying.md) instead of the embedded one (default: $CYXWIZ_REDIS_URL)")
    p.add_argument("--data-dir", help="default: $CYXWIZ_DATA_DIR or ~/.cyxwiz")
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    p.add_argument("--public-url", help="the API URL clients and nodes on other hosts use, written to "
                                        "credentials.json (default: http(s)://HOST:PORT)")
    p.add_argument("--public-redis-host", metavar="HOST",
                   help="the store host registration hands to nodes, where NAT or DNS needs it (default: the "
                        "host each node used to reach the API)")
    p.add_argument("--certfile", help="serve the API over HTTPS with this certificate (with --keyfile)")
    p.add_argument("--keyfile", help="the certificate's private key")
    p.set_defaults(handler=cmd_serve)

    keys_parser = sub.add_parser("keys", help="API keys (admin)")
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("create", help="a new API key for a tenant")
    p.add_argument("--tenant", required=True)
    for flag in ("--api", "--api-key", "--data-dir"):
        p.add_argument(flag)
    p.set_defaults(handler=cmd_keys)

    tenants_parser = sub.add_parser("tenants", help="tenants' limits and usage (admin)")
    tenants_sub = tenants_parser.add_subparsers(dest="tenants_command", required=True)
    for name, text in (("show", "a tenant's limits and what it uses"), ("set", "set a tenant's own limits")):
        p = tenants_sub.add_parser(name, help=text)
        p.add_argument("tenant")
        for flag in ("--api", "--api-key", "--data-dir"):
            p.add_argument(flag)
        if name == "set":
            p.add_argument("--max-queued", help="queued jobs at most (an integer, or 'default')")
            p.add_argument("--max-running", help="jobs holding node slots at most (an integer, or 'default')")
        p.set_defaults(handler=cmd_tenants)

    p = client_command("submit", cmd_submit, "submit a job spec (JSON file)")
    p.add_argument("file")
    p.add_argument("--watch", action="store_true", help="show a progress bar until the job ends")
    p.add_argument("--idempotency-key")
    for name, handler, text in (("status", cmd_status, "a job as JSON"), ("watch", cmd_watch, "a live progress bar"),
                                ("cancel", cmd_cancel, "cancel a job")):
        client_command(name, handler, text).add_argument("job")
    p = client_command("jobs", cmd_jobs, "list jobs, newest first")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=50)
    client_command("nodes", cmd_nodes, "list nodes, best score first")
    p = client_command("download", cmd_download, "download a job's artifact (default: its weights)")
    p.add_argument("job")
    p.add_argument("-o", "--output")
    p.add_argument("--name", default="model.safetensors")

    p = sub.add_parser("reap", help="requeue the jobs of nodes whose heartbeat lapsed (for idle deployments)")
    p.add_argument("--redis-url")
    p.add_argument("--every", type=float, default=0.0, help="repeat every N seconds")
    p.set_defaults(handler=cmd_reap)

    from cyxwiz import cluster

    cluster.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ApiError as exc:
        print(f"cyxwiz: {printable(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
