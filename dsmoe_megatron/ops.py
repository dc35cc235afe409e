"""The MoE hot path as a few ops: permute, grouped GEMM, unpermute.

Shapes: T tokens, k experts per token, E experts, H hidden, W width.
``permute`` sorts the T*k (token, expert) pairs by expert so each expert's rows are contiguous;
``grouped_gemm`` multiplies every expert's rows by that expert's weight; ``unpermute`` puts the
rows back and sums each token's k outputs weighted by its gates. Nothing is dropped.
"""

from __future__ import annotations

import torch


def permute(x: torch.Tensor, expert_idx: torch.Tensor, num_experts: int):
    """x [T, H], expert_idx [T, k] -> rows [T*k, H] grouped by expert, the order, counts [E]."""
    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    return x[order // k], order, tokens_per_expert


def unpermute(rows: torch.Tensor, order: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """rows [T*k, H] in expert order, gates [T, k] -> sum_k gate * row, [T, H] (in rows' dtype)."""
    num_tokens, k = gates.shape
    in_token_order = rows.new_zeros(rows.shape).index_copy(0, order, rows)
    weighted = in_token_order.view(num_tokens, k, -1).float() * gates.unsqueeze(-1).float()
    return weighted.sum(1).to(rows.dtype)


def _aligned(n: int, dtype: torch.dtype) -> int:
    # torch._grouped_mm needs 16-byte aligned strides.
    step = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-n // step) * step


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's backward rejects expanded (stride-0) gradients, e.g. from .sum().
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def grouped_mm(rows: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor):
    """rows [M, K] grouped by expert, weight [E, N, K] -> [M, N] with torch._grouped_mm.

    Pads K and N with zeros when they break the 16-byte stride rule.
    """
    _, n, k = weight.shape
    k_pad, n_pad = _aligned(k, rows.dtype) - k, _aligned(n, rows.dtype) - n
    if k_pad or n_pad:
        rows = torch.nn.functional.pad(rows, (0, k_pad))
        weight = torch.nn.functional.pad(weight, (0, k_pad, 0, n_pad))
    offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    out = torch._grouped_mm(rows, weight.transpose(-2, -1), offs=offsets)
    out = _contiguous_grad(out)
    return out[:, :n] if n_pad else out


def sequential_mm(rows: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor):
    """The reference: one matmul per expert (needs the counts on the host)."""
    chunks = torch.split(rows, tokens_per_expert.tolist())
    return torch.cat([chunk @ w.t() for chunk, w in zip(chunks, weight)], dim=0)


GEMMS = {"grouped_mm": grouped_mm, "sequential": sequential_mm}
