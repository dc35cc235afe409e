"""The DeepSeekMoE block: the MLP of a Megatron-core TransformerLayer.

    y = shared(x) + sum_i g_i * expert_i(x)      (the residual stays in the layer)

Tensor parallelism. The shared experts are Megatron's column/row parallel MLP. The routed
experts either shard their width over the tensor-parallel group (expert TP = TP) or keep whole
experts (expert TP = 1). Tokens are moved into the layout the experts need and back:

=======================  ==============================  ===================================
layout                   into the experts                back
=======================  ==============================  ===================================
TP = 1                   as is                           as is
SP, expert TP = TP       all-gather tokens and gates     reduce-scatter partial sums
SP, expert TP = 1        as is (each rank its slice)     as is
no SP, expert TP = TP    identity fwd / all-reduce bwd   all-reduce partial sums
no SP, expert TP = 1     each rank takes 1/TP of tokens  all-gather
=======================  ==============================  ===================================

The router always sees the tokens the rank holds, so its logits are identical on all TP ranks
for the same token. The balance loss enters the backward through Megatron's
MoEAuxLossAutoScaler, so the pipeline schedules scale it with the number of micro-batches.

Order: router, shared experts, routed path (token_dispatcher.py). With Megatron's
``moe_shared_expert_overlap`` the shared experts run on a side stream while the routed path's
all-to-all is in flight (on CPU the same code runs in order). Selective recompute takes
Megatron's ``recompute_modules`` names: ``moe`` (the whole block), ``shared_experts`` and
``moe_act`` (the expert SwiGLU, experts.py); ``recompute_granularity: full`` is Megatron's
TransformerBlock's own.
"""

from __future__ import annotations

import copy

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from dsmoe_megatron import token_dispatcher
from dsmoe_megatron.config import ConfigError, DeepSeekMoEConfig
from dsmoe_megatron.experts import _group_size, build_routed_experts
from dsmoe_megatron.router import TopKRouter
from dsmoe_megatron.token_dispatcher import ExpertAllToAll


class DeepSeekMoE(MegatronModule):
    def __init__(self, config: DeepSeekMoEConfig, submodules: MLPSubmodules, pg_collection=None,
                 is_mtp_layer: bool = False, name: str | None = None):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pg_collection.tp
        self.tp_size = _group_size(self.tp_group)
        self.expert_tp_size = _group_size(pg_collection.expt_tp)
        if self.expert_tp_size not in (1, self.tp_size):
            raise ConfigError(
                f"expert_tensor_parallel_size={self.expert_tp_size} must be 1 or equal to "
                f"tensor_model_parallel_size={self.tp_size}"
            )
        self.router = TopKRouter(config, tp_group=self.tp_group)
        self.experts = build_routed_experts(config, pg_collection)
        self.all_to_all = ExpertAllToAll(pg_collection.ep, self.experts.num_local_experts,
                                         host_counts=self.experts.needs_host_counts)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size:
            # Megatron's MLP sizes fc2's input from config.ffn_hidden_size, so give it a copy.
            shared_config = copy.copy(config)
            shared_config.ffn_hidden_size = config.moe_shared_expert_intermediate_size
            self.shared_experts = MLP(
                shared_config, submodules,
                ffn_hidden_size=config.moe_shared_expert_intermediate_size, tp_group=self.tp_group,
            )
        selective = config.recompute_modules if config.recompute_granularity == "selective" else ()
        self.recompute_block = "moe" in selective
        self.recompute_shared = "shared_experts" in selective
        # Shared experts on a side stream while the routed path communicates (GPU only).
        self.side_stream = (torch.cuda.Stream() if config.moe_shared_expert_overlap
                            and self.shared_experts is not None else None)
        # Tokens routed to each expert since the last `take_expert_load()` (for logging); an
        # int64 attribute rather than a buffer so bf16 conversion cannot round the counts.
        self.expert_load: torch.Tensor | None = None

    @classmethod
    def as_mlp_submodule(cls, submodules: MLPSubmodules, config, pg_collection, is_mtp_layer,
                         name=None):
        """Megatron-core 0.19's MLP builder protocol."""
        return cls(config, submodules, pg_collection, is_mtp_layer, name)

    def set_layer_number(self, layer_number: int) -> None:
        """Called by the TransformerLayer with its global number (1-based), once built."""
        cfg = self.config
        if not cfg.moe_layer_pattern()[layer_number - 1]:
            # One layer spec copied to every layer (Megatron's usual path) puts MoE everywhere.
            raise ConfigError(
                f"layer {layer_number - 1} (0-based) is dense in this config (moe_first_k_dense="
                f"{cfg.moe_first_k_dense}, moe_layer_freq={cfg.moe_layer_freq!r}) but its spec "
                "builds a DeepSeekMoE block: get_dsmoe_layer_spec() is the spec of the MoE layers "
                "only; build the decoder from get_dsmoe_block_spec(config), or give every layer "
                "dsmoe_megatron.specs.megatron_lm_layer (Megatron-LM: --spec dsmoe_megatron.specs "
                "megatron_lm_layer)")
        self.layer_number = layer_number
        self.router.set_layer_number(layer_number)

    @property
    def linear_fc1(self):
        """What Megatron's TransformerLayer tells to keep the pre-MLP norm's output unquantized
        (``set_save_original_input``) when it recomputes that norm under FP8 / FP4
        (``recompute_modules`` with ``layernorm``); its MoELayer names its shared experts' fc1 the
        same way. The router and the routed experts keep no quantized copy of it."""
        if self.shared_experts is None:
            return _NoSharedExperts()
        return self.shared_experts.linear_fc1

    def take_expert_load(self) -> torch.Tensor | None:
        load, self.expert_load = self.expert_load, None
        return load

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        """hidden [S, B, H] (S sharded over TP under sequence parallelism) -> (output, None)."""
        if self.recompute_block and self.training and torch.is_grad_enabled():
            return self._checkpoint(self._forward, hidden), None
        return self._forward(hidden), None

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        routing = self.router(hidden)
        shared = self._start_shared_experts(hidden)
        routed = self._routed_experts(hidden, routing)
        output = routed.view(hidden.shape)
        if shared is not None:
            output = output + self._finish_shared_experts(shared)
        if self.training and routing.aux_loss.requires_grad:
            output = MoEAuxLossAutoScaler.apply(output, routing.aux_loss)
        return output

    def _routed_experts(self, hidden, routing) -> torch.Tensor:
        """Route, permute, (all-to-all), expert SwiGLU, (all-to-all back), unpermute."""
        tokens = hidden.reshape(-1, hidden.shape[-1])
        x, expert_idx, gates = self._into_experts(tokens, routing.expert_idx, routing.gates)
        permute = (token_dispatcher.permute_fused if self.config.moe_permute_fusion
                   else token_dispatcher.permute)
        rows, probs, tokens_per_expert, perm = permute(x, expert_idx, gates,
                                                       self.experts.num_experts)
        self._count_load(tokens_per_expert)
        rows, probs, local_counts, host_counts, state = self.all_to_all.dispatch(
            rows, probs, tokens_per_expert)
        rows = self.experts(rows, probs, local_counts, host_counts)
        rows = self.all_to_all.combine(rows, state)
        return self._out_of_experts(token_dispatcher.unpermute(rows, perm))

    def _count_load(self, tokens_per_expert: torch.Tensor) -> None:
        # Not in the no-grad first pass of a recomputed layer: it runs again with grad.
        if self.training and not torch.is_grad_enabled():
            return
        load = tokens_per_expert.detach()
        self.expert_load = load if self.expert_load is None else self.expert_load + load

    def _start_shared_experts(self, hidden):
        if self.shared_experts is None:
            return None
        if self.side_stream is None:
            return self._shared_experts(hidden)
        # Launched before the routed path, on their own stream, so they run while the
        # all-to-all is in flight; on CPU the streams are inert and this runs in order.
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            return self._shared_experts(hidden)

    def _finish_shared_experts(self, shared: torch.Tensor) -> torch.Tensor:
        if self.side_stream is not None:
            torch.cuda.current_stream().wait_stream(self.side_stream)
            shared.record_stream(torch.cuda.current_stream())
        return shared

    def _shared_experts(self, hidden):
        if self.recompute_shared and self.training and torch.is_grad_enabled():
            return self._checkpoint(lambda h: self.shared_experts(h)[0], hidden)
        return self.shared_experts(hidden)[0]

    def _checkpoint(self, function, hidden):
        """Megatron's activation checkpoint (keeps the input, recomputes in backward)."""
        if self.config.fp8:
            from megatron.core.extensions.transformer_engine import te_checkpoint

            return te_checkpoint(function, False, tensor_parallel.random.get_cuda_rng_tracker,
                                 self.tp_group, hidden)
        return tensor_parallel.checkpoint(function, False, hidden)

    def _experts_sharded(self) -> bool:
        return self.tp_size > 1 and self.expert_tp_size == self.tp_size

    def _into_experts(self, x, expert_idx, gates):
        if self.tp_size == 1:
            return x, expert_idx, gates
        group = self.tp_group
        if self.config.sequence_parallel:
            if not self._experts_sharded():
                return x, expert_idx, gates
            gather = mappings.gather_from_sequence_parallel_region
            return (gather(x, group=group), gather(expert_idx, False, group=group),
                    gather(gates, group=group))
        if self._experts_sharded():
            copy = mappings.copy_to_tensor_model_parallel_region
            return copy(x, group=group), expert_idx, copy(gates, group=group)
        if x.shape[0] % self.tp_size:
            raise ConfigError(
                f"{x.shape[0]} tokens per micro-batch cannot be split over "
                f"tensor_model_parallel_size={self.tp_size} with expert_tensor_parallel_size=1; "
                "use sequence_parallel or a micro-batch whose seq_length x batch divides evenly"
            )
        split = mappings.scatter_to_sequence_parallel_region
        return split(x, group=group), split(expert_idx, group=group), split(gates, group=group)

    def _out_of_experts(self, routed):
        if self.tp_size == 1:
            return routed
        group = self.tp_group
        if self.config.sequence_parallel:
            if not self._experts_sharded():
                return routed
            return mappings.reduce_scatter_to_sequence_parallel_region(routed, group=group)
        if self._experts_sharded():
            return mappings.reduce_from_tensor_model_parallel_region(routed, group=group)
        return mappings.gather_from_sequence_parallel_region(routed, False, group=group)


class _NoSharedExperts:
    """``DeepSeekMoE.linear_fc1`` of a block without shared experts: nothing to tell."""

    save_original_input = False
