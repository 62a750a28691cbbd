"""The job spec: validate a submitted body and return it with every default filled in.

Pure Python on purpose (no torch): the HTTP control plane rejects a job that can never train
(unknown field, layers whose shapes cannot connect, a model far too large) before it is queued,
and the node's training package reuses the same shape rules to build the model, so the two
cannot disagree. Every error names the dotted field at fault (``model.layers.2.type``).
"""

from __future__ import annotations

import ipaddress
import math
import urllib.parse
from typing import Any

from shared.errors import InvalidField, MalformedBody
from shared.model_shapes import ACTIVATIONS, SHAPELESS_LAYERS, TEXT_VOCAB_SIZE, check_model_fits

MAX_TOKENS_PER_STEP = 1 << 22  # beyond this one step's activations and logits outgrow a large GPU
MAX_WIDTH = 65_536
DEFAULT_MAX_DURATION_S = 7 * 86400.0  # the platform's default limit on training.max_duration_s
DEFAULT_MAX_NODES = 16  # the platform's default limit on requirements.nodes
NORMS = ("none", "layernorm", "rmsnorm")
BUILTIN_DATASETS = ("digits", "tiny-text", "tiny-shakespeare", "blobs", "spirals")
TEXT_DATASETS = ("tiny-text", "tiny-shakespeare")  # byte-level language-modelling corpora, split contiguously
MAX_STEPS = 1_000_000_000
WEIGHT_DECAY_ON = ("matrices", "all")  # training.weight_decay_on: see node_runtime/training/layers.py
# The contract's example job: the digits MLP that ``cyxwiz demo`` trains (examples/digits-mlp.json).
DIGITS_MLP_EXAMPLE: dict[str, Any] = {
    "name": "digits-mlp",
    "model": {"type": "mlp", "hidden": [128, 64], "activation": "gelu", "norm": "layernorm", "dropout": 0.0},
    "dataset": {"name": "digits", "val_fraction": 0.2},
    "training": {"epochs": 10, "batch_size": 64, "optimizer": "adamw", "learning_rate": 0.001,
                 "weight_decay": 0.01, "seed": 0},
}
_REQUIRED = object()  # sentinel: the field has no default


class _Fields:
    """One JSON object being read: typed, range-checked getters, then ``finish`` rejects leftovers."""

    def __init__(self, raw: object, path: str) -> None:
        if not isinstance(raw, dict):
            raise InvalidField(f"{path} must be an object", field=path)
        self.raw: dict[str, Any] = raw
        self.path = path
        self.read: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def value(self, key: str, default: Any) -> Any:
        self.read.add(key)
        if key in self.raw:
            return self.raw[key]
        if default is _REQUIRED:
            raise InvalidField(f"{self.name(key)} is required", field=self.name(key))
        return default

    def integer(self, key: str, default: Any, low: int, high: int) -> int:
        value = self.value(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidField(f"{self.name(key)} must be an integer", field=self.name(key))
        if not low <= value <= high:
            raise InvalidField(f"{self.name(key)} must be between {low} and {high}", field=self.name(key))
        return value

    def number(self, key: str, default: Any, low: float, high: float, *, above_low: bool = False) -> float:
        value = self.value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidField(f"{self.name(key)} must be a number", field=self.name(key))
        if value > high or value < low or (above_low and value == low):
            bound = "above" if above_low else "at least"
            raise InvalidField(f"{self.name(key)} must be {bound} {low} and at most {high}", field=self.name(key))
        return float(value)

    def choice(self, key: str, default: Any, options: tuple[str, ...]) -> str:
        value = self.value(key, default)
        if value not in options:
            raise InvalidField(f"{self.name(key)} must be one of {', '.join(options)}", field=self.name(key))
        return str(value)

    def boolean(self, key: str, default: Any) -> bool:
        value = self.value(key, default)
        if not isinstance(value, bool):
            raise InvalidField(f"{self.name(key)} must be true or false", field=self.name(key))
        return value

    def text(self, key: str, default: Any, max_length: int = 128) -> str:
        value = self.value(key, default)
        if not isinstance(value, str) or not 0 < len(value) <= max_length or not value.isprintable():
            raise InvalidField(f"{self.name(key)} must be a printable string of 1 to {max_length} characters",
                               field=self.name(key))
        return value

    def widths(self, key: str, default: Any, min_items: int, max_items: int) -> list[int]:
        value = self.value(key, default)
        if not isinstance(value, list) or not min_items <= len(value) <= max_items:
            raise InvalidField(f"{self.name(key)} must be a list of {min_items} to {max_items} sizes",
                               field=self.name(key))
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= MAX_WIDTH:
                raise InvalidField(f"{self.name(key)}.{index} must be an integer from 1 to {MAX_WIDTH}",
                                   field=f"{self.name(key)}.{index}")
        return list(value)

    def child(self, key: str, *, required: bool = False) -> _Fields:
        return _Fields(self.value(key, _REQUIRED if required else {}), self.name(key))

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.read)
        if unknown:
            raise InvalidField(f"unknown field {self.name(unknown[0])}", field=self.name(unknown[0]))


def parse_job_spec(raw: object, *, max_duration_s: float = DEFAULT_MAX_DURATION_S,
                   max_nodes: int = DEFAULT_MAX_NODES) -> dict[str, Any]:
    """Validate a decoded POST /v1/jobs body; return the normalized spec (plain JSON values).

    ``max_duration_s`` is the platform's limit on ``training.max_duration_s`` (which defaults to it),
    ``max_nodes`` its limit on ``requirements.nodes``.

    Raises ``MalformedBody`` when the body is not a JSON object and ``InvalidField`` naming the
    dotted field for anything else: unknown fields, bad values, shapes that cannot connect.
    """
    if not isinstance(raw, dict):
        raise MalformedBody("the job spec must be a JSON object")
    top = _Fields(raw, "")
    dataset = _parse_dataset(top.value("dataset", _REQUIRED))
    info = known_data_info(dataset)
    model = _parse_model(top.child("model", required=True), info)
    training = _parse_training(_Fields(top.value("training", {}), "training"), max_duration_s)
    check_model_fits(model, info)
    if (info or {}).get("task") == "lm" and training["batch_size"] * model["context"] > MAX_TOKENS_PER_STEP:
        raise InvalidField(f"batch_size x context must stay under {MAX_TOKENS_PER_STEP:,} tokens per step",
                           field="training.batch_size")
    requirements = _parse_requirements(top.child("requirements"), max_nodes)
    spec = {
        "name": top.text("name", f"{dataset['name']}-{model['type']}"),
        "model": model,
        "dataset": dataset,
        "training": training,
        "requirements": requirements,
        "priority": top.choice("priority", "normal", ("low", "normal", "high")),
        "max_attempts": top.integer("max_attempts", 3, 1, 10),
    }
    top.finish()
    nodes = requirements["nodes"]
    if training["batch_size"] % nodes:  # the global batch is split evenly across the ranks
        raise InvalidField(f"training.batch_size ({training['batch_size']}) must be a multiple of "
                           f"requirements.nodes ({nodes}): it is the global batch, split across the nodes",
                           field="training.batch_size")
    return spec


def _parse_dataset(raw: object) -> dict[str, Any]:
    if isinstance(raw, str):  # "dataset": "digits" is shorthand for {"name": "digits"}
        raw = {"name": raw}
    fields = _Fields(raw, "dataset")
    if "url" in fields.raw:
        dataset = _parse_url_dataset(fields)
    else:
        name = fields.value("name", _REQUIRED)
        if name not in BUILTIN_DATASETS:
            raise InvalidField(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN_DATASETS)} "
                               "or give a url", field="dataset.name")
        dataset = {"name": name}
        if name == "blobs":
            dataset.update(n_samples=fields.integer("n_samples", 1000, 20, 1_000_000),
                           n_features=fields.integer("n_features", 2, 1, 4096),
                           n_classes=fields.integer("n_classes", 3, 2, 1000),
                           noise=fields.number("noise", 1.0, 0.0, 100.0))
        elif name == "spirals":
            dataset.update(n_samples=fields.integer("n_samples", 1000, 20, 1_000_000),
                           n_classes=fields.integer("n_classes", 2, 2, 16),
                           noise=fields.number("noise", 0.2, 0.0, 10.0))
    # tiny-shakespeare holds out its last 10 % by default, as nanoGPT's shakespeare_char does
    default_val = 0.1 if dataset["name"] == "tiny-shakespeare" and "url" not in dataset else 0.2
    dataset["val_fraction"] = fields.number("val_fraction", default_val, 0.0, 0.9)
    # a held-out test split, evaluated once at the end (test_loss, test_accuracy)
    dataset["test_fraction"] = fields.number("test_fraction", 0.0, 0.0, 0.5)
    if dataset["val_fraction"] + dataset["test_fraction"] > 0.9:
        raise InvalidField("dataset.val_fraction + dataset.test_fraction must be at most 0.9",
                           field="dataset.test_fraction")
    # which samples are held out: fixed by split_seed, so a sweep over training.seed keeps one validation set
    dataset["split_seed"] = fields.integer("split_seed", 0, 0, 2**63 - 1)
    fields.finish()
    return dataset


def _parse_url_dataset(fields: _Fields) -> dict[str, Any]:
    url = fields.text("url", _REQUIRED, max_length=4096)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("", "file", "http", "https"):
        raise InvalidField("dataset.url must be a file path, a file:// url or an http(s) url", field="dataset.url")
    if scheme in ("http", "https"):
        _check_url_host(url)
    path = url.split("?", 1)[0].rstrip("/")
    basename = path.rsplit("/", 1)[-1]
    guessed = "npz" if basename.endswith(".npz") else "csv" if basename.endswith((".csv", ".csv.gz")) else _REQUIRED
    stem = basename.split(".", 1)[0] or "data"
    return {
        "name": fields.text("name", stem),
        "url": url,
        "format": fields.choice("format", guessed, ("npz", "csv")),
        # auto: integer targets mean classification, float targets regression
        "task": fields.choice("task", "auto", ("auto", "classification", "regression")),
    }


# Never a dataset source, whatever a node allows: cloud metadata services (they hand out credentials) and
# link-local addresses. Nodes check every address again after resolving and after each redirect.
METADATA_HOSTS = ("metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal")


def _check_url_host(url: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        raise InvalidField("dataset.url is not a valid url", field="dataset.url") from None
    if parts.username is not None or parts.password is not None:
        raise InvalidField("dataset.url may not carry a user name or password", field="dataset.url")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise InvalidField("dataset.url has no host", field="dataset.url")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host in METADATA_HOSTS or (address is not None and (address.is_link_local or address.is_unspecified
                                                              or address.is_multicast)):
        raise InvalidField("dataset.url may not point at a link-local, metadata, multicast or unspecified "
                           "address", field="dataset.url")


def known_data_info(dataset: dict[str, Any]) -> dict[str, Any] | None:
    """The shapes a normalized dataset spec yields, or None for user data (known only once loaded).

    Keys: task (classification|regression|lm), num_features, image_shape ([C, H, W] or None),
    num_classes, target_dim, vocab_size (each None where it does not apply).
    """
    name = dataset["name"]
    if "url" in dataset:
        return None
    if name == "digits":
        return data_info("classification", num_features=64, image_shape=[1, 8, 8], num_classes=10)
    if name in TEXT_DATASETS:
        return data_info("lm", vocab_size=TEXT_VOCAB_SIZE)
    if name == "blobs":
        return data_info("classification", num_features=dataset["n_features"], num_classes=dataset["n_classes"])
    return data_info("classification", num_features=2, num_classes=dataset["n_classes"])  # spirals


def data_info(task: str, *, num_features: int | None = None, image_shape: list[int] | None = None,
              num_classes: int | None = None, target_dim: int | None = None,
              vocab_size: int | None = None) -> dict[str, Any]:
    """Build the data-shape record shared by validation, model building and saved weights."""
    return {"task": task, "num_features": num_features, "image_shape": image_shape,
            "num_classes": num_classes, "target_dim": target_dim, "vocab_size": vocab_size}


def _parse_model(fields: _Fields, info: dict[str, Any] | None) -> dict[str, Any]:
    kind = fields.choice("type", _REQUIRED, ("mlp", "cnn", "transformer", "sequential"))
    model: dict[str, Any] = {"type": kind}
    if kind == "mlp":
        model.update(hidden=fields.widths("hidden", [128, 64], 0, 32),
                     activation=fields.choice("activation", "gelu", ACTIVATIONS),
                     norm=fields.choice("norm", "none", NORMS),
                     dropout=fields.number("dropout", 0.0, 0.0, 0.99))
    elif kind == "cnn":
        model.update(channels=fields.widths("channels", [16, 32], 1, 8),
                     kernel_size=fields.integer("kernel_size", 3, 1, 15),
                     pool=fields.boolean("pool", True),
                     activation=fields.choice("activation", "relu", ACTIVATIONS),
                     hidden=fields.widths("hidden", [64], 0, 8),
                     dropout=fields.number("dropout", 0.0, 0.0, 0.99))
    elif kind == "transformer":
        d_model = fields.integer("d_model", 128, 8, 8192)
        model.update(d_model=d_model,
                     n_layers=fields.integer("n_layers", 2, 1, 64),
                     n_heads=fields.integer("n_heads", 4, 1, 128),
                     d_ff=fields.integer("d_ff", 4 * d_model, 1, MAX_WIDTH),
                     context=fields.integer("context", 128, 2, 8192),
                     activation=fields.choice("activation", "gelu", ("relu", "gelu", "silu")),
                     norm=fields.choice("norm", "layernorm", ("layernorm", "rmsnorm")),
                     dropout=fields.number("dropout", 0.0, 0.0, 0.99))
        if d_model % model["n_heads"]:
            raise InvalidField("model.n_heads must divide model.d_model", field="model.n_heads")
    else:
        raw_layers = fields.value("layers", _REQUIRED)
        if not isinstance(raw_layers, list) or not 1 <= len(raw_layers) <= 256:
            raise InvalidField("model.layers must be a list of 1 to 256 layers", field="model.layers")
        model["layers"] = [_parse_layer(_Fields(layer, f"model.layers.{i}"), info)
                           for i, layer in enumerate(raw_layers)]
        model["context"] = fields.integer("context", 64, 2, 8192)  # sequence length, for text datasets only
    fields.finish()
    return model




def _parse_layer(fields: _Fields, info: dict[str, Any] | None) -> dict[str, Any]:
    kind = fields.choice("type", _REQUIRED, ("linear", "conv2d", "maxpool", "avgpool", "dropout", "embedding",
                                             *SHAPELESS_LAYERS))
    layer: dict[str, Any] = {"type": kind}
    if kind == "linear":
        layer.update(out=fields.integer("out", _REQUIRED, 1, MAX_WIDTH), bias=fields.boolean("bias", True))
    elif kind == "conv2d":
        layer.update(out_channels=fields.integer("out_channels", _REQUIRED, 1, 16_384),
                     kernel_size=fields.integer("kernel_size", 3, 1, 31),
                     stride=fields.integer("stride", 1, 1, 16),
                     padding=fields.integer("padding", 0, 0, 31))
    elif kind in ("maxpool", "avgpool"):
        kernel = fields.integer("kernel_size", 2, 1, 32)
        layer.update(kernel_size=kernel, stride=fields.integer("stride", kernel, 1, 32))
    elif kind == "dropout":
        layer["p"] = fields.number("p", 0.5, 0.0, 0.99)
    elif kind == "embedding":
        vocab = (info or {}).get("vocab_size") or 1
        layer.update(num_embeddings=fields.integer("num_embeddings", vocab, 1, 1_000_000),
                     dim=fields.integer("dim", _REQUIRED, 1, MAX_WIDTH))
    fields.finish()
    return layer


def _parse_training(fields: _Fields, max_duration_s: float) -> dict[str, Any]:
    checkpoint = fields.child("checkpoint")
    # the length: epochs, max_steps, or both (whichever ends first); the schedule follows the result
    max_steps = fields.value("max_steps", None)
    if max_steps is not None:
        max_steps = fields.integer("max_steps", None, 1, MAX_STEPS)
    epochs = fields.value("epochs", None)  # null (as normalized) or absent: only with max_steps
    if epochs is None and max_steps is None:
        raise InvalidField("training.epochs is required (or give training.max_steps)", field="training.epochs")
    if epochs is not None:
        epochs = fields.integer("epochs", _REQUIRED, 1, 10_000)
    training = {
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": fields.integer("batch_size", 64, 1, 65_536),
        "optimizer": fields.choice("optimizer", "adamw", ("sgd", "adam", "adamw")),
        "learning_rate": fields.number("learning_rate", 1e-3, 0.0, 10.0, above_low=True),
        "weight_decay": fields.number("weight_decay", 0.01, 0.0, 10.0),
        # "matrices": weights of linear and conv layers only (not biases, norm gains or embeddings); "all"
        "weight_decay_on": fields.choice("weight_decay_on", "matrices", WEIGHT_DECAY_ON),
        "momentum": fields.number("momentum", 0.9, 0.0, 0.999),  # sgd only
        "betas": _betas(fields),  # adam and adamw only
        "lr_schedule": fields.choice("lr_schedule", "constant", ("constant", "cosine")),
        "warmup_steps": fields.integer("warmup_steps", 0, 0, 10_000_000),
        "seed": fields.integer("seed", 0, 0, 2**63 - 1),
        "grad_clip": fields.number("grad_clip", 1.0, 0.0, 1e6),  # max global grad norm; 0 turns clipping off
        "kernels": fields.choice("kernels", "auto", ("auto", "triton", "torch")),
        "progress_every_steps": fields.integer("progress_every_steps", 50, 1, 10_000_000),
        "progress_every_s": fields.number("progress_every_s", 5.0, 0.1, 86_400.0),
        # wall-clock limit of the whole job, from its first start: then it fails (the job's fault)
        "max_duration_s": fields.number("max_duration_s", max_duration_s, 1.0, max_duration_s),
        "checkpoint": {"enabled": checkpoint.boolean("enabled", True),
                       # saved at the first step boundary (or epoch end) once this long has passed since the
                       # last one: a crash loses at most this plus one step
                       "min_interval_s": checkpoint.number("min_interval_s", 60.0, 0.0, 86_400.0)},
    }
    checkpoint.finish()
    fields.finish()
    return training


def _betas(fields: _Fields) -> list[float]:
    value = fields.value("betas", [0.9, 0.999])
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)):
        raise InvalidField("training.betas must be two numbers in [0, 1)", field="training.betas")
    return [float(b) for b in value]


def _parse_requirements(fields: _Fields, max_nodes: int) -> dict[str, Any]:
    labels = fields.value("labels", {})
    if not isinstance(labels, dict) or len(labels) > 32:
        raise InvalidField("requirements.labels must be an object of at most 32 labels", field="requirements.labels")
    for key, value in labels.items():
        if not (0 < len(key) <= 63 and isinstance(value, str) and len(value) <= 256
                and key.isprintable() and value.isprintable()):
            raise InvalidField("labels map printable names (1-63 characters) to printable strings (at most 256 "
                               "characters)", field=f"requirements.labels.{key}" if key.isprintable()
                               else "requirements.labels")
    requirements = {"gpu": fields.boolean("gpu", False),
                    "min_gpu_memory_mb": fields.integer("min_gpu_memory_mb", 0, 0, 100_000_000),
                    "min_ram_mb": fields.integer("min_ram_mb", 0, 0, 100_000_000),
                    "labels": dict(labels),
                    # data-parallel across this many nodes, each meeting the rest (docs/distributed.md)
                    "nodes": fields.integer("nodes", 1, 1, max(1, max_nodes))}
    fields.finish()
    return requirements
