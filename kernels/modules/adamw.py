"""``AdamW``: torch.optim.AdamW's semantics, state layout and defaults, stepped by one Triton launch
per bucket (parameters of a group sharing device, dtype and step count; usually the whole group).
"""

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kernels.ops.adamw import (
    AdamWHyper,
    AdamWTables,
    build_tables,
    fused_adamw_,
    kernel_can_address,
    torch_adamw_,
)
from kernels.runtime import use_triton

_TABLE_CACHE_SIZE = 16  # buckets whose address tables we keep; a few per group in practice


class AdamW(torch.optim.Optimizer):
    """Drop-in ``torch.optim.AdamW`` (decoupled weight decay) with a fused multi-tensor step.

    State per parameter is torch's: ``step`` (a CPU float32 scalar tensor), ``exp_avg`` and
    ``exp_avg_sq`` (like the parameter), so ``state_dict()`` checkpoints load into either
    optimizer. ``amsgrad`` is not implemented and is rejected. Where :func:`kernels.use_triton` is
    False for a parameter's device, the same update runs as torch ops.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False) -> None:
        if amsgrad:
            raise ValueError("kernels.AdamW does not implement amsgrad; use torch.optim.AdamW for it")
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=maximize)
        super().__init__(params, defaults)
        self._tables: OrderedDict[tuple, AdamWTables] = OrderedDict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._tables = OrderedDict()
        for group in self.param_groups:
            group.setdefault("maximize", False)
            if group.get("amsgrad", False):
                raise ValueError("kernels.AdamW does not implement amsgrad")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, refusing amsgrad groups (their extra state would be silently ignored)."""
        if any(group.get("amsgrad", False) for group in state_dict["param_groups"]):
            raise ValueError("kernels.AdamW does not implement amsgrad; this state dict uses it")
        super().load_state_dict(state_dict)

    def _state_for(self, param: torch.Tensor) -> dict[str, Any]:
        state = self.state[param]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        elif state["step"].device.type != "cpu":
            # A checkpoint from torch's fused/capturable AdamW keeps step on the device; reading it
            # every step would sync, so keep it on the host like torch's default path does.
            state["step"] = state["step"].detach().to("cpu", torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        buckets: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
        steps = []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self._state_for(param)
            steps.append(state["step"])
            members = (param, param.grad, state["exp_avg"], state["exp_avg_sq"])
            key = (param.device, param.dtype, param.grad.dtype, float(state["step"]) + 1.0)
            buckets.setdefault(key, []).append(members)
        if steps:
            torch._foreach_add_(steps, 1.0)
        for (device, dtype, _, step), members in buckets.items():
            hyper = AdamWHyper(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                               weight_decay=float(group["weight_decay"]), step=step,
                               maximize=bool(group["maximize"]))
            fused = []
            for m in members:
                if use_triton(device) and kernel_can_address(list(m), dtype):
                    fused.append(m)
                else:
                    torch_adamw_(*m, hyper=hyper)
            if fused:
                params, grads, exp_avgs, exp_avg_sqs = (list(column) for column in zip(*fused, strict=True))
                fused_adamw_(params, grads, self._tables_for(params, grads, exp_avgs, exp_avg_sqs), hyper)

    def _tables_for(self, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                    exp_avg_sqs: list[torch.Tensor]) -> AdamWTables:
        key = tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel())
                    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True))
        tables = self._tables.get(key)
        if tables is None:
            tables = build_tables(params, grads, exp_avgs, exp_avg_sqs)
            self._tables[key] = tables
            if len(self._tables) > _TABLE_CACHE_SIZE:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return tables
