"""Megatron-core specs: DeepSeekMoE and dense TransformerLayers, the decoder block, GPTModel.

Transformer Engine modules are used when TE imports (GPU), Megatron-core's local modules and
our sequence-parallel RMSNorm otherwise. The block spec places dense and MoE layers itself
(a single layer spec copied to every layer would ignore the dense first layers).

Megatron-LM's ``--spec dsmoe_megatron.specs NAME`` takes ``megatron_lm_layer`` (either model
builder) or ``megatron_lm_spec`` (megatron.training's GPTModelBuilder only); see megatron_lm.py.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_submodules,
    get_gpt_layer_with_transformer_engine_submodules,
)
from megatron.core.transformer import transformer_block
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
from megatron.core.utils import get_pg_rank

from dsmoe_megatron.backends import te_available
from dsmoe_megatron.config import (
    ConfigError,
    DeepSeekMoEConfig,
    _fill_deepseek_defaults,
    validate,
)
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
    """The decoder block for this pipeline stage: dense layers where the config says so.

    With pipeline parallelism the stage is ``pp_rank``'s, else the parallel state's; without
    it the block holds every layer and needs no initialised parallel state."""
    use_te = te_available() if use_te is None else use_te
    if pp_rank is None and config.pipeline_model_parallel_size == 1:
        pp_rank = 0
    dense = get_dense_layer_spec(use_te, config.qk_layernorm)
    moe = get_dsmoe_layer_spec(use_te, config.qk_layernorm)
    specs = [moe if is_moe else dense for is_moe in config.moe_layer_pattern()]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=specs[offset:offset + count], layer_norm=_norm(use_te)
    )


# ---------------------------------------------------------------------------------------------
# Megatron-LM: ``pretrain_gpt.py --spec dsmoe_megatron.specs megatron_lm_layer`` (megatron_lm.py)


class DeepSeekMoELayer(TransformerLayer):
    """A TransformerLayer that is dense or DeepSeekMoE according to its global layer number.

    Megatron-LM copies one layer spec to every layer; this layer still keeps the dense layers
    (``moe_layer_freq`` and ``moe_first_k_dense``). Transformer Engine or Megatron-core's local
    modules follow ``config.transformer_impl`` (Megatron-LM's ``--transformer-impl``).
    """

    def __init__(self, config, submodules=None, layer_number: int = 1, **kwargs):
        config = config_from_megatron(config)
        if kwargs.get("is_mtp_layer"):
            moe = config.is_moe
        else:
            index = layer_number - 1
            if kwargs.get("add_layer_offset", True):
                pg_collection = kwargs.get("pg_collection")
                pp_rank = get_pg_rank(pg_collection.pp) if pg_collection is not None else None
                index += get_transformer_layer_offset(config, kwargs.get("vp_stage"), pp_rank)
            moe = config.moe_layer_pattern()[index]
        spec = get_dsmoe_layer_spec if moe else get_dense_layer_spec
        use_te = config.transformer_impl == "transformer_engine"
        super().__init__(config, spec(use_te, config.qk_layernorm).submodules, layer_number,
                         **kwargs)


megatron_lm_layer = ModuleSpec(module=DeepSeekMoELayer)
"""``--spec dsmoe_megatron.specs megatron_lm_layer``: works with both of Megatron-LM's model
builders (pretrain_gpt.py's gpt_builder and megatron.training's GPTModelBuilder)."""


def _block_submodules_with_our_final_norm(config, spec, *args, **kwargs):
    """Megatron's ``_get_block_submodules``, whose block of a layer spec ends in the norm picked
    when it was imported (TE's, else apex's LayerNorm-only one, else torch's, which refuses
    sequence parallelism). A block of ``megatron_lm_layer`` ends in the norm the layers use, as
    ``get_dsmoe_block_spec``'s does."""
    submodules = _megatron_block_submodules(config, spec, *args, **kwargs)
    if isinstance(spec, ModuleSpec) and spec.module is DeepSeekMoELayer:
        use_te = config.transformer_impl == "transformer_engine"
        submodules = dataclasses.replace(submodules, layer_norm=_norm(use_te))
    return submodules


_megatron_block_submodules = getattr(transformer_block._get_block_submodules, "megatron_original",
                                     transformer_block._get_block_submodules)
_block_submodules_with_our_final_norm.megatron_original = _megatron_block_submodules
transformer_block._get_block_submodules = _block_submodules_with_our_final_norm


def megatron_lm_spec(config, vp_stage: int | None = None, pp_rank: int | None = None
                     ) -> TransformerBlockSubmodules:
    """``--spec dsmoe_megatron.specs megatron_lm_spec``, for megatron.training's GPTModelBuilder
    (gpt_config_from_args), which calls it with its GPTModelConfig; the whole decoder block of
    this pipeline stage, final norm included. gpt_builder (pretrain_gpt.py) needs
    ``megatron_lm_layer`` instead: it passes the object to GPTModel without calling it."""
    config = config_from_megatron(config)
    return get_dsmoe_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank,
                                use_te=config.transformer_impl == "transformer_engine")


# The DeepSeekMoE-only settings Megatron-LM has no flag for: field -> (environment variable, type).
DSMOE_SETTINGS = {
    "moe_num_shared_experts": ("DSMOE_NUM_SHARED_EXPERTS", int),
    "moe_first_k_dense": ("DSMOE_FIRST_K_DENSE", int),
    "moe_device_balance_coeff": ("DSMOE_DEVICE_BALANCE_COEFF", float),
    "moe_device_groups": ("DSMOE_DEVICE_GROUPS", int),
    "moe_expert_backend": ("DSMOE_EXPERT_BACKEND", str),
}


def dsmoe_settings(args=None) -> dict:
    """The DeepSeekMoE-only settings given to a Megatron-LM run, unset ones left out.

    Each comes from Megatron-LM's parsed arguments when they carry it (the flags of
    ``megatron_lm.add_dsmoe_args``: ``--moe-first-k-dense``...), else from its ``DSMOE_*``
    environment variable. ``args`` defaults to megatron.training's global arguments, if any.
    """
    args = _megatron_args() if args is None else args
    settings = {}
    for name, (env, cast) in DSMOE_SETTINGS.items():
        value = getattr(args, name, None)
        if value is None and os.environ.get(env):
            value = cast(os.environ[env])
        if value is not None:
            settings[name] = value
    return settings


def _megatron_args():
    try:
        from megatron.training.global_vars import get_args

        return get_args()
    except (ImportError, AssertionError):  # no megatron.training, or its arguments not parsed
        return None


def config_from_megatron(config) -> DeepSeekMoEConfig:
    """Turn the TransformerConfig Megatron-LM built from its flags into a DeepSeekMoEConfig.

    The object itself changes class (the rest of Megatron-LM shares it) and gains the
    DeepSeekMoE-only fields from ``dsmoe_settings()``; a GPTModelConfig is unwrapped to its
    TransformerConfig. Without ``moe_num_shared_experts`` the shared-expert count is
    ``--moe-shared-expert-intermediate-size / --moe-ffn-hidden-size``.
    """
    config = getattr(config, "transformer", config)
    if isinstance(config, DeepSeekMoEConfig):
        return config
    settings = dsmoe_settings()
    shared, width = config.moe_shared_expert_intermediate_size, config.moe_ffn_hidden_size
    if shared and "moe_num_shared_experts" not in settings:
        if not width or shared % width:
            raise ConfigError(
                f"--moe-shared-expert-intermediate-size={shared} must be a multiple of "
                f"--moe-ffn-hidden-size={width}: DeepSeekMoE's shared experts have the routed "
                "experts' width (or set --moe-num-shared-experts / DSMOE_NUM_SHARED_EXPERTS)"
            )
        settings["moe_num_shared_experts"] = shared // width
    config.__class__ = DeepSeekMoEConfig
    fields = DeepSeekMoEConfig.__dataclass_fields__
    for name in DSMOE_SETTINGS:
        setattr(config, name, settings.get(name, fields[name].default))
    # Megatron-LM gives --rotary-base to GPTModel, not to the config; our model_provider's
    # build_model and the checkpoint checks read it from the config.
    config.rotary_base = getattr(_megatron_args(), "rotary_base", fields["rotary_base"].default)
    _fill_deepseek_defaults(config)
    validate(config)
    return config
