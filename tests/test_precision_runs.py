"""fp16 runs through dsmoe-train: a run whose steps all overflowed (the loss scale still coming
down) saves and resumes."""

import pytest

from distributed import run_on_ranks
from resume_cases import run_job, train_argv

pytestmark = pytest.mark.distributed

FP16 = ["model_parallel.fp16=true", "language_model.num_layers=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from dsmoe_megatron.data import default_corpus_prefix

    return default_corpus_prefix(tmp_path_factory.mktemp("data"))


def test_fp16_saves_before_its_first_update(tmp_path, data):
    """At the default initial_loss_scale (2**32) the first fp16 steps overflow and are skipped,
    so torch Adam has no state yet: the distributed optimizer failed its save on an assert.
    Skipped steps do not advance the lr schedule (Megatron-LM's rule), across a resume too."""
    save = tmp_path / "run"
    warmup = ["lr_warmup_iters=2"]  # lr=3e-3: 1.5e-3 for the first applied update, then 3e-3
    first, resumed = run_on_ranks(run_job, 1, args=([
        ("train", train_argv(data, "1", save, *FP16, *warmup, "train_iters=2")),
        ("train", train_argv(data, "1", save, *FP16, *warmup, "train_iters=3", "--resume")),
    ],))[0]
    assert first["code"] == 0, first["stderr"][-3000:]
    assert (save / "iter_0000002").is_dir()
    assert resumed["code"] == 0, resumed["stderr"][-3000:]
    records = resumed["records"]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for r in records:  # every step skipped, and the log says so
        assert r["grad_norm"] is None and r["skipped_steps"] == 1, r
        assert r["loss_scale"] <= 2.0**32
        assert r["lr"] == pytest.approx(3e-3 / 2), r
