"""A small model trained with every kernel follows the torch model's loss curve."""

import torch
from torch import nn

import kernels


class Classifier(nn.Module):
    """Linear+GELU, LayerNorm, Linear+SiLU, RMSNorm, linear head: each op in its torch or kernel form,
    under the same parameter names so one state dict initialises both."""

    def __init__(self, use_kernels: bool, n_in: int = 24, hidden: int = 40, classes: int = 10) -> None:
        super().__init__()
        self.use_kernels = use_kernels
        if use_kernels:
            self.fc1 = kernels.LinearAct(n_in, hidden, activation="gelu")
            self.norm1 = kernels.LayerNorm(hidden)
            self.fc2 = kernels.LinearAct(hidden, hidden, activation="silu")
            self.norm2 = kernels.RMSNorm(hidden)
            self.head = kernels.LinearAct(hidden, classes, activation="none")
        else:
            self.fc1, self.norm1 = nn.Linear(n_in, hidden), nn.LayerNorm(hidden)
            self.fc2, self.norm2 = nn.Linear(hidden, hidden), nn.RMSNorm(hidden, eps=1e-6)
            self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels:
            return self.head(self.norm2(self.fc2(self.norm1(self.fc1(x)))))
        h = self.norm1(nn.functional.gelu(self.fc1(x)))
        return self.head(self.norm2(nn.functional.silu(self.fc2(h))))


def loss_curve(use_kernels: bool, state: dict[str, torch.Tensor], steps: int = 30) -> list[float]:
    model = Classifier(use_kernels)
    model.load_state_dict(state)
    optim_cls = kernels.AdamW if use_kernels else torch.optim.AdamW
    optimizer = optim_cls(model.parameters(), lr=1e-2, weight_decay=0.01)
    criterion = kernels.CrossEntropyLoss() if use_kernels else nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(24, 10, generator=generator)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 24, generator=generator)
        target = (x @ teacher).argmax(-1)
        optimizer.zero_grad()
        loss = criterion(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_kernel_model_follows_torch_loss_curve() -> None:
    torch.manual_seed(0)
    state = Classifier(use_kernels=False).state_dict()
    ours = loss_curve(True, state)
    theirs = loss_curve(False, state)
    assert sum(theirs[-5:]) / 5 < 0.6 * theirs[0], "the reference did not learn; the test would prove nothing"
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert abs(a - b) <= 1e-3 * max(1.0, b), f"step {step}: kernels {a:.6f} vs torch {b:.6f}"
