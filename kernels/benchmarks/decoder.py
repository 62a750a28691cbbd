"""A small decoder-only transformer for the training-step benchmark, in a torch and a kernels form.

Both forms have the same parameters; the kernels form swaps in what this library fuses: LayerNorm,
the MLP up-projection with its GELU (LinearAct), the loss (in place in the LM head's logits, which
nothing reads afterwards), and the optimizer. Attention is torch's SDPA in both.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels


@dataclass(frozen=True)
class DecoderConfig:
    vocab: int = 32768
    width: int = 1024
    layers: int = 8
    heads: int = 16
    seq_len: int = 1024


class Block(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, config: DecoderConfig, use_kernels: bool) -> None:
        super().__init__()
        d = config.width
        norm = kernels.LayerNorm if use_kernels else nn.LayerNorm
        self.heads = config.heads
        self.use_kernels = use_kernels
        self.norm1, self.norm2 = norm(d), norm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up = kernels.LinearAct(d, 4 * d, activation="gelu") if use_kernels else nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, width))
        hidden = self.up(self.norm2(x))
        return x + self.down(hidden if self.use_kernels else F.gelu(hidden))


class Decoder(nn.Module):
    """Token + position embeddings, blocks, final norm, untied LM head; returns the mean loss."""

    def __init__(self, config: DecoderConfig, use_kernels: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.width)
        self.position = nn.Parameter(torch.randn(config.seq_len, config.width) * 0.02)
        self.blocks = nn.ModuleList(Block(config, use_kernels) for _ in range(config.layers))
        self.norm = kernels.LayerNorm(config.width) if use_kernels else nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab, bias=False)
        self.use_kernels = use_kernels

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)).flatten(0, 1)
        if self.use_kernels:
            return kernels.cross_entropy(logits, targets.flatten(), inplace_grad=True)
        return F.cross_entropy(logits, targets.flatten())
