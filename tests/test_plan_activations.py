"""The planner's activation memory against the tensors autograd actually saves.

Each case builds a two-layer decoder block from the project's specs, runs its forward under
``torch.autograd.graph.saved_tensors_hooks`` (planning/measure.py) and compares the bytes saved
per layer with planning/memory.py's ``chunk_activations`` for the same config (the ``local``
implementation: what runs without Transformer Engine). Dense and MoE layers, fp32 and bf16,
different hidden sizes, heads, expert counts, widths and top-k, with and without recompute; the
multi-rank cases cover TP, SP, expert TP and EP. Megatron's layernorm recompute needs TE and is
not measured here.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from dsmoe_megatron import runtime
from dsmoe_megatron.config import DeepSeekMoEConfig, deepseek_defaults
from dsmoe_megatron.planning.activations import Micro
from dsmoe_megatron.planning.measure import measure_block
from dsmoe_megatron.planning.memory import chunk_activations
from dsmoe_megatron.runtime import ParallelLayout

SEQ, BATCH = 32, 2
# The model counts these layers to a few bytes; 2% (tighter than the 10% the planner promises)
# still fails when a component of a few per cent is missed or the code starts keeping more.
TOLERANCE = 0.02

SMALL = dict(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128)
GQA = dict(hidden_size=96, num_attention_heads=6, num_query_groups=2, ffn_hidden_size=160)
EXPERTS = dict(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
               moe_num_shared_experts=1)
FINE = dict(num_moe_experts=16, moe_router_topk=3, moe_ffn_hidden_size=24,
            moe_num_shared_experts=2)
NO_SHARED = dict(num_moe_experts=6, moe_router_topk=4, moe_ffn_hidden_size=48,
                 moe_num_shared_experts=0)
FULL_1 = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
FULL_2 = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
BLOCK_1 = dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)


def selective(*modules):
    return dict(recompute_granularity="selective", recompute_modules=list(modules))


# name: (dtype, fields)
CASES = {
    "dense-fp32": (torch.float32, SMALL),
    "dense-bf16-gqa": (torch.bfloat16, GQA),
    "moe-fp32": (torch.float32, {**SMALL, **EXPERTS}),
    "moe-bf16-fine-gqa": (torch.bfloat16, {**GQA, **FINE}),
    "moe-bf16-no-shared": (torch.bfloat16, {**SMALL, **NO_SHARED}),
    "moe-fp32-no-shared": (torch.float32, {**SMALL, **NO_SHARED}),
    "moe-bf16-top1": (torch.bfloat16, dict(hidden_size=80, num_attention_heads=5,
                                           ffn_hidden_size=96, num_moe_experts=12,
                                           moe_router_topk=1, moe_ffn_hidden_size=40,
                                           moe_num_shared_experts=1)),
    "dense-bf16-mlp-recompute": (torch.bfloat16, {**SMALL, **selective("mlp")}),
    "moe-bf16-mlp-recompute": (torch.bfloat16, {**GQA, **FINE, **selective("mlp")}),
    "moe-bf16-core-attn-recompute": (torch.bfloat16, {**GQA, **EXPERTS,
                                                     **selective("core_attn")}),
    "dense-fp32-core-attn-recompute": (torch.float32, {**SMALL, **selective("core_attn")}),
    "moe-bf16-full-recompute": (torch.bfloat16, {**SMALL, **EXPERTS, **FULL_1}),
    "dense-fp32-full-recompute-2": (torch.float32, {**SMALL, **FULL_2}),
    "moe-bf16-block-recompute": (torch.bfloat16, {**GQA, **FINE, **BLOCK_1}),
}
# Megatron-core's MoE recompute modules: modelled; measured once the DeepSeekMoE block acts on
# them (until then a run with the module equals one without, and the case says so)
MOE_MODULES = ("moe_act", "moe", "shared_experts")


def make_config(dtype, fields: dict, layout: ParallelLayout = ParallelLayout()
                ) -> DeepSeekMoEConfig:
    moe = "num_moe_experts" in fields
    kwargs = dict(deepseek_defaults(), num_layers=2, init_method_std=0.02, params_dtype=dtype,
                  pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, moe_first_k_dense=0,
                  moe_aux_loss_coeff=0.01 if moe else 0.0)
    kwargs.update(layout.config_fields())
    kwargs.update(fields)
    if moe and "moe_act" in (kwargs.get("recompute_modules") or ()):
        kwargs["moe_grouped_gemm"] = True  # Megatron's rule for moe_act
    return DeepSeekMoEConfig(**kwargs)


def planned_per_layer(cfg: DeepSeekMoEConfig) -> float:
    kept, _ = chunk_activations(cfg, cfg.moe_layer_pattern(), Micro.of(cfg, SEQ, BATCH, "local"))
    return kept / cfg.num_layers


@pytest.fixture(scope="module")
def single_rank():
    runtime.initialize()
    yield
    runtime.shutdown()


@pytest.mark.parametrize("name", list(CASES))
def test_planned_activations_match_saved_tensors(single_rank, name):
    dtype, fields = CASES[name]
    cfg = make_config(dtype, fields)
    measured = measure_block(cfg, SEQ, BATCH)
    planned = planned_per_layer(cfg)
    assert planned == pytest.approx(measured.per_layer, rel=TOLERANCE), (
        f"{name}: planned {planned:.0f} B per layer, saved {measured.per_layer:.0f} B; saved by "
        f"module: {measured.by_module}")


@pytest.mark.parametrize("module", MOE_MODULES)
def test_moe_recompute_modules(single_rank, module):
    cfg = make_config(torch.bfloat16, {**SMALL, **EXPERTS, **selective(module)})
    measured = measure_block(cfg, SEQ, BATCH)
    without = measure_block(make_config(torch.bfloat16, {**SMALL, **EXPERTS}), SEQ, BATCH)
    if measured.per_layer == without.per_layer:
        pytest.skip(f"recompute_modules=[{module}] changes nothing the DeepSeekMoE block saves "
                    "yet: modelled with Megatron-core's meaning, not measurable")
    assert planned_per_layer(cfg) == pytest.approx(measured.per_layer, rel=TOLERANCE)


# ---------------------------------------------------------------------------------------------
# Several ranks: every rank measures, the mean over ranks is compared (EP spreads the routed
# rows unevenly; their total is what the planner counts)

LAYOUTS = {
    "tp2-sp-etp1": ParallelLayout(tensor=2, sequence_parallel=True, expert_tensor=1),
    "tp2-sp-etp2": ParallelLayout(tensor=2, sequence_parallel=True),
    "tp2-etp1": ParallelLayout(tensor=2, expert_tensor=1),
    "tp2-etp2": ParallelLayout(tensor=2),
    "ep2": ParallelLayout(expert=2),
    "tp2-sp-ep2": ParallelLayout(tensor=2, expert=2, expert_tensor=1, sequence_parallel=True),
}
# expert width 32: 16 per expert-TP rank, a multiple of torch._grouped_mm's 16-byte stride
SHARDED = {**GQA, **FINE, "moe_ffn_hidden_size": 32}


def _measure_layouts(layouts: dict) -> dict:
    out = {}
    for name, layout in layouts.items():
        runtime.initialize(layout)
        cfg = make_config(torch.bfloat16, SHARDED, layout)
        out[name] = (measure_block(cfg, SEQ, BATCH).per_layer, planned_per_layer(cfg))
    return out


@pytest.mark.distributed
def test_planned_activations_match_saved_tensors_on_two_ranks():
    ranks = run_on_ranks(_measure_layouts, 2, args=(LAYOUTS,))
    for name in LAYOUTS:
        measured = sum(rank[name][0] for rank in ranks) / len(ranks)
        planned = ranks[0][name][1]
        assert planned == pytest.approx(measured, rel=TOLERANCE), name
