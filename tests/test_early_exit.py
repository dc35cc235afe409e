"""Stopping early with a checkpoint (exit_signal_handler, exit_duration_in_mins): every rank
stops after the same step though the signal reaches one; a torchrun job sent SIGTERM after a
checkpoint saves and stops, and the run resumed from that checkpoint on another layout trains as
the uninterrupted single-process run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import run_on_ranks
from resume_cases import ROOT, train_argv

pytestmark = pytest.mark.distributed


def _requests_after_a_signal_to_rank_1(_):
    import torch
    import torch.distributed as dist

    from dsmoe_megatron.early_exit import EarlyExit
    from dsmoe_megatron.yaml_config import TrainingArgs

    train = TrainingArgs(exit_signal_handler=True, exit_signal="SIGUSR1")
    with EarlyExit(train, torch.device("cpu"), time.monotonic()) as early_exit:
        before = early_exit.reason()
        if dist.get_rank() == 1:
            signal.raise_signal(signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR1)  # the scheduler's and torchrun's: one request
        after = early_exit.reason()
    restored = signal.getsignal(signal.SIGUSR1)
    budget = TrainingArgs(exit_duration_in_mins=1e-9)
    spent = EarlyExit(budget, torch.device("cpu"), time.monotonic()).reason()
    return before, after, restored == signal.SIG_DFL, spent


def test_every_rank_stops_after_the_step_one_of_them_was_signalled_in():
    results = run_on_ranks(_requests_after_a_signal_to_rank_1, 2, args=(None,))
    assert results == [(None, "SIGUSR1 received", True, "exit_duration_in_mins=1e-09 reached")] * 2


def _run(argv: list[str], env: dict, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "dsmoe_megatron.train", *argv], env=env,
                          capture_output=True, text=True, timeout=600)


def _losses(save: Path) -> dict[int, float]:
    lines = (save / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["lm_loss"] for r in map(json.loads, lines) if "lm_loss" in r}


def test_a_torchrun_job_sent_sigterm_saves_and_resumes_on_another_layout(tmp_path):
    from dsmoe_megatron.data import default_corpus_prefix

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    data = default_corpus_prefix(tmp_path / "data")
    run = tmp_path / "ep2"
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         "-m", "dsmoe_megatron.train",
         *train_argv(data, "EP2", run, "train_iters=200", "save_interval=2",
                     "exit_signal_handler=true")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # SIGTERM to torchrun, as a scheduler sends it; torchrun passes it on to each rank's
        # process group, where a process a save started (Megatron's writer had one) got it too.
        while not (run / "latest").exists() and job.poll() is None:
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=300)
    finally:
        job.kill()
    stopped = int((run / "latest").read_text())
    assert f"stopped at iteration {stopped} of 200: SIGTERM received; continue with " \
           "--resume" in out, (out[-2000:], err[-3000:])
    assert 2 < stopped < 200, err[-3000:]
    assert sorted(p.name for p in run.glob("iter_*"))[-1] == f"iter_{stopped:07d}"

    # Resumed on one process for two more steps, against one process trained straight through.
    end = ["train_iters=200", "--stop-at", str(stopped + 2)]
    resumed = _run([*train_argv(data, "1", run, *end), "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _run(train_argv(data, "1", tmp_path / "straight", *end), env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected, got = _losses(tmp_path / "straight"), _losses(run)
    assert sorted(got) == sorted(expected) == list(range(1, stopped + 3))
    for iteration, loss in expected.items():
        assert got[iteration] == pytest.approx(loss, rel=1e-5, abs=1e-6), iteration
