"""Routed experts: dropless expert-parallel dispatch and SwiGLU grouped GEMMs.

Each EP rank holds E/EP experts; each expert's width may be sharded over the expert-tensor-
parallel group. Weights are stored per projection as [local experts, out, in] so one grouped GEMM
serves each projection, and they map one-to-one onto the checkpoint layout:
``gate_proj`` / ``up_proj`` [E, W, H] and ``down_proj`` [E, H, W].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel.mappings import all_to_all
from megatron.core.tensor_parallel.random import (
    get_cuda_rng_tracker,
    get_expert_parallel_rng_tracker_name,
)

from dsmoe_megatron import ops
from dsmoe_megatron.backends import resolve_expert_backend
from dsmoe_megatron.config import ConfigError, DeepSeekMoEConfig

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _group_size(group) -> int:
    return 1 if group is None else group.size()


def _group_rank(group) -> int:
    return 0 if group is None else group.rank()


class ExpertDispatcher:
    """Sends each row to the EP rank that owns its expert and brings the results back.

    Rows arrive sorted by global expert id, so they are already grouped by destination rank.
    The per-expert counts are exchanged first; the split sizes are the one host sync that
    uneven all-to-all needs.
    """

    def __init__(self, ep_group, num_local_experts: int):
        self.ep_group = ep_group
        self.num_local_experts = num_local_experts

    def dispatch(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor):
        ep, e_local = _group_size(self.ep_group), self.num_local_experts
        if ep == 1:
            return rows, tokens_per_expert, None
        received_counts = torch.empty_like(tokens_per_expert)
        torch.distributed.all_to_all_single(received_counts, tokens_per_expert, group=self.ep_group)
        per_rank_send = tokens_per_expert.view(ep, e_local).sum(1)
        per_rank_recv = received_counts.view(ep, e_local).sum(1)
        splits = torch.stack([per_rank_send, per_rank_recv]).cpu()
        send_splits, recv_splits = splits[0].tolist(), splits[1].tolist()
        received = all_to_all(self.ep_group, rows, recv_splits, send_splits)
        # Received rows are ordered [source rank][local expert]; regroup them by local expert.
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(e_local, device=rows.device).repeat(ep), received_counts
        )
        regroup = torch.argsort(local_expert_of_row, stable=True)
        state = (regroup, send_splits, recv_splits)
        return received[regroup], received_counts.view(ep, e_local).sum(0), state

    def combine(self, rows: torch.Tensor, state) -> torch.Tensor:
        if state is None:
            return rows
        regroup, send_splits, recv_splits = state
        by_source = rows.new_zeros(rows.shape).index_copy(0, regroup, rows)
        return all_to_all(self.ep_group, by_source, send_splits, recv_splits)


class RoutedExperts(torch.nn.Module):
    def __init__(self, config: DeepSeekMoEConfig, ep_group=None, expert_tp_group=None,
                 expert_dp_group=None):
        super().__init__()
        self.config = config
        ep = _group_size(ep_group)
        self.num_experts = config.num_moe_experts
        self.num_local_experts = self.num_experts // ep
        self.ep_group, self.expert_tp_group, self.expert_dp_group = (
            ep_group, expert_tp_group, expert_dp_group,
        )
        etp = _group_size(expert_tp_group)
        width = config.moe_ffn_hidden_size // etp
        hidden = config.hidden_size
        self.backend = resolve_expert_backend(config.moe_expert_backend)
        self.shapes = {"gate_proj": (width, hidden), "up_proj": (width, hidden),
                       "down_proj": (hidden, width)}
        self._build_weights()
        self.dispatcher = ExpertDispatcher(ep_group, self.num_local_experts)

    def _build_weights(self) -> None:
        if self.backend not in ops.GEMMS:
            raise ConfigError(
                f"moe_expert_backend={self.backend!r} has no torch implementation; use one of "
                f"{tuple(ops.GEMMS)}, 'te' (with Transformer Engine) or 'auto'"
            )
        self.gemm = ops.GEMMS[self.backend]
        config = self.config
        for name, (out_features, in_features) in self.shapes.items():
            weight = torch.empty(self.num_local_experts, out_features, in_features,
                                 dtype=config.params_dtype, device=init_device(config))
            if config.perform_initialization:
                # On the device, so that the expert-parallel RNG stream (one per EP / expert-TP
                # rank) is the one drawn from: the tracker forks the device's generator only.
                with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                    for expert_weight in weight:
                        _init_method(config, name)(expert_weight)
            param = torch.nn.Parameter(weight)
            mark_expert_parallel(param, name)
            self.register_parameter(name, param)

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor):
        """x [T, H], expert_idx/gates [T, k] -> sum_k gates * expert(x) [T, H] (partial over ETP)."""
        rows, order, tokens_per_expert = ops.permute(x, expert_idx, self.num_experts)
        rows, local_counts, state = self.dispatcher.dispatch(rows, tokens_per_expert)
        rows = self.swiglu(rows, local_counts)
        rows = self.dispatcher.combine(rows, state)
        return ops.unpermute(rows, order, gates), tokens_per_expert

    def swiglu(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        gate = self.gemm(rows, self.gate_proj, tokens_per_expert)
        up = self.gemm(rows, self.up_proj, tokens_per_expert)
        return self.gemm(F.silu(gate) * up, self.down_proj, tokens_per_expert)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        ep_rank, ep = _group_rank(self.ep_group), _group_size(self.ep_group)
        etp_rank, etp = _group_rank(self.expert_tp_group), _group_size(self.expert_tp_group)
        n = len(sharded_offsets)
        out = {}
        for name in PROJECTIONS:
            out[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", getattr(self, name), *sharded_offsets,
                (n, ep_rank, ep), (n + WIDTH_AXIS[name], etp_rank, etp),
                replica_id=(0, 0, _group_rank(self.expert_dp_group)),
                prepend_axis_num=n,
            )
        return out


class TEGroupedExperts(RoutedExperts):
    """Routed experts on Transformer Engine's GroupedLinear: bf16, or FP8 under TE's autocast
    (Megatron's TransformerBlock enters it per layer when ``config.fp8`` is set).

    Each projection is one GroupedLinear holding a [W, H] weight per local expert; the checkpoint
    keys are RoutedExperts', one expert slice each, so checkpoints move between backends.
    """

    def _build_weights(self) -> None:
        import transformer_engine.pytorch as te

        config = self.config
        for name, (out_features, in_features) in self.shapes.items():
            layer = te.GroupedLinear(
                self.num_local_experts, in_features, out_features, bias=False,
                params_dtype=config.params_dtype, device=torch.cuda.current_device(),
                init_method=_init_method(config, name),
                get_rng_state_tracker=get_cuda_rng_tracker,
                rng_tracker_name=get_expert_parallel_rng_tracker_name(),
            )
            for param in layer.parameters():
                mark_expert_parallel(param, name)
            self.add_module(name, layer)

    def swiglu(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        splits = tokens_per_expert.tolist()  # GroupedLinear takes host-side split sizes
        gate = self.gate_proj(rows, splits)
        up = self.up_proj(rows, splits)
        return self.down_proj(F.silu(gate) * up, splits)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        ep_rank = _group_rank(self.ep_group)
        etp_rank, etp = _group_rank(self.expert_tp_group), _group_size(self.expert_tp_group)
        n = len(sharded_offsets)
        out = {}
        for name in PROJECTIONS:
            layer = getattr(self, name)
            for i in range(self.num_local_experts):
                out[f"{prefix}{name}.weight{i}"] = ShardedTensor.from_rank_offsets(
                    f"{prefix}{name}", getattr(layer, f"weight{i}"), *sharded_offsets,
                    (n, ep_rank * self.num_local_experts + i, self.num_experts),
                    (n + WIDTH_AXIS[name], etp_rank, etp),
                    replica_id=(0, 0, _group_rank(self.expert_dp_group)),
                    prepend_axis_num=n + 1,
                )
        return out


WIDTH_AXIS = {"gate_proj": 1, "up_proj": 1, "down_proj": 2}  # axis of the expert width


def init_device(config) -> torch.device:
    """Where Megatron-core allocates weights: the current GPU unless use_cpu_initialization."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def mark_expert_parallel(param: torch.nn.Parameter, name: str) -> None:
    """Megatron's marks for an expert weight (``[E, out, in]``, or one expert's ``[out, in]``)
    sharded over EP and expert TP: DDP reduces it over the expert-data-parallel group
    (allreduce=False), and the grad norm counts it on every rank (tensor_model_parallel), not on
    expert-TP rank 0 only."""
    param.allreduce = False
    param.tensor_model_parallel = True
    param.partition_dim = param.dim() - 3 + WIDTH_AXIS[name]
    param.partition_stride = 1


def _init_method(config, name: str):
    return config.output_layer_init_method if name == "down_proj" else config.init_method


def build_routed_experts(config, **groups) -> RoutedExperts:
    backend = resolve_expert_backend(config.moe_expert_backend)
    return (TEGroupedExperts if backend == "te" else RoutedExperts)(config, **groups)
