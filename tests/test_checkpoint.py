"""Checkpoints move between machines with and without Transformer Engine, whose modules keep
FP8 metadata in `_extra_state` objects that a CPU model neither writes nor reads."""

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
