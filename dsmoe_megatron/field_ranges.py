"""The valid range of every numeric setting of a run: model, parallel layout and training.

One table, grouped by range. NaN and inf are refused for every number, listed or not; a list
value (``lr_step_decay_at``) is checked entry by entry.
Relations between fields (``min_lr <= lr``, heads dividing the hidden size...) are checked
where the fields meet: ``config.py`` (DeepSeekMoEConfig) and ``yaml_config.TrainingArgs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RANGES", "Interval", "problem"]


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        """``"[0, 1)"``, ``"(0, inf)"``...: brackets include the bound, parentheses exclude it."""
        low, high = (float(part) for part in text[1:-1].split(","))
        return cls(low, high, text[0] == "[", text[-1] == "]")

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below

    def __str__(self) -> str:
        if math.isinf(self.low) and math.isinf(self.high):
            return "a finite number"
        if math.isinf(self.high):
            return f"{'>=' if self.low_closed else '>'} {_number(self.low)}"
        return (f"in {'[' if self.low_closed else '('}{_number(self.low)}, "
                f"{_number(self.high)}{']' if self.high_closed else ')'}")


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


_BY_RANGE = {
    # Counts and sizes.
    "[1, inf)": (
        "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
        "ffn_hidden_size", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size", "moe_shared_expert_glu_interleave_size",
        "moe_router_topk_limited_devices", "moe_router_num_groups", "moe_router_group_topk",
        "moe_latent_size", "moe_flex_dispatcher_num_sms", "moe_deepep_num_sms",
        "moe_hybridep_num_sms", "moe_hybridep_num_blocks_permute",
        "moe_hybridep_num_blocks_unpermute", "moe_hybridep_num_sms_preprocessing",
        "moe_mlp_glu_interleave_size", "moe_device_groups", "recompute_num_layers",
        "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk", "dsa_indexer_topk_freq",
        "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
        "linear_num_key_heads", "linear_num_value_heads", "mup_base_hidden_size",
        "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads",
        "mlp_chunks_for_prefill", "mlp_chunks_for_training", "moe_paged_stash_page_size",
        "fine_grained_offloading_max_inflight_offloads",
        # parallel sizes
        "tensor_model_parallel_size", "tensor_parallel_num_weight_shards",
        "gtp_weight_remat_size", "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size", "context_parallel_size",
        "hierarchical_context_parallel_sizes", "max_seqlen_per_dp_cp_rank",
        "expert_model_parallel_size", "expert_tensor_parallel_size",
        "expert_tensor_parallel_num_weight_shards", "expert_gtp_weight_remat_size",
        "microbatch_group_size_per_vp_stage", "num_layers_in_first_pipeline_stage",
        "num_layers_in_last_pipeline_stage", "fp8_interval", "fp8_amax_history_len",
        # training
        "micro_batch_size", "global_batch_size", "seq_length", "max_position_embeddings",
        "vocab_size", "train_iters", "save_interval", "keep_checkpoints",
        "eval_interval", "log_interval",
        "ddp_bucket_size",
    ),
    # Counts that may be zero, loss coefficients, rates.
    "[0, inf)": (
        "mtp_num_layers", "mtp_loss_scaling_factor", "moe_num_shared_experts",
        "moe_first_k_dense", "moe_aux_loss_coeff", "moe_device_balance_coeff",
        "moe_z_loss_coeff", "moe_input_jitter_eps", "moe_router_bias_update_rate",
        "dsa_indexer_skip_topk_offset", "dsa_indexer_loss_coeff", "cuda_graph_warmup_steps",
        "inference_sampling_seed", "mrope_section", "min_offloaded_tensor_size",
        "num_microbatches_with_partial_activation_checkpoints", "wgrad_deferral_limit",
        "cpu_offloading_num_layers", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16",
        "min_lr", "lr_warmup_iters", "weight_decay", "clip_grad", "eval_iters",
    ),
    # Scales, epsilons, standard deviations, factors.
    "(0, inf)": (
        "init_method_std", "embedding_init_method_std", "layernorm_epsilon", "softmax_scale",
        "activation_func_clamp_value", "qk_clip_threshold", "dsa_indexer_k_norm_epsilon",
        "mup_width_mult", "mup_embedding_mult", "mup_output_mult", "mup_base_head_dim",
        "moe_router_topk_scaling_factor", "moe_expert_capacity_factor",
        "moe_expert_rank_capacity_factor", "rotary_base", "lr", "adam_eps", "loss_scale",
        "initial_loss_scale", "exit_duration_in_mins",
    ),
    # Probabilities and moment decays: 1 would drop everything / never forget.
    "[0, 1)": ("hidden_dropout", "attention_dropout", "adam_beta1", "adam_beta2"),
    "[0, 1]": ("activation_offload_fraction", "moe_router_quantile_balancing_ema",
               "qk_clip_alpha"),
    "(0, 1)": ("lr_step_decay_at",),
    "(0, 1]": ("lr_step_decay_factor",),
    # numpy's and torch's generators take unsigned seeds; Megatron adds small offsets.
    "[0, 4294967295]": ("seed",),
    # Any finite value: signs select a mode, -1 means unlimited, or a layer pattern checked
    # with the other fields (moe_layer_freq in config.validate).
    "(-inf, inf)": (
        "glu_linear_offset", "window_size", "window_attn_skip_freq", "no_rope_freq",
        "linear_attention_freq", "moe_layer_freq", "moe_router_force_biased",
        "mup_attn_scale_power", "delta_offload_bytes_across_pp_ranks",
        "moe_paged_stash_buffer_size_factor_cuda", "moe_paged_stash_buffer_size_factor_cpu",
        "fp8_margin",
    ),
}
RANGES: dict[str, Interval] = {
    name: Interval.parse(text) for text, names in _BY_RANGE.items() for name in names
}


def problem(name: str, value) -> str | None:
    """What is wrong with ``value`` for the setting ``name`` ("must be >= 1"), None if nothing.

    Values that are not numbers (None, strings, ...) are left to the type checks.
    """
    many = isinstance(value, (list, tuple))
    interval = RANGES.get(name)
    for x in value if many else (value,):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        each = "each entry " if many else ""
        if not math.isfinite(x):
            return f"{each}must be a finite number"
        if interval is not None and x not in interval:
            return f"{each}must be {interval}"
    return None
