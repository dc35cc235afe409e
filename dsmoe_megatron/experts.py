"""Routed experts: this rank's experts' SwiGLU on rows grouped by expert.

    fc1 = rows @ gate_up_proj[e]^T      one grouped GEMM, [E, 2W, H] = [gate; up] per expert
    act = silu(gate) * up * prob        the weighted SwiGLU (keeps only fc1's output)
    out = act @ down_proj[e]^T          [E, H, W]

Each EP rank holds E/EP experts; each expert's width may be sharded over the expert-tensor-
parallel group (then each rank's fc1 slice is [gate shard; up shard]). Checkpoints keep one
tensor per projection, ``gate_proj`` / ``up_proj`` [E, W, H] and ``down_proj`` [E, H, W],
whatever the backend and layout: the fused fc1 is split on save and joined on load (a
ShardedTensorFactory, as Megatron-core does for its GLU fc1), and ``state_dict()`` shows the same
three names. Selective recompute of ``moe_act`` (Megatron's name) drops the SwiGLU output after
fc2 has used it and recomputes it from fc1's output in backward.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.random import (
    get_cuda_rng_tracker,
    get_expert_parallel_rng_tracker_name,
)

from dsmoe_megatron import ops
from dsmoe_megatron.backends import resolve_expert_backend
from dsmoe_megatron.config import ConfigError, DeepSeekMoEConfig

WIDTH_AXIS = {"gate_proj": 1, "up_proj": 1, "gate_up_proj": 1, "down_proj": 2}  # expert width axis
FC1, FC2 = "gate_up_proj", "down_proj"


def _group_size(group) -> int:
    return 1 if group is None else group.size()


def _group_rank(group) -> int:
    return 0 if group is None else group.rank()


class RoutedExperts(torch.nn.Module):
    def __init__(self, config: DeepSeekMoEConfig, pg_collection):
        super().__init__()
        self.config = config
        self.pg_collection = pg_collection
        self.ep_group, self.expert_tp_group, self.expert_dp_group = (
            pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp)
        self.num_experts = config.num_moe_experts
        self.num_local_experts = self.num_experts // _group_size(self.ep_group)
        self.width = config.moe_ffn_hidden_size // _group_size(self.expert_tp_group)
        self.backend = resolve_expert_backend(config.moe_expert_backend, config.params_dtype)
        self.needs_host_counts = ops.NEEDS_HOST_COUNTS[self.backend]
        self.recompute_activation = (config.recompute_granularity == "selective"
                                     and "moe_act" in config.recompute_modules)
        self.pad_multiple = 0  # rows per expert rounded up to this (FP8 GEMMs), 0: none
        self._build_weights()

    def _build_weights(self) -> None:
        if self.backend not in ops.GEMMS:
            raise ConfigError(
                f"moe_expert_backend={self.backend!r} has no torch implementation; use one of "
                f"{tuple(ops.GEMMS)}, 'te' (with Transformer Engine) or 'auto'"
            )
        self.gemm = ops.GEMMS[self.backend]
        config, hidden, width = self.config, self.config.hidden_size, self.width
        device = init_device(config)
        fc1 = torch.empty(self.num_local_experts, 2 * width, hidden, dtype=config.params_dtype,
                          device=device)
        fc2 = torch.empty(self.num_local_experts, hidden, width, dtype=config.params_dtype,
                          device=device)
        if config.perform_initialization:
            # On the device, so that the expert-parallel RNG stream (one per EP / expert-TP
            # rank) is the one drawn from: the tracker forks the device's generator only. In
            # place (views of fc1), so that initialization.py sees which init filled what.
            with rng_stream(get_expert_parallel_rng_tracker_name()):
                for name, weight in (("gate_proj", fc1[:, :width]), ("up_proj", fc1[:, width:]),
                                     ("down_proj", fc2)):
                    for expert_weight in weight:
                        _init_method(config, name)(expert_weight)
        for name, weight in ((FC1, fc1), (FC2, fc2)):
            param = torch.nn.Parameter(weight)
            mark_expert_parallel(param, name)
            self.register_parameter(name, param)
        self.register_state_dict_post_hook(_split_fc1_in_state_dict)
        self.register_load_state_dict_pre_hook(_join_fc1_in_state_dict)

    def fc1(self, rows, counts, host_counts):
        return self.gemm(rows, self.gate_up_proj, counts, host_counts)

    def fc2(self, rows, counts, host_counts):
        return self.gemm(rows, self.down_proj, counts, host_counts)

    def forward(self, rows: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor,
                host_counts: list[int] | None) -> torch.Tensor:
        """rows [M, H] grouped by local expert, probs [M], counts [E_local] (device; and host
        list for backends that need it) -> prob * expert(row) [M, H] (partial over expert TP)."""
        if self.pad_multiple:
            rows, probs, counts, host_counts, unpad = ops.pad_rows(
                rows, probs, counts, host_counts, self.pad_multiple)
        fc1 = self.fc1(rows, counts, host_counts)
        if self.recompute_activation and torch.is_grad_enabled():
            checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8)
            act = checkpoint.checkpoint(self.activation, fc1, probs)
            out = self.fc2(act, counts, host_counts)
            checkpoint.discard_output_and_register_recompute(out)
        else:
            out = self.fc2(self.activation(fc1, probs), counts, host_counts)
        return ops.unpad_rows(out, unpad) if self.pad_multiple else out

    def activation(self, fc1: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if self.config.bias_activation_fusion:
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            return weighted_bias_swiglu_impl(fc1, None, probs.unsqueeze(-1),
                                             self.config.activation_func_fp8_input_store)
        return ops.weighted_swiglu(fc1, probs)

    def _sharded(self, key, tensor, width_axis, sharded_offsets, replica_id, expert=None):
        """A ShardedTensor of the global [E, ...] tensor: this rank's experts (all of them, or
        the one global ``expert`` for a per-expert tensor) and its slice of the width."""
        n = len(sharded_offsets)
        etp_rank, etp = _group_rank(self.expert_tp_group), _group_size(self.expert_tp_group)
        if expert is None:
            expert_offset = (n, _group_rank(self.ep_group), _group_size(self.ep_group))
        else:
            expert_offset = (n, expert, self.num_experts)
        return ShardedTensor.from_rank_offsets(
            key, tensor, *sharded_offsets, expert_offset, (n + width_axis, etp_rank, etp),
            replica_id=replica_id, prepend_axis_num=n + (expert is not None),
        )

    def _replica_id(self):
        return (0, 0, _group_rank(self.expert_dp_group))

    def _fc1_factory(self, prefix, name, tensor, sharded_offsets, expert=None):
        """``prefix + name`` saved as gate_proj and up_proj (the halves of fc1's rows), joined
        again on load."""
        axis = 1 if expert is None else 0  # the width axis of the local tensor

        def build(key, t, replica_id, flattened_range):
            # key is prefix + name, or an optimizer state's "optimizer.state.<x>." + that.
            assert flattened_range is None, "flattened expert tensors are not supported"
            base = key.removesuffix(name)
            gate, up = t.chunk(2, dim=axis)
            return {half: self._sharded(base + half, value, 1, sharded_offsets, replica_id,
                                        expert)
                    for half, value in (("gate_proj", gate), ("up_proj", up))}

        def merge(loaded):
            return torch.cat([loaded["gate_proj"], loaded["up_proj"]], dim=axis)

        return ShardedTensorFactory(prefix + name, tensor, build, merge,
                                    replica_id=self._replica_id())

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        return {
            prefix + FC1: self._fc1_factory(prefix, FC1, self.gate_up_proj, sharded_offsets),
            prefix + FC2: self._sharded(prefix + FC2, self.down_proj, WIDTH_AXIS[FC2],
                                        sharded_offsets, self._replica_id()),
        }


def rng_stream(name: str):
    """Megatron's RNG stream ``name`` where its tracker has one (every run seeds it through
    model_parallel_cuda_manual_seed); else the default generator (a module built on its own)."""
    tracker = get_cuda_rng_tracker()
    return tracker.fork(name) if name in tracker.get_states() else contextlib.nullcontext()


def init_device(config) -> torch.device:
    """Where Megatron-core allocates weights: the current GPU unless use_cpu_initialization; the
    meta device while one is the default (a model built for its shapes only)."""
    if torch.get_default_device().type == "meta":
        return torch.device("meta")
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def mark_expert_parallel(param: torch.nn.Parameter, name: str) -> None:
    """Megatron's marks for an expert weight ``[E, out, in]`` sharded over EP and expert TP:
    DDP reduces it over the expert-data-parallel group (allreduce=False), and the grad norm
    counts it on every rank (tensor_model_parallel), not on expert-TP rank 0 only."""
    param.allreduce = False
    param.tensor_model_parallel = True
    param.partition_dim = WIDTH_AXIS[name]
    param.partition_stride = 1


def _init_method(config, name: str):
    return config.output_layer_init_method if name == "down_proj" else config.init_method


def _split_fc1_in_state_dict(module, state_dict, prefix, local_metadata) -> None:
    """state_dict(): the fused fc1 shows as gate_proj and up_proj (views), as in checkpoints."""
    fc1 = state_dict.pop(prefix + FC1)
    down = state_dict.pop(prefix + FC2)
    state_dict[prefix + "gate_proj"], state_dict[prefix + "up_proj"] = fc1.chunk(2, dim=1)
    state_dict[prefix + FC2] = down


def _join_fc1_in_state_dict(module, state_dict, prefix, *args) -> None:
    gate, up = prefix + "gate_proj", prefix + "up_proj"
    if gate in state_dict and up in state_dict:
        state_dict[prefix + FC1] = torch.cat([state_dict.pop(gate), state_dict.pop(up)], dim=1)


class TEGroupedExperts(RoutedExperts):
    """Routed experts on Transformer Engine's GroupedLinear through Megatron-core's wrappers
    (which honour perform_initialization, use_cpu_initialization and meta-device init, the
    expert RNG tracker and gradient-accumulation fusion): bf16, or FP8 under TE's autocast
    (Megatron's TransformerBlock enters it per layer when ``config.fp8`` is set), with each
    expert's rows padded to what FP8 GEMMs need.

    Checkpoint keys are RoutedExperts' (one expert slice each), so checkpoints move between
    backends; under FP8 each expert's scaling state (TE's ``_extra_state``) is saved with it.
    """

    def _build_weights(self) -> None:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelGroupedLinear,
            TERowParallelGroupedLinear,
        )
        from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization

        config, hidden = self.config, self.config.hidden_size
        common = dict(config=config, bias=False, skip_bias_add=False, is_expert=True,
                      pg_collection=self.pg_collection)
        # Widths are global; the wrappers shard them over the expert-TP group.
        self.gate_up_proj = TEColumnParallelGroupedLinear(
            self.num_local_experts, hidden, 2 * config.moe_ffn_hidden_size,
            init_method=config.init_method, **common)
        self.down_proj = TERowParallelGroupedLinear(
            self.num_local_experts, config.moe_ffn_hidden_size, hidden,
            init_method=config.output_layer_init_method, **common)
        self.pad_multiple = get_align_size_for_quantization(config)
        if self.recompute_activation and (config.fp8 or config.fp4):
            # Else fc2 keeps its own quantized copy of the SwiGLU output, which the recompute
            # exists not to keep (Megatron's TEGroupedMLP does the same).
            from megatron.core.extensions.transformer_engine import set_save_original_input

            set_save_original_input(self.down_proj)

    def fc1(self, rows, counts, host_counts):
        return self.gate_up_proj(rows, host_counts)[0]

    def fc2(self, rows, counts, host_counts):
        return self.down_proj(rows, host_counts)[0]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        first = _group_rank(self.ep_group) * self.num_local_experts
        out = {}
        for name in (FC1, FC2):
            layer = getattr(self, name)
            extra_states = (layer._split_extra_state(layer.state_dict()["_extra_state"])
                            if self.config.fp8 else None)
            for i in range(self.num_local_experts):
                weight, expert = getattr(layer, f"weight{i}"), first + i
                key = f"{prefix}{name}.weight{i}"
                if name == FC1:
                    out[key] = self._fc1_factory(prefix, f"{FC1}.weight{i}", weight,
                                                 sharded_offsets, expert)
                else:
                    out[key] = self._sharded(prefix + FC2, weight, WIDTH_AXIS[FC2],
                                             sharded_offsets, self._replica_id(), expert)
                if extra_states is not None:
                    out[f"{prefix}{name}._extra_state{i or ''}"] = self._extra_state_object(
                        f"{prefix}{name}._extra_state", extra_states[i], expert,
                        sharded_offsets)
        return out

    def _extra_state_object(self, key, state, expert, sharded_offsets) -> ShardedObject:
        """One expert's FP8 scaling state, keyed by its global expert index."""
        return ShardedObject(
            key, state, (*(o[2] for o in sharded_offsets), self.num_experts),
            (*(o[1] for o in sharded_offsets), expert),
            replica_id=(0, _group_rank(self.expert_tp_group), _group_rank(self.expert_dp_group)),
        )


def build_routed_experts(config, pg_collection) -> RoutedExperts:
    backend = resolve_expert_backend(config.moe_expert_backend, config.params_dtype)
    return (TEGroupedExperts if backend == "te" else RoutedExperts)(config, pg_collection)
