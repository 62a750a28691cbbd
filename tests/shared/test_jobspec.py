"""The job spec: the contract's example normalizes, defaults fill in, and every kind of bad input
names its field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from shared.errors import InvalidField, MalformedBody
from shared.jobspec import known_data_info, parse_job_spec
from shared.model_shapes import MAX_PARAMETERS, check_model_fits, sequential_shapes

API_EXAMPLE: dict[str, Any] = {
    "name": "digits-mlp",
    "model": {"type": "mlp", "hidden": [128, 64], "activation": "gelu", "norm": "layernorm", "dropout": 0.0},
    "dataset": {"name": "digits", "val_fraction": 0.2},
    "training": {"epochs": 10, "batch_size": 64, "optimizer": "adamw", "learning_rate": 0.001,
                 "weight_decay": 0.01, "seed": 0},
    "requirements": {"gpu": False, "min_gpu_memory_mb": 0, "min_ram_mb": 0, "labels": {}},
    "priority": "normal", "max_attempts": 3,
}
MINIMAL: dict[str, Any] = {"model": {"type": "mlp"}, "dataset": {"name": "digits"}, "training": {"epochs": 3}}
SPLIT = {"val_fraction": 0.2, "test_fraction": 0.0, "split_seed": 0}  # a dataset's default held-out splits


def with_change(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    body = copy.deepcopy(base)
    *parents, last = path.split(".")
    target = body
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
    if value is ...:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return body


def test_api_example_normalizes_to_itself_plus_defaults() -> None:
    spec = parse_job_spec(API_EXAMPLE)
    assert spec["model"] == API_EXAMPLE["model"]
    assert spec["requirements"] == {**API_EXAMPLE["requirements"], "nodes": 1}
    assert spec["dataset"] == {**API_EXAMPLE["dataset"], "test_fraction": 0.0, "split_seed": 0}
    assert spec["training"].items() >= API_EXAMPLE["training"].items()
    assert (spec["name"], spec["priority"], spec["max_attempts"]) == ("digits-mlp", "normal", 3)
    assert spec["training"]["kernels"] == "auto"
    assert spec["training"]["grad_clip"] == 1.0
    assert json.loads(json.dumps(spec)) == spec  # plain JSON values only
    assert parse_job_spec(spec) == spec  # normalizing is idempotent: a node may parse it again


def test_minimal_spec_gets_every_default() -> None:
    spec = parse_job_spec(MINIMAL)
    assert spec["name"] == "digits-mlp"
    assert spec["model"] == {"type": "mlp", "hidden": [128, 64], "activation": "gelu", "norm": "none", "dropout": 0.0}
    assert spec["dataset"] == {"name": "digits", "val_fraction": 0.2, "test_fraction": 0.0, "split_seed": 0}
    training = spec["training"]
    assert (training["batch_size"], training["optimizer"], training["learning_rate"]) == (64, "adamw", 1e-3)
    assert (training["weight_decay"], training["seed"], training["kernels"]) == (0.01, 0, "auto")
    assert training["progress_every_steps"] > 0 and training["progress_every_s"] > 0
    assert training["checkpoint"] == {"enabled": True, "min_interval_s": 60.0}
    assert spec["requirements"] == {"gpu": False, "min_gpu_memory_mb": 0, "min_ram_mb": 0, "labels": {}, "nodes": 1}
    assert (spec["priority"], spec["max_attempts"]) == ("normal", 3)


def test_model_defaults_per_type() -> None:
    cnn = parse_job_spec({**MINIMAL, "model": {"type": "cnn"}})["model"]
    assert cnn == {"type": "cnn", "channels": [16, 32], "kernel_size": 3, "pool": True, "activation": "relu",
                   "hidden": [64], "dropout": 0.0}
    lm = parse_job_spec({**MINIMAL, "model": {"type": "transformer", "d_model": 64}, "dataset": "tiny-text"})
    assert lm["model"] == {"type": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256,
                           "context": 128, "activation": "gelu", "norm": "layernorm", "dropout": 0.0}
    assert lm["dataset"] == {"name": "tiny-text", **SPLIT} and lm["name"] == "tiny-text-transformer"


def test_synthetic_and_url_datasets_normalize() -> None:
    blobs = parse_job_spec({**MINIMAL, "dataset": {"name": "blobs", "n_classes": 4}})["dataset"]
    assert blobs == {"name": "blobs", "n_samples": 1000, "n_features": 2, "n_classes": 4, "noise": 1.0, **SPLIT}
    spirals = parse_job_spec({**MINIMAL, "dataset": "spirals"})["dataset"]
    assert spirals == {"name": "spirals", "n_samples": 1000, "n_classes": 2, "noise": 0.2, **SPLIT}
    user = parse_job_spec({**MINIMAL, "dataset": {"url": "file:///srv/data/houses.csv.gz"}})
    assert user["dataset"] == {"name": "houses", "url": "file:///srv/data/houses.csv.gz", "format": "csv",
                               "task": "auto", **SPLIT}
    assert user["name"] == "houses-mlp"
    npz = parse_job_spec({**MINIMAL, "dataset": {"url": "https://example.org/get?id=3", "format": "npz",
                                                 "name": "mine", "task": "regression"}})["dataset"]
    assert (npz["name"], npz["format"], npz["task"]) == ("mine", "npz", "regression")


def test_tiny_shakespeare_and_the_held_out_splits_normalize() -> None:
    shakespeare = parse_job_spec({**MINIMAL, "dataset": "tiny-shakespeare", "model": {"type": "transformer"}})
    # nanoGPT's shakespeare_char holds out the last 10 %, so this dataset does by default
    assert shakespeare["dataset"] == {"name": "tiny-shakespeare", "val_fraction": 0.1, "test_fraction": 0.0,
                                      "split_seed": 0}
    info = known_data_info(shakespeare["dataset"])
    assert info is not None and info["task"] == "lm" and info == known_data_info({"name": "tiny-text"})
    chosen = {"name": "blobs", "val_fraction": 0.5, "test_fraction": 0.4, "split_seed": 2**63 - 1}
    assert parse_job_spec({**MINIMAL, "dataset": chosen})["dataset"].items() >= chosen.items()
    normalized = parse_job_spec({**MINIMAL, "dataset": {"name": "digits", "test_fraction": 0.1, "split_seed": 3}})
    assert parse_job_spec(normalized) == normalized


def test_sequential_layers_get_defaults_and_shapes() -> None:
    layers = [{"type": "conv2d", "out_channels": 8, "padding": 1}, {"type": "relu"}, {"type": "maxpool"},
              {"type": "flatten"}, {"type": "linear", "out": 32}, {"type": "gelu"}, {"type": "dropout", "p": 0.1},
              {"type": "layernorm"}, {"type": "linear", "out": 10}]
    spec = parse_job_spec({**MINIMAL, "model": {"type": "sequential", "layers": layers}})
    assert spec["model"]["layers"][0] == {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "stride": 1,
                                          "padding": 1}
    assert spec["model"]["layers"][2] == {"type": "maxpool", "kernel_size": 2, "stride": 2}
    shapes = [shape for shape, _ in sequential_shapes(spec["model"], known_data_info(spec["dataset"]))]
    assert shapes == [[8, 8, 8], [8, 8, 8], [8, 4, 4], [128], [32], [32], [32], [32], [10]]
    # the contract's own example: linear-first on the same image dataset sees flat features
    flat = [{"type": "linear", "out": 128}, {"type": "gelu"}, {"type": "dropout", "p": 0.1},
            {"type": "linear", "out": 10}]
    assert parse_job_spec({**MINIMAL, "model": {"type": "sequential", "layers": flat}})["model"]["layers"] == [
        {"type": "linear", "out": 128, "bias": True}, {"type": "gelu"}, {"type": "dropout", "p": 0.1},
        {"type": "linear", "out": 10, "bias": True}]
    bigram = [{"type": "embedding", "dim": 32}, {"type": "linear", "out": 256}]
    text = parse_job_spec({**MINIMAL, "dataset": "tiny-text", "model": {"type": "sequential", "layers": bigram}})
    assert text["model"]["layers"][0] == {"type": "embedding", "num_embeddings": 256, "dim": 32}
    assert text["model"]["context"] == 64


@pytest.mark.parametrize("body", [[], "digits", None, 3])
def test_non_object_body_is_malformed(body: object) -> None:
    with pytest.raises(MalformedBody):
        parse_job_spec(body)


SEQ = {**MINIMAL, "model": {"type": "sequential", "layers": [{"type": "linear", "out": 10}]}}
CONV_NO_FLATTEN = [{"type": "conv2d", "out_channels": 4}, {"type": "relu"}, {"type": "linear", "out": 10}]


@pytest.mark.parametrize(("body", "field"), [
    # unknown fields, at every level
    (with_change(MINIMAL, "colour", "red"), "colour"),
    (with_change(MINIMAL, "model.hiddn", [3]), "model.hiddn"),
    (with_change(MINIMAL, "training.checkpoint.every", 3), "training.checkpoint.every"),
    (with_change(MINIMAL, "requirements.cpus", 3), "requirements.cpus"),
    (with_change(MINIMAL, "dataset.n_samples", 30), "dataset.n_samples"),  # digits has no size to choose
    (with_change(SEQ, "model.layers.0.outs", 3), "model.layers.0.outs"),
    # required fields
    (with_change(MINIMAL, "model", ...), "model"),
    (with_change(MINIMAL, "dataset", ...), "dataset"),
    (with_change(MINIMAL, "training", ...), "training.epochs"),
    (with_change(MINIMAL, "training.epochs", ...), "training.epochs"),
    (with_change(SEQ, "model.layers.0.out", ...), "model.layers.0.out"),
    # types and ranges
    (with_change(MINIMAL, "name", ""), "name"),
    (with_change(MINIMAL, "model", "mlp"), "model"),
    (with_change(MINIMAL, "model.type", "rnn"), "model.type"),
    (with_change(MINIMAL, "model.activation", "swish"), "model.activation"),
    (with_change(MINIMAL, "model.norm", "batchnorm"), "model.norm"),
    (with_change(MINIMAL, "model.hidden", [128, 0]), "model.hidden.1"),
    (with_change(MINIMAL, "model.hidden", 128), "model.hidden"),
    (with_change(MINIMAL, "model.dropout", 1.5), "model.dropout"),
    (with_change(MINIMAL, "training.epochs", 0), "training.epochs"),
    (with_change(MINIMAL, "training.epochs", 10_001), "training.epochs"),
    (with_change(MINIMAL, "training.epochs", 2.5), "training.epochs"),
    (with_change(MINIMAL, "training.epochs", True), "training.epochs"),
    (with_change(MINIMAL, "training.batch_size", 0), "training.batch_size"),
    (with_change(MINIMAL, "training.batch_size", 1_000_000), "training.batch_size"),
    (with_change(MINIMAL, "training.learning_rate", -0.1), "training.learning_rate"),
    (with_change(MINIMAL, "training.learning_rate", 0), "training.learning_rate"),
    (with_change(MINIMAL, "training.learning_rate", "fast"), "training.learning_rate"),
    (with_change(MINIMAL, "training.optimizer", "lion"), "training.optimizer"),
    (with_change(MINIMAL, "training.kernels", "cuda"), "training.kernels"),
    (with_change(MINIMAL, "training.seed", -1), "training.seed"),
    (with_change(MINIMAL, "training.betas", [0.9]), "training.betas"),
    (with_change(MINIMAL, "training.grad_clip", -1), "training.grad_clip"),
    (with_change(MINIMAL, "priority", "urgent"), "priority"),
    (with_change(MINIMAL, "max_attempts", 11), "max_attempts"),
    (with_change(MINIMAL, "max_attempts", 0), "max_attempts"),
    (with_change(MINIMAL, "requirements.gpu", "yes"), "requirements.gpu"),
    (with_change(MINIMAL, "requirements.min_ram_mb", -5), "requirements.min_ram_mb"),
    (with_change(MINIMAL, "requirements.labels", {"zone": 3}), "requirements.labels.zone"),
    (with_change(MINIMAL, "requirements.labels", ["zone"]), "requirements.labels"),
    # datasets
    (with_change(MINIMAL, "dataset.name", "mnist"), "dataset.name"),
    (with_change(MINIMAL, "dataset.val_fraction", 0.95), "dataset.val_fraction"),
    (with_change(MINIMAL, "dataset.test_fraction", 0.6), "dataset.test_fraction"),
    (with_change(MINIMAL, "dataset.test_fraction", -0.1), "dataset.test_fraction"),
    (with_change(MINIMAL, "dataset", {"name": "digits", "val_fraction": 0.5, "test_fraction": 0.45}),
     "dataset.test_fraction"),  # val + test may hold out at most 0.9
    (with_change(MINIMAL, "dataset.split_seed", -1), "dataset.split_seed"),
    (with_change(MINIMAL, "dataset.split_seed", 1.5), "dataset.split_seed"),
    (with_change(MINIMAL, "dataset.split_seed", "7"), "dataset.split_seed"),
    (with_change(MINIMAL, "dataset", {"name": "blobs", "n_classes": 1}), "dataset.n_classes"),
    (with_change(MINIMAL, "dataset", {"url": "ftp://host/data.npz"}), "dataset.url"),
    (with_change(MINIMAL, "dataset", {"url": "file:///srv/data/table"}), "dataset.format"),
    (with_change(MINIMAL, "dataset", {"url": "/srv/a.npz", "format": "parquet"}), "dataset.format"),
    (with_change(MINIMAL, "dataset", {"url": "/srv/a.npz", "task": "ranking"}), "dataset.task"),
    # models that cannot fit their data
    (with_change(MINIMAL, "model", {"type": "transformer"}), "model.type"),
    (with_change(with_change(MINIMAL, "dataset", "tiny-text"), "model", {"type": "mlp"}), "model.type"),
    (with_change(with_change(MINIMAL, "dataset", "blobs"), "model", {"type": "cnn"}), "model.type"),
    (with_change(MINIMAL, "model", {"type": "cnn", "channels": [8, 8, 8, 8]}), "model.channels"),
    (with_change(with_change(MINIMAL, "dataset", "tiny-text"), "model",
                 {"type": "transformer", "d_model": 128, "n_heads": 3}), "model.n_heads"),
    (with_change(MINIMAL, "model.hidden", [65_536, 65_536]), "model"),  # 4.3 billion parameters
    ({**MINIMAL, "dataset": "tiny-text", "model": {"type": "transformer", "context": 8192},
      "training": {"epochs": 1, "batch_size": 4096}}, "training.batch_size"),  # 33M tokens a step
    ({**MINIMAL, "model": {"type": "sequential", "layers": CONV_NO_FLATTEN}}, "model.layers.2.type"),
    (with_change(with_change(SEQ, "dataset", "blobs"), "model.layers",
                 [{"type": "conv2d", "out_channels": 4}, {"type": "flatten"}, {"type": "linear", "out": 3}]),
     "model.layers.0.type"),
    (with_change(SEQ, "model.layers", [{"type": "linear", "out": 8}, {"type": "attention"}]), "model.layers.1.type"),
    (with_change(SEQ, "model.layers", [{"type": "conv2d", "out_channels": 4, "kernel_size": 9}]),
     "model.layers.0.kernel_size"),
    (with_change(SEQ, "model.layers.0.out", 5), "model.layers.0"),  # digits has 10 classes
    (with_change(SEQ, "model.layers", [{"type": "embedding", "dim": 8}, {"type": "linear", "out": 10}]),
     "model.layers.0.type"),
    (with_change(with_change(SEQ, "dataset", "tiny-text"), "model.layers", [{"type": "linear", "out": 256}]),
     "model.layers.0.type"),  # token ids need an embedding first
    (with_change(SEQ, "model.layers", []), "model.layers"),
    (with_change(SEQ, "model.layers", [{"type": "linear", "out": 10}] * 257), "model.layers"),
])
def test_invalid_input_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidField) as caught:
        parse_job_spec(body)
    assert caught.value.field == field, caught.value.message
    assert caught.value.status == 422 and caught.value.message


def test_parameter_count_and_cap() -> None:
    spec = parse_job_spec(API_EXAMPLE)
    count = check_model_fits(spec["model"], known_data_info(spec["dataset"]))
    # 64->128 (+ layernorm), 128->64 (+ layernorm), 64->10
    assert count == (64 * 128 + 128 + 256) + (128 * 64 + 64 + 128) + (64 * 10 + 10)
    assert count < MAX_PARAMETERS


def test_url_dataset_model_checked_as_far_as_known() -> None:
    user = {"url": "/srv/data.npz"}
    # shapes unknown until the node loads the data: these pass here and are checked there
    parse_job_spec({**MINIMAL, "dataset": user, "model": {"type": "cnn"}})
    parse_job_spec({**MINIMAL, "dataset": user, "model": {"type": "sequential", "layers": CONV_NO_FLATTEN}})
    with pytest.raises(InvalidField) as caught:  # but user data is never text
        parse_job_spec({**MINIMAL, "dataset": user, "model": {"type": "transformer"}})
    assert caught.value.field == "model.type"


def test_shipped_example_is_the_contract_example() -> None:
    import json
    from pathlib import Path

    from shared.jobspec import DIGITS_MLP_EXAMPLE

    shipped = json.loads((Path(__file__).resolve().parents[2] / "examples" / "digits-mlp.json").read_text())
    assert parse_job_spec(shipped) == parse_job_spec(DIGITS_MLP_EXAMPLE) == parse_job_spec(API_EXAMPLE)


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data.csv", "http://[fe80::1]/a.csv",
                                 "https://user:secret@data.example/a.csv", "http://metadata.google.internal/a.csv",
                                 "http://0.0.0.0/a.csv", "http://[::1/a.csv", "http:///a.csv"])
def test_dataset_urls_that_can_never_be_a_source_are_refused(url: str) -> None:
    with pytest.raises(InvalidField) as refused:
        parse_job_spec({"model": {"type": "mlp"}, "dataset": {"url": url}, "training": {"epochs": 1}})
    assert refused.value.field == "dataset.url"
