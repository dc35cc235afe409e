"""Expert math on rows grouped by expert: grouped GEMMs, the weighted SwiGLU, FP8 row padding.

Shapes: M rows (token copies) grouped by expert, E local experts, H hidden, W expert width.
``tokens_per_expert`` [E] gives each expert's row count, on the device (grouped_mm needs no host
copy) or as a host list where a kernel takes host-side split sizes.
"""

from __future__ import annotations

import torch


def _aligned(n: int, dtype: torch.dtype) -> int:
    # torch._grouped_mm needs 16-byte aligned strides.
    step = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-n // step) * step


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's backward rejects expanded (stride-0) gradients, e.g. from .sum().
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def grouped_mm(rows: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor,
               host_counts: list[int] | None = None) -> torch.Tensor:
    """rows [M, K] grouped by expert, weight [E, N, K] -> [M, N] with torch._grouped_mm.

    Pads K and N with zeros when they break the 16-byte stride rule. No host sync where torch
    has a grouped kernel (``backends.grouped_mm_available``).
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


def sequential_mm(rows: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor,
                  host_counts: list[int] | None = None) -> torch.Tensor:
    """The reference: one matmul per expert (needs the counts on the host)."""
    chunks = torch.split(rows, host_counts)
    return torch.cat([chunk @ w.t() for chunk, w in zip(chunks, weight)], dim=0)


GEMMS = {"grouped_mm": grouped_mm, "sequential": sequential_mm}
NEEDS_HOST_COUNTS = {"grouped_mm": False, "sequential": True, "te": True}


class WeightedSwiGLU(torch.autograd.Function):
    """silu(gate) * up * prob per row, fc1 = [gate | up]; keeps only fc1's output and the probs.

    The math and memory of Megatron-core's weighted SwiGLU fusion (used instead when
    ``bias_activation_fusion`` is on, i.e. on a GPU), in plain torch for every device: computed
    in fc1's dtype, the product with the (fp32) probs in fp32, returned in fc1's dtype.
    """

    @staticmethod
    def forward(ctx, fc1: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(fc1, probs)
        gate, up = fc1.chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate).mul_(up)
        return act.mul_(probs.unsqueeze(-1))  # in fp32 (probs' dtype), stored in fc1's

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        fc1, probs = ctx.saved_tensors
        gate, up = fc1.chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate)
        grad_product = (grad * probs.unsqueeze(-1)).to(fc1.dtype)  # d loss / d (silu * up)
        # Both halves written in place into one [M, 2W] gradient (no concatenation).
        grad_fc1 = torch.empty_like(fc1)
        grad_gate, grad_up = grad_fc1.chunk(2, dim=-1)
        torch.mul(grad_product, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_product * up, gate, grad_input=grad_gate)
        grad_probs = (grad.to(probs.dtype) * act.mul_(up)).sum(-1)
        return grad_fc1, grad_probs


def weighted_swiglu(fc1: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """fc1 [M, 2W], probs [M] -> [M, W]."""
    return WeightedSwiGLU.apply(fc1, probs)


def pad_rows(rows: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor,
             host_counts: list[int], multiple: int):
    """Give each expert a multiple of ``multiple`` rows (FP8 GEMMs need 16, MXFP8 32).

    Appends zero rows (prob 0) after each expert's rows. ``counts`` [E] (device) and
    ``host_counts`` are the same counts; the index is built from the device ones, since a tensor
    made from host lists is a copy the host waits for on a GPU. Returns the padded rows and
    probs, the padded counts (device and host), and the index that ``unpad_rows`` takes back.
    """
    padded_host_counts = [-(-c // multiple) * multiple for c in host_counts]
    padded_counts = (counts + multiple - 1) // multiple * multiple
    added = padded_counts - counts
    before = torch.cumsum(added, 0) - added  # padding added before each expert's rows
    moves = torch.repeat_interleave(before, counts, output_size=rows.shape[0])
    index = torch.arange(rows.shape[0], device=rows.device) + moves
    total = sum(padded_host_counts)
    padded_rows = rows.new_zeros(total, rows.shape[1]).index_copy(0, index, rows)
    padded_probs = probs.new_zeros(total).index_copy(0, index, probs)
    return padded_rows, padded_probs, padded_counts, padded_host_counts, index


def unpad_rows(padded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows ``pad_rows`` moved, back in their original order (padding dropped)."""
    return padded[index]
