"""Models built from a normalized job spec: mlp, cnn, transformer and sequential.

Every model takes a batch of samples as the dataset stores them (flat features, images or token
ids) and returns logits (classification, language modelling) or predictions (regression).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from node_runtime.training import layers
from node_runtime.training.context import JobError
from node_runtime.training.transformer import DecoderLM
from shared.errors import InvalidField
from shared.model_shapes import check_model_fits, sequential_input, sequential_shapes


def output_size(info: dict[str, Any]) -> int:
    """How many outputs per sample the task needs: classes, regression targets or vocabulary."""
    size = {"classification": info.get("num_classes"), "regression": info.get("target_dim"),
            "lm": info.get("vocab_size")}[info["task"]]
    return int(size or 1)


def build_model(spec: dict[str, Any], data_info: dict[str, Any], *, use_kernels: bool = False) -> nn.Module:
    """The model ``spec["model"]`` describes, sized for data of shape ``data_info``, initialised from the seed.

    ``data_info`` is the record of ``shared.jobspec.data_info`` (the loaded dataset's shapes).
    ``use_kernels`` swaps in our Triton modules; parameter names are the same either way.
    Raises ``JobError`` when the model cannot fit the data.
    """
    model = spec["model"]
    try:
        check_model_fits(model, data_info)
    except InvalidField as error:
        raise JobError(f"{error.field}: {error.message}") from error
    kind = model["type"]
    network: nn.Module
    if kind == "mlp":
        network = MLP(model, data_info, use_kernels)
    elif kind == "cnn":
        network = CNN(model, data_info, use_kernels)
    elif kind == "transformer":
        network = DecoderLM(model, data_info["vocab_size"], use_kernels)
    else:
        network = SequentialModel(model, data_info, use_kernels)
    # GPT-style small init trains the transformer much faster; the rest keep torch's default scheme
    layers.initialize_parameters(network, spec["training"]["seed"], weight_std=0.02 if kind == "transformer" else None)
    return network


class DenseBlock(nn.Module):
    """linear -> activation -> norm -> dropout; activation right after linear so kernels can fuse it."""

    def __init__(self, in_features: int, out_features: int, model: dict[str, Any], use_kernels: bool) -> None:
        super().__init__()
        self.linear, self.activation = layers.linear(in_features, out_features, act=model["activation"],
                                                     use_kernels=use_kernels)
        self.norm = layers.norm(model.get("norm", "none"), out_features, use_kernels=use_kernels)
        self.dropout = nn.Dropout(model["dropout"]) if model["dropout"] > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.dropout(self.norm(self.activation(self.linear(x))))
        return out


class MLP(nn.Module):
    """Fully connected classifier/regressor over the flattened sample."""

    def __init__(self, model: dict[str, Any], info: dict[str, Any], use_kernels: bool) -> None:
        super().__init__()
        widths = [info["num_features"], *model["hidden"]]
        self.blocks = nn.Sequential(*(DenseBlock(a, b, model, use_kernels) for a, b in itertools.pairwise(widths)))
        self.head, _ = layers.linear(widths[-1], output_size(info), use_kernels=use_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(x.flatten(1)))
        return out


class CNN(nn.Module):
    """Same-padded conv -> activation (-> 2x2 max pool) stages, then dense layers on the flattened maps."""

    def __init__(self, model: dict[str, Any], info: dict[str, Any], use_kernels: bool) -> None:
        super().__init__()
        self.image_shape = tuple(info["image_shape"])
        channels, height, width = self.image_shape
        stages: list[nn.Module] = []
        for out_channels in model["channels"]:
            stages += [nn.Conv2d(channels, out_channels, model["kernel_size"], padding="same"),
                       layers.activation(model["activation"])]
            if model["pool"]:
                stages.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            channels = out_channels
        self.features = nn.Sequential(*stages)
        widths = [channels * height * width, *model["hidden"]]
        self.blocks = nn.Sequential(*(DenseBlock(a, b, model, use_kernels) for a, b in itertools.pairwise(widths)))
        self.head, _ = layers.linear(widths[-1], output_size(info), use_kernels=use_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x.reshape(x.shape[0], *self.image_shape))
        out: torch.Tensor = self.head(self.blocks(maps.flatten(1)))
        return out


class SequentialModel(nn.Module):
    """The spec's explicit layer list, in order, as ``layers.<index>`` modules."""

    def __init__(self, model: dict[str, Any], info: dict[str, Any], use_kernels: bool) -> None:
        super().__init__()
        self.input_shape, self.takes_tokens = sequential_input(model, info)
        shapes = [(self.input_shape, 0), *sequential_shapes(model, info)]
        specs = model["layers"]
        modules: list[nn.Module] = []
        for index, layer in enumerate(specs):
            input_shape = shapes[index][0]
            following = specs[index + 1]["type"] if index + 1 < len(specs) else None
            fused = use_kernels and layer["type"] in layers.FUSABLE_ACTIVATIONS
            if fused and modules and layers.is_linear(modules[-1]):
                modules.append(nn.Identity())  # fused into the LinearAct just before
                continue
            modules.append(_layer_module(layer, input_shape, following, use_kernels))
        self.layers = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        for module in self.layers:
            if layers.is_linear(module) and x.dim() > 2:
                x = module(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)  # kernels take 2-D input
            else:
                x = module(x)
        return x


def _layer_module(layer: dict[str, Any], input_shape: list[int], following: str | None,
                  use_kernels: bool) -> nn.Module:
    kind = layer["type"]
    if kind == "linear":
        # fuse the activation that follows (its own slot then holds an Identity)
        act = following if use_kernels and following in layers.FUSABLE_ACTIVATIONS else "none"
        return layers.linear(input_shape[-1], layer["out"], bias=layer["bias"], act=act, use_kernels=use_kernels)[0]
    if kind == "conv2d":
        return nn.Conv2d(input_shape[0], layer["out_channels"], layer["kernel_size"], stride=layer["stride"],
                         padding=layer["padding"])
    if kind == "maxpool":
        return nn.MaxPool2d(layer["kernel_size"], stride=layer["stride"])
    if kind == "avgpool":
        return nn.AvgPool2d(layer["kernel_size"], stride=layer["stride"])
    if kind == "flatten":
        return nn.Flatten(1)
    if kind == "dropout":
        return nn.Dropout(layer["p"])
    if kind in ("layernorm", "rmsnorm"):
        return layers.norm(kind, input_shape[-1], use_kernels=use_kernels)
    if kind == "embedding":
        return nn.Embedding(layer["num_embeddings"], layer["dim"])
    return layers.activation(kind)
