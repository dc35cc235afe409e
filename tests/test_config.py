"""DeepSeekMoEConfig: every validation error, with the field and the fix in its message, and the
paper's segmentation recipe."""

import pytest
import torch

from common import tiny_config
from dsmoe_megatron import config as config_module
from dsmoe_megatron import field_ranges
from dsmoe_megatron.config import ConfigError, derive_from_baseline


@pytest.mark.parametrize("changes, message", [
    (dict(moe_router_topk=9), "moe_router_topk=9 must be between 1 and num_moe_experts=8"),
    (dict(moe_router_topk=0), "moe_router_topk=0: must be >= 1"),
    (dict(moe_ffn_hidden_size=None, moe_num_shared_experts=1),
     "moe_num_shared_experts > 0 needs an expert width: set moe_ffn_hidden_size"),
    (dict(moe_num_shared_experts=-1), "moe_num_shared_experts=-1: must be >= 0"),
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
     "moe_device_balance_coeff=-0.1: must be >= 0"),
    (dict(moe_aux_loss_coeff=-0.01), "moe_aux_loss_coeff=-0.01: must be >= 0"),
    (dict(moe_aux_loss_coeff=[0.01, float("nan")]),
     "moe_aux_loss_coeff=[0.01, nan]: each entry must be a finite number"),
    # Megatron's own message named the shared-expert width for these.
    (dict(moe_ffn_hidden_size=0), "moe_ffn_hidden_size=0: must be >= 1"),
    (dict(moe_ffn_hidden_size=-16), "moe_ffn_hidden_size=-16: must be >= 1"),
    (dict(init_method_std=-0.02), "init_method_std=-0.02: must be > 0"),
    (dict(init_method_std=float("inf")), "init_method_std=inf: must be a finite number"),
    (dict(hidden_dropout=1.0), "hidden_dropout=1.0: must be in [0, 1)"),
    (dict(attention_dropout=-0.1), "attention_dropout=-0.1: must be in [0, 1)"),
    (dict(layernorm_epsilon=0.0), "layernorm_epsilon=0.0: must be > 0"),
    (dict(glu_linear_offset=float("nan")), "glu_linear_offset=nan: must be a finite number"),
    (dict(tensor_model_parallel_size=0), "tensor_model_parallel_size=0: must be >= 1"),
    (dict(num_attention_heads=3),
     "num_attention_heads=3 does not divide hidden_size=32 (each head gets hidden_size / "
     "num_attention_heads channels); use a head count that divides it, e.g. 2 or 4, or set "
     "kv_channels"),
    # 32 heads would divide it into heads of 1 channel, which RoPE cannot rotate
    (dict(num_attention_heads=40), "num_attention_heads=40 does not divide hidden_size=32 (each "
                                   "head gets hidden_size / num_attention_heads channels); use a "
                                   "head count that divides it, e.g. 16, or set kv_channels"),
    (dict(num_query_groups=3), "num_query_groups=3 does not divide num_attention_heads=4"),
    (dict(moe_layer_freq=0), "moe_layer_freq=0 must be an integer N >= 1 (every N-th layer is "
                             "MoE)"),
    (dict(moe_layer_freq=[0, 1, 1]), "or a list with one 0 (dense) or 1 (MoE) per layer (4 "
                                     "entries)"),
    (dict(moe_layer_freq=[0, 1, 2, 1]), "moe_layer_freq=[0, 1, 2, 1] must be an integer N >= 1"),
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


@pytest.mark.parametrize("name, value", [
    ("moe_expert_capacity_factor", 1.0), ("moe_pad_expert_input_to_capacity", True),
    ("moe_token_dropping", True), ("moe_expert_rank_capacity_factor", 1.5),
    ("moe_router_topk_scaling_factor", 2.5), ("moe_z_loss_coeff", 1e-3),
    ("moe_input_jitter_eps", 0.1), ("moe_router_num_groups", 2), ("moe_router_group_topk", 1),
    ("moe_router_topk_limited_devices", 1), ("moe_router_enable_expert_bias", True),
    ("moe_router_force_load_balancing", True), ("moe_router_dtype", "fp64"),
    ("moe_shared_expert_gate", True), ("moe_apply_probs_on_input", True), ("moe_latent_size", 16),
    # With Transformer Engine these deferred the expert weight gradients to backward_dw() calls
    # only Megatron's MoELayer and its combined 1F1B schedule make: the experts did not train.
    ("overlap_moe_expert_parallel_comm", True), ("delay_wgrad_compute", True),
    ("overlap_dispatch_backward_with_experts_wgrad", True),
    ("use_transformer_engine_op_fuser", True), ("moe_single_grouped_weight", True),
])
def test_megatron_moe_settings_the_block_does_not_implement_are_refused(name, value):
    """Each changed the loss or gradients of Megatron's own MoE layer; ours read none of them, so
    a run that set one trained without it."""
    with pytest.raises(ConfigError) as err:
        tiny_config(**{name: value})
    assert str(err.value).startswith(
        f"{name}={value!r} is a Megatron-core MoE setting the DeepSeekMoE block does not implement")
    assert str(err.value).endswith("remove it")


def test_what_the_block_does_anyway_may_be_said():
    cfg = tiny_config(moe_router_dtype="fp32", moe_z_loss_coeff=0.0, moe_input_jitter_eps=0.0)
    assert cfg.moe_router_dtype == "fp32"


@pytest.mark.parametrize("moe, changes, message", [
    (True, dict(normalization="LayerNorm"),
     "normalization='LayerNorm': DeepSeekMoE models use RMSNorm"),
    (False, dict(normalization="LayerNorm"),
     "normalization='LayerNorm': DeepSeekMoE models use RMSNorm"),
    (True, dict(gated_linear_unit=False), "gated_linear_unit=False: the routed experts are SwiGLU"),
    (True, dict(add_bias_linear=True), "add_bias_linear=True: the routed experts have no biases"),
])
def test_settings_the_built_model_would_not_have_are_refused(moe, changes, message):
    """Without Transformer Engine LayerNorm built RMSNorm, and the routed experts stayed
    bias-free SwiGLU: the model was not the one its config (and dsmoe-plan's count) described."""
    with pytest.raises(ConfigError, match=message):
        tiny_config(moe=moe, **changes)


def test_multi_token_prediction_is_refused():
    """It was accepted, and the model's forward failed on the labels' shape."""
    with pytest.raises(ConfigError, match="mtp_num_layers=1: multi-token prediction is not"):
        tiny_config(mtp_num_layers=1)
    assert not tiny_config(mtp_num_layers=0).mtp_num_layers


def test_a_dense_model_may_have_biases_and_an_ungated_mlp():
    cfg = tiny_config(moe=False, add_bias_linear=True, gated_linear_unit=False)
    assert cfg.add_bias_linear and not cfg.gated_linear_unit


@pytest.mark.parametrize("changes, message", [
    (dict(moe_aux_loss_coeff=[0.01, 0.02]),
     "moe_aux_loss_coeff=[0.01, 0.02]: one number, the expert-level balance factor a1"),
    (dict(context_parallel_size=2), "context_parallel_size=2: context parallelism is not supported"),
])
def test_megatron_forms_the_block_cannot_take(changes, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(**changes)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("name, value, expected", [
    ("hidden_dropout", 0.0, None), ("hidden_dropout", 0.999, None),
    ("hidden_dropout", 1.0, "must be in [0, 1)"), ("hidden_dropout", -1e-9, "must be in [0, 1)"),
    ("lr", 1e-12, None), ("lr", 0.0, "must be > 0"), ("lr", float("inf"), "must be a finite number"),
    ("lr_step_decay_factor", 1.0, None), ("lr_step_decay_factor", 0.0, "must be in (0, 1]"),
    ("lr_step_decay_at", [0.5, 0.9], None),
    ("lr_step_decay_at", [0.5, 1.0], "each entry must be in (0, 1)"),
    ("seed", 2**32 - 1, None), ("seed", 2**32, "must be in [0, 4294967295]"),
    ("num_layers", 1, None), ("num_layers", 0, "must be >= 1"),
    ("clip_grad", 0.0, None), ("clip_grad", float("nan"), "must be a finite number"),
    ("window_size", (-1, 0), None),  # -1: no window limit
    ("moe_router_force_biased", -0.5, None),  # the sign selects a mode
    ("not_a_listed_field", -5, None), ("not_a_listed_field", float("-inf"),
                                       "must be a finite number"),
    ("num_layers", None, None), ("hidden_dropout", "0.1", None),  # left to the type checks
])
def test_field_ranges(name, value, expected):
    assert field_ranges.problem(name, value) == expected


def test_field_ranges_table_lists_each_field_once():
    listed = [name for names in field_ranges._BY_RANGE.values() for name in names]
    assert len(listed) == len(set(listed)) == len(field_ranges.RANGES)


def test_a_heads_count_that_does_not_divide_the_hidden_size_is_fine_with_kv_channels():
    cfg = tiny_config(num_attention_heads=3, kv_channels=8)
    assert (cfg.num_attention_heads, cfg.kv_channels) == (3, 8)


@pytest.mark.parametrize("switch", [dict(enable_cuda_graph=True),
                                    dict(external_cuda_graph=True),
                                    dict(cuda_graph_impl="local"),
                                    dict(cuda_graph_impl="transformer_engine")])
def test_cuda_graphs_are_refused_with_the_reason(switch):
    (name, value), = switch.items()
    with pytest.raises(ConfigError) as err:
        tiny_config(**switch)
    message = str(err.value)
    assert message.startswith(f"{name}={value!r}: CUDA graphs are not supported")
    assert "per-expert token counts on the host" in message
    assert f"set {name}: {'false' if value is True else 'none'}" in message


def test_fp8_needs_transformer_engine(monkeypatch):
    monkeypatch.setattr(config_module, "_te_available", lambda: False)
    with pytest.raises(ConfigError, match=r"fp8='e4m3' \(fp8_recipe='delayed'\) needs Transformer "
                                          r"Engine.*set fp8: null"):
        tiny_config(fp8="e4m3", bf16=True, params_dtype=torch.bfloat16)


def fake_gpu(monkeypatch, capability):
    """Transformer Engine 'present' and a GPU of this compute capability; Megatron's TE version
    check passes. Only these calls are faked: the recipe check itself runs."""
    from megatron.core.transformer import transformer_config

    monkeypatch.setattr(config_module, "_te_available", lambda: True)
    monkeypatch.setattr(transformer_config, "is_te_min_version", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)


def low_precision(**fields):
    return tiny_config(bf16=True, params_dtype=torch.bfloat16, **fields)


@pytest.mark.parametrize("capability, fields, message", [
    ((8, 0), dict(fp8="hybrid"),
     "fp8='hybrid' (fp8_recipe='delayed') needs a GPU of compute capability >= 8.9 (FP8 tensor "
     "cores: Ada, Hopper or newer); this GPU is 8.0: set fp8: null on this machine"),
    (None, dict(fp8="e4m3", fp8_recipe="tensorwise"),
     "needs a GPU of compute capability >= 8.9 (FP8 tensor cores: Ada, Hopper or newer); there "
     "is no GPU here: set fp8: null"),
    # Hopper: MXFP8 needs Blackwell; the recipes that do run are offered.
    ((9, 0), dict(fp8="hybrid", fp8_recipe="mxfp8"),
     "fp8='hybrid' (fp8_recipe='mxfp8') needs a GPU of compute capability >= 10.0 (Blackwell); "
     "this GPU is 9.0: use fp8_recipe: delayed or tensorwise or blockwise, or set fp8: null"),
    ((8, 9), dict(fp8="hybrid", fp8_recipe="blockwise"),
     "(fp8_recipe='blockwise') needs a GPU of compute capability >= 9.0 (Hopper or newer); this "
     "GPU is 8.9: use fp8_recipe: delayed or tensorwise, or set fp8: null"),
    ((9, 0), dict(fp4="e2m1"),
     "fp4='e2m1' (fp4_recipe='nvfp4') needs a GPU of compute capability >= 10.0 (Blackwell); "
     "this GPU is 9.0: set fp4: null on this machine"),
    # RTX / workstation Blackwell: Transformer Engine refuses MXFP8 at the first step ("MXFP8
    # (for all gemm layouts) is not supported on 12.0+ architectures yet").
    ((12, 0), dict(fp8="hybrid", fp8_recipe="mxfp8"),
     "fp8='hybrid' (fp8_recipe='mxfp8') needs a GPU of compute capability >= 10.0 (Blackwell) "
     "and below 12.0 (Transformer Engine has no mxfp8 kernels for 12.x); this GPU is 12.0: use "
     "fp8_recipe: delayed or tensorwise or blockwise, or set fp8: null"),
])
def test_low_precision_recipes_are_checked_against_the_gpu(monkeypatch, capability, fields,
                                                           message):
    fake_gpu(monkeypatch, capability)
    with pytest.raises(ConfigError) as err:
        low_precision(**fields)
    assert message in str(err.value)


@pytest.mark.parametrize("cuda, refused", [("12.8", True), ("12.9", False), ("13.0", False)])
def test_blockwise_fp8_needs_a_torch_built_for_cuda_12_9(monkeypatch, cuda, refused):
    """Transformer Engine runs block-scaled FP8 GEMMs with CUDA >= 12.9 only ("FP8 block scaled
    GEMM requires compute capability 9.0 or higher and CUDA >= 12.9"), at the first FP8 step."""
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(torch.version, "cuda", cuda)
    if not refused:
        assert low_precision(fp8="e4m3", fp8_recipe="blockwise").fp8_recipe == "blockwise"
        return
    with pytest.raises(ConfigError) as err:
        low_precision(fp8="e4m3", fp8_recipe="blockwise")
    assert ("fp8='e4m3' (fp8_recipe='blockwise') needs torch built for CUDA >= 12.9 (Transformer "
            "Engine's block-scaled FP8 GEMMs); this torch is built for CUDA 12.8: install a torch "
            "for CUDA 12.9 or newer (PyPI's default is CUDA 13), or use fp8_recipe: tensorwise"
            ) in str(err.value)


@pytest.mark.parametrize("capability, fields", [
    ((8, 9), dict(fp8="hybrid")),
    ((9, 0), dict(fp8="hybrid", fp8_recipe="tensorwise")),
    ((9, 0), dict(fp8="e4m3", fp8_recipe="blockwise")),
    ((10, 0), dict(fp8="hybrid", fp8_recipe="mxfp8")),
    ((10, 3), dict(fp8="hybrid", fp8_recipe="mxfp8")),
    ((12, 0), dict(fp8="hybrid", fp8_recipe="tensorwise")),
    ((10, 0), dict(fp4="e2m1")),
    ((12, 0), dict(fp4="e2m1")),
])
def test_low_precision_recipes_the_gpu_runs_are_accepted(monkeypatch, capability, fields):
    fake_gpu(monkeypatch, capability)
    cfg = low_precision(**fields)
    assert all(getattr(cfg, k) == v for k, v in fields.items())


def test_te_backend_needs_transformer_engine(monkeypatch):
    monkeypatch.setattr(config_module, "_te_available", lambda: False)
    with pytest.raises(ConfigError, match=r"moe_expert_backend='te' needs Transformer Engine.*"
                                          r"use 'auto'"):
        tiny_config(moe_expert_backend="te")
    assert tiny_config(moe_expert_backend="auto").moe_expert_backend == "auto"


@pytest.mark.parametrize("grouped_mm", ["missing", "cuda only"])
def test_grouped_mm_backend_needs_a_torch_that_runs_it_here(monkeypatch, grouped_mm):
    """Before torch 2.8 there is no torch._grouped_mm; torch 2.8's has no CPU kernel ("Could not
    run 'aten::_grouped_mm' with arguments from the 'CPU' backend"): auto takes the per-expert
    loop there, and grouped_mm asked for is refused."""
    from dsmoe_megatron.backends import grouped_mm_runs, resolve_expert_backend

    if grouped_mm == "missing":
        monkeypatch.delattr(torch, "_grouped_mm")
    else:
        def cuda_only(*args, **kwargs):
            raise NotImplementedError("Could not run 'aten::_grouped_mm' with arguments from "
                                      "the 'CPU' backend")

        monkeypatch.setattr(torch, "_grouped_mm", cuda_only)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    grouped_mm_runs.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"needs torch._grouped_mm for this device and "
                                              r"params_dtype torch.float32 \(torch >= 2.8 for "
                                              r"bf16 on sm90 GPUs, >= 2.9 .*\); use 'auto'"):
            tiny_config(moe_expert_backend="grouped_mm")
        assert resolve_expert_backend("auto", torch.float32) == "sequential"
    finally:
        grouped_mm_runs.cache_clear()


def test_shared_width_is_derived_from_the_count():
    cfg = tiny_config(moe_num_shared_experts=2)
    assert cfg.moe_shared_expert_intermediate_size == 2 * 16


@pytest.mark.parametrize("freq", [
    "2", "[1,0,1,1]", 2.0, 1.5, True, (0, 1), [0, 1, 1, 1, 1], (1.0, 1, 1, 1), [True, 1, 1, 1]])
def test_moe_layer_freq_must_be_an_integer_or_a_list_of_one_0_or_1_per_layer(freq):
    """A string or a tuple was taken as a pattern of its own length ("2": one MoE layer of 4,
    the others left out of the pattern), a float failed in moe_layer_pattern with 'float' object
    is not iterable."""
    with pytest.raises(ConfigError) as err:
        tiny_config(moe_layer_freq=freq)
    assert str(err.value) == (
        f"moe_layer_freq={freq!r} must be an integer N >= 1 (every N-th layer is MoE) or a list "
        "with one 0 (dense) or 1 (MoE) per layer (4 entries)")


def test_dense_first_layers_and_layer_frequency():
    assert tiny_config().moe_layer_pattern() == [False, True, True, True]
    assert tiny_config(moe_first_k_dense=0, moe_layer_freq=2).moe_layer_pattern() == [
        True, False, True, False]
    assert tiny_config(moe_layer_freq=(1, 0, 1, 1)).moe_layer_pattern() == [
        False, False, True, True]
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
    (dict(segmentation=3), "segmentation=3 (m) must divide ffn_hidden_size=64"),
    (dict(segmentation=0), "segmentation=0 must be an integer >= 1"),
    (dict(shared=8), "shared=8 (Ks) must be below segmentation x topk = 8 (at least one routed "
                     "expert must stay active)"),
    (dict(shared=-1), "shared=-1 must be an integer >= 0"),
    # These returned negative or zero widths and counts, floats or True as the shared count.
    (dict(ffn_hidden_size=0), "ffn_hidden_size=0 must be an integer >= 1"),
    (dict(ffn_hidden_size=-64), "ffn_hidden_size=-64 must be an integer >= 1"),
    (dict(ffn_hidden_size=64.0), "ffn_hidden_size=64.0 must be an integer >= 1"),
    (dict(num_experts=0), "num_experts=0 must be an integer >= 1"),
    (dict(topk=0), "topk=0 must be an integer >= 1"),
    (dict(topk=5), "topk=5 must be at most num_experts=4 (each token picks K of the baseline's N "
                   "experts)"),
    (dict(segmentation=2.0), "segmentation=2.0 must be an integer >= 1"),
    (dict(shared=True), "shared=True must be an integer >= 0"),
])
def test_derive_from_baseline_refuses_impossible_recipes(kwargs, message):
    args = dict(ffn_hidden_size=64, num_experts=4, topk=2, segmentation=4, shared=1) | kwargs
    with pytest.raises(ConfigError) as err:
        derive_from_baseline(**args)
    assert str(err.value) == f"derive_from_baseline: {message}"


@pytest.mark.parametrize("name, value", [("glu_linear_offset", 1.0),
                                         ("activation_func_clamp_value", 5.0)])
def test_swiglu_variants_the_routed_experts_do_not_compute_are_refused(name, value):
    """The routed experts compute silu(gate) * up; with one of these set only the dense first
    layers and the shared experts applied it, a model of neither kind, trained in silence."""
    with pytest.raises(ConfigError) as err:
        tiny_config(**{name: value})
    assert str(err.value).startswith(f"{name}={value!r}: the routed experts' SwiGLU")
    tiny_config(moe=False, **{name: value})  # a dense model's MLPs all apply it


@pytest.mark.parametrize("name, value", [
    ("hidden_size", 32.0), ("num_layers", 4.0), ("num_moe_experts", 8.0),
    ("moe_ffn_hidden_size", 16.0), ("moe_router_topk", 3.0), ("moe_num_shared_experts", 1.0),
    ("moe_first_k_dense", 1.0), ("ffn_hidden_size", 64.0), ("num_attention_heads", 4.0),
    ("num_query_groups", 2.0), ("kv_channels", 8.0), ("moe_device_groups", 1.0),
    ("tensor_model_parallel_size", 1.0), ("num_layers", True), ("moe_router_topk", True),
    ("moe_first_k_dense", True), ("moe_num_shared_experts", True),
])
def test_sizes_and_counts_must_be_integers(name, value):
    """From Python they were taken as given: 1408.0 became a float width in the layers' shapes
    (or a failure deep in torch), True counted as 1."""
    with pytest.raises(ConfigError) as err:
        tiny_config(**{name: value})
    assert str(err.value) == f"{name}={value!r}: must be an integer (a size or count)"
