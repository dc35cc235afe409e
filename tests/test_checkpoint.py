"""Checkpoints move between machines with and without Transformer Engine, whose modules keep
FP8 metadata in `_extra_state` objects that a CPU model neither writes nor reads; damaged tensor
data is refused on every rank; a failed save says why (a full disk, another rank that exited)."""

import pytest

from distributed import run_on_ranks
from resume_cases import run_job


@pytest.mark.distributed
def test_extra_state_objects_are_optional_both_ways(tmp_path):
    [[result]] = run_on_ranks(run_job, 1, args=([("extra_state_round_trip", str(tmp_path))],))
    # Saved by a model with extra state (as on a GPU), loaded by one without, and back.
    assert result["gpu to cpu"] == {"checkpoint has attention extra state": True,
                                    "weights equal": True}
    assert result["cpu to gpu"] == {"checkpoint has attention extra state": False,
                                    "weights equal": True}


@pytest.mark.distributed
def test_damaged_tensor_data_is_refused_on_every_rank(tmp_path):
    """A NaN where a weight was (bit rot: the file still reads) used to load silently, and the
    run then stopped at its first step blaming the learning rate; rank 1, which holds none of
    it, must stop too rather than wait for rank 0 forever. Bytes that no longer read raised
    torch's CheckpointException (a BaseException) past the one-line error."""
    from dsmoe_megatron.runtime import ParallelLayout

    results = run_on_ranks(run_job, 2, ParallelLayout(tensor=2),
                           args=([("damaged_tensor_data", str(tmp_path), 2)],))
    for [result] in results:
        assert result["nan"].startswith(f"{tmp_path / 'nan' / 'iter_0000000'} holds NaN or inf "
                                        "values (decoder.layers.1.mlp.shared_experts.linear_fc1"
                                        ".weight); saves write finite values only")
        assert "resume from an earlier checkpoint" in result["nan"]
        assert result["garbled"].startswith(f"{tmp_path / 'garbled' / 'iter_0000000'} could not be "
                                            "read (")
        assert "the checkpoint is damaged" in result["garbled"]


def test_a_megatron_lm_save_directory_resolves_through_its_tracker(tmp_path):
    """load: of a save directory of Megatron-LM's loop (latest_checkpointed_iteration.txt, no
    'latest') was refused as holding no checkpoint, while dsmoe-convert to-hf took it, and the
    advice for a torch-format checkpoint (convert it, then pass NEW/torch_dist) failed there."""
    import torch
    from torch.distributed.checkpoint import FileSystemWriter, save

    from dsmoe_megatron import checkpoint

    ckpt = tmp_path / "torch_dist" / "iter_0000002"
    save({"w": torch.ones(2)}, storage_writer=FileSystemWriter(str(ckpt)), no_dist=True)
    (ckpt / "metadata.json").write_text("{}")
    (ckpt.parent / checkpoint.MEGATRON_LM_TRACKER).write_text("2")
    assert checkpoint.resolve(ckpt.parent) == ckpt
    (ckpt.parent / checkpoint.MEGATRON_LM_TRACKER).write_text("3")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"latest_checkpointed_iteration.txt names iteration 3"):
        checkpoint.resolve(ckpt.parent)
    (ckpt.parent / checkpoint.MEGATRON_LM_TRACKER).write_text("release")
    with pytest.raises(checkpoint.CheckpointError, match=r"latest_checkpointed_iteration.txt "
                       r"holds 'release', not an iteration number.*complete ones here: 2"):
        checkpoint.resolve(ckpt.parent)
    with pytest.raises(checkpoint.CheckpointError, match="nowhere does not exist"):
        checkpoint.resolve(tmp_path / "nowhere")


def test_a_latest_file_of_bytes_that_are_not_text_is_named(tmp_path):
    """A 'latest' or Megatron-LM tracker holding bytes that are not UTF-8 (a crash's leftovers)
    raised UnicodeDecodeError with a traceback from dsmoe-convert, and from the start of
    dsmoe-train on rank 0 alone."""
    from dsmoe_megatron import checkpoint
    from dsmoe_megatron.run_dir import decide_resume

    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "iter_0000002" / "metadata.json").write_text("{}")
    (tmp_path / checkpoint.LATEST_NAME).write_bytes(b"\xff\xfe\x00")
    for check in (lambda: checkpoint.resolve(tmp_path),
                  lambda: decide_resume(str(tmp_path), "auto", overwrite=False)):
        with pytest.raises(checkpoint.CheckpointError,
                           match=r"latest holds .*, not an iteration number; .*here: 2\)"):
            check()
    (tmp_path / checkpoint.LATEST_NAME).unlink()
    (tmp_path / checkpoint.MEGATRON_LM_TRACKER).write_bytes(b"\xff")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"latest_checkpointed_iteration.txt holds .*, not an iteration"):
        checkpoint.resolve(tmp_path)


def test_a_damaged_run_yaml_in_a_checkpoint_is_named(tmp_path):
    """A checkpoint's run.yaml of bytes that are not UTF-8 stopped dsmoe-train --resume and
    dsmoe-convert with the decoder's message alone, naming no file; one that is not valid YAML
    gave a message of several lines."""
    from dsmoe_megatron import checkpoint

    ckpt = tmp_path / "iter_0000002"
    ckpt.mkdir()
    for damage, reason in [(b"\x00\x01\xff", "'utf-8' codec can't decode byte 0xff"),
                           (b"a: [\n", "line 2, column 1: not valid YAML")]:
        (ckpt / checkpoint.RUN_CONFIG_NAME).write_bytes(damage)
        with pytest.raises(checkpoint.CheckpointError) as error:
            checkpoint.saved_run_config(ckpt)
        message = str(error.value)
        assert message.startswith(f"{ckpt / 'run.yaml'} cannot be read ({reason}"), message
        assert "\n" not in message and "resume from an earlier checkpoint" in message


@pytest.mark.parametrize("gloo", [
    "[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:7301. This is "
    "typically caused by a remote worker crashing. Check the logs of the remote worker before "
    "reporting an error. GLHF!",
    "[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:13724: Connection reset by "
    "peer. This is typically caused by a remote worker hanging or bugs in the application."])
def test_a_save_whose_peer_exited_says_so(tmp_path, monkeypatch, gloo):
    """A rank killed while the ranks saved (the OOM killer, a scheduler) left the others Gloo's
    message as the cause of the failed save, with the free space as if the disk were to blame."""
    from types import SimpleNamespace

    from dsmoe_megatron import checkpoint

    def peer_gone(state, directory, **kwargs):
        raise RuntimeError(gloo)

    (tmp_path / checkpoint.LATEST_NAME).write_text("2")
    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", peer_gone)
    chunk = SimpleNamespace(sharded_state_dict=dict)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.save(tmp_path, 4, [chunk])
    assert str(error.value) == (
        f"saving iteration 4 to {tmp_path} failed: another process of the job exited (its "
        "message is above) (0.0 MiB of it had been written). Nothing was lost: the last "
        f"complete checkpoint, {tmp_path / 'iter_0000002'}, is untouched and --resume "
        "continues from it once the cause is fixed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.LATEST_NAME]


def test_a_full_disk_the_writer_does_not_name_is_said_to_be_one(tmp_path, monkeypatch):
    """Megatron's writer reports a real full disk as a worker failure naming no OSError (torch's
    stream writer fails with "unexpected pos"): the message gave that failure and '0 MiB free'
    and left the conclusion to the user."""
    import shutil
    from types import SimpleNamespace

    from torch.distributed.checkpoint.api import CheckpointException

    from dsmoe_megatron import checkpoint

    worker = RuntimeError("Worker failure: An error is caught while starting worker 0, error: "
                          "<class 'RuntimeError'>")

    def fill_the_disk(state, directory, **kwargs):
        raise CheckpointException("write", {0: (worker, None)})

    (tmp_path / checkpoint.LATEST_NAME).write_text("2")
    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", fill_the_disk)
    chunk = SimpleNamespace(sharded_state_dict=dict)
    for free, said in [(0, True), (2**30, False)]:
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
        with pytest.raises(checkpoint.CheckpointError) as error:
            checkpoint.save(tmp_path, 4, [chunk])
        assert str(error.value).startswith(
            f"saving iteration 4 to {tmp_path} failed: "
            + ("No space left on device (the error said: Worker failure: " if said else
               "Worker failure: ")), str(error.value)
        assert f"{free // 2**20:,} MiB free on the filesystem of {tmp_path}" in str(error.value)


@pytest.mark.distributed
def test_a_save_over_a_file_size_limit_or_quota_says_why(tmp_path, capfd):
    """A write refused while the disk had room (a quota, a file size limit) was reported as
    Megatron's writer words it, 'Worker failure: ... <class 'RuntimeError'>': the cause, which
    torch had chained to its stream writer's error, was dropped; the writer's own two lines
    on it came first."""
    from dsmoe_megatron.runtime import ParallelLayout

    results = run_on_ranks(run_job, 2, ParallelLayout(tensor=2),
                           args=([("save_over_a_file_size_limit", str(tmp_path))],))
    for [said] in results:
        assert said.startswith(f"saving iteration 4 to {tmp_path} failed: File too large ("), said
        assert said.endswith(f"Nothing was lost: the last complete checkpoint, "
                             f"{tmp_path / 'iter_0000002'}, is untouched and --resume continues "
                             "from it once the cause is fixed"), said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    assert "Local worker" not in capfd.readouterr().err


def test_a_latest_that_cannot_be_replaced_is_named_and_leaves_no_temporary_file(tmp_path,
                                                                               monkeypatch):
    """A `latest` made immutable (chattr +i) mid-run stopped the save naming latest.tmpPID, a
    file the user never made, and left it beside `latest` for good."""
    import errno
    import os

    from dsmoe_megatron import checkpoint

    latest, replace = tmp_path / checkpoint.LATEST_NAME, os.replace
    latest.write_text("2")

    def immutable(source, destination):
        if str(destination) == str(latest):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(source),
                                  None, str(destination))
        replace(source, destination)

    monkeypatch.setattr(os, "replace", immutable)
    with pytest.raises(PermissionError) as error:
        checkpoint.write_text_atomic(latest, "4")
    assert error.value.filename == str(latest)
    assert error.value.errno == errno.EPERM
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.LATEST_NAME]
    assert latest.read_text() == "2"
    # The save's line: its checkpoint was complete (renamed into place) when latest failed, not
    # "0.0 MiB of it had been written".
    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "iter_0000004" / "metadata.json").write_text("{}")
    said = checkpoint._save_failed(tmp_path, 4, error.value, tmp_path / "iter_0000004.partial")
    assert f"(after iter_0000004 was complete). Nothing was lost: the last complete checkpoint, " \
           f"{tmp_path / 'iter_0000002'}, is untouched" in said, said


def test_a_damaged_checkpoint_names_the_complete_ones_beside_it(tmp_path):
    """The advice to resume from an earlier checkpoint named none: a requeued job that stops on
    a damaged newest checkpoint needs the iteration to write into 'latest'."""
    from dsmoe_megatron import checkpoint

    for iteration in (2, 4, 6):
        (tmp_path / f"iter_000000{iteration}").mkdir()
        (tmp_path / f"iter_000000{iteration}" / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000008.partial").mkdir()  # an unfinished save is not one
    (tmp_path / checkpoint.LATEST_NAME).write_text("6")
    with pytest.raises(checkpoint.CheckpointError) as damaged:  # iter_0000006 has no .metadata
        checkpoint.resolve(tmp_path)
    assert (f"resume from an earlier checkpoint (complete ones beside it: 2, 4): write its "
            f"iteration number into {tmp_path / 'latest'}, ") in str(damaged.value)
    (tmp_path / checkpoint.LATEST_NAME).write_text("7")
    with pytest.raises(checkpoint.CheckpointError) as missing:
        checkpoint.resolve(tmp_path)
    assert str(missing.value).startswith(
        f"{tmp_path / 'latest'} names iteration 7, but {tmp_path / 'iter_0000007'} does not exist; "
        "resume from an earlier checkpoint (complete ones beside it: 2, 4, 6)"), missing.value


def test_a_checkpoint_beside_one_that_cannot_be_read_loads(tmp_path, monkeypatch):
    """The complete checkpoints named beside a damaged one were counted on every load: an
    iteration directory that cannot be read (another user's) stopped the load of a sound
    checkpoint with a PermissionError, and hid the refusal of a damaged one."""
    import os

    import torch
    from torch.distributed.checkpoint import save

    from dsmoe_megatron import checkpoint

    save({"w": torch.zeros(2)}, checkpoint_id=str(tmp_path / "iter_0000002"), no_dist=True)
    (tmp_path / "iter_0000002" / "metadata.json").write_text("{}")
    for iteration in (4, 6):
        (tmp_path / f"iter_000000{iteration}").mkdir()
    (tmp_path / checkpoint.LATEST_NAME).write_text("2")
    other_users, stat = tmp_path / "iter_0000004", os.stat

    def refused(path, *args, **kwargs):
        if str(path).startswith(f"{other_users}{os.sep}"):
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refused)
    assert checkpoint.resolve(tmp_path) == tmp_path / "iter_0000002"
    (tmp_path / checkpoint.LATEST_NAME).write_text("6")  # iter_0000006 has no metadata.json
    with pytest.raises(checkpoint.CheckpointError, match=r"complete ones beside it: 2\)"):
        checkpoint.resolve(tmp_path)


def test_a_damaged_checkpoint_of_megatron_lm_names_its_tracker(tmp_path):
    """A damaged newest checkpoint of Megatron-LM's loop was advised to write an earlier
    iteration into 'latest', which Megatron-LM's resume does not read (a missing one named
    its latest_checkpointed_iteration.txt)."""
    from dsmoe_megatron import checkpoint

    for iteration in (2, 4):
        (tmp_path / f"iter_000000{iteration}").mkdir()
        (tmp_path / f"iter_000000{iteration}" / "metadata.json").write_text("{}")
    (tmp_path / checkpoint.MEGATRON_LM_TRACKER).write_text("4")
    with pytest.raises(checkpoint.CheckpointError) as damaged:  # iter_0000004 has no .metadata
        checkpoint.resolve(tmp_path)
    assert (f"(complete ones beside it: 2): write its iteration number into "
            f"{tmp_path / checkpoint.MEGATRON_LM_TRACKER}, ") in str(damaged.value)


@pytest.mark.parametrize("suffix, what", [
    (".deleting", "set aside for deletion (an older checkpoint keep_checkpoints is deleting"),
    (".partial", "the unfinished save of an interrupted run"),
])
def test_a_checkpoint_being_deleted_or_written_is_not_loaded(tmp_path, suffix, what):
    """keep_checkpoints renames an older checkpoint iter_XXXXXXX.deleting before it deletes it;
    named by hand (--checkpoint, load:), one still whole, or half deleted by another process,
    was read as a checkpoint. A save is written as iter_XXXXXXX.partial."""
    import torch
    from torch.distributed.checkpoint import save

    from dsmoe_megatron import checkpoint

    ckpt = tmp_path / f"iter_0000002{suffix}"
    save({"w": torch.zeros(2)}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / "metadata.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.resolve(ckpt)
    assert str(error.value).startswith(f"{ckpt} is {what}"), error.value
    assert (f"not a checkpoint; pass the save directory {tmp_path} for its newest complete one"
            in str(error.value))
