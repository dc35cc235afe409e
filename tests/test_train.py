"""dsmoe-train end to end: the loss falls; a run's directory is never overwritten by another;
damaged checkpoints, Ctrl-C and divergence stop with a clear message and a checkpoint that
resumes; fp16 trains like fp32; bad configs are refused before training.

The single-rank runs of one spawned job (tests/resume_cases.py) are shared by the tests through
the `cli` fixture; multi-rank resume is in test_resume.py.
"""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_on_ranks
from resume_cases import run_job, train_argv

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "yaml_configs" / "tiny.yaml")
SMALL = ["language_model.num_layers=2", "seq_length=64", "micro_batch_size=2",
         "global_batch_size=4", "eval_interval=null", "log_interval=1", "lr_warmup_iters=2"]
DAMAGE = {  # case: (file in the save dir, how, what the message names)
    "latest holds garbage": ("latest", "garbage", "holds 'garbage'"),
    "latest names a missing iteration": ("latest", "7", "iter_0000007 does not exist"),
    "deleted .distcp": ("iter_0000002/__0_0.distcp", "delete", "__0_0.distcp is missing"),
    "truncated .distcp": ("iter_0000002/__0_0.distcp", "truncate", "__0_0.distcp is truncated"),
    "truncated .metadata": ("iter_0000002/.metadata", "truncate", ".metadata"),
    "garbled .metadata": ("iter_0000002/.metadata", "not a pickle", ".metadata"),
    "missing metadata.json": ("iter_0000002/metadata.json", "delete", "metadata.json"),
}


class Cli:
    def __init__(self, root: Path, data: str):
        self.root, self.data = root, data
        self.keys: list = []
        self.tasks: list = []
        self.results: dict = {}

    def argv(self, save: str, *extra: str) -> list[str]:
        return train_argv(self.data, "1", self.root / save, *extra)

    def add(self, key, kind: str, *args) -> None:
        self.keys.append(key)
        self.tasks.append((kind, *args))


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Cli:
    from dsmoe_megatron.data import default_corpus_prefix

    root = tmp_path_factory.mktemp("cli")
    c = Cli(root, default_corpus_prefix(root / "data"))
    two = ["train_iters=2", "save_interval=1"]
    c.add("first", "train", c.argv("run", *two))
    c.add("again", "train", c.argv("run", *two))
    # A new run refused while it sets up (its load= holds another model) creates no save dir.
    c.add("load other model", "train", c.argv("refused", *two, f"load={root / 'run'}",
                                             "language_model.moe_ffn_hidden_size=64"))
    c.add("resume empty", "train", c.argv("empty", *two, "--resume"))
    c.add("auto starts", "train", c.argv("auto", *two, "--resume", "auto"))
    c.add("auto continues", "train", c.argv("auto", "train_iters=3", "--resume", "auto"))
    c.add("auto complete", "train", c.argv("auto", "train_iters=3", "--resume", "auto"))
    c.add("other model", "train", c.argv("auto", "train_iters=4",
                                        "language_model.moe_ffn_hidden_size=64", "--resume"))
    c.add("new lr", "train", c.argv("auto", "train_iters=4", "lr=1e-4", "min_lr=1e-5",
                                    "--resume"))
    c.add("other norm epsilon", "train", c.argv("auto", "train_iters=5",
                                               "language_model.layernorm_epsilon=0.1", "--resume"))
    c.add("other rotary base", "train", c.argv("auto", "train_iters=5",
                                              "language_model.rotary_base=500000", "--resume"))
    c.add("new seq_length", "train", c.argv("auto", "train_iters=5", "seq_length=16", "--resume"))
    for case, (file, how, _) in DAMAGE.items():
        c.add(("damage", case), "damage", str(root / "run"), str(root / case), file, how)
        c.add(("resume damaged", case), "train", c.argv(case, *two, "--resume"))
    # `latest` set back by hand to 1: the resumed run saves iteration 2 again.
    c.add("rewind", "damage", str(root / "run"), str(root / "rewound"), "latest", "1")
    c.add("resume rewound", "train", c.argv("rewound", *two, "--resume"))
    c.add("overwrite bad data", "train", [*c.argv("run", "train_iters=1", "--overwrite"),
                                          f"data_path=[{root / 'absent'}]"])
    c.add("files before overwrite", "listing", str(root / "run"))
    c.add("overwrite", "train", c.argv("run", "train_iters=1", "--overwrite"))
    for when in ("after save", "during save"):
        c.add(("ctrl-c", when), "train_interrupted",
              c.argv(f"ctrl-c {when}", "train_iters=3", "save_interval=1"), when)
    c.add(("sigterm", "during save"), "train_interrupted",
          c.argv("sigterm during save", "train_iters=3", "save_interval=1"), "during save",
          "SIGTERM")
    c.add("resume before a checkpoint", "train",
          c.argv("sigterm during save", "train_iters=3", "--resume"))
    c.add("auto before a checkpoint", "train",
          c.argv("sigterm during save", "train_iters=3", "--resume", "auto"))
    # With exit_signal_handler the signal saves after the step it arrives in, then stops.
    handled = ["train_iters=3", "save_interval=1", "exit_signal_handler=true"]
    c.add(("handled", "SIGUSR1"), "train_interrupted",
          c.argv("handled SIGUSR1", *handled, "exit_signal=SIGUSR1"), "after save", "SIGUSR1")
    c.add(("handled", "SIGTERM"), "train_interrupted",
          c.argv("handled SIGTERM", *handled), "during save", "SIGTERM")
    c.add("out of time", "train", c.argv("out of time", "train_iters=3",
                                         "exit_duration_in_mins=1e-9"))
    c.add("after the time limit", "train", c.argv("out of time", "train_iters=3", "--resume"))
    c.add("straight through", "train", c.argv("straight through", "train_iters=3"))
    c.add("locked", "train_while_locked", c.argv("locked", *two))
    board = f"tensorboard_dir={root / 'killed' / 'tensorboard'}"
    c.add("to be killed", "train", c.argv("killed", *two, board))
    c.add("kill", "killed_during_save", str(root / "killed"), 2)
    c.add("after kill", "train", c.argv("killed", "train_iters=3", board, "--resume"))
    # A run extended on resume (train_iters 3 -> 1000, far past one pass over the data) against
    # one planned that long from the start; constant lr after the warm-up.
    constant, stop = ["lr_decay_style=constant"], ["--stop-at", "6"]
    c.add("planned long", "train", c.argv("planned long", "train_iters=1000", *constant, *stop))
    c.add("short", "train", c.argv("extended", "train_iters=3", *constant))
    c.add("extended", "train", c.argv("extended", "train_iters=1000", *constant, *stop,
                                      "--resume"))
    c.add("batch 4", "train", c.argv("batch", "train_iters=2", "global_batch_size=4",
                                     "eval_interval=2", "eval_iters=1"))
    c.add("batch 8", "train", c.argv("batch", "train_iters=3", "global_batch_size=8",
                                     "eval_interval=3", "eval_iters=1", "--resume"))
    c.add("load past train_iters", "train", c.argv("load past", "train_iters=2",
                                                    f"load={root / 'extended'}"))
    diverging = ["train_iters=30", "save_interval=1", "lr=1e6", "clip_grad=0",
                 "lr_warmup_iters=0"]
    c.add("diverge", "train", c.argv("nan", *diverging))
    c.add("resume diverged", "train", c.argv("nan", *diverging, "--resume"))
    # A loss scale fp16 gradients do not overflow at, so that no step is skipped.
    precision = ["train_iters=6", "lr=1e-2", "initial_loss_scale=4096"]
    c.add("fp32", "train", c.argv("fp32", *precision))
    c.add("fp16", "train", c.argv("fp16", *precision, "model_parallel.fp16=true"))
    results = run_on_ranks(run_job, 1, args=(c.tasks,), timeout=1800)[0]
    c.results = dict(zip(c.keys, results))
    return c


def records(result: dict) -> dict[int, dict]:
    return {r["iteration"]: r for r in result["records"] if "lm_loss" in r}


def ok(result: dict) -> dict:
    assert result["code"] == 0, result["stderr"][-3000:]
    return result


def refused(result: dict, *phrases: str) -> str:
    """A one-paragraph error: exit code 1, the phrases, no traceback."""
    assert result["code"] == 1, result["stderr"][-3000:]
    message = result["stderr"]
    assert "Traceback" not in message, message
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    return message


@pytest.mark.distributed
def test_a_second_run_never_overwrites_the_first(cli):
    first = records(ok(cli.results["first"]))
    refused(cli.results["again"], "already holds a run", "--resume", "--overwrite")
    # What the refused start saw is what the first run left (the overwrite came later).
    assert sorted(first) == [1, 2]
    assert cli.results["again"]["records"] == cli.results["first"]["records"]


@pytest.mark.distributed
def test_overwrite_starts_over(cli):
    after = records(ok(cli.results["overwrite"]))
    assert sorted(after) == [1]  # metrics.jsonl holds the new run only
    assert (cli.root / "run" / "latest").read_text() == "1"
    assert not (cli.root / "run" / "iter_0000002").exists()
    assert not list((cli.root / "run").glob("*.deleting"))  # deleted before the run ended


@pytest.mark.distributed
def test_resume_needs_a_checkpoint_and_auto_starts_without_one(cli):
    refused(cli.results["resume empty"], "no checkpoint", "--resume auto")
    assert sorted(records(ok(cli.results["auto starts"]))) == [1, 2]
    continued = ok(cli.results["auto continues"])
    assert sorted(records(continued)) == [1, 2, 3]
    # A chained job (sbatch --dependency=singleton) that finds the run complete exits at once,
    # training nothing and writing no checkpoint, nor reading one (minutes at scale).
    complete = ok(cli.results["auto complete"])
    said = complete["stdout"] + complete["stderr"]
    assert "the run is complete: iteration 3 of train_iters=3" in said
    assert "loaded" not in said, said
    assert complete["records"] == continued["records"]


@pytest.mark.distributed
def test_resume_takes_hyper_parameters_from_the_config(cli):
    after = records(ok(cli.results["new lr"]))
    # The 4th update (index 3) on the new cosine schedule: warmup 1, then 1e-4 -> 1e-5 over 3.
    assert after[4]["lr"] == pytest.approx(1e-5 + 0.5 * 9e-5 * (1 + math.cos(math.pi * 2 / 3)))
    assert math.isfinite(after[4]["lm_loss"])


@pytest.mark.distributed
def test_resume_into_another_model_names_the_field(cli):
    refused(cli.results["other model"], "language_model.moe_ffn_hidden_size is 96 there and 64")
    refused(cli.results["load other model"], "moe_ffn_hidden_size is 96 there and 64")
    assert not (cli.root / "refused").exists()  # no directory holding a lone lock file
    # Not a shape, but the function the weights were trained for (and the export's rms_norm_eps).
    refused(cli.results["other norm epsilon"],
            "language_model.layernorm_epsilon is 1e-05 there and 0.1 here")
    refused(cli.results["other rotary base"],
            "language_model.rotary_base is 10000.0 there and 500000.0 here")


@pytest.mark.distributed
def test_a_resume_with_another_seq_length_says_the_stream_changes(cli):
    result = ok(cli.results["new seq_length"])
    assert "seq_length changes from 32 to 16: the data is cut into other samples" in (
        result["stderr"] + result["stdout"])
    assert sorted(records(result))[-1] == 5


@pytest.mark.distributed
@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_is_a_clear_error(cli, case):
    _, _, names = DAMAGE[case]
    refused(cli.results[("resume damaged", case)], names)


@pytest.mark.distributed
@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_export_is_a_clear_error(cli, case, capsys, tmp_path):
    from dsmoe_megatron import convert

    _, _, names = DAMAGE[case]
    code = convert.main(["to-hf", "--checkpoint", str(cli.root / case), "--out",
                         str(tmp_path / "hf")])
    message = capsys.readouterr().err
    assert code == 2 and names in message and "Traceback" not in message, message


@pytest.mark.distributed
@pytest.mark.parametrize("when", ["after save", "during save"])
def test_ctrl_c_names_the_last_complete_checkpoint(cli, when):
    result = cli.results[("ctrl-c", when)]
    save = cli.root / f"ctrl-c {when}"
    assert result["code"] == 130
    assert "Traceback" not in result["stderr"] and "KeyboardInterrupt" not in result["stderr"]
    assert not list(save.glob("*.partial")) and not list(save.glob("*.deleting"))
    if when == "after save":
        assert (save / "latest").read_text() == "1"
        assert f"last complete checkpoint is {save / 'iter_0000001'}" in result["stderr"]
    else:  # interrupted while writing the first checkpoint: none is complete
        assert not (save / "latest").exists()
        assert "no complete checkpoint" in result["stderr"]


@pytest.mark.distributed
def test_sigterm_stops_like_ctrl_c(cli):
    """A scheduler's SIGTERM (time limit, preemption) during a save: the partial save is
    removed, the message says so, and nothing is a traceback."""
    result = cli.results[("sigterm", "during save")]
    save = cli.root / "sigterm during save"
    assert result["code"] == 143
    assert "Traceback" not in result["stderr"]
    assert "terminated (SIGTERM) at iteration 1; no complete checkpoint" in result["stderr"]
    assert not list(save.glob("*.partial")) and not list(save.glob("*.deleting"))
    # Its run.yaml stays, so a plain start would be refused: --resume says what works.
    refused(cli.results["resume before a checkpoint"], "no checkpoint",
            "--overwrite to start it over", "--resume auto")
    # --resume auto starts it over, setting aside the records of the run that saved nothing.
    started = ok(cli.results["auto before a checkpoint"])
    assert "moved 1 metrics records logged by an earlier run that saved no checkpoint" in (
        started["stdout"] + started["stderr"])
    assert sorted(records(started)) == [1, 2, 3]


@pytest.mark.distributed
@pytest.mark.parametrize("sent", ["SIGUSR1", "SIGTERM"])
def test_a_handled_exit_signal_saves_after_the_step_and_stops(cli, sent):
    """A signal after iteration 1's save (SIGUSR1), or during it (SIGTERM): that save completes,
    iteration 2 is trained and saved, and the run stops there (train_iters=3)."""
    result = ok(cli.results[("handled", sent)])
    save = cli.root / f"handled {sent}"
    assert f"stopped at iteration 2 of 3: {sent} received; continue with --resume" in result[
        "stdout"]
    assert (save / "latest").read_text() == "2"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    assert sorted(records(result)) == [1, 2]


@pytest.mark.distributed
def test_a_run_out_of_time_saves_and_resumes_as_if_uninterrupted(cli):
    stopped = ok(cli.results["out of time"])
    assert ("stopped at iteration 1 of 3: exit_duration_in_mins=1e-09 reached; continue with "
            "--resume") in stopped["stdout"]
    assert sorted(records(stopped)) == [1]
    resumed, straight = (records(ok(cli.results[k])) for k in ("after the time limit",
                                                               "straight through"))
    assert sorted(resumed) == sorted(straight) == [1, 2, 3]
    for iteration, record in straight.items():
        assert resumed[iteration]["lm_loss"] == pytest.approx(record["lm_loss"], rel=1e-6)


@pytest.mark.distributed
def test_a_resume_after_a_kill_mid_save_leaves_one_history(cli):
    """SIGKILL while saving iteration 2 (logged, not saved): the resume removes the unfinished
    save and TensorBoard shows iteration 2 once, from the resumed run (as metrics.jsonl)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ok(cli.results["to be killed"])
    resumed = ok(cli.results["after kill"])
    save = cli.root / "killed"
    assert "deleting the unfinished save of an interrupted run: iter_0000002.partial" in resumed[
        "stdout"]
    assert "deleted iter_0000002.partial (left by a killed run)" in resumed["stdout"]
    assert not list(save.glob("*.partial")) and not list(save.glob("*.deleting"))
    assert (save / "latest").read_text() == "3"
    board = EventAccumulator(str(save / "tensorboard"))
    board.Reload()
    events = board.Scalars("lm_loss")
    assert [e.step for e in events] == [1, 2, 3]
    assert events[1].value == pytest.approx(records(resumed)[2]["lm_loss"])


@pytest.mark.distributed
def test_extending_train_iters_keeps_the_sample_stream(cli):
    """Datasets are one pass over the data, whatever train_iters: a run extended on resume
    trains on what a run planned that long from the start trains on."""
    planned = records(ok(cli.results["planned long"]))
    records(ok(cli.results["short"]))
    extended = records(ok(cli.results["extended"]))
    assert sorted(extended) == [1, 2, 3, 4, 5, 6]
    assert [extended[i]["lm_loss"] for i in (4, 5, 6)] == [planned[i]["lm_loss"] for i in (4, 5, 6)]
    # The index cache goes under the save directory, not beside the dataset (read-only mounts).
    assert not list(Path(cli.data).parent.glob("*index_cache*"))
    assert list((cli.root / "extended" / "data_cache" / "index").iterdir())


@pytest.mark.distributed
def test_a_resume_says_when_the_global_batch_changes(cli):
    records(ok(cli.results["batch 4"]))
    # valid_loss reads eval_iters global batches: not comparable with the one logged before
    assert ("global batch changes from 4 to 8 samples per step; valid_loss now averages the "
            "first 8 validation samples (eval_iters x global batch), where it averaged 4") in ok(
        cli.results["batch 8"])["stdout"]
    assert "global batch changes" not in cli.results["extended"]["stdout"]


@pytest.mark.distributed
def test_load_past_train_iters_is_refused(cli):
    refused(cli.results["load past train_iters"], "is at iteration 6", "train_iters=2",
            "raise train_iters above 6")


@pytest.mark.distributed
def test_overwrite_keeps_the_run_when_the_data_is_bad(cli):
    refused(cli.results["overwrite bad data"], "absent.idx")
    assert "iter_0000002" in cli.results["files before overwrite"]


@pytest.mark.distributed
def test_a_live_run_holds_its_save_directory(cli):
    """A second run in a save directory a live process holds is refused, naming it, and touches
    nothing; once that process is killed (SIGKILL: no cleanup) the directory is free."""
    result = cli.results["locked"]
    refused(result["refused"], "in use by another dsmoe-train run",
            f"pid {result['holder_pid']} on host", "kill that pid")
    assert result["files_while_refused"] == [".dsmoe-train.lock"]
    after = records(ok(result["after_kill"]))
    assert sorted(after) == [1, 2]


@pytest.mark.distributed
def test_a_resume_names_the_settings_its_config_changes(tmp_path):
    """A resume without the key=value overrides the run was started with (as the README's
    '--resume # continue exactly' line was written) took the YAML's train_iters and lr in
    silence: another lr schedule, 'stopped at iteration 2 of 200' of a run of 4."""
    from dsmoe_megatron.data import default_corpus_prefix

    data, save = default_corpus_prefix(tmp_path / "data"), tmp_path / "run"
    started = ["train_iters=4", "--stop-at"]
    tasks = [("train", train_argv(data, "1", save, *started, "1")),
             ("train", train_argv(data, "1", save, *started, "2", "--resume")),
             ("train", train_argv(data, "1", save, "lr=1e-3", "--stop-at", "3", "--resume")),
             ("train", train_argv(data, "1", save, "train_iters=2", "lr=1e-3", "--resume"))]
    first, same, changed, complete = run_on_ranks(run_job, 1, args=(tasks,))[0]
    assert "changes what" not in ok(same)["stdout"]
    assert "lr schedule" not in same["stdout"]
    assert (f"the config changes what {save / 'iter_0000002'} was trained with: train_iters 4 "
            "-> 200, lr 0.003 -> 0.001; the run continues with the new values") in ok(
                changed)["stdout"]
    # What that does to the lr, said rather than left to be found in the logs (a cosine
    # schedule extended by a larger train_iters goes back up).
    assert ("the lr schedule changes: the next step (iteration 3) trains at lr 0.001, where the "
            "checkpoint's settings give 0.002325") in changed["stdout"]
    # A resume that finds the run complete trains nothing: it says so, and not what the new
    # settings would change.
    said = ok(complete)["stdout"]
    assert "the run is complete: iteration 3 of train_iters=2" in said
    assert "changes what" not in said and "lr schedule" not in said


@pytest.mark.distributed
def test_the_valid_loss_note_of_a_batch_change_counts_the_checkpoint_eval_iters(tmp_path):
    """A resume that changes the global batch and eval_iters said valid_loss 'averaged' the new
    eval_iters x the old batch before, and that it changed where it read the same samples."""
    from dsmoe_megatron.data import default_corpus_prefix

    data, save = default_corpus_prefix(tmp_path / "data"), tmp_path / "run"
    every = ["train_iters=3", "eval_interval=1"]
    tasks = [("train", train_argv(data, "1", save, *every, "global_batch_size=4", "eval_iters=2",
                                  "--stop-at", "1")),
             ("train", train_argv(data, "1", save, *every, "global_batch_size=8", "eval_iters=1",
                                  "--stop-at", "2", "--resume")),
             ("train", train_argv(data, "1", save, *every, "global_batch_size=4", "eval_iters=3",
                                  "--resume")),
             # evaluation was off before: nothing was averaged
             ("train", train_argv(data, "1", tmp_path / "off", "train_iters=3",
                                  "eval_interval=null", "global_batch_size=4", "--stop-at", "1")),
             ("train", train_argv(data, "1", tmp_path / "off", *every, "global_batch_size=8",
                                  "eval_iters=1", "--resume"))]
    _, same, more, _, was_off = (ok(result)["stdout"]
                                 for result in run_on_ranks(run_job, 1, args=(tasks,))[0])
    assert "global batch changes from 4 to 8 samples per step" in same
    assert "valid_loss now" not in same  # eval_iters x global batch: 8 samples, as before
    assert ("global batch changes from 8 to 4 samples per step; valid_loss now averages the "
            "first 12 validation samples (eval_iters x global batch), where it averaged 8") in more
    assert ("global batch changes from 4 to 8 samples per step; valid_loss now averages the "
            "first 8 validation samples (eval_iters x global batch)\n") in was_off


def test_overwrite_sets_the_old_checkpoints_aside_for_deletion(tmp_path):
    """--overwrite deleted every old checkpoint (2 TB each at 145B) on rank 0 before its first
    broadcast, every rank waiting; each is now one rename, deleted in the background."""
    from dsmoe_megatron.run_dir import decide_resume

    for name in ("iter_0000001", "iter_0000002", "iter_0000003.deleting"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metadata.json").write_text("{}")
    for name in ("latest", "run.yaml", "metrics.jsonl"):
        (tmp_path / name).write_text("2")
    resumed, removed = decide_resume(str(tmp_path), "never", overwrite=True)
    assert not resumed and sorted(p.name for p in removed) == [
        "iter_0000001", "iter_0000002", "iter_0000003.deleting", "latest", "metrics.jsonl",
        "run.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000001.deleting", "iter_0000002.deleting", "iter_0000003.deleting"]


def test_the_save_of_a_stop_does_not_wait_for_a_deletion():
    """A save waits for keep_checkpoints' deletion of the older checkpoints, to have their room;
    the save a stop asks for (exit_signal_handler, exit_duration_in_mins) does not: a deletion
    of 2 TB could outlast the scheduler's grace time, and the save would be lost."""
    from types import SimpleNamespace

    from dsmoe_megatron.train import Trainer

    class Saving(Exception):
        pass

    def saving():
        raise Saving

    trainer = Trainer.__new__(Trainer)  # only what save() reads before it writes
    waited = []
    trainer.deletions = SimpleNamespace(wait=lambda: waited.append(True))
    trainer._weights_finite = saving
    for stopped_early, waits in ((None, [True]), ("SIGTERM received", [])):
        waited.clear()
        trainer.stopped_early = stopped_early
        with pytest.raises(Saving):
            trainer.save()
        assert waited == waits


def test_a_run_stopped_before_its_first_checkpoint_is_continued_by_resume_auto(tmp_path):
    from dsmoe_megatron.run_dir import RunDirError, decide_resume

    (tmp_path / "run.yaml").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(RunDirError, match="pass --resume auto to continue it"):
        decide_resume(str(tmp_path), "never", overwrite=False)
    assert decide_resume(str(tmp_path), "auto", overwrite=False) == (False, [])


@pytest.mark.parametrize("mode", ["never", "auto", "always"])
def test_checkpoints_without_latest_are_not_started_over_by_resume_auto(tmp_path, mode):
    """A save directory whose 'latest' was lost: a plain start advised --resume auto, which
    started from scratch and renamed every checkpoint .discarded; --resume said there was no
    checkpoint. Each now names them and the file to write."""
    from dsmoe_megatron.run_dir import RunDirError, decide_resume

    for iteration in (2, 4):
        (tmp_path / f"iter_000000{iteration}").mkdir()
        (tmp_path / f"iter_000000{iteration}" / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000006.partial").mkdir()
    with pytest.raises(RunDirError, match=rf"holds checkpoints 2, 4 but no 'latest' file .*"
                                          rf"into {tmp_path / 'latest'} \(the newest: 4\)"):
        decide_resume(str(tmp_path), mode, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000002", "iter_0000004", "iter_0000006.partial"]
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")  # Megatron-LM's loop
    with pytest.raises(RunDirError, match=r"save directory of Megatron-LM's training loop .*"
                                          r"finetune: true in another save directory"):
        decide_resume(str(tmp_path), mode, overwrite=False)


def test_run_lock_is_reentrant_and_a_failed_start_leaves_no_trace(tmp_path):
    from dsmoe_megatron.run_dir import LOCK_NAME, lock_save_dir, unlock_save_dir

    save = tmp_path / "new" / "run"
    lock_save_dir(save)
    lock_save_dir(save)  # the same process: a second Trainer (tests, notebooks) may go on
    unlock_save_dir(save, remove=True)
    assert not save.parent.exists()  # nor the parent it created
    lock_save_dir(save)
    (save / "latest").write_text("1")
    unlock_save_dir(save, remove=True)  # never deletes a run's files
    assert sorted(p.name for p in save.iterdir()) == ["latest"]
    assert not (save / LOCK_NAME).exists()
    mine = tmp_path / "made by the user"
    mine.mkdir()
    lock_save_dir(mine)
    unlock_save_dir(mine, remove=True)  # nor a directory it did not create
    assert mine.is_dir() and not any(mine.iterdir())


@pytest.mark.parametrize("removed_after", ["mkdir", "open"])
def test_a_refused_start_removing_its_lock_file_lets_no_two_runs_in(tmp_path, monkeypatch,
                                                                   removed_after):
    """A start refused while it set up removes the lock file and the directory it created. A
    start that made the directory or opened the file just before then takes the lock on the
    file there now: it locked the removed one (or failed to open it), and a third start got in."""
    from dsmoe_megatron import run_dir

    save = tmp_path / "run"
    run_dir.lock_save_dir(save)  # the start that is refused
    refused = run_dir._held_locks.pop(save.resolve())
    patched = run_dir.os if removed_after == "mkdir" else run_dir.fcntl
    name = "open" if removed_after == "mkdir" else "flock"
    original = getattr(patched, name)

    def refused_start_cleans_up(*args):  # between this start's mkdir/open and its open/flock
        monkeypatch.setattr(patched, name, original)
        run_dir._held_locks[save.resolve()] = refused
        run_dir.unlock_save_dir(save, remove=True)
        return original(*args)

    monkeypatch.setattr(patched, name, refused_start_cleans_up)
    run_dir.lock_save_dir(save)  # this start
    held = run_dir._held_locks.pop(save.resolve())
    try:
        with pytest.raises(run_dir.RunDirError, match="in use by another dsmoe-train run"):
            run_dir.lock_save_dir(save)  # a third
    finally:
        run_dir._held_locks[save.resolve()] = held
        run_dir.unlock_save_dir(save)


@pytest.mark.distributed
def test_a_resume_from_a_set_back_latest_keeps_the_later_checkpoints(cli):
    """With `latest` set back to 1 (a bad checkpoint 2, a loss spike), the run deleted the
    saved iteration 2 when it reached it again."""
    out = ok(cli.results["resume rewound"])["stdout"]
    save = cli.root / "rewound"
    assert "iter_0000002.discarded" in out
    assert (save / "iter_0000002.discarded" / "metadata.json").exists()
    assert (save / "iter_0000002" / "metadata.json").exists()
    assert (save / "latest").read_text() == "2"


@pytest.mark.distributed
def test_a_run_killed_before_latest_names_its_checkpoint_resumes_from_it(tmp_path):
    """A run killed after its first checkpoint was renamed into place (complete: every rank had
    written) and before `latest` named it: --resume auto, a cluster job's restart, refused to
    start. It now continues from that checkpoint as if uninterrupted."""
    from dsmoe_megatron.data import default_corpus_prefix

    data = default_corpus_prefix(tmp_path / "data")

    def argv(name, *extra):
        return train_argv(data, "1", tmp_path / name, "train_iters=3", "save_interval=1", *extra)

    tasks = [("train", argv("straight")),
             ("killed_before_latest", argv("killed", "--resume", "auto"), 1),
             ("train", argv("killed", "--resume", "auto"))]
    straight, killed, resumed = run_on_ranks(run_job, 1, args=(tasks,))[0]
    save = tmp_path / "killed"
    assert killed["code"] == 143
    assert (f"{save / 'latest'} was missing: the run stopped after saving "
            f"{save / 'iter_0000001'} and before naming it there") in ok(resumed)["stdout"]
    assert (save / "latest").read_text() == "3" and not list(save.glob("*.discarded"))
    assert sorted(records(resumed)) == [1, 2, 3]
    for iteration, record in records(straight).items():
        assert records(resumed)[iteration]["lm_loss"] == pytest.approx(record["lm_loss"],
                                                                        rel=1e-6)


@pytest.mark.distributed
def test_keep_checkpoints_deletes_the_older_ones_and_the_run_resumes_as_uninterrupted(tmp_path):
    """keep_checkpoints=2 on 2 ranks: after each save only the 2 newest are left, and a resume
    from them continues the losses of a run that kept every checkpoint."""
    from dsmoe_megatron.data import default_corpus_prefix

    data = default_corpus_prefix(tmp_path / "data")

    def argv(name, iters, *extra):
        return train_argv(data, "EP2", tmp_path / name, f"train_iters={iters}",  # extended
                          "save_interval=1", "lr_decay_style=constant", "lr_warmup_iters=0",
                          *extra)

    tasks = [("train", argv("every", 6)),
             ("train", argv("kept", 4, "keep_checkpoints=2")),
             ("listing", str(tmp_path / "kept")),
             ("rename", str(tmp_path / "kept" / "iter_0000003"),
              str(tmp_path / "kept" / "iter_0000003.deleting")),
             ("train", argv("kept", 6, "keep_checkpoints=2", "--resume"))]
    every, first, listed, _, resumed = run_on_ranks(run_job, 2, args=(tasks,))[0]
    checkpoints = sorted(p.name for p in (tmp_path / "every").glob("iter_*"))
    assert checkpoints == [f"iter_000000{i}" for i in range(1, 7)]
    assert sorted(n for n in listed if n.startswith("iter_")) == ["iter_0000003", "iter_0000004"]
    assert "deleted iter_0000002 (keep_checkpoints=2)" in ok(first)["stdout"]
    # What a run killed between the rename and the deletion left goes before the first save
    # (2 TB at 145B, which that save might not fit beside), not at it.
    out = ok(resumed)["stdout"]
    assert "deleting iter_0000003.deleting, set aside by a killed run" in out
    assert out.index("deleted iter_0000003 (left by a killed run)") < out.index(
        "deleted iter_0000004 (keep_checkpoints=2)")
    assert sorted(p.name for p in (tmp_path / "kept").glob("iter_*")) == [
        "iter_0000005", "iter_0000006"]
    assert (tmp_path / "kept" / "latest").read_text() == "6"
    for iteration in (5, 6):
        assert records(ok(resumed))[iteration]["lm_loss"] == pytest.approx(
            records(every)[iteration]["lm_loss"], rel=1e-6)


def test_prune_sets_aside_the_older_ones_up_to_latest_and_deletion_finishes_them(tmp_path):
    from dsmoe_megatron.checkpoint import (delete_set_aside, prune_checkpoints,
                                           set_aside_unfinished_saves)

    for name in ("iter_0000002", "iter_0000004", "iter_0000006", "iter_0000008",
                 "iter_0000001.deleting", "iter_0000003.discarded", "iter_0000009.partial",
                 "iter_0000007.partial", "iter_0000007.partial.deleting"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000010").mkdir()  # not complete: no metadata.json
    (tmp_path / "latest").write_text("6")  # set back by hand: 8 is not the run's
    assert prune_checkpoints(tmp_path, 2) == [tmp_path / "iter_0000002.deleting"]
    assert prune_checkpoints(tmp_path, 2) == []
    # at a start: 7's earlier deletion was cut short, and its name is taken
    assert set_aside_unfinished_saves(tmp_path) == [
        tmp_path / "iter_0000007.partial.2.deleting", tmp_path / "iter_0000009.partial.deleting"]
    assert delete_set_aside(tmp_path) == [
        tmp_path / "iter_0000001.deleting", tmp_path / "iter_0000002.deleting",
        tmp_path / "iter_0000007.partial.2.deleting", tmp_path / "iter_0000007.partial.deleting",
        tmp_path / "iter_0000009.partial.deleting"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000003.discarded", "iter_0000004", "iter_0000006", "iter_0000008",
        "iter_0000010", "latest"]


def test_deletion_runs_beside_training_and_a_save_waits_for_it(tmp_path, monkeypatch):
    """keep_checkpoints' deletion (2 TB a checkpoint at 145B) must not hold rank 0, and so every
    rank at its next collective: start returns while the deletion still runs; wait (before a
    save, and at the end of the run) returns once it is done."""
    import threading

    from dsmoe_megatron.run_dir import Deletions

    (tmp_path / "iter_0000001.deleting").mkdir()
    rmtree, release, entered = shutil.rmtree, threading.Event(), threading.Event()

    def slow(path, *args, **kwargs):
        entered.set()
        assert release.wait(30), "the deletion was not released"
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow)
    deletions = Deletions()
    deletions.start(tmp_path, "keep_checkpoints=1")  # a synchronous deletion would hang here
    assert entered.wait(30) and (tmp_path / "iter_0000001.deleting").exists()
    release.set()
    deletions.wait()
    assert not (tmp_path / "iter_0000001.deleting").exists()


def test_deletion_goes_on_past_a_checkpoint_that_cannot_go_yet(tmp_path, monkeypatch):
    """A .deleting directory that could not be deleted (a file of it held open over NFS, where
    the directory then stays non-empty) must not stop the deletion of the newer ones, at every
    save: the disk would fill while keep_checkpoints was set."""
    from dsmoe_megatron.checkpoint import delete_set_aside

    for name in ("iter_0000001.deleting", "iter_0000002.deleting", "iter_0000004"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metadata.json").write_text("{}")
    rmtree, stuck = shutil.rmtree, tmp_path / "iter_0000001.deleting"

    def held_open(path, ignore_errors=False, **kwargs):
        if path == stuck:
            if not ignore_errors:
                raise OSError(39, "Directory not empty", str(path))
            return
        rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", held_open)
    assert delete_set_aside(tmp_path) == [
        tmp_path / "iter_0000002.deleting"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001.deleting",
                                                          "iter_0000004"]


def test_checkpoints_past_the_resumed_one_are_renamed_not_replaced(tmp_path):
    from dsmoe_megatron.run_dir import set_aside_newer_checkpoints

    for name in ("iter_0000002", "iter_0000004", "iter_0000006", "iter_0000004.discarded",
                 "iter_0000006.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "what").write_text(name)
    assert set_aside_newer_checkpoints(tmp_path, 2) == [
        "iter_0000004.2.discarded", "iter_0000006.discarded"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000002", "iter_0000004.2.discarded", "iter_0000004.discarded",
        "iter_0000006.discarded", "iter_0000006.partial"]
    assert (tmp_path / "iter_0000004.2.discarded" / "what").read_text() == "iter_0000004"


def test_a_metrics_line_cut_short_does_not_block_the_resume(tmp_path):
    """A crash or a full disk can leave metrics.jsonl's last line half written; the resume read
    every line as JSON and refused to start ("Expecting ',' delimiter")."""
    from dsmoe_megatron.run_dir import rewind_metrics

    lines = [json.dumps({"iteration": i, "lm_loss": 5.0 - i}) for i in (1, 2, 3)]
    torn = '{"iteration": 4, "lm_loss": 4.6'
    (tmp_path / "metrics.jsonl").write_text("\n".join([*lines, torn]) + "\n")
    assert rewind_metrics(tmp_path, 2) == 2
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:2]
    # Nothing is deleted: what the resume sets aside is kept beside the run.
    assert (tmp_path / "metrics.discarded.jsonl").read_text().splitlines() == [lines[2], torn]


def test_a_full_disk_under_tensorboard_is_reported_once(tmp_path, monkeypatch):
    """TensorBoard's writer thread hit the full disk first and Python printed its traceback
    after dsmoe-train's one-line error; the error reaches the main thread's next flush, which
    dsmoe-train reports."""
    import errno
    import threading

    from tensorboard.summary.writer import record_writer
    from torch.utils.tensorboard import SummaryWriter

    from dsmoe_megatron import train

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    printed = []  # what Python's hook would print
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_type))
    train._quiet_tensorboard_writer_thread()
    writer = SummaryWriter(str(tmp_path))
    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    writer.add_scalar("lm_loss", 1.0, 1)
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    assert printed == []
    # Another thread's error is still printed.
    thread = threading.Thread(target=lambda: 1 / 0)
    thread.start()
    thread.join()
    assert printed == [ZeroDivisionError]


@pytest.mark.distributed
def test_divergence_stops_with_a_checkpoint_that_resumes_to_a_finite_loss(cli):
    message = refused(cli.results["diverge"], "last good checkpoint is")
    named = int(message.split("iter_")[1][:7])
    assert (cli.root / "nan" / "latest").read_text() == str(named)
    # The step that stopped the run is logged, whatever the log_interval: how it diverged.
    stopped = int(message.split("stopped at iteration ")[1].split(":")[0])
    assert "the gradient norm became nan" in message, message
    assert records(cli.results["diverge"])[stopped]["grad_norm"] is None  # strict JSON: null
    # Resumed with the same (still diverging) settings, the step after it has a finite loss.
    resumed = cli.results["resume diverged"]
    assert resumed["code"] == 1
    assert math.isfinite(records(resumed)[named + 1]["lm_loss"])


@pytest.mark.distributed
def test_fp16_trains_like_fp32(cli):
    """The schedules scale the loss by the loss scale that the optimizer divides out (without
    the scaling, Adam's epsilon swamps the 4096x too small gradients: 0.05-0.08 off by step 3)."""
    fp32, fp16 = records(ok(cli.results["fp32"])), records(ok(cli.results["fp16"]))
    assert fp32[6]["lm_loss"] < fp32[1]["lm_loss"] - 0.3
    for it in fp32:
        assert fp16[it]["lm_loss"] == pytest.approx(fp32[it]["lm_loss"], abs=0.02), it
        # fp16 logs its loss scale (growth only after 1000 good steps) and skipped steps.
        assert (fp16[it]["loss_scale"], fp16[it]["skipped_steps"]) == (4096.0, 0), it
        assert "loss_scale" not in fp32[it] and "skipped_steps" not in fp32[it]


def test_biases_and_norm_weights_are_not_decayed(tmp_path):
    """Megatron's optimizer puts biases and 1-D weights (the norms) in groups of wd_mult 0 and
    leaves applying it to its lr scheduler; the trainer, which sets the lr itself, left every
    group at weight_decay, so the norms decayed like the matrices (and on resume with another
    weight_decay, at the new value)."""
    from dsmoe_megatron.data import default_corpus_prefix

    argv = train_argv(default_corpus_prefix(tmp_path / "data"), "1", tmp_path / "run",
                      "weight_decay=0.5")
    groups = run_on_ranks(run_job, 1, args=([("weight_decays", argv)],))[0][0]
    assert {wd_mult for wd_mult, _ in groups} == {0.0, 1.0}
    assert all(decay == 0.5 * wd_mult for wd_mult, decay in groups), groups


def test_help_says_what_it_does_in_full(capsys):
    """--help printed the module docstring's first line, cut off at "pretrain a"."""
    from dsmoe_megatron.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert ": pretrain a DeepSeekMoE model on Megatron-core." in " ".join(
        capsys.readouterr().out.split())


def test_stop_at_must_be_positive(capsys):
    from dsmoe_megatron.train import parse_args

    with pytest.raises(SystemExit):
        parse_args([TINY, "--stop-at", "0"])
    assert "--stop-at: must be a positive integer" in capsys.readouterr().err


def test_loss_falls_and_a_checkpoint_is_written(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.train", TINY, *SMALL, "train_iters=15",
         f"save={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"checkpoint saved to {(tmp_path / 'iter_0000015').resolve()}" in out.stdout
    losses = {r["iteration"]: r["lm_loss"] for r in
              map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert losses[15] < losses[1] - 0.5
    # The console line has the fields of the one the README shows, in its order.
    shown = re.search(r"^iteration \d+ \| .*$", (ROOT / "README.md").read_text(), re.M).group(0)
    printed = next(line for line in out.stdout.splitlines() if line.startswith("iteration "))
    assert [f.split()[0] for f in printed.split(" | ")] == [f.split()[0] for f in shown.split(" | ")]


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


def test_without_evaluation_the_valid_share_need_not_hold_a_sample(tmp_path):
    """eval_interval: null uses no validation data: a split whose valid share gets no document
    of a small corpus must not stop training."""
    from dsmoe_megatron.data import preprocess

    source = tmp_path / "small.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n"
                              for i in range(3)))
    prefix = preprocess([source], tmp_path / "small")
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.train", TINY, *SMALL, "train_iters=2",
         "split=90,10,0", f"data_path=[{prefix}]", f"save={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "iter_0000002").is_dir()


def test_a_train_split_smaller_than_a_global_batch_is_said(tmp_path):
    """Two samples of 64 tokens and a global batch of 4: each step repeated samples without a
    word; a warning says so at the start."""
    from dsmoe_megatron.data import preprocess

    source = tmp_path / "two.jsonl"
    source.write_text(json.dumps({"text": "x" * 140}) + "\n")
    prefix = preprocess([source], tmp_path / "two")
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.train", TINY, *SMALL, "train_iters=2",
         "split=100,0,0", f"data_path=[{prefix}]", f"save={tmp_path / 'run'}",
         "tensorboard_dir=null"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert ("warning: the train split holds 2 samples of 64 tokens, fewer than one global batch "
            "(4): every step repeats samples") in out.stderr


def test_a_resume_says_when_a_dataset_was_rebuilt_in_place(tmp_path):
    """A dataset replaced at its prefix (dsmoe-preprocess --force) keeps data_path as it was:
    the resume read other samples without a word."""
    from dsmoe_megatron.data import preprocess

    def write(name, texts):
        source = tmp_path / name
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return source

    prefix = preprocess([write("old.jsonl", ["a" * 300] * 4)], tmp_path / "corpus")
    save = tmp_path / "run"

    def train(iters, *extra):
        out = subprocess.run(
            [sys.executable, "-m", "dsmoe_megatron.train", TINY, *SMALL, f"train_iters={iters}",
             "split=100,0,0", f"data_path=[{prefix}]", f"save={save}", "tensorboard_dir=null",
             *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return out.stdout + out.stderr

    train(2)
    assert "changed since" not in train(3, "--resume")
    preprocess([write("new.jsonl", ["b" * 500] * 3)], prefix, force=True)
    assert (f"the dataset {prefix} changed since {save / 'iter_0000003'} was saved (another "
            ".idx: rebuilt in place?): the run does not continue the sample stream it was "
            "reading") in train(4, "--resume")


def test_a_valid_split_smaller_than_an_evaluation_is_said(tmp_path):
    """eval_iters=10 of a global batch of 4 read 40 samples of a valid split holding 5: each
    evaluation repeated them, some more often than others, without a word."""
    from dsmoe_megatron.data import preprocess

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"{i} " + "x" * 320}) + "\n"
                              for i in range(10)))
    prefix = preprocess([source], tmp_path / "docs")
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.train", TINY, *SMALL, "train_iters=1",
         "lr_warmup_iters=0", "split=8,2,0", "eval_interval=1", "eval_iters=10",
         f"data_path=[{prefix}]",
         f"save={tmp_path / 'run'}", "tensorboard_dir=null"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert ("warning: the valid split holds 10 samples of 64 tokens, fewer than an evaluation "
            "reads (eval_iters x global batch = 10 x 4): each evaluation repeats samples and "
            "valid_loss weights some of them more than others; set eval_iters <= 2, or add "
            "data") in out.stderr


def test_data_of_a_larger_vocabulary_is_a_clear_error(tmp_path):
    """A Megatron-LM dataset (GPT-2 ids) trained with the byte vocabulary of tiny.yaml."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "gpt2.bin"), dtype=numpy.uint16)
    for document in numpy.random.default_rng(0).integers(0, 50257, (20, 100)):
        builder.add_item(torch.tensor(document))
        builder.end_document()
    builder.finalize(str(tmp_path / "gpt2.idx"))
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.train", TINY, *SMALL, "train_iters=2",
         f"data_path=[{tmp_path / 'gpt2'}]", f"save={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr
    assert "gpt2'] holds token id" in out.stderr and "but vocab_size is 259" in out.stderr


def test_missing_data_path_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dsmoe_megatron.train", TINY, *SMALL,
         f"data_path=[{tmp_path / 'nothing'}]", f"save={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1
    assert "nothing" in out.stderr and "dsmoe-preprocess" in out.stderr


def test_stop_at_below_the_resumed_iteration_says_nothing_is_trained(tmp_path, monkeypatch,
                                                                      capsys):
    """`--resume --stop-at 4` of a run at iteration 6 trained nothing and exited 0 without a
    word; it now says so."""
    from dsmoe_megatron import train

    class AtSix:
        def __init__(self, run, resume, overwrite):
            self.iteration, self.stopped_early = 6, None

        def fit(self, stop_at):
            return None

    monkeypatch.setattr(train, "Trainer", AtSix)
    assert train.main([TINY, *SMALL, "train_iters=8", f"save={tmp_path}", "--resume",
                       "--stop-at", "4"]) == 0
    assert ("nothing to train: the run is at iteration 6, at or past --stop-at 4"
            in capsys.readouterr().out)


@pytest.mark.parametrize("save", [True, False])
def test_a_stop_at_stop_says_how_to_continue(tmp_path, monkeypatch, capsys, save):
    """A run stopped by --stop-at before train_iters said where its checkpoint went and nothing
    more, while every other stop says how to continue; it now says so too."""
    from dsmoe_megatron import train

    class ToFour:
        def __init__(self, run, resume, overwrite):
            self.iteration, self.stopped_early = 0, None

        def fit(self, stop_at):
            self.iteration = stop_at
            return tmp_path / "iter_0000004" if save else None

    monkeypatch.setattr(train, "Trainer", ToFour)
    where = [f"save={tmp_path}"] if save else ["save=null"]
    assert train.main([TINY, *SMALL, "train_iters=8", *where, "--stop-at", "4"]) == 0
    out = capsys.readouterr().out
    assert ("stopped at iteration 4 of 8: --stop-at 4; "
            + ("continue with --resume" if save else "no save directory")) in out
    assert train.main([TINY, *SMALL, "train_iters=4", *where, "--stop-at", "4"]) == 0
    assert "stopped at" not in capsys.readouterr().out  # trained to the end


@pytest.mark.parametrize("full", ["metrics.jsonl", "tensorboard"])
def test_a_full_disk_under_the_logs_names_the_file_and_the_checkpoint(tmp_path, monkeypatch,
                                                                      capsys, full):
    """A full disk met by metrics.jsonl's or TensorBoard's writes said "stopped: No space left
    on device" with the free space of the save directory, naming neither the file nor (for a
    tensorboard_dir elsewhere) the filesystem that was full, nor where the run can continue."""
    import errno

    from dsmoe_megatron import train

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    class Full:
        name = str(tmp_path / "save" / "metrics.jsonl")
        write = flush = add_scalar = no_space

    log_metrics = train.Trainer._log_metrics

    class LogsOnAFullDisk:
        def __init__(self, run, resume, overwrite):
            self.run, self.iteration = run, 3
            self.writer = Full() if full == "tensorboard" else None
            self.metrics_file = Full() if full == "metrics.jsonl" else None

        def fit(self, stop_at):
            log_metrics(self, {"lm_loss": 4.0})

    (tmp_path / "save" / "iter_0000002").mkdir(parents=True)
    (tmp_path / "save" / "latest").write_text("2")
    monkeypatch.setattr(train, "Trainer", LogsOnAFullDisk)
    # The filesystem of the file (or its nearest existing parent), not of the save directory.
    where, free_of = ((tmp_path / "save" / "metrics.jsonl", tmp_path / "save")
                      if full == "metrics.jsonl" else (tmp_path / "tb", tmp_path))
    assert train.main([TINY, *SMALL, f"save={tmp_path / 'save'}",
                       f"tensorboard_dir={tmp_path / 'tb'}"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(
        rf"dsmoe-train: stopped at iteration 3: No space left on device \({where}\); [0-9,]+ "
        rf"MiB free on the filesystem of {free_of}; the last complete checkpoint is "
        rf"{tmp_path / 'save' / 'iter_0000002'} \(continue with --resume\)", err), err


def test_a_rank_whose_peer_exited_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """Under torchrun, when rank 0 stopped alone (a full disk under metrics.jsonl) the other
    ranks printed Gloo's 'Connection closed by peer' with a traceback of 40 lines."""
    from dsmoe_megatron import train

    class PeerExited:
        def __init__(self, run, resume, overwrite):
            self.iteration = 3

        def fit(self, stop_at):
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                               "[127.0.0.1]:8595. This is typically caused by a remote worker "
                               "crashing.")

    monkeypatch.setattr(train, "Trainer", PeerExited)
    assert train.main([TINY, *SMALL, f"save={tmp_path}"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "dsmoe-train: rank 0 stopped: another process of the job exited (its message is "
        f"above); no complete checkpoint in {tmp_path}")


def test_a_run_started_over_hides_the_earlier_runs_tensorboard_curves(tmp_path):
    """--overwrite deletes the earlier run's checkpoints and metrics.jsonl, but TensorBoard
    showed its curves and the new run's as one (steps 1, 2, 1, 2)."""
    import time
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from dsmoe_megatron import train

    earlier = SummaryWriter(str(tmp_path))
    for step in (1, 2, 3):
        earlier.add_scalar("lm_loss", 10.0 + step, step)
    earlier.close()
    time.sleep(1.1)  # event files are named, and read, by the second they were opened in
    board = SimpleNamespace(tensorboard_dir=str(tmp_path))
    new = SimpleNamespace(run=SimpleNamespace(train=board), iteration=0)
    writer = train.Trainer._tensorboard(new)
    for step in (1, 2):
        writer.add_scalar("lm_loss", 20.0 + step, step)
    writer.close()
    board = EventAccumulator(str(tmp_path))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("lm_loss")] == [(1, 21.0), (2, 22.0)]



@pytest.mark.parametrize("resume", [True, False])
def test_the_override_a_model_mismatch_suggests_sets_the_saved_value(resume):
    """A dense checkpoint (num_moe_experts: null) loaded with an MoE config was told to 'set
    language_model.num_moe_experts=None', which YAML reads as the string 'None'."""
    from dsmoe_megatron.checkpoint import model_difference
    from dsmoe_megatron.train import different_model
    from dsmoe_megatron.yaml_config import load_run_config, parse_overrides

    dense, moe = (load_run_config(ROOT / "yaml_configs" / name, instantiate_checks=False)
                  for name in ("tiny_dense.yaml", "tiny.yaml"))
    difference = model_difference(dense, moe.model, moe.train.vocab_size)
    assert difference == ("num_moe_experts", None, 15)
    message = str(different_model(Path("ckpt"), difference, resume))
    setting = message.split("resume with " if resume else "; set ")[1].split()[0].rstrip(",")
    assert parse_overrides([setting]) == {"language_model": {"num_moe_experts": None}}


def test_a_checkpoint_with_moe_layers_elsewhere_is_another_model():
    """A resume with another moe_layer_freq was reported as a damaged checkpoint ('Different
    dict keys'), with the advice to go back to an earlier one; it is another model. A list
    placing the MoE layers where the saved integer did is the same model."""
    from dsmoe_megatron.checkpoint import model_difference
    from dsmoe_megatron.yaml_config import load_run_config

    def run(*overrides):
        return load_run_config(ROOT / "yaml_configs" / "tiny.yaml", overrides,
                               instantiate_checks=False)

    saved = run()  # moe_layer_freq 1 after one dense layer: MoE at layers 1, 2, 3
    every_other = run("language_model.moe_layer_freq=2")
    assert model_difference(saved, every_other.model, 259) == ("moe_layer_freq", 1, 2)
    same = run("language_model.moe_layer_freq=[0,1,1,1]")
    assert model_difference(saved, same.model, 259) is None


@pytest.mark.parametrize("override, saved", [
    ("add_qkv_bias=true", False), ("rotary_interleaved=true", False), ("softmax_scale=0.5", None),
    ("qk_l2_norm=true", False), ("apply_residual_connection_post_layernorm=true", False),
    ("window_size=[16,0]", None), ("softmax_type=off-by-one", "vanilla"),
    ("window_attn_skip_freq=2", None)])
def test_a_resume_with_another_attention_is_another_model(override, saved, tmp_path):
    """These change the attention's tensors or what it computes: a resume with one of them
    changed went on with a model of other outputs in silence (or called the checkpoint
    damaged)."""
    from dsmoe_megatron.checkpoint import RUN_CONFIG_NAME, model_difference, saved_run_config
    from dsmoe_megatron.yaml_config import dump_run_config, load_run_config

    tiny = ROOT / "yaml_configs" / "tiny.yaml"
    then = load_run_config(tiny, instantiate_checks=False)
    now = load_run_config(tiny, [f"language_model.{override}"], instantiate_checks=False)
    field = override.split("=")[0]
    assert model_difference(then, now.model, 259) == (field, saved,
                                                      getattr(now.model, field))
    # The same model, saved in a checkpoint's run.yaml and read back, is not another one.
    dump_run_config(now, tmp_path / RUN_CONFIG_NAME)
    assert model_difference(saved_run_config(tmp_path), now.model, now.train.vocab_size) is None
