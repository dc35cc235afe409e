"""finetune: true with load: a new run from a checkpoint's weights only, on another layout and
with other hyper-parameters, at iteration 0 with a new optimizer (Megatron-LM's --finetune)."""

import pytest
import torch

from common import full_tensors
from distributed import run_on_ranks
from resume_cases import run_job, train_argv

pytestmark = pytest.mark.distributed


def test_finetune_starts_from_the_weights_at_iteration_0(tmp_path):
    from dsmoe_megatron.data import default_corpus_prefix

    data = default_corpus_prefix(tmp_path / "data")
    source, tuned = tmp_path / "source", tmp_path / "tuned"
    # Another layout, seq_length, batch, schedule and train_iters (fewer than the source's);
    # an lr so small that the fine-tuned weights are the loaded ones.
    new = [f"load={source}", "seq_length=16", "global_batch_size=4", "lr=1e-12", "min_lr=0",
           "lr_decay_style=constant"]
    results = run_on_ranks(run_job, 2, args=([
        ("train", train_argv(data, "DP2", source, "train_iters=2")),
        ("train", train_argv(data, "EP2", tuned, *new, "finetune=true", "train_iters=1")),
        ("train", train_argv(data, "EP2", tuned, *new, "finetune=true", "train_iters=2",
                             "--resume")),
        ("train", train_argv(data, "EP2", tmp_path / "no", *new, "train_iters=1")),
        ("train", train_argv(data, "EP2", tmp_path / "wider", *new, "finetune=true",
                             "train_iters=1", "language_model.hidden_size=64")),
        ("train", train_argv(data, "EP2", tmp_path / "none", "finetune=true")),
    ],))[0]
    _, tuned_run, resumed, carried, wider, no_load = results
    assert tuned_run["code"] == 0, tuned_run["stderr"][-3000:]
    assert [r["iteration"] for r in tuned_run["records"]] == [1]
    assert tuned_run["records"][0]["lr"] == pytest.approx(1e-12)  # the warm-up's end
    before = full_tensors(source / "iter_0000002")
    after = full_tensors(tuned / "iter_0000001")
    assert before.keys() == after.keys()
    weights = [k for k in before if not k.startswith("chained_")]
    assert len(weights) > 20
    for key in weights:
        assert torch.allclose(after[key], before[key], rtol=0, atol=1e-9), key
    # Adam's moments after one step of a new optimizer: 0.1 g and 0.05 g**2 (betas 0.9, 0.95).
    moments = [k for k in after if ".optimizer.state.exp_avg." in k]
    assert len(moments) == len(weights)
    for key in moments:
        first, second = after[key], after[key.replace("exp_avg.", "exp_avg_sq.")]
        assert torch.allclose(second, 5 * first ** 2, rtol=1e-4, atol=1e-20), key
    # A restarted fine-tune continues its own checkpoints, not the source.
    assert resumed["code"] == 0, resumed["stderr"][-3000:]
    assert [r["iteration"] for r in resumed["records"]] == [1, 2]
    assert "fine-tune" not in resumed["stdout"] + resumed["stderr"]
    for result, phrases in (
            (carried, ["is at iteration 2, and train_iters=1", "finetune: true"]),
            (wider, ["language_model.hidden_size is 32 there and 64 here",
                     "set language_model.hidden_size=32 to start from it"])):
        assert result["code"] == 1, result["stderr"][-3000:]
        assert "Traceback" not in result["stderr"]
        for phrase in phrases:
            assert phrase in result["stderr"], (phrase, result["stderr"])
    assert no_load["code"] == 2
    assert "finetune: true needs load" in no_load["stderr"]
