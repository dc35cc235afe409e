"""The save directory of a run: whether a start may use it, and keeping its files to one run.

A save directory belongs to one run. Starting without ``--resume`` in one that holds a run's
files (checkpoints, ``latest``, ``run.yaml``, ``metrics.jsonl``) is refused unless
``--overwrite`` asks to delete them first; ``--resume`` needs a checkpoint there;
``--resume auto`` resumes when there is one and starts otherwise (for cluster jobs that restart
the same command). Both resume from a run's first checkpoint when the run was killed between
renaming it into place and writing ``latest``. When a run continues from iteration k, metrics
logged after k by the attempt that crashed are moved to ``metrics.discarded.jsonl``, so
``metrics.jsonl`` is one history, and checkpoints past k (``latest`` set back by hand) are
renamed ``iter_XXXXXXX.discarded``.

One live run per save directory: rank 0 holds an ``flock`` on ``.dsmoe-train.lock`` there while
it trains, and a second run is refused with the first one's host and pid. A killed torchrun can
leave its workers training, and a resubmitted job would otherwise replace their checkpoints (and
they its). The kernel drops the lock when the holder dies, however it dies.

Directories to delete (older checkpoints under ``keep_checkpoints``, unfinished saves) are first
renamed ``.deleting``, then deleted by a thread of rank 0 (``Deletions``): at 145B each is 2 TB,
which no rank should wait for at its next collective.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
from pathlib import Path

from dsmoe_megatron import checkpoint

METRICS_NAME = "metrics.jsonl"
DISCARDED_METRICS_NAME = "metrics.discarded.jsonl"
RESUME_MODES = ("never", "always", "auto")
LOCK_NAME = ".dsmoe-train.lock"
# save dir -> (the lock file this process holds, the directories taking the lock created)
_held_locks: dict[Path, tuple[int, list[Path]]] = {}


class RunDirError(ValueError):
    pass


def run_files(save: Path) -> list[Path]:
    """The files and directories of a run in ``save`` (the shared data cache is not one)."""
    if not save.is_dir():
        return []
    named = [save / checkpoint.LATEST_NAME, save / checkpoint.RUN_CONFIG_NAME,
             save / METRICS_NAME, save / DISCARDED_METRICS_NAME]
    return [p for p in named if p.exists()] + sorted(save.glob("iter_*"))


def decide_resume(save: str | None, mode: str, overwrite: bool) -> tuple[bool, list[Path]]:
    """(whether this start continues the run in ``save``, the old run's files it deleted or,
    directories, set aside for deletion: ``Deletions`` deletes them).

    Raises RunDirError when the start may not happen; deletes only with ``overwrite``.
    """
    if mode not in RESUME_MODES:
        raise ValueError(f"resume mode {mode!r} is not one of {RESUME_MODES}")
    if mode != "never" and overwrite:
        raise RunDirError("--overwrite starts a run over and --resume continues one; pass one")
    if save is None:
        if mode == "always":
            raise RunDirError("--resume needs save: (the run directory) in the config or as "
                              "save=DIR")
        return False, []
    save_dir = Path(save)
    latest = checkpoint.latest_iteration(save_dir)
    complete = checkpoint.complete_iterations(save_dir) if save_dir.is_dir() else []
    if (save_dir / checkpoint.MEGATRON_LM_TRACKER).exists() and not overwrite:
        raise RunDirError(
            f"{save_dir} is a save directory of Megatron-LM's training loop ("
            f"{checkpoint.MEGATRON_LM_TRACKER}); start from it with load: {save_dir} and "
            "finetune: true in another save directory, or continue it with Megatron-LM's --load")
    if mode != "never" and latest is None and len(complete) == 1 \
            and name_unnamed_checkpoint(save_dir, complete[0]):
        latest = complete[0]
    if latest is None and complete and not overwrite:
        # Without 'latest', --resume auto would start over and set every checkpoint aside.
        raise RunDirError(
            f"{save_dir} holds checkpoints {checkpoint.describe_iterations(complete)} but no "
            f"'{checkpoint.LATEST_NAME}' file naming the one to continue from; write its "
            f"iteration into {save_dir / checkpoint.LATEST_NAME} (the newest: {complete[-1]}) "
            "and pass --resume, or --overwrite to delete them and start over")
    if mode == "always" and latest is None:
        # A run that stopped before its first checkpoint left files a plain start refuses.
        start = ("--overwrite to start it over" if run_files(save_dir)
                 else "start without --resume")
        raise RunDirError(
            f"--resume: there is no checkpoint in {save_dir} (no '{checkpoint.LATEST_NAME}' "
            f"file) to continue; {start}, or use --resume auto to start when there is none")
    if mode != "never":
        return latest is not None, []
    existing = run_files(save_dir)
    if existing and not overwrite:
        held = (f"checkpoints up to iteration {latest}" if latest is not None
                else ", ".join(p.name for p in existing[:4]))
        # Without a checkpoint --resume has nothing to continue: --resume auto starts afresh.
        resume = "--resume" if latest is not None else "--resume auto"
        raise RunDirError(
            f"{save_dir} already holds a run ({held}); pass {resume} to continue it, "
            "--overwrite to delete its files and start over, or choose another save directory")
    for path in existing:
        if path.is_dir():  # a checkpoint (2 TB at 145B): renamed, deleted in the background
            if not path.name.endswith(".deleting"):
                checkpoint.set_aside_for_deletion(path)
        else:
            path.unlink()
    return False, existing


def name_unnamed_checkpoint(save_dir: Path, iteration: int) -> bool:
    """Make a missing ``latest`` name ``iteration``, the only complete checkpoint: the run was
    killed between committing its first checkpoint (the rename from ``.partial``, once every
    rank had written) and writing ``latest``. Returns whether it did; a damaged one is not
    taken. (A ``latest`` naming an older checkpoint is followed: it may have been set back by
    hand, and the newer ones are set aside, not lost.)"""
    marker, ckpt = save_dir / checkpoint.LATEST_NAME, checkpoint.iteration_dir(save_dir, iteration)
    try:
        checkpoint.check_readable(ckpt)
    except checkpoint.CheckpointError:
        return False
    checkpoint.write_text_atomic(marker, str(iteration))
    print(f"{marker} was missing: the run stopped after saving {ckpt} and before naming it "
          "there; it names it now and the run continues from it", flush=True)
    return True


def lock_save_dir(save: str | Path) -> None:
    """Hold ``save``'s run lock for this process (created if missing) until ``unlock_save_dir``
    or exit; raises RunDirError naming the live run that holds it. Re-entrant in one process."""
    save_dir = Path(save).resolve()
    if save_dir in _held_locks:
        return
    created = [p for p in (save_dir, *save_dir.parents) if not p.exists()]  # innermost first
    save_dir.mkdir(parents=True, exist_ok=True)
    lock = save_dir / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # a start refused meanwhile removed the directory it created
        return lock_save_dir(save)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirError(
            f"{save} is in use by another dsmoe-train run ({holder}): two runs writing one save "
            "directory replace each other's checkpoints. Stop that run first (the workers of a "
            "killed torchrun can live on: kill that pid on that host), or choose another save "
            "directory") from None
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        # A filesystem without locks (Lustre mounted without -o flock): say so, go on.
        print(f"warning: {save_dir} does not support file locks ({error.strerror}); nothing "
              "stops a second run from writing into it at the same time", file=sys.stderr)
        return
    if not _names(lock, fd):  # a refused start removed the file after this one opened it:
        os.close(fd)  # that lock keeps out no other run; take the file there now
        return lock_save_dir(save)
    holder = dict(host=socket.gethostname(), pid=os.getpid(),
                  since=datetime.datetime.now().isoformat(timespec="seconds"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    _held_locks[save_dir] = fd, created


def unlock_save_dir(save: str | Path, remove: bool = False) -> None:
    """Drop the lock this process holds on ``save`` (if any); ``remove``: also delete the lock
    file, and ``save`` and its parents where taking the lock created them and they are still
    empty (a start that did not happen leaves no trace)."""
    save_dir = Path(save).resolve()
    fd, created = _held_locks.pop(save_dir, (None, []))
    if fd is None:
        return
    if remove:
        (save_dir / LOCK_NAME).unlink(missing_ok=True)
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()
    os.close(fd)  # closing drops the flock


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is the file open as ``fd``."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its host and pid were not recorded"


def set_aside_newer_checkpoints(save: str | Path, iteration: int) -> list[str]:
    """Rename the iteration directories past ``iteration`` (the checkpoint a resume continues
    from, older when ``latest`` was set back by hand) to ``iter_XXXXXXX.discarded``: the run
    would otherwise delete each as it saves that iteration again. Returns the new names."""
    moved = []
    for path in sorted(Path(save).glob("iter_*")):
        if (checkpoint.iteration_of(path) or 0) > iteration:
            moved.append(checkpoint.set_aside(path, ".discarded").name)
    return moved


def rewind_metrics(save: str | Path, iteration: int) -> int:
    """Move the records logged after ``iteration`` from metrics.jsonl to metrics.discarded.jsonl
    (progress lost when the run stopped after its last checkpoint), and lines that are not
    records (one cut short by a crash or a full disk); returns how many moved."""
    metrics = Path(save) / METRICS_NAME
    if not metrics.exists():
        return 0
    kept, moved = [], []
    for line in metrics.read_text().splitlines():
        if line.strip():
            (moved if _logged_after(line, iteration) else kept).append(line)
    if moved:
        with open(Path(save) / DISCARDED_METRICS_NAME, "a") as f:
            f.write("".join(line + "\n" for line in moved))
        checkpoint.write_text_atomic(metrics, "".join(line + "\n" for line in kept))
    return len(moved)


def _logged_after(line: str, iteration: int) -> bool:
    try:
        return json.loads(line).get("iteration", 0) > iteration
    except (ValueError, AttributeError):  # not a record
        return True


class Deletions:
    """Deletes a save directory's ``.deleting`` directories on a thread, one deletion at a time.
    ``wait`` before a save makes room for it, and before the run ends."""

    def __init__(self):
        self._thread: threading.Thread | None = None

    def start(self, save: str | Path, why: str) -> None:
        from tqdm import tqdm  # its write keeps the progress bar whole

        self.wait()

        def delete():
            gone = checkpoint.delete_set_aside(save)
            if gone:
                names = ", ".join(p.name.removesuffix(".deleting") for p in gone)
                tqdm.write(f"deleted {names} ({why})")
            left = ", ".join(p.name for p in sorted(Path(save).glob("iter_*.deleting")))
            if left:  # a file of it held open (NFS), a permission
                tqdm.write(f"{why}: {left} could not be deleted yet; training goes on, and the "
                           "next save tries again")

        self._thread = threading.Thread(target=delete, name="dsmoe-deletions", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
