"""DeepSeekMoEConfig: every validation error, with the field and the fix in its message, and the
paper's segmentation recipe."""

import pytest
import torch

from common import tiny_config
from dsmoe_megatron import config as config_module
from dsmoe_megatron.config import ConfigError, derive_from_baseline


@pytest.mark.parametrize("changes, message", [
    (dict(moe_router_topk=9), "moe_router_topk=9 must be between 1 and num_moe_experts=8"),
    (dict(moe_router_topk=0), "moe_router_topk=0 must be between 1"),
    (dict(moe_ffn_hidden_size=None, moe_num_shared_experts=1),
     "moe_num_shared_experts > 0 needs an expert width: set moe_ffn_hidden_size"),
    (dict(moe_num_shared_experts=-1), "moe_num_shared_experts must be >= 0"),
    (dict(moe_shared_expert_intermediate_size=40),
     "moe_shared_expert_intermediate_size=40 disagrees with moe_num_shared_experts=1 x "
     "moe_ffn_hidden_size=16; set only moe_num_shared_experts"),
    (dict(moe_num_shared_experts=0, moe_shared_expert_intermediate_size=16),
     "is set with moe_num_shared_experts=0; set moe_num_shared_experts"),
    (dict(expert_model_parallel_size=3),
     "num_moe_experts=8 is not divisible by expert_model_parallel_size=3; choose an EP size"),
    (dict(tensor_model_parallel_size=3, num_attention_heads=6, hidden_size=36, ffn_hidden_size=66),
     "moe_ffn_hidden_size=16 is not divisible by the expert tensor parallel size 3"),
    (dict(tensor_model_parallel_size=4, ffn_hidden_size=66),
     "ffn_hidden_size=66 is not divisible by tensor_model_parallel_size=4; pick a width"),
    (dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1, moe_ffn_hidden_size=15),
     "shared expert width 15 is not divisible by tensor_model_parallel_size=2"),
    (dict(moe_expert_backend="cutlass"),
     "moe_expert_backend='cutlass' is unknown; use one of ('auto', 'te', 'grouped_mm', "
     "'sequential')"),
    (dict(moe_first_k_dense=5), "moe_first_k_dense=5 must be between 0 and num_layers (4)"),
    (dict(moe_device_balance_coeff=0.05),
     "moe_device_balance_coeff=0.05 needs at least 2 device groups but there is 1 "
     "(moe_device_groups, default the EP size); set moe_device_groups >= 2"),
    (dict(moe_device_balance_coeff=0.05, moe_device_groups=3),
     "num_moe_experts=8 is not divisible by moe_device_groups=3"),
    (dict(expert_model_parallel_size=4, moe_device_groups=6, num_moe_experts=24),
     "moe_device_groups=6 neither divides nor is a multiple of expert_model_parallel_size=4"),
    (dict(moe_device_balance_coeff=-0.1, moe_device_groups=2),
     "moe_aux_loss_coeff and moe_device_balance_coeff must be >= 0"),
    (dict(moe_router_load_balancing_type="sinkhorn"),
     "moe_router_load_balancing_type='sinkhorn': DeepSeekMoE supports"),
    (dict(moe_router_score_function="sigmoid"),
     "moe_router_score_function must be 'softmax' for DeepSeekMoE"),
    (dict(num_moe_experts=None, moe_router_topk=2, moe_ffn_hidden_size=None,
          moe_num_shared_experts=0, moe_device_balance_coeff=0.05),
     "moe_device_balance_coeff are set but num_moe_experts is not; set num_moe_experts"),
])
def test_validation_errors_name_the_field_and_the_fix(changes, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(**changes)
    assert message in str(err.value)


def test_fp8_needs_transformer_engine(monkeypatch):
    monkeypatch.setattr(config_module, "_te_available", lambda: False)
    with pytest.raises(ConfigError, match=r"fp8='e4m3' needs Transformer Engine.*set fp8: null"):
        tiny_config(fp8="e4m3", bf16=True, params_dtype=torch.bfloat16)


def test_fp8_needs_a_gpu_with_fp8_tensor_cores(monkeypatch):
    # TE present but the device has no FP8 tensor cores (CPU, or a GPU below compute 8.9).
    monkeypatch.setattr(config_module, "_te_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(ConfigError, match=r"needs a GPU with FP8 tensor cores \(compute "
                                          r"capability >= 8.9\)"):
        tiny_config(fp8="hybrid", bf16=True, params_dtype=torch.bfloat16)


def test_te_backend_needs_transformer_engine(monkeypatch):
    monkeypatch.setattr(config_module, "_te_available", lambda: False)
    with pytest.raises(ConfigError, match=r"moe_expert_backend='te' needs Transformer Engine.*"
                                          r"use 'auto'"):
        tiny_config(moe_expert_backend="te")
    assert tiny_config(moe_expert_backend="auto").moe_expert_backend == "auto"


def test_grouped_mm_backend_needs_a_recent_torch(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm")
    with pytest.raises(ConfigError, match=r"needs torch >= 2.8 \(torch._grouped_mm\); use 'auto'"):
        tiny_config(moe_expert_backend="grouped_mm")


def test_shared_width_is_derived_from_the_count():
    cfg = tiny_config(moe_num_shared_experts=2)
    assert cfg.moe_shared_expert_intermediate_size == 2 * 16


def test_dense_first_layers_and_layer_frequency():
    assert tiny_config().moe_layer_pattern() == [False, True, True, True]
    assert tiny_config(moe_first_k_dense=0, moe_layer_freq=2).moe_layer_pattern() == [
        True, False, True, False]
    assert tiny_config(moe=False).moe_layer_pattern() == [False] * 4


def test_device_groups_default_to_the_ep_size():
    assert tiny_config().num_device_groups() == 1
    assert tiny_config(expert_model_parallel_size=4).num_device_groups() == 4
    assert tiny_config(expert_model_parallel_size=4, moe_device_groups=2).num_device_groups() == 2
    # 8 groups over EP4: each rank holds two whole groups.
    assert tiny_config(expert_model_parallel_size=4, moe_device_groups=8,
                       num_moe_experts=24).num_device_groups() == 8


def test_derive_from_baseline_is_the_papers_2b_recipe():
    # GShard 2B baseline: 16 experts of FFN width 3424 (SwiGLU), top-2. DeepSeekMoE 2B: m = 4,
    # Ks = 1 -> 63 routed experts, 7 activated, width 0.25 FFN = 856 (deepseekmoe_2b.yaml).
    fields = derive_from_baseline(ffn_hidden_size=3424, num_experts=16, topk=2,
                                  segmentation=4, shared=1)
    assert fields == dict(num_moe_experts=63, moe_router_topk=7, moe_ffn_hidden_size=856,
                          moe_num_shared_experts=1)
    # Activated expert width per token stays the baseline's: (7 + 1) x 856 = 2 x 3424.
    assert (fields["moe_router_topk"] + 1) * fields["moe_ffn_hidden_size"] == 2 * 3424


@pytest.mark.parametrize("kwargs, message", [
    (dict(segmentation=3), "segmentation factor m=3 must be >= 1 and divide the FFN width 64"),
    (dict(segmentation=0), "segmentation factor m=0"),
    (dict(shared=8), "shared experts Ks=8 must be >= 0 and below m*K=8"),
    (dict(shared=-1), "shared experts Ks=-1"),
])
def test_derive_from_baseline_refuses_impossible_recipes(kwargs, message):
    args = dict(ffn_hidden_size=64, num_experts=4, topk=2, segmentation=4, shared=1) | kwargs
    with pytest.raises(ConfigError) as err:
        derive_from_baseline(**args)
    assert message in str(err.value)
