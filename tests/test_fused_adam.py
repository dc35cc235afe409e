"""A checkpoint of torch's AdamW (CPU, no Transformer Engine or apex) resumed with TE's FusedAdam
(a GPU machine), and the other way round, through dsmoe-train.

FusedAdam is tests/fused_adam.py's stand-in: TE's state handling, the update in plain torch.
Every run trains resume_cases' model for ITERS iterations, saving at RESUME_AT; a resumed run
must go on as the uninterrupted run of the Adam that saved went (up to the two Adams' rounding).
"""

from __future__ import annotations

import pytest

from distributed import run_on_ranks
from resume_cases import run_job, train_argv

pytestmark = pytest.mark.distributed

ITERS, RESUME_AT = 4, 2
OPTIMIZERS = ("distributed", "standard")
ADAMS = ("torch", "fused")
# 1: one rank; PP2-dense-stage: rank 0's stage holds no expert, so neither does its expert Adam.
LAYOUTS = ("1", "PP2-dense-stage")


def task(adam: str, kind: str, *args) -> tuple:
    return ("with_adam", adam, kind, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from dsmoe_megatron.data import default_corpus_prefix

    root = tmp_path_factory.mktemp("fused_adam")
    data = default_corpus_prefix(root / "data")

    def argv(layout, save, optimizer, *extra):
        return train_argv(data, layout, save, f"train_iters={ITERS}",
                          f"save_interval={RESUME_AT}",
                          f"use_distributed_optimizer={optimizer == 'distributed'}", *extra)

    results = {}
    for layout, world in zip(LAYOUTS, (1, 2)):
        tasks = []
        for optimizer in OPTIMIZERS:
            for saver in ADAMS:
                straight = root / layout / optimizer / saver
                tasks.append(((layout, optimizer, saver), task(
                    saver, "train", argv(layout, straight, optimizer))))
                for resumer in ADAMS:
                    if resumer == saver == "torch":
                        continue  # test_resume's
                    save = root / layout / optimizer / f"{saver}-to-{resumer}"
                    tasks.append(((layout, optimizer, saver, resumer), task(
                        resumer, "resume_copy", str(straight), argv(layout, save, optimizer),
                        RESUME_AT)))
        if layout == "1":  # fp16 skips every step of its loss scale's first ones: no update
            for optimizer in OPTIMIZERS:
                save = root / "fp16" / optimizer
                fp16 = [*argv(layout, save, optimizer), "model_parallel.fp16=true",
                        "language_model.num_layers=2"]
                tasks += [(("fp16", optimizer, n), task("fused", "train", a)) for n, a in (
                    ("first", [*fp16, "train_iters=2"]),
                    ("resumed", [*fp16, "train_iters=3", "--resume"]))]
                tasks.append((("fp16", optimizer, "torch"), task("torch", "resume_copy", str(
                    save), argv(layout, root / "fp16" / f"{optimizer}-torch", optimizer,
                                "model_parallel.fp16=true", "language_model.num_layers=2",
                                "train_iters=3"), RESUME_AT)))
        out = run_on_ranks(run_job, world, args=([t for _, t in tasks],), timeout=900)[0]
        results.update((key, result) for (key, _), result in zip(tasks, out))
    return results


def by_iteration(result: dict) -> dict[int, dict]:
    assert result["code"] == 0, result["stderr"][-3000:]
    return {r["iteration"]: r for r in result["records"] if "lm_loss" in r}


# torch to torch is test_resume's.
CROSSINGS = [pytest.param(layout, optimizer, saver, resumer,
                          id=f"{saver}-to-{resumer}-{optimizer}-{layout}")
             for layout in LAYOUTS for optimizer in OPTIMIZERS
             for saver, resumer in (("torch", "fused"), ("fused", "torch"), ("fused", "fused"))
             if not saver == resumer == "torch"]


@pytest.mark.parametrize("layout, optimizer, saver, resumer", CROSSINGS)
def test_a_checkpoint_resumes_with_the_other_adam(runs, layout, optimizer, saver, resumer):
    """The step goes where the resuming Adam keeps it: a float step in FusedAdam's groups failed
    its first step, a per-parameter one its load (TE) or was dropped (apex, bias correction
    started over); torch's Adam found none in a FusedAdam checkpoint. With PP, FusedAdam's
    expert groups on rank 0 (none of its parameters) saved no step: it restarted silently."""
    straight = by_iteration(runs[(layout, optimizer, saver)])
    resumed = by_iteration(runs[(layout, optimizer, saver, resumer)])
    assert sorted(resumed) == list(range(1, ITERS + 1))
    for it in range(RESUME_AT + 1, ITERS + 1):
        for key in ("lm_loss", "grad_norm"):
            assert resumed[it][key] == pytest.approx(straight[it][key], rel=1e-5), (it, key)


def test_the_two_adams_train_alike(runs):
    """The stand-in's update is AdamW's: the comparisons above can tell a wrong step."""
    torch_run, fused_run = (by_iteration(runs[("1", "distributed", a)]) for a in ADAMS)
    for it in range(1, ITERS + 1):
        assert fused_run[it]["lm_loss"] == pytest.approx(torch_run[it]["lm_loss"], rel=1e-5)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fused_adam_saves_before_its_first_update(runs, optimizer):
    """fp16's first steps overflow and are skipped: FusedAdam has no state yet, which the
    distributed optimizer failed to save and the standard one saved without moments. The
    checkpoint resumes with FusedAdam and with torch's Adam."""
    for name in ("resumed", "torch"):
        result = runs[("fp16", optimizer, name)]
        assert result["code"] == 0, result["stderr"][-3000:]
        assert [r["iteration"] for r in result["records"]] == [1, 2, 3]
