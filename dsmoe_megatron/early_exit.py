"""Stopping a run early with a checkpoint, before a scheduler ends it: after a time budget (the
job's time limit) or on a signal (a warning before preemption). Megatron-LM's
``exit_duration_in_mins`` and ``exit_signal_handler`` / ``exit_signal``, for dsmoe-train.

Without them a job killed at its time limit loses the steps since its last save.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

EXIT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")
"""Signals that may ask for a save; SIGINT (Ctrl-C) always stops at once."""


class EarlyExit:
    """Within ``with``: the exit signal only notes the request (repeated deliveries, such as the
    scheduler's and torchrun's, are one request). ``reason()``, called by every rank after each
    step, says whether to stop: all ranks agree, so they stop after the same step."""

    def __init__(self, train, device: torch.device, started: float):
        self.minutes = train.exit_duration_in_mins
        self.signal = signal.Signals[train.exit_signal] if train.exit_signal_handler else None
        self.device, self.started = device, started
        self.received = False
        self._previous = None

    def __enter__(self) -> EarlyExit:
        # Python sets handlers on the main thread only (a caller's thread keeps the default).
        if self.signal is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signal, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(self.signal, self._previous)
            self._previous = None

    def _note(self, signum, frame) -> None:
        self.received = True

    def reason(self) -> str | None:
        """Why every rank stops after this step, or None. A collective (one 2-element
        all-reduce) when either way to stop is configured, nothing otherwise."""
        if self.signal is None and self.minutes is None:
            return None
        late = self.minutes is not None and time.monotonic() - self.started >= 60 * self.minutes
        flags = torch.tensor([self.received, late], dtype=torch.int32, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return f"{self.signal.name} received"
        if flags[1]:
            return f"exit_duration_in_mins={self.minutes:g} reached"
        return None
