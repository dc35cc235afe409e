"""Run a function on N gloo ranks in spawned processes and return every rank's result.

    results = run_on_ranks(check_fn, world_size=2, layout=ParallelLayout(tensor=2), args=(...))

`check_fn` must be a module-level function (it is pickled into each process). Each rank brings up
`dsmoe_megatron.runtime.initialize(layout)` before calling it. A failure on any rank raises
`RankFailed` with that rank's traceback; a rank that hangs is killed after `timeout` seconds.
On a GPU machine each rank uses its own GPU; a test that needs more ranks than GPUs is skipped.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback

import torch.multiprocessing as mp

from dsmoe_megatron.runtime import ParallelLayout, free_port


class RankFailed(AssertionError):
    pass


def _rank_main(rank, world_size, port, layout, seed, fn, args, results):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        # One thread per rank: the ranks share two cores.
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    from dsmoe_megatron import runtime

    try:
        runtime.initialize(layout, seed=seed)
        # Pickled here: a tensor put on the queue as it is travels as a file descriptor that the
        # parent must fetch from this process, which may have exited by then.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        runtime.shutdown()


def run_on_ranks(fn, world_size: int, layout: ParallelLayout = ParallelLayout(), args=(),
                 seed: int = 1234, timeout: float = 240.0) -> list:
    import pytest
    import torch

    # Each rank takes a GPU of its own when there are GPUs (NCCL cannot share one).
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        pytest.skip(f"needs {world_size} GPUs, {torch.cuda.device_count()} visible")
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, layout, args, seed, timeout)
        except RankFailed as failure:
            # The free port we picked can be taken before rank 0 listens on it: pick another.
            if "EADDRINUSE" not in str(failure) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_once(fn, world_size, layout, args, seed, timeout):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, layout, seed, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(collected))
                # A rank killed by a signal (or exiting at C level) never reports: say so now
                # rather than at the timeout. (One that returned exits 0 after its report.)
                dead = [(r, procs[r].exitcode) for r in missing if procs[r].exitcode]
                if dead:
                    raise RankFailed(f"ranks {[r for r, _ in dead]} of {world_size} exited "
                                     f"without a result (exit codes {[c for _, c in dead]}; "
                                     "negative: killed by that signal)") from None
                if time.monotonic() > deadline:
                    raise RankFailed(f"ranks {missing} gave no result within {timeout:.0f} s "
                                     "(hang or deadlock)") from None
                continue
            if status == "error":
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{payload}")
            collected[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [collected[r] for r in range(world_size)]
