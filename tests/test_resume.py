"""Multi-rank runs through dsmoe-train: resume and reshard with optimizer state, grad norm,
layout-independent initial weights, a save that fails on a full disk.

Every run trains the same model (tests/resume_cases.py: 12 routed experts, top-4, 2 shared,
a2 = 0.05) from its seed for ITERS iterations, saving at RESUME_AT. The reference is the
uninterrupted single-rank run. All runs happen in five spawned jobs (1, 2, 4, 2 and 1 ranks),
shared by the tests through one module fixture.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from common import full_tensors
from distributed import run_on_ranks
from resume_cases import WORLD, run_job, train_argv

pytestmark = pytest.mark.distributed

ITERS, RESUME_AT = 4, 2
SAME_LAYOUT = ["1", "DP2", "EP2", "TP2+SP", "PP2", "PP2-interleaved", "PP2-dense-stage",
               "DP2xEP2", "TP2xEP2"]
CROSS_LAYOUT = [("TP2xEP2", "1"), ("PP2", "1"), ("EP2", "EP4"), ("1", "TP2xEP2"),
                ("DP2xEP2", "PP2"), ("PP2-dense-stage", "1")]
INIT_LAYOUTS = ["1", "TP2+SP", "PP2-interleaved", "TP2xEP2"]
OPTIMIZERS = ("distributed", "standard")
PRECISIONS = ("bf16", "fp32")  # a GPU run resumed on a CPU in fp32, and the other way round
METRICS = ("lm_loss", "load_balancing_loss", "device_balance_loss", "grad_norm")


class Runs:
    """Lays out the runs' directories and collects what the jobs return."""

    def __init__(self, root: Path, data: str):
        self.root, self.data = root, data
        self.results: dict = {}

    def save_dir(self, layout: str, optimizer: str, name: str) -> Path:
        return self.root / layout / optimizer / name

    def argv(self, layout: str, save: Path, *extra: str) -> list[str]:
        return train_argv(self.data, layout, save, f"train_iters={ITERS}",
                          f"save_interval={RESUME_AT}", *extra)

    def same_layout_tasks(self, layout: str) -> list[tuple]:
        """Per optimizer: an uninterrupted run, and a copy of it as it was at RESUME_AT,
        resumed (in the same job, after it)."""
        tasks = []
        for optimizer in OPTIMIZERS:
            flag = f"use_distributed_optimizer={optimizer == 'distributed'}"
            straight, resumed = (self.save_dir(layout, optimizer, n) for n in ("a", "b"))
            tasks += [
                ((layout, optimizer, "straight"), ("train", self.argv(layout, straight, flag))),
                ((layout, optimizer, "resumed"), ("resume_copy", str(straight), self.argv(
                    layout, resumed, flag), RESUME_AT)),
            ]
        return tasks

    def cross_layout_task(self, source: str, target: str) -> tuple:
        """`--resume` on `target` in a save dir holding `source`'s checkpoint RESUME_AT."""
        name = f"iter_{RESUME_AT:07d}"
        save = self.root / f"{source}-to-{target}"
        shutil.copytree(self.save_dir(source, "distributed", "a") / name, save / name)
        (save / "latest").write_text(str(RESUME_AT))
        return ("train", self.argv(target, save, "--resume"))

    @staticmethod
    def precision_run(optimizer: str, precision: str) -> tuple:
        """The key of the DP2 run (bf16 or fp32) whose checkpoint RESUME_AT the other precision
        resumes: the fp32 one is the same-layout test's uninterrupted run."""
        return ("DP2", optimizer, "straight" if precision == "fp32" else precision)

    def precision_source(self, optimizer: str, precision: str) -> Path:
        return self.save_dir("DP2", optimizer, "a" if precision == "fp32" else precision)

    def precision_save(self, optimizer: str, source: str, kind: str) -> Path:
        target = next(p for p in PRECISIONS if p != source)
        return self.root / "precision" / optimizer / f"{source}-to-{target}-{kind}"

    def precision_tasks(self, optimizer: str, source: str) -> list[tuple]:
        """On one rank, in the other precision, from `source`'s checkpoint: resume and save
        what was loaded ("resaved"), and resume and train ("train")."""
        flags = (f"use_distributed_optimizer={optimizer == 'distributed'}",
                 f"model_parallel.bf16={source != 'bf16'}")
        name = f"iter_{RESUME_AT:07d}"
        tasks = []
        for kind in ("resaved", "train"):
            save = self.precision_save(optimizer, source, kind)
            shutil.copytree(self.precision_source(optimizer, source) / name, save / name)
            (save / "latest").write_text(str(RESUME_AT))
            argv = self.argv("1", save, *flags)
            task = (("resumed_checkpoint", argv, str(save / "resaved")) if kind == "resaved"
                    else ("train", [*argv, "--resume"]))
            tasks.append((("precision", optimizer, source, kind), task))
        return tasks

    def init_task(self, layout: str) -> tuple:
        return ("initial_weights", self.argv(layout, self.root / "unused"),
                str(self.root / "init" / layout))

    def run(self, world: int, keyed_tasks: list[tuple[str, tuple]]) -> None:
        results = run_on_ranks(run_job, world, args=([t for _, t in keyed_tasks],),
                               timeout=1800)[0]
        for (key, _), result in zip(keyed_tasks, results):
            self.results[key] = result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    from dsmoe_megatron.data import default_corpus_prefix

    root = tmp_path_factory.mktemp("resume")
    runs = Runs(root, default_corpus_prefix(root / "data"))
    by_world: dict[int, list] = {1: [], 2: [], 4: []}
    for layout in SAME_LAYOUT:
        by_world[WORLD[layout]] += runs.same_layout_tasks(layout)
    for layout in INIT_LAYOUTS:
        by_world[WORLD[layout]].append((("init", layout), runs.init_task(layout)))
    by_world[1].append((("expert share",), ("expert_gradient_share",
                                             runs.argv("1", root / "unused"))))
    by_world[2].append((("gpu-like rng",), ("experts_on_gpu_rng",
                                             runs.argv("EP2", root / "unused"), (1234, 4321))))
    by_world[2].append((("DP2", "overlap"), ("train", runs.argv(
        "DP2", runs.save_dir("DP2", "distributed", "overlap"), "overlap_grad_reduce=true",
        "ddp_bucket_size=2000"))))
    full = root / "disk full"  # EP2: the disk fills at the second save (iteration 4)
    by_world[2] += [(("disk full",), ("train_disk_full", runs.argv("EP2", full), 2)),
                    (("resume after disk full",), ("train", runs.argv("EP2", full, "--resume")))]
    for optimizer in OPTIMIZERS:
        by_world[2].append((runs.precision_run(optimizer, "bf16"), ("train", runs.argv(
            "DP2", runs.precision_source(optimizer, "bf16"), "model_parallel.bf16=true",
            f"use_distributed_optimizer={optimizer == 'distributed'}"))))
    by_world[4].append((("EP4", "distributed", "straight"), ("train", runs.argv(
        "EP4", runs.save_dir("EP4", "distributed", "a"), "--stop-at", "1"))))
    # Jobs in dependency order: a cross-layout resume needs its source's checkpoint.
    runs.run(1, by_world[1])
    runs.run(2, by_world[2])
    runs.run(4, by_world[4] + [((s, t), runs.cross_layout_task(s, t))
                               for s, t in CROSS_LAYOUT if WORLD[t] == 4])
    runs.run(2, [((s, t), runs.cross_layout_task(s, t))
                 for s, t in CROSS_LAYOUT if WORLD[t] == 2])
    runs.run(1, [((s, t), runs.cross_layout_task(s, t)) for s, t in CROSS_LAYOUT if WORLD[t] == 1]
             + [task for optimizer in OPTIMIZERS for source in PRECISIONS
                for task in runs.precision_tasks(optimizer, source)])
    return runs


def by_iteration(result: dict) -> dict[int, dict]:
    assert result["code"] == 0, result["stderr"][-2000:]
    return {r["iteration"]: r for r in result["records"] if "lm_loss" in r}


def reference(runs: Runs) -> dict[int, dict]:
    return by_iteration(runs.results[("1", "distributed", "straight")])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("layout", SAME_LAYOUT)
def test_same_layout_resume_is_bit_identical(runs, layout, optimizer):
    straight = by_iteration(runs.results[(layout, optimizer, "straight")])
    resumed = by_iteration(runs.results[(layout, optimizer, "resumed")])
    # One history in metrics.jsonl: the copied records after RESUME_AT were set aside.
    records = runs.results[(layout, optimizer, "resumed")]["records"]
    assert [r["iteration"] for r in records if "lm_loss" in r] == list(range(1, ITERS + 1))
    for it in range(RESUME_AT + 1, ITERS + 1):
        for key in METRICS:
            assert resumed[it][key] == straight[it][key], (it, key)


@pytest.mark.parametrize("source, target", CROSS_LAYOUT, ids=[f"{s}-to-{t}" for s, t in
                                                             CROSS_LAYOUT])
def test_cross_layout_resume_matches_single_rank_run(runs, source, target):
    after = by_iteration(runs.results[(source, target)])
    ref = reference(runs)
    assert sorted(after) == list(range(RESUME_AT + 1, ITERS + 1))
    for it in after:
        for key in METRICS:
            assert after[it][key] == pytest.approx(ref[it][key], rel=1e-5), (it, key)


@pytest.mark.parametrize("layout", SAME_LAYOUT + ["EP4"])
def test_grad_norm_matches_single_rank(runs, layout):
    """The first step's norm (used for clipping) on every layout, expert TP 2 included."""
    first = by_iteration(runs.results[(layout, "distributed", "straight")])[1]
    assert first["grad_norm"] == pytest.approx(reference(runs)[1]["grad_norm"], rel=1e-6)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_stage_without_moe_layers_trains_like_the_single_rank_run(runs, optimizer):
    """PP2 whose first stage holds only the dense layer: that stage records no balance loss,
    yet takes part in every reduction of the logged metrics (else the other stage waits), and
    its expert optimizer, which holds no parameter, saves and loads (the distributed one)."""
    ref = reference(runs)
    run = by_iteration(runs.results[("PP2-dense-stage", optimizer, "straight")])
    assert sorted(run) == list(range(1, ITERS + 1))
    for it in run:
        for key in METRICS:
            assert run[it][key] == pytest.approx(ref[it][key], rel=1e-5), (it, key)


def test_expert_gradients_weigh_enough_for_the_norm_check(runs):
    """Counting one expert-TP shard of two drops about half of the routed experts' squared
    gradient norm, moving the norm by about share / 4: the 1e-6 check above must see that.
    (At initialisation the embedding and output layer dominate this small model's norm.)"""
    assert runs.results[("expert share",)] / 4 > 10 * 1e-6


@pytest.mark.parametrize("layout", INIT_LAYOUTS[1:])
def test_initial_weights_do_not_depend_on_the_layout(runs, layout):
    single = full_tensors(runs.root / "init" / "1")
    other = full_tensors(runs.root / "init" / layout)
    assert single.keys() == other.keys()
    for key in single:
        assert (single[key] == other[key]).all(), key


def test_first_steps_match_across_layouts(runs):
    """Trained from scratch (no shared checkpoint), every layout tracks the single-rank run."""
    ref = reference(runs)
    for layout in SAME_LAYOUT[1:]:
        run = by_iteration(runs.results[(layout, "distributed", "straight")])
        for it in range(1, ITERS + 1):
            assert run[it]["lm_loss"] == pytest.approx(ref[it]["lm_loss"], rel=1e-5), (layout, it)
            # Routing statistics of the global batch (rank 0's tokens alone under DP / EP, its
            # own stage's layers alone under PP, before).
            for key in ("expert_load_max_over_mean", "experts_unused_fraction"):
                assert run[it][key] == pytest.approx(ref[it][key], rel=1e-6), (layout, it, key)


def test_experts_differ_across_ep_ranks_and_follow_the_seed(runs):
    out = runs.results[("gpu-like rng",)]
    half = out["trainer seed 1234"].shape[0] // 2
    # The emulated GPU RNG reproduces the defect: drawn on the CPU outside the tracker's stream,
    # the experts of EP rank 1 repeat those of EP rank 0.
    construction = out["construction seed 1234"]
    assert (construction[:half] == construction[half:]).all()
    trainer = out["trainer seed 1234"]
    assert not (trainer[:half] == trainer[half:]).all(dim=(1, 2)).any()
    assert not (trainer == out["trainer seed 4321"]).all(dim=(1, 2)).any()


def test_a_full_disk_stops_every_rank_with_the_cause_and_the_run_resumes(runs):
    """EP2, the disk full at the save of iteration 4: every rank says why in one line (Megatron
    gives the cause to rank 0 only) and names iteration 2, which stays `latest`; resumed from it,
    the run continues exactly as the uninterrupted one."""
    full = runs.results[("disk full",)]
    assert full["code"] == 1
    for message in full["stderr_by_rank"]:
        assert "Traceback" not in message, message
        for phrase in ("saving iteration 4", "No space left on device", "MiB free",
                       f"{runs.root / 'disk full' / 'iter_0000002'}, is untouched"):
            assert phrase in message, (phrase, message)
    assert full["latest"] == "2" and full["partial"] == []
    resumed = by_iteration(runs.results[("resume after disk full",)])
    straight = by_iteration(runs.results[("EP2", "distributed", "straight")])
    assert sorted(resumed) == list(range(1, ITERS + 1))
    for it in range(RESUME_AT + 1, ITERS + 1):
        for key in METRICS:
            assert resumed[it][key] == straight[it][key], (it, key)


def test_overlapped_grad_reduce_matches(runs):
    """overlap_grad_reduce (buckets reduced during backward) on CPU: same training."""
    overlapped = by_iteration(runs.results[("DP2", "overlap")])
    plain = by_iteration(runs.results[("DP2", "distributed", "straight")])
    for it in plain:
        assert overlapped[it]["lm_loss"] == pytest.approx(plain[it]["lm_loss"], rel=1e-6)
        assert not math.isnan(overlapped[it]["grad_norm"])


def _master_weights(tensors: dict, key: str) -> torch.Tensor:
    """A parameter's fp32 master weights in a checkpoint of either optimizer and precision: the
    optimizer's copy where it keeps one (bf16/fp16 standard, and the distributed optimizer),
    else the fp32 model weights."""
    copies = [v for k, v in tensors.items() if k.startswith("chained_")
              and k.split(".", 1)[1] in (f"optimizer.state.fp32_param.{key}",
                                         f"optimizer.state.param.{key}")]
    assert len(copies) <= 1, key
    return copies[0] if copies else tensors[key]


@pytest.mark.parametrize("source", PRECISIONS, ids=[f"from-{p}" for p in PRECISIONS])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_checkpoint_resumes_in_the_other_precision(runs, optimizer, source):
    """A bf16 run resumed in fp32 (on a machine without bf16, or to check a divergence) and an
    fp32 run resumed in bf16, from DP2 onto one rank: the fp32 master weights and Adam's moments
    carry over exactly (the model weights are the masters in fp32, their bf16 rounding in bf16),
    and training goes on where the source run went."""
    saved = full_tensors(runs.precision_source(optimizer, source) / f"iter_{RESUME_AT:07d}")
    resumed = full_tensors(runs.precision_save(optimizer, source, "resaved") / "resaved")
    model_keys = [k for k in saved if not k.startswith("chained_")]
    assert len(model_keys) > 20
    for key in model_keys:
        master = _master_weights(saved, key)
        assert master.dtype == torch.float32
        assert torch.equal(_master_weights(resumed, key), master), key
        assert torch.equal(resumed[key].float(), master.to(resumed[key].dtype).float()), key
    moments = [k for k in saved if ".optimizer.state.exp_avg" in k]
    assert len(moments) == 2 * len(model_keys)  # exp_avg and exp_avg_sq
    for key in moments:
        assert torch.equal(resumed[key], saved[key]), key
    source_run = by_iteration(runs.results[runs.precision_run(optimizer, source)])
    after = by_iteration(runs.results[("precision", optimizer, source, "train")])
    assert sorted(after) == list(range(RESUME_AT + 1, ITERS + 1))
    for it in after:  # bf16 against fp32 arithmetic
        assert after[it]["lm_loss"] == pytest.approx(source_run[it]["lm_loss"], rel=1e-2)
