"""Top-k softmax router with DeepSeekMoE's expert-level and device-level balance losses.

For N' routed experts, K' chosen per token and T tokens (one sequence, or the whole micro-batch):

    f_i  = N' / (K' T) * #tokens choosing expert i        P_i  = mean_t s_{i,t}
    L_exp = a1 * sum_i f_i P_i
    f'_d = mean_{i in group d} f_i                         P'_d = sum_{i in group d} P_i
    L_dev = a2 * sum_d f'_d P'_d

with experts split into D contiguous groups (by default one group per EP rank). Per-sequence
statistics average the loss over the sequences of the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.tensor_parallel.random import get_data_parallel_rng_tracker_name
from megatron.core.transformer.moe.moe_utils import get_moe_metrics_tracker, router_gating_linear

from dsmoe_megatron.config import DeepSeekMoEConfig
from dsmoe_megatron.experts import init_device, rng_stream


@dataclass
class Routing:
    probs: torch.Tensor  # [T, N] softmax over all routed experts (fp32)
    expert_idx: torch.Tensor  # [T, k]
    gates: torch.Tensor  # [T, k] weights of the chosen experts (fp32)
    aux_loss: torch.Tensor  # scalar: L_exp + L_dev (0 when both coefficients are 0)


def balance_losses(probs: torch.Tensor, expert_idx: torch.Tensor, num_sequences: int,
                   per_sequence: bool, num_groups: int, tp_group=None):
    """(L_exp / a1, L_dev / a2) before their coefficients.

    probs [S*B, N] and expert_idx [S*B, k] in Megatron's sequence-major token order ([S, B]
    flattened). ``tp_group`` is given when the S positions are sharded over it (sequence
    parallelism): counts and probability sums are then reduced over that group first.
    """
    num_experts, k = probs.shape[1], expert_idx.shape[1]
    seq_len = probs.shape[0] // num_sequences
    probs = probs.view(seq_len, num_sequences, num_experts)
    idx = expert_idx.view(seq_len, num_sequences, k).transpose(0, 1).reshape(num_sequences, -1)
    counts = torch.zeros(num_sequences, num_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
    prob_sums = probs.sum(0)  # [B, N]
    if not per_sequence:
        counts, prob_sums = counts.sum(0, keepdim=True), prob_sums.sum(0, keepdim=True)
    tokens_per_group = seq_len * (1 if per_sequence else num_sequences)
    if tp_group is not None and tp_group.size() > 1:
        torch.distributed.all_reduce(counts, group=tp_group)
        # Forward all-reduce, identity backward: each rank's gradient reaches its own tokens.
        prob_sums = reduce_from_tensor_model_parallel_region(prob_sums, group=tp_group)
        tokens_per_group *= tp_group.size()
    f = counts * (num_experts / (k * tokens_per_group))
    p = prob_sums / tokens_per_group
    expert_loss = (f * p).sum(-1).mean()
    f_dev = f.view(f.shape[0], num_groups, -1).mean(-1)
    p_dev = p.view(p.shape[0], num_groups, -1).sum(-1)
    device_loss = (f_dev * p_dev).sum(-1).mean()
    return expert_loss, device_loss


class TopKRouter(torch.nn.Module):
    def __init__(self, config: DeepSeekMoEConfig, tp_group=None):
        super().__init__()
        self.config = config
        self.tp_group = tp_group
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        self.layer_number: int | None = None
        # Analysis only (dsmoe-analyze): skip each token's p most probable experts.
        self.excluded_top_experts = 0
        self.weight = torch.nn.Parameter(torch.empty(
            self.num_experts, config.hidden_size, dtype=config.params_dtype,
            device=init_device(config),
        ))
        if config.perform_initialization:
            # Replicated on every rank: drawn from the stream all ranks share.
            with rng_stream(get_data_parallel_rng_tracker_name()):
                config.init_method(self.weight)
        # Under SP each TP rank routes its own slice of tokens, so the gradient is partial.
        self.weight.sequence_parallel = config.sequence_parallel

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden: torch.Tensor) -> Routing:
        """hidden [S, B, H] -> Routing over its S*B tokens."""
        cfg = self.config
        x = hidden.reshape(-1, hidden.shape[-1])
        # fp32 logits from the bf16 input, without keeping an fp32 copy of it for backward.
        logits = router_gating_linear(x, self.weight, None, torch.float32)
        probs = torch.softmax(logits, dim=-1)
        ranked = probs
        if self.excluded_top_experts:
            top = torch.topk(probs, self.excluded_top_experts, dim=-1).indices
            ranked = probs.scatter(-1, top, -1.0)  # below every probability: never chosen
        top_probs, expert_idx = torch.topk(ranked, self.topk, dim=-1)
        if cfg.moe_router_pre_softmax:
            gates = top_probs  # DeepSeekMoE: g = s of the chosen experts, not renormalised
        else:
            gates = top_probs / top_probs.sum(-1, keepdim=True)
        aux_loss = self._aux_loss(probs, expert_idx, num_sequences=hidden.shape[1])
        return Routing(probs, expert_idx, gates, aux_loss)

    def _aux_loss(self, probs, expert_idx, num_sequences):
        cfg = self.config
        a1, a2 = cfg.moe_aux_loss_coeff, cfg.moe_device_balance_coeff
        # Skipped without grad: evaluation, and the first pass of a recomputed layer (so the
        # losses are logged once, when the layer is recomputed with grad).
        skip = not self.training or not torch.is_grad_enabled()
        if cfg.moe_router_load_balancing_type == "none" or not (a1 or a2) or skip:
            return probs.new_zeros(())
        sharded = cfg.sequence_parallel and self.tp_group is not None
        expert_loss, device_loss = balance_losses(
            probs, expert_idx, num_sequences,
            per_sequence=cfg.moe_router_load_balancing_type == "seq_aux_loss",
            num_groups=cfg.num_device_groups(),
            tp_group=self.tp_group if sharded else None,
        )
        loss = a1 * expert_loss
        self._log("load_balancing_loss", loss)
        if a2:  # no backward through the device-level terms when a2 = 0
            self._log("device_balance_loss", a2 * device_loss)
            loss = loss + a2 * device_loss
        return loss

    def _log(self, name: str, value: torch.Tensor) -> None:
        if self.layer_number is None:
            return
        get_moe_metrics_tracker().record(
            name, value.detach(), self.layer_number, self.config.num_layers)
