"""Building blocks that come either from torch or from our Triton ``kernels`` package.

Both choices give the same parameter names at the same module paths (a ``linear`` holds
``weight`` and ``bias`` whichever class it is; an activation fused into ``kernels.LinearAct``
leaves a parameterless ``Identity`` where the torch activation would sit), so weights trained
with one load into the other. ``kernels`` is imported only when asked for, so a torch-only run
never imports ``kernels`` or Triton.
"""

from __future__ import annotations

import importlib
import logging
import math
from types import ModuleType
from typing import Any

import torch
from torch import nn

from node_runtime.training.context import JobError
from shared.model_shapes import parameter_groups

log = logging.getLogger(__name__)

FUSABLE_ACTIVATIONS = ("relu", "gelu", "silu")  # the activations kernels.LinearAct computes in its epilogue
_TORCH_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                                                   "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def use_triton_kernels(choice: str, device: torch.device) -> bool:
    """Resolve ``training.kernels``: "auto" means our kernels on CUDA and torch elsewhere."""
    if choice == "torch":
        return False
    if choice == "triton":
        triton_kernels()  # fail now, with the reason, rather than halfway through building the model
        return True
    if device.type != "cuda":
        return False
    try:
        triton_kernels()
    except JobError as error:
        log.warning("falling back to torch modules: %s", error)
        return False
    return True


def triton_kernels() -> ModuleType:
    """Import the ``kernels`` package, turning an import failure into a clear JobError."""
    try:
        return importlib.import_module("kernels")
    except Exception as error:  # ImportError, or Triton failing to initialise without a GPU
        raise JobError(f"training.kernels='triton' needs the Triton kernels package, which cannot be "
                       f"loaded here ({type(error).__name__}: {error}); use kernels 'auto' or 'torch'") from error


def activation(name: str) -> nn.Module:
    """A parameterless torch activation module."""
    return _TORCH_ACTIVATIONS[name]()


def linear(in_features: int, out_features: int, *, bias: bool = True, act: str = "none",
           use_kernels: bool = False) -> tuple[nn.Module, nn.Module]:
    """A linear layer and the activation that follows it, as (linear, activation) modules.

    With kernels, relu/gelu/silu are fused into ``LinearAct`` and the activation slot is an Identity.
    """
    if use_kernels:
        fused = act if act in FUSABLE_ACTIVATIONS else "none"
        layer = triton_kernels().LinearAct(in_features, out_features, bias=bias, activation=fused)
        return layer, nn.Identity() if act in ("none", fused) else activation(act)
    return nn.Linear(in_features, out_features, bias=bias), nn.Identity() if act == "none" else activation(act)


def norm(kind: str, dim: int, *, use_kernels: bool = False, eps: float = 1e-5) -> nn.Module:
    """A layernorm/rmsnorm over the last dimension (Identity for "none")."""
    if kind == "none":
        return nn.Identity()
    if use_kernels:
        kernels = triton_kernels()
        module: nn.Module = kernels.LayerNorm(dim, eps) if kind == "layernorm" else kernels.RMSNorm(dim, eps)
        return module
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)


def is_linear(module: nn.Module) -> bool:
    """Whether a module is a linear layer of either kind (it maps the last dimension)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "LinearAct"


def cross_entropy(use_kernels: bool) -> nn.Module:
    """Mean cross-entropy over (N, C) logits and (N,) targets."""
    if use_kernels:
        loss: nn.Module = triton_kernels().CrossEntropyLoss(ignore_index=-100, reduction="mean")
        return loss
    return nn.CrossEntropyLoss()


def make_optimizer(model: nn.Module, spec: dict[str, Any], use_kernels: bool) -> torch.optim.Optimizer:
    """The optimizer ``training.optimizer`` names, with the spec's hyperparameters.

    Two parameter groups (``shared.model_shapes.parameter_groups``): the parameters
    ``training.weight_decay_on`` selects get ``weight_decay``, the rest none; the gateway checks
    checkpoints in this order.
    """
    training = spec["training"]
    lr, decay, betas = training["learning_rate"], training["weight_decay"], tuple(training["betas"])
    named = dict(model.named_parameters())
    decayed, rest = parameter_groups(spec, {name: tuple(parameter.shape) for name, parameter in named.items()})
    groups = [{"params": [named[name] for name in names], "weight_decay": group_decay}
              for names, group_decay in ((decayed, decay), (rest, 0.0)) if names]
    name = training["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=training["momentum"])
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas)
    if use_kernels:
        optimizer: torch.optim.Optimizer = triton_kernels().AdamW(groups, lr=lr, betas=betas, eps=1e-8)
        return optimizer
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def initialize_parameters(model: nn.Module, seed: int, *, weight_std: float | None = None) -> None:
    """Draw every parameter from a generator seeded by the job, whatever classes built the model.

    Kernel and torch modules may initialise (and consume the global RNG) differently; drawing again
    here makes the starting weights a pure function of the seed in both modes. Matrices and conv
    filters get torch's default uniform(+-1/sqrt(fan_in)) or, given ``weight_std``, normal(0, std);
    biases follow their weight; norm scales start at one; embeddings at normal(0, weight_std or 1).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
            if weight is None:
                continue
            if isinstance(module, nn.Embedding):
                weight.normal_(0.0, weight_std or 1.0, generator=generator)
            elif weight.ndim >= 2:
                bound = 1.0 / math.sqrt(max(1, math.prod(weight.shape[1:])))
                if weight_std is None:
                    weight.uniform_(-bound, bound, generator=generator)
                else:
                    weight.normal_(0.0, weight_std, generator=generator)
                if bias is not None:
                    bias.uniform_(-bound, bound, generator=generator) if weight_std is None else bias.zero_()
            else:
                weight.fill_(1.0)
                if bias is not None:
                    bias.zero_()
