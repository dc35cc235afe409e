"""RMSNorm that works with sequence parallelism on any device.

Megatron-core's torch norm refuses sequence parallelism without TE/apex. Under SP each
tensor-parallel rank normalises a different slice of the sequence, so the weight's gradient is
partial: marking it ``sequence_parallel`` makes Megatron's grad finalisation all-reduce it
over the tensor-parallel group.

``layernorm_zero_centered_gamma`` (Megatron-LM's ``--apply-layernorm-1p``) is honoured as
Transformer Engine's norms honour it: the weight starts at 0 and the output is scaled by
``1 + weight``, so the same config builds the same model, and checkpoints load, with or without TE.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = self.weight.float() + 1 if self.zero_centered else self.weight.float()
        return (normed * scale).to(x.dtype)
