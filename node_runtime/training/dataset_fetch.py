"""Downloading a user dataset over http(s) within the node operator's limits (``DatasetLimits``).

Tenants are strangers. A download reaches only public addresses (or networks the operator lists),
checked on every redirect hop against the address actually connected to; it must finish within a
deadline at a minimum average rate; downloaded bytes are capped. No error quotes a server's answer:
a tenant reads the job's error. Reading local files and parsing the bytes live in ``user_data``.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from node_runtime.training.context import JobError, TrainingContext

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 5
RATE_GRACE_S = 10.0  # the minimum rate applies after this (or a quarter of the timeout): DNS, TLS, slow start
READ_TIMEOUT_S = 30.0  # longest silence of a server within the deadline and rate
_READ_CHUNK = 1 << 20
_REDIRECTS = (301, 302, 303, 307, 308)
# Cloud instance metadata hands out credentials: refused even inside a network the operator allows.
_METADATA = frozenset(map(ipaddress.ip_address, ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class DatasetLimits:
    """The node operator's limits on one dataset (``NodeSettings``): networks, time, rate and size."""

    allow_nets: tuple[str, ...] = ()  # CIDRs a download may reach although they are not public
    timeout_s: float = 600.0
    min_rate_bps: float = 16384.0
    max_mb: int = 1024  # a node holds the whole dataset in memory: downloaded, read and decompressed bytes

    @classmethod
    def of(cls, ctx: TrainingContext) -> DatasetLimits:
        return cls(ctx.dataset_allow_nets, ctx.dataset_timeout_s, ctx.dataset_min_rate_bps, ctx.max_dataset_mb)

    @property
    def max_bytes(self) -> int:
        return self.max_mb << 20


DEFAULT_LIMITS = DatasetLimits()


@dataclass(frozen=True)
class _Target:
    """One hop's url, split into what the connection needs."""

    scheme: str
    host: str  # IDNA-encoded, without brackets
    port: int
    netloc: str  # the Host header
    path: str  # path and query, ascii

    @classmethod
    def parse(cls, url: str, redirected: bool) -> _Target:
        parts = urllib.parse.urlsplit(url)
        what = "the dataset url redirects to a url that" if redirected else "the dataset url"
        if parts.scheme not in ("http", "https"):  # urlsplit lowercases the scheme
            raise JobError(f"{what} is not http(s)")
        if parts.username is not None or parts.password is not None:
            raise JobError(f"{what} carries a user name or password; nodes send no credentials")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = (parts.hostname or "").encode("idna").decode("ascii")
        except (ValueError, UnicodeError):
            raise JobError(f"{what} has a bad host or port") from None
        if not host:
            raise JobError(f"{what} has no host")
        netloc = f"[{host}]" if ":" in host else host
        path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
        query = urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=~?")
        return cls(parts.scheme, host, port, netloc if parts.port is None else f"{netloc}:{port}",
                   path + (f"?{query}" if query else ""))


def download_dataset(url: str, limits: DatasetLimits) -> bytes:
    """The body of a 200 answer for ``url`` (following redirects), or a ``JobError``."""
    networks = [ipaddress.ip_network(net, strict=False) for net in limits.allow_nets]
    meter = _Meter(limits)
    for redirects in range(MAX_REDIRECTS + 1):
        target = _Target.parse(url, redirected=redirects > 0)
        meter.host = target.host
        connection = _PinnedConnection(target, _checked_addresses(target, networks, redirects > 0), meter)
        try:
            connection.request("GET", target.path, headers={
                "Host": target.netloc, "Accept-Encoding": "identity", "Connection": "close",
                "User-Agent": "cyxwiz-node"})
            response = connection.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise JobError(f"the dataset server {target.host!r} redirects without a Location")
                url = urllib.parse.urljoin(url, location.strip())
                continue
            if response.status != 200:
                raise JobError(f"the dataset server {target.host!r} answered HTTP {response.status}")
            return _read_body(response, target.host, limits)
        except (OSError, http.client.HTTPException) as error:
            meter.next_limit()  # a limit that ran out names itself
            raise JobError(f"cannot download the dataset from {target.host!r}: {_describe(error)}") from error
        finally:
            connection.release()
    raise JobError(f"the dataset url redirects more than {MAX_REDIRECTS} times")


def _checked_addresses(target: _Target, networks: list[IPNetwork], redirected: bool) -> list[str]:
    """Every address ``target.host`` resolves to, all allowed, or a ``JobError``."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise JobError(f"cannot resolve the dataset host {target.host!r}: {_describe(error)}") from error
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        refused = _refusal(ipaddress.ip_address(address), networks)
        if refused:
            reached = " (reached after redirects)" if redirected else ""
            raise JobError(f"the dataset host {target.host!r}{reached} resolves to {refused} address; nodes "
                           "download only from public addresses, and networks their operator allows")
    return addresses


def _refusal(address: IPAddress, networks: list[IPNetwork]) -> str | None:
    """What kind of address a download must not reach (``"a loopback"``), or None."""
    if isinstance(address, ipaddress.IPv6Address):  # an IPv4 address in IPv6 clothing is judged as IPv4
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return _refusal(embedded, networks)
    if address in _METADATA:
        return "a cloud metadata"
    if any(address in network for network in networks):
        return None
    for kind, flag in (("an unspecified", address.is_unspecified), ("a loopback", address.is_loopback),
                       ("a link-local", address.is_link_local), ("a multicast", address.is_multicast),
                       ("a private", address.is_private), ("a reserved", address.is_reserved),
                       ("a non-public", not address.is_global)):
        if flag:
            return kind
    return None


def _describe(error: Exception) -> str:
    """An error's gist without anything a server sent (http.client's errors can quote its answer)."""
    if isinstance(error, ssl.SSLError):
        return f"TLS failed ({error.reason or type(error).__name__})"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__


class _Meter:
    """The whole download's deadline and minimum average rate, counted over every byte of every hop."""

    def __init__(self, limits: DatasetLimits) -> None:
        self.limits, self.started, self.received, self.host = limits, time.monotonic(), 0, ""
        self.grace_s = min(RATE_GRACE_S, limits.timeout_s / 4)

    def next_limit(self) -> tuple[float, str]:
        """Seconds a wait may last before a limit breaks, and that limit's error; raises the error of a
        limit already broken."""
        elapsed = time.monotonic() - self.started
        where, limits = f"the dataset download from {self.host!r}", self.limits
        seconds, broken = min(
            (limits.timeout_s - elapsed, f"{where} took longer than the node's limit of {limits.timeout_s:g} s"),
            (max(self.grace_s, self.received / limits.min_rate_bps) - elapsed,
             f"{where} was slower than the node's minimum of {limits.min_rate_bps:g} bytes/s"),
            (READ_TIMEOUT_S, f"{where} stalled: nothing arrived for {READ_TIMEOUT_S:g} s"))
        if seconds <= 0:
            raise JobError(broken)
        return seconds, broken


class _MeteredReader(io.RawIOBase):
    """A socket's receiving side that waits no longer than the meter allows and counts what arrives."""

    def __init__(self, sock: socket.socket, meter: _Meter) -> None:
        super().__init__()
        self._sock, self._meter = sock, meter

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        seconds, broken = self._meter.next_limit()
        self._sock.settimeout(seconds)
        try:
            count = self._sock.recv_into(buffer)
        except TimeoutError:
            raise JobError(broken) from None
        self._meter.received += count
        return count


class _MeteredSocket:
    """What http.client uses of a socket (sendall, makefile, close), with metered reads."""

    def __init__(self, sock: socket.socket, meter: _Meter) -> None:
        self.sock, self._meter = sock, meter

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_MeteredReader(self.sock, self._meter))

    def close(self) -> None:
        pass  # http.client "closes" the socket once a response takes it over: release() closes it


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to addresses checked beforehand (no second lookup: no DNS rebinding); TLS is verified
    against the url's host name, which is also the Host header."""

    def __init__(self, target: _Target, addresses: list[str], meter: _Meter) -> None:
        super().__init__(target.host, target.port)
        self._target, self._addresses, self._meter = target, addresses, meter
        self._opened: socket.socket | None = None

    def connect(self) -> None:
        self._opened = self._open()
        self.sock = _MeteredSocket(self._opened, self._meter)

    def _open(self) -> socket.socket:
        failure = OSError("no address")
        for address in self._addresses:  # all were checked: the first that answers serves
            try:
                sock = socket.create_connection((address, self._target.port), timeout=self._meter.next_limit()[0])
            except OSError as error:
                failure = error
                continue
            if self._target.scheme != "https":
                return sock
            try:
                sock.settimeout(self._meter.next_limit()[0])  # for the handshake as a whole
                return ssl.create_default_context().wrap_socket(sock, server_hostname=self._target.host)
            except BaseException:
                sock.close()
                raise
        raise failure

    def release(self) -> None:
        self.close()
        if self._opened is not None:
            self._opened.close()


def _read_body(response: http.client.HTTPResponse, host: str, limits: DatasetLimits) -> bytes:
    too_large = JobError(f"the dataset at {host!r} is larger than {limits.max_mb} MiB")
    expected = response.length
    if expected is not None and expected > limits.max_bytes:
        raise too_large
    chunks, total = [], 0
    while chunk := response.read(min(_READ_CHUNK, limits.max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limits.max_bytes:
            raise too_large
    if expected is not None and total != expected:
        raise JobError(f"the dataset download from {host!r} was cut short ({total} of {expected} bytes)")
    return b"".join(chunks)
