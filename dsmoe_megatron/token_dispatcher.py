"""Token dispatch for the routed experts, as a few ops with their memory cost in mind.

    rows, probs, counts, perm = permute(x, expert_idx, gates)     # [T, H] -> [T*k, H] by expert
    rows, probs, local, state = all_to_all.dispatch(rows, probs, counts)    # EP > 1 only
    out = experts(rows, probs, local)                             # fc1 -> weighted SwiGLU -> fc2
    out = all_to_all.combine(out, state)
    y = unpermute(out, perm)                                      # [T*k, H] -> [T, H], sum over k

The gates travel with the rows and are applied inside the SwiGLU, whose input (fc1's output) is
kept for backward anyway; so unpermute is a plain sum and every step here keeps only an index map
([T*k] integers) for backward, never a copy of the rows. The rows themselves are kept once, by
fc1 (its input). Host syncs: none at EP = 1 with grouped_mm; at EP > 1 one, for the all-to-all
split sizes, which also brings the per-expert counts for backends that need them on the host.

Row movement is two gathers, each the other's backward (as in megablocks): ``gather_rows``
copies each token to its k rows, ``sum_rows`` adds each token's k rows in one fused gather-sum
(``embedding_bag``, fp32 accumulation, deterministic). Autograd's own backward of an indexing op
would be a zero fill plus a sorted, accumulating ``index_put`` into it; these never scatter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.mappings import all_to_all


@dataclass
class Permutation:
    """Where each of the T*k (token, slot) pairs went."""

    row_of_slot: torch.Tensor  # [T*k]: the row holding (token t, slot j) at t*k + j
    num_tokens: int
    topk: int
    fused: object = None  # Transformer Engine's row-id map when its fused kernels did the work
    token_of_row: torch.Tensor | None = None  # [T*k]: the token each row copies


def permute(x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, num_experts: int):
    """x [T, H], expert_idx / gates [T, k] -> rows [T*k, H] grouped by expert (tokens in order
    within an expert), their gates [T*k], tokens per expert [E] (device) and the permutation."""
    num_tokens, k = expert_idx.shape
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync on a GPU
    row_of_slot = inverse_permutation(order)
    token_of_row = order // k
    rows = gather_rows(x, token_of_row, row_of_slot.view(num_tokens, k))
    probs = gates.reshape(-1)[order]
    return rows, probs, counts, Permutation(row_of_slot, num_tokens, k, token_of_row=token_of_row)


def unpermute(rows: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """rows [T*k, H] in expert order -> [T, H], each token's k rows summed (gates already in)."""
    if perm.fused is not None:
        return _unpermute_fused(rows, perm)
    return sum_rows(rows, perm.row_of_slot.view(perm.num_tokens, perm.topk), perm.token_of_row)


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``index`` (a scatter, not a second sort)."""
    positions = torch.arange(index.numel(), device=index.device)
    return torch.empty_like(index).scatter_(0, index, positions)


class _GatherRows(torch.autograd.Function):
    """out[r] = x[source[r]]; backward adds each source row's copies (``rows_of_source`` [S, n])."""

    @staticmethod
    def forward(ctx, x, source, rows_of_source):
        ctx.save_for_backward(rows_of_source)
        return x.index_select(0, source)

    @staticmethod
    def backward(ctx, grad):
        (rows_of_source,) = ctx.saved_tensors
        return _gather_sum(grad, rows_of_source), None, None


class _SumRows(torch.autograd.Function):
    """out[s] = sum_j rows[rows_of_source[s, j]]; backward copies each grad to its rows."""

    @staticmethod
    def forward(ctx, rows, rows_of_source, source):
        ctx.save_for_backward(source)
        return _gather_sum(rows, rows_of_source)

    @staticmethod
    def backward(ctx, grad):
        (source,) = ctx.saved_tensors
        return grad.index_select(0, source), None, None


def _gather_sum(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding_bag(index, rows.contiguous(), mode="sum")


def gather_rows(x: torch.Tensor, source: torch.Tensor, rows_of_source: torch.Tensor):
    """x [S, H] -> [R, H] with row r = x[source[r]]; ``rows_of_source`` [S, n] lists the rows
    of each source row (every source row has n copies, every row one source)."""
    return _GatherRows.apply(x, source, rows_of_source)


def sum_rows(rows: torch.Tensor, rows_of_source: torch.Tensor, source: torch.Tensor):
    """The adjoint of ``gather_rows``: rows [R, H] -> [S, H], each source's n rows summed."""
    return _SumRows.apply(rows, rows_of_source, source)


def permute_rows(rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor):
    """rows[index] for a permutation ``index``; backward is the gather by ``inverse``."""
    return gather_rows(rows, index, inverse.view(-1, 1))


def permute_fused(x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor,
                  num_experts: int):
    """``permute`` with Transformer Engine's fused kernels (through Megatron-core); same rows in
    the same order."""
    from megatron.core.transformer.moe.moe_utils import permute as mcore_permute

    num_tokens, k = expert_idx.shape
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=x.device)
    routing_map.scatter_(1, expert_idx, True)
    dense_gates = torch.zeros(num_tokens, num_experts, dtype=gates.dtype, device=gates.device)
    dense_gates = dense_gates.scatter(1, expert_idx, gates)
    rows, probs, row_id_map, _, _ = mcore_permute(
        x, routing_map, probs=dense_gates, num_out_tokens=num_tokens * k, fused=True)
    counts = routing_map.sum(0)
    fused = dict(row_id_map=row_id_map, routing_map=routing_map, shape=x.shape)
    return rows, probs, counts, Permutation(None, num_tokens, k, fused)


def _unpermute_fused(rows: torch.Tensor, perm: Permutation) -> torch.Tensor:
    from megatron.core.transformer.moe.moe_utils import unpermute as mcore_unpermute

    f = perm.fused
    return mcore_unpermute(rows, f["row_id_map"], f["shape"], routing_map=f["routing_map"],
                           fused=True)


@dataclass
class _Exchange:
    send_splits: list[int]
    recv_splits: list[int]
    regroup: torch.Tensor | None  # received order -> by local expert (None: one local expert)
    to_source_order: torch.Tensor | None  # its inverse


class ExpertAllToAll:
    """Sends each row to the EP rank that owns its expert and brings the results back.

    Rows arrive sorted by global expert id, so they are already grouped by destination rank.
    ``host_counts`` asks for the local per-expert counts on the host too (for backends whose
    kernels take host split sizes); they ride on the same single host copy.
    """

    def __init__(self, ep_group, num_local_experts: int, host_counts: bool):
        self.ep_group = ep_group
        self.ep = 1 if ep_group is None else ep_group.size()
        self.num_local_experts = num_local_experts
        self.host_counts = host_counts

    def dispatch(self, rows, probs, tokens_per_expert):
        """-> rows and probs of this rank's experts grouped by local expert, local counts
        (device), local counts (host list or None) and the state ``combine`` needs."""
        if self.ep == 1:
            host = tokens_per_expert.tolist() if self.host_counts else None
            return rows, probs, tokens_per_expert, host, None
        ep, e_local = self.ep, self.num_local_experts
        received_counts = torch.empty_like(tokens_per_expert)
        torch.distributed.all_to_all_single(received_counts, tokens_per_expert, group=self.ep_group)
        by_source = received_counts.view(ep, e_local)
        local_counts = by_source.sum(0)
        wanted = [tokens_per_expert.view(ep, e_local).sum(1), by_source.sum(1)]
        if self.host_counts:
            wanted.append(local_counts)
        host = torch.cat(wanted).tolist()  # the one host sync per layer
        send_splits, recv_splits = host[:ep], host[ep:2 * ep]
        rows = all_to_all(self.ep_group, rows, recv_splits, send_splits)
        probs = all_to_all(self.ep_group, probs, recv_splits, send_splits)
        regroup = to_source_order = None
        if e_local > 1:
            # Received rows are ordered [source rank][local expert]; regroup them by local expert.
            expert_of_row = torch.repeat_interleave(
                torch.arange(e_local, device=rows.device).repeat(ep), received_counts,
                output_size=rows.shape[0])
            regroup = torch.argsort(expert_of_row, stable=True)
            to_source_order = inverse_permutation(regroup)
            rows, probs = permute_rows(rows, regroup, to_source_order), probs[regroup]
        state = _Exchange(send_splits, recv_splits, regroup, to_source_order)
        return rows, probs, local_counts, host[2 * ep:] if self.host_counts else None, state

    def combine(self, rows: torch.Tensor, state: _Exchange | None) -> torch.Tensor:
        if state is None:
            return rows
        if state.to_source_order is not None:
            rows = permute_rows(rows, state.to_source_order, state.regroup)
        return all_to_all(self.ep_group, rows, state.send_splits, state.recv_splits)
