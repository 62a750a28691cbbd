"""The CLI's commands about the cluster rather than one job: nodes (list, drain), API keys (create,
list, revoke), tenants' limits, and the reaper."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.parse
from pathlib import Path

from cyxwiz.client import CliError, client_from_args
from cyxwiz.credentials import resolve
from cyxwiz.inputs import check_id
from cyxwiz.output import node_rows, print_json, printable, table


def cmd_nodes(args: argparse.Namespace) -> int:
    """``cyxwiz nodes`` lists the nodes, best score first; ``cyxwiz nodes drain NODE`` drains one (admin)."""
    if args.action == "drain":
        if not args.node:
            raise CliError("which node? cyxwiz nodes drain NODE_ID (cyxwiz nodes lists them)")
        return _drain(args, check_id("node", args.node))
    if args.action != "list" or args.node:
        other = args.node if args.action == "list" else args.action
        if other.startswith("n-"):
            raise CliError(f"cyxwiz nodes lists every node; to drain one: cyxwiz nodes drain {printable(other)}")
        raise CliError(f"'{printable(other)}' is not an action of cyxwiz nodes: list (the default) or drain NODE")
    client = client_from_args(args)
    nodes, cursor = [], None
    while True:  # every page: a fleet is listed whole
        page = client.request("GET", "/v1/nodes?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        nodes += page["nodes"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    if args.json:
        print_json({"nodes": nodes})
    elif not nodes:
        print("no nodes (start one with `cyxwiz node`, or a local cluster with `cyxwiz up`)")
    else:
        print(node_rows(nodes))
    return 0


def _drain(args: argparse.Namespace, node_id: str) -> int:
    answer = client_from_args(args).request("DELETE", f"/v1/nodes/{node_id}")
    if args.json:
        print_json(answer)
    elif answer.get("status") == "removed":
        print(f"node {node_id} removed (it had no jobs)")
    else:
        print(f"node {node_id} is draining: it takes no new jobs; its running jobs finish or go back to the "
              "queue, then it is removed")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """``keys create --tenant T``, ``keys list``, ``keys revoke KEY_ID`` (admin)."""
    client = client_from_args(args)
    if args.keys_command == "create":
        created = client.request("POST", "/v1/keys", {"tenant": args.tenant})
        if args.json:
            print_json(created)
            return 0
        print(f"api key  {printable(created['api_key'])}\nkey id   {printable(created.get('key_id'))}\n"
              f"tenant   {printable(created['tenant'])}")
        print("keep the key now: it is never shown again (`cyxwiz keys list` shows its id)", file=sys.stderr)
    elif args.keys_command == "list":
        listed = client.request("GET", "/v1/keys")
        if args.json:
            print_json(listed)
        elif not listed["keys"]:
            print("no keys")
        else:
            print(table(["key id", "tenant", "admin", "created"],
                        [[k["key_id"], k["tenant"], "yes" if k.get("admin") else "no", k.get("created")]
                         for k in listed["keys"]]))
    else:
        answer = client.request("DELETE", f"/v1/keys/{check_id('key', args.key_id)}")
        if args.json:
            print_json(answer)
        else:
            print(f"revoked {args.key_id} (tenant {printable(answer.get('tenant'))}): it is refused from now on")
    return 0


def cmd_tenants(args: argparse.Namespace) -> int:
    """``tenants show T`` and ``tenants set T --max-queued N --max-running N`` (admin)."""
    client = client_from_args(args)
    path = f"/v1/tenants/{urllib.parse.quote(args.tenant, safe='')}"
    if args.tenants_command == "set":
        limits = {"max_queued_jobs": _limit(args.max_queued, "--max-queued"),
                  "max_running_jobs": _limit(args.max_running, "--max-running")}
        body = {name: value for name, value in limits.items() if value != "unset"}
        if not body:
            raise CliError("nothing to set: pass --max-queued N and/or --max-running N (or 'default')")
        shown = client.request("PUT", path, body)
    else:
        shown = client.request("GET", path)
    if args.json:
        print_json(shown)
        return 0
    custom = shown.get("custom_limits") or []
    print(f"tenant {printable(shown['tenant'])}")
    for used, limit, label in (("queued_jobs", "max_queued_jobs", "queued"), ("running_jobs", "max_running_jobs",
                                                                               "running")):
        origin = "its own" if limit in custom else "the default"
        print(f"  {label:<8} {shown.get(used, 0)} of at most {shown.get(limit)} ({origin})")
    return 0


def _limit(raw: str | None, flag: str) -> int | str | None:
    """A limit flag: absent (leave it), ``default`` (back to the settings' default), or an integer."""
    if raw is None:
        return "unset"
    if raw == "default":
        return None
    if not raw.isdigit():
        raise CliError(f"{flag} takes a whole number or 'default' (got '{printable(raw)}')")
    return int(raw)


def cmd_reap(args: argparse.Namespace) -> int:
    from shared.nodes import reap
    from shared.settings import Settings
    from shared.store import Store

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else None
    redis_url = resolve("redis_url", args.redis_url, data_dir)
    if not redis_url:
        raise CliError("no Redis URL: pass --redis-url, set CYXWIZ_REDIS_URL, or run where `cyxwiz serve` "
                       "wrote credentials.json")

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
