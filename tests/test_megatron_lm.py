"""DeepSeekMoE in Megatron-LM's own training loop (megatron.training.pretrain) on CPU.

(a) examples/pretrain_dsmoe_megatron_lm.py with --dsmoe-yaml tiny.yaml (1 process, and EP2);
(b) Megatron-LM's `--spec` path: a stand-in for pretrain_gpt.py whose model is built by
    megatron.training's GPTModelBuilder (gpt_config_from_args resolves --spec), run through
    `python -m dsmoe_megatron.megatron_lm`.
"""

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
import torch

from dsmoe_megatron.config import ConfigError
from dsmoe_megatron.runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "pretrain_dsmoe_megatron_lm.py")
TINY = str(ROOT / "yaml_configs" / "tiny.yaml")
ITERS = 3
# Shrinks tiny.yaml; flags given explicitly win over the YAML.
SMALL = ["--num-layers", "2", "--hidden-size", "64", "--seq-length", "64",
         "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--train-iters", str(ITERS), "--lr-warmup-iters", "1", "--eval-interval", str(ITERS),
         "--eval-iters", "1", "--log-interval", "1"]
# SMALL as dsmoe-train overrides.
DSMOE_TRAIN_SMALL = [f"{k}={v}" for k, v in [
    ("language_model.num_layers", 2), ("language_model.hidden_size", 64), ("seq_length", 64),
    ("max_position_embeddings", 64), ("micro_batch_size", 2), ("global_batch_size", 4),
    ("lr_warmup_iters", 1)]]
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([-+.\dEe]+) \|"
                       r".*?load_balancing_loss: ([-+.\dEe]+)")

STAND_IN = '''
"""Not pretrain_gpt.py: the least that runs pretrain() with Megatron's GPTModelBuilder."""
from megatron.core.enums import ModelType
from megatron.training import pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args
from megatron.training.models.gpt import GPTModelBuilder

from dsmoe_megatron.megatron_lm import forward_step, train_valid_test_datasets_provider

build = GPTModelBuilder.build_model


def build_and_report(self, *args, **kwargs):
    model = build(self, *args, **kwargs)
    print("MLP_TYPES", [type(layer.mlp).__name__ for layer in model.decoder.layers], flush=True)
    return model


GPTModelBuilder.build_model = build_and_report
if __name__ == "__main__":  # not in the process a --save starts, which imports this file
    args = parse_and_validate_args()
    pretrain(pretrain_cfg_container_from_args(args, gpt_config_from_args(args)),
             train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)
'''


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One preprocessed copy of the shipped corpus (and its sample indices) for every run."""
    return str(tmp_path_factory.mktemp("data_cache"))


def launch(command: list[str], world_size: int = 1) -> tuple[list[str], dict]:
    """The command line and environment of ``command`` on ``world_size`` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1" if world_size > 1 else "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if world_size == 1:  # a plain process, without torchrun's variables
        for name in TORCHRUN_VARIABLES:
            env.pop(name, None)
        return [sys.executable, *command], env
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}",
            f"--master-port={free_port()}", *command], env


def run(command: list[str], world_size: int = 1, timeout: float = 240, returncode: int = 0) -> str:
    command, env = launch(command, world_size)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == returncode, log[-6000:]
    return log


def check_iterations(log: str) -> list[float]:
    found = ITERATION.findall(log)
    assert [int(i) for i, _, _ in found] == list(range(1, ITERS + 1)), log[-4000:]
    losses = [float(loss) for _, loss, _ in found]
    # Byte-level tokens: a fresh model's loss is near ln(259), the padding rows of the vocabulary
    # masked (with --spec, Megatron's GPTModel: ln(384), Megatron-LM's padding unmasked).
    assert all(4.5 < loss < 7.0 for loss in losses), losses
    assert all(0 < float(balance) < 1 for _, _, balance in found)  # a1 = 0.01 x ~1
    assert re.search(r"validation loss at iteration 3 .*lm loss value: ([\d.Ee+-]+)", log)
    return losses


def test_example_trains_with_dsmoe_yaml(cache):
    log = run([EXAMPLE, "--dsmoe-yaml", TINY, *SMALL, "--data-cache-path", cache])
    check_iterations(log)
    # tiny.yaml: first layer dense (moe_first_k_dense: 1), DeepSeekMoE with a shared expert after.
    assert "decoder.layers.0.mlp.linear_fc1.weight" in log
    assert "decoder.layers.0.mlp.router" not in log
    for name in ("router.weight", "shared_experts.linear_fc1.weight", "experts.gate_up_proj"):
        assert f"decoder.layers.1.mlp.{name}" in log
    assert re.search(r"num_experts \.+ 15\b", log) and re.search(r"swiglu \.+ True", log)


@pytest.mark.distributed
def test_example_expert_parallel_two_ranks(cache):
    log = run([EXAMPLE, "--dsmoe-yaml", TINY, *SMALL, "--data-cache-path", cache,
               "--expert-model-parallel-size", "2", "--num-experts", "4", "--moe-router-topk", "2",
               "--moe-device-balance-coeff", "0.05"], world_size=2)
    check_iterations(log)
    assert re.search(r"expert_model_parallel_size \.+ 2\b", log)
    assert len(re.findall(r"device_balance_loss: [\d.]+E[-+]\d+", log)) == ITERS


# Megatron-LM's own flags for pretrain_gpt.py; the shared-expert count comes from the widths (2).
STOCK_FLAGS = ["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4",
               "--ffn-hidden-size", "128", "--num-experts", "8", "--moe-router-topk", "2",
               "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size", "64",
               "--moe-layer-freq", "[0]+[1]*2", "--moe-aux-loss-coeff", "0.01",
               "--moe-router-load-balancing-type", "seq_aux_loss",
               "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
               "--position-embedding-type", "rope", "--seq-length", "64",
               "--max-position-embeddings", "64", "--micro-batch-size", "2",
               "--global-batch-size", "4", "--train-iters", str(ITERS), "--lr", "1e-3",
               "--eval-interval", str(ITERS), "--eval-iters", "1", "--log-interval", "1",
               "--tokenizer-type", "NullTokenizer", "--vocab-size", "259"]


def run_stock(spec: str, cache: str, tmp_path: Path, *flags: str, world_size: int = 1,
              returncode: int = 0) -> str:
    script = tmp_path / "pretrain_stand_in.py"
    script.write_text(STAND_IN)
    return run(["-m", "dsmoe_megatron.megatron_lm", str(script), "--spec", "dsmoe_megatron.specs",
                spec, *STOCK_FLAGS, "--data-cache-path", cache, *flags], world_size=world_size,
               returncode=returncode)


@pytest.mark.parametrize("spec", ["megatron_lm_layer", "megatron_lm_spec"])
def test_stock_spec_path_keeps_dense_first_layer(spec, cache, tmp_path):
    log = run_stock(spec, cache, tmp_path)
    assert "MLP_TYPES ['MLP', 'DeepSeekMoE', 'DeepSeekMoE']" in log
    # The launcher hides the known-harmless warnings of a CPU install.
    harmless = ("Apex is not installed", "Transformer Engine and Apex are not installed",
                "GPTModel IS DEPRECATED", "No CUDA runtime is found")
    assert not [w for w in harmless if w in log], log[:4000]
    assert "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in log
    losses = check_iterations(log)
    assert all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("flags, says", [
    (["--moe-z-loss-coeff", "0.1"], "moe_z_loss_coeff=0.1 is a Megatron-core MoE setting the "
     "DeepSeekMoE block does not implement"),
    (["--moe-num-shared-experts", "1"], "moe_shared_expert_intermediate_size=64 disagrees with "
     "moe_num_shared_experts=1"),
])
def test_stock_path_refusals_are_one_line(flags, says, cache, tmp_path):
    """pretrain_gpt.py builds the model itself (--spec), outside our model_provider's check: a
    setting the DeepSeekMoE layers refuse was a traceback. Now one line, as from our example."""
    log = run_stock("megatron_lm_layer", cache, tmp_path, *flags, returncode=2)
    assert "Traceback" not in log, log[-4000:]
    refusals = [line for line in log.splitlines()
                if line.startswith("dsmoe_megatron.megatron_lm: ")]
    assert len(refusals) == 1 and says in refusals[0], log[-4000:]


@pytest.mark.distributed
def test_stock_layer_spec_trains_sequence_parallel(cache, tmp_path):
    """TP2 with --sequence-parallel through megatron_lm_layer. Megatron ends the block of a layer
    spec in the norm it picked at import (torch's, which refuses sequence parallelism; apex's,
    which refuses RMSNorm): the run stopped while building the model. Now the block ends in the
    layers' norm: the same losses as megatron_lm_spec, whose block spec names it."""
    sequence_parallel = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    logs = [run_stock(spec, cache, tmp_path, *sequence_parallel, world_size=2)
            for spec in ("megatron_lm_layer", "megatron_lm_spec")]
    assert ITERATION.findall(logs[0]) == ITERATION.findall(logs[1]) != []


# ---------------------------------------------------------------------------------------------
# The pieces, in process


def test_yaml_flags_lose_to_explicit_flags():
    from dsmoe_megatron.megatron_lm import expand_dsmoe_yaml
    from dsmoe_megatron.yaml_config import YamlConfigError

    argv = expand_dsmoe_yaml(["--dsmoe-yaml", TINY, "--num-layers", "2"])
    flags = dict(zip(argv, argv[1:]))
    assert flags["--num-experts"] == "15" and flags["--moe-first-k-dense"] == "1"
    assert flags["--normalization"] == "RMSNorm" and "--swiglu" in argv
    assert argv.count("--num-layers") == 1 and argv[-2:] == ["--num-layers", "2"]
    assert "--save" not in argv  # output paths are not taken from the YAML
    paper = str(ROOT / "yaml_configs" / "deepseekmoe_16b.yaml")
    with pytest.raises(YamlConfigError, match="lr_decay_style='step'.*--lr-decay-style"):
        expand_dsmoe_yaml(["--dsmoe-yaml", paper])
    assert "--lr-decay-style" in expand_dsmoe_yaml(["--dsmoe-yaml", paper,
                                                    "--lr-decay-style", "cosine"])


def test_an_explicit_shared_expert_width_wins_over_the_yamls_count(parse_args):
    """--moe-shared-expert-intermediate-size with tiny.yaml (1 shared expert) was refused as
    disagreeing with moe_num_shared_experts, which only the file set. Explicit flags win: the
    count is the width over the expert width (64), as on the --spec path."""
    from megatron.training.arguments import core_transformer_config_from_args

    from dsmoe_megatron.megatron_lm import CPU_FLAGS
    from dsmoe_megatron.specs import config_from_megatron

    def shared_experts(*flags):
        parse_args.reset()
        args = parse_args([*CPU_FLAGS, "--dsmoe-yaml", TINY, *flags])
        return config_from_megatron(core_transformer_config_from_args(args)).moe_num_shared_experts

    assert shared_experts() == 1
    assert shared_experts("--moe-shared-expert-intermediate-size", "128") == 2
    assert shared_experts("--moe-num-shared-experts", "3") == 3
    with pytest.raises(ConfigError, match="=100 must be a multiple of --moe-ffn-hidden-size=64"):
        shared_experts("--moe-shared-expert-intermediate-size", "100")


def test_an_explicit_moe_layer_freq_wins_over_the_yamls_dense_layers(parse_args):
    """--moe-layer-freq "[1]*4" with tiny.yaml (first layer dense) still trained layer 0 dense:
    the file's moe_first_k_dense applied on top of the pattern the flag gave in full."""
    from megatron.training.arguments import core_transformer_config_from_args

    from dsmoe_megatron.megatron_lm import CPU_FLAGS
    from dsmoe_megatron.specs import config_from_megatron

    def pattern(*flags):
        parse_args.reset()
        args = parse_args([*CPU_FLAGS, "--dsmoe-yaml", TINY, *flags])
        return config_from_megatron(core_transformer_config_from_args(args)).moe_layer_pattern()

    assert pattern() == [False, True, True, True]
    assert pattern("--moe-layer-freq", "[1]*4") == [True] * 4
    assert pattern("--moe-layer-freq", "[1,0,1,1]") == [True, False, True, True]
    assert pattern("--moe-first-k-dense", "2") == [False, False, True, True]


def test_yaml_exit_settings_become_megatron_lms(tmp_path):
    """exit_* are Megatron-LM's own settings; its --exit-signal takes a signal's name."""
    from dsmoe_megatron.megatron_lm import expand_dsmoe_yaml

    assert not [f for f in expand_dsmoe_yaml(["--dsmoe-yaml", TINY]) if f.startswith("--exit")]
    config = tmp_path / "run.yaml"
    config.write_text(Path(TINY).read_text() + "exit_duration_in_mins: 30\n"
                      "exit_signal_handler: true\nexit_signal: SIGUSR1\n")
    argv = expand_dsmoe_yaml(["--dsmoe-yaml", str(config)])
    flags = dict(zip(argv, argv[1:]))
    assert (flags["--exit-duration-in-mins"], flags["--exit-signal"]) == ("30", "SIGUSR1")
    assert "--exit-signal-handler" in argv


# TransformerConfig fields in which Megatron-LM's run of a --dsmoe-yaml file may differ from
# dsmoe-train's: how it runs, not what the model computes.
_HOW_IT_RUNS = {
    "transformer_impl", "use_cpu_initialization", "deallocate_pipeline_outputs",
    "tensor_parallel_num_weight_shards", "expert_tensor_parallel_num_weight_shards",
    "cp_comm_type", "inference_sampling_seed", "hetereogenous_dist_checkpoint",
    # Given as our moe_num_shared_experts, and as a list of layers: compared below.
    "moe_shared_expert_intermediate_size", "moe_layer_freq",
}


@pytest.mark.parametrize("name", ["tiny", "tiny_gshard", "deepseekmoe_16b"])
def test_yaml_gives_megatron_lm_the_model_of_dsmoe_train(parse_args, name):
    """The TransformerConfig Megatron-LM builds from a --dsmoe-yaml file is dsmoe-train's but for
    how it runs. Attention's softmax ran in the activations' precision on Megatron-LM's unfused
    path (its flag's default) and in fp32 in dsmoe-train."""
    from megatron.training.arguments import core_transformer_config_from_args

    from dsmoe_megatron.megatron_lm import CPU_FLAGS
    from dsmoe_megatron.yaml_config import load_run_config

    path = str(ROOT / "yaml_configs" / f"{name}.yaml")
    ours = load_run_config(path).model
    theirs = core_transformer_config_from_args(parse_args(
        [*CPU_FLAGS, "--dsmoe-yaml", path, "--lr-decay-style", "cosine"]))
    differ = {field.name: (getattr(theirs, field.name), getattr(ours, field.name))
              for field in dataclasses.fields(theirs) if field.name not in _HOW_IT_RUNS
              and not callable(getattr(theirs, field.name))
              and getattr(theirs, field.name) != getattr(ours, field.name)}
    assert differ == {}
    assert theirs.moe_layer_freq == ours.moe_layer_pattern()


def test_config_from_megatron_reads_widths_and_environment(monkeypatch):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from dsmoe_megatron.config import deepseek_defaults
    from dsmoe_megatron.specs import config_from_megatron

    def megatron_config(**overrides):
        return TransformerConfig(**{**deepseek_defaults(), **dict(
            num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
            num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=16), **overrides})

    monkeypatch.setenv("DSMOE_FIRST_K_DENSE", "1")
    monkeypatch.setenv("DSMOE_DEVICE_GROUPS", "2")
    config = config_from_megatron(megatron_config(moe_shared_expert_intermediate_size=32))
    assert config.moe_num_shared_experts == 2 and config.num_device_groups() == 2
    assert config.moe_layer_pattern() == [False, True, True, True]
    with pytest.raises(ConfigError, match="multiple of --moe-ffn-hidden-size"):
        config_from_megatron(megatron_config(moe_shared_expert_intermediate_size=24))


@pytest.fixture
def parse_args(monkeypatch):
    """Our example's argument parsing, in this process, as rank 0 of 2."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training import global_vars

    from dsmoe_megatron import megatron_lm

    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="1", CUDA_DEVICE_MAX_CONNECTIONS="1").items():
        monkeypatch.setenv(name, value)
    # What Megatron-LM's TP checks read (enable_cpu_training's stand-in, for this test only).
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *_, **__: types.SimpleNamespace(major=9, minor=0))

    def parse(argv):
        monkeypatch.setattr(sys, "argv", ["pretrain.py", *argv])
        return megatron_lm.parse_and_validate_args(default_flags=megatron_lm.EXAMPLE_FLAGS)

    def reset():  # parsing sets Megatron-LM's globals
        global_vars.destroy_global_vars()
        destroy_num_microbatches_calculator()

    parse.reset = reset
    reset()
    yield parse
    reset()


def test_help_of_megatron_lms_flags_and_ours_prints():
    """Megatron-LM's help of --moe-paged-stash-buffer-size-factor-cuda says "10%", which
    argparse takes for a format: the example's --help failed with a ValueError traceback."""
    import argparse

    from megatron.training.arguments import add_megatron_arguments

    from dsmoe_megatron.megatron_lm import add_dsmoe_args

    parser = add_dsmoe_args(add_megatron_arguments(argparse.ArgumentParser()))
    text = parser.format_help()
    assert "10%)" in text and "--dsmoe-yaml" in text


@pytest.mark.parametrize("argv", [[], ["no_such_script.py"]])
def test_the_launcher_without_a_script_is_one_line(argv, capsys):
    """Without arguments the launcher printed its whole help to stdout (exit code 2)."""
    from dsmoe_megatron import megatron_lm

    with pytest.raises(SystemExit) as stop:
        megatron_lm.main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == "" and len(err.splitlines()) == 1, (out, err)
    assert err.startswith("dsmoe_megatron.megatron_lm: no training script") and "-h for help" in err


@pytest.mark.parametrize("argv, says", [
    (["--dsmoe-yaml", "/nonexistent/run.yaml"], "/nonexistent/run.yaml: cannot read"),
    (["--dsmoe-yaml", TINY, "--train-iters", "20"], "--lr-warmup-iters 20 must be below"),
    (["--dsmoe-yaml", TINY, "--expert-model-parallel-size", "2", "--num-experts", "15"],
     "Megatron-LM refused the arguments: Number of experts"),
    # An assert without a message: its own line says what is needed.
    (["--dsmoe-yaml", TINY, "--save", "/nonexistent/save"],
     "Megatron-LM refused the arguments: assert args.save_interval is not None (arguments.py:"),
    # argparse's own errors came after its usage: Megatron-LM's, some 600 lines.
    (["--dsmoe-yaml", TINY, "--num-layerz", "2"], "unrecognized arguments: --num-layerz 2 ("),
    (["--dsmoe-yaml", TINY, "--num-layers", "two"], "--num-layers: invalid int value: 'two'"),
    (["--dsmoe-yaml"], "argument --dsmoe-yaml: expected one argument"),
])
def test_bad_arguments_are_one_line(argv, says, parse_args, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsmoe_megatron.megatron_lm: "), err
    assert says in err[0]


def test_readme_and_example_commands_that_save_give_a_save_interval():
    """Megatron-LM refuses --save without --save-interval (above): the commands shown for its
    loop that save give both."""
    commands = [line for name in ("README.md", "examples/pretrain_dsmoe_megatron_lm.py")
                for line in (ROOT / name).read_text().replace("\\\n", " ").splitlines()
                if "megatron_lm" in line and "--save " in line]
    assert len(commands) == 3 and all("--save-interval" in c for c in commands), commands


@pytest.mark.parametrize("argv, says", [
    (["--moe-z-loss-coeff", "0.1"], "moe_z_loss_coeff=0.1 is a Megatron-core MoE setting the "
     "DeepSeekMoE block does not implement"),
    (["--moe-expert-capacity-factor", "1.0"], "routing is dropless"),
    (["--position-embedding-type", "learned_absolute"], "DeepSeekMoE models use RoPE"),
    # build_model's RoPE covers the whole head, unscaled: these were ignored without a word.
    (["--rotary-percent", "0.5"], "remove --rotary-percent"),
    (["--use-rope-scaling"], "remove --use-rope-scaling"),
    # TransformerConfig's own check (a ValueError).
    (["--recompute-granularity", "selective", "--recompute-modules", "mla_up_proj"],
     "Megatron-LM refused the arguments: mla_up_proj in recompute_modules is only supported"),
])
def test_model_settings_the_block_refuses_are_one_line(argv, says, parse_args, capsys):
    from dsmoe_megatron.megatron_lm import CPU_FLAGS, model_provider

    parse_args([*CPU_FLAGS, "--dsmoe-yaml", TINY, *argv])
    with pytest.raises(SystemExit) as stop:
        model_provider()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsmoe_megatron.megatron_lm: "), err
    assert says in err[0]


def test_the_expert_activation_is_recomputed_as_in_dsmoe_train(parse_args):
    """Megatron asks moe_grouped_gemm for recompute_modules moe_act; dsmoe-train's config sets
    it (our experts are grouped on every backend), and so must the launcher, before Megatron-LM
    builds its TransformerConfig."""
    from megatron.training.argument_utils import core_transformer_config_from_args

    from dsmoe_megatron.megatron_lm import CPU_FLAGS
    from dsmoe_megatron.specs import config_from_megatron

    args = parse_args([*CPU_FLAGS, "--dsmoe-yaml", TINY, "--recompute-granularity", "selective",
                       "--recompute-modules", "moe_act", "shared_experts"])
    config = config_from_megatron(core_transformer_config_from_args(args))
    assert config.recompute_modules == ["moe_act", "shared_experts"]


@pytest.mark.parametrize("given", ["flag", "yaml"])
def test_the_example_builds_rope_of_the_rotary_base(given, parse_args, monkeypatch, tmp_path):
    """--rotary-base was refused (build_model's base was fixed at 10000); our model_provider
    now builds RoPE of that base, given as the flag or as the YAML's rotary_base: the
    frequencies 1 / base^(2i/d) of a head of d channels."""
    from dsmoe_megatron import runtime
    from dsmoe_megatron.megatron_lm import CPU_FLAGS, model_provider

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(Path(TINY).read_text().replace(
        "language_model:\n", "language_model:\n  rotary_base: 500000\n", 1))
    argv = (["--dsmoe-yaml", TINY, "--rotary-base", "500000"] if given == "flag"
            else ["--dsmoe-yaml", str(yaml_file)])
    parse_args([*CPU_FLAGS, *argv, *SMALL])
    monkeypatch.setenv("WORLD_SIZE", "1")  # parse_args parses as rank 0 of 2; build on one
    monkeypatch.delenv("MASTER_PORT")
    runtime.initialize()
    try:
        model = model_provider()
    finally:
        runtime.shutdown()
    head_dim = 64 // 4  # SMALL's hidden size over tiny.yaml's heads
    expected = 1.0 / 500000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    assert model.config.rotary_base == 500000
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq.double(), expected, rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize("tp_flag", [["--tensor-model-parallel-size", "1"],
                                     ["--tensor-model-parallel-size", "2"],
                                     ["--tensor-model-parallel-size=2"]])
def test_yaml_runs_pad_the_vocabulary_like_dsmoe_train(tp_flag, parse_args):
    """A multiple of 1024 on every TP size (Megatron-LM: 128 x TP), so a checkpoint resumes on
    another TP size with the same rows; the TP size as argparse reads it (``--flag=value`` too:
    it was missed, and TP2 padded to 2048)."""
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    args = parse_args(["--dsmoe-yaml", TINY, *tp_flag])
    assert vocab_size_with_padding(259, args, logging_enabled=False) == 1024


@pytest.fixture(scope="module")
def first_run(cache, tmp_path_factory):
    """4 iterations of our example on one process, saved at 2 and 4, then set back to 2."""
    save = tmp_path_factory.mktemp("megatron_lm_first")
    log = run([*RESUMABLE, "--data-cache-path", cache, "--save", str(save)])
    (save / "latest_checkpointed_iteration.txt").write_text("2")
    assert [int(i) for i, _, _ in ITERATION.findall(log)] == [1, 2, 3, 4]
    return save, log


RESUMABLE = [EXAMPLE, "--dsmoe-yaml", TINY, *SMALL, "--train-iters", "4", "--eval-interval", "4",
             "--save-interval", "2"]
VALIDATION = re.compile(r"validation loss at iteration 4 \| lm loss value: (\S+)")


def assert_goes_on_alike(resumed: str, whole: str) -> None:
    """The first iteration a run resumed at iteration 2 logs (the 3rd), and its validation loss
    after two updates, are the uninterrupted run's, up to the order of sums of another layout or
    Adam."""
    (_, loss, balance), (_, loss_then, balance_then) = (ITERATION.findall(resumed)[0],
                                                        ITERATION.findall(whole)[2])
    assert float(loss) == pytest.approx(float(loss_then), rel=1e-5)
    assert float(balance) == pytest.approx(float(balance_then), rel=1e-4)
    assert float(VALIDATION.findall(resumed)[0]) == pytest.approx(
        float(VALIDATION.findall(whole)[0]), rel=1e-5)


def test_resume_continues_the_run(first_run, cache, tmp_path):
    """Megatron-LM's --load of its own checkpoint with torch's Adam (no TE / apex) continues
    the run exactly: the next iteration's loss and the validation loss after two more updates
    equal the uninterrupted run's. (Megatron-LM logs the mean of the first two iterations after
    a resume as the second one's loss, so that one is not compared.)"""
    save, whole = first_run
    again = run([*RESUMABLE, "--data-cache-path", cache, "--load", str(save),
                 "--save", str(tmp_path)])
    assert ITERATION.findall(again)[0] == ITERATION.findall(whole)[2]
    assert VALIDATION.findall(again) == VALIDATION.findall(whole) != []


def test_a_resume_that_pads_the_vocabulary_otherwise_is_refused(first_run, cache, tmp_path):
    """Megatron-LM pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP (a
    stock --spec run: 384 rows on TP1, 512 on TP2) and loads a checkpoint padded otherwise cut or
    with zero rows added: the loss changed without a word. Now one line names both sizes and the
    --make-vocab-size-divisible-by that keeps the checkpoint's (here 1024, --dsmoe-yaml's)."""
    save, _ = first_run
    log = run([*RESUMABLE, "--data-cache-path", cache, "--load", str(save), "--save",
               str(tmp_path), "--make-vocab-size-divisible-by", "128"], returncode=2)
    refusals = [line for line in log.splitlines()
                if line.startswith("dsmoe_megatron.megatron_lm: ")]
    assert len(refusals) == 1 and "Traceback" not in log, log[-4000:]
    assert "padded to 1024 rows and this run pads it to 384" in refusals[0]
    assert "pass --make-vocab-size-divisible-by 1024" in refusals[0]


def test_resume_continues_the_run_in_the_torch_checkpoint_format(cache, tmp_path):
    """--ckpt-format torch keeps the distributed optimizer's state in one file (loaded as
    "dp_zero"), which lacks the per-parameter Adam step torch's Adam is given before a load: the
    resume failed with KeyError 'step'. Now it continues the run as the default format does."""
    first, second = tmp_path / "first", tmp_path / "second"
    torch_format = [*RESUMABLE, "--ckpt-format", "torch", "--data-cache-path", cache]
    whole = run([*torch_format, "--save", str(first)])
    (first / "latest_checkpointed_iteration.txt").write_text("2")
    again = run([*torch_format, "--load", str(first), "--save", str(second)])
    assert ITERATION.findall(again)[0] == ITERATION.findall(whole)[2]
    assert VALIDATION.findall(again) == VALIDATION.findall(whole) != []


def test_resume_continues_the_run_with_dropout(cache, tmp_path):
    """Megatron-LM's default dropout (0.1) on CPU, where dropout draws from torch's default
    generator: the data loaders, started after --load restored it, drew their seed from it
    too, so the resumed run's masks (and losses) were not the uninterrupted run's."""
    first, second = tmp_path / "first", tmp_path / "second"
    dropout = [*RESUMABLE, "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
               "--data-cache-path", cache]
    whole = run([*dropout, "--save", str(first)])
    (first / "latest_checkpointed_iteration.txt").write_text("2")
    again = run([*dropout, "--load", str(first), "--save", str(second)])
    assert ITERATION.findall(again)[0] == ITERATION.findall(whole)[2]
    assert VALIDATION.findall(again) == VALIDATION.findall(whole) != []


FUSED_ADAM = f"""
\"\"\"Our example with Transformer Engine's FusedAdam (tests/fused_adam.py's stand-in), as on a
GPU machine; each of its steps says so.\"\"\"
import runpy, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import fused_adam

step = fused_adam.FusedAdam.step


def step_and_say(self, closure=None):
    print("FusedAdam step", flush=True)
    return step(self, closure)


fused_adam.FusedAdam.step = step_and_say
with fused_adam.as_with_transformer_engine():
    runpy.run_path({EXAMPLE!r}, run_name="__main__")
"""


def test_a_checkpoint_resumes_with_the_other_adam(first_run, cache, tmp_path):
    """A checkpoint of torch's AdamW (CPU, no Transformer Engine) resumed with TE's FusedAdam (a
    GPU machine), and the other way round: torch loads the saved parameter groups in place of
    FusedAdam's own, which lacked its bias_correction, and its first step failed (KeyError).
    Now each run goes on as the uninterrupted run of the Adam that saved it went."""
    script = tmp_path / "pretrain_fused_adam.py"
    script.write_text(FUSED_ADAM)
    fused = [str(script), *RESUMABLE[1:], "--data-cache-path", cache]
    torch_save, torch_whole = first_run
    fused_save = tmp_path / "fused"
    fused_whole = run([*fused, "--save", str(fused_save)])
    (fused_save / "latest_checkpointed_iteration.txt").write_text("2")
    to_fused = run([*fused, "--load", str(torch_save), "--save", str(tmp_path / "to_fused")])
    to_torch = run([*RESUMABLE, "--data-cache-path", cache, "--load", str(fused_save),
                    "--save", str(tmp_path / "to_torch")])
    assert "FusedAdam step" in fused_whole and "FusedAdam step" in to_fused
    assert "FusedAdam step" not in to_torch
    assert_goes_on_alike(to_fused, torch_whole)
    assert_goes_on_alike(to_torch, fused_whole)


@pytest.mark.distributed
def test_resume_on_another_layout(first_run, cache, tmp_path):
    """The same checkpoint resumed under TP2 on two ranks (the optimizer state is saved fully
    reshardable and the vocabulary padded alike on every TP size): the same losses, up to the
    order of TP's sums."""
    save, whole = first_run
    again = run([*RESUMABLE, "--data-cache-path", cache, "--load", str(save),
                 "--save", str(tmp_path), "--tensor-model-parallel-size", "2"], world_size=2)
    assert_goes_on_alike(again, whole)


@pytest.mark.distributed
def test_an_expert_parallel_checkpoint_resumes_on_one_process(cache, tmp_path):
    """Saved under EP2 on two ranks (each holding half the experts and their optimizer state),
    resumed on one process holding all of them: the same losses, up to the order of sums."""
    first = tmp_path / "first"
    experts = [*RESUMABLE, "--num-experts", "16", "--data-cache-path", cache]
    whole = run([*experts, "--expert-model-parallel-size", "2", "--save", str(first)],
                world_size=2)
    (first / "latest_checkpointed_iteration.txt").write_text("2")
    again = run([*experts, "--load", str(first), "--save", str(tmp_path / "second")])
    assert_goes_on_alike(again, whole)


@pytest.mark.distributed
def test_a_pipeline_stage_without_moe_layers_saves_and_resumes(cache, tmp_path):
    """PP2 over two layers, the first dense (tiny.yaml's moe_first_k_dense: 1): the first stage's
    expert optimizer holds no parameter, and Megatron's distributed optimizer asserted on the
    torch Adam step it lacks when saving (and loading). Now the run saves and resumes exactly."""
    first, second = tmp_path / "first", tmp_path / "second"
    pipeline = [*RESUMABLE, "--pipeline-model-parallel-size", "2", "--data-cache-path", cache]
    whole = run([*pipeline, "--save", str(first)], world_size=2)
    (first / "latest_checkpointed_iteration.txt").write_text("2")
    again = run([*pipeline, "--load", str(first), "--save", str(second)], world_size=2)
    assert ITERATION.findall(again)[0] == ITERATION.findall(whole)[2]
    assert VALIDATION.findall(again) == VALIDATION.findall(whole) != []


@pytest.mark.distributed
@pytest.mark.parametrize("saving", [[], ["--async-save", "--use-persistent-ckpt-worker",
                                         "--async-strategy", "mcore"]], ids=["sync", "async"])
def test_a_torchrun_job_sent_sigterm_after_a_checkpoint_saves_and_resumes(saving, cache,
                                                                          tmp_path):
    """--exit-signal-handler after a checkpoint: Megatron-core's torch_dist writer passed its
    results through a multiprocessing Manager, a process the first save started in the rank's
    process group, which torchrun's SIGTERM (a scheduler's, passed on) ended too. The save on the
    signal failed ('Broken pipe'; a rank could also stop with exit code 141 and no message), and
    the steps since the last checkpoint were lost. With --async-save's persistent writer process
    the ranks hung in that save, the writer ended by the signal (and on CPU at the first save:
    the writer did not start). Now the job saves where it stopped, and the run resumed from
    there (on one process) trains as the uninterrupted run does."""
    save, log = tmp_path / "save", tmp_path / "log"
    flags = [EXAMPLE, "--dsmoe-yaml", TINY, *SMALL, "--train-iters", "200", "--eval-iters", "0",
             "--eval-interval", "200", "--data-cache-path", cache]
    command, env = launch([*flags, "--save", str(save), "--save-interval", "2",
                           "--exit-signal-handler", *saving], world_size=2)
    # The log goes to a file: Megatron-LM's arguments alone fill a pipe read only at the end.
    with log.open("w") as out:
        job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while (not (save / "latest_checkpointed_iteration.txt").exists()
                   and job.poll() is None and time.monotonic() < deadline):
                time.sleep(0.2)
            job.send_signal(signal.SIGTERM)  # as a scheduler sends it
            job.wait(timeout=120)
        finally:  # torchrun starts each rank in a session of its own: a hung rank outlives it
            with contextlib.suppress(psutil.NoSuchProcess):  # (torchrun has ended)
                for rank in psutil.Process(job.pid).children(recursive=True):
                    rank.kill()
            job.kill()
    interrupted = log.read_text()
    stopped = int(ITERATION.findall(interrupted)[-1][0])
    assert "exiting program after receiving SIGTERM" in interrupted, interrupted[-4000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(stopped)
    assert 2 < stopped < 200

    # Two more iterations resumed, against the run straight through them.
    end = ["--exit-interval", str(stopped + 2)]
    resumed = ITERATION.findall(run([*flags, *end, "--load", str(save)]))
    straight = ITERATION.findall(run([*flags, *end]))
    assert [int(i) for i, _, _ in resumed] == [stopped + 1, stopped + 2]
    # (Megatron-LM logs the mean of the first two iterations after a resume as the second's.)
    assert float(resumed[0][1]) == pytest.approx(float(straight[stopped][1]), rel=1e-5)
    assert math.isfinite(float(resumed[1][1]))


def test_a_megatron_lm_checkpoint_exports_to_hugging_face(first_run, tmp_path, capsys):
    """dsmoe-convert to-hf of a checkpoint of Megatron-LM's loop (no run.yaml; its iteration
    in latest_checkpointed_iteration.txt): the run config from --config and --set, its context
    length from the arguments Megatron-LM kept (64, not tiny.yaml's 128); the exported embedding
    is the checkpoint's, read back by torch.distributed.checkpoint itself."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader, load

    from dsmoe_megatron import convert

    save, _ = first_run
    out = tmp_path / "hf"
    assert convert.main(["to-hf", "--checkpoint", str(save), "--out", str(out)]) == 2
    assert "pass the --dsmoe-yaml file it was trained with as --config" in capsys.readouterr().err
    model = ["language_model.num_layers=2", "language_model.hidden_size=64"]
    assert convert.main(["to-hf", "--checkpoint", str(save), "--out", str(out), "--config", TINY,
                         *[a for m in model for a in ("--set", m)]]) == 0
    assert "iter_0000002" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 64
    saved = {"embedding.word_embeddings.weight": torch.empty(1024, 64)}
    load(saved, storage_reader=FileSystemReader(str(save / "iter_0000002")), no_dist=True)
    exported = {}
    for shard in out.glob("*.safetensors"):
        exported.update(load_file(shard))
    assert torch.equal(exported["model.embed_tokens.weight"],
                       saved["embedding.word_embeddings.weight"][:259])


def test_the_export_of_a_megatron_lm_checkpoint_computes_what_it_trained(first_run, parse_args,
                                                                         monkeypatch, tmp_path):
    """transformers with the export's remote code gives the logits of the model Megatron-LM's loop
    trained (our model_provider's, with the checkpoint loaded by Megatron-core) on the same
    tokens."""
    from megatron.core import dist_checkpointing
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding
    from transformers import AutoModelForCausalLM

    from dsmoe_megatron import convert, runtime
    from dsmoe_megatron.megatron_lm import CPU_FLAGS, model_provider

    save, _ = first_run
    out = tmp_path / "hf"
    model = ["num_layers=2", "hidden_size=64", "seq_length=64", "max_position_embeddings=64"]
    assert convert.main(["to-hf", "--checkpoint", str(save), "--out", str(out), "--config", TINY,
                         *[a for m in model for a in ("--set", m)]]) == 0
    args = parse_args([*CPU_FLAGS, *RESUMABLE[1:]])
    args.padded_vocab_size = vocab_size_with_padding(259, args, logging_enabled=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # parse_args parses as rank 0 of 2; build on one
    monkeypatch.delenv("MASTER_PORT")
    runtime.initialize()
    try:
        trained = model_provider()
        state = dist_checkpointing.load(trained.sharded_state_dict(), str(save / "iter_0000002"))
        assert trained.load_state_dict(state, strict=False).missing_keys == []
        tokens = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = trained.eval()(tokens, torch.arange(32).expand(2, 32), None)[..., :259]
    finally:
        runtime.shutdown()
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                    dtype=torch.float32).eval()
    with torch.no_grad():
        logits = exported(tokens).logits
    assert (logits - reference).abs().max().item() <= 1e-5


def test_an_export_of_another_model_than_megatron_lm_trained_is_refused(first_run, tmp_path,
                                                                        capsys):
    """The checkpoint keeps the arguments Megatron-LM trained it with (3 experts per token, from
    tiny.yaml): --set moe_router_topk=2 exported a config.json of another model without a word.
    Now refused, naming the trained value (the RoPE base too); a bare --set key works as the
    hint says."""
    from dsmoe_megatron import convert

    save, _ = first_run
    model = ["language_model.hidden_size=64", "seq_length=64", "max_position_embeddings=64"]
    export = ["to-hf", "--checkpoint", str(save), "--out", str(tmp_path / "hf"), "--config", TINY,
              *[a for m in model for a in ("--set", m)]]
    assert convert.main([*export, "--set", "num_layers=2", "--set", "moe_router_topk=2"]) == 2
    err = capsys.readouterr().err
    assert "trained with moe_router_topk=3" in err and "--set moe_router_topk=3" in err, err
    assert convert.main([*export, "--set", "num_layers=2", "--set", "rotary_base=500000"]) == 2
    assert "trained with rotary_base=10000 " in capsys.readouterr().err
    assert convert.main(export) == 2
    assert "use --set num_layers=2" in capsys.readouterr().err
    assert convert.main([*export, "--set", "num_layers=2"]) == 0


@pytest.mark.parametrize("flags, says", [(["--rotary-percent", "0.5"], "--rotary-percent"),
                                         (["--window-size", "8,0"], "--window-size (8, 0)")])
def test_a_stock_run_the_export_cannot_write_is_refused(flags, says, cache, tmp_path, capsys):
    """pretrain_gpt.py (--spec) trains with Megatron-LM's partial RoPE or sliding-window
    attention, which have no tensors: to-hf exported such a checkpoint as RoPE on the whole head
    and full attention (a different model) without a word. Now refused, naming the flag."""
    from dsmoe_megatron import convert

    save = tmp_path / "ckpt"
    run_stock("megatron_lm_layer", cache, tmp_path, *flags,
              "--untie-embeddings-and-output-weights", "--train-iters", "1", "--eval-iters", "0",
              "--save", str(save), "--save-interval", "1")
    model = ["num_layers=3", "hidden_size=64", "ffn_hidden_size=128", "num_moe_experts=8",
             "moe_router_topk=2", "moe_ffn_hidden_size=32", "moe_num_shared_experts=2",
             "moe_router_pre_softmax=false", "seq_length=64", "max_position_embeddings=64"]
    assert convert.main(["to-hf", "--checkpoint", str(save), "--out", str(tmp_path / "hf"),
                         "--config", TINY, *[a for m in model for a in ("--set", m)]]) == 2
    err = capsys.readouterr().err
    assert f"was trained with {says} (the Megatron-LM arguments" in err, err


def test_checkpoints_of_dsmoe_train_are_not_resumed_or_written_over(parse_args, tmp_path, capsys):
    """Megatron-LM finds no checkpoint in a save directory of dsmoe-train (no tracker file):
    --load of one started from random weights, and --save into one would write iter_ directories
    among the run's. Both stop in one line naming --pretrained-checkpoint; --finetune is let
    through (it takes the weights only)."""
    ours = tmp_path / "dsmoe_run"
    ours.mkdir()
    (ours / "latest").write_text("2")
    common = ["--dsmoe-yaml", TINY, "--save-interval", "2"]
    for argv in (["--load", str(ours), "--save", str(tmp_path / "new")],
                 ["--load", str(tmp_path / "new"), "--save", str(ours)]):
        with pytest.raises(SystemExit):
            parse_args([*common, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(ours) in err[0] and "--pretrained-checkpoint" in err[0], err
        parse_args.reset()
    args = parse_args([*common, "--load", str(ours), "--finetune", "--save", str(tmp_path / "n")])
    assert args.finetune


@pytest.fixture(scope="module")
def dsmoe_train_run(tmp_path_factory) -> Path:
    """The save directory of 2 iterations of dsmoe-train on SMALL's model."""
    ours = tmp_path_factory.mktemp("dsmoe_train") / "dsmoe"
    run(["-m", "dsmoe_megatron.train", TINY, *DSMOE_TRAIN_SMALL, "train_iters=2", "save_interval=2",
         "eval_interval=null", "tensorboard_dir=null", f"save={ours}"])
    return ours


def test_a_dsmoe_train_checkpoint_of_another_model_is_named(dsmoe_train_run, cache, tmp_path):
    """--pretrained-checkpoint of a 2-layer dsmoe-train run into 3 layers: the load compared
    tensors only and called the checkpoint damaged (advising an earlier one). Now one line
    names the field its run.yaml sets otherwise and the flag, as dsmoe-train's resume does."""
    log = run([EXAMPLE, "--dsmoe-yaml", TINY, *SMALL, "--num-layers", "3", "--data-cache-path",
               cache, "--pretrained-checkpoint", str(dsmoe_train_run), "--load", str(tmp_path),
               "--save", str(tmp_path), "--save-interval", "1"], returncode=2)
    refusals = [line for line in log.splitlines()
                if line.startswith("dsmoe_megatron.megatron_lm: ")]
    assert len(refusals) == 1 and "damaged" not in refusals[0], log[-4000:]
    assert "num_layers is 2 there and 3 here" in refusals[0] and "--num-layers" in refusals[0]


def test_training_starts_from_a_dsmoe_train_checkpoint(dsmoe_train_run, cache, tmp_path):
    """--pretrained-checkpoint of a dsmoe-train save directory: Megatron-LM's loop starts from
    its weights at iteration 0. With lr 0 the checkpoint Megatron-LM saves after one step holds
    exactly the weights dsmoe-train saved (both read back by torch.distributed.checkpoint); a
    restart with the same flags then resumes Megatron-LM's own checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ours, new = dsmoe_train_run, tmp_path / "megatron_lm"
    start = [EXAMPLE, "--dsmoe-yaml", TINY, *SMALL, "--data-cache-path", cache, "--lr", "0",
             "--min-lr", "0", "--lr-warmup-iters", "0", "--pretrained-checkpoint", str(ours),
             "--load", str(new), "--save", str(new), "--save-interval", "1"]
    log = run([*start, "--train-iters", "1", "--eval-iters", "0"])
    assert f"started from the weights of {ours / 'iter_0000002'}" in log

    def model_tensors(ckpt: Path) -> dict:
        entries = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
                   if isinstance(m, TensorStorageMetadata) and "optimizer" not in k}
        load(tensors, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
        return tensors

    saved, trained_on = model_tensors(ours / "iter_0000002"), model_tensors(new / "iter_0000001")
    assert len(saved) > 10 and saved.keys() == trained_on.keys()
    assert [k for k in saved if not torch.equal(saved[k], trained_on[k])] == []
    again = run([*start, "--train-iters", "2", "--eval-iters", "0",
                 "--override-opt_param-scheduler"])
    assert f"loading distributed checkpoint from {new} at iteration 1" in again
    assert "started from the weights" not in again


def test_a_hugging_face_import_starts_where_its_source_was(dsmoe_train_run, cache, tmp_path):
    """dsmoe-train -> to-hf -> from-hf -> Megatron-LM's loop: the first loss equals the one of
    the same loop started from the dsmoe-train checkpoint. The import's vocabulary padding rows
    are zeros, the trained ones not: equal only with the padding masked, as dsmoe-train does."""
    from dsmoe_megatron import convert

    ours = dsmoe_train_run
    assert convert.main(["to-hf", "--checkpoint", str(ours), "--out", str(tmp_path / "hf")]) == 0
    assert convert.main(["from-hf", "--hf", str(tmp_path / "hf"), "--out",
                         str(tmp_path / "imported")]) == 0
    first_losses = []
    for source in (ours, tmp_path / "imported"):
        save = tmp_path / f"megatron_lm_{source.name}"
        log = run([EXAMPLE, "--dsmoe-yaml", TINY, *SMALL, "--data-cache-path", cache,
                   "--pretrained-checkpoint", str(source), "--load", str(save), "--save",
                   str(save), "--save-interval", "1", "--train-iters", "1",
                   "--lr-warmup-iters", "0", "--eval-iters", "0"])
        first_losses.append(ITERATION.findall(log)[0][1])
    assert first_losses[0] == first_losses[1]


def test_an_fp16_run_saves_before_its_first_applied_update_and_exports(cache, tmp_path):
    """--fp16 starts at loss scale 2**32, so its first steps overflow and are skipped: torch's
    Adam (no TE / apex) had no state yet and the save stopped on Megatron's `assert len(steps)
    == 1`. Now the checkpoint is written, and dsmoe-convert exports it in fp16."""
    from dsmoe_megatron import convert

    save = tmp_path / "fp16"
    log = run([EXAMPLE, "--dsmoe-yaml", TINY, *SMALL, "--train-iters", "1", "--eval-iters", "0",
               "--lr-warmup-iters", "0", "--fp16", "--data-cache-path", cache,
               "--save", str(save), "--save-interval", "1"])
    assert "number of skipped iterations:   1" in log
    model = ["num_layers=2", "hidden_size=64", "seq_length=64", "max_position_embeddings=64"]
    assert convert.main(["to-hf", "--checkpoint", str(save), "--out", str(tmp_path / "hf"),
                         "--config", TINY, *[a for m in model for a in ("--set", m)]]) == 0
    import json

    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float16"


def test_dsmoe_train_starts_from_a_megatron_lm_checkpoint_with_finetune_only(first_run,
                                                                              tmp_path):
    """load: of a checkpoint of Megatron-LM's loop, whose optimizer state dsmoe-train does not
    read, continued at its iteration with a new Adam and said nothing; it is refused with
    finetune: true, which starts from its weights (the save directory, through its tracker)."""
    save, _ = first_run
    small = [TINY, *DSMOE_TRAIN_SMALL, "eval_interval=null", "tensorboard_dir=null",
             f"load={save}"]
    log = run(["-m", "dsmoe_megatron.train", *small, "train_iters=4",
               f"save={tmp_path / 'continued'}"], returncode=1)
    assert "optimizer state is not read here" in log and "finetune: true" in log, log[-3000:]
    assert "Traceback" not in log
    log = run(["-m", "dsmoe_megatron.train", *small, "finetune=true", "train_iters=1",
               f"save={tmp_path / 'finetuned'}"])
    assert f"loaded the weights of {save / 'iter_0000002'}" in log, log[-3000:]


WRITER_RANK = '''
import os, signal, sys, time
from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller
from dsmoe_megatron.megatron_lm import enable_cpu_training, hook_checkpoint_loading

enable_cpu_training()
hook_checkpoint_loading()
writer = PersistentAsyncCaller._get_process(0)
print(writer.pid, flush=True)
time.sleep(600)
'''


def test_the_persistent_async_writer_ends_with_a_rank_killed_without_exiting(tmp_path):
    """--async-save --use-persistent-ckpt-worker's writer ignores SIGTERM (the rank's
    --exit-signal-handler save goes on in it). A rank that SIGTERM ended at once (no
    --exit-signal-handler), or SIGKILL, runs no atexit to kill it: the writer lived on, an
    orphan waiting for saves forever. It now ends with its rank."""
    rank = subprocess.Popen([sys.executable, "-c", WRITER_RANK], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, start_new_session=True)
    writer = None
    try:
        writer = psutil.Process(int(rank.stdout.readline()))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until it has set SIGTERM aside (imports first)
            status = Path(f"/proc/{writer.pid}/status").read_text()
            if int(re.search(r"SigIgn:\s*(\w+)", status)[1], 16) & 1 << signal.SIGTERM - 1:
                break
            time.sleep(0.2)
        assert writer.is_running()
        os.killpg(rank.pid, signal.SIGTERM)  # as torchrun passes it on: to the rank's group
        assert rank.wait(timeout=60) == -signal.SIGTERM
        writer.wait(timeout=30)  # psutil.TimeoutExpired while it lives on
    finally:
        rank.kill()
        if writer is not None and writer.is_running():
            writer.kill()
