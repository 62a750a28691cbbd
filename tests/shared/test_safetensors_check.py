"""Uploaded artifacts: the pure-Python header check and digests agree with what torch builds and
saves, in any chunking, and every kind of bad file is refused with a message that says what is wrong."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch

from node_runtime.training import build_model
from node_runtime.training.checkpoints import Position, encode_checkpoint, encode_weights, state_digests
from node_runtime.training.datasets import DATA_DIR, load_dataset, read_text
from node_runtime.training.layers import make_optimizer
from shared.errors import InvalidArtifact
from shared.jobspec import data_info, known_data_info, parse_job_spec
from shared.safetensors_check import (
    DIGITS_SAMPLES,
    MAX_HEADER_BYTES,
    TINY_SHAKESPEARE_BYTES,
    TINY_TEXT_BYTES,
    ArtifactDigest,
    StreamingDigest,
    batches_per_epoch,
    check_checkpoint,
    check_weights,
    digest_bytes,
    expected_parameter_shapes,
    expected_state_shapes,
    parse_header,
)

Change = Callable[[dict[str, Any]], None]
IMAGE_STACK = [  # digits as 1x8x8 images through every shaping layer
    {"type": "conv2d", "out_channels": 4, "padding": 1}, {"type": "relu"}, {"type": "maxpool"},
    {"type": "conv2d", "out_channels": 6, "kernel_size": 3}, {"type": "avgpool"}, {"type": "flatten"},
    {"type": "layernorm"}, {"type": "dropout", "p": 0.1}, {"type": "linear", "out": 12, "bias": False},
    {"type": "gelu"}, {"type": "rmsnorm"}, {"type": "linear", "out": 8}, {"type": "sigmoid"},
    {"type": "linear", "out": 10}]
MODELS: dict[str, tuple[dict[str, Any], Any]] = {
    "mlp": ({"type": "mlp", "hidden": [16, 8]}, "digits"),
    "mlp-layernorm": ({"type": "mlp", "hidden": [12], "norm": "layernorm", "dropout": 0.1},
                      {"name": "blobs", "n_features": 5, "n_classes": 4, "n_samples": 101}),
    "mlp-rmsnorm": ({"type": "mlp", "hidden": [8, 8, 4], "norm": "rmsnorm", "activation": "tanh"},
                    {"name": "spirals", "n_classes": 3}),
    "mlp-no-hidden": ({"type": "mlp", "hidden": []}, "digits"),
    "cnn": ({"type": "cnn", "channels": [4, 6], "hidden": [8]}, "digits"),
    "cnn-no-pool": ({"type": "cnn", "channels": [3], "kernel_size": 5, "pool": False, "hidden": []}, "digits"),
    "transformer": ({"type": "transformer", "d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 24,
                     "context": 8}, "tiny-text"),
    "transformer-rmsnorm": ({"type": "transformer", "d_model": 8, "n_heads": 1, "n_layers": 1, "context": 4,
                             "norm": "rmsnorm", "activation": "silu"}, "tiny-text"),
    "sequential-image": ({"type": "sequential", "layers": IMAGE_STACK}, "digits"),
    "sequential-flat": ({"type": "sequential", "layers": [
        {"type": "linear", "out": 8}, {"type": "silu"}, {"type": "layernorm"}, {"type": "linear", "out": 3},
        {"type": "tanh"}]}, {"name": "blobs", "n_classes": 3}),
    "sequential-text": ({"type": "sequential", "context": 8, "layers": [
        {"type": "embedding", "dim": 16}, {"type": "rmsnorm"}, {"type": "linear", "out": 24}, {"type": "relu"},
        {"type": "dropout"}, {"type": "linear", "out": 256}]}, "tiny-text"),
}
MLP = {"type": "mlp", "hidden": [16]}


def make_spec(model: dict[str, Any], dataset: Any = "digits", **training: Any) -> dict[str, Any]:
    return parse_job_spec({"model": model, "dataset": dataset, "training": {"epochs": 3, **training}})


def trained(spec: dict[str, Any], info: dict[str, Any] | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and its optimizer after one step, so the optimizer has state to save."""
    info = info or known_data_info(spec["dataset"])
    assert info is not None
    model = build_model(spec, info)
    optimizer = make_optimizer(model, spec, use_kernels=False)
    inputs = torch.zeros(2, info["num_features"] or spec["model"]["context"], dtype=torch.long
                         if info["task"] == "lm" else torch.float32)
    model(inputs).float().pow(2).mean().backward()
    optimizer.step()
    return model, optimizer


def checkpoint_of(spec: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  position: Position | None = None, **provenance: Any) -> bytes:
    return encode_checkpoint(spec, model, optimizer, position or Position(1, 2, 30), {"val": {}},
                             torch.device("cpu"), **provenance)


def rewrite(data: bytes, change: Change, extra: bytes = b"") -> bytes:
    """The same file with its header JSON changed by ``change`` (and ``extra`` bytes of data appended)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    change(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length:] + extra


def crafted(entries: dict[str, Any], data_size: int) -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data_size)


def fed(data: bytes, sizes: Callable[[], int]) -> ArtifactDigest:
    stream, offset = StreamingDigest("model.safetensors"), 0
    while offset < len(data):
        size = sizes()
        stream.feed(data[offset:offset + size])
        offset += size
    return stream.finish()


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return make_spec(MLP, optimizer="adamw")


@pytest.fixture(scope="module")
def artifacts(spec: dict[str, Any]) -> dict[str, bytes]:
    model, optimizer = trained(spec)
    info = known_data_info(spec["dataset"])
    assert info is not None
    return {"weights": encode_weights(spec, info, model), "checkpoint": checkpoint_of(spec, model, optimizer)}


@pytest.mark.parametrize("use_kernels", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("case", MODELS)
def test_expected_shapes_are_those_of_the_built_model(case: str, use_kernels: bool) -> None:
    if use_kernels:
        pytest.importorskip("triton", reason="Triton is not installed, so the kernel modules cannot be built")
    model_spec, dataset = MODELS[case]
    spec = make_spec(model_spec, dataset)
    info = known_data_info(spec["dataset"])
    assert info is not None
    model = build_model(spec, info, use_kernels=use_kernels)
    state = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert list(expected_state_shapes(spec, info).items()) == list(state.items())  # names, shapes and order
    # the optimizer's order (its state index i is parameter i): decayed weight matrices first, then the rest
    optimizer = make_optimizer(model, spec, use_kernels=use_kernels)
    ordered = [tuple(p.shape) for group in optimizer.param_groups for p in group["params"]]
    assert expected_parameter_shapes(spec, info) == ordered
    assert [group["weight_decay"] for group in optimizer.param_groups] == [spec["training"]["weight_decay"], 0.0]
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, parameter in model.named_parameters():  # matrices decay; biases, norm gains and embeddings do not
        embedding = any(isinstance(module, torch.nn.Embedding) and module.weight is parameter
                        for module in model.modules())
        assert (id(parameter) in decayed) == (parameter.ndim >= 2 and not embedding), name
    everything = make_optimizer(model, {**spec, "training": {**spec["training"], "weight_decay_on": "all"}},
                                use_kernels=use_kernels)
    assert [len(group["params"]) for group in everything.param_groups] == [len(list(model.parameters()))]


@pytest.mark.parametrize("model_spec", [MLP, {"type": "cnn", "channels": [4], "pool": False, "hidden": [6]},
                                        {"type": "sequential", "layers": [{"type": "conv2d", "out_channels": 2},
                                                                          {"type": "flatten"},
                                                                          {"type": "linear", "out": 2}]}])
def test_expected_shapes_follow_a_user_datasets_record(model_spec: dict[str, Any]) -> None:
    spec = make_spec(model_spec, {"url": "data/points.npz"})
    info = data_info("regression", num_features=48, image_shape=[3, 4, 4], target_dim=2)
    model = build_model(spec, info)
    assert expected_state_shapes(spec, info) == {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize(("dataset", "model_spec", "training"), [
    ("digits", MLP, {"batch_size": 64}),
    ({"name": "digits", "val_fraction": 0.0}, MLP, {"batch_size": 7}),
    ({"name": "blobs", "n_samples": 101, "val_fraction": 0.33}, MLP, {"batch_size": 10}),
    ({"name": "spirals", "n_samples": 250, "val_fraction": 0.5}, MLP, {"batch_size": 16}),
    ("tiny-text", MODELS["transformer"][0], {"batch_size": 16}),
    ({"name": "tiny-text", "val_fraction": 0.1}, MODELS["sequential-text"][0], {"batch_size": 5}),
])
def test_batches_per_epoch_are_those_the_node_trains(dataset: Any, model_spec: dict[str, Any],
                                                     training: dict[str, Any]) -> None:
    spec = make_spec(model_spec, dataset, **training)
    assert batches_per_epoch(spec) == load_dataset(spec).batches_per_epoch(training["batch_size"])


def test_the_shipped_dataset_sizes_are_those_of_the_files() -> None:
    with gzip.open(DATA_DIR / "digits.csv.gz", "rt") as handle:
        assert DIGITS_SAMPLES == sum(1 for line in handle if line.strip())
    assert TINY_TEXT_BYTES == len(read_text("tiny-text"))
    assert TINY_SHAKESPEARE_BYTES == len(read_text("tiny-shakespeare"))


SPLIT_DATASETS = ["digits", {"name": "blobs", "n_samples": 101}, {"name": "spirals", "n_samples": 20},
                  "tiny-text", "tiny-shakespeare"]
HELD_OUT = [(0.0, 0.0), (0.2, 0.0), (0.1, 0.05), (0.0, 0.3), (0.4, 0.5)]  # (val_fraction, test_fraction)


@pytest.mark.parametrize(("val_fraction", "test_fraction"), HELD_OUT)
@pytest.mark.parametrize("dataset", SPLIT_DATASETS, ids=["digits", "blobs", "spirals", "tiny-text", "tiny-shakespeare"])
def test_batches_per_epoch_follow_every_split(dataset: Any, val_fraction: float, test_fraction: float) -> None:
    """The pure-Python count against the node's split, over held-out fractions, batch sizes and contexts."""
    named = {"name": dataset} if isinstance(dataset, str) else dataset
    held_out = {**named, "val_fraction": val_fraction, "test_fraction": test_fraction, "split_seed": 5}
    text = named["name"] in ("tiny-text", "tiny-shakespeare")
    for context in (2, 64, 100) if text else (None,):
        model = {"type": "transformer", "d_model": 8, "n_heads": 1, "n_layers": 1, "context": context} if text else MLP
        spec = make_spec(model, held_out)
        data = load_dataset(spec)
        for batch_size in (1, 7, 12, 64, 5000):
            at_size = {**spec, "training": {**spec["training"], "batch_size": batch_size}}
            assert batches_per_epoch(at_size) == data.batches_per_epoch(batch_size), (context, batch_size)


def test_batches_per_epoch_of_a_spec_stored_before_the_test_split() -> None:
    spec = make_spec(MLP, {"name": "blobs", "n_samples": 101})
    stored = {**spec, "dataset": {key: value for key, value in spec["dataset"].items()
                                  if key not in ("test_fraction", "split_seed")}}
    assert batches_per_epoch(stored) == batches_per_epoch(spec) == math.ceil(81 / 64)


def test_real_artifacts_pass_and_say_where_they_stand(spec: dict[str, Any], artifacts: dict[str, bytes]) -> None:
    check_weights(parse_header(artifacts["weights"]), spec)
    assert check_checkpoint(parse_header(artifacts["checkpoint"]), spec) == {
        "epoch": 1, "batch": 2, "step": 30, "threads": None, "device_kind": "", "torch": torch.__version__,
        "data": ""}
    model, optimizer = trained(spec)
    stamped = checkpoint_of(spec, model, optimizer, threads=4, device_kind="cuda", data_digest="ab12")
    found = check_checkpoint(parse_header(stamped), spec)
    assert (found["threads"], found["device_kind"], found["data"]) == (4, "cuda", "ab12")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_checkpoints_of_every_optimizer_and_of_user_data_pass(optimizer: str) -> None:
    spec = make_spec(MODELS["cnn-no-pool"][0], {"url": "images.npz"}, optimizer=optimizer)
    info = data_info("classification", num_features=192, image_shape=[3, 8, 8], num_classes=5)
    model, optim = trained(spec, info)
    data = checkpoint_of(spec, model, optim, data_info=info)
    assert check_checkpoint(parse_header(data), spec)["step"] == 30
    check_weights(parse_header(encode_weights(spec, info, model)), spec)
    with pytest.raises(InvalidArtifact, match="lacks metadata data_info"):
        check_checkpoint(parse_header(checkpoint_of(spec, model, optim)), spec)


@pytest.mark.parametrize("kind", ["weights", "checkpoint"])
def test_streaming_in_any_chunks_gives_the_whole_file_digest(artifacts: dict[str, bytes], kind: str) -> None:
    data = artifacts[kind]
    whole = digest_bytes(data)
    draw = random.Random(0)
    for sizes in (lambda: 1, lambda: 7, lambda: 65536, lambda: draw.randint(1, 5000)):
        assert fed(data, sizes) == whole
    tensors = safetensors.torch.load(data)
    assert whole.tensor_sha256 == {name: hashlib.sha256(t.numpy().tobytes()).hexdigest()
                                   for name, t in tensors.items()}


def test_state_digest_follows_its_documented_definition(artifacts: dict[str, bytes]) -> None:
    tensors = safetensors.torch.load(artifacts["checkpoint"])
    lines = [f"{name.removeprefix('optimizer/')}\0F32\0{','.join(map(str, t.shape))}\0"
             f"{hashlib.sha256(t.numpy().tobytes()).hexdigest()}\n"
             for name, t in sorted(tensors.items()) if name.startswith("optimizer/")]
    assert digest_bytes(artifacts["checkpoint"]).optimizer == hashlib.sha256("".join(lines).encode()).hexdigest()
    assert digest_bytes(artifacts["weights"]).optimizer == hashlib.sha256(b"").hexdigest()


def test_a_checkpoint_and_the_weights_of_one_state_share_the_weights_digest(spec: dict[str, Any],
                                                                              artifacts: dict[str, bytes]) -> None:
    weights, checkpoint = digest_bytes(artifacts["weights"]), digest_bytes(artifacts["checkpoint"])
    assert weights.weights == checkpoint.weights
    assert state_digests(artifacts["checkpoint"]) == {"weights": checkpoint.weights,
                                                      "optimizer": checkpoint.optimizer}
    model, optimizer = trained(spec)
    with torch.no_grad():
        model.state_dict()["head.bias"][0] += 1e-6
    changed = digest_bytes(checkpoint_of(spec, model, optimizer))
    assert changed.weights != checkpoint.weights and changed.optimizer == checkpoint.optimizer


def _refused_while_streaming(data: bytes, match: str, *, by_feed: bool) -> None:
    stream = StreamingDigest("model.safetensors")
    with pytest.raises(InvalidArtifact, match=match):
        stream.feed(data)
        assert not by_feed, "feed should have refused the bytes already"
        stream.finish()


def _tensor_pair(second: list[int]) -> bytes:
    return crafted({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": second}}, 20)


@pytest.mark.parametrize(("make", "match", "by_feed"), [
    (lambda good: b"\x00", "not a safetensors file: 1 byte, a safetensors file starts with an 8-byte header", False),
    (lambda good: b"\xff" * 8, "header length of 18446744073709551615 bytes, over the 16 MiB limit", True),
    (lambda good: struct.pack("<Q", MAX_HEADER_BYTES + 1), "over the 16 MiB limit", True),
    (lambda good: struct.pack("<Q", 40) + b"PK\x03\x04", r"does not start with '\{'", True),
    (lambda good: struct.pack("<Q", 10) + b"{not json}", "header that is not valid JSON", True),
    (lambda good: crafted({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a ": None}, 8),
     "entry 'a ' must be an object of dtype, shape and data_offsets", True),
    (lambda good: _tensor_pair([4, 12]), "'b' starts at byte 4 of the data, which overlaps the tensor before it", True),
    (lambda good: _tensor_pair([12, 20]), "'b' starts at byte 12 of the data, which leaves a gap", True),
    (lambda good: crafted({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8),
     r"'a' \(F32, shape \(3,\)\) needs 12 bytes but its data_offsets \[0, 8\] span 8", True),
    (lambda good: crafted({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, 8), "dtype 'F31'", True),
    (lambda good: crafted({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8), "shape", True),
    (lambda good: crafted({"__metadata__": {"n": 1}}, 0), "__metadata__ that is not an object of strings", True),
    (lambda good: good[:-1], "is truncated", False),
    (lambda good: good[:100], r"is truncated: its header is \d+ bytes but only 92 follow", False),
    (lambda good: good + b"\x00", "after its last tensor", True),
])
def test_malformed_files_are_refused_saying_why(artifacts: dict[str, bytes], make: Callable[[bytes], bytes],
                                                match: str, by_feed: bool) -> None:
    data = make(artifacts["weights"])
    with pytest.raises(InvalidArtifact, match=match) as refused:
        parse_header(data, "model.safetensors")
    assert refused.value.status == 422 and refused.value.code == "invalid_artifact"
    assert str(refused.value).startswith("model.safetensors")
    _refused_while_streaming(data, match, by_feed=by_feed)


def test_an_absurd_header_length_is_refused_at_the_eighth_byte() -> None:
    stream = StreamingDigest("model.safetensors")
    stream.feed(b"\xff" * 7)
    with pytest.raises(InvalidArtifact, match="header length"):
        stream.feed(b"\xff")


def _drop_tensor(name: str) -> Change:
    return lambda header: header.update({f"{name}x": header.pop(name)})


def _set_metadata(key: str, value: str) -> Change:
    return lambda header: header["__metadata__"].update({key: value})


def _extra_tensor(name: str, end: int) -> Change:
    return lambda header: header.update({name: {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}})


def _transpose(name: str) -> Change:
    return lambda header: header[name].update(shape=header[name]["shape"][::-1])


@pytest.mark.parametrize(("change", "extra", "match"), [
    (_drop_tensor("head.bias"), b"", "lacks tensor 'head.bias' of the job's model"),
    (_extra_tensor("head.scale", 4 * (16 * 64 + 16 + 10 * 16 + 10)), b"\0" * 4,
     "has tensor 'head.scale', which the job's model does not have"),
    (_transpose("head.weight"), b"", r"'head.weight' has shape \(16, 10\), but the job's model has \(10, 16\)"),
    (_set_metadata("cyxwiz_format", "cyxwiz-weights/0"), b"", "not CyxWiz model weights: its metadata cyxwiz_format"),
    (lambda header: header["__metadata__"].pop("spec"), b"", "lacks metadata spec"),
    (_set_metadata("data_info", json.dumps(data_info("classification", num_features=64, num_classes=10))), b"",
     "has data_info .* but dataset digits has"),
    (_set_metadata("data_info", "{"), b"", "data_info that is not valid JSON"),
])
def test_weights_that_are_not_the_jobs_model_are_refused(spec: dict[str, Any], artifacts: dict[str, bytes],
                                                         change: Change, extra: bytes, match: str) -> None:
    header = parse_header(rewrite(artifacts["weights"], change, extra))
    with pytest.raises(InvalidArtifact, match=match):
        check_weights(header, spec)


def test_weights_for_another_spec_say_which_field_differs(artifacts: dict[str, bytes]) -> None:
    other = make_spec(MLP, learning_rate=0.01)
    with pytest.raises(InvalidArtifact, match="made for another spec: its spec.training.learning_rate differs"):
        check_weights(parse_header(artifacts["weights"]), other)


@pytest.mark.parametrize(("info", "match"), [
    (data_info("lm", vocab_size=256), "task 'lm' is not the job's"),
    (data_info("regression", num_features=48, image_shape=[3, 4, 4], target_dim=2), "task 'regression'"),
    (data_info("classification", num_features=48, image_shape=[3, 4, 5], num_classes=2), "image_shape"),
    (data_info("classification", num_features=48, num_classes=None), "positive num_classes"),
    ({"task": "classification", "num_features": 48}, "exactly the keys"),
    (data_info("classification", num_features=48, num_classes=3), "model does not fit its data_info"),
])
def test_implausible_user_data_records_are_refused(info: dict[str, Any], match: str) -> None:
    spec = make_spec({"type": "cnn", "channels": [2], "hidden": []}, {"url": "x.npz", "task": "classification"})
    model = build_model(spec, data_info("classification", num_features=48, image_shape=[3, 4, 4], num_classes=3))
    header = parse_header(encode_weights(spec, info, model))
    with pytest.raises(InvalidArtifact, match=match):
        check_weights(header, spec)


def test_a_checkpoint_of_another_spec_or_of_weights_is_refused(spec: dict[str, Any],
                                                               artifacts: dict[str, bytes]) -> None:
    with pytest.raises(InvalidArtifact, match="made for a different model, dataset or training settings"):
        check_checkpoint(parse_header(artifacts["checkpoint"]), make_spec(MLP, seed=7))
    with pytest.raises(InvalidArtifact, match="not a CyxWiz training checkpoint: its metadata format is 'pt'"):
        check_checkpoint(parse_header(artifacts["weights"]), spec)


def test_a_checkpoint_of_a_different_hidden_size_is_refused_by_shape(spec: dict[str, Any]) -> None:
    model, optimizer = trained(make_spec({"type": "mlp", "hidden": [17]}))
    forged = checkpoint_of(spec, model, optimizer)  # the real encoder, this job's fingerprint, another model
    with pytest.raises(InvalidArtifact, match=r"'model/blocks.0.linear.weight' has shape \(17, 64\), but the "
                                              r"job's model has \(16, 64\)"):
        check_checkpoint(parse_header(forged), spec)


@pytest.mark.parametrize(("position", "match"), [
    (Position(3, 0, 69), ""),  # digits: 1438 training samples in batches of 64 make 23 batches an epoch
    (Position(2, 23, 69), ""),
    (Position(4, 0, 0), "at epoch 4, but the job trains 3 epochs"),
    (Position(1, 24, 30), "at batch 24 of an epoch that has 23 batches"),
    (Position(2, 22, 70), "at step 70, but the job trains 69 steps"),
    (Position(-1, 0, 0), "position that is not"),
])
def test_a_checkpoint_position_outside_the_job_is_refused(spec: dict[str, Any], position: Position,
                                                          match: str) -> None:
    model, optimizer = trained(spec)
    header = parse_header(checkpoint_of(spec, model, optimizer, position))
    if not match:
        assert check_checkpoint(header, spec)["step"] == position.step
        return
    with pytest.raises(InvalidArtifact, match=match):
        check_checkpoint(header, spec)


def _rename(old: str, new: str) -> Change:
    return lambda header: header.update({new: header.pop(old)})


def _swap(first: str, second: str) -> Change:
    return lambda header: header.update({first: header[second], second: header[first]})


@pytest.mark.parametrize(("change", "match"), [
    (_rename("optimizer/0/exp_avg", "optimizer/9/exp_avg"), "'optimizer/9/exp_avg' names no parameter"),
    (_rename("optimizer/0/exp_avg", "optimizer/0/momentum"), "is not adamw state"),
    (_swap("optimizer/0/exp_avg", "optimizer/3/exp_avg"), r"; parameter [03]'s exp_avg is F32 of shape"),
    (_rename("rng/cpu", "rng/other"), "lacks tensor 'rng/cpu'"),
    (lambda header: header["rng/cpu"].update(dtype="I8"), "'rng/cpu' must be a U8 vector"),
    (_rename("model/head.bias", "head.bias"), "lacks tensor 'model/head.bias'"),
    (_set_metadata("threads", "two"), "threads 'two', not a positive integer"),
    (_set_metadata("metrics", "[]"), "metrics that is not a JSON object"),
])
def test_checkpoint_tensors_outside_the_training_state_are_refused(spec: dict[str, Any], artifacts: dict[str, bytes],
                                                                   change: Change, match: str) -> None:
    header = parse_header(rewrite(artifacts["checkpoint"], change))
    with pytest.raises(InvalidArtifact, match=match):
        check_checkpoint(header, spec)


def test_an_unknown_top_level_tensor_is_refused(spec: dict[str, Any], artifacts: dict[str, bytes]) -> None:
    end = parse_header(artifacts["checkpoint"]).data_size
    header = parse_header(rewrite(artifacts["checkpoint"], _extra_tensor("extra/x", end), b"\0" * 4))
    with pytest.raises(InvalidArtifact, match="'extra/x', which is no part of a training checkpoint"):
        check_checkpoint(header, spec)
