"""Training step of a small decoder-only transformer: kernels vs torch eager vs torch.compile."""

from collections.abc import Callable, Iterator

import torch

import kernels
from kernels.benchmarks.decoder import Decoder, DecoderConfig
from kernels.benchmarks.harness import Case, Settings, Variant, compiled, tensor_bytes

CONFIG, BATCH = DecoderConfig(), 8  # ~170M parameters, 8k tokens a step, bf16
SMOKE_CONFIG, SMOKE_BATCH = DecoderConfig(vocab=96, width=32, layers=1, heads=2, seq_len=16), 2


def _training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
                   targets: torch.Tensor, forward: Callable[..., torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward(tokens, targets).backward()
        optimizer.step()

    return step


def cases(settings: Settings) -> Iterator[Case]:
    config, batch = (SMOKE_CONFIG, SMOKE_BATCH) if settings.smoke else (CONFIG, BATCH)
    dtype = torch.float32 if settings.smoke else torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab, (batch, config.seq_len), generator=generator).to(settings.device)
    targets = torch.roll(tokens, -1, dims=1)
    torch.manual_seed(0)
    reference = Decoder(config, use_kernels=False).to(settings.device, dtype)
    variants = []
    for name in ("triton", "eager", "compile"):
        model = Decoder(config, use_kernels=name == "triton").to(settings.device, dtype)
        model.load_state_dict(reference.state_dict())  # same names, same starting weights
        optimizer_cls = kernels.AdamW if name == "triton" else torch.optim.AdamW
        optimizer = optimizer_cls(model.parameters(), lr=3e-4, weight_decay=0.1)
        forward = compiled(model, settings) if name == "compile" else model
        # Parameters and both AdamW moments exist before a step; gradients and activations do not.
        resident = 3 * tensor_bytes(*model.parameters())
        variants.append(Variant(name, _training_step(model, optimizer, tokens, targets, forward), resident))
    params = sum(p.numel() for p in reference.parameters())
    del reference
    yield Case(
        "transformer_step", f"{params / 1e6:.0f}M params, {batch}x{config.seq_len} tokens, "
        f"{str(dtype).removeprefix('torch.')}", variants, samples=batch,
        notes="kernels: LayerNorm, LinearAct(gelu) MLP up-projection, in-place cross-entropy, AdamW; "
              "attention is SDPA everywhere; peak_mb = parameters + AdamW moments + the step's own peak",
    )
