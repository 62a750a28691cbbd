"""``cyxwiz redis-cli ARGS...``: one command against the cluster's state store, printed as redis-cli
prints it on a terminal, for hosts without redis-cli (docs/redis-keys.md).

The store URL is resolved like every client setting: ``--redis-url``, else ``$CYXWIZ_REDIS_URL``, else
``redis_url`` (the admin URL) in the data dir's ``credentials.json``. The connection is redis-py's (so
``rediss://`` URLs and their options work); replies are read raw, without redis-py's per-command
conversions, and a simple-string reply (``+OK``) is told apart from a bulk string so that it prints
bare, as redis-cli prints it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cyxwiz.client import CliError
from cyxwiz.credentials import resolve
from cyxwiz.output import printable


class Status(bytes):
    """A simple-string reply (``+OK``, ``+PONG``): redis-cli prints it without quotes."""


def _status_parser() -> type:
    """redis-py's RESP2 parser, keeping simple strings apart from bulk strings (imported late: only this
    command needs redis-py)."""
    from redis._parsers import _RESP2Parser

    class StatusParser(_RESP2Parser):  # type: ignore[misc]
        def _read_response(self, disable_decoding: bool = False, **kwargs: Any) -> Any:
            start = self._buffer.get_pos()
            line = self._buffer.readline(**kwargs)
            if line[:1] == b"+":
                return Status(line[1:])
            self._buffer.rewind(start)  # arrays come back here for each element
            return super()._read_response(disable_decoding=disable_decoding, **kwargs)

    return StatusParser


def quoted(value: bytes) -> str:
    """A bulk string as redis-cli shows it: in double quotes, with ``\\"``, ``\\\\``, ``\\n``, ``\\r``,
    ``\\t``, ``\\a``, ``\\b`` escaped and every other byte outside printable ASCII as ``\\xNN``."""
    named = {0x5C: "\\\\", 0x22: '\\"', 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x07: "\\a", 0x08: "\\b"}
    out = []
    for byte in value:
        if byte in named:
            out.append(named[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def format_reply(reply: Any, prefix: str = "") -> str:
    """A reply as redis-cli prints it on a terminal, each line ending in a newline; nested arrays are
    numbered and indented as redis-cli indents them (``prefix`` is the indentation of the level)."""
    if isinstance(reply, Exception):
        return f"(error) {printable(error_text(reply))}\n"
    if isinstance(reply, Status):
        return printable(reply.decode(errors="replace")) + "\n"
    if isinstance(reply, bytes):
        return quoted(reply) + "\n"
    if isinstance(reply, bool):  # not sent by RESP2, but never print True as an integer
        return f"(integer) {int(reply)}\n"
    if isinstance(reply, int):
        return f"(integer) {reply}\n"
    if reply is None:
        return "(nil)\n"
    if isinstance(reply, list):
        if not reply:
            return "(empty array)\n"
        width = len(str(len(reply)))
        nested = prefix + " " * (width + 2)
        return "".join(f"{'' if i == 0 else prefix}{i + 1:>{width}}) " + format_reply(item, nested)
                       for i, item in enumerate(reply))
    return quoted(str(reply).encode()) + "\n"


def error_text(exc: Exception) -> str:
    """The server's error as it sent it (``ERR ...``, ``WRONGTYPE ...``): redis-py strips known codes."""
    code = getattr(exc, "status_code", None)
    return f"{code} {exc}" if code else str(exc) or type(exc).__name__


def run_command(redis_url: str, args: list[str], timeout_s: float = 10.0) -> Any:
    """Send one command; its raw reply, or the server's error as an exception instance (not raised)."""
    import redis
    from redis.exceptions import ResponseError

    options: dict[str, Any] = {}
    try:  # redis-py >= 6.4 asks servers for maintenance push messages, which need a RESP3 parser: not wanted
        from redis.maint_notifications import MaintNotificationsConfig

        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    except ImportError:
        pass
    client = redis.Redis.from_url(redis_url, parser_class=_status_parser(), protocol=2, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s, **options)
    pool = client.connection_pool
    try:
        connection = pool.get_connection()
        try:
            connection.send_command(*args)
            return connection.read_response(disable_decoding=True)
        except ResponseError as exc:
            return exc
        finally:
            pool.release(connection)
    finally:
        client.close()


def cmd_redis_cli(args: argparse.Namespace) -> int:
    from redis.exceptions import AuthenticationError, RedisError

    command = list(args.args)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CliError("give a command, like: cyxwiz redis-cli HGETALL cyxwiz:nodes:by_name")
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else None
    redis_url = resolve("redis_url", args.redis_url, data_dir)
    if not redis_url:
        raise CliError("no store URL: pass --redis-url, set CYXWIZ_REDIS_URL, or run where `cyxwiz serve` wrote "
                       "credentials.json (its redis_url)")
    try:
        reply = run_command(redis_url, command)
    except AuthenticationError as exc:
        raise CliError(f"the store refused the credentials of that URL ({error_text(exc)}); use the admin URL, "
                       "redis_url in credentials.json") from None
    except (RedisError, OSError, ValueError) as exc:
        raise CliError(f"cannot reach the store: {exc}") from None
    print(format_reply(reply), end="")
    return 1 if isinstance(reply, Exception) else 0
