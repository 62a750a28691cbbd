"""Shapes and sizes of the models a job spec describes, in pure Python (no torch).

The control plane calls :func:`check_model_fits` on submit, so a model whose layers cannot connect or
that is far too large is refused (422, field named) before it is queued; the node's training package
builds its layers from :func:`sequential_shapes`, so the two can never disagree. The gateway checks
uploaded weights and checkpoints against :func:`expected_state_shapes`: every tensor the node's model has.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from shared.errors import InvalidField

MAX_PARAMETERS = 200_000_000  # beyond this a job would not fit a node's memory, let alone train quickly
TEXT_VOCAB_SIZE = 256  # text datasets are modelled as raw bytes, so every text shares one vocabulary
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sigmoid")
SHAPELESS_LAYERS = ("flatten", *ACTIVATIONS, "layernorm", "rmsnorm")


def check_model_fits(model: dict[str, Any], info: dict[str, Any] | None) -> int:
    """Check that a normalized model can train on data of this shape; return its parameter count.

    ``info`` None (user data not loaded yet) checks only what does not depend on the data.
    The node calls this again once the data is loaded; it raises ``InvalidField`` either way.
    """
    kind, task = model["type"], (info or {}).get("task")
    if kind == "transformer" and task != "lm":
        raise InvalidField("a transformer is a language model: it needs a text dataset such as tiny-text",
                           field="model.type")
    if kind in ("mlp", "cnn") and task == "lm":
        raise InvalidField(f"{kind} cannot model text; use a transformer or a sequential model with an embedding",
                           field="model.type")
    outputs = _output_size(info)
    if kind == "mlp":
        features = (info or {}).get("num_features") or 1
        widths = [features, *model["hidden"]]
        norm = {"none": 0, "layernorm": 2, "rmsnorm": 1}[model["norm"]]
        count = int(sum(a * b + b + norm * b for a, b in itertools.pairwise(widths)) + widths[-1] * outputs + outputs)
    elif kind == "cnn":
        count = _cnn_parameters(model, info, outputs)
    elif kind == "transformer":
        count = _transformer_parameters(model, info["vocab_size"] if info else TEXT_VOCAB_SIZE)
    else:
        count = sum(size for _, size in sequential_shapes(model, info))
    if count > MAX_PARAMETERS:
        raise InvalidField(f"the model has {count:,} parameters; the limit is {MAX_PARAMETERS:,}", field="model")
    return count


def _output_size(info: dict[str, Any] | None) -> int:
    info = info or {}
    return int(info.get("num_classes") or info.get("target_dim") or info.get("vocab_size") or 1)


def _cnn_parameters(model: dict[str, Any], info: dict[str, Any] | None, outputs: int) -> int:
    if info is None:
        channels, height, width = 1, 1 << 30, 1 << 30  # unknown image: only the sizes can be checked
    elif info.get("image_shape") is None:
        raise InvalidField("a cnn needs image-shaped data (channels, height, width); this dataset is flat",
                           field="model.type")
    else:
        channels, height, width = info["image_shape"]
    count, k = 0, model["kernel_size"]
    for out_channels in model["channels"]:
        count += channels * out_channels * k * k + out_channels
        channels = out_channels
        if model["pool"]:  # same-padded conv keeps the size; each 2x2 pool halves it
            height, width = height // 2, width // 2
            if height < 1 or width < 1:
                raise InvalidField("too many pooled conv layers for this image size", field="model.channels")
    if info is None:
        return count
    widths = [channels * height * width, *model["hidden"]]
    return int(count + sum(a * b + b for a, b in itertools.pairwise(widths)) + widths[-1] * outputs + outputs)


def _transformer_parameters(model: dict[str, Any], vocab_size: int) -> int:
    d, d_ff = model["d_model"], model["d_ff"]
    norm = 2 * d if model["norm"] == "layernorm" else d
    block = 2 * norm + (d * 3 * d + 3 * d) + (d * d + d) + (d * d_ff + d_ff) + (d_ff * d + d)
    return int(vocab_size * d + model["context"] * d + model["n_layers"] * block + norm + d * vocab_size)


def sequential_input(model: dict[str, Any], info: dict[str, Any] | None) -> tuple[list[int], bool]:
    """The per-sample input shape a sequential model sees, and whether it is token ids.

    Text gives ``context`` token ids; image data gives (C, H, W) when the first layer that cares
    is a conv or pool, so one dataset serves both ``linear``-first and ``conv2d``-first stacks.
    """
    if info is None:
        return [], False
    if info["task"] == "lm":
        return [model["context"]], True
    shaping = (layer["type"] for layer in model["layers"] if layer["type"] not in (*SHAPELESS_LAYERS, "dropout"))
    first = next(shaping, None)
    if first in ("conv2d", "maxpool", "avgpool") and info.get("image_shape"):
        return list(info["image_shape"]), False
    return [info["num_features"]], False


def sequential_shapes(model: dict[str, Any], info: dict[str, Any] | None) -> list[tuple[list[int], int]]:
    """Each layer's output shape (per sample) and parameter count; raises InvalidField where they break.

    With unknown data (``info`` None) shapes are not tracked and only sizes that need no input are counted.
    """
    shape, tokens = sequential_input(model, info)
    known, vocab = info is not None, (info or {}).get("vocab_size") or 0
    results: list[tuple[list[int], int]] = []
    for index, layer in enumerate(model["layers"]):
        kind, params = layer["type"], 0
        if known and tokens and kind != "embedding":
            raise _layer_error(index, f"{kind} cannot take token ids: start a text model with an embedding layer")
        if kind == "embedding":
            if known and not tokens:
                raise _layer_error(index, "embedding needs token ids, which only text datasets give")
            if layer["num_embeddings"] < vocab:
                raise _layer_error(index, f"num_embeddings must cover the vocabulary ({vocab})", "num_embeddings")
            params, shape, tokens = layer["num_embeddings"] * layer["dim"], [*shape, layer["dim"]], False
        elif kind == "linear":
            if known and len(shape) not in (1, 2):
                raise _layer_error(index, f"linear needs flat input but gets shape {tuple(shape)}: "
                                          "add a flatten layer first")
            inputs = shape[-1] if known else 0
            params = inputs * layer["out"] + (layer["out"] if layer["bias"] else 0)
            shape = [*shape[:-1], layer["out"]]
        elif kind in ("conv2d", "maxpool", "avgpool"):
            if known and len(shape) != 3:
                raise _layer_error(index, f"{kind} needs image-shaped input (channels, height, width) "
                                          f"but gets {tuple(shape)}")
            channels = layer.get("out_channels", shape[0] if known else 0)
            if kind == "conv2d":
                params = (shape[0] if known else 0) * channels * layer["kernel_size"] ** 2 + channels
            if known:
                padding = layer.get("padding", 0)
                sides = [(size + 2 * padding - layer["kernel_size"]) // layer["stride"] + 1 for size in shape[1:]]
                if min(sides) < 1:
                    raise _layer_error(index, f"kernel_size {layer['kernel_size']} is too large for the "
                                              f"{shape[1]}x{shape[2]} input", "kernel_size")
                shape = [channels, *sides]
        elif kind == "flatten":
            shape = [math.prod(shape)] if known else []
        elif kind in ("layernorm", "rmsnorm"):
            params = (2 if kind == "layernorm" else 1) * (shape[-1] if known and shape else 0)
        results.append((list(shape), params))
    if info is not None:
        _check_sequential_output(model, info, shape)
    return results


def _layer_error(index: int, message: str, field: str = "type") -> InvalidField:
    return InvalidField(message, field=f"model.layers.{index}.{field}")


def _check_sequential_output(model: dict[str, Any], info: dict[str, Any], shape: list[int]) -> None:
    last = f"model.layers.{len(model['layers']) - 1}"
    if info["task"] == "lm":
        wanted = [model["context"], info["vocab_size"]]
    elif info["task"] == "classification":
        wanted = [info["num_classes"]]
    else:
        wanted = [info["target_dim"]]
    if shape != wanted:
        raise InvalidField(f"the last layer gives shape {tuple(shape)} per sample but the dataset needs "
                           f"{tuple(wanted)}", field=last)



def output_size(info: dict[str, Any]) -> int:
    """How many outputs per sample a task needs: classes, regression targets or vocabulary (the head's width)."""
    size = {"classification": info.get("num_classes"), "regression": info.get("target_dim"),
            "lm": info.get("vocab_size")}[info["task"]]
    return int(size or 1)


def expected_state_shapes(spec: dict[str, Any], info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The names and shapes of ``build_model(spec, info).state_dict()``, in its order, without torch.

    The same with torch or Triton modules (they share parameter names), and these models register no
    buffers, so this is also ``named_parameters()``. Raises ``InvalidField`` where the model cannot fit
    data of shape ``info`` (a data_info record of ``shared.jobspec``).
    """
    model = spec["model"]
    check_model_fits(model, info)
    shapes: dict[str, tuple[int, ...]] = {}
    if model["type"] == "mlp":
        _dense_stack(shapes, model, [info["num_features"], *model["hidden"]], output_size(info))
    elif model["type"] == "cnn":
        _cnn_state(shapes, model, info)
    elif model["type"] == "transformer":
        _transformer_state(shapes, model, info["vocab_size"])
    else:
        _sequential_state(shapes, model, info)
    return shapes


def expected_parameter_shapes(spec: dict[str, Any], info: dict[str, Any]) -> list[tuple[int, ...]]:
    """The shapes of the optimizer's parameters in its order: its state index ``i`` is parameter ``i``."""
    shapes = expected_state_shapes(spec, info)  # no buffers: the state is the parameters
    return [shapes[name] for name in optimizer_order(spec, shapes)]


def decayed_parameters(spec: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """The parameters weight decay applies to. ``training.weight_decay_on`` "matrices" (the default, as
    common practice has it): the weights of linear and conv layers, not biases, norm gains or embedding
    tables, which decay would pull toward zero for no gain in generalization; "all": every parameter."""
    if spec["training"].get("weight_decay_on", "matrices") == "all":
        return set(shapes)
    model = spec["model"]
    embeddings = {"token_embedding.weight", "position_embedding.weight"} if model["type"] == "transformer" else {
        f"layers.{index}.weight" for index, layer in enumerate(model.get("layers", []))
        if layer["type"] == "embedding"}
    return {name for name, shape in shapes.items() if len(shape) >= 2 and name not in embeddings}


def parameter_groups(spec: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """The optimizer's two parameter groups, each in the model's order: with weight decay, then without."""
    decayed = decayed_parameters(spec, shapes)
    return [name for name in shapes if name in decayed], [name for name in shapes if name not in decayed]


def optimizer_order(spec: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Parameter names in the optimizer's order (:func:`parameter_groups`, one after the other), so
    checkpoints of the node and the gateway's check agree on what index ``i`` is."""
    decayed, rest = parameter_groups(spec, shapes)
    return decayed + rest


def _linear_state(shapes: dict[str, tuple[int, ...]], prefix: str, inputs: int, outputs: int,
                  bias: bool = True) -> None:
    shapes[f"{prefix}.weight"] = (outputs, inputs)
    if bias:
        shapes[f"{prefix}.bias"] = (outputs,)


def _norm_state(shapes: dict[str, tuple[int, ...]], prefix: str, kind: str, dim: int) -> None:
    if kind != "none":
        shapes[f"{prefix}.weight"] = (dim,)
    if kind == "layernorm":
        shapes[f"{prefix}.bias"] = (dim,)


def _dense_stack(shapes: dict[str, tuple[int, ...]], model: dict[str, Any], widths: list[int], outputs: int) -> None:
    # models.DenseBlock: linear, activation, norm, dropout; then the head
    for index, (inputs, width) in enumerate(itertools.pairwise(widths)):
        _linear_state(shapes, f"blocks.{index}.linear", inputs, width)
        _norm_state(shapes, f"blocks.{index}.norm", model.get("norm", "none"), width)
    _linear_state(shapes, "head", widths[-1], outputs)


def _cnn_state(shapes: dict[str, tuple[int, ...]], model: dict[str, Any], info: dict[str, Any]) -> None:
    channels, height, width = info["image_shape"]
    stage_length = 3 if model["pool"] else 2  # conv, activation (, max pool) in one nn.Sequential
    kernel = model["kernel_size"]
    for stage, out_channels in enumerate(model["channels"]):
        shapes[f"features.{stage * stage_length}.weight"] = (out_channels, channels, kernel, kernel)
        shapes[f"features.{stage * stage_length}.bias"] = (out_channels,)
        if model["pool"]:
            height, width = height // 2, width // 2
        channels = out_channels
    _dense_stack(shapes, model, [channels * height * width, *model["hidden"]], output_size(info))


def _transformer_state(shapes: dict[str, tuple[int, ...]], model: dict[str, Any], vocab_size: int) -> None:
    d_model, d_ff, norm = model["d_model"], model["d_ff"], model["norm"]
    shapes["token_embedding.weight"] = (vocab_size, d_model)
    shapes["position_embedding.weight"] = (model["context"], d_model)
    for index in range(model["n_layers"]):
        block = f"blocks.{index}"
        _norm_state(shapes, f"{block}.norm1", norm, d_model)
        _linear_state(shapes, f"{block}.attention.qkv", d_model, 3 * d_model)
        _linear_state(shapes, f"{block}.attention.proj", d_model, d_model)
        _norm_state(shapes, f"{block}.norm2", norm, d_model)
        _linear_state(shapes, f"{block}.feed_forward.fc1", d_model, d_ff)
        _linear_state(shapes, f"{block}.feed_forward.fc2", d_ff, d_model)
    _norm_state(shapes, "final_norm", norm, d_model)
    _linear_state(shapes, "head", d_model, vocab_size, bias=False)  # untied from the embedding


def _sequential_state(shapes: dict[str, tuple[int, ...]], model: dict[str, Any], info: dict[str, Any]) -> None:
    first, _ = sequential_input(model, info)
    inputs = [first, *(shape for shape, _ in sequential_shapes(model, info))]  # each layer's input shape
    for index, layer in enumerate(model["layers"]):
        kind, shape, prefix = layer["type"], inputs[index], f"layers.{index}"
        if kind == "linear":
            _linear_state(shapes, prefix, shape[-1], layer["out"], layer["bias"])
        elif kind == "conv2d":
            size = layer["kernel_size"]
            shapes[f"{prefix}.weight"] = (layer["out_channels"], shape[0], size, size)
            shapes[f"{prefix}.bias"] = (layer["out_channels"],)
        elif kind in ("layernorm", "rmsnorm"):
            _norm_state(shapes, prefix, kind, shape[-1])
        elif kind == "embedding":
            shapes[f"{prefix}.weight"] = (layer["num_embeddings"], layer["dim"])
