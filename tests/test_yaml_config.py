"""The run-config loader: every shipped file, round trips, overrides and the error messages."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml

from dsmoe_megatron import config as config_module
from dsmoe_megatron import plan, strict_yaml
from dsmoe_megatron.config import ConfigError, DeepSeekMoEConfig, derive_from_baseline
from dsmoe_megatron.field_ranges import RANGES
from dsmoe_megatron.runtime import ParallelLayout
from dsmoe_megatron.yaml_config import (
    SCHEMA,
    SECTIONS,
    TRAINING_KEYS,
    RunConfig,
    TrainingArgs,
    YamlConfigError,
    check_world_size,
    dump_run_config,
    load_run_config,
    parse_overrides,
    run_config_from_dict,
)

CONFIGS = Path(__file__).resolve().parent.parent / "yaml_configs"
TINY = CONFIGS / "tiny.yaml"
# The GPU count each paper-scale file states in its header comment.
PAPER_WORLD_SIZES = {"deepseekmoe_2b.yaml": 64, "deepseekmoe_16b.yaml": 128,
                     "deepseekmoe_145b.yaml": 1024}


def write(tmp_path: Path, doc: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def tiny_doc() -> dict:
    return yaml.safe_load(TINY.read_text())


def schema_values(cfg: RunConfig) -> dict:
    """Everything a run config determines, in comparable form."""
    out = {(s, k): getattr(cfg.model, k) for s in SECTIONS for k in SCHEMA[s]}
    out["params_dtype"] = cfg.model.params_dtype
    out["pipeline_dtype"] = cfg.model.pipeline_dtype
    out["layout"] = cfg.layout
    out["train"] = cfg.train
    return out


# ---------------------------------------------------------------------------------------------
# The shipped files


def test_expected_files_are_shipped():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"tiny.yaml", "tiny_dense.yaml", "tiny_gshard.yaml", *PAPER_WORLD_SIZES} <= names


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_on_paper(path):
    cfg = load_run_config(path, instantiate_checks=False)
    assert isinstance(cfg.model, DeepSeekMoEConfig)
    assert cfg.model.gated_linear_unit and cfg.model.normalization == "RMSNorm"
    assert not cfg.model.add_bias_linear
    assert cfg.source == yaml.safe_load(path.read_text())
    world = PAPER_WORLD_SIZES.get(path.name, 1)
    dp = check_world_size(cfg, world)
    assert cfg.train.global_batch(dp) % (cfg.train.micro_batch_size * dp) == 0


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny_dense.yaml", "tiny_gshard.yaml"])
def test_tiny_configs_pass_the_instantiate_checks_on_this_machine(name):
    cfg = load_run_config(CONFIGS / name)
    assert cfg.model.params_dtype == torch.float32
    assert cfg.layout == ParallelLayout()
    assert cfg.train.vocab_size >= 257 and cfg.train.data_path is None
    check_world_size(cfg, 1)


def test_tiny_family_follows_the_paper_recipe_at_equal_compute():
    moe = load_run_config(TINY).model
    dense = load_run_config(CONFIGS / "tiny_dense.yaml").model
    gshard = load_run_config(CONFIGS / "tiny_gshard.yaml").model
    # fine-grained segmentation m=2 and one shared expert applied to the GShard baseline
    recipe = derive_from_baseline(ffn_hidden_size=gshard.moe_ffn_hidden_size,
                                  num_experts=gshard.num_moe_experts,
                                  topk=gshard.moe_router_topk, segmentation=2, shared=1)
    assert {k: getattr(moe, k) for k in recipe} == recipe
    activated = (moe.moe_shared_expert_intermediate_size
                 + moe.moe_router_topk * moe.moe_ffn_hidden_size)
    assert activated == gshard.moe_router_topk * gshard.moe_ffn_hidden_size == dense.ffn_hidden_size
    assert moe.ffn_hidden_size == activated  # the dense first layer
    assert moe.moe_router_pre_softmax and not gshard.moe_router_pre_softmax
    assert gshard.moe_num_shared_experts == 0
    assert moe.moe_layer_pattern() == gshard.moe_layer_pattern() == [False, True, True, True]
    assert not any(dense.moe_layer_pattern())


def test_paper_configs_carry_the_paper_hyperparameters():
    c2, c16, c145 = (load_run_config(CONFIGS / n, instantiate_checks=False)
                     for n in PAPER_WORLD_SIZES)
    for cfg in (c2, c16, c145):
        m, t = cfg.model, cfg.train
        assert m.bf16 and m.params_dtype == m.pipeline_dtype == torch.bfloat16
        assert m.init_method_std == 0.006 and m.hidden_dropout == m.attention_dropout == 0.0
        assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.clip_grad) == (0.9, 0.95, 0.1, 1.0)
        assert t.lr_warmup_iters == 2000
    m2 = c2.model
    assert (m2.num_layers, m2.hidden_size, m2.num_attention_heads) == (9, 1280, 10)
    assert (m2.num_moe_experts, m2.moe_router_topk, m2.moe_num_shared_experts) == (63, 7, 1)
    assert all(c2.model.moe_layer_pattern())
    assert (c2.train.lr, c2.model.moe_aux_loss_coeff, c2.train.seq_length) == (1.08e-3, 0.01, 2048)
    assert c2.train.global_batch_size == 2048 and c2.train.lr_decay_style == "step"
    assert (c16.model.num_moe_experts, c16.model.moe_router_topk, c16.model.moe_num_shared_experts,
            c16.model.moe_ffn_hidden_size, c16.model.ffn_hidden_size) == (64, 6, 2, 1408, 10944)
    assert c16.model.moe_layer_pattern()[0] is False and all(c16.model.moe_layer_pattern()[1:])
    assert (c16.train.lr, c16.model.moe_aux_loss_coeff, c16.train.vocab_size) == (
        4.2e-4, 0.001, 102400)
    assert (c16.train.lr_step_decay_at, c16.train.lr_step_decay_factor) == ([0.8, 0.9], 0.316)
    assert c16.layout.expert == 8
    m145 = c145.model
    assert (m145.num_layers, m145.hidden_size, m145.num_attention_heads) == (62, 4096, 32)
    assert (c145.model.num_moe_experts, c145.model.moe_router_topk,
            c145.model.moe_num_shared_experts) == (128, 12, 4)
    assert (c145.model.moe_aux_loss_coeff, c145.model.moe_device_balance_coeff,
            c145.model.num_device_groups()) == (0.003, 0.05, 4)
    assert (c145.train.lr, c145.train.lr_decay_style, c145.train.global_batch_size) == (
        3.0e-4, "constant", 4608)


# ---------------------------------------------------------------------------------------------
# Round trips


def test_dump_then_load_gives_the_same_config(tmp_path):
    cfg = load_run_config(TINY, ["language_model.num_layers=6", "lr=2e-3",
                                 "model_parallel.bf16=true",
                                 "language_model.attention_backend=local"])
    out = tmp_path / "nested" / "run.yaml"
    dump_run_config(cfg, out)
    again = load_run_config(out)
    assert schema_values(again) == schema_values(cfg)
    assert again.source == cfg.source
    assert again.model.num_layers == 6 and again.train.lr == 2e-3
    assert again.model.params_dtype == torch.bfloat16
    assert [p.name for p in out.parent.iterdir()] == ["run.yaml"]  # no temporary file left


def test_dumped_run_config_gets_the_umask_mode_not_mkstemps_0600(tmp_path):
    cfg = load_run_config(TINY)
    old = os.umask(0o027)
    try:
        dump_run_config(cfg, tmp_path / "run.yaml")
    finally:
        os.umask(old)
    assert (tmp_path / "run.yaml").stat().st_mode & 0o777 == 0o640  # 0o666 less 0o027


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_round_trips(path, tmp_path):
    cfg = load_run_config(path, instantiate_checks=False)
    dump_run_config(cfg, tmp_path / "run.yaml")
    assert schema_values(load_run_config(tmp_path / "run.yaml", instantiate_checks=False)) == \
        schema_values(cfg)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_takes_a_lower_lr(path):
    """min_lr only shapes the cosine schedule; where it is unused it must not refuse lr=lr/10."""
    lr = load_run_config(path, instantiate_checks=False).train.lr
    cfg = load_run_config(path, [f"lr={lr / 10}"], instantiate_checks=False)
    assert cfg.train.lr == pytest.approx(lr / 10)


def test_dump_keeps_changes_made_after_loading(tmp_path):
    cfg = load_run_config(TINY)
    cfg.train.load = str(tmp_path)  # loading checks that it exists
    cfg.train.lr = 5e-4
    cfg.model.moe_aux_loss_coeff = 0.02
    dump_run_config(cfg, tmp_path / "run.yaml")
    again = load_run_config(tmp_path / "run.yaml")
    assert again.train.load == str(tmp_path) and again.train.lr == 5e-4
    assert again.model.moe_aux_loss_coeff == 0.02
    assert schema_values(again) == schema_values(cfg)


def test_dump_of_a_config_without_source(tmp_path):
    cfg = load_run_config(TINY)
    bare = RunConfig(model=cfg.model, layout=cfg.layout, train=cfg.train, source={})
    dump_run_config(bare, tmp_path / "run.yaml")
    assert schema_values(load_run_config(tmp_path / "run.yaml")) == schema_values(cfg)


def test_run_config_from_dict_and_defaults():
    cfg = run_config_from_dict({"language_model": {"num_layers": 2, "hidden_size": 64,
                                                   "num_attention_heads": 2}})
    assert cfg.train == TrainingArgs(max_position_embeddings=2048, vocab_size=cfg.train.vocab_size)
    assert cfg.train.vocab_size == 259  # the byte-level tokenizer's
    assert cfg.model.ffn_hidden_size == 4 * 64  # TransformerConfig's own default
    assert cfg.model.num_moe_experts is None and cfg.model.hidden_dropout == 0.0
    assert cfg.model.moe_router_load_balancing_type == "seq_aux_loss"  # deepseek_defaults()
    assert cfg.train.num_microbatches(2) == 1 and cfg.train.global_batch(2) == 2


# ---------------------------------------------------------------------------------------------
# Overrides


def test_parse_overrides_places_keys_in_their_sections():
    assert parse_overrides([
        "language_model.num_layers=4", "lr=1e-3", "model_parallel.expert_model_parallel_size=2",
        "moe_router_topk=2", "moe_num_shared_experts=0", "bf16=true", "data_path=[0.7, a, 0.3, b]",
        "save=null", "deepseekmoe={moe_first_k_dense: 2}",
    ]) == {
        "language_model": {"num_layers": 4, "moe_router_topk": 2},
        "lr": "1e-3",  # YAML 1.1 reads 1e-3 as a string; the loader converts it for float keys
        "model_parallel": {"expert_model_parallel_size": 2, "bf16": True},
        "deepseekmoe": {"moe_num_shared_experts": 0, "moe_first_k_dense": 2},
        "data_path": [0.7, "a", 0.3, "b"],
        "save": None,
    }


def test_a_quoted_hash_belongs_to_the_value():
    assert parse_overrides(["save='/runs/job #2'", "data_path=[a#1]", "save_interval=null"]) == {
        "save": "/runs/job #2", "data_path": ["a#1"], "save_interval": None}


def test_overrides_apply_before_validation():
    cfg = load_run_config(TINY, ["language_model.num_layers=2", "lr=1e-3",
                                 "model_parallel.expert_model_parallel_size=3", "num_moe_experts=6",
                                 "data_path=[0.7, a, 0.3, b]", "moe_first_k_dense=0"])
    assert cfg.model.num_layers == 2 and cfg.model.num_moe_experts == 6
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.layout.expert == 3 and cfg.model.expert_model_parallel_size == 3
    assert cfg.train.data_path == ["0.7", "a", "0.3", "b"]
    assert cfg.source["language_model"]["num_layers"] == 2
    # the source keeps the checked values: numbers for numbers, strings for blend entries
    assert cfg.source["lr"] == 1e-3 and cfg.source["data_path"] == ["0.7", "a", "0.3", "b"]
    assert cfg.model.moe_layer_pattern() == [True, True]


@pytest.mark.parametrize("override, message", [
    ("num_layers", "expected key=value"),
    ("=3", "override '=3': expected key=value"),  # a key lost to an unset $KEY
    ("modelparallel.bf16=true", "modelparallel: unknown section"),
    ("model_paralel.bf16=true", "did you mean model_parallel?"),
    ("language_model.num_moe_expert=4", "language_model.num_moe_expert: unknown key; did you mean "
                                        "num_moe_experts?"),
    ("learning_rat=1", "learning_rat: unknown key"),
    ("language_model.bf16=true", "belongs in model_parallel.bf16"),
    ("a.b.c=1", "keys are SECTION.KEY or KEY"),
    # YAML would drop " #2" as a comment: --overwrite then deleted the run in /runs/job.
    ("save=/runs/job #2", "YAML reads ' #' and what follows as a comment, so the value would be "
                          "'/runs/job'; quote the value"),
    ("data_path=[a, b] # the blend", "so the value would be '[a, b]'"),
    ("save=", "override 'save=': no value; write save=null to unset it"),  # an unset $SAVE
])
def test_bad_overrides(override, message):
    with pytest.raises(YamlConfigError, match=None) as err:
        load_run_config(TINY, [override])
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------
# Errors in files


def test_unknown_key_names_section_key_and_suggestion(tmp_path):
    doc = tiny_doc()
    doc["language_model"]["num_moe_expert"] = doc["language_model"].pop("num_moe_experts")
    path = write(tmp_path, doc)
    with pytest.raises(YamlConfigError) as err:
        load_run_config(path)
    assert ("language_model.num_moe_expert: unknown key; did you mean num_moe_experts?"
            in str(err.value))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("section, key, value, message", [
    ("language_model", "tensor_model_parallel_size", 2,
     "language_model.tensor_model_parallel_size: unknown key here; it belongs in "
     "model_parallel.tensor_model_parallel_size"),
    ("deepseekmoe", "moe_num_shared_expert", 1, "did you mean moe_num_shared_experts?"),
    ("language_model", "activation_func", "gelu", "SwiGLU"),
    ("model_parallel", "params_dtype", "bf16", "set model_parallel.bf16"),
    ("model_parallel", "context_parallel_size", 2, "context parallelism is not supported"),
    (None, "lr_warmup_iter", 5, "lr_warmup_iter: unknown key; did you mean lr_warmup_iters?"),
    (None, "moe_first_k_dense", 1, "it belongs in deepseekmoe.moe_first_k_dense"),
])
def test_misplaced_and_unknown_keys(tmp_path, section, key, value, message):
    doc = tiny_doc()
    (doc[section] if section else doc)[key] = value
    with pytest.raises(YamlConfigError) as err:
        load_run_config(write(tmp_path, doc))
    assert message in str(err.value)


@pytest.mark.parametrize("section, key, value, message", [
    ("language_model", "num_layers", "four",
     "language_model.num_layers: expected an integer, got 'four' (a string)"),
    ("language_model", "num_layers", 4.5, "language_model.num_layers: expected an integer"),
    ("language_model", "hidden_dropout", "none",
     "language_model.hidden_dropout: expected a number"),
    ("language_model", "normalization", "rmsnorm", "expected one of 'LayerNorm', 'RMSNorm'"),
    ("language_model", "moe_layer_freq", "1,1,1", "expected an integer or a list of integers"),
    ("model_parallel", "bf16", 1, "model_parallel.bf16: expected true or false, got 1"),
    ("deepseekmoe", "moe_device_groups", [4], "expected an integer or null"),
    (None, "lr", "fast", "lr: expected a number, got 'fast'"),
    (None, "micro_batch_size", True, "micro_batch_size: expected an integer, got True"),
    (None, "lr_step_decay_at", 0.8, "lr_step_decay_at: expected a list of numbers"),
    ("language_model", None, [1, 2], "language_model: expected a mapping"),
])
def test_wrong_types(tmp_path, section, key, value, message):
    doc = tiny_doc()
    if key is None:
        doc[section] = value
    else:
        (doc[section] if section else doc)[key] = value
    with pytest.raises(YamlConfigError) as err:
        load_run_config(write(tmp_path, doc))
    assert message in str(err.value)


def test_moe_layer_freq_may_be_an_int_or_a_list():
    cfg = load_run_config(TINY, ["moe_layer_freq=[1, 0, 1, 1]"])
    assert cfg.model.moe_layer_pattern() == [False, False, True, True]
    cfg = load_run_config(TINY, ["moe_layer_freq=2", "moe_first_k_dense=0"])
    assert cfg.model.moe_layer_pattern() == [True, False, True, False]


@pytest.mark.parametrize("overrides, message", [
    (["language_model.num_layers=0"], "language_model.num_layers=0: must be >= 1"),
    (["moe_router_topk=16"], "moe_router_topk=16 must be between 1 and num_moe_experts=15"),
    (["model_parallel.bf16=true", "model_parallel.fp16=true"], "bf16 and fp16 are both true"),
    (["lr_decay_style=cosin"], "did you mean cosine?"),
    (["min_lr=1.0"], "min_lr: must be between 0 and lr"),
    (["global_batch_size=6"], "global_batch_size: 6 must be a positive multiple of "
                              "micro_batch_size (4)"),
    (["lr_step_decay_at=[0.9, 0.8]"], "lr_step_decay_at"),
    (["split=98;2"], "split"),
    (["max_position_embeddings=64"], "smaller than seq_length"),
    (["model_parallel.pipeline_model_parallel_size=3"],
     "num_layers=4 does not split evenly over 3 pipeline stages"),
    (["model_parallel.expert_model_parallel_size=2"],
     "num_moe_experts=15 is not divisible by expert_model_parallel_size=2"),
    (["model_parallel.sequence_parallel=true"], "sequence parallelism"),
    (["model_parallel.virtual_pipeline_model_parallel_size=2"], "needs pipeline parallelism"),
    # 100 / 4 = 25 channels a head: RoPE rotates channel pairs (it failed at the first step)
    (["language_model.hidden_size=100", "language_model.num_attention_heads=4"],
     "the head dimension (hidden_size=100 / num_attention_heads=4 = 25) is odd, but rotary "
     "position embeddings (RoPE) rotate pairs of channels; use num_attention_heads=2 or 5"),
    (["language_model.kv_channels=33"], "the head dimension (kv_channels=33) is odd"),
])
def test_invalid_values_are_reported_with_the_file(overrides, message):
    with pytest.raises(YamlConfigError) as err:
        load_run_config(TINY, overrides)
    assert message in str(err.value)
    assert str(TINY) in str(err.value)


ACCOUNT_FIELDS = ("model_parallel.account_for_embedding_in_pipeline_split / "
                  "account_for_loss_in_pipeline_split")


@pytest.mark.parametrize("overrides, message", [
    (["num_layers=3", "pipeline_model_parallel_size=2"],
     f"language_model.num_layers=3 + 2 for {ACCOUNT_FIELDS} = 5 does not split evenly over 2 "
     "pipeline stages; choose num_layers so that num_layers + 2 is a multiple of 2"),
    (["num_layers=4"], "= 6 does not split evenly over 16 pipeline stages"),
    (["num_layers=4", "pipeline_model_parallel_size=2", "virtual_pipeline_model_parallel_size=2"],
     "= 6 does not split evenly over 2 pipeline stages x 2 virtual stages"),
    (["num_layers=4", "pipeline_model_parallel_size=2", "account_for_loss_in_pipeline_split=false"],
     "language_model.num_layers=4 + 1 for model_parallel.account_for_embedding_in_pipeline_split "
     "= 5 does not split evenly"),
])
def test_a_shrunk_145b_names_the_pipeline_split_fields(overrides, message):
    """The 145B file counts the embedding and the loss as pipeline layers; a depth that does not
    split with them got Megatron's "number of middle layers: 5 must be divisible by ..."."""
    path = CONFIGS / "deepseekmoe_145b.yaml"
    with pytest.raises(YamlConfigError) as err:
        load_run_config(path, overrides, instantiate_checks=False)
    assert message in str(err.value) and str(path) in str(err.value)
    ok = ["num_layers=6", "pipeline_model_parallel_size=2", "virtual_pipeline_model_parallel_size=2"]
    assert load_run_config(path, ok, instantiate_checks=False).model.num_layers == 6


def test_sequence_parallel_needs_a_sequence_the_tensor_ranks_divide():
    """The 145B file runs TP2 with sequence parallelism; seq_length=33 failed in the first
    forward with Megatron's "First dimension of the tensor should be divisible by tensor
    parallel size" on every rank."""
    path = CONFIGS / "deepseekmoe_145b.yaml"
    with pytest.raises(YamlConfigError) as err:
        load_run_config(path, ["seq_length=33"], instantiate_checks=False)
    assert ("seq_length=33 is not divisible by tensor_model_parallel_size=2, over which "
            "model_parallel.sequence_parallel splits each sequence") in str(err.value)
    assert load_run_config(path, ["seq_length=34"], instantiate_checks=False).train.seq_length == 34
    no_sp = ["seq_length=33", "model_parallel.sequence_parallel=false"]
    assert load_run_config(path, no_sp, instantiate_checks=False).train.seq_length == 33


def test_errors_are_config_errors_and_value_errors():
    assert issubclass(YamlConfigError, ConfigError) and issubclass(YamlConfigError, ValueError)


def test_on_paper_mode_skips_only_machine_checks(monkeypatch):
    te_available = config_module._te_available
    monkeypatch.setattr(config_module, "_te_available", lambda: False)
    with pytest.raises(YamlConfigError, match=r"(?i)transformer.engine"):
        load_run_config(TINY, ["model_parallel.fp8=e4m3", "model_parallel.bf16=true"])
    cfg = load_run_config(TINY, ["model_parallel.fp8=e4m3", "model_parallel.bf16=true"],
                          instantiate_checks=False)
    assert cfg.model.fp8 == "e4m3"
    assert config_module._te_available() is False  # the patch is undone afterwards
    with pytest.raises(YamlConfigError, match="moe_router_topk"):  # config-only checks still run
        load_run_config(TINY, ["moe_router_topk=0"], instantiate_checks=False)
    monkeypatch.setattr(config_module, "_te_available", te_available)


# Out of range: issue 11's training settings, issue 12's model settings. Each message names the
# key (with its section) and the range; NaN and inf are refused everywhere.
@pytest.mark.parametrize("override, message", [
    ("lr=.inf", "lr=inf: must be a finite number"),
    ("lr=-1e-3", "lr=-0.001: must be > 0"),
    ("lr=0", "lr=0.0: must be > 0"),
    ("min_lr=-1e-5", "min_lr=-1e-05: must be >= 0"),
    ("min_lr=.nan", "min_lr=nan: must be a finite number"),
    ("clip_grad=.nan", "clip_grad=nan: must be a finite number"),
    ("clip_grad=-1", "clip_grad=-1.0: must be >= 0"),
    ("weight_decay=-0.1", "weight_decay=-0.1: must be >= 0"),
    ("weight_decay=.inf", "weight_decay=inf: must be a finite number"),
    ("adam_beta1=1.0", "adam_beta1=1.0: must be in [0, 1)"),
    ("adam_beta2=-0.1", "adam_beta2=-0.1: must be in [0, 1)"),
    ("adam_eps=0", "adam_eps=0.0: must be > 0"),
    ("adam_eps=-.inf", "adam_eps=-inf: must be a finite number"),
    ("lr_warmup_iters=-1", "lr_warmup_iters=-1: must be >= 0"),
    ("lr_warmup_iters=500", "lr_warmup_iters: must be between 0 and train_iters=200"),
    ("lr_step_decay_factor=0", "lr_step_decay_factor=0.0: must be in (0, 1]"),
    ("lr_step_decay_factor=1.5", "lr_step_decay_factor=1.5: must be in (0, 1]"),
    ("lr_step_decay_at=[0.5, 1.0]", "lr_step_decay_at=[0.5, 1.0]: each entry must be in (0, 1)"),
    ("train_iters=0", "train_iters=0: must be >= 1"),
    ("micro_batch_size=0", "micro_batch_size=0: must be >= 1"),
    ("global_batch_size=-8", "global_batch_size=-8: must be >= 1"),
    ("seq_length=0", "seq_length=0: must be >= 1"),
    ("seed=-1", "seed=-1: must be in [0, 4294967295]"),
    ("eval_iters=-1", "eval_iters=-1: must be >= 0"),
    ("eval_interval=0", "eval_interval=0: must be >= 1"),
    ("save_interval=0", "save_interval=0: must be >= 1"),
    ("log_interval=0", "log_interval=0: must be >= 1"),
    ("exit_duration_in_mins=0", "exit_duration_in_mins=0.0: must be > 0"),
    ("exit_signal=SIGKILL", "exit_signal: 'SIGKILL' is not one of SIGTERM, SIGUSR1, SIGUSR2, "
                            "SIGHUP"),
    ("init_method_std=-0.1", "language_model.init_method_std=-0.1: must be > 0"),
    ("hidden_dropout=1.0", "language_model.hidden_dropout=1.0: must be in [0, 1)"),
    ("attention_dropout=-0.5", "language_model.attention_dropout=-0.5: must be in [0, 1)"),
    ("moe_ffn_hidden_size=0", "language_model.moe_ffn_hidden_size=0: must be >= 1"),
    ("moe_ffn_hidden_size=-4", "language_model.moe_ffn_hidden_size=-4: must be >= 1"),
    ("moe_aux_loss_coeff=.nan", "language_model.moe_aux_loss_coeff=nan: must be a finite number"),
    ("moe_device_balance_coeff=.inf",
     "deepseekmoe.moe_device_balance_coeff=inf: must be a finite number"),
    ("model_parallel.tensor_model_parallel_size=0",
     "model_parallel.tensor_model_parallel_size=0: must be >= 1"),
    ("model_parallel.pipeline_model_parallel_size=0",  # was a ZeroDivisionError
     "model_parallel.pipeline_model_parallel_size=0: must be >= 1"),
    ("language_model.num_attention_heads=3",
     "num_attention_heads=3 does not divide hidden_size=128 (each head gets hidden_size / "
     "num_attention_heads channels); use a head count that divides it, e.g. 2 or 4"),
    ("vocab_size=100", "vocab_size: 100 is smaller than the byte-level tokenizer's 259 ids"),
    ("language_model.enable_cuda_graph=true",
     "enable_cuda_graph=True: CUDA graphs are not supported with the DeepSeekMoE block"),
])
def test_out_of_range_values_are_refused_at_load(override, message):
    with pytest.raises(YamlConfigError) as err:
        load_run_config(TINY, [override])
    assert str(err.value).startswith(f"{TINY}") and override in str(err.value)
    assert message in str(err.value)


def _is_numeric(tp) -> bool:
    if tp in (int, float):
        return True
    return any(_is_numeric(arg) for arg in typing.get_args(tp))


def test_every_numeric_setting_has_a_decided_range():
    hints = typing.get_type_hints(TrainingArgs)
    numeric = {k for s in SECTIONS for k, tp in SCHEMA[s].items() if _is_numeric(tp)}
    numeric |= {k for k in TRAINING_KEYS if _is_numeric(hints[k])}
    assert numeric - set(RANGES) == set(), "add these settings to field_ranges._BY_RANGE"
    assert set(RANGES) - numeric == set(), "field_ranges lists settings the schema lacks"


def test_evaluation_settings_say_what_they_mean():
    with pytest.raises(YamlConfigError, match=r"eval_iters: 0 evaluates nothing, but "
                                              r"eval_interval=50 asks for evaluation; set "
                                              r"eval_interval: null to turn evaluation off"):
        load_run_config(TINY, ["eval_iters=0"])
    assert load_run_config(TINY, ["eval_iters=0", "eval_interval=null"]).train.eval_interval is None
    with pytest.raises(YamlConfigError, match=r"split: '100,0,0' has no validation share, but "
                                              r"eval_interval=50 asks for evaluation; give the "
                                              r"second weight \(valid\) a share"):
        load_run_config(TINY, ["split=100,0,0"])
    with pytest.raises(YamlConfigError, match=r"split: '100' has no validation share"):
        load_run_config(TINY, ["split=100"])
    assert load_run_config(TINY, ["split=100,0,0", "eval_interval=null"]).train.split == "100,0,0"
    with pytest.raises(YamlConfigError, match=r"split: '0,100,0' gives training no share"):
        load_run_config(TINY, ["split=0,100,0"])


@pytest.mark.parametrize("blend, message", [
    ("[-0.5, a, 1.5, b]", "data_path: the weight -0.5 of a must be a positive finite number"),
    ("[1, a, 0, b]", "data_path: the weight 0 of b must be a positive finite number"),
    ("[.nan, a, 1, b]", "data_path: the weight nan of a must be a positive finite number"),
])
def test_blend_weights_must_be_positive(blend, message):
    with pytest.raises(YamlConfigError) as err:
        load_run_config(TINY, [f"data_path={blend}"])
    assert message in str(err.value)


@pytest.mark.parametrize("blend", ["[a, 0.7, b]", "[a, b, 0.3]", "[0.3, a, 0.7]"])
def test_a_blend_with_a_missing_weight_is_refused(blend):
    """Megatron reads a blend whose first item is a prefix as prefixes only: 0.7 would be
    looked for as the dataset 0.7.idx."""
    with pytest.raises(YamlConfigError, match=r"looks like a weighted blend but is not "
                                              r"'weight, prefix' pairs"):
        load_run_config(TINY, [f"data_path={blend}"])


@pytest.mark.parametrize("blend, message", [
    ("[0.5, data/a, 0.5, data/a]", "data_path: data/a is given twice; list each dataset once, "
                                   "with the sum of its weights"),
    ("[1, a, 1, a]", "data_path: a is given twice; list each dataset once"),
    ("[data/a, ./data/a]", "data_path: ./data/a is given twice (also as data/a); list each "
                           "dataset once (to weight datasets, give weights"),
])
def test_a_dataset_given_twice_in_a_blend_is_refused(blend, message):
    """[0.5, a, 0.5, a] trained on a alone, where the second entry was most likely meant to
    name another dataset."""
    with pytest.raises(YamlConfigError) as err:
        load_run_config(TINY, [f"data_path={blend}"])
    assert message in str(err.value)


def test_a_checkpoint_whose_blend_lists_a_dataset_twice_still_reads(tmp_path):
    """Earlier versions trained on [0.5, a, 0.5, b, 0.5, a]; the refusal of a dataset given twice
    made the run.yaml of their checkpoints unreadable, so that no --resume, load: or to-hf
    could use them."""
    from dsmoe_megatron.checkpoint import RUN_CONFIG_NAME, saved_run_config

    doc = yaml.safe_load(TINY.read_text())
    doc["data_path"] = ["0.5", "data/a", "0.5", "data/b", "0.5", "data/a"]
    (tmp_path / RUN_CONFIG_NAME).write_text(yaml.safe_dump(doc))
    assert saved_run_config(tmp_path).train.data_path == [
        "0.5", "data/a", "0.5", "data/b", "0.5", "data/a"]


def test_a_blend_written_as_one_string_is_refused(tmp_path):
    """Megatron-LM's --data-path takes '0.7 a 0.3 b'; here that string is one prefix. The list
    to write holds every item's parts (it held the first item's only, dropping '0.3 b')."""
    for value, parts in [("'0.7 a 0.3 b'", "0.7, a, 0.3, b"), ("[a b]", "a, b"),
                         ("['0.7 a', '0.3 b']", "0.7, a, 0.3, b")]:
        with pytest.raises(YamlConfigError) as err:
            load_run_config(TINY, [f"data_path={value}"])
        assert str(err.value).endswith(f"is one prefix with spaces, not a blend; list its "
                                       f"parts: data_path=[{parts}]"), str(err.value)
    spaced = tmp_path / "my data"
    Path(f"{spaced}.idx").touch()  # a prefix that holds a space is still one
    assert load_run_config(TINY, [f"data_path=['{spaced}']"]).train.data_path == [str(spaced)]
    text = tmp_path / "my text.txt"  # so is a text file, which the data error then handles
    text.touch()
    assert load_run_config(TINY, [f"data_path=['{text}']"]).train.data_path == [str(text)]


def test_vocab_size_may_exceed_the_tokenizers():
    assert load_run_config(TINY, ["vocab_size=259"]).train.vocab_size == 259
    assert load_run_config(TINY, ["vocab_size=102400"]).train.vocab_size == 102400


# ---------------------------------------------------------------------------------------------
# YAML that hides mistakes: repeated keys, anchors and aliases


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text() + "lr: 5.0e-4\n")
    first = 1 + TINY.read_text().splitlines().index("lr: 1.0e-3")
    last = 1 + len(TINY.read_text().splitlines())
    with pytest.raises(YamlConfigError) as err:
        load_run_config(path)
    assert str(err.value) == (f"{path}: line {last}, column 1: duplicate key 'lr' (first set on "
                              f"line {first}); keep only one")
    path.write_text("language_model:\n  num_layers: 2\n  hidden_size: 64\n  num_layers: 4\n")
    with pytest.raises(YamlConfigError, match=r"line 4, column 3: duplicate key 'num_layers' "
                                              r"\(first set on line 2\)"):
        load_run_config(path)


def test_anchors_and_aliases_are_refused(tmp_path):
    # The "billion laughs": nine levels of nine aliases would expand to 9**9 strings here.
    lines = ['l0: &l0 "lol"'] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]"
                                  for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(YamlConfigError) as err:
        load_run_config(path)
    assert str(err.value) == (f"{path}: line 1, column 5: anchors and aliases (&name, *name, "
                              "<<: *name) are not supported in run configs; write the values out")
    path.write_text("defaults: {seed: 1}\n<<: *defaults\n")  # an alias without its anchor
    with pytest.raises(YamlConfigError, match="line 2, column 5: anchors and aliases"):
        load_run_config(path)
    with pytest.raises(YamlConfigError, match="override 'lr=&x 1': the value: line 1, column 1: "
                                              "anchors and aliases"):
        load_run_config(TINY, ["lr=&x 1"])


def test_what_is_dumped_loads_again_without_anchors():
    shared = [0.8, 0.9]
    text = strict_yaml.dump({"a": shared, "b": shared, "c": {"d": shared}})
    assert "&" not in text and "*" not in text
    assert strict_yaml.load(text) == {"a": shared, "b": shared, "c": {"d": shared}}


# ---------------------------------------------------------------------------------------------
# Paths: checked when the config is loaded to run, never created


def test_output_directories_must_be_creatable(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    with pytest.raises(YamlConfigError) as err:
        load_run_config(TINY, [f"save={a_file}/ckpt"])
    assert str(err.value) == (f"{TINY}: save={a_file}/ckpt: {a_file} is a file, so no directory "
                              "can be created under it; choose another directory for save")
    with pytest.raises(YamlConfigError, match=f"tensorboard_dir={a_file}: is a file, not a "
                                              "directory; choose another directory for "
                                              "tensorboard_dir"):
        load_run_config(TINY, [f"tensorboard_dir={a_file}"])
    fresh = tmp_path / "new" / "run"
    cfg = load_run_config(TINY, [f"save={fresh}", f"tensorboard_dir={fresh}/tb"])
    assert cfg.train.save == str(fresh) and not (tmp_path / "new").exists()  # nothing created
    # On paper (dsmoe-plan, conversion) the paths of another machine are fine.
    load_run_config(TINY, [f"save={a_file}/ckpt"], instantiate_checks=False)


def test_tensorboard_logs_follow_a_save_directory_given_on_the_command_line(tmp_path):
    """`dsmoe-train tiny.yaml save=runs/exp1` logged TensorBoard into tiny.yaml's
    runs/tiny/tensorboard, with every other run started from that file."""
    run = tmp_path / "exp1"
    assert load_run_config(TINY, [f"save={run}"]).train.tensorboard_dir == str(
        run / "tensorboard")
    assert load_run_config(TINY, ["save=~/exp1"]).train.tensorboard_dir == os.path.expanduser(
        "~/exp1/tensorboard")
    given = [f"tensorboard_dir={tmp_path / 'tb'}", "tensorboard_dir=null"]
    assert [load_run_config(TINY, [f"save={run}", g]).train.tensorboard_dir for g in given] == [
        str(tmp_path / "tb"), None]
    assert load_run_config(TINY).train.tensorboard_dir == "runs/tiny/tensorboard"
    assert load_run_config(TINY, ["tensorboard_dir=null", "save=null"]).train.tensorboard_dir \
        is None
    off = tmp_path / "off.yaml"  # a file that logs no TensorBoard still logs none
    off.write_text(TINY.read_text().replace("tensorboard_dir: runs/tiny/tensorboard",
                                            "tensorboard_dir: null"))
    assert load_run_config(off, [f"save={run}"]).train.tensorboard_dir is None


def test_output_directories_must_be_writable(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access  # root passes any mode check, so the answer is faked for `locked`
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked
                        else real_access(p, mode))
    for target in (locked, locked / "deeper" / "run"):
        with pytest.raises(YamlConfigError) as err:
            load_run_config(TINY, [f"save={target}"])
        assert f"save={target}: {locked} is not writable; choose another directory" in str(
            err.value)


def test_load_must_exist(tmp_path):
    missing = tmp_path / "runs" / "old"
    with pytest.raises(YamlConfigError) as err:
        load_run_config(TINY, [f"load={missing}"])
    assert str(err.value) == (f"{TINY}: load={missing}: does not exist; expected a checkpoint "
                              "directory (the save directory of an earlier run); correct the path"
                              " or set load: null")
    (tmp_path / "file").write_text("")
    with pytest.raises(YamlConfigError, match="is a file, not a checkpoint directory"):
        load_run_config(TINY, [f"load={tmp_path / 'file'}"])
    assert load_run_config(TINY, [f"load={tmp_path}"]).train.load == str(tmp_path)
    with pytest.raises(YamlConfigError, match="save: is an empty path; give a directory or null"):
        load_run_config(TINY, ["save=''"])


# ---------------------------------------------------------------------------------------------
# The command lines: dsmoe-plan runs the same checks; no traceback reaches the user


def test_dsmoe_plan_refuses_heads_that_do_not_divide_hidden(capsys):
    assert plan.main([str(TINY), "language_model.num_attention_heads=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dsmoe-plan: error: {TINY} with language_model.num_attention_heads=3: ")
    assert "num_attention_heads=3 does not divide hidden_size=128" in err


def test_command_lines_print_one_message_without_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text() + "lr: 5.0e-4\n")
    env = {**os.environ, "PYTHONPATH": str(CONFIGS.parent)}
    cases = [("dsmoe_megatron.train", [str(path)], "duplicate key 'lr'"),
             ("dsmoe_megatron.plan", [str(TINY), "language_model.num_attention_heads=3"],
              "num_attention_heads=3 does not divide hidden_size=128")]
    runs = [subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
            for module, args, _ in cases]
    for run, (_, _, message) in zip(runs, cases):
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 2, stderr
        assert message in stderr and "Traceback" not in stderr, stderr


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(YamlConfigError, match="cannot read"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("language_model: [1, 2\n")
    with pytest.raises(YamlConfigError, match="not valid YAML"):
        load_run_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(YamlConfigError, match="must be a mapping"):
        load_run_config(bad)
    bad.write_bytes(b"\x89PNG\r\n")  # a binary file given as the config: was a traceback
    with pytest.raises(YamlConfigError, match=r"bad.yaml: not a YAML text file \(byte 1 is not "
                                              r"UTF-8\); give the path of a run config YAML"):
        load_run_config(bad)


# ---------------------------------------------------------------------------------------------
# World size


def test_world_size_checks():
    cfg = load_run_config(TINY, ["model_parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size \(2\) .* does not divide "
                                          r"the world size 3"):
        check_world_size(cfg, 3)
    assert check_world_size(cfg, 4) == 2
    with pytest.raises(ConfigError, match=r"global_batch_size=8 is not divisible by "
                                          r"micro_batch_size \(4\) x data-parallel size \(4"):
        check_world_size(cfg, 8)

    moe = load_run_config(CONFIGS / "deepseekmoe_16b.yaml", instantiate_checks=False)
    with pytest.raises(ConfigError, match="expert_model_parallel_size"):
        check_world_size(moe, 12)
    assert check_world_size(moe, 128) == 128
    assert check_world_size(moe, 8) == 8  # 4608 sequences = 576 micro-batches of 1 per rank
    big = load_run_config(CONFIGS / "deepseekmoe_145b.yaml", instantiate_checks=False)
    assert check_world_size(big, 1024) == 32  # TP 2 x PP 16 -> DP 32
    with pytest.raises(ConfigError, match="global_batch_size=4608"):
        check_world_size(big, 16 * 1000)


def test_schema_sections_are_disjoint_and_cover_the_brief():
    keys = [k for s in SECTIONS for k in SCHEMA[s]]
    assert len(keys) == len(set(keys)) and not set(keys) & set(TRAINING_KEYS)
    assert {"num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
            "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_aux_loss_coeff",
            "moe_router_load_balancing_type", "moe_router_pre_softmax", "moe_layer_freq",
            "init_method_std", "hidden_dropout", "attention_dropout", "normalization"
            } <= set(SCHEMA["language_model"])
    assert {"tensor_model_parallel_size", "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size", "expert_model_parallel_size",
            "expert_tensor_parallel_size", "sequence_parallel", "bf16", "fp16", "fp8"
            } <= set(SCHEMA["model_parallel"])
    assert set(SCHEMA["deepseekmoe"]) == {"moe_num_shared_experts", "moe_first_k_dense",
                                          "moe_device_balance_coeff", "moe_device_groups",
                                          "moe_expert_backend"}
    assert "activation_func" not in keys and "params_dtype" not in keys
    assert {"micro_batch_size", "global_batch_size", "seq_length", "max_position_embeddings",
            "vocab_size", "lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "lr_step_decay_at",
            "lr_step_decay_factor", "train_iters", "weight_decay", "adam_beta1", "adam_beta2",
            "adam_eps", "clip_grad", "seed", "save", "load", "finetune", "save_interval",
            "keep_checkpoints", "eval_interval", "eval_iters", "log_interval", "data_path", "split", "tensorboard_dir",
            "use_distributed_optimizer", "overlap_grad_reduce", "ddp_bucket_size", "loss_scale",
            "initial_loss_scale", "exit_duration_in_mins", "exit_signal_handler",
            "exit_signal"} == set(TRAINING_KEYS)


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    """No shell reads the YAML file: "~" must mean the home directory, not a folder named "~"
    in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home" / "ckpt").mkdir(parents=True)
    config = tmp_path / "run.yaml"
    config.write_text(TINY.read_text().replace("tensorboard_dir: runs/tiny/tensorboard",
                                               "tensorboard_dir: ~/tb")
                      .replace("save: runs/tiny/checkpoints", "save: ~/runs/x"))
    train = load_run_config(config, ["load=~/ckpt",
                                     "data_path=[0.3, ~/d/A, 0.7, /data/B]"]).train
    home = str(tmp_path / "home")
    assert (train.save, train.load, train.tensorboard_dir) == (
        f"{home}/runs/x", f"{home}/ckpt", f"{home}/tb")
    assert train.data_path == ["0.3", f"{home}/d/A", "0.7", "/data/B"]
    assert not (tmp_path / "~").exists()


def test_numbers_yaml_1_1_reads_as_octal_or_base_60_are_refused(tmp_path):
    """PyYAML reads 'seed: 0042' as 34 (octal) and '1:30' as 90 (base 60), silently."""
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text().replace("seed: 1234", "seed: 0042"))
    line = 1 + TINY.read_text().splitlines().index("seed: 1234")
    with pytest.raises(YamlConfigError) as err:
        load_run_config(path)
    assert str(err.value) == (f"{path}: line {line}, column 7: 0042 reads as 34 in YAML 1.1 "
                              "(octal: a leading 0); write the number you mean without the 0, "
                              "or quote it as text")
    with pytest.raises(YamlConfigError, match=r"override 'train_iters=1:30': the value: line 1, "
                                              r"column 1: 1:30 reads as 90 in YAML 1.1 "
                                              r"\(base 60\)"):
        load_run_config(TINY, ["train_iters=1:30"])
    assert load_run_config(TINY, ["seed=0", "train_iters=1_000"]).train.seed == 0
    assert strict_yaml.load("[0x1F, '017', 08]") == [31, "017", "08"]


def test_a_bad_override_value_is_named_as_the_override(tmp_path):
    """'lr=abc' on the command line was reported as 'tiny.yaml: lr: ...' only, sending the
    reader to a file whose lr is fine; a bad value in the file names the file alone."""
    path = tmp_path / "run.yaml"
    path.write_text(TINY.read_text().replace("num_layers: 4", "num_layers: 0"))
    with pytest.raises(YamlConfigError) as err:
        load_run_config(path)
    assert str(err.value) == f"{path}: language_model.num_layers=0: must be >= 1"
    for override, message in [
            ("lr=abc", "override 'lr=abc': lr: expected a number, got 'abc' (a string)"),
            ("num_layers=0", "override 'num_layers=0': language_model.num_layers=0: must be >= 1"),
            ("model_parallel={bf16: 2}", "override 'model_parallel={bf16: 2}': "
                                         "model_parallel.bf16: expected true or false")]:
        with pytest.raises(YamlConfigError) as err:
            load_run_config(TINY, [override])
        assert str(err.value).startswith(f"{TINY}: {message}"), str(err.value)


def test_an_error_between_the_file_and_an_override_names_both():
    """`train train_iters=10` was refused as 'tiny.yaml: lr_warmup_iters: must be between 0 and
    train_iters=10 (got 20)', naming the file, whose train_iters is 200, and not the override."""
    with pytest.raises(YamlConfigError) as err:
        load_run_config(TINY, ["train_iters=10", "lr=1e-3"])
    assert str(err.value) == (f"{TINY} with train_iters=10 lr=1e-3: lr_warmup_iters: must be "
                              "between 0 and train_iters=10 (got 20)")


@pytest.mark.parametrize("world, overrides, fix", [
    # EP 16 x PP 16 on 96 GPUs: EP must divide 96 / 16 = 6 and the 128 experts; 3 and 6 do not
    (96, (), "choose an expert_model_parallel_size in [1, 2] (it must divide 6 and the 128 "
             "routed experts)"),
    # expert tensor x pipeline (4 x 16) does not divide 96: no expert size fits
    (96, ("expert_tensor_parallel_size=4",),
     "change the expert tensor or pipeline size to divide 96"),
])
def test_an_expert_size_that_does_not_divide_the_world_names_the_sizes_that_do(
        world, overrides, fix):
    """The suggestion was 'an expert_model_parallel_size that divides 6', which 3 and 6 do but
    the 128 experts do not, and a floored quotient where expert tensor x pipeline does not
    divide the world."""
    cfg = load_run_config(CONFIGS / "deepseekmoe_145b.yaml",
                          ["expert_model_parallel_size=16", *overrides])
    with pytest.raises(YamlConfigError) as refused:
        check_world_size(cfg, world)
    assert str(refused.value).endswith(fix), refused.value


def test_dsmoe_train_names_the_expert_sizes_the_experts_allow(monkeypatch):
    """dsmoe-train checks the layout against the world when it starts the processes, before the
    config's check: that first check suggested 3 and 6 for the 128 routed experts as well."""
    from dsmoe_megatron import train

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args: 96)
    cfg = load_run_config(CONFIGS / "deepseekmoe_145b.yaml", ["expert_model_parallel_size=16",
                                                              "save=null"])
    with pytest.raises(ValueError) as refused:
        train.Trainer(cfg)
    assert str(refused.value).endswith(
        "choose an expert_model_parallel_size in [1, 2] (it must divide 6 and the 128 routed "
        "experts)"), refused.value
