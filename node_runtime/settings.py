"""The node runtime's settings: one frozen object, read once at start from flags and environment.

Each value comes from its flag, else its ``CYXWIZ_*`` variable, else (for the API URL and join token)
the credentials file that ``cyxwiz serve`` writes into the data dir. A missing or bad value fails at
start, naming the flag and the variable. A node needs no store URL: registration hands it one, with
a store user of its own that can only read its assignment stream.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cyxwiz.credentials import read_credentials
from shared.settings import SettingsError, default_data_dir

DEFAULT_API_URL = "http://127.0.0.1:8080"
DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class NodeSettings:
    """Everything one node runtime process needs, fixed at start."""

    api_url: str
    join_token: str
    store_host: str | None = None      # host[:port] that replaces the host of the store URL registration hands out
    ca_file: str | None = None         # a CA bundle to trust for an https API (a private CA)
    slots: int = 1
    name: str = field(default_factory=socket.gethostname)
    labels: dict[str, str] = field(default_factory=dict)
    address: str | None = None         # where a multi-node job's other nodes reach it; None: as the gateway sees it
    data_root: Path | None = None      # local dataset files are allowed only under this directory
    allow_http: bool = False           # http(s) dataset URLs are refused unless the operator allows them
    # Dataset downloads never reach loopback, link-local, private or metadata addresses (before and after
    # redirects) except networks the operator lists here; they must finish within a deadline at a minimum
    # rate; downloaded and decompressed data is capped in bytes.
    dataset_allow_nets: tuple[str, ...] = ()
    dataset_timeout_s: float = 600.0
    dataset_min_rate_bps: float = 16384.0
    max_dataset_mb: int = 1024
    job_base_memory_mb: int = 0        # memory a job process may use beyond its estimate; 0: per device kind
    device: str = "auto"               # auto: CUDA when the host has it, else CPU
    torch_threads: int | None = None   # per job; None: the host's cores shared among the slots
    drain_timeout_s: float = 120.0     # SIGTERM: how long running jobs get to checkpoint and hand back
    cancel_grace_s: float = 15.0       # a stopped job process that has not exited by then is killed
    stall_timeout_s: float = 600.0     # a job process that takes no training step for this long is killed
    startup_timeout_s: float = 1800.0  # ... or no first step for this long (imports, data download, checkpoint)
    poll_block_ms: int = 1000          # XREADGROUP BLOCK: also how quickly the consumer notices a re-registration
    retry_max_s: float = 10.0          # longest wait between retries while the API or Redis is unreachable
    warm_processes: bool = True        # fork job processes from a server that preloaded torch (executor.py)
    state_dir: Path | None = None      # where the node key and the registration are kept (0700): identity and resume


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cyxwiz node`` (and ``python -m node_runtime``)."""
    parser.add_argument("--api", help=f"API URL (default: $CYXWIZ_API_URL, the credentials file, {DEFAULT_API_URL})")
    parser.add_argument("--join-token", help="join token (default: $CYXWIZ_JOIN_TOKEN or the credentials file)")
    parser.add_argument("--redis-url", metavar="HOST[:PORT]",
                        help="reach the state store at this host (and port) instead of the address registration "
                             "hands out, for nodes behind NAT or split DNS; a URL's host and port are used, its "
                             "credentials never (default: $CYXWIZ_NODE_REDIS_HOST)")
    parser.add_argument("--ca-file", help="CA certificates to trust for an https API (default: $CYXWIZ_CA_FILE, "
                                          "else the system's)")
    parser.add_argument("--slots", type=int, help="jobs run at once (default: $CYXWIZ_NODE_SLOTS or 1)")
    parser.add_argument("--name", help="node name; reputation follows it (default: $CYXWIZ_NODE_NAME or the hostname)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="a label jobs can require (repeatable)")
    parser.add_argument("--data-root", help="directory under which jobs may read local dataset files "
                                            "(default: $CYXWIZ_NODE_DATA_ROOT; none: local files are refused)")
    parser.add_argument("--allow-http", action="store_true", default=None,
                        help="let jobs download http(s) datasets (default: $CYXWIZ_NODE_ALLOW_HTTP or no)")
    parser.add_argument("--allow-dataset-net", action="append", default=[], metavar="CIDR",
                        help="a private network dataset downloads may reach; they reach only public addresses "
                             "otherwise (repeatable; default: $CYXWIZ_NODE_DATASET_ALLOW_NETS, comma-separated)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, help="auto (CUDA when present), cpu or cuda "
                                                                 "(default: $CYXWIZ_NODE_DEVICE or auto)")
    parser.add_argument("--torch-threads", type=int, help="CPU threads per job (default: $CYXWIZ_NODE_TORCH_THREADS, "
                                                          "else the cores shared among the slots)")
    parser.add_argument("--warm-processes", action=argparse.BooleanOptionalAction, default=None,
                        help="start each job in a process forked from a server that preloaded torch (well under "
                             "a second to the first step), or with --no-warm-processes in a fresh interpreter "
                             "(seconds of imports) (default: $CYXWIZ_NODE_WARM_PROCESSES or on)")
    parser.add_argument("--address", help="the IP or host name the other nodes of a multi-node job reach this "
                                          "node at (default: $CYXWIZ_NODE_ADDRESS, else the address the "
                                          "gateway sees it connect from)")
    parser.add_argument("--data-dir", help="where credentials.json is (default: $CYXWIZ_DATA_DIR or ~/.cyxwiz)")


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> NodeSettings:
    """Build the settings from parsed flags, the environment and the credentials file; raise
    :class:`SettingsError` naming the flag and variable of a missing or bad value."""
    env = dict(os.environ) if env is None else dict(env)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir(env)
    creds = read_credentials(data_dir)

    def pick(flag_value: str | None, variable: str, cred_name: str | None = None) -> str | None:
        if flag_value:
            return flag_value
        if env.get(variable):
            return env[variable]
        value = creds.get(cred_name) if cred_name else None
        return str(value) if value else None

    join_token = pick(args.join_token, "CYXWIZ_JOIN_TOKEN", "join_token")
    if not join_token:
        raise SettingsError("no join token: pass --join-token, set CYXWIZ_JOIN_TOKEN, or run `cyxwiz serve` "
                            f"so that {data_dir / 'credentials.json'} exists")
    store_host = pick(args.redis_url, "CYXWIZ_NODE_REDIS_HOST")
    if store_host is not None:
        store_host = _host_port(store_host)
    ca_file = pick(args.ca_file, "CYXWIZ_CA_FILE")
    if ca_file is not None and not Path(ca_file).is_file():
        raise SettingsError(f"--ca-file / CYXWIZ_CA_FILE: {ca_file} is not a file")
    data_root_raw = pick(args.data_root, "CYXWIZ_NODE_DATA_ROOT")
    data_root = Path(data_root_raw).expanduser().resolve() if data_root_raw else None
    if data_root is not None and not data_root.is_dir():
        raise SettingsError(f"--data-root / CYXWIZ_NODE_DATA_ROOT: {data_root} is not a directory")
    device = pick(args.device, "CYXWIZ_NODE_DEVICE") or "auto"
    if device not in DEVICE_CHOICES:
        raise SettingsError(f"--device / CYXWIZ_NODE_DEVICE must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    threads = _int(args.torch_threads, env, "--torch-threads", "CYXWIZ_NODE_TORCH_THREADS", None, minimum=1)
    return NodeSettings(
        api_url=(pick(args.api, "CYXWIZ_API_URL", "api_url") or DEFAULT_API_URL).rstrip("/"),
        join_token=join_token,
        store_host=store_host,
        ca_file=ca_file,
        slots=_int(args.slots, env, "--slots", "CYXWIZ_NODE_SLOTS", 1, minimum=1) or 1,
        name=pick(args.name, "CYXWIZ_NODE_NAME") or socket.gethostname(),
        labels=_labels(args.label),
        address=pick(args.address, "CYXWIZ_NODE_ADDRESS"),
        data_root=data_root,
        allow_http=bool(args.allow_http) or _flag(env, "CYXWIZ_NODE_ALLOW_HTTP"),
        dataset_allow_nets=_networks(args.allow_dataset_net, env),
        dataset_timeout_s=_float(env, "CYXWIZ_NODE_DATASET_TIMEOUT_S", 600.0),
        dataset_min_rate_bps=_float(env, "CYXWIZ_NODE_DATASET_MIN_RATE_BPS", 16384.0),
        max_dataset_mb=_int(None, env, None, "CYXWIZ_NODE_MAX_DATASET_MB", 1024, minimum=1) or 1024,
        device=device,
        torch_threads=threads,
        drain_timeout_s=_float(env, "CYXWIZ_NODE_DRAIN_TIMEOUT_S", 120.0),
        cancel_grace_s=_float(env, "CYXWIZ_NODE_CANCEL_GRACE_S", 15.0),
        stall_timeout_s=_float(env, "CYXWIZ_NODE_STALL_TIMEOUT_S", 600.0),
        startup_timeout_s=_float(env, "CYXWIZ_NODE_STARTUP_TIMEOUT_S", 1800.0),
        retry_max_s=_float(env, "CYXWIZ_NODE_RETRY_MAX_S", 10.0),
        warm_processes=(args.warm_processes if args.warm_processes is not None
                        else _flag(env, "CYXWIZ_NODE_WARM_PROCESSES", default=True)),
        job_base_memory_mb=int(_float(env, "CYXWIZ_NODE_JOB_BASE_MEMORY_MB", 0.0)),
        state_dir=data_dir / "nodes",
    )


def run_node_from_args(args: argparse.Namespace) -> int:
    """``cyxwiz node`` and ``python -m node_runtime``: read the settings (exit 2 naming a bad one), run."""
    from node_runtime.agent import run_node  # the agent imports settings: import it only to run

    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"cyxwiz node: {exc}", file=sys.stderr)
        return 2
    return run_node(settings)


def _int(flag_value: int | None, env: dict[str, str], flag: str | None, variable: str, default: int | None,
         *, minimum: int) -> int | None:
    if flag_value is not None:
        value = flag_value
    elif env.get(variable):
        try:
            value = int(env[variable])
        except ValueError:
            raise SettingsError(f"{variable} must be an integer, got {env[variable]!r}") from None
    else:
        return default
    if value < minimum:
        raise SettingsError(f"{f'{flag} / ' if flag else ''}{variable} must be >= {minimum}, got {value}")
    return value


def _networks(flag_values: list[str], env: dict[str, str]) -> tuple[str, ...]:
    """The networks of ``--allow-dataset-net`` (else the variable's comma-separated list), normalized."""
    raw = flag_values or [part.strip() for part in env.get("CYXWIZ_NODE_DATASET_ALLOW_NETS", "").split(",")]
    networks = []
    for cidr in filter(None, raw):
        try:
            networks.append(str(ipaddress.ip_network(cidr, strict=False)))
        except ValueError:
            raise SettingsError(f"--allow-dataset-net / CYXWIZ_NODE_DATASET_ALLOW_NETS takes networks such as "
                                f"10.0.0.0/8 or fd00::/8, got {cidr!r}") from None
    return tuple(networks)


def _host_port(raw: str) -> str:
    """``host``, ``host:port`` or a URL (only its host and port are kept) as ``host[:port]``."""
    parts = urlsplit(raw if "//" in raw else "//" + raw)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = -1
    if not parts.hostname or port == -1:
        raise SettingsError(f"--redis-url / CYXWIZ_NODE_REDIS_HOST takes HOST[:PORT] or a URL, got {raw!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}" if port else host


def _float(env: dict[str, str], variable: str, default: float) -> float:
    raw = env.get(variable)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{variable} must be a number, got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{variable} must be > 0, got {raw!r}")
    return value


def _flag(env: dict[str, str], variable: str, default: bool = False) -> bool:
    raw = env.get(variable, "").strip().lower()
    if not raw:
        return default
    if raw in ("0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{variable} must be 1/0, true/false, yes/no or on/off, got {raw!r}")


def _labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SettingsError(f"--label takes KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels
