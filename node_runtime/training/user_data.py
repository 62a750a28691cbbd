"""User datasets: fetch ``dataset.url`` within the operator's limits and parse npz or csv arrays.

Nothing here unpickles: npz arrays load with ``allow_pickle=False`` and csv is parsed as text.
Every failure is a ``JobError`` whose message tells the user what to fix.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from node_runtime.training.context import JobError

MAX_DATASET_BYTES = 1 << 30  # a node holds the whole dataset in memory; beyond 1 GiB use a bigger pipeline
_INTEGER = re.compile(r"\s*[-+]?\d+\s*")


def read_dataset_bytes(url: str, data_root: Path | None, allow_http: bool) -> bytes:
    """The raw bytes behind ``url``: a path under ``data_root`` or, when allowed, an http(s) download."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not allow_http:
            raise JobError("this node does not allow http(s) dataset urls; ask its operator or use a node that does")
        return _download(url)
    if data_root is None:
        raise JobError("this node allows no local dataset files (it has no data directory)")
    raw_path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url
    root = data_root.resolve()
    path = (root / raw_path).resolve()  # an absolute raw_path replaces root, and is checked like any other
    if not path.is_relative_to(root):
        raise JobError(f"dataset path {raw_path!r} is outside the node's data directory")
    try:
        if path.stat().st_size > MAX_DATASET_BYTES:
            raise JobError(f"dataset file {raw_path!r} is larger than {MAX_DATASET_BYTES >> 20} MiB")
        return path.read_bytes()
    except OSError as error:
        raise JobError(f"cannot read dataset file {raw_path!r}: {error.strerror or error}") from error


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (scheme checked by the caller)
            data: bytes = response.read(MAX_DATASET_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise JobError(f"cannot download dataset {url!r}: {error}") from error
    if len(data) > MAX_DATASET_BYTES:
        raise JobError(f"dataset at {url!r} is larger than {MAX_DATASET_BYTES >> 20} MiB")
    return data


def parse_arrays(data: bytes, data_format: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(x, y, y_is_integer) from npz (arrays ``x`` and ``y``) or csv (last column is the target)."""
    return _parse_npz(data) if data_format == "npz" else _parse_csv(data)


def _parse_npz(data: bytes) -> tuple[np.ndarray, np.ndarray, bool]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise JobError(f"the npz file needs arrays named x and y; it lacks {', '.join(sorted(missing))}")
            x, y = archive["x"], archive["y"]
    except JobError:
        raise
    except Exception as error:  # zip, format and pickle-refusal errors all mean "not a usable npz"
        raise JobError(f"cannot read the dataset as npz: {error}") from error
    if y.dtype.kind not in "biuf" or x.dtype.kind not in "biuf":
        raise JobError("npz arrays x and y must hold numbers")
    return x, y, y.dtype.kind in "biu"


def _parse_csv(data: bytes) -> tuple[np.ndarray, np.ndarray, bool]:
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise JobError(f"cannot decompress the gzipped csv: {error}") from error
    try:
        rows = [row for row in csv.reader(io.StringIO(data.decode("utf-8-sig"))) if row]
    except (UnicodeDecodeError, csv.Error) as error:
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
    except ValueError as error:
        raise JobError(f"the csv must hold only numbers: {error}") from error
    integer_targets = all(_INTEGER.fullmatch(row[-1]) for row in rows)
    return table[:, :-1].astype(np.float32), table[:, -1], integer_targets


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
