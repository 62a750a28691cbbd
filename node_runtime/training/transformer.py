"""A small decoder-only (GPT-style, pre-norm) language model over bytes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from node_runtime.training import layers


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier ones."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, use_kernels: bool) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv, _ = layers.linear(d_model, 3 * d_model, use_kernels=use_kernels)
        self.proj, _ = layers.linear(d_model, d_model, use_kernels=use_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        qkv = self.qkv(x.reshape(-1, d_model)).view(batch, length, 3, self.n_heads, d_model // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, length, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)
        projected: torch.Tensor = self.proj(attended.transpose(1, 2).reshape(-1, d_model))
        return projected.view(batch, length, d_model)


class FeedForward(nn.Module):
    """Position-wise MLP; the activation fuses into ``fc1`` when kernels are used."""

    def __init__(self, d_model: int, d_ff: int, act: str, use_kernels: bool) -> None:
        super().__init__()
        self.fc1, self.activation = layers.linear(d_model, d_ff, act=act, use_kernels=use_kernels)
        self.fc2, _ = layers.linear(d_ff, d_model, use_kernels=use_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # kernels take 2-D input; torch does not mind
        out: torch.Tensor = self.fc2(self.activation(self.fc1(flat)))
        return out.view(x.shape)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, model: dict[str, Any], use_kernels: bool) -> None:
        super().__init__()
        d_model = model["d_model"]
        self.norm1 = layers.norm(model["norm"], d_model, use_kernels=use_kernels)
        self.attention = CausalSelfAttention(d_model, model["n_heads"], model["dropout"], use_kernels)
        self.norm2 = layers.norm(model["norm"], d_model, use_kernels=use_kernels)
        self.feed_forward = FeedForward(d_model, model["d_ff"], model["activation"], use_kernels)
        self.dropout = nn.Dropout(model["dropout"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        out: torch.Tensor = x + self.dropout(self.feed_forward(self.norm2(x)))
        return out


class DecoderLM(nn.Module):
    """Token + learned position embeddings, ``n_layers`` blocks, a final norm and an untied head.

    The head is not tied to the embedding so that every tensor is stored once (safetensors refuses
    shared storage) and the parameter count matches ``shared.jobspec`` exactly.
    """

    def __init__(self, model: dict[str, Any], vocab_size: int, use_kernels: bool = False) -> None:
        super().__init__()
        d_model = model["d_model"]
        self.context = model["context"]
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(model["context"], d_model)
        self.blocks = nn.ModuleList(Block(model, use_kernels) for _ in range(model["n_layers"]))
        self.final_norm = layers.norm(model["norm"], d_model, use_kernels=use_kernels)
        self.head, _ = layers.linear(d_model, vocab_size, bias=False, use_kernels=use_kernels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (batch, length, vocab) for token ids (batch, length), length <= context."""
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        logits: torch.Tensor = self.head(x.reshape(batch * length, -1))
        return logits.view(batch, length, -1)
