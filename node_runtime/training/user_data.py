"""User datasets: read ``dataset.url`` (a file under the data directory, or an http(s) download
through ``dataset_fetch``) within the operator's limits, and parse and check npz or csv arrays.

Tenants are strangers. Read and decompressed bytes are capped. Nothing here unpickles (npz loads
with ``allow_pickle=False``, csv is parsed as text), and no error quotes the data: a tenant reads
the job's error, and the data may not be theirs.
"""

from __future__ import annotations

import csv
import io
import re
import urllib.parse
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from node_runtime.training.context import JobError
from node_runtime.training.dataset_fetch import DEFAULT_LIMITS, MAX_REDIRECTS, DatasetLimits, download_dataset

# DatasetLimits, DEFAULT_LIMITS and MAX_REDIRECTS live with the download; re-exported for existing imports.
__all__ = ["DEFAULT_LIMITS", "MAX_REDIRECTS", "DatasetLimits", "parse_arrays", "prepare_arrays", "read_dataset_bytes"]

_INTEGER = re.compile(r"\s*[-+]?\d+\s*")


def read_dataset_bytes(url: str, data_root: Path | None, allow_http: bool,
                       limits: DatasetLimits = DEFAULT_LIMITS) -> bytes:
    """The raw bytes behind ``url``: a path under ``data_root`` or, when allowed, an http(s) download."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not allow_http:
            raise JobError("this node does not allow http(s) dataset urls; ask its operator or use a node that does")
        return download_dataset(url, limits)
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
