"""Uploaded safetensors artifacts: parse, check against the job, and digest, in pure Python (no torch).

The gateway checks every ``model.safetensors`` and ``checkpoint.safetensors`` it receives as the
bytes stream in (:class:`StreamingDigest`, never holding more than the header): the header must be
well formed, its tensors exactly those the job's spec builds (:func:`check_weights`,
:func:`check_checkpoint`). Anything else is refused with :class:`InvalidArtifact` (422).

State digests, the commitment that node and gateway share (the node calls :func:`digest_bytes` on its
own bytes; the gateway computes the same while streaming)::

    state_digest(prefix) = sha256 of the concatenation, over the tensors whose name starts with
    ``prefix``, sorted by the name with ``prefix`` removed (code point order), of the UTF-8 line
        f"{name without prefix}\\0{dtype}\\0{shape as comma-joined ints}\\0{sha256 hex of its raw bytes}\\n"

``weights`` is the state digest of the model: prefix "model/" in a checkpoint, "" (every tensor) in a
model.safetensors, so the two agree for the same weights. ``optimizer`` is that of "optimizer/".
Metadata is never digested: it carries wall-clock figures that differ between equal runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidArtifact, InvalidField
from shared.jobspec import data_info, known_data_info
from shared.model_shapes import expected_parameter_shapes, expected_state_shapes
from shared.splits import held_out_bytes, held_out_samples, windows_per_epoch

__all__ = ["CHECKPOINT_FORMAT", "MAX_HEADER_BYTES", "WEIGHTS_FORMAT", "ArtifactDigest", "Header",
           "InvalidArtifact", "StreamingDigest", "TensorInfo", "batches_per_epoch", "check_checkpoint",
           "check_weights", "digest_bytes", "expected_parameter_shapes", "expected_state_shapes",
           "parse_header", "placeholder_weights", "spec_fingerprint", "total_steps"]

CHECKPOINT_FORMAT = "cyxwiz-checkpoint/1"
WEIGHTS_FORMAT = "cyxwiz-weights/1"
# training settings that do not change the numbers a run computes, so a resume may differ in them
_NOT_NUMERIC = ("epochs", "progress_every_steps", "progress_every_s", "checkpoint", "kernels")
MAX_HEADER_BYTES = 16 * 2**20  # our largest models' headers are a few hundred KiB; more is not ours
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# Sizes of the shipped datasets (node_runtime/data), so batches per epoch are known without loading them;
# tests/shared/test_safetensors_check.py checks them against the files.
DIGITS_SAMPLES = 1797
TINY_TEXT_BYTES = 195_723
TINY_SHAKESPEARE_BYTES = 1_115_394  # the text, not its gzip file
_TEXT_BYTES = {"tiny-text": TINY_TEXT_BYTES, "tiny-shakespeare": TINY_SHAKESPEARE_BYTES}
# the optimizer state tensors the node saves, per training.optimizer; "step" is a scalar
_OPTIMIZER_STATE = {"adam": {"step", "exp_avg", "exp_avg_sq"}, "adamw": {"step", "exp_avg", "exp_avg_sq"},
                    "sgd": {"momentum_buffer"}}


def spec_fingerprint(spec: dict[str, Any]) -> str:
    """A digest of everything in the spec that shapes the computation (model, data, hyperparameters)."""
    numeric = {key: value for key, value in spec["training"].items() if key not in _NOT_NUMERIC}
    text = json.dumps([spec["model"], spec["dataset"], numeric], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``start`` and ``end`` are byte offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: tensors, ``__metadata__``, and where the data section starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # 8 + the header's length

    @property
    def data_size(self) -> int:
        """The data section's size the offsets imply (they are contiguous from 0)."""
        return max((info.end for info in self.tensors.values()), default=0)


def parse_header(data: bytes, name: str = "artifact") -> Header:
    """Parse and check the header of a whole safetensors file held in memory, and the file's size."""
    if len(data) < 8:
        raise _not_safetensors(name, len(data))
    length = _header_length(data[:8], name)
    if data[8:9] not in (b"", b"{"):
        raise _not_a_json_object(name)
    if 8 + length > len(data):
        raise InvalidArtifact(f"{name} is truncated: its header is {length} bytes but only {len(data) - 8} "
                              "follow the length")
    header = _decode_header(data[8:8 + length], name)
    _check_size(header, len(data), name)
    return header


@dataclass(frozen=True)
class ArtifactDigest:
    """A checked header and the sha256 of each tensor's raw bytes (name -> hex)."""

    header: Header
    tensor_sha256: dict[str, str]

    def state_digest(self, prefix: str) -> str:
        """The digest of the tensors under ``prefix``, as the module docstring defines it."""
        digest = hashlib.sha256()
        for stripped, full in sorted((key[len(prefix):], key) for key in self.tensor_sha256 if key.startswith(prefix)):
            info = self.header.tensors[full]
            shape = ",".join(str(size) for size in info.shape)
            digest.update(f"{stripped}\0{info.dtype}\0{shape}\0{self.tensor_sha256[full]}\n".encode())
        return digest.hexdigest()

    @property
    def weights(self) -> str:
        """The model weights' digest: a checkpoint's "model/" part, or every tensor of a model.safetensors."""
        is_checkpoint = any(key.startswith("model/") for key in self.tensor_sha256)
        return self.state_digest("model/" if is_checkpoint else "")

    @property
    def optimizer(self) -> str:
        """The optimizer state's digest (that of nothing, sha256 of b"", where there is none)."""
        return self.state_digest("optimizer/")


class StreamingDigest:
    """Check and digest a safetensors file fed in chunks of any size, holding at most its header.

    ``feed`` raises ``InvalidArtifact`` as soon as the bytes so far prove the file bad (an absurd header
    length at byte 8, a bad header once it is complete, a byte past the end); ``finish`` raises it for a
    file that ends early.
    """

    def __init__(self, artifact_name: str) -> None:
        self.name = artifact_name
        self._prefix = bytearray()  # the length and the header, until the header is complete
        self._length: int | None = None
        self._header: Header | None = None
        self._ranges: list[tuple[str, TensorInfo]] = []  # by offset: the order the bytes arrive in
        self._index = 0  # the tensor whose bytes come next
        self._position = 0  # bytes of the data section received
        self._data_size = 0  # the header's, once known (computed once: feed may see many small chunks)
        self._hasher = hashlib.sha256()
        self._digests: dict[str, str] = {}

    @property
    def header(self) -> Header | None:
        """The checked header once it has arrived, else None."""
        return self._header

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the file."""
        view = memoryview(chunk)
        while self._header is None and view:
            wanted = 8 if self._length is None else 8 + self._length
            taken, view = view[:wanted - len(self._prefix)], view[wanted - len(self._prefix):]
            self._prefix += taken
            if self._length is None and len(self._prefix) == 8:
                self._length = _header_length(bytes(self._prefix), self.name)
            elif len(self._prefix) > 8 and self._prefix[8:9] != b"{":
                raise _not_a_json_object(self.name)
            if self._length is not None and len(self._prefix) == 8 + self._length:
                self._start_data(_decode_header(bytes(self._prefix[8:]), self.name))
        if view:
            self._feed_data(view)

    def finish(self) -> ArtifactDigest:
        """The digest of the whole file; raises ``InvalidArtifact`` if it ended early."""
        if self._header is None:
            if self._length is None:
                raise _not_safetensors(self.name, len(self._prefix))
            raise InvalidArtifact(f"{self.name} is truncated: its header is {self._length} bytes but only "
                                  f"{len(self._prefix) - 8} follow the length")
        _check_size(self._header, self._header.data_start + self._position, self.name)
        self._close_finished()
        return ArtifactDigest(self._header, {key: self._digests[key] for key in self._header.tensors})

    def _start_data(self, header: Header) -> None:
        self._header, self._prefix, self._data_size = header, bytearray(), header.data_size
        self._ranges = sorted(header.tensors.items(), key=lambda item: (item[1].start, item[1].end))

    def _feed_data(self, view: memoryview) -> None:
        assert self._header is not None
        if self._position + len(view) > self._data_size:
            expected = self._header.data_start + self._data_size
            raise InvalidArtifact(f"{self.name} has bytes after its last tensor: its header describes "
                                  f"{expected} bytes, and more arrived")
        while view:
            self._close_finished()
            wanted = self._ranges[self._index][1].end - self._position
            self._hasher.update(view[:wanted])
            moved = min(wanted, len(view))
            self._position, view = self._position + moved, view[moved:]
        self._close_finished()

    def _close_finished(self) -> None:
        while self._index < len(self._ranges) and self._ranges[self._index][1].end <= self._position:
            self._digests[self._ranges[self._index][0]] = self._hasher.hexdigest()
            self._hasher, self._index = hashlib.sha256(), self._index + 1


def digest_bytes(data: bytes, name: str = "artifact") -> ArtifactDigest:
    """Check and digest a whole safetensors file held in memory (a :class:`StreamingDigest` fed once)."""
    stream = StreamingDigest(name)
    stream.feed(data)
    return stream.finish()


def _bytes(count: int) -> str:
    return f"{count} byte" if count == 1 else f"{count} bytes"


def _not_safetensors(name: str, size: int) -> InvalidArtifact:
    return InvalidArtifact(f"{name} is not a safetensors file: {_bytes(size)}, a safetensors file starts with "
                           "an 8-byte header length")


def _not_a_json_object(name: str) -> InvalidArtifact:
    return InvalidArtifact(f"{name} is not a safetensors file: its header does not start with '{{', so it is "
                           "not a JSON object")


def _header_length(first8: bytes, name: str) -> int:
    (length,) = struct.unpack("<Q", first8)
    if length > MAX_HEADER_BYTES:
        raise InvalidArtifact(f"{name} is not a safetensors file: its first 8 bytes give a header length of "
                              f"{length} bytes, over the {MAX_HEADER_BYTES >> 20} MiB limit")
    if length < 2:
        raise InvalidArtifact(f"{name} is not a safetensors file: its header length is {length} bytes, too "
                              "short for a JSON object")
    return int(length)


def _check_size(header: Header, size: int, name: str) -> None:
    expected = header.data_start + header.data_size
    if size < expected:
        raise InvalidArtifact(f"{name} is truncated: {_bytes(size)}, its header describes {expected}")
    if size > expected:
        raise InvalidArtifact(f"{name} has {_bytes(size - expected)} after its last tensor: {size} in all, its "
                              f"header describes {expected}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _decode_header(raw: bytes, name: str) -> Header:
    if raw[:1] != b"{":
        raise _not_a_json_object(name)
    try:
        entries = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError and duplicate keys are ValueErrors
        raise InvalidArtifact(f"{name} has a header that is not valid JSON: {error}") from None
    if not isinstance(entries, dict):
        raise _not_a_json_object(name)
    metadata = entries.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise InvalidArtifact(f"{name} has __metadata__ that is not an object of strings")
    tensors = {key: _tensor_info(key, entry, name) for key, entry in entries.items()}
    end = 0
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != end:
            problem = "overlaps the tensor before it" if info.start < end else "leaves a gap after the tensor before it"
            raise InvalidArtifact(f"{name}: tensor {key!r} starts at byte {info.start} of the data, which "
                                  f"{problem} (that one ends at {end})")
        end = info.end
    return Header(tensors, dict(metadata), 8 + len(raw))


def _tensor_info(key: str, entry: object, name: str) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidArtifact(f"{name}: header entry {key!r} must be an object of dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise InvalidArtifact(f"{name}: tensor {key!r} has dtype {dtype!r}, not one of {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(_is_count(size, 0) for size in shape):
        raise InvalidArtifact(f"{name}: tensor {key!r} has shape {shape!r}, not a list of integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(offset, 0) for offset in offsets):
        raise InvalidArtifact(f"{name}: tensor {key!r} has data_offsets {offsets!r}, not [start, end] in bytes")
    start, end = offsets
    size = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - start != size:
        raise InvalidArtifact(f"{name}: tensor {key!r} ({dtype}, shape {tuple(shape)}) needs {size} bytes but "
                              f"its data_offsets [{start}, {end}] span {end - start}")
    return TensorInfo(dtype, tuple(shape), start, end)


def _is_count(value: object, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_weights(header: Header, spec: dict[str, Any]) -> None:
    """Check a ``model.safetensors`` header: made by the node for this spec, holding exactly its model."""
    name, metadata = "model.safetensors", header.metadata
    if metadata.get("cyxwiz_format") != WEIGHTS_FORMAT:
        raise InvalidArtifact(f"{name} is not CyxWiz model weights: its metadata cyxwiz_format is "
                              f"{metadata.get('cyxwiz_format')!r}, not {WEIGHTS_FORMAT!r}")
    saved = _json_metadata(metadata, "spec", name)
    if json.dumps(saved, sort_keys=True) != json.dumps(spec, sort_keys=True):
        raise InvalidArtifact(f"{name} was made for another spec: its {_first_difference(saved, spec)} differs "
                              "from this job's")
    info = _data_info(metadata, spec, name, required=True)
    _check_model_tensors(header.tensors, _state_shapes(spec, info, name), "", name)


def check_checkpoint(header: Header, spec: dict[str, Any]) -> dict[str, Any]:
    """Check a ``checkpoint.safetensors`` header against the job; return its position and provenance.

    The result has ``epoch``, ``batch``, ``step`` (ints), ``threads`` (int or None) and ``device_kind``,
    ``torch``, ``data`` (the data digest), each a string, "" where the node did not say.
    """
    name, metadata = "checkpoint.safetensors", header.metadata
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise InvalidArtifact(f"{name} is not a CyxWiz training checkpoint: its metadata format is "
                              f"{metadata.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
    if metadata.get("fingerprint") != spec_fingerprint(spec):
        raise InvalidArtifact(f"{name} was made for a different model, dataset or training settings (its "
                              "fingerprint is not this job's)")
    position = _position(metadata, spec, name)
    for field in ("optimizer_scalars", "metrics"):  # the node needs both to resume
        if not isinstance(_json_metadata(metadata, field, name), dict):
            raise InvalidArtifact(f"{name} has metadata {field} that is not a JSON object")
    info = _data_info(metadata, spec, name, required=False)
    tensors = header.tensors
    _check_model_tensors(tensors, _state_shapes(spec, info, name), "model/", name)
    _check_optimizer_tensors(tensors, expected_parameter_shapes(spec, info), spec["training"]["optimizer"], name)
    for key, required in (("rng/cpu", True), ("rng/cuda", False)):
        if key not in tensors and required:
            raise InvalidArtifact(f"{name} lacks tensor {key!r}, the random generator's state")
        if key in tensors and (tensors[key].dtype != "U8" or len(tensors[key].shape) != 1):
            raise InvalidArtifact(f"{name}: tensor {key!r} must be a U8 vector (a generator state)")
    unexpected = sorted(key for key in tensors if not key.startswith(("model/", "optimizer/", "rng/"))
                        or key.startswith("rng/") and key not in ("rng/cpu", "rng/cuda"))
    if unexpected:
        raise InvalidArtifact(f"{name} has tensor {unexpected[0]!r}, which is no part of a training checkpoint")
    threads = metadata.get("threads", "")
    if threads and not (threads.isascii() and threads.isdigit() and int(threads) >= 1):
        raise InvalidArtifact(f"{name} has metadata threads {threads!r}, not a positive integer")
    return {**position, "threads": int(threads) if threads else None,
            **{field: metadata.get(field, "") for field in ("device_kind", "torch", "data")}}


def batches_per_epoch(spec: dict[str, Any]) -> int | None:
    """Training batches in one epoch of a shipped dataset (as node_runtime/training/datasets.py splits and
    batches it), or None for user data, whose size is known only to the node."""
    dataset, batch_size = spec["dataset"], int(spec["training"]["batch_size"])
    if "url" in dataset:
        return None
    # jobs stored before the test split existed have no test_fraction: they hold out no test data
    val_fraction, test_fraction = float(dataset["val_fraction"]), float(dataset.get("test_fraction", 0.0))
    if dataset["name"] in _TEXT_BYTES:  # the tail is held out; windows of context + 1 bytes, one offset spare
        size, context = _TEXT_BYTES[dataset["name"]], int(spec["model"].get("context", 64))
        val, test = held_out_bytes(size, val_fraction, test_fraction)
        return math.ceil(windows_per_epoch(size - val - test, context) / batch_size)
    count = DIGITS_SAMPLES if dataset["name"] == "digits" else int(dataset["n_samples"])
    val, test = held_out_samples(count, val_fraction, test_fraction)
    return math.ceil(max(0, count - val - test) / batch_size)


def total_steps(spec: dict[str, Any], per_epoch: int | None) -> int | None:
    """The optimizer steps a job trains: epochs x batches per epoch, capped by ``training.max_steps``
    (None when neither bound is known here: user data with no max_steps)."""
    training = spec["training"]
    bounds = [training.get("max_steps")]
    if training["epochs"] is not None and per_epoch is not None:
        bounds.append(training["epochs"] * per_epoch)
    known = [int(bound) for bound in bounds if bound is not None]
    return min(known) if known else None


def _json_metadata(metadata: dict[str, str], field: str, name: str) -> Any:
    if field not in metadata:
        raise InvalidArtifact(f"{name} lacks metadata {field}")
    try:
        return json.loads(metadata[field])
    except ValueError:
        raise InvalidArtifact(f"{name} has metadata {field} that is not valid JSON") from None


def _first_difference(saved: Any, wanted: Any, path: str = "spec") -> str:
    """The dotted path of the first place two JSON values differ (for a message that says where)."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for key in sorted(set(saved) | set(wanted), key=str):
            if key not in saved or key not in wanted or saved[key] != wanted[key]:
                return _first_difference(saved.get(key), wanted.get(key), f"{path}.{key}")
    if isinstance(saved, list) and isinstance(wanted, list) and len(saved) == len(wanted):
        for index, (left, right) in enumerate(zip(saved, wanted, strict=True)):
            if left != right:
                return _first_difference(left, right, f"{path}.{index}")
    return path


def _data_info(metadata: dict[str, str], spec: dict[str, Any], name: str, *, required: bool) -> dict[str, Any]:
    """The data shapes to check against: the shipped dataset's own, or the node's record of user data."""
    known = known_data_info(spec["dataset"])
    if known is not None and "data_info" not in metadata and not required:
        return known
    info = _json_metadata(metadata, "data_info", name)
    if known is not None:
        if info != known:
            raise InvalidArtifact(f"{name} has data_info {json.dumps(info, sort_keys=True)}, but dataset "
                                  f"{spec['dataset']['name']} has {json.dumps(known, sort_keys=True)}")
        return known
    problem = _user_data_problem(info, spec["dataset"].get("task", "auto"))
    if problem:
        raise InvalidArtifact(f"{name} has implausible data_info: {problem}")
    return dict(info)


def _user_data_problem(info: Any, task: str) -> str:
    """What is wrong with a user dataset's data_info record (as node_runtime's prepare_arrays makes it)."""
    keys = set(data_info("classification"))
    if not isinstance(info, dict) or set(info) != keys:
        return f"it must be an object with exactly the keys {', '.join(sorted(keys))}"
    if info["task"] not in ("classification", "regression") or task not in ("auto", info["task"]):
        return f"task {info['task']!r} is not the job's ({task})"
    image = info["image_shape"]
    if not _is_count(info["num_features"]):
        return "num_features must be a positive integer"
    if image is not None and not (isinstance(image, list) and len(image) == 3 and all(map(_is_count, image))
                                  and math.prod(image) == info["num_features"]):
        return "image_shape must be null or [channels, height, width] holding num_features values"
    counts = ("num_classes", "target_dim") if info["task"] == "classification" else ("target_dim", "num_classes")
    if not _is_count(info[counts[0]]) or info[counts[1]] is not None or info["vocab_size"] is not None:
        return f"a {info['task']} dataset has a positive {counts[0]}, and null {counts[1]} and vocab_size"
    return ""


def _state_shapes(spec: dict[str, Any], info: dict[str, Any], name: str) -> dict[str, tuple[int, ...]]:
    try:
        return expected_state_shapes(spec, info)
    except InvalidField as error:  # only user data can get here: the spec was checked against shipped data
        raise InvalidArtifact(f"{name}: the job's model does not fit its data_info ({error.field}: "
                              f"{error.message})") from None


def _check_model_tensors(tensors: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], prefix: str,
                         name: str) -> None:
    present = {key.removeprefix(prefix) for key in tensors if key.startswith(prefix)}
    missing = [key for key in expected if key not in present]
    if missing:
        raise InvalidArtifact(f"{name} lacks tensor {prefix + missing[0]!r} of the job's model"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise InvalidArtifact(f"{name} has tensor {prefix + unexpected[0]!r}, which the job's model does not have")
    for key, shape in expected.items():
        info = tensors[prefix + key]
        if info.shape != shape:
            raise InvalidArtifact(f"{name}: tensor {prefix + key!r} has shape {info.shape}, but the job's model "
                                  f"has {shape}")
        if info.dtype != "F32":  # the node keeps and saves float32 parameters (autocast leaves them so)
            raise InvalidArtifact(f"{name}: tensor {prefix + key!r} is {info.dtype}, not F32")


def _check_optimizer_tensors(tensors: dict[str, TensorInfo], parameters: list[tuple[int, ...]], optimizer: str,
                             name: str) -> None:
    allowed = _OPTIMIZER_STATE[optimizer]
    for key, info in tensors.items():
        if not key.startswith("optimizer/"):
            continue
        index, _, field = key.removeprefix("optimizer/").partition("/")
        if not (index.isdecimal() and str(int(index)) == index and int(index) < len(parameters)):
            raise InvalidArtifact(f"{name}: tensor {key!r} names no parameter (the model has {len(parameters)})")
        if field not in allowed:
            raise InvalidArtifact(f"{name}: tensor {key!r} is not {optimizer} state (that is "
                                  f"{', '.join(sorted(allowed))})")
        shape = () if field == "step" else parameters[int(index)]
        if info.shape != shape or info.dtype not in (("F32", "F64") if field == "step" else ("F32",)):
            raise InvalidArtifact(f"{name}: tensor {key!r} is {info.dtype} of shape {info.shape}; parameter "
                                  f"{index}'s {field} is F32 of shape {shape}")


def _position(metadata: dict[str, str], spec: dict[str, Any], name: str) -> dict[str, int]:
    position = _json_metadata(metadata, "position", name)
    fields = ("epoch", "batch", "step")
    if not (isinstance(position, dict) and set(position) == set(fields)
            and all(_is_count(position[field], 0) for field in fields)):
        raise InvalidArtifact(f"{name} has metadata position that is not {{epoch, batch, step}} as integers >= 0")
    epochs, per_epoch = spec["training"]["epochs"], batches_per_epoch(spec)
    if epochs is not None and position["epoch"] > epochs:
        raise InvalidArtifact(f"{name} is at epoch {position['epoch']}, but the job trains {epochs} epochs")
    if per_epoch is not None and position["batch"] > per_epoch:
        raise InvalidArtifact(f"{name} is at batch {position['batch']} of an epoch that has {per_epoch} batches")
    total = total_steps(spec, per_epoch)
    if total is not None and position["step"] > total:
        raise InvalidArtifact(f"{name} is at step {position['step']}, but the job trains {total} steps")
    return {field: int(position[field]) for field in fields}


def placeholder_weights(spec: dict[str, Any], info: dict[str, Any] | None = None) -> bytes:
    """A ``model.safetensors`` of the names and shapes a normalized spec builds, every weight zero, made
    in pure Python: what the load tests' simulated nodes upload. It passes :func:`check_weights`; an
    audit's replay would not match it."""
    info = info if info is not None else known_data_info(spec["dataset"])
    if info is None:
        raise ValueError("user data: pass the data info record the node would have written")
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in expected_state_shapes(spec, info).items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "cyxwiz_format": WEIGHTS_FORMAT,
                              "spec": json.dumps(spec, sort_keys=True), "data_info": json.dumps(info, sort_keys=True)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)
