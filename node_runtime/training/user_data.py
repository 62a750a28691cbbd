"""User datasets: fetch ``dataset.url`` within the operator's limits and parse npz or csv arrays.

Tenants are strangers. A download reaches only public addresses (or networks the operator lists),
checked on every redirect hop against the address actually connected to; it must finish within a
deadline at a minimum average rate; downloaded and decompressed bytes are capped. Nothing here
unpickles (npz loads with ``allow_pickle=False``, csv is parsed as text), and no error quotes the
data or a server's answer: a tenant reads the job's error, and the data may not be theirs.
"""

from __future__ import annotations

import csv
import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
_INTEGER = re.compile(r"\s*[-+]?\d+\s*")


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


def read_dataset_bytes(url: str, data_root: Path | None, allow_http: bool,
                       limits: DatasetLimits = DEFAULT_LIMITS) -> bytes:
    """The raw bytes behind ``url``: a path under ``data_root`` or, when allowed, an http(s) download."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not allow_http:
            raise JobError("this node does not allow http(s) dataset urls; ask its operator or use a node that does")
        return _download(url, limits)
    if data_root is None:
        raise JobError("this node allows no local dataset files (it has no data directory)")
    raw_path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url
    root = data_root.resolve()
    path = (root / raw_path).resolve()  # an absolute raw_path replaces root, and is checked like any other
    if not path.is_relative_to(root):
        raise JobError(f"dataset path {raw_path!r} is outside the node's data directory")
    try:
        with path.open("rb") as handle:  # read to the cap, not stat: a fifo or a growing file has no honest size
            data = handle.read(limits.max_bytes + 1)
    except OSError as error:
        raise JobError(f"cannot read dataset file {raw_path!r}: {error.strerror or error}") from error
    if len(data) > limits.max_bytes:
        raise JobError(f"dataset file {raw_path!r} is larger than {limits.max_mb} MiB")
    return data


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


def _download(url: str, limits: DatasetLimits) -> bytes:
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


def parse_arrays(data: bytes, data_format: str, max_bytes: int = DEFAULT_LIMITS.max_bytes
                 ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(x, y, y_is_integer) from npz (arrays ``x`` and ``y``) or csv (last column is the target); the
    data may decompress to at most ``max_bytes``."""
    return _parse_npz(data, max_bytes) if data_format == "npz" else _parse_csv(data, max_bytes)


def _parse_npz(data: bytes, max_bytes: int) -> tuple[np.ndarray, np.ndarray, bool]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:  # the members' sizes are declared and enforced by zipfile
            if sum(member.file_size for member in archive.infolist()) > max_bytes:
                raise JobError(f"the npz file decompresses to more than {max_bytes >> 20} MiB")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            missing = {"x", "y"} - set(arrays.files)
            if missing:
                raise JobError(f"the npz file needs arrays named x and y; it lacks {', '.join(sorted(missing))}")
            x, y = arrays["x"], arrays["y"]
    except JobError:
        raise
    except Exception as error:  # zip, format and pickle-refusal errors; their text can quote the file
        raise JobError(f"cannot read the dataset as npz ({type(error).__name__}): it must be a zip of numeric "
                       "arrays from numpy.savez or savez_compressed, with no pickled objects") from error
    if y.dtype.kind not in "biuf" or x.dtype.kind not in "biuf":
        raise JobError("npz arrays x and y must hold numbers")
    return x, y, y.dtype.kind in "biu"


def _parse_csv(data: bytes, max_bytes: int) -> tuple[np.ndarray, np.ndarray, bool]:
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, max_bytes)
    try:
        rows = [row for row in csv.reader(io.StringIO(data.decode("utf-8-sig"))) if row]
    except UnicodeDecodeError as error:
        raise JobError(f"the csv is not UTF-8 text (bad byte at offset {error.start})") from error
    except csv.Error as error:  # the csv module's messages name the problem, never the text
        raise JobError(f"cannot read the dataset as csv: {error}") from error
    if rows and not _numeric(rows[0][0]):
        rows = rows[1:]  # a header line
    if not rows or len(rows[0]) < 2:
        raise JobError("the csv needs at least one feature column and a target column, and one data row")
    width = len(rows[0])
    for number, row in enumerate(rows, start=1):
        if len(row) != width:
            raise JobError(f"csv data row {number} has {len(row)} columns; the first has {width}")
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError as error:  # numpy's message quotes the cell, which may be a secret: name its place only
        for number, row in enumerate(rows, start=1):
            for column, cell in enumerate(row, start=1):
                if not _numeric(cell):
                    raise JobError(f"csv data row {number}, column {column} is not a number") from error
        raise JobError("the csv must hold only numbers") from error
    integer_targets = all(_INTEGER.fullmatch(row[-1]) for row in rows)
    return table[:, :-1].astype(np.float32), table[:, -1], integer_targets


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """Inflate gzip members, never holding more than ``max_bytes`` of output (a 2 MB file can inflate to 2 GiB)."""
    output, rest = bytearray(), data
    try:
        while rest[:2] == b"\x1f\x8b":  # members follow each other; anything after the last is ignored
            inflater, pending = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), rest
            while not inflater.eof:
                before = len(output)
                output += inflater.decompress(pending, max_bytes + 1 - len(output))
                if len(output) > max_bytes:
                    raise JobError(f"the gzipped csv decompresses to more than {max_bytes >> 20} MiB")
                pending = inflater.unconsumed_tail
                if not pending and len(output) == before:
                    raise JobError("the gzipped csv is truncated")
            rest = inflater.unused_data
    except zlib.error as error:
        raise JobError(f"cannot decompress the gzipped csv: {error}") from error
    return bytes(output)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def prepare_arrays(x: np.ndarray, y: np.ndarray, y_is_integer: bool, task: str) -> tuple[np.ndarray, np.ndarray,
                                                                                         dict[str, Any]]:
    """Check shapes and values, decide the task, and return (x float32, y, data_info fields)."""
    if len(x) != len(y):
        raise JobError(f"x has {len(x)} samples but y has {len(y)}")
    if len(x) < 2:
        raise JobError("the dataset needs at least 2 samples")
    if x.ndim not in (2, 3, 4):
        raise JobError(f"x must be (samples, features), (samples, height, width) or (samples, channels, height, "
                       f"width); it has shape {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise JobError("x contains NaN or infinite values")
    image_shape = None if x.ndim == 2 else ([1, *x.shape[1:]] if x.ndim == 3 else list(x.shape[1:]))
    fields: dict[str, Any] = {"num_features": int(np.prod(x.shape[1:])), "image_shape": image_shape}
    if task == "auto":
        task = "classification" if y_is_integer else "regression"
    if task == "classification":
        if y.ndim != 1 or not np.isfinite(y).all() or (y < 0).any() or (y != np.round(y)).any():
            raise JobError("classification targets y must be one non-negative integer class per sample")
        fields["num_classes"] = int(y.max()) + 1 if len(y) else 0
        if fields["num_classes"] > 100_000:
            raise JobError(f"y names {fields['num_classes']} classes; at most 100000 are supported")
        return x, y.astype(np.int64), {"task": task, **fields}
    if y.ndim not in (1, 2) or not np.isfinite(y).all():
        raise JobError("regression targets y must be finite numbers, one value or one row per sample")
    targets = y.astype(np.float32).reshape(len(y), -1)
    return x, targets, {"task": "regression", "target_dim": int(targets.shape[1]), **fields}
