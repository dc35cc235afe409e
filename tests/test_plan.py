"""dsmoe-plan: the paper's parameter and FLOPs figures, the JSON output, exact parameter counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_on_ranks
from dsmoe_megatron import plan
from dsmoe_megatron.runtime import ParallelLayout
from dsmoe_megatron.yaml_config import load_run_config

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
    assert plan.nominal_ffn_size(1408, 2048) == 0.25     # 16B expert: standard / 4
    assert plan.nominal_ffn_size(1408, 4096) == 0.125    # 145B expert: standard / 8
    assert plan.nominal_ffn_size(10944, 2048) == 2.0     # 16B dense layer
    assert plan.nominal_ffn_size(11008, 4096) == 1.0     # DeepSeek 7B / LLaMA2 7B FFN
    assert plan.nominal_ffn_size(5136, 1280) == 1.5      # GShard x1.5 expert


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


def test_cli_overrides_world_size_and_table(capsys):
    assert plan.main(["yaml_configs/deepseekmoe_16b.yaml", "--world-size", "128"]) == 0
    text = capsys.readouterr().out
    for needle in ("routed experts", "activated/token", "per 4K tokens", "counted as:",
                   "Memory per GPU", "DP128", "expert DP 16", "distributed optimizer"):
        assert needle in text
    assert plan.main(["yaml_configs/tiny.yaml", "language_model.num_layers=6", "--json"]) == 0
    six = json.loads(capsys.readouterr().out)
    assert six["num_layers"] == 6 and six["num_moe_layers"] == 5
    assert plan.main(["yaml_configs/tiny.yaml", "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "global_batch_size=8 is not divisible" in err
    assert plan.main(["yaml_configs/tiny.yaml", "language_model.num_layer=6"]) == 2
    assert "did you mean num_layers?" in capsys.readouterr().err


def test_module_entry_point_prints_only_json():
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.plan", "yaml_configs/deepseekmoe_145b.yaml",
         "--json", "--world-size", "1024"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
    data = json.loads(out.stdout)
    assert f"{data['total_params'] / 1e9:.1f}" == "144.6"
    assert data["memory"]["data_parallel_size"] == 64
    assert data["memory"]["max_bytes_per_gpu"] < 80e9  # fits an 80 GB GPU (estimate)


def test_memory_model_of_the_paper_layouts():
    for name, world in (("deepseekmoe_2b.yaml", 64), ("deepseekmoe_16b.yaml", 128),
                        ("deepseekmoe_145b.yaml", 1024)):
        mem = make(name, world_size=world)["memory"]
        assert mem["max_bytes_per_gpu"] < 70 * 2**30, name
        for st in mem["stages"]:
            assert st["weights"] == 2 * st["params"] and st["grads"] == 4 * st["params"]
    mem = make("deepseekmoe_145b.yaml", world_size=1024)["memory"]
    assert [st["layers"] for st in mem["stages"]] == [7, 8, 8, 8, 8, 8, 8, 7]
    assert mem["expert_data_parallel_size"] == 16 and mem["num_microbatches"] == 72
    # the optimizer state is sharded: 12 bytes per dense param over DP, per expert param over EDP
    st = mem["stages"][1]
    assert st["optimizer"] == pytest.approx(
        12 * st["dense_params"] / 64 + 12 * st["expert_params"] / 16)


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
