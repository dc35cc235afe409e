"""The command-line tools print our messages, not pages of known-harmless third-party warnings of a
CPU install; ``-v`` or DSMOE_SHOW_WARNINGS=1 shows them."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "yaml_configs" / "tiny.yaml")
# What a CPU install of torch + megatron-core prints during one short dsmoe-train run.
TRAIN_WARNINGS = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "GPTModel IS DEPRECATED",
    "MimoModelConfig is experimental",
    "full scope is deprecated",
    "No CUDA runtime is found",
    "MCore's async save is deprecated",
)
# The ones dsmoe-plan's imports and config print.
PLAN_WARNINGS = ("Apex is not installed", "Transformer Engine and Apex are not installed",
                 "No CUDA runtime is found")


def run_tool(tool: str, args: list[str], **env) -> subprocess.CompletedProcess:
    """``tool`` (a console-script function of dsmoe_megatron.cli) as its console script runs it."""
    code = f"import sys; from dsmoe_megatron import cli; sys.argv[0] = 'dsmoe-{tool}'; sys.exit(cli.{tool}())"
    environ = {k: v for k, v in os.environ.items() if k != "DSMOE_SHOW_WARNINGS"}
    environ.update(OMP_NUM_THREADS="2", **env,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_hides_harmless_warnings_unless_verbose(tmp_path):
    args = [TINY, "train_iters=1", "lr_warmup_iters=0", "eval_interval=null", "log_interval=1",
            "language_model.num_layers=2", "seq_length=32", "micro_batch_size=2",
            "global_batch_size=2", "save_interval=1"]
    quiet = run_tool("train", [*args, f"save={tmp_path}/a", f"tensorboard_dir={tmp_path}/tb_a"])
    assert "checkpoint saved to" in quiet.stdout + quiet.stderr
    shown = [w for w in TRAIN_WARNINGS if w in quiet.stderr]
    assert not shown, quiet.stderr[-3000:]

    verbose = run_tool("train", ["-v", *args, f"save={tmp_path}/b", f"tensorboard_dir={tmp_path}/tb_b"])
    missing = [w for w in TRAIN_WARNINGS if w not in verbose.stderr]
    assert not missing, verbose.stderr[-3000:]


def test_environment_variable_shows_warnings():
    proc = run_tool("plan", [TINY], DSMOE_SHOW_WARNINGS="1")
    assert proc.stdout.startswith("dsmoe-plan: ") and "Parameters" in proc.stdout
    assert all(w in proc.stderr for w in PLAN_WARNINGS), proc.stderr[-3000:]


def test_console_scripts_quiet_warnings_before_importing_the_tool():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"dsmoe-train": "dsmoe_megatron.cli:train",
                       "dsmoe-convert": "dsmoe_megatron.cli:convert",
                       "dsmoe-plan": "dsmoe_megatron.cli:plan",
                       "dsmoe-preprocess": "dsmoe_megatron.cli:preprocess",
                       "dsmoe-analyze": "dsmoe_megatron.cli:analyze"}
