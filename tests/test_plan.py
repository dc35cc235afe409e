"""dsmoe-plan: the paper's parameter and FLOPs figures, memory, step time, the layout search, the
presets and the cluster launcher, exact parameter counts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_on_ranks
from dsmoe_megatron import plan
from dsmoe_megatron.planning import memory, search
from dsmoe_megatron.planning.activations import Micro
from dsmoe_megatron.planning.hardware import GPUS, Cluster
from dsmoe_megatron.planning.params import nominal_ffn_size
from dsmoe_megatron.runtime import ParallelLayout
from dsmoe_megatron.yaml_config import check_world_size, load_run_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "yaml_configs"


def make(name: str, overrides=(), world_size: int | None = None) -> dict:
    run = load_run_config(CONFIGS / name, list(overrides), instantiate_checks=False)
    return plan.make_plan(run, world_size)


def billions(x: float) -> str:
    return f"{x / 1e9:.1f}"


def tera(x: float) -> str:
    return f"{x / 1e12:.1f}"


# ---------------------------------------------------------------------------------------------
# The paper's figures (arXiv 2401.06066), to the printed precision


def test_deepseekmoe_2b_tables_1_and_2():
    p = make("deepseekmoe_2b.yaml", world_size=64)
    assert billions(p["total_params"]) == "2.0"          # Table 1: # Total Params
    assert billions(p["activated_params"]) == "0.3"      # Table 1: # Activated Params
    assert tera(p["flops_per_sequence"]) == "4.3"        # Table 1: FLOPs per 2K Tokens
    assert tera(p["nominal_flops_per_token"] * 2048) == "4.3"
    routed, shared = p["params"]["routed experts"], p["params"]["shared experts"]
    assert f"{(routed['total'] + shared['total']) / 1e9:.2f}" == "1.89"  # Table 2: expert params
    assert f"{(routed['activated'] + shared['activated']) / 1e9:.2f}" == "0.24"


def test_deepseekmoe_16b_table_3():
    p = make("deepseekmoe_16b.yaml", world_size=128)
    assert billions(p["total_params"]) == "16.4"
    assert billions(p["activated_params"]) == "2.8"
    # Table 3 prints 74.4T: the paper's formula on the nominal sizes (expert = standard FFN / 4)
    assert tera(p["nominal_flops_per_4k_tokens"]) == "74.4"
    # the real expert width 1408 costs 2% more
    assert tera(p["flops_per_4k_tokens"]) == "75.8"
    assert p["flops_per_4k_tokens"] == p["flops_per_sequence"]
    attention = p["params"]["attention"]["total"]
    assert billions(attention) == "0.5"  # Sec. 5.2.1: "only about 0.5B attention parameters"


# deepseek-moe-16b-base's config.json, but initializer_range (0.02; the paper trains with 0.006),
# the token ids and the dtype
RELEASED_16B = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
    n_routed_experts=64, num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1,
    norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
    hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
    rope_scaling=None, attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False)


def test_deepseekmoe_16b_is_the_released_model():
    import torch

    from dsmoe_megatron.hf.mapping import hf_config_dict

    run = load_run_config(CONFIGS / "deepseekmoe_16b.yaml", instantiate_checks=False)
    hf = hf_config_dict(run.model, run.train.vocab_size, run.train.max_position_embeddings,
                        torch.bfloat16)
    assert {key: hf[key] for key in RELEASED_16B} == RELEASED_16B


def test_deepseekmoe_145b_table_6():
    p = make("deepseekmoe_145b.yaml", world_size=1024)
    assert billions(p["total_params"]) == "144.6"
    assert billions(p["activated_params"]) == "22.2"
    assert tera(p["flops_per_4k_tokens"]) == "585.6"
    # with idealised sizes it costs exactly what GShard 137B costs in Table 6
    assert tera(p["nominal_flops_per_4k_tokens"]) == "572.7"


HALF_ACTIVATED = ["deepseekmoe.moe_num_shared_experts=2", "language_model.moe_router_topk=6",
                  "language_model.ffn_hidden_size=11264"]


def test_deepseekmoe_142b_half_activated_table_6():
    # 2 shared + 6 of 128 routed, the dense layer as wide as the activated experts (8 x 1408)
    p = make("deepseekmoe_145b.yaml", HALF_ACTIVATED, world_size=1024)
    assert tera(p["flops_per_4k_tokens"]) == "374.6"
    assert f"{p['flops_per_4k_tokens'] / 2057.5e12:.3f}" == "0.182"  # "18.2% of computations"


DENSE = ["language_model.num_moe_experts=null", "language_model.moe_ffn_hidden_size=null",
         "deepseekmoe.moe_num_shared_experts=0", "deepseekmoe.moe_first_k_dense=0",
         "deepseekmoe.moe_device_balance_coeff=0", "deepseekmoe.moe_device_groups=null",
         "model_parallel.expert_model_parallel_size=1"]


def dims(layers, hidden, heads, ffn, vocab=None, groups=None):
    out = [f"num_layers={layers}", f"hidden_size={hidden}", f"num_attention_heads={heads}",
           f"ffn_hidden_size={ffn}", "model_parallel.tensor_model_parallel_size=1",
           "model_parallel.pipeline_model_parallel_size=1",
           "model_parallel.sequence_parallel=false",
           "model_parallel.account_for_embedding_in_pipeline_split=false",
           "model_parallel.account_for_loss_in_pipeline_split=false"]
    if vocab:
        out.append(f"vocab_size={vocab}")
    if groups:
        out.append(f"num_query_groups={groups}")
    return out


GSHARD_2B = ["deepseekmoe.moe_num_shared_experts=0", "language_model.num_moe_experts=16"]


@pytest.mark.parametrize("name, overrides, tokens, printed", [
    # Table 3 / 4 / 6 dense models (4K tokens)
    ("deepseekmoe_16b.yaml", DENSE + dims(30, 4096, 32, 11008), 4096, "183.5"),   # DeepSeek 7B
    ("deepseekmoe_16b.yaml", DENSE + dims(32, 4096, 32, 11008, vocab=32000), 4096, "187.9"),
    ("deepseekmoe_16b.yaml", DENSE + dims(95, 8192, 64, 22016, groups=8), 4096, "2057.5"),
    # Table 6: GShard 137B, top-2 of 16 standard-FFN experts
    ("deepseekmoe_145b.yaml", ["num_moe_experts=16", "moe_router_topk=2",
                               "moe_ffn_hidden_size=10944", "ffn_hidden_size=21888",
                               "deepseekmoe.moe_num_shared_experts=0"], 4096, "572.7"),
    # Tables 1 and 2 (2K tokens): Dense, Switch (top-1), GShard (top-2), GShard x1.5, Dense x16
    ("deepseekmoe_2b.yaml", DENSE, 2048, "2.9"),
    ("deepseekmoe_2b.yaml", GSHARD_2B + ["moe_router_topk=1", "moe_ffn_hidden_size=3424"],
     2048, "2.9"),
    ("deepseekmoe_2b.yaml", GSHARD_2B + ["moe_router_topk=2", "moe_ffn_hidden_size=3424"],
     2048, "4.3"),
    ("deepseekmoe_2b.yaml", GSHARD_2B + ["moe_router_topk=2", "moe_ffn_hidden_size=5136"],
     2048, "5.8"),
    ("deepseekmoe_2b.yaml", DENSE + ["ffn_hidden_size=54784"], 2048, "24.6"),
], ids=["deepseek-7b", "llama2-7b", "deepseek-67b", "gshard-137b", "2b-dense", "2b-switch",
        "2b-gshard", "2b-gshard-x1.5", "2b-dense-x16"])
def test_nominal_count_reproduces_the_papers_baselines(name, overrides, tokens, printed):
    p = make(name, overrides)
    assert tera(p["nominal_flops_per_token"] * tokens) == printed


def test_nominal_sizes():
    assert nominal_ffn_size(1408, 2048) == 0.25     # 16B expert: standard / 4
    assert nominal_ffn_size(1408, 4096) == 0.125    # 145B expert: standard / 8
    assert nominal_ffn_size(10944, 2048) == 2.0     # 16B dense layer
    assert nominal_ffn_size(11008, 4096) == 1.0     # DeepSeek 7B / LLaMA2 7B FFN
    assert nominal_ffn_size(5136, 1280) == 1.5      # GShard x1.5 expert


def test_flops_count_by_hand():
    """The tiny model's training FLOPs per token, term by term."""
    p = make("tiny.yaml")
    h, s, layers = 128, 128, 4
    v = p["padded_vocab_size"]  # the output layer computes the padded rows
    attention = 4 * h * h * 2 + 2 * 2 * s * h
    ffn = {False: 2 * 3 * h * 256, True: 2 * 3 * h * (64 + 3 * 64)}
    forward = sum(attention + ffn[i > 0] for i in range(layers)) + 2 * v * h
    assert p["flops_per_token"] == 3 * forward
    assert p["flops_per_4k_tokens"] == 4096 * 3 * forward


# ---------------------------------------------------------------------------------------------
# Command line


def test_json_output(capsys):
    assert plan.main(["yaml_configs/tiny.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("total_params", "activated_params"):
        assert isinstance(out[key], int) and out[key] > 0
    for key in ("flops_per_token", "flops_per_4k_tokens"):
        assert out[key] > 0
    assert out["activated_params"] < out["total_params"]
    assert out["flops_per_4k_tokens"] == 4096 * out["flops_per_token"]
    assert out["memory"]["world_size"] == 1 and out["memory"]["max_bytes_per_gpu"] > 0
    assert out["fit"]["fits"] and out["step_time"]["step_time"] > 0


def test_cli_overrides_world_size_and_table(capsys):
    assert plan.main(["yaml_configs/deepseekmoe_16b.yaml", "--gpus", "128"]) == 0
    text = capsys.readouterr().out
    for needle in ("routed experts", "activated/token", "per 4K tokens", "counted as:",
                   "Memory per GPU", "DP128", "expert DP 16", "distributed optimizer",
                   "fits H100-80GB", "Step time on 128 x H100-80GB (16 node(s))",
                   "EP all-to-all (NVLink)", "pipeline", "allowance"):
        assert needle in text, needle
    assert plan.main(["yaml_configs/tiny.yaml", "language_model.num_layers=6", "--json"]) == 0
    six = json.loads(capsys.readouterr().out)
    assert six["num_layers"] == 6 and six["num_moe_layers"] == 5
    assert plan.main(["yaml_configs/tiny.yaml", "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "global_batch_size=8 is not divisible" in err
    assert plan.main(["yaml_configs/tiny.yaml", "language_model.num_layer=6"]) == 2
    assert "did you mean num_layers?" in capsys.readouterr().err
    assert plan.main(["yaml_configs/tiny.yaml", "--gpu", "H100"]) == 2
    err = capsys.readouterr().err
    assert "did you mean H100-80GB or H100-PCIe or H100-NVL?" in err
    assert "(known: A100-40GB, A100-80GB, H100-80GB, H100-PCIe, H100-NVL, H200-141GB, B200, " \
        "L40S)" in err
    # the hint names the same model (spelling alone named B200 for all four), or nothing: the
    # L40 is not the L40S (half its BF16 rate), nor the B100 the B200, nor the RTX A1000 an A100
    for typed, hint in [("H200", "H200-141GB"), ("a100", "A100-40GB or A100-80GB"),
                        ("A100-SXM4-40GB", "A100-40GB or A100-80GB"), ("H100SXM", "H100-80GB or "
                        "H100-PCIe or H100-NVL"), ("V100", None), ("L40", None), ("B100", None),
                        ("A1000", None)]:
        assert plan.main(["yaml_configs/tiny.yaml", "--gpu", typed]) == 2
        err = capsys.readouterr().err
        assert (f"did you mean {hint}?" in err) if hint else "did you mean" not in err, err
        assert "add its datasheet figures to GPUS in dsmoe_megatron/planning/hardware.py" in err
    assert plan.main(["yaml_configs/tiny.yaml", "--gpu", "b200", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fit"]["gpu"] == "B200"
    assert plan.main(["yaml_configs/tiny.yaml", "--search"]) == 2
    assert "--search needs --gpus" in capsys.readouterr().err
    # --top 0 or -1 printed every layout that fits (thousands); --gpus 0 did not name the flag.
    for flag, value in [("--top", "0"), ("--top", "-1"), ("--gpus", "0"), ("--gpus-per-node", "0")]:
        with pytest.raises(SystemExit) as stop:
            plan.main(["yaml_configs/tiny.yaml", "--gpus", "2", "--search", flag, value])
        assert stop.value.code == 2
        assert f"argument {flag}" in capsys.readouterr().err


def test_search_options_without_search_are_refused(capsys):
    # 16B on 128 GPUs has 40% headroom: '--min-headroom 0.5' was ignored and the plan exited 0
    for flag, value in [("--min-headroom", "0.5"), ("--top", "3")]:
        assert plan.main(["yaml_configs/deepseekmoe_16b.yaml", "--gpus", "128", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} applies to --search only" in err and len(err.splitlines()) == 1


def test_module_entry_point_prints_only_json():
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.plan", "yaml_configs/deepseekmoe_145b.yaml",
         "--json", "--gpus", "1024"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    data = json.loads(out.stdout)
    assert f"{data['total_params'] / 1e9:.1f}" == "144.6"
    assert data["memory"]["data_parallel_size"] == 32  # 1024 / (TP 2 x PP 16)
    assert data["fit"]["fits"]


OLD_145B_LAYOUT = ["model_parallel.tensor_model_parallel_size=2",
                   "model_parallel.pipeline_model_parallel_size=4"]


def test_a_layout_that_does_not_fit_is_reported_as_such(capsys):
    # TP2 x PP4 x EP8 without recompute: 16 layers per stage
    args = ["yaml_configs/deepseekmoe_145b.yaml", *OLD_145B_LAYOUT, "--gpus", "1024"]
    assert plan.main(args) == 1
    text = capsys.readouterr().out
    assert "does NOT fit H100-80GB" in text
    assert plan.main([*args, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["fit"]["fits"] and out["memory"]["max_bytes_per_gpu"] > 80e9
    # the same layout fits an H200 (141 GB)
    assert plan.main([*args, "--gpu", "H200-141GB"]) == 0
    assert "fits H200-141GB" in capsys.readouterr().out


def test_memory_model_of_the_paper_layouts():
    for name, world in (("deepseekmoe_2b.yaml", 64), ("deepseekmoe_16b.yaml", 128),
                        ("deepseekmoe_145b.yaml", 1024)):
        mem = make(name, world_size=world)["memory"]
        for st in mem["stages"]:
            assert st["weights"] == 2 * st["params"] and st["grads"] == 4 * st["params"]
            assert st["fp8_weights"] == 0
            assert st["total"] == pytest.approx(st["tensors"] + st["allowance"])
    mem = make("deepseekmoe_145b.yaml", world_size=1024)["memory"]
    # 62 layers + embedding + loss over 16 stages
    assert [st["layers"] for st in mem["stages"]] == [3] + [4] * 14 + [3]
    assert mem["expert_data_parallel_size"] == 8 and mem["num_microbatches"] == 144  # 4608 / DP 32
    # 1F1B: stage s holds PP - s micro-batches at the peak
    assert [st["in_flight"] for st in mem["stages"]] == [[16 - s] for s in range(16)]
    # the optimizer state is sharded: 12 bytes per dense param over DP, per expert param over EDP
    st = mem["stages"][1]
    assert st["optimizer"] == pytest.approx(
        12 * st["dense_params"] / 32 + 12 * st["expert_params"] / 8)
    # one GPU: nothing to shard
    one = make("tiny.yaml", ["bf16=true"], world_size=1)["memory"]["stages"][0]
    assert one["optimizer"] == 12 * one["params"]


def test_optimizer_state_follows_use_distributed_optimizer(capsys):
    # without the distributed optimizer every rank holds all of Adam's state
    mem = make("deepseekmoe_16b.yaml", ["use_distributed_optimizer=false"], 128)["memory"]
    [st] = mem["stages"]
    assert not mem["distributed_optimizer"]
    assert st["optimizer"] == 12 * st["params"]
    assert any(note.startswith("Adam, not sharded") for note in mem["assumptions"])
    args = ["yaml_configs/deepseekmoe_16b.yaml", "--gpus", "128"]
    assert plan.main(args) == 0
    assert plan.main([*args, "use_distributed_optimizer=false"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Memory model: schedules, recompute, FP8


def pipeline_config(pp: int, vpp: int | None = None, layers: int = 8):
    return load_run_config(CONFIGS / "tiny.yaml", [
        f"num_layers={layers}", f"model_parallel.pipeline_model_parallel_size={pp}",
        f"model_parallel.virtual_pipeline_model_parallel_size={'null' if vpp is None else vpp}",
    ], instantiate_checks=False).model


def test_micro_batches_in_flight_follow_megatrons_schedules():
    cfg = pipeline_config(4)
    # 1F1B: rank r holds min(PP - r, micro-batches)
    assert [memory.in_flight(cfg, r, 8) for r in range(4)] == [[4], [3], [2], [1]]
    assert [memory.in_flight(cfg, r, 2) for r in range(4)] == [[2], [2], [2], [1]]
    # interleaved: the first rank holds p (1 + (p - 1) / (p v)) stage-micro-batches
    # (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters")
    for p, v in ((4, 2), (2, 4), (4, 4)):
        counts = memory.in_flight(pipeline_config(p, v, layers=p * v), 0, 64)
        assert len(counts) == v
        assert sum(counts) / v == pytest.approx(p * (1 + (p - 1) / (p * v)))


def test_recompute_and_fp8_lower_the_activations():
    base = ["bf16=true", "model_parallel.tensor_model_parallel_size=2",
            "model_parallel.sequence_parallel=true", "language_model.num_layers=8"]

    def kept(*extra):
        cfg = load_run_config(CONFIGS / "tiny.yaml", base + list(extra),
                              instantiate_checks=False).model
        return memory.chunk_activations(cfg, cfg.moe_layer_pattern(), Micro.of(cfg, 128, 4))

    none, transient = kept()
    full, full_transient = kept("recompute_granularity=full", "recompute_method=uniform",
                                "recompute_num_layers=1")
    # full recompute keeps each layer's input [seq / SP, batch, hidden] in bf16 ...
    assert full == 8 * 2 * 128 / 2 * 4 * 128
    # ... and re-materialises one layer during its backward
    assert full_transient == transient
    two, _ = kept("recompute_granularity=full", "recompute_method=uniform",
                  "recompute_num_layers=2")
    assert two == full / 2
    block, _ = kept("recompute_granularity=full", "recompute_method=block",
                    "recompute_num_layers=3")
    assert full < block < none
    selective, _ = kept("recompute_granularity=selective", "recompute_modules=[mlp]")
    assert full < selective < none
    fp8, _ = kept("model_parallel.fp8=hybrid")
    assert fp8 < none
    fp8_weights = make("tiny.yaml", base + ["model_parallel.fp8=hybrid"], world_size=2)
    assert fp8_weights["memory"]["stages"][0]["fp8_weights"] > 0


# ---------------------------------------------------------------------------------------------
# GPUs, step time, search


def test_gpu_table():
    assert set(GPUS) == {"H100-80GB", "H200-141GB", "A100-80GB", "B200", "A100-40GB", "L40S",
                         "H100-PCIe", "H100-NVL"}
    for gpu in GPUS.values():
        assert gpu.bf16_flops > 0 and gpu.memory > 0 and gpu.memory_bandwidth > 0
        assert gpu.nvlink_bandwidth > gpu.network_bandwidth > 0 and gpu.source
        # the L40S datasheet prints BF16 362.05 and FP8 733 dense
        assert gpu.fp8_flops is None or gpu.fp8_flops == pytest.approx(2 * gpu.bf16_flops,
                                                                       rel=0.02)
    assert GPUS["A100-80GB"].fp8_flops is None and GPUS["A100-40GB"].fp8_flops is None
    # the GPUs without NVLink across the node use a PCIe x16 link inside it: Gen4 32 GB/s, Gen5
    # 64 GB/s per direction, not an NVLink figure
    pcie = {name: gpu.nvlink_bandwidth for name, gpu in GPUS.items()
            if gpu.intra_node_link != "NVLink"}
    assert pcie == {"L40S": 32e9, "H100-PCIe": 64e9, "H100-NVL": 64e9}
    assert {GPUS[name].intra_node_link for name in pcie} == {"PCIe Gen4 x16", "PCIe Gen5 x16"}
    run = load_run_config(CONFIGS / "tiny.yaml", ["model_parallel.fp8=hybrid", "bf16=true"],
                          instantiate_checks=False)
    with pytest.raises(ValueError, match="A100-80GB has no FP8 tensor cores"):
        plan.make_plan(run, 1, gpu="A100-80GB")


def test_step_time_accounts_for_every_second():
    p = make("deepseekmoe_16b.yaml", world_size=128)
    t = p["step_time"]
    assert sum(t["breakdown"].values()) == pytest.approx(t["step_time"])
    assert t["tokens_per_step"] == 4608 * 4096 == p["tokens_per_step"]
    assert t["tokens_per_second_per_gpu"] * t["step_time"] * 128 == pytest.approx(4608 * 4096)
    assert t["mfu"] == pytest.approx(p["flops_per_step"] / (t["step_time"] * 128 * 989e12))
    # EP 8 inside a node of 8: the all-to-all never leaves NVLink; no pipeline, no bubble
    assert t["ep_alltoall_bytes_per_step"]["network"] == 0
    assert t["breakdown"]["pipeline bubble"] == 0 and t["breakdown"]["PP send/recv"] == 0
    # the same layout on twice the GPU throughput: compute halves, communication stays
    b200 = plan.make_plan(load_run_config(CONFIGS / "deepseekmoe_16b.yaml",
                                          instantiate_checks=False), 128, gpu="B200")
    for key in ("GEMMs", "expert GEMMs", "attention"):
        assert b200["step_time"]["breakdown"][key] == pytest.approx(
            t["breakdown"][key] * 989 / 2250)



@pytest.mark.parametrize("ep, memory_bound", [(1, True), (8, False)])
def test_expert_gemms_are_no_faster_than_reading_the_experts_weights(ep, memory_bound):
    # 145B at TP4 (SP) x PP32 on 256 H100s: 2 MoE layers per middle stage, 1024 tokens per GPU
    # and micro-batch. With all 128 experts on each GPU (EP1) that is 96 rows per expert: the
    # weights' HBM bytes, not the FLOPs, set the time. With 16 (EP8) the FLOPs do.
    p = make("deepseekmoe_145b.yaml", ["model_parallel.tensor_model_parallel_size=4",
                                       "model_parallel.pipeline_model_parallel_size=32",
                                       f"model_parallel.expert_model_parallel_size={ep}"], 256)
    micro_batches = 4608 // (256 // (4 * 32))
    flops = 1024 * 12 * 2 * 3 * 4096 * 1408 / (989e12 * 0.7 * 0.8)
    params = 128 // ep * 3 * 4096 * 1408
    reads = params * 2 / 3350e9                  # bf16 weights
    accumulates = params * (4 + 4) / 3350e9      # fp32 main_grad read and written
    forward, backward = max(flops, reads), max(2 * flops, reads + accumulates)
    assert (forward == reads and backward > 2 * flops) == memory_bound
    assert p["step_time"]["breakdown"]["expert GEMMs"] == pytest.approx(
        micro_batches * 2 * (forward + backward))

def test_a_pcie_node_times_the_all_to_all_at_pcie_speed(capsys):
    """H100 PCIe: the H100's bytes on the same layout (EP 8 inside the node) at 64 GB/s instead
    of NVLink's 450: the all-to-all takes 450 / 64 times as long, and the plan says which link
    it is."""
    run = load_run_config(CONFIGS / "deepseekmoe_16b.yaml", instantiate_checks=False)
    sxm, pcie = (plan.make_plan(run, 128, gpu=gpu)["step_time"]
                 for gpu in ("H100-80GB", "H100-PCIe"))
    assert pcie["ep_alltoall_bytes_per_step"] == sxm["ep_alltoall_bytes_per_step"]
    latency = 4 * 27 * 36 * 20e-6  # 4 all-to-alls in each of 27 MoE layers, 36 micro-batches
    a2a = [t["breakdown"]["EP all-to-all (NVLink)"] - latency for t in (sxm, pcie)]
    assert a2a[1] == pytest.approx(a2a[0] * 450 / 64)
    assert plan.main(["yaml_configs/deepseekmoe_16b.yaml", "--gpus", "128", "--gpu", "L40S"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "does NOT fit L40S (48.0 GB)" in out
    # the text names the link the bytes cross (the JSON keys keep "NVLink"): it said "EP
    # all-to-all (NVLink)", "GB over NVLink" and "80% of NVLink" for a card without any
    for needle in ("L40S has no NVLink across the node: its GPUs talk over PCIe Gen4 x16, 32.0 "
                   "GB/s", "EP all-to-all (PCIe) ", "GB over PCIe, ", "collectives at 80% of PCIe "
                   "/ 80% of the network", "EP all-to-all: PCIe and network bytes"):
        assert needle in out, needle
    assert out.count("NVLink") == 1, out
    assert plan.main(["yaml_configs/deepseekmoe_16b.yaml", "--gpus", "128"]) == 0
    out = capsys.readouterr().out
    assert "has no NVLink" not in out and "PCIe" not in out and "GB over NVLink" in out


def test_16b_on_one_node_of_a100_40gb(capsys):
    """Weights (bf16, 2 bytes), gradients (fp32, 4) and Adam (fp32 params and moments, 12,
    sharded over DP; the routed experts over expert DP) counted by hand from the 16B shapes:
    the YAML's layout on 8 GPUs (EP 8, DP 8, expert DP 1) holds 44 GB of them per GPU, more than
    an A100-40GB before any activation; an A100-80GB holds it all."""
    h, vocab = 2048, 102400
    attention, expert = 4 * h * h, 3 * h * 1408
    dense = 28 * attention + 3 * h * 10944 + 27 * (2 * expert + 64 * h) + 2 * vocab * h
    routed = 27 * 64 * expert / 8  # per EP rank
    state = 6 * (dense + routed) + 12 * (dense / 8 + routed)
    assert 44e9 < state < 45e9
    args = ["yaml_configs/deepseekmoe_16b.yaml", "--gpus", "8"]
    assert plan.main([*args, "--gpu", "A100-40GB", "--json"]) == 1
    small = json.loads(capsys.readouterr().out)
    [st] = small["memory"]["stages"]
    assert st["weights"] + st["grads"] + st["optimizer"] == pytest.approx(state, rel=1e-3)
    assert not small["fit"]["fits"] and small["fit"]["gpu_memory"] == 40e9
    assert plan.main([*args, "--gpu", "A100-80GB", "--json"]) == 0
    big = json.loads(capsys.readouterr().out)
    assert big["fit"]["fits"] and big["memory"]["max_bytes_per_gpu"] == \
        small["memory"]["max_bytes_per_gpu"]
    assert plan.main([*args, "--gpu", "A100-40GB"]) == 1
    assert "does NOT fit A100-40GB (40.0 GB); try --search" in capsys.readouterr().out
    # no layout of 8 GPUs fits: together they hold at least 18 bytes per parameter (16.4B, the
    # paper's count), 36.9 GB a GPU, and the allowance of 3 GB + 10% (README) takes it past 40
    assert 18 * 16.4e9 / 8 * 1.1 + 3e9 > 40e9
    assert plan.main([*args, "--gpu", "A100-40GB", "--search"]) == 1
    out = capsys.readouterr().out
    assert "none fits: more GPUs, a larger GPU, or a smaller model\n" in out
    # Layouts that fit, but not with the headroom asked for: said, with how much there is (the
    # advice was a smaller global batch, which hardly changes the memory)
    assert plan.main([*args, "--gpu", "A100-80GB", "--search", "--min-headroom", "0.9"]) == 1
    out = capsys.readouterr().out
    best = re.search(r"none fits with >= 90% headroom: more GPUs, a larger GPU, or a smaller "
                     r"model; the roomiest layout it accepts leaves (\d+)% free, so a "
                     r"--min-headroom up to that finds it\n", out)
    assert best, out
    assert plan.main([*args, "--gpu", "A100-80GB", "--search", "--min-headroom",
                      str(int(best[1]) / 100), "--json"]) == 0


def test_none_fits_names_the_layouts_the_config_validation_refused(capsys):
    """5 heads: TP 1 alone is valid, and leaves 1-4% free of an A100-80GB. The layouts that fit
    with 5% headroom (TP 2-8) were all refused by the config validation, and the line said none
    fitted with it and that a --min-headroom up to the roomiest of them (69%) found one."""
    args = ["yaml_configs/tiny.yaml", "--gpus", "8", "--gpu", "A100-80GB", "--search",
            "num_layers=1", "hidden_size=10240", "num_attention_heads=5",
            "ffn_hidden_size=262144", "seq_length=1024", "global_batch_size=8",
            "micro_batch_size=1", "bf16=true"]
    for headroom, refused in (("0.05", " that the config validation accepts (it refused the 96 "
                                        "that do)"), ("0.7", "")):
        assert plan.main([*args, "--min-headroom", headroom]) == 1
        assert (f"none fits with >= {float(headroom):.0%} headroom{refused}: more GPUs, a larger "
                "GPU, or a smaller model; the roomiest layout it accepts leaves 4% free, so a "
                "--min-headroom up to that finds it\n") in capsys.readouterr().out
    assert plan.main([*args, "--min-headroom", "0.04"]) == 0


def test_search_on_a100_40gb_keeps_every_layout_under_40_gb():
    """16B on 16 A100-40GB: the YAML's layout (EP 8, no TP or PP) does not fit, the search finds
    layouts that do, with their peak under 40 GB; the 16 GPUs hold at least 18 bytes per
    parameter (weights, gradients, Adam) together, 18.5 GB each on average, and the fullest of
    each layout at least that."""
    run = load_run_config(CONFIGS / "deepseekmoe_16b.yaml", instantiate_checks=False)
    assert not plan.make_plan(run, 16, gpu="A100-40GB")["fit"]["fits"]
    ranked = plan.search_plan(run, 16, gpu="A100-40GB", top=5)["search"]["ranked"]
    assert len(ranked) == 5
    for r in ranked:
        assert r["fits"] and r["gpu_memory"] == 40e9
        assert 0 < r["memory"]["max_bytes_per_gpu"] <= 40e9
        stages = r["memory"]["stages"]
        assert all(st["total"] <= 40e9 for st in stages)
        assert max(st["weights"] + st["grads"] + st["optimizer"] for st in stages) >= \
            18 * 16.4e9 / 16


def test_gradient_reduction_is_timed_as_dsmoe_train_runs_it(capsys):
    # dsmoe-train overlaps it with the backward on GPUs unless overlap_grad_reduce: false
    on = make("deepseekmoe_2b.yaml", world_size=64)["step_time"]
    off = make("deepseekmoe_2b.yaml", ["overlap_grad_reduce=false"], world_size=64)["step_time"]
    key = "expert-DP gradient sync"
    assert 0 <= on["breakdown"][key] < off["breakdown"][key]
    assert any("overlapped with the last backward" in note for note in on["assumptions"])
    assert any("after the last backward" in note for note in off["assumptions"])
    # the command-line flag wins over the config
    args = ["yaml_configs/deepseekmoe_2b.yaml", "--gpus", "64", "--json"]
    assert plan.main([*args, "--no-overlap-grad-reduce"]) == 0
    assert json.loads(capsys.readouterr().out)["step_time"]["step_time"] == off["step_time"]
    assert plan.main([*args, "overlap_grad_reduce=false", "--overlap-grad-reduce"]) == 0
    assert json.loads(capsys.readouterr().out)["step_time"]["step_time"] == on["step_time"]


def test_block_recompute_times_only_the_layers_it_recomputes():
    # 16B: a dense first layer and 27 MoE layers; the block method recomputes the first n
    def recompute(method, n):
        return make("deepseekmoe_16b.yaml", ["language_model.recompute_granularity=full",
                                             f"language_model.recompute_method={method}",
                                             f"language_model.recompute_num_layers={n}"],
                    world_size=128)["step_time"]["breakdown"]["recompute"]

    full = recompute("uniform", 1)
    dense = recompute("block", 1)
    assert 0 < dense < recompute("block", 14) < full == pytest.approx(recompute("block", 28))
    assert recompute("block", 14) - dense == pytest.approx((full - dense) * 13 / 27)


def test_one_backward_hides_the_dense_and_the_expert_gradient_reduction_once():
    # one micro-batch per step, both reductions longer than the backward: recompute lengthens
    # the backward, which must not hide more than it costs (it did when each reduction was
    # credited with the whole backward)
    one_micro = ["micro_batch_size=1", "global_batch_size=8"]
    full = ["language_model.recompute_granularity=full", "language_model.recompute_method=uniform",
            "language_model.recompute_num_layers=1"]
    none = make("tiny.yaml", one_micro, world_size=8)["step_time"]
    recompute = make("tiny.yaml", one_micro + full, world_size=8)["step_time"]
    assert recompute["breakdown"]["recompute"] > 0
    assert recompute["step_time"] > none["step_time"]
    keys = ("DP gradient sync", "expert-DP gradient sync")
    off = make("tiny.yaml", one_micro + ["overlap_grad_reduce=false"], world_size=8)["step_time"]
    hidden = sum(off["breakdown"][k] - none["breakdown"][k] for k in keys)
    backward = sum(v for k, v in none["breakdown"].items()
                   if k not in keys + ("optimizer step",)) * 2 / 3
    assert hidden == pytest.approx(backward)


# a small MoE model whose layouts on 8 GPUs in 2 nodes of 4 the search can enumerate quickly;
# 6 heads, so TP 4 is estimated but refused by the config validation
TOY = ["num_layers=8", "hidden_size=768", "num_attention_heads=6", "ffn_hidden_size=2048",
       "num_moe_experts=16", "moe_router_topk=2", "moe_ffn_hidden_size=512", "seq_length=2048",
       "global_batch_size=128", "micro_batch_size=1", "bf16=true", "vocab_size=32000"]


@pytest.fixture(scope="module")
def toy_search():
    run = load_run_config(CONFIGS / "tiny.yaml", TOY, instantiate_checks=False)
    return run, search.search(run, Cluster(GPUS["H100-80GB"], 8, 4), top=100_000)


def test_search_returns_only_layouts_the_config_validation_accepts(toy_search):
    run, result = toy_search
    ranked = result["ranked"]
    assert ranked and result["rejected_by_validation"] > 0
    assert len(ranked) + result["rejected_by_validation"] == result["fit"]
    for r in ranked[:20] + ranked[20::25]:
        candidate = load_run_config(CONFIGS / "tiny.yaml", TOY + r.layout.overrides(run))
        check_world_size(candidate, 8)
        assert candidate.model.tensor_model_parallel_size == r.layout.tensor
        assert candidate.model.expert_model_parallel_size == r.layout.expert
        assert candidate.model.num_attention_heads % r.layout.tensor == 0
    times = [r.estimate.time["step_time"] for r in ranked]
    assert times == sorted(times)
    assert all(r.estimate.fits for r in ranked)


def test_overrides_set_recompute_modules_for_selective_recompute_only(toy_search):
    """Megatron fills recompute_modules in (['core_attn']) and reads it under selective recompute
    only: every "Train it" line said language_model.recompute_modules=null, to no effect."""
    run, result = toy_search
    kinds = set()
    for r in result["ranked"]:
        kinds.add(r.layout.recompute)
        modules = [o for o in r.layout.overrides(run) if ".recompute_modules=" in o]
        assert modules == (["language_model.recompute_modules=[mlp]"]
                           if r.layout.recompute == "selective-mlp" else []), r.layout
    assert {"none", "full", "selective-mlp"} <= kinds


def test_search_ranks_each_split_of_the_layers_once(toy_search):
    # PP 2 counting the embedding and the loss as layers splits 8 layers 4 + 4, as PP 2 does
    _, result = toy_search
    seen = {}
    for r in result["ranked"]:
        key = (dataclasses.replace(r.layout, embedding_and_loss_as_layers=False),
               str(memory.stage_chunks(r.run.model)))
        assert key not in seen, f"{r.layout.describe(8)} repeats {seen[key].describe(8)}"
        seen[key] = r.layout
    assert any(layout.pipeline == 2 and not layout.virtual_pipeline for layout in seen.values())


def test_interleaved_layouts_have_the_micro_batches_megatrons_schedule_needs(capsys):
    # Megatron's interleaved schedule runs the micro-batches in groups of PP and raises in the
    # first step unless there are at least PP of them and a multiple of PP
    run = load_run_config(CONFIGS / "tiny.yaml", TOY + ["global_batch_size=24"],
                          instantiate_checks=False)
    result = search.search(run, Cluster(GPUS["H100-80GB"], 8, 4), top=100_000)
    interleaved = [r.layout for r in result["ranked"] if r.layout.virtual_pipeline]
    assert interleaved
    for layout in interleaved:
        dp = 8 // (layout.tensor * layout.pipeline)
        assert 24 // (layout.micro_batch_size * dp) % layout.pipeline == 0, layout.describe(8)
    args = ["yaml_configs/tiny.yaml", "model_parallel.pipeline_model_parallel_size=2",
            "model_parallel.virtual_pipeline_model_parallel_size=2", "micro_batch_size=1",
            "--gpus", "2"]
    assert plan.main([*args, "global_batch_size=3"]) == 2
    err = capsys.readouterr().err
    assert "the interleaved schedule runs the 3 micro-batches per step" in err
    assert len(err.strip().splitlines()) == 1
    assert plan.main([*args, "global_batch_size=4"]) == 0


def test_a_search_without_candidates_says_why_and_which_gpu_counts_have_some(capsys):
    """No DP size possible on 1000 GPUs divides the global batch 4608 = 2^9 x 9 (DP would have
    to take up the factor 125); the nearest whole-node counts the enumeration gives layouts on
    are suggested."""
    run = load_run_config(CONFIGS / "deepseekmoe_145b.yaml", instantiate_checks=False)
    result = search.search(run, Cluster(GPUS["H100-80GB"], 1000, 8))
    assert result["candidates"] == 0
    has = {n: bool(search.candidates(run.model, n, 8, 4608)) for n in range(960, 1041, 8)}
    below = max(n for n in has if has[n] and n < 1000)
    above = min(n for n in has if has[n] and n > 1000)
    assert result["nearby_gpus"] == [below, above]
    assert plan.main([str(CONFIGS / "deepseekmoe_145b.yaml"), "--gpus", "1000", "--search"]) == 1
    out = capsys.readouterr().out
    assert "no data-parallel size possible on 1000 GPUs" in out
    assert "divides the global batch 4608" in out and f"--gpus {below} or {above}" in out
    assert "none fits" not in out


def test_gpu_counts_whose_pipeline_sizes_cannot_split_the_layers_have_no_candidates(capsys):
    """On 200 GPUs only PP 25 leaves a DP that divides 4608, and Megatron cannot split 28 layers
    (30 with the embedding and the loss) over 25 stages: that is said, with GPU counts that have
    layouts, rather than "none fits: more GPUs, a larger GPU"."""
    run = load_run_config(CONFIGS / "deepseekmoe_16b.yaml", instantiate_checks=False)
    result = search.search(run, Cluster(GPUS["H100-80GB"], 200, 8))
    assert result["candidates"] == 0
    assert result["nearby_gpus"] == [192, 216]
    assert all(search.candidates(run.model, n, 8, 4608) for n in result["nearby_gpus"])
    assert not search.candidates(run.model, 208, 8, 4608)  # PP 13 or 26 only: no split either
    assert plan.main([str(CONFIGS / "deepseekmoe_16b.yaml"), "--gpus", "200", "--search"]) == 1
    out = capsys.readouterr().out
    assert "with a PP that splits the 28 layers" in out and "--gpus 192 or 216" in out
    assert "none fits" not in out


def test_a_search_on_a_huge_gpu_count_answers_at_once(capsys):
    """The divisors of the world were found by trial up to the world, and the nearby GPU counts
    by that, count by count: --gpus 8000000 never returned."""
    import signal

    def too_slow(signum, frame):
        raise TimeoutError("the search did not answer within 60 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        assert plan.main([str(CONFIGS / "tiny.yaml"), "--gpus", "8000000", "--search"]) == 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "--gpus 256, or another global_batch_size" in capsys.readouterr().out


@pytest.mark.parametrize("gpus, per_node, launcher", [
    (1, 8, "dsmoe-train yaml_configs/tiny.yaml"),
    (2, 8, "torchrun --nproc-per-node 2 -m dsmoe_megatron.train yaml_configs/tiny.yaml"),
    (16, 8, "CONFIG=yaml_configs/tiny.yaml sbatch --nodes 2 examples/slurm_145b.sbatch"),
    # the launcher's #SBATCH line asks for 8 GPUs a node, which 4-GPU nodes never grant
    (16, 4, "CONFIG=yaml_configs/tiny.yaml GPUS_PER_NODE=4 sbatch --nodes 4 --gpus-per-node 4 "
            "examples/slurm_145b.sbatch")])
def test_the_suggested_command_launches_the_searched_world(capsys, gpus, per_node, launcher):
    """"Train it" printed `dsmoe-train ...` for every GPU count: a world of one process, which
    refuses a layout of TP 2 or more and trains others on one GPU."""
    assert plan.main(["yaml_configs/tiny.yaml", "global_batch_size=16", "--gpus", str(gpus),
                      "--gpus-per-node", str(per_node), "--search", "--top", "1"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("Train it"):out.index("Assumptions:")].strip().splitlines()[1:]
    assert all(line.endswith(" \\") for line in lines[:-1])
    command = shlex.split(" ".join(line.removesuffix("\\") for line in lines))
    assert " ".join(command).startswith(launcher)
    assert "global_batch_size=16" in command
    assert ("--resume" in command) == (gpus <= 8)  # the cluster launcher adds it


def test_ranking_prefers_fewer_cross_node_all_to_all_bytes(toy_search):
    _, result = toy_search
    position = {r.layout: i for i, r in enumerate(result["ranked"])}
    pairs = 0
    for layout, i in position.items():
        if layout.expert != 8:
            continue
        # the same layout with EP 4: the all-to-all stays inside a node of 4
        inside = dataclasses.replace(layout, expert=4)
        if inside not in position:
            continue
        pairs += 1
        across, within = result["ranked"][i], result["ranked"][position[inside]]
        assert across.estimate.time["ep_alltoall_bytes_per_step"]["network"] > 0
        assert within.estimate.time["ep_alltoall_bytes_per_step"]["network"] == 0
        assert position[inside] < i, layout
    assert pairs > 10


# ---------------------------------------------------------------------------------------------
# Presets and the cluster launcher


@pytest.mark.parametrize("name, gpus", [("deepseekmoe_16b.yaml", 128),
                                        ("deepseekmoe_145b.yaml", 1024)])
def test_presets_fit_with_headroom_near_the_top_of_the_search(name, gpus):
    run = load_run_config(CONFIGS / name, instantiate_checks=False)
    p = plan.make_plan(run, gpus)
    assert p["fit"]["fits"] and p["fit"]["headroom"] >= 0.10
    # the header states what dsmoe-plan estimates (regenerate it when the models change)
    header = (CONFIGS / name).read_text()
    stated = re.search(r"Estimated by dsmoe-plan on (\d+) x H100-80GB: peak ([\d.]+) GB per GPU "
                       r"\((\d+)% headroom after the\s*# allowance\), ([\d.]+) s per step, "
                       r"MFU ([\d.]+)%", header)
    assert stated, f"{name}: the header does not state the estimate"
    assert int(stated[1]) == gpus and f"{gpus // 8} nodes x 8" in header
    assert float(stated[2]) == pytest.approx(p["memory"]["max_bytes_per_gpu"] / 1e9, abs=0.051)
    assert int(stated[3]) == round(100 * p["fit"]["headroom"])
    assert float(stated[4]) == pytest.approx(p["step_time"]["step_time"], abs=0.0051)
    assert float(stated[5]) == pytest.approx(100 * p["step_time"]["mfu"], abs=0.051)
    best = plan.search_plan(run, gpus, top=1, min_headroom=0.10)["search"]["ranked"][0]
    assert p["step_time"]["step_time"] <= 1.05 * best["step_time"]["step_time"]


SLURM = ROOT / "examples" / "slurm_145b.sbatch"


def fake_slurm(tmp_path: Path, squeue: str = "echo 1-23:59:30") -> dict:
    """The environment of a job on gpu-node-[07-08], with scontrol and squeue (that bash line)
    stubbed; the default time left: 1 day, 23:59:30."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, line in [("scontrol", "printf 'gpu-node-07\\ngpu-node-08\\n'"), ("squeue", squeue)]:
        (bin_dir / name).write_text(f"#!/bin/bash\n{line}\n")
        (bin_dir / name).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", DRY_RUN="1",
                SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu-node-[07-08]",
                SLURM_JOB_ID="4242")


def test_slurm_launcher_builds_a_torchrun_command_dsmoe_train_accepts(tmp_path):
    from torch.distributed.run import get_args_parser

    from dsmoe_megatron import train

    subprocess.run(["bash", "-n", str(SLURM)], check=True)
    env = fake_slurm(tmp_path)
    bin_dir = tmp_path / "bin"
    out = subprocess.run(["bash", str(SLURM), "save_interval=250", "data_path=[/data/x]"], env=env,
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    argv = shlex.split(out.stdout)
    # Megatron's one CUDA queue for the preset's TP2 + SP, set before anything touches CUDA
    assert argv[:6] == ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT=1200", "CUDA_DEVICE_MAX_CONNECTIONS=1",
                        "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "torchrun"]
    launch = get_args_parser().parse_args(argv[6:])
    assert (launch.nnodes, launch.nproc_per_node) == ("2", "8")
    assert (launch.rdzv_backend, launch.rdzv_endpoint, launch.rdzv_id) == (
        "c10d", "gpu-node-07:29500", "4242")
    assert launch.module and launch.training_script == "dsmoe_megatron.train"
    script_args = launch.training_script_args
    assert script_args[-2:] == ["--resume", "auto"]
    args = train.parse_args(script_args[:-2])
    assert args.config == "yaml_configs/deepseekmoe_145b.yaml"
    # Saves and stops 20 minutes (SAVE_MINUTES) before the time limit, or on a SIGTERM.
    assert args.overrides == ["exit_signal_handler=true", "exit_duration_in_mins=2859",
                              "save_interval=250", "data_path=[/data/x]"]
    loaded = load_run_config(ROOT / args.config, args.overrides).train  # what dsmoe-train loads
    assert (loaded.exit_signal_handler, loaded.exit_duration_in_mins) == (True, 2859)
    # Run for real (srun stubbed): torchrun waits as long for its ranks to save after passing a
    # SIGTERM on.
    for name in "srun", "torchrun":
        stub = (f'#!/bin/bash\necho "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT $CUDA_DEVICE_MAX_CONNECTIONS '
                f'{name} $*"\n')
        (bin_dir / name).write_text(stub)
        (bin_dir / name).chmod(0o755)
    real = dict(env, SAVE_MINUTES="5")
    del real["DRY_RUN"]
    ran = subprocess.run(["bash", str(SLURM), "data_path=[/data/x y]"], env=real, cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60)
    srun = ran.stdout.splitlines()[-1]
    assert srun.startswith("300 1 srun --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun "
                           "--nnodes 2 ")
    # DRY_RUN's command, pasted into a shell in the allocation, runs what the job runs (it
    # printed torchrun alone: one node's, which waits for the others' rendezvous)
    dry = subprocess.run(["bash", str(SLURM), "data_path=[/data/x y]"],
                         env=dict(real, DRY_RUN="1"), cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    pasted = subprocess.run(["bash", "-c", dry.stdout], env=real, capture_output=True, text=True,
                            check=True, timeout=60)
    assert pasted.stdout.splitlines() == [srun]
    try:
        resumed = train.parse_args([args.config, "--resume", "auto"])
    except SystemExit:
        pytest.skip("this dsmoe-train has no `--resume auto` yet; the rest of the command parses")
    assert train.parse_args(script_args).resume == resumed.resume == "auto"
    # without SLURM the script says what is missing
    bare = {k: v for k, v in env.items() if k != "SLURM_JOB_NUM_NODES"}
    failed = subprocess.run(["bash", str(SLURM)], env=bare, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode != 0 and "run this under sbatch" in failed.stderr


@pytest.mark.parametrize("squeue, minutes, said", [
    ("echo 1-02:03:04", 1563, None), ("echo 47:59:00", 2879, None), ("echo 05:00", 5, None),
    ("echo 0:59", 0, None), ("echo 1-00:08:09", 1448, None),  # 08 and 09 are not octal
    ("echo UNLIMITED", None, None),  # no limit to stop before
    ("echo INVALID", None, "(INVALID)"), ("echo NOT_SET", None, "(NOT_SET)"),
    ("echo 'slurm_load_jobs error: Socket timed out' >&2; exit 1", None, "(nothing)")])
def test_slurm_launcher_reads_the_time_left_from_squeue(tmp_path, squeue, minutes, said):
    """minutes_left, sourced alone: a time left squeue gave in a form it did not read (or
    squeue failing) left the run without its stop before the time limit, and said nothing."""
    function = re.search(r"^minutes_left\(\) \{.*?^\}$", SLURM.read_text(), re.M | re.S)[0]
    got = subprocess.run(["bash", "-c", f"{function}\nminutes_left"],
                         env=fake_slurm(tmp_path, squeue), capture_output=True, text=True,
                         timeout=60)
    assert (got.returncode, got.stdout.strip()) == ((0, str(minutes)) if minutes is not None
                                                    else (1, ""))
    if said is None:
        assert got.stderr == ""
    else:
        line = got.stderr.splitlines()[-1]  # after squeue's own word, if any
        assert said in line and "does not stop SAVE_MINUTES before the time limit" in line


def test_a_job_with_less_time_left_than_a_save_takes_says_so(tmp_path):
    """15 minutes left, SAVE_MINUTES 20: the run went on without exit_duration_in_mins, to be
    killed at the time limit with the steps since its last save lost."""
    env = fake_slurm(tmp_path, "echo 15:00")
    failed = subprocess.run(["bash", str(SLURM)], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr == ("dsmoe-145b: job 4242 has 15 minutes left, no more than "
                             "SAVE_MINUTES=20 to save in before its time limit: submit it with "
                             "a longer --time, or set a smaller SAVE_MINUTES\n")
    env["SAVE_MINUTES"] = "14"
    out = subprocess.run(["bash", str(SLURM)], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert "exit_duration_in_mins=1 " in out


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_jobs_resume_stop_on_sigterm_and_end_a_complete_run(tmp_path):
    """The launcher's jobs on 2 CPU ranks (srun runs its command here, the head node is this
    one): a job stopped early and its requeue train as one uninterrupted job does, a job that
    finds the run complete exits 0 at once, and one sent SIGTERM saves and the next resumes."""
    import json
    import signal
    import time

    from resume_cases import MODEL

    env = fake_slurm(tmp_path, "echo UNLIMITED")
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (tmp_path / "bin" / "srun").write_text(
        '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (tmp_path / "bin" / "srun").chmod(0o755)
    env.pop("DRY_RUN")
    env.update(SLURM_JOB_NUM_NODES="1", CONFIG="yaml_configs/tiny.yaml", GPUS_PER_NODE="2",
               RDZV_PORT="29617", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PATH=f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{env['PATH']}")

    def job(save, *args, **popen):
        argv = ["bash", str(SLURM), *MODEL, f"save={tmp_path / save}", "save_interval=100",
                "train_iters=6", *args]
        out = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # the job's log
        if popen:
            return subprocess.Popen(argv, env=env, cwd=ROOT, text=True, **out)
        return subprocess.run(argv, env=env, cwd=ROOT, text=True, timeout=300, **out)

    def losses(save):
        lines = (tmp_path / save / "metrics.jsonl").read_text().splitlines()
        return {r["iteration"]: r["lm_loss"] for r in map(json.loads, lines) if "lm_loss" in r}

    straight = job("straight")
    assert straight.returncode == 0, straight.stdout[-3000:]
    first = job("run", "--stop-at", "3")
    assert first.returncode == 0 and "stopped at iteration 3 of 6: --stop-at 3" in first.stdout
    requeued = job("run")
    assert requeued.returncode == 0, requeued.stdout[-3000:]
    assert "loaded" in requeued.stdout and "iter_0000003 (iteration 3)" in requeued.stdout
    assert losses("run") == pytest.approx(losses("straight"), rel=1e-5, abs=1e-6)
    assert sorted(losses("run")) == list(range(1, 7))
    chained = job("run")  # a singleton chain's next job
    assert chained.returncode == 0, chained.stdout[-3000:]
    assert "the run is complete: iteration 6 of train_iters=6" in chained.stdout
    assert sorted(losses("run")) == list(range(1, 7))

    # Preempted: SIGTERM to what srun runs (the script exec'd it), after a save.
    preempted = job("pre", "save_interval=2", "train_iters=400", popen=True)
    try:
        while not (tmp_path / "pre" / "latest").exists() and preempted.poll() is None:
            time.sleep(0.2)
        preempted.send_signal(signal.SIGTERM)
        out = preempted.communicate(timeout=300)[0]
    finally:
        preempted.kill()
    stopped = int((tmp_path / "pre" / "latest").read_text())
    assert f"stopped at iteration {stopped} of 400: SIGTERM received" in out, out[-3000:]
    before = losses("pre")
    assert sorted(before) == list(range(1, stopped + 1))
    resumed = job("pre", "save_interval=2", "train_iters=400", "--stop-at", str(stopped + 2))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    after = losses("pre")
    assert sorted(after) == list(range(1, stopped + 3))
    assert {i: after[i] for i in before} == before and all(map(math.isfinite, after.values()))


# ---------------------------------------------------------------------------------------------
# Exact parameter counts against instantiated models


def _instantiated(configs: list[str], sharded_overrides: list[str]) -> dict:
    """Runs on 2 gloo ranks: parameter counts of the models the configs describe.

    "sharded": this rank's share of tiny.yaml under ``sharded_overrides`` (the layout the ranks
    were started with); "full": every config on a single-rank layout (TP 1, EP 1).
    """
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from dsmoe_megatron import runtime
    from dsmoe_megatron.model import build_model, padded_vocab_size

    def counts(run):
        vocab = padded_vocab_size(run.train.vocab_size, run.model.tensor_model_parallel_size)
        model = build_model(run.model, vocab, run.train.seq_length)
        return {"total": sum(p.numel() for p in model.parameters()),
                "routed": sum(p.numel() for n, p in model.named_parameters()
                              if ".mlp.experts." in n),
                "padded_vocab": vocab}

    torch.manual_seed(0)
    out = {"sharded": counts(load_run_config(CONFIGS / "tiny.yaml", sharded_overrides)),
           "full": {}}
    runtime.initialize(ParallelLayout())
    for name in configs:
        run = load_run_config(CONFIGS / name)
        out["full"][name] = counts(run)
        if not run.model.is_moe:
            # the same dense model from Megatron-core's own local layer spec
            reference = GPTModel(
                config=run.model,
                transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                vocab_size=out["full"][name]["padded_vocab"],
                max_sequence_length=run.train.seq_length,
                share_embeddings_and_output_weights=False, position_embedding_type="rope")
            out["full"][name]["megatron_local_spec"] = sum(
                p.numel() for p in reference.parameters())
    return out


TINIES = ["tiny.yaml", "tiny_dense.yaml", "tiny_gshard.yaml"]
# TP 2 x EP 2 (expert TP 1) on 2 ranks
SHARDED = ["model_parallel.tensor_model_parallel_size=2",
           "model_parallel.expert_model_parallel_size=2",
           "model_parallel.expert_tensor_parallel_size=1",
           "model_parallel.sequence_parallel=true", "language_model.num_moe_experts=14"]


@pytest.fixture(scope="module")
def instantiated():
    layout = ParallelLayout(tensor=2, expert=2, expert_tensor=1, sequence_parallel=True)
    return run_on_ranks(_instantiated, 2, layout=layout, args=(TINIES, SHARDED))


@pytest.mark.distributed
def test_total_params_equal_the_instantiated_models(instantiated):
    full = instantiated[0]["full"]
    for name in TINIES:
        p = make(name)
        got = full[name]
        assert p["padded_vocab_size"] == got["padded_vocab"]
        assert p["total_params"] == got["total"], name
        run = load_run_config(CONFIGS / name)
        if run.model.is_moe:
            k, n = run.model.moe_router_topk, run.model.num_moe_experts
            assert p["params"]["routed experts"]["total"] == got["routed"]
            assert p["activated_params"] == got["total"] - got["routed"] + got["routed"] * k // n
        else:
            assert got["megatron_local_spec"] == got["total"] == p["total_params"]
            assert p["activated_params"] == p["total_params"]


@pytest.mark.distributed
def test_per_gpu_params_equal_the_instantiated_shards(instantiated):
    p = make("tiny.yaml", SHARDED, world_size=2)
    [stage] = p["memory"]["stages"]
    for rank in instantiated:
        assert rank["sharded"]["total"] == stage["params"]
        assert rank["sharded"]["routed"] == stage["expert_params"]


@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_planned_checkpoint_size_is_what_a_save_writes(tmp_path, precision):
    """Every rank's shards of a real save (TP2 x EP2) against dsmoe-plan's checkpoint bytes;
    what is left over is the metadata, under 1 MiB."""
    from resume_cases import run_job

    overrides = [*SHARDED, f"model_parallel.bf16={precision == 'bf16'}"]
    argv = [str(CONFIGS / "tiny.yaml"), *overrides, f"save={tmp_path / 'run'}", "train_iters=1",
            "lr_warmup_iters=0", "eval_interval=null"]
    layout = ParallelLayout(tensor=2, expert=2, expert_tensor=1, sequence_parallel=True)
    [result] = run_on_ranks(run_job, 2, layout=layout, args=([("train", argv)],))[0]
    assert result["code"] == 0, result["stderr"][-2000:]
    written = sum(f.stat().st_size for f in (tmp_path / "run" / "iter_0000001").rglob("*"))
    planned = make("tiny.yaml", overrides, world_size=2)["checkpoint_bytes"]
    assert 0 <= written - planned < 2**20


def test_keep_checkpoints_bounds_the_disk_a_run_takes(capsys):
    """A save writes the next checkpoint beside the N kept, then deletes the oldest: N + 1 at
    once. At 145B (144.6B parameters, bf16: 2 + 12 bytes each) keep_checkpoints=3 needs
    4 x 2.025 TB."""
    every = make("deepseekmoe_145b.yaml")
    kept = make("deepseekmoe_145b.yaml", ["keep_checkpoints=3"])
    assert every["checkpoints_peak_bytes"] is None
    assert kept["checkpoint_bytes"] == every["checkpoint_bytes"] == every["total_params"] * 14
    assert kept["checkpoints_peak_bytes"] == 4 * kept["total_params"] * 14
    assert f"{kept['checkpoints_peak_bytes'] / 1e12:.2f}" == "8.10"
    assert plan.main(["yaml_configs/deepseekmoe_145b.yaml", "keep_checkpoints=3"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "keep_checkpoints=3: up to 4 at once while a save runs, 8.099TB" in text
