"""Megatron-core specs: the decoder block's dense and DeepSeekMoE layers, on any pipeline stage."""

import pytest
from megatron.core import parallel_state

from common import tiny_config
from dsmoe_megatron import runtime
from dsmoe_megatron.config import ConfigError
from dsmoe_megatron.moe import DeepSeekMoE
from dsmoe_megatron.specs import get_dsmoe_block_spec, get_dsmoe_layer_spec, megatron_lm_layer


def kinds(block) -> list[str]:
    """'moe' or 'dense' for each layer spec of a block spec."""
    def kind(spec):
        builder = getattr(spec.submodules.mlp, "func", None)
        return "moe" if getattr(builder, "__self__", None) is DeepSeekMoE else "dense"

    return [kind(spec) for spec in block.layer_specs]


@pytest.fixture
def no_parallel_state(monkeypatch):
    """Megatron's pipeline state as before initialize_model_parallel (a notebook, a script)."""
    monkeypatch.setattr(parallel_state, "_PIPELINE_MODEL_PARALLEL_GROUP", None)
    monkeypatch.setattr(parallel_state, "_MPU_PIPELINE_MODEL_PARALLEL_RANK", None)


def test_block_spec_without_pipeline_parallelism_needs_no_parallel_state(no_parallel_state):
    """It asked Megatron's parallel state for the pipeline rank: 'pipeline_model parallel group
    is not initialized' before any model was built."""
    assert kinds(get_dsmoe_block_spec(tiny_config(), use_te=False)) == [
        "dense", "moe", "moe", "moe"]


def test_block_spec_of_a_pipeline_stage(no_parallel_state):
    cfg = tiny_config(pipeline_model_parallel_size=2)
    assert kinds(get_dsmoe_block_spec(cfg, pp_rank=0, use_te=False)) == ["dense", "moe"]
    assert kinds(get_dsmoe_block_spec(cfg, pp_rank=1, use_te=False)) == ["moe", "moe"]
    # Without pp_rank a pipeline stage is still the parallel state's.
    with pytest.raises(AssertionError, match="pipeline_model parallel group is not initialized"):
        get_dsmoe_block_spec(cfg, use_te=False)


@pytest.fixture(scope="module")
def single_rank():
    runtime.initialize()
    yield
    runtime.shutdown()


def built(spec, **changes) -> list[str]:
    """The MLP of each layer of a TransformerBlock built from ``spec`` (Megatron's own path)."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    block = TransformerBlock(tiny_config(**changes), spec)
    return ["moe" if isinstance(layer.mlp, DeepSeekMoE) else "dense" for layer in block.layers]


@pytest.mark.parametrize("changes, dense", [
    (dict(), "layer 0 (0-based) is dense in this config (moe_first_k_dense=1, moe_layer_freq=1)"),
    (dict(moe_first_k_dense=0, moe_layer_freq=[1, 0, 1, 1]),
     "layer 1 (0-based) is dense in this config (moe_first_k_dense=0, moe_layer_freq=[1, 0, 1, "
     "1])"),
])
def test_moe_layer_spec_for_every_layer_is_refused_on_a_dense_layer(single_rank, changes, dense):
    """Megatron's TransformerBlock copies one layer spec to every layer: the layers the config
    makes dense were built as DeepSeekMoE blocks, in silence."""
    with pytest.raises(ConfigError) as err:
        built(get_dsmoe_layer_spec(use_te=False), **changes)
    message = str(err.value)
    assert message.startswith(f"{dense} but its spec builds a DeepSeekMoE block")
    assert "get_dsmoe_block_spec(config)" in message
    assert "--spec dsmoe_megatron.specs megatron_lm_layer" in message


@pytest.mark.parametrize("changes, expected", [
    (dict(), ["dense", "moe", "moe", "moe"]),
    (dict(moe_first_k_dense=0, moe_layer_freq=2), ["moe", "dense", "moe", "dense"]),
])
def test_block_spec_and_megatron_lm_layer_place_dense_and_moe_layers(single_rank, changes,
                                                                      expected):
    assert built(get_dsmoe_block_spec(tiny_config(**changes), use_te=False), **changes) == expected
    assert built(megatron_lm_layer, transformer_impl="local", **changes) == expected


def test_moe_layer_spec_for_every_layer_of_an_all_moe_config(single_rank):
    assert built(get_dsmoe_layer_spec(use_te=False), moe_first_k_dense=0) == ["moe"] * 4


def test_local_norms_are_zero_centered_as_transformer_engines(single_rank):
    """layernorm_zero_centered_gamma (Megatron-LM's --apply-layernorm-1p): Transformer Engine's
    norms start their weight at 0 and scale by 1 + weight; the local RMSNorm started at 1 and
    scaled by the weight, so the same config built another model without TE, and a checkpoint
    trained with TE (weights near 0) scaled every normalised activation by about 0 without it."""
    import torch
    from megatron.core.transformer.transformer_block import TransformerBlock

    from dsmoe_megatron.norm import RMSNorm

    cfg = tiny_config(layernorm_zero_centered_gamma=True)
    block = TransformerBlock(cfg, get_dsmoe_block_spec(cfg, use_te=False))
    norms = [m for m in block.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * cfg.num_layers + 1  # input and pre-MLP norms, and the final one
    assert all(torch.equal(norm.weight, torch.zeros(32)) for norm in norms)
    norm, x = norms[0], torch.randn(4, 32)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm(x), normed)
    with torch.no_grad():
        norm.weight.fill_(0.5)
    torch.testing.assert_close(norm(x), normed * 1.5)


@pytest.mark.parametrize("shared", [1, 0])
def test_fp8_layernorm_recompute_builds_moe_layers(single_rank, monkeypatch, shared):
    """Recomputing the pre-MLP norm under FP8 (recompute_modules 'layernorm', a recipe other
    than delayed), Megatron's TransformerLayer calls set_save_original_input on
    ``mlp.linear_fc1`` of every MLP that is not its MoELayer: every MoE layer failed to build
    ("'DeepSeekMoE' object has no attribute 'linear_fc1'"). The shared experts' fc1 now takes
    the norm's output unquantized, as in Megatron's MoELayer. Transformer Engine is a stand-in:
    its modules' save_original_input flag, set by Megatron's helper."""
    import torch
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.transformer import transformer_config
    from megatron.core.transformer.transformer_block import TransformerBlock

    from dsmoe_megatron import config as config_module

    monkeypatch.setattr(config_module, "_te_available", lambda: True)
    monkeypatch.setattr(config_module, "_gpu_supports", lambda *args: True)
    monkeypatch.setattr(transformer_config, "is_te_min_version", lambda *a, **k: True)
    kept = []

    def set_save_original_input(module):
        module.save_original_input = True
        kept.append(module)

    monkeypatch.setattr(te_extension, "set_save_original_input", set_save_original_input)
    cfg = tiny_config(fp8="hybrid", fp8_recipe="tensorwise", bf16=True,
                      params_dtype=torch.bfloat16, recompute_granularity="selective",
                      recompute_modules=["layernorm"], moe_num_shared_experts=shared)
    block = TransformerBlock(cfg, get_dsmoe_block_spec(cfg, use_te=False))
    moe_layers = [layer for layer in block.layers if isinstance(layer.mlp, DeepSeekMoE)]
    assert len(moe_layers) == 3 and all(l.recompute_pre_mlp_layernorm for l in moe_layers)
    if shared:
        assert all(layer.mlp.shared_experts.linear_fc1.save_original_input
                   for layer in moe_layers)
        assert all(layer.mlp.shared_experts.linear_fc1 in kept for layer in moe_layers)
