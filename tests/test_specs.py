"""Megatron-core specs: the decoder block's dense and DeepSeekMoE layers, on any pipeline stage."""

import pytest
from megatron.core import parallel_state

from common import tiny_config
from dsmoe_megatron.moe import DeepSeekMoE
from dsmoe_megatron.specs import get_dsmoe_block_spec


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
