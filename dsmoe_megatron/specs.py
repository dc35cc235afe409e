"""Megatron-core specs: DeepSeekMoE and dense TransformerLayers, the decoder block, GPTModel.

Transformer Engine modules are used when TE imports (GPU), Megatron-core's local modules and
our sequence-parallel RMSNorm otherwise. The block spec places dense and MoE layers itself
(a single layer spec copied to every layer would ignore the dense first layers).
"""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_submodules,
    get_gpt_layer_with_transformer_engine_submodules,
)
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

from dsmoe_megatron.backends import te_available
from dsmoe_megatron.config import DeepSeekMoEConfig
from dsmoe_megatron.moe import DeepSeekMoE
from dsmoe_megatron.norm import RMSNorm


def _norm(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def _linear_pair(use_te: bool) -> MLPSubmodules:
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TERowParallelLinear,
        )

        return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _base_submodules(use_te: bool, qk_layernorm: bool):
    if use_te:
        return get_gpt_layer_with_transformer_engine_submodules(qk_layernorm=qk_layernorm)
    sub = get_gpt_layer_local_submodules(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    return dataclasses.replace(sub, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)


def get_dense_layer_spec(use_te: bool | None = None, qk_layernorm: bool = False) -> ModuleSpec:
    """A standard SwiGLU TransformerLayer (DeepSeekMoE's first layer(s) and the dense baseline)."""
    use_te = te_available() if use_te is None else use_te
    return ModuleSpec(module=TransformerLayer, submodules=_base_submodules(use_te, qk_layernorm))


def get_dsmoe_layer_spec(use_te: bool | None = None, qk_layernorm: bool = False) -> ModuleSpec:
    """A TransformerLayer whose MLP is a DeepSeekMoE block (shared + routed experts)."""
    use_te = te_available() if use_te is None else use_te
    base = _base_submodules(use_te, qk_layernorm)
    sub = dataclasses.replace(
        base,
        # The MoE block has its own linear layers, so the pre-MLP norm cannot be fused into fc1;
        # it keeps its own checkpoint key on every backend (the input norm keeps TE's fused key).
        pre_mlp_layernorm=_norm(use_te),
        mlp=partial(DeepSeekMoE.as_mlp_submodule, submodules=_linear_pair(use_te)),
        sharded_state_dict_keys_map={
            k: v for k, v in base.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."
        },
    )
    return ModuleSpec(module=TransformerLayer, submodules=sub)


def get_dsmoe_block_spec(config: DeepSeekMoEConfig, vp_stage: int | None = None,
                         pp_rank: int | None = None, use_te: bool | None = None
                         ) -> TransformerBlockSubmodules:
    """The decoder block for this pipeline stage: dense layers where the config says so."""
    use_te = te_available() if use_te is None else use_te
    dense = get_dense_layer_spec(use_te, config.qk_layernorm)
    moe = get_dsmoe_layer_spec(use_te, config.qk_layernorm)
    specs = [moe if is_moe else dense for is_moe in config.moe_layer_pattern()]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset:offset + count], layer_norm=_norm(use_te)
    )


def megatron_lm_spec(config, vp_stage: int | None = None, pp_rank: int | None = None):
    """For Megatron-LM's ``pretrain_gpt.py --spec dsmoe_megatron.specs megatron_lm_spec``.

    Megatron-LM builds a plain TransformerConfig from its own flags; the DeepSeekMoE-only
    settings (shared-expert count, first dense layers, a2, device groups, backend) are read
    from ``DSMOE_*`` environment variables (see ``config_from_megatron``).
    """
    return get_dsmoe_block_spec(config_from_megatron(config), vp_stage=vp_stage, pp_rank=pp_rank)


def config_from_megatron(config) -> DeepSeekMoEConfig:
    """Turn Megatron-LM's TransformerConfig into ours, in place of class (same object fields)."""
    import os

    if isinstance(config, DeepSeekMoEConfig):
        return config
    shared_size = config.moe_shared_expert_intermediate_size or 0
    expert_width = config.moe_ffn_hidden_size or 1
    extra = dict(
        moe_num_shared_experts=shared_size // expert_width,
        moe_first_k_dense=int(os.environ.get("DSMOE_FIRST_K_DENSE", 0)),
        moe_device_balance_coeff=float(os.environ.get("DSMOE_DEVICE_BALANCE_COEFF", 0.0)),
        moe_device_groups=int(os.environ["DSMOE_DEVICE_GROUPS"])
        if os.environ.get("DSMOE_DEVICE_GROUPS") else None,
        moe_expert_backend=os.environ.get("DSMOE_EXPERT_BACKEND", "auto"),
    )
    # Switch the class so the same object (shared with the rest of Megatron-LM) carries our fields.
    config.__class__ = DeepSeekMoEConfig
    for key, value in extra.items():
        setattr(config, key, value)
    from dsmoe_megatron.config import validate

    validate(config)
    return config
