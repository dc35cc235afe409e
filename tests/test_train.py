"""The trainer end to end on the shipped corpus: loss falls, resume is exact, EP2 runs, NaN stops."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_on_ranks
from dsmoe_megatron.runtime import ParallelLayout

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "yaml_configs" / "tiny.yaml")
SMALL = ["language_model.num_layers=2", "seq_length=64", "micro_batch_size=2",
         "global_batch_size=4", "eval_interval=null", "log_interval=1", "lr_warmup_iters=2"]


def train_in_process(args: list[str]) -> list[dict]:
    """Rank function: run dsmoe-train's main() and return its metrics.jsonl records."""
    from dsmoe_megatron import train

    assert train.main(args) == 0
    save = next(a.split("=", 1)[1] for a in args if a.startswith("save="))
    return [json.loads(line) for line in (Path(save) / "metrics.jsonl").read_text().splitlines()]


def losses_by_iteration(records):
    return {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}


@pytest.mark.distributed
def test_resume_continues_exactly(tmp_path):
    common = [TINY, *SMALL, "train_iters=8", "save_interval=4"]
    [straight] = run_on_ranks(train_in_process, 1, args=([*common, f"save={tmp_path / 'a'}"],))
    [first] = run_on_ranks(train_in_process, 1,
                           args=([*common, f"save={tmp_path / 'b'}", "--stop-at", "4"],))
    [resumed] = run_on_ranks(train_in_process, 1,
                             args=([*common, f"save={tmp_path / 'b'}", "--resume"],))
    uninterrupted = losses_by_iteration(straight)
    assert sorted(losses_by_iteration(first)) == [1, 2, 3, 4]
    after = losses_by_iteration(resumed)
    assert sorted(after) == [1, 2, 3, 4, 5, 6, 7, 8]  # the file holds both runs
    for it in range(5, 9):
        assert after[it] == pytest.approx(uninterrupted[it], abs=1e-6), it
    assert (tmp_path / "b" / "iter_0000008" / "run.yaml").exists()


@pytest.mark.distributed
def test_two_rank_expert_parallel_run_trains(tmp_path):
    args = [TINY, *SMALL, "train_iters=6", f"save={tmp_path}",
            "model_parallel.expert_model_parallel_size=2", "language_model.num_moe_experts=16"]
    results = run_on_ranks(train_in_process, 2, layout=ParallelLayout(expert=2), args=(args,))
    losses = losses_by_iteration(results[0])
    assert losses[6] < losses[1]
    assert (tmp_path / "latest").read_text().strip() == "6"


def test_loss_falls_and_a_checkpoint_is_written(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.train", TINY, *SMALL, "train_iters=15",
         f"save={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"checkpoint saved to {(tmp_path / 'iter_0000015').resolve()}" in out.stdout
    losses = losses_by_iteration(
        [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()])
    assert losses[15] < losses[1] - 0.5


def test_nan_loss_stops_with_last_good_checkpoint_intact(tmp_path):
    # A learning rate of 1e6 blows the weights up within a few steps.
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.train", TINY, *SMALL, "train_iters=40",
         "save_interval=1", "lr=1e6", "clip_grad=0", "lr_warmup_iters=0", f"save={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 1
    assert "the loss became" in out.stderr and "last good checkpoint" in out.stderr
    latest = int((tmp_path / "latest").read_text())
    assert (tmp_path / f"iter_{latest:07d}" / "metadata.json").exists()
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("override, message", [
    ("language_model.num_moe_expert=8", "did you mean num_moe_experts"),
    ("language_model.moe_router_topk=99", "moe_router_topk=99"),
    ("model_parallel.expert_model_parallel_size=4", "expert_model_parallel_size"),
])
def test_bad_config_is_refused_before_training(override, message, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.train", TINY, override, f"save={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0
    assert message in out.stderr


def test_missing_data_path_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.train", TINY, *SMALL,
         f"data_path=[{tmp_path / 'nothing'}]", f"save={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1
    assert "nothing" in out.stderr and "dsmoe-preprocess" in out.stderr
