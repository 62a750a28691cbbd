"""The ``cyxwiz`` command: the server, the node runtime, a one-machine cluster and the API's client.

Client settings come from a flag, else ``CYXWIZ_API_URL`` / ``CYXWIZ_API_KEY``, else the credentials
file that ``cyxwiz serve`` writes into the data dir. Every user mistake (a bad file, a malformed id, a
server that is not there) is one line on stderr and exit code 1; argparse's usage errors exit 2.
The commands live in :mod:`cyxwiz.job_commands`, :mod:`cyxwiz.admin_commands` and
:mod:`cyxwiz.redis_cli`; what they print, in :mod:`cyxwiz.output`. docs/cli.md shows each one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cyxwiz import admin_commands, job_commands, redis_cli
from cyxwiz.client import ApiError, CliError
from cyxwiz.credentials import CredentialsError
from cyxwiz.job_commands import TERMINAL, watch_job
from cyxwiz.output import print_json, printable, progress_line
from shared.settings import default_data_dir
from shared.transitions import JOB_STATUSES

__all__ = ["TERMINAL", "build_parser", "main", "print_json", "printable", "progress_line", "version", "watch_job"]

EXAMPLES = """examples:
  cyxwiz up --nodes 2                                   a server and two nodes on this machine
  cyxwiz submit examples/digits-mlp.json --watch        train, with a progress bar
  cyxwiz submit - --set training.epochs=5 < spec.json   a spec from stdin, one field changed
  cyxwiz jobs --status running                          jobs as a table (--json for scripts)
  cyxwiz status JOB; cyxwiz logs JOB -f; cyxwiz download JOB -o model.safetensors
every command: cyxwiz COMMAND --help; docs/cli.md has them all."""


def version() -> str:
    """The installed package's version, else the one in the checkout's pyproject.toml."""
    import importlib.metadata
    import tomllib

    try:
        return importlib.metadata.version("cyxwiz")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
                   ["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


class VersionAction(argparse.Action):
    """``--version``: looked up only when asked for (importlib.metadata is slow to import)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"cyxwiz {version()}")
        parser.exit()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds ``(default: X)`` to a flag's help when it has a real default that its text does not mention."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False or action.default == []
                or action.default == argparse.SUPPRESS or "default" in text):
            return text
        return text + " (default: %(default)s)"


def cmd_serve(args: argparse.Namespace) -> int:
    from cyxwiz.server import ServeOptions, serve

    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    redis_url = args.redis_url or os.environ.get("CYXWIZ_REDIS_URL") or None
    if bool(args.certfile) != bool(args.keyfile):
        raise CliError("--certfile and --keyfile go together")
    return serve(ServeOptions(host=args.host, port=args.port, redis_url=redis_url, data_dir=data_dir,
                              workers=args.workers, public_url=args.public_url,
                              public_redis_host=args.public_redis_host, certfile=args.certfile,
                              keyfile=args.keyfile))


def _connection_flags(p: argparse.ArgumentParser, json_help: str | None = None) -> argparse.ArgumentParser:
    p.add_argument("--api", help="API URL (default: $CYXWIZ_API_URL, the credentials file, http://127.0.0.1:8080)")
    p.add_argument("--api-key", help="API key (default: $CYXWIZ_API_KEY or the credentials file's admin key)")
    p.add_argument("--data-dir", help="where credentials.json is (default: $CYXWIZ_DATA_DIR or ~/.cyxwiz)")
    if json_help:
        p.add_argument("--json", action="store_true", help=json_help)
    return p


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="all functions in one Hypercorn server (embedded Valkey by default)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the gateway and the embedded store listen on; 0.0.0.0 for nodes on other hosts")
    p.add_argument("--port", type=int, default=8080, help="API port")
    p.add_argument("--redis-url", help="use this Redis/Valkey (>= 7, a user with the gateway's ACL rules; see "
                                       "docs/deploying.md) instead of the embedded one (default: $CYXWIZ_REDIS_URL)")
    p.add_argument("--data-dir", help="state, credentials.json and the embedded store's files "
                                      "(default: $CYXWIZ_DATA_DIR or ~/.cyxwiz)")
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes (each a Python process)")
    p.add_argument("--public-url", help="the API URL clients and nodes on other hosts use, written to "
                                        "credentials.json (default: http(s)://HOST:PORT)")
    p.add_argument("--public-redis-host", metavar="HOST",
                   help="the store host registration hands to nodes, where NAT or DNS needs it (default: the "
                        "host each node used to reach the API)")
    p.add_argument("--certfile", help="serve the API over HTTPS with this certificate (with --keyfile)")
    p.add_argument("--keyfile", help="the certificate's private key (with --certfile)")
    p.set_defaults(handler=cmd_serve)


def _add_admin(sub: Any) -> None:
    keys_parser = sub.add_parser("keys", help="API keys: create, list, revoke (admin)")
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = _connection_flags(keys_sub.add_parser("create", help="a new API key for a tenant (shown once)"),
                          "print the answer as JSON (api_key, tenant, key_id)")
    p.add_argument("--tenant", required=True, help="the tenant the key acts for (a-z, 0-9, '_', '-')")
    _connection_flags(keys_sub.add_parser("list", help="every key's id, tenant and age (never the key)"),
                      "print {\"keys\": [...]} as JSON")
    p = _connection_flags(keys_sub.add_parser("revoke", help="revoke a key by its id: it is refused from then on"),
                          "print the answer as JSON")
    p.add_argument("key_id", help="the key's id, k-... (cyxwiz keys list shows them)")
    keys_parser.set_defaults(handler=admin_commands.cmd_keys)

    tenants_parser = sub.add_parser("tenants", help="tenants' limits and usage (admin)")
    tenants_sub = tenants_parser.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    for name, text in (("show", "a tenant's limits and what it uses"), ("set", "set a tenant's own limits")):
        p = _connection_flags(tenants_sub.add_parser(name, help=text), "print the tenant's object as JSON")
        p.add_argument("tenant", help="the tenant's name")
        if name == "set":
            p.add_argument("--max-queued", help="queued jobs at most (a whole number, or 'default')")
            p.add_argument("--max-running", help="jobs holding node slots at most (a whole number, or 'default')")
    tenants_parser.set_defaults(handler=admin_commands.cmd_tenants)

    p = _connection_flags(sub.add_parser("nodes", help="list nodes, best score first; `nodes drain NODE` drains one"),
                          "print {\"nodes\": [...]} (or the drain answer) as JSON")
    p.add_argument("action", nargs="?", default="list", metavar="{list,drain}",
                   help="list the nodes, or drain one (admin): it takes no new jobs, then leaves")
    p.add_argument("node", nargs="?", help="the node to drain, n-... (drain only)")
    p.set_defaults(handler=admin_commands.cmd_nodes)

    p = sub.add_parser("redis-cli", help="run one command against the cluster's state store, printed as redis-cli "
                                         "prints it")
    p.add_argument("--redis-url", help="the store's admin URL (default: $CYXWIZ_REDIS_URL or redis_url in the "
                                       "credentials file)")
    p.add_argument("--data-dir", help="where credentials.json is (default: $CYXWIZ_DATA_DIR or ~/.cyxwiz)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="the command and its arguments, e.g. HGETALL cyxwiz:nodes:by_name")
    p.set_defaults(handler=redis_cli.cmd_redis_cli)

    p = sub.add_parser("reap", help="requeue the jobs of nodes whose heartbeat lapsed (for idle deployments)")
    p.add_argument("--redis-url", help="the store's admin URL (default: $CYXWIZ_REDIS_URL or the credentials file)")
    p.add_argument("--data-dir", help="where credentials.json is (default: $CYXWIZ_DATA_DIR or ~/.cyxwiz)")
    p.add_argument("--every", type=float, default=0.0, help="repeat every N seconds (0: once)")
    p.set_defaults(handler=admin_commands.cmd_reap)


def _add_jobs(sub: Any) -> None:
    def client_command(name: str, handler: Any, text: str, json_help: str | None = None) -> argparse.ArgumentParser:
        p = _connection_flags(sub.add_parser(name, help=text), json_help)
        p.set_defaults(handler=handler)
        return p

    p = client_command("submit", job_commands.cmd_submit, "submit a job spec (a JSON file, or - for stdin)",
                       "print the API's answer as JSON (job_id, status, node_id)")
    p.add_argument("file", help="the job spec, a JSON file (examples/digits-mlp.json); - reads standard input")
    p.add_argument("--set", action="append", metavar="PATH=VALUE",
                   help="override a field of the spec, e.g. training.epochs=5 or model.hidden=[64,32]; the value "
                        "is JSON when it parses, else text; repeatable")
    p.add_argument("--watch", action="store_true",
                   help="show a progress bar until the job ends; exit 1 unless it completed")
    p.add_argument("--idempotency-key", help="submitting again with the same key returns the first job")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the job id")
    p = client_command("status", job_commands.cmd_status, "a job in a few lines: status, node, progress, why it waits",
                       "print the whole job object as JSON")
    p.add_argument("job", help="the job id, j-...")
    p = client_command("watch", job_commands.cmd_watch, "a live progress bar until the job ends (exit 1 unless it "
                                                        "completed)")
    p.add_argument("job", help="the job id, j-...")
    p = client_command("cancel", job_commands.cmd_cancel, "cancel one or more jobs",
                       "print the cancelled jobs as a JSON list")
    p.add_argument("jobs", nargs="+", metavar="JOB", help="job ids, j-...")
    p = client_command("jobs", job_commands.cmd_jobs, "list jobs, newest first", "print the page as JSON")
    p.add_argument("--status", choices=JOB_STATUSES, help="only jobs with this status")
    p.add_argument("--tenant", help="only this tenant's jobs (admin key; a tenant's key sees its own anyway)")
    p.add_argument("--limit", type=int, default=50, help="jobs per page (1-500)")
    p.add_argument("--cursor", help="continue after a page (the command prints it when there are more)")
    p = client_command("download", job_commands.cmd_download, "download a job's artifact (default: its weights)")
    p.add_argument("job", help="the job id, j-...")
    p.add_argument("-o", "--output", help="file to write (default: JOB.safetensors in this directory)")
    p.add_argument("--name", default="model.safetensors", help="the artifact to download")
    p = client_command("logs", job_commands.cmd_logs, "a job's log lines with their times",
                       "print {job_id, attempt, lines: [{time, line}]} as JSON")
    p.add_argument("job", help="the job id, j-...")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    p.add_argument("--attempt", type=int, help="this attempt's lines (default: the current attempt)")
    p.add_argument("--tail", type=int, help="only the last N lines")
    p = client_command("sample", job_commands.cmd_sample, "generate text with a trained language model (needs torch)")
    p.add_argument("job", help="the job id of a trained transformer, j-...")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokens", type=int, default=200, help="how many tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 always picks the likeliest token")
    p.add_argument("--top-k", type=int, default=40, help="sample among the K likeliest tokens; 0: among all")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same text")


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """Every parser and sub-parser shows defaults (sub-parsers do not inherit a formatter)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _use_formatter(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cyxwiz", description="Train ML models on other people's GPUs.",
                                     epilog=EXAMPLES)
    parser.add_argument("--version", action=VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    from cyxwiz import cluster

    cluster.add_commands(sub)
    _add_jobs(sub)
    _add_admin(sub)
    _use_formatter(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ApiError as exc:
        print(f"cyxwiz: {printable(exc.explain())}", file=sys.stderr)
    except (CliError, CredentialsError) as exc:
        print(f"cyxwiz: {printable(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`cyxwiz jobs | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
