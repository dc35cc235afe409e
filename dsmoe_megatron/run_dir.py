"""The save directory of a run: whether a start may use it, and keeping its files to one run.

A save directory belongs to one run. Starting without ``--resume`` in one that holds a run's
files (checkpoints, ``latest``, ``run.yaml``, ``metrics.jsonl``) is refused unless
``--overwrite`` asks to delete them first; ``--resume`` needs a checkpoint there;
``--resume auto`` resumes when there is one and starts otherwise (for cluster jobs that restart
the same command). When a run continues from iteration k, metrics logged after k by the attempt
that crashed are moved to ``metrics.discarded.jsonl``, so ``metrics.jsonl`` is one history.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dsmoe_megatron import checkpoint

METRICS_NAME = "metrics.jsonl"
DISCARDED_METRICS_NAME = "metrics.discarded.jsonl"
RESUME_MODES = ("never", "always", "auto")


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
    """(whether this start continues the run in ``save``, the old run's files it deleted).

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
    if mode == "always" and latest is None:
        raise RunDirError(
            f"--resume: there is no checkpoint in {save_dir} (no '{checkpoint.LATEST_NAME}' "
            "file) to continue; start without --resume, or use --resume auto to start when "
            "there is none")
    if mode != "never":
        return latest is not None, []
    existing = run_files(save_dir)
    if existing and not overwrite:
        held = (f"checkpoints up to iteration {latest}" if latest is not None
                else ", ".join(p.name for p in existing[:4]))
        raise RunDirError(
            f"{save_dir} already holds a run ({held}); pass --resume to continue it, "
            "--overwrite to delete its files and start over, or choose another save directory")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return False, existing


def rewind_metrics(save: str | Path, iteration: int) -> int:
    """Move the records logged after ``iteration`` from metrics.jsonl to metrics.discarded.jsonl
    (progress lost when the run stopped after its last checkpoint); returns how many moved."""
    metrics = Path(save) / METRICS_NAME
    if not metrics.exists():
        return 0
    kept, moved = [], []
    for line in metrics.read_text().splitlines():
        if line.strip():
            (moved if json.loads(line).get("iteration", 0) > iteration else kept).append(line)
    if moved:
        with open(Path(save) / DISCARDED_METRICS_NAME, "a") as f:
            f.write("".join(line + "\n" for line in moved))
        checkpoint.write_text_atomic(metrics, "".join(line + "\n" for line in kept))
    return len(moved)
